"""Nearest-code assignment: fused distances + argmin (+ the z_q gather), without the N x K matrix.

One kernel, ``_assign_kernel``, with constexpr flags for the three precision modes and for the two
halves of a split launch (top-k and sampled assignment have kernels of their own, ``topk.py`` and
``sample.py``, built from this file's helpers):

- search: a program owns BN rows and a run of code tiles; it keeps, per row, the minimum of the int64
  key ``(float bits of d) << 32 | code``. For d >= 0 the float bits are monotone, so the minimum key
  is the minimum distance and, among equal distances, the lowest code (NumPy argmin order). NaN
  distances are canonicalised to 0x7FC00000, above +Inf (0x7F800000), so neither ever beats a
  finite distance.
- finish: turns the best key into ``idx`` / ``dist``, applies the NaN/Inf policy, and writes z_q. The
  reported distance is measured again there in D tiles of ``_DIST_BD`` (also after the direct-form
  search, whose tile the autotuner picks), so it depends on the row and the code only.

Exact mode has two searches. The plain one is the direct form sum_j (z_j - c_j)^2 on CUDA cores
(``_search_exact``). The certified one (``_search_certify``, used for every N < 2^31) runs the
expanded form on tensor cores with split-bf16 dots (z = z_hi + z_lo, three bf16 products: about
fp32 accuracy), carries a rigorous bound on each approximate distance, and keeps per row the best
code's upper bound and every other code's lowest lower bound. When the best code's upper bound is
below all others' lower bounds, the best code is the true nearest one (strictly: exact ties never
certify) and the row is finished on the spot; the few rows the bound cannot separate are appended
to a list, and a last launch runs the plain direct-form search on just those rows.

The tensor-core searches read operands made once per call by ``centre.py`` (rows centred on the
codebook mean, already split into bf16 parts), so their inner loop is loads and dots only; per code
tile they reduce fp32 ranks and int32 codes to the tile's best per row, and make the int64 key once
per row at the end (no [BN, BK] block of 64-bit keys, which cost registers and instructions).

When the code axis is split across programs (small N, large K), each search program writes its
row minima to a ``[split, N]`` key buffer and a second, finish-only launch of the same kernel
takes the minimum over ``split``. A partial buffer rather than a 64-bit ``atomic_min``: it needs
no prefill launch, writes every slot (so autotuner re-runs are harmless), is deterministic, and
costs ``8 * split * N`` bytes, which is small because splitting only pays when N is small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqtriton.kernels import interpreting, row_major, tune_configs
from vqtriton.kernels.centre import centre_rows, centred_codebook

__all__ = ["assign_fwd", "PRECISIONS"]

PRECISIONS = ("exact", "tf32", "bf16")
_MODES = {"exact": 0, "tf32": 1, "bf16": 2}
# Internal mode of the certified exact search (split-bf16 dots + bound), see _search_certify.
_CERTIFY = 3

# Float bits of +Inf and of the canonical quiet NaN: NaN > Inf > every finite distance as int32.
INF_BITS = tl.constexpr(0x7F800000)
NAN_BITS = tl.constexpr(0x7FC00000)
KEY_MAX = tl.constexpr(2**63 - 1)
# A code index above every real one (int32): "no code yet".
NO_CODE = tl.constexpr(2**31 - 1)
# Chunks of BD summed into a partial before it joins the running total (two-level summation).
_GROUP = 8
# D tile of every reported distance (the finish's direct-form sum, ``_row_distance``): one tile whatever
# the search's tiles, the split and the machine, so a code's distance has the same bits in every launch
# (k = 1 and sampled assignment, and the top-k rows the certified search settles; GPU and interpreter
# alike). The rows top-k's direct-form search settles, and the residual kernel's levels, report their own
# sums, within the same bound.
_DIST_BD = tl.constexpr(32)
# Rows per program of the finish-only launch (split > 1): it streams N rows of z and z_q once.
_FINISH_BN = 32


@triton.jit
def _keys(b_d, o_k, m_k):
    """Sortable keys ``(bits of d) << 32 | code`` for a ``[BN, BK]`` block; padding codes sort last."""
    b_nan = b_d != b_d
    # Expanded-form round-off can go below 0, and -0.0 has the sign bit: both sort as +0.
    b_d = tl.where(b_d > 0, b_d, 0.0)
    b_bits = tl.where(b_nan, NAN_BITS, b_d.to(tl.int32, bitcast=True))  # [BN, BK]
    b_key = (b_bits.to(tl.int64) << 32) | o_k[None, :]  # [BN, BK]
    return tl.where(m_k[None, :], b_key, KEY_MAX)


@triton.jit
def _dot_bf16(b_a, b_b, b_acc, EMULATE_BF16: tl.constexpr):
    """``b_acc + b_a @ b_b`` for bf16 operands, fp32 accumulation: a tensor-core dot on a GPU; under
    the interpreter the operands are fp32 holding bf16 values and the fp32 dot is the same arithmetic."""
    if EMULATE_BF16:
        return tl.dot(b_a, b_b, b_acc, input_precision="ieee")
    return tl.dot(b_a, b_b, b_acc)


@triton.jit
def _direct_tile(z_ptr, c_ptr, o_n, m_n, o_k, m_k, D, stride_z, stride_c,
                 GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """``[BN, BK]`` direct-form fp32 distances sum_j (z_j - c_j)^2 of rows ``o_n`` to codes ``o_k``.

    Why this meets the precision contract: each term fl(fl(z_j - c_j)^2) is nonnegative with
    relative error <= 3u (u = 2^-24; fp16/bf16 inputs upcast exactly). A sum of nonnegative terms in
    any order has relative error <= (terms - 1) u, and the sum here has three levels: BD terms per
    chunk, GROUP chunks per partial, ceil(D / (BD GROUP)) partials. So every computed distance is
    within e = (BD + GROUP + ceil(D / (BD GROUP))) u of its exact value, e <= 76u for every config
    here (BD in 4..64) and D <= 2048, and the chosen code has d_i <= (1 + e) / (1 - e) d_min
    <= (1 + 153u) d_min < (1 + 2^-16) d_min. (One flat running sum over D / BD chunks would not do:
    D = 2048 with BD = 16 gives 2e ~ 290u > 2^-16.)
    No cancellation either, so a large common offset (100 + N(0, 1)) costs nothing.
    """
    b_d = tl.zeros([BN, BK], dtype=tl.float32)
    for d0 in range(0, D, BD * GROUP):
        b_part = tl.zeros([BN, BK], dtype=tl.float32)
        for d1 in range(d0, tl.minimum(d0 + BD * GROUP, D), BD):
            o_d = d1 + tl.arange(0, BD)
            m_d = o_d < D
            b_z = tl.load(z_ptr + o_n[:, None] * stride_z + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                          other=0.0).to(tl.float32)  # [BN, BD]
            # int64: a code's offset may pass 2^31 elements (K * D), and o_k may be int32.
            b_c = tl.load(c_ptr + o_k[:, None].to(tl.int64) * stride_c + o_d[None, :],
                          mask=m_k[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BK, BD]
            b_diff = b_z[:, None, :] - b_c[None, :, :]  # [BN, BK, BD]
            b_part += tl.sum(b_diff * b_diff, axis=2)
        b_d += b_part
    return b_d


@triton.jit
def _search_exact(z_ptr, c_ptr, o_n, m_n, k_lo, k_hi, D, stride_z, stride_c,
                  GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Best key per row over codes [k_lo, k_hi): the direct form in fp32 (``_direct_tile``: within its
    (1 + 2^-16) argument of the nearest code)."""
    b_best = tl.full([BN], KEY_MAX, tl.int64)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_d = _direct_tile(z_ptr, c_ptr, o_n, m_n, o_k, m_k, D, stride_z, stride_c, GROUP, BN, BK, BD)
        b_best = tl.minimum(b_best, tl.min(_keys(b_d, o_k, m_k), axis=1))
    return b_best


@triton.jit
def _tile_best(b_a, o_k):
    """Per row of a ``[BN, BK]`` block of NaN-free ranks: the minimum and the lowest code holding it."""
    t_min = tl.min(b_a, axis=1)
    t_code = tl.min(tl.where(b_a == t_min[:, None], o_k[None, :].to(tl.int32), NO_CODE), axis=1)
    return t_min, t_code


@triton.jit
def _merge_tile(b_min, b_code, b_a, o_k):
    """The running least rank and lowest code holding it, per row, after a ``[BN, BK]`` tile of NaN-free
    ranks of codes ``o_k`` (above the running ones): strict, so among equal ranks the earlier code stays."""
    t_min, t_code = _tile_best(b_a, o_k)
    m_take = t_min < b_min
    return tl.where(m_take, t_min, b_min), tl.where(m_take, t_code, b_code)


@triton.jit
def _dot_products(xh_ptr, xl_ptr, ch_ptr, cl_ptr, o_n, m_n, o_k, m_k, D, stride_x, stride_cs,
                  MODE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """``[BN, BK]`` dots x.y of centred rows and codes (``centre.py``) on tensor cores: tf32 (``MODE`` 1),
    bf16 (2), or split-bf16 with three products x_hi.y_hi + x_hi.y_lo + x_lo.y_hi (3: bf16 products are
    exact in fp32, the dropped x_lo.y_lo is <= 2^-16 |x_i||y_i|)."""
    b_dot = tl.zeros([BN, BK], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        p_x = o_n[:, None] * stride_x + o_d[None, :]
        m_x = m_n[:, None] & m_d[None, :]
        # int64: k0 runs in int32 in some callers, and K * D may pass 2^31 elements.
        p_yt = o_k[None, :].to(tl.int64) * stride_cs + o_d[:, None]
        m_yt = m_d[:, None] & m_k[None, :]
        b_xh = tl.load(xh_ptr + p_x, mask=m_x, other=0.0)  # [BN, BD]
        b_yh = tl.load(ch_ptr + p_yt, mask=m_yt, other=0.0)  # [BD, BK]
        if MODE == 1:
            b_dot = tl.dot(b_xh, b_yh, b_dot, input_precision="tf32")
        else:
            b_dot = _dot_bf16(b_xh, b_yh, b_dot, EMULATE_BF16)
        if MODE == 3:
            b_xl = tl.load(xl_ptr + p_x, mask=m_x, other=0.0)
            b_yl = tl.load(cl_ptr + p_yt, mask=m_yt, other=0.0)
            b_dot = _dot_bf16(b_xh, b_yl, b_dot, EMULATE_BF16)
            b_dot = _dot_bf16(b_xl, b_yh, b_dot, EMULATE_BF16)
    return b_dot


@triton.jit
def _dot_tile(xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, o_n, m_n, o_k, m_k, D, stride_x, stride_cs,
              MODE: tl.constexpr, EMULATE_BF16: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """``[BN, BK]`` expanded-form distances ``a = |x|^2 + |y|^2 - 2 x.y`` of centred rows to centred codes,
    the dot by ``_dot_products`` (``MODE`` 3: ``_search_certify``'s arithmetic, within its bound
    ``E |x|^2 + e_j`` of the direct form). Padding codes get +Inf; a code holding a NaN or Inf has
    ``|y|^2 = +Inf``, so +Inf too."""
    b_dot = _dot_products(xh_ptr, xl_ptr, ch_ptr, cl_ptr, o_n, m_n, o_k, m_k, D, stride_x, stride_cs, MODE,
                          EMULATE_BF16, BN, BK, BD)
    b_xsq = tl.load(xsq_ptr + o_n, mask=m_n, other=0.0)
    b_csq = tl.load(csq_ptr + o_k, mask=m_k, other=float("inf"))
    return b_xsq[:, None] + b_csq[None, :] - 2.0 * b_dot


@triton.jit
def _search_dot(xh_ptr, xsq_ptr, ch_ptr, csq_ptr, aux_ptr, o_n, m_n, k_lo, k_hi, D, stride_x, stride_cs,
                MODE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Best key per row over codes [k_lo, k_hi) by the expanded form on centred vectors (tf32 / bf16).

    With x = z - m and y = c - m (``centre.py``), codes are ranked by a = |y|^2 - 2 x.y (|x|^2 is the
    same for the whole row), the dot on tensor cores. Each code tile costs fp32 / int32 work only:
    its minimum and lowest code, merged into the row's running best; the int64 key is made once per
    row. Rows holding a NaN or Inf (|x|^2 not finite) fail: NaN for a NaN row or an all-NaN
    codebook (``aux[0]``), else +Inf; non-finite codes have |y|^2 = +Inf and never win.
    """
    b_min = tl.full([BN], float("inf"), tl.float32)
    b_code = tl.full([BN], NO_CODE, tl.int32)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_dot = _dot_products(xh_ptr, xh_ptr, ch_ptr, ch_ptr, o_n, m_n, o_k, m_k, D, stride_x, stride_cs, MODE,
                              EMULATE_BF16, BN, BK, BD)
        b_csq = tl.load(csq_ptr + o_k, mask=m_k, other=float("inf"))  # [BK] padding codes rank last
        b_a = b_csq[None, :] - 2.0 * b_dot  # [BN, BK]
        # NaN only from overflow (inf - inf): such a code never wins.
        b_a = tl.where(b_a == b_a, b_a, float("inf"))
        b_min, b_code = _merge_tile(b_min, b_code, b_a, o_k)
    b_xsq = tl.load(xsq_ptr + o_n, mask=m_n, other=0.0)
    # [BN] copies of aux[0] (a scalar would do on a GPU): 0 when every code holds a NaN.
    b_all_nan = tl.load(aux_ptr + tl.zeros([BN], dtype=tl.int32)) == 0
    m_ok = (b_min < float("inf")) & (b_xsq < float("inf"))
    b_fail = tl.where((b_xsq != b_xsq) | b_all_nan, NAN_BITS, INF_BITS)
    # Negative ranks are normal here: _rank_key's order holds for every sign.
    return tl.where(m_ok, _rank_key(b_min, b_code), b_fail.to(tl.int64) << 32)


@triton.jit
def _search_certify(xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, ce_ptr, o_n, m_n, k_lo, k_hi, K, D,
                    stride_x, stride_cs, EMULATE_BF16: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Per row over codes [k_lo, k_hi), by the split-bf16 expanded form: the best code's a, index and
    e, and the least l of every other code (the state ``_certified`` tests, and ``_merge_certify``
    merges across a split code axis).

    With x = z - m and y = c - m centred on the codebook mean, a_j = |x|^2 + |y_j|^2 - 2 x.y_j with
    x.y ~ x_hi.y_hi + x_hi.y_lo + x_lo.y_hi (``_dot_tile`` mode 3; the dropped terms are
    <= 3.1 2^-16 |x_i||y_i|). Each a_j is within B_j = C (|x| + |y_j|)^2 of the exact direct-form
    distance of the inputs, C = 3.5 2^-16 + 3.5 D 2^-23, which covers the dropped products, fp32
    accumulation of the 3D products and of both norms (with room for truncating accumulators), the
    centring and the final additions. As (|x| + |y|)^2 <= 2 (|x|^2 + |y|^2),
    B_j <= E (|x|^2 + |y_j|^2) with E = 2 C (1 + 2^-6) (``bound_e``): the 2^-6 covers the computed
    norms' round-off (<= D 2^-24) and that of the handful of fp32 operations of the test below
    (<= 8 2^-24 (|x|^2 + |y|^2) in all, under 2^-8 of 2 C (|x|^2 + |y|^2)).

    The launcher gives e_j = E |y_j|^2 per code (0 for a non-finite code, whose |y|^2 is +Inf). With
    l_j = a_j - e_j, the best code b (least a, lowest index among equal) is certified when
    ``a_b + e_b + 2 E |x|^2 < min_{j != b} l_j``, i.e. its upper bound a_b + B_b is below every other
    code's lower bound a_j - B_j: b is the true nearest code, strictly (exact ties never certify).
    Each tile costs fp32 / int32 work only: its minimum and lowest code, and the least l of its
    other codes. Rows whose norms could overflow (|x|^2 + max |y|^2 >= 1e38: then every a_j of a
    finite code is finite), and NaN or Inf rows, are never certified (NaN in this state is
    harmless: such rows fail ``_certified``'s first test).
    """
    b_min = tl.full([BN], float("inf"), tl.float32)  # the best code's a ...
    b_code = tl.full([BN], NO_CODE, tl.int32)  # ... its index ...
    b_ebest = tl.zeros([BN], dtype=tl.float32)  # ... and its e
    b_lrest = tl.full([BN], float("inf"), tl.float32)  # least l of every other code
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_a = _dot_tile(xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, o_n, m_n, o_k, m_k, D, stride_x, stride_cs,
                        3, EMULATE_BF16, BN, BK, BD)  # [BN, BK] padding: +Inf, e = 0
        b_e = tl.load(ce_ptr + o_k, mask=m_k, other=0.0)
        t_min, t_code = _tile_best(b_a, o_k)
        b_other = o_k[None, :] != t_code[:, None]  # [BN, BK]
        t_lrest = tl.min(tl.where(b_other, b_a - b_e[None, :], float("inf")), axis=1)
        t_e = tl.load(ce_ptr + t_code, mask=t_code < K, other=0.0)
        b_min, b_code, b_ebest, b_lrest = _merge_best(b_min, b_code, b_ebest, b_lrest, t_min, t_code, t_e, t_lrest)
    return b_min, b_code, b_ebest, b_lrest


@triton.jit
def _merge_best(b_min, b_code, b_ebest, b_lrest, t_min, t_code, t_e, t_lrest):
    """The certified search's state after codes ``t`` (all above ``b``'s codes) join ``b``'s."""
    m_take = t_min < b_min  # strict: among equal a the lower code stays
    # Whichever of the old best and the new best is not the best now joins the rest.
    b_lrest = tl.minimum(tl.minimum(b_lrest, t_lrest), tl.where(m_take, b_min - b_ebest, t_min - t_e))
    return (tl.where(m_take, t_min, b_min), tl.where(m_take, t_code, b_code), tl.where(m_take, t_e, b_ebest),
            b_lrest)


@triton.jit
def _merge_certify(key_ptr, part_ptr, o_n, m_n, N, split, BN: tl.constexpr):
    """The certified search's state of each row over all ``split`` programs' code runs (in order)."""
    b_min = tl.full([BN], float("inf"), tl.float32)
    b_code = tl.full([BN], NO_CODE, tl.int32)
    b_ebest = tl.zeros([BN], dtype=tl.float32)
    b_lrest = tl.full([BN], float("inf"), tl.float32)
    for i_s in range(0, split):
        p_part = part_ptr + i_s * N + o_n
        t_code = tl.load(key_ptr + i_s * N + o_n, mask=m_n, other=NO_CODE).to(tl.int32)
        t_min = tl.load(p_part, mask=m_n, other=float("inf"))
        t_e = tl.load(p_part + split * N, mask=m_n, other=0.0)
        t_lrest = tl.load(p_part + 2 * split * N, mask=m_n, other=float("inf"))
        b_min, b_code, b_ebest, b_lrest = _merge_best(b_min, b_code, b_ebest, b_lrest, t_min, t_code, t_e, t_lrest)
    return b_min, b_code, b_ebest, b_lrest


@triton.jit
def _certified(b_min, b_ebest, b_lrest, b_xsq, aux_ptr, bound_e):
    """The certificate of ``_search_certify``: the best code's upper bound is below every other
    code's lower bound, and no norm is near fp32's overflow (``aux[1]``: the largest |y|^2)."""
    return (b_xsq + tl.load(aux_ptr + 1) < 1e38) & (b_min + b_ebest + 2.0 * bound_e * b_xsq < b_lrest)


@triton.jit
def _row_distance(z_ptr, c_ptr, o_n, b_row, m, D, stride_z, stride_c,
                  GROUP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """``[BN]`` direct-form fp32 distance of each row ``o_n`` to its code ``b_row`` (rows where ``m``
    is False read nothing and get 0), summed in three levels as ``_direct_tile`` sums (its bound)."""
    b_dist = tl.zeros([BN], dtype=tl.float32)
    for d0 in range(0, D, BD * GROUP):
        b_part = tl.zeros([BN], dtype=tl.float32)
        for d1 in range(d0, tl.minimum(d0 + BD * GROUP, D), BD):
            o_d = d1 + tl.arange(0, BD)
            m_d = m[:, None] & (o_d < D)[None, :]
            b_z = tl.load(z_ptr + o_n[:, None] * stride_z + o_d[None, :], mask=m_d, other=0.0).to(tl.float32)
            b_c = tl.load(c_ptr + b_row[:, None] * stride_c + o_d[None, :], mask=m_d, other=0.0).to(tl.float32)
            b_diff = b_z - b_c  # [BN, BD]
            b_part += tl.sum(b_diff * b_diff, axis=1)
        b_dist += b_part
    return b_dist


@triton.jit
def _finish(b_best, z_ptr, c_ptr, idx_ptr, dist_ptr, zq_ptr, o_n, m_n, D, stride_z, stride_c, stride_zq,
            EXACT: tl.constexpr, RETURN_ZQ: tl.constexpr, GROUP: tl.constexpr,
            BN: tl.constexpr, BD: tl.constexpr):
    """Best keys -> idx, dist (direct form, fp32), z_q; rows without a finite distance get -1.

    ``EXACT``: the key holds the direct-form distance itself; else the distance (and its finiteness) is
    measured here by ``_row_distance`` with D tile ``BD``."""
    b_code = b_best & 0x7FFFFFFF
    b_bits = (b_best >> 32).to(tl.int32)
    b_ok = b_bits < INF_BITS
    b_row = tl.where(b_ok, b_code, 0)  # [BN] a valid codebook row to read, even for failed rows
    if EXACT:
        b_dist = b_bits.to(tl.float32, bitcast=True)
    else:
        b_dist = _row_distance(z_ptr, c_ptr, o_n, b_row, m_n & b_ok, D, stride_z, stride_c, GROUP, BN, BD)
        b_ok = b_ok & (b_dist < float("inf"))
    b_fail = tl.where(b_bits == NAN_BITS, float("nan"), float("inf"))
    tl.store(idx_ptr + o_n, tl.where(b_ok, b_code, -1), mask=m_n)
    tl.store(dist_ptr + o_n, tl.where(b_ok, b_dist, b_fail), mask=m_n)
    if RETURN_ZQ:
        # Copied in the codebook's dtype without arithmetic: z_q == codebook[idx] bit for bit;
        # rows with index -1 get zeros (the masked load's `other`), as `gather` writes them.
        m_ok = m_n & b_ok
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            p_c = c_ptr + b_row[:, None] * stride_c + o_d[None, :]
            p_zq = zq_ptr + o_n[:, None] * stride_zq + o_d[None, :]
            b_c = tl.load(p_c, mask=m_ok[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
            tl.store(p_zq, b_c, mask=m_n[:, None] & m_d[None, :])


@triton.jit
def _rank_key(b_a, b_code):
    """Sortable int64 keys ``(image of a) << 32 | code`` for fp32 values of any sign (any shape, codes
    int32/int64 of the same shape or broadcastable): the order of (a, code), -0.0 as +0.0, NaN (made
    canonical) above +Inf. ``_key_value`` inverts the first half; for a >= 0 these are ``_keys``'s keys."""
    b_bits = tl.where(b_a == 0, 0.0, b_a).to(tl.int32, bitcast=True)
    b_bits = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)
    b_bits = tl.where(b_a != b_a, NAN_BITS, b_bits)
    return (b_bits.to(tl.int64) << 32) | b_code.to(tl.int64)


@triton.jit
def _key_value(b_key):
    """The fp32 value a of a ``_rank_key`` (or ``_keys``) key."""
    b_bits = (b_key >> 32).to(tl.int32)
    return tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits).to(tl.float32, bitcast=True)


# --- the prologue of the search kernels (this file's, topk.py's and sample.py's) ----------------------


@triton.jit
def _row_block(N, BN: tl.constexpr):
    """This program's block of rows (axis 0 of the grid): int64 offsets and mask, ``[BN]``."""
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    return o_n, o_n < N


@triton.jit
def _program_rows(N, rows_ptr, count_ptr, ROWS: tl.constexpr, BN: tl.constexpr):
    """``_row_block``, or with ``ROWS`` the rows listed by the certified search in its place,
    ``rows_ptr[:count]``."""
    o_n, m_n = _row_block(N, BN)
    if ROWS:
        m_n = o_n < tl.load(count_ptr)
        o_n = tl.load(rows_ptr + o_n, mask=m_n, other=0)
    return o_n, m_n


@triton.jit
def _code_run(K, split, BK: tl.constexpr):
    """Codes [k_lo, k_hi) of this program's run: program i_s (axis 1) of ``split`` scans a contiguous run
    of code tiles (empty when there are fewer tiles than programs)."""
    n_per = tl.cdiv(tl.cdiv(K, BK), split)
    k_lo = tl.program_id(1).to(tl.int64) * n_per * BK
    return k_lo, tl.minimum(k_lo + n_per * BK, K)


@triton.jit
def _min_over_runs(key_ptr, o_n, m_n, N, split, BN: tl.constexpr):
    """Each row's least key over the ``split`` programs' runs, from a ``[split, N]`` key buffer."""
    b_best = tl.full([BN], KEY_MAX, tl.int64)
    p_key = key_ptr + o_n
    for _ in range(0, split):
        b_best = tl.minimum(b_best, tl.load(p_key, mask=m_n, other=KEY_MAX))
        p_key += N
    return b_best


@triton.jit
def _assign_kernel(z_ptr, c_ptr, xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, ce_ptr, aux_ptr,
                   key_ptr, part_ptr, idx_ptr, dist_ptr, zq_ptr, rows_ptr, count_ptr,
                   N, K, D, stride_z, stride_c, stride_x, stride_cs, stride_zq, split, n_bucket, bound_e,
                   MODE: tl.constexpr, EMULATE_BF16: tl.constexpr, SEARCH: tl.constexpr,
                   FINISH: tl.constexpr, RETURN_ZQ: tl.constexpr, ROWS: tl.constexpr,
                   GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # n_bucket is only an autotune key (N rounded up to a power of two).
    if ROWS:
        # Sized for every row: programs past the listed count have none and return at once.
        if tl.program_id(0) * BN >= tl.load(count_ptr):
            return
    o_n, m_n = _program_rows(N, rows_ptr, count_ptr, ROWS, BN)
    i_s = tl.program_id(1).to(tl.int64)
    if SEARCH:
        k_lo, k_hi = _code_run(K, split, BK)
    if MODE == 3:
        if SEARCH:
            b_min, b_code, b_ebest, b_lrest = _search_certify(
                xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, ce_ptr, o_n, m_n, k_lo, k_hi, K, D,
                stride_x, stride_cs, EMULATE_BF16, BN, BK, BD)
            if not FINISH:
                # This run's state: the code in key_ptr [split, N], (a, e, l) in part_ptr [3, split, N].
                p_part = part_ptr + i_s * N + o_n
                tl.store(key_ptr + i_s * N + o_n, b_code.to(tl.int64), mask=m_n)
                tl.store(p_part, b_min, mask=m_n)
                tl.store(p_part + split * N, b_ebest, mask=m_n)
                tl.store(p_part + 2 * split * N, b_lrest, mask=m_n)
        else:
            b_min, b_code, b_ebest, b_lrest = _merge_certify(key_ptr, part_ptr, o_n, m_n, N, split, BN)
        if FINISH:
            b_xsq = tl.load(xsq_ptr + o_n, mask=m_n, other=0.0)
            m_cert = m_n & _certified(b_min, b_ebest, b_lrest, b_xsq, aux_ptr, bound_e)
            # Rows the bound cannot separate go to the plain direct-form search (next launch).
            m_retry = m_n & ~m_cert
            b_slot = tl.atomic_add(count_ptr + tl.zeros([BN], dtype=tl.int32), 1, mask=m_retry)
            tl.store(rows_ptr + b_slot, o_n, mask=m_retry)
            _finish(b_code.to(tl.int64), z_ptr, c_ptr, idx_ptr, dist_ptr, zq_ptr, o_n, m_cert, D, stride_z,
                    stride_c, stride_zq, False, RETURN_ZQ, GROUP, BN, _DIST_BD)
    else:
        if SEARCH:
            if MODE == 0:
                b_best = _search_exact(z_ptr, c_ptr, o_n, m_n, k_lo, k_hi, D, stride_z, stride_c,
                                       GROUP, BN, BK, BD)
            else:
                b_best = _search_dot(xh_ptr, xsq_ptr, ch_ptr, csq_ptr, aux_ptr, o_n, m_n, k_lo, k_hi, D,
                                     stride_x, stride_cs, MODE, EMULATE_BF16, BN, BK, BD)
            if not FINISH:
                tl.store(key_ptr + i_s * N + o_n, b_best, mask=m_n)
        else:
            b_best = _min_over_runs(key_ptr, o_n, m_n, N, split, BN)
        if FINISH:
            # The distance measured again, also in exact mode: with _DIST_BD, not the search's own tile.
            _finish(b_best, z_ptr, c_ptr, idx_ptr, dist_ptr, zq_ptr, o_n, m_n, D, stride_z, stride_c,
                    stride_zq, False, RETURN_ZQ, GROUP, BN, _DIST_BD)


_KEY = ["n_bucket", "K", "D", "split", "MODE", "SEARCH", "FINISH", "RETURN_ZQ", "ROWS"]


# Exact mode: BN x BK x BD broadcast tiles of FMA work, no tensor cores (BD <= 64: see the bound
# in _direct_tile).
_EXACT_CONFIGS = [
    triton.Config({"BN": 16, "BK": 32, "BD": 16}, num_warps=4),
    triton.Config({"BN": 32, "BK": 32, "BD": 16}, num_warps=8),
    triton.Config({"BN": 32, "BK": 64, "BD": 8}, num_warps=8),
    triton.Config({"BN": 64, "BK": 32, "BD": 8}, num_warps=8),
    triton.Config({"BN": 16, "BK": 64, "BD": 16}, num_warps=8),
    triton.Config({"BN": 64, "BK": 64, "BD": 4}, num_warps=8),
]
_EXACT_INTERPRETER = triton.Config({"BN": 64, "BK": 64, "BD": 32})
_assign_exact = triton.autotune(configs=tune_configs(_EXACT_CONFIGS, _EXACT_INTERPRETER), key=_KEY)(_assign_kernel)

# Tensor-core tiles (every block dim >= 16 for tl.dot), for the tf32 / bf16 modes and the
# certified exact search. Chosen from the compiled sm_90 code (benchmarks/resources.py, no GPU
# needed): none spills registers with triton 3.6 or 3.9 in any mode; BD = 64, BK = 256 and
# BN = 32 tiles did in some. BN >= 64 per 4 warps issues wgmma (HGMMA); the BN = 16 tile, for
# small N, runs mma.sync (HMMA). Which is fastest is the autotuner's call on the GPU.
_DOT_CONFIGS = [
    triton.Config({"BN": 64, "BK": 64, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BN": 128, "BK": 64, "BD": 32}, num_warps=8, num_stages=3),
    triton.Config({"BN": 64, "BK": 128, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BN": 128, "BK": 128, "BD": 32}, num_warps=8, num_stages=3),
    triton.Config({"BN": 128, "BK": 128, "BD": 32}, num_warps=8, num_stages=4),
    triton.Config({"BN": 16, "BK": 128, "BD": 32}, num_warps=4, num_stages=3),
]
_DOT_INTERPRETER = triton.Config({"BN": 128, "BK": 64, "BD": 64})


def _fit_bd(configs, named_args, **kwargs):
    """The tensor-core configs with BD cut to D (at least 16, tl.dot's least K): for D = 8 a
    BD = 32 tile would multiply zeros for three quarters of every dot."""
    cap = max(16, triton.next_power_of_2(named_args["D"]))
    fitted = {}
    for c in configs:
        kw = {**c.kwargs, "BD": min(c.kwargs["BD"], cap)}
        fitted.setdefault((tuple(sorted(kw.items())), c.num_warps, c.num_stages),
                          triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(fitted.values())


_assign_dot = triton.autotune(configs=tune_configs(_DOT_CONFIGS, _DOT_INTERPRETER), key=_KEY,
                              prune_configs_by={"early_config_prune": _fit_bd})(_assign_kernel)

# Every timing run of the certified search lists its uncertified rows again: the autotuner zeroes
# the row count before each run.
_assign_certify = triton.autotune(
    configs=tune_configs(_DOT_CONFIGS, _DOT_INTERPRETER), key=_KEY, reset_to_zero=["count_ptr"],
    prune_configs_by={"early_config_prune": _fit_bd},
)(_assign_kernel)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, asked once per device (never at import)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _auto_split(n: int, k: int, device: torch.device) -> int:
    """Programs per row block along the code axis: enough to fill the GPU when N is small."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = _sm_count(device)
    row_blocks = triton.cdiv(n, 64)
    if row_blocks >= sms:
        return 1
    # About two programs per SM, but no program with fewer than ~512 codes to scan.
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(k, 512)))


def assign_fwd(z: torch.Tensor, codebook: torch.Tensor, *, precision: str = "exact",
               return_zq: bool = False, split: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """idx int64 [N], dist float32 [N], z_q [N, D] (codebook dtype) or None.

    Nearest code of each row of ``z [N, D]`` in ``codebook [K, D]`` (inputs checked by the caller:
    2-D, same device, float32/float16/bfloat16 each, K >= 1, D >= 1). Never allocates N x K.

    - ``idx``: the nearest code; among equal distances the lowest index (NumPy argmin order).
    - ``dist``: the direct-form squared distance ``sum_j (z_j - c_j)^2`` to ``codebook[idx]``,
      accumulated in fp32, whatever ``precision``, by the finish in D tiles of ``_DIST_BD`` whatever the
      search's tiles: a code's distance has the same bits from every launch (any split or config).
    - ``z_q``: ``codebook[idx]`` bit for bit when ``return_zq``, written by the same launch that
      finishes the rows (the search launch itself when ``split == 1``, else the finish launch).
    - ``precision="exact"``: the chosen code is within ``(1 + 2^-16)`` of the float64 minimum
      (DESIGN.md section 4). The certified split-bf16 search finishes the rows its bound separates
      and the direct-form search the rest (``_assign_certified``); the direct-form search alone
      serves N >= 2^31 (the listed rows are counted in int32). ``"tf32"`` / ``"bf16"``: expanded-form search on vectors
      centred on the codebook mean with the dot on tensor cores; each approximate distance is within
      ``2 (2u + u^2) |z - m| |c - m|`` (+ fp32 round-off) of the true one, u = 2^-10 (tf32, truncating)
      or 2^-8 (bf16), so the chosen code is within twice that of the minimum. Their operands are
      made once per call (``centre.py``): an extra ``[N, D]`` buffer, fp32 (tf32) or bf16.
    - Rows whose minimum distance is not finite (a NaN or Inf in the row, fp32 overflow, or only
      non-finite codes) get ``idx = -1``, ``dist`` NaN when the best distance is NaN (the row holds
      a NaN, or every code holds one) else +Inf, and a zero ``z_q`` row (as ``gather`` writes -1).
      A code holding a NaN or Inf is never chosen while a finite one exists; a NaN row changes no
      other row. (One corner differs from ``torch_ops``: in exact mode, a row holding +-Inf whose
      every code holds a NaN or that same infinity at the same place gets NaN, not +Inf.)
    - ``split``: programs along the code axis per row block; ``None`` picks it from N, K and the
      GPU's SM count (1 under the interpreter). Results do not depend on it: the runs' states merge
      to the same best code, and ``dist`` is measured as above. (Only where the search's own rounding
      decides, tf32 / bf16 and the plain direct-form search of N >= 2^31, may the autotuner's pick of
      another tile for another split send a near-tie, within the mode's bound, to the other code.)
    """
    if precision not in _MODES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    z, codebook, idx, dist, z_q = _prepare(z, codebook, split, return_zq=return_zq)
    n, d = z.shape
    k = codebook.shape[0]
    if n == 0:
        return idx, dist, z_q

    mode = _MODES[precision]
    split = _auto_split(n, k, z.device) if split is None else split
    # (The certified search counts its listed rows in int32.)
    if mode == 0 and _CERTIFIED_SEARCH and n < 2**31:
        _assign_certified(z, codebook, idx, dist, z_q, split)
        return idx, dist, z_q
    zq_arg = z_q if return_zq else dist
    keys = torch.empty(split, n, dtype=torch.int64, device=z.device) if split > 1 else idx
    if mode == 0:
        # The direct-form search reads z and the codebook only (the other pointers are unused).
        x = cb = None
        operands = (z, z, dist, codebook, codebook, dist, dist, dist)
    else:
        cb = centred_codebook(codebook, parts=mode)
        x, _, xsq = centre_rows(z, cb.mean, parts=mode)
        operands = (x, x, xsq, cb.hi, cb.hi, cb.sq, cb.sq, cb.aux)
    args = (z, codebook, *operands, keys, dist, idx, dist, zq_arg, idx, idx,
            n, k, d, z.stride(0), codebook.stride(0), d if x is None else x.stride(0),
            d if cb is None else cb.hi.stride(0), d, split, triton.next_power_of_2(n), 0.0)
    flags = dict(MODE=mode, EMULATE_BF16=interpreting(), RETURN_ZQ=return_zq, ROWS=False, GROUP=_GROUP)
    launch = _assign_exact if mode == 0 else _assign_dot
    launch[_search_grid(n, split)](*args, SEARCH=True, FINISH=split == 1, **flags)
    if split > 1:
        _launch_finish(_assign_kernel, n, args, **flags)
    return idx, dist, z_q


def _prepare(z: torch.Tensor, codebook: torch.Tensor, split: int | None, *, k: int | None = None,
             return_zq: bool = False):
    """What the search launchers (``assign_fwd``, ``topk.topk_fwd``, ``sample.sample_fwd``) share before
    launching: ``split`` checked, the code index within the key's 31 bits, both inputs row-major, and the
    outputs: idx int64 and dist float32 ``[N]`` (``[N, k]`` with ``k``), z_q ``[N, D]`` in the codebook's
    dtype or None. Returns ``(z, codebook, idx, dist, z_q)``."""
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise ValueError(f"split must be a positive int or None, got {split!r}")
    n, d = z.shape
    num_codes = codebook.shape[0]
    if num_codes >= 2**31:
        raise ValueError(f"the code index must fit the key's 31 bits, got K = {num_codes}")
    z, codebook = row_major(z), row_major(codebook)
    shape = (n,) if k is None else (n, k)
    idx = torch.empty(shape, dtype=torch.int64, device=z.device)
    dist = torch.empty(shape, dtype=torch.float32, device=z.device)
    z_q = torch.empty(n, d, dtype=codebook.dtype, device=z.device) if return_zq else None
    return z, codebook, idx, dist, z_q


def _search_grid(n: int, split: int):
    """The grid of a search launch: row blocks of the config's BN, ``split`` programs along the codes."""
    return lambda meta: (triton.cdiv(n, meta["BN"]), split)


def _launch_finish(kernel, n: int, args, **flags) -> None:
    """The finish-only launch of a split search (``split > 1``): ``_FINISH_BN`` rows a program (under the
    interpreter, which pays per block operation, up to 1024: each row's finish is the same whatever its
    block), merging the runs' state (the search's BK and BD are unused: the finish measures with
    ``_DIST_BD``)."""
    bn = min(1024, triton.next_power_of_2(n)) if interpreting() else _FINISH_BN
    kernel[(triton.cdiv(n, bn), 1)](*args, SEARCH=False, FINISH=True, BN=bn, BK=16, BD=16, **flags)


def _certify_bound(d: int) -> float:
    """E of the certified search's bound B_j <= E (|x|^2 + |y_j|^2) (see _search_certify)."""
    return 2.0 * (3.5 * 2.0**-16 + 3.5 * d * 2.0**-23) * (1.0 + 2.0**-6)


def _assign_certified(z, codebook, idx, dist, z_q, split: int = 1) -> torch.Tensor:
    """Exact assignment: the certified split-bf16 search finishes every row its bound separates and
    lists the others, then the direct-form search finishes the listed rows. With ``split > 1`` the
    search programs of a row block each take a run of codes and leave their state in ``[split, N]``
    buffers, and a finish-only launch merges it, certifies and lists.

    Writes ``idx``, ``dist`` and ``z_q`` (when not None); returns the number of listed rows (int32
    ``[1]`` on the device, for tests and tuning)."""
    n, d = z.shape
    k = codebook.shape[0]
    bound_e = _certify_bound(d)
    cb = centred_codebook(codebook, parts=3, bound_e=bound_e)
    xh, xl, xsq = centre_rows(z, cb.mean, parts=3)
    rows = torch.empty(n, dtype=torch.int64, device=z.device)
    count = torch.zeros(1, dtype=torch.int32, device=z.device)
    return_zq = z_q is not None
    zq_arg = z_q if return_zq else dist
    keys = torch.empty(split, n, dtype=torch.int64, device=z.device) if split > 1 else idx
    part = torch.empty(3, split, n, dtype=torch.float32, device=z.device) if split > 1 else dist

    def args(split):
        return (z, codebook, xh, xl, xsq, cb.hi, cb.lo, cb.sq, cb.ce, cb.aux, keys, part, idx, dist, zq_arg,
                rows, count, n, k, d, z.stride(0), codebook.stride(0), xh.stride(0), cb.hi.stride(0), d, split,
                triton.next_power_of_2(n), bound_e)

    flags = dict(EMULATE_BF16=interpreting(), RETURN_ZQ=return_zq, GROUP=_GROUP)
    _assign_certify[_search_grid(n, split)](*args(split), MODE=_CERTIFY, SEARCH=True, FINISH=split == 1, ROWS=False,
                                            **flags)
    if split > 1:
        _launch_finish(_assign_kernel, n, args(split), MODE=_CERTIFY, ROWS=False, **flags)
    # Sized for every row; programs past the listed count return at once (no host sync). Each
    # listed row's search runs over all K codes (split 1).
    _assign_exact[_search_grid(n, 1)](*args(1), MODE=0, SEARCH=True, FINISH=True, ROWS=True, **flags)
    return count


# The certified search serves exact mode for N < 2^31 (tests switch it off to compare with the plain
# direct-form search).
_CERTIFIED_SEARCH = True
