"""Nearest-code assignment: fused distances + argmin (+ the z_q gather), without the N x K matrix.

One kernel, ``_assign_kernel``, with constexpr flags for the three precision modes and for the two
halves of a split launch:

- search: a program owns BN rows and a run of code tiles; it keeps, per row, the minimum of the int64
  key ``(float bits of d) << 32 | code``. For d >= 0 the float bits are monotone, so the minimum key
  is the minimum distance and, among equal distances, the lowest code (NumPy argmin order). NaN
  distances are canonicalised to 0x7FC00000, above +Inf (0x7F800000), so neither ever beats a
  finite distance.
- finish: turns the best key into ``idx`` / ``dist``, applies the NaN/Inf policy, and writes z_q.

Exact mode has two searches. The plain one is the direct form sum_j (z_j - c_j)^2 on CUDA cores
(``_search_exact``). The certified one (``_search_certify``, used when the code axis is not split)
runs the expanded form on tensor cores with split-bf16 dots (z = z_hi + z_lo, three bf16 products:
about fp32 accuracy), carries a rigorous bound B on each approximate distance, and keeps per row
the best code's upper bound and every other code's lowest lower bound. When the best code's upper
bound is below all others' lower bounds, the best code is the true nearest one (strictly: exact
ties never certify) and the row is finished on the spot; the few rows the bound cannot separate are
appended to a list, and a second launch runs the plain direct-form search on just those rows.

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

from vqtriton.backend import interpreting
from vqtriton.kernels import row_major, tune_configs

__all__ = ["assign_fwd", "PRECISIONS"]

PRECISIONS = ("exact", "tf32", "bf16")
_MODES = {"exact": 0, "tf32": 1, "bf16": 2}
# Internal mode of the certified exact search (split-bf16 dots + bound), see _search_certify.
_CERTIFY = 3

# Float bits of +Inf and of the canonical quiet NaN: NaN > Inf > every finite distance as int32.
INF_BITS = tl.constexpr(0x7F800000)
NAN_BITS = tl.constexpr(0x7FC00000)
KEY_MAX = tl.constexpr(2**63 - 1)
# Chunks of BD summed into a partial before it joins the running total (two-level summation).
_GROUP = 8
# Block sizes of the finish-only launch (split > 1): it streams N rows of z and z_q once.
_FINISH_BN, _FINISH_BD = 32, 64


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
def _round_bf16(b_x):
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32.

    The interpreter's ``.to(tl.bfloat16)`` truncates (and mishandles subnormals), so emulation
    rounds on the bits; a tensor core multiplies bf16 exactly and accumulates in fp32, so an fp32
    dot of these values is the same arithmetic as the bf16 dot on a GPU.
    """
    b_bits = b_x.to(tl.int32, bitcast=True)
    b_rnd = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & -65536
    return tl.where(b_x == b_x, b_rnd.to(tl.float32, bitcast=True), b_x)


@triton.jit
def _dot_bf16(b_a, b_b, b_acc, EMULATE_BF16: tl.constexpr):
    """``b_acc + b_a @ b_b`` for bf16 operands, fp32 accumulation: a tensor-core dot on a GPU; under
    the interpreter the operands are fp32 holding bf16 values and the fp32 dot is the same arithmetic."""
    if EMULATE_BF16:
        return tl.dot(b_a, b_b, b_acc, input_precision="ieee")
    return tl.dot(b_a, b_b, b_acc)


@triton.jit
def _search_exact(z_ptr, c_ptr, o_n, m_n, k_lo, k_hi, D, stride_z, stride_c,
                  GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Best key per row over codes [k_lo, k_hi): direct form sum_j (z_j - c_j)^2 in fp32.

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
    b_best = tl.full([BN], KEY_MAX, tl.int64)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_d = tl.zeros([BN, BK], dtype=tl.float32)
        for d0 in range(0, D, BD * GROUP):
            b_part = tl.zeros([BN, BK], dtype=tl.float32)
            for d1 in range(d0, tl.minimum(d0 + BD * GROUP, D), BD):
                o_d = d1 + tl.arange(0, BD)
                m_d = o_d < D
                p_z = z_ptr + o_n[:, None] * stride_z + o_d[None, :]
                p_c = c_ptr + o_k[:, None] * stride_c + o_d[None, :]
                b_z = tl.load(p_z, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, BD]
                b_c = tl.load(p_c, mask=m_k[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BK, BD]
                b_diff = b_z[:, None, :] - b_c[None, :, :]  # [BN, BK, BD]
                b_part += tl.sum(b_diff * b_diff, axis=2)
            b_d += b_part
        b_best = tl.minimum(b_best, tl.min(_keys(b_d, o_k, m_k), axis=1))
    return b_best


@triton.jit
def _load_centred(z_ptr, mean_ptr, o_n, m_n, o_d, m_d, stride_z):
    """``z - mean`` for a ``[BN, BD]`` tile in fp32 (zero outside the masks)."""
    b_z = tl.load(z_ptr + o_n[:, None] * stride_z + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_mean = tl.load(mean_ptr + o_d, mask=m_d, other=0.0)  # [BD]
    return b_z.to(tl.float32) - b_mean[None, :]


@triton.jit
def _search_dot(z_ptr, mean_ptr, cs_ptr, csq_ptr, o_n, m_n, k_lo, k_hi, D, stride_z, stride_cs,
                MODE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Best key per row over codes [k_lo, k_hi) by the expanded form on centred vectors.

    d ~ |z - m|^2 + |c - m|^2 - 2 (z - m).(c - m), with m the codebook mean (distances are
    translation-invariant; centring keeps the cancellation small) and the dot on tensor cores.
    """
    b_zsq = tl.zeros([BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_z = _load_centred(z_ptr, mean_ptr, o_n, m_n, o_d, o_d < D, stride_z)  # [BN, BD]
        b_zsq += tl.sum(b_z * b_z, axis=1)
    b_best = tl.full([BN], KEY_MAX, tl.int64)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_dot = tl.zeros([BN, BK], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_z = _load_centred(z_ptr, mean_ptr, o_n, m_n, o_d, m_d, stride_z)  # [BN, BD]
            p_ct = cs_ptr + o_k[None, :] * stride_cs + o_d[:, None]
            b_ct = tl.load(p_ct, mask=m_d[:, None] & m_k[None, :], other=0.0)  # [BD, BK]
            if MODE == 1:
                b_dot = tl.dot(b_z, b_ct, b_dot, input_precision="tf32")
            elif EMULATE_BF16:
                b_dot = _dot_bf16(_round_bf16(b_z), _round_bf16(b_ct), b_dot, True)
            else:
                b_dot = _dot_bf16(b_z.to(tl.bfloat16), b_ct.to(tl.bfloat16), b_dot, False)
        b_csq = tl.load(csq_ptr + o_k, mask=m_k, other=0.0)  # [BK]
        b_d = b_zsq[:, None] + b_csq[None, :] - 2.0 * b_dot  # [BN, BK]
        # A NaN from neither a NaN row nor a NaN code (the launcher's NaN norm) is inf - inf overflow.
        m_over = (b_d != b_d) & (b_zsq == b_zsq)[:, None] & (b_csq == b_csq)[None, :]
        b_d = tl.where(m_over, float("inf"), b_d)
        b_best = tl.minimum(b_best, tl.min(_keys(b_d, o_k, m_k), axis=1))
    return b_best


@triton.jit
def _split_bf16(b_x, EMULATE_BF16: tl.constexpr):
    """``(hi, lo)``: bf16 parts of an fp32 block with ``x = hi + lo + r``, ``|r| <= 2^-16 |x|``.

    ``x - hi`` is exact in fp32 (``hi`` is ``x`` rounded to 8 significant bits). Under the
    interpreter both parts stay fp32 (holding bf16 values: see ``_round_bf16``).
    """
    if EMULATE_BF16:
        b_hi = _round_bf16(b_x)
        return b_hi, _round_bf16(b_x - b_hi)
    b_hi = b_x.to(tl.bfloat16)
    return b_hi, (b_x - b_hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _search_certify(z_ptr, mean_ptr, ch_ptr, cl_ptr, csq_ptr, cn_ptr, o_n, m_n, K, D, stride_z, stride_cs,
                    bound_c, EMULATE_BF16: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    BD: tl.constexpr):
    """Best key per row by the split-bf16 expanded form, and whether the bound certifies it.

    With x = z - m and y = c - m centred on the codebook mean, a = |x|^2 + |y|^2 - 2 x.y with
    x.y ~ x_hi.y_hi + x_hi.y_lo + x_lo.y_hi (bf16 products are exact in fp32, the dropped terms are
    <= 3.1 2^-16 |x_i||y_i|). Each a is within B = C (|x| + |y|)^2 of the exact direct-form distance
    of the inputs, C = 3.5 2^-16 + 3.5 D 2^-23 (the launcher's ``bound_c``), which covers the
    dropped products, fp32 accumulation of the 3D products and of both norms (with room for
    truncating accumulators), the centring and the final additions. The row is certified when the
    best code's a + B is below a - B of every other code.
    """
    b_zsq = tl.zeros([BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_z = _load_centred(z_ptr, mean_ptr, o_n, m_n, o_d, o_d < D, stride_z)  # [BN, BD]
        b_zsq += tl.sum(b_z * b_z, axis=1)
    b_zn = tl.sqrt(b_zsq)  # [BN]
    b_best = tl.full([BN], KEY_MAX, tl.int64)
    b_up = tl.full([BN], float("inf"), tl.float32)  # upper bound of the best code's distance
    b_lo_best = tl.full([BN], float("inf"), tl.float32)  # its lower bound
    b_lo_rest = tl.full([BN], float("inf"), tl.float32)  # lowest lower bound of every other code
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_dot = tl.zeros([BN, BK], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_zh, b_zl = _split_bf16(_load_centred(z_ptr, mean_ptr, o_n, m_n, o_d, m_d, stride_z), EMULATE_BF16)
            m_c = m_d[:, None] & m_k[None, :]
            # int64: k0 runs in int32 here, and K * D may pass 2^31 elements.
            o_c = o_k[None, :].to(tl.int64) * stride_cs + o_d[:, None]
            b_ch = tl.load(ch_ptr + o_c, mask=m_c, other=0.0)  # [BD, BK]
            b_cl = tl.load(cl_ptr + o_c, mask=m_c, other=0.0)  # [BD, BK]
            b_dot = _dot_bf16(b_zh, b_ch, b_dot, EMULATE_BF16)
            b_dot = _dot_bf16(b_zh, b_cl, b_dot, EMULATE_BF16)
            b_dot = _dot_bf16(b_zl, b_ch, b_dot, EMULATE_BF16)
        b_csq = tl.load(csq_ptr + o_k, mask=m_k, other=0.0)  # [BK]
        b_cn = tl.load(cn_ptr + o_k, mask=m_k, other=0.0)  # [BK]
        b_d = b_zsq[:, None] + b_csq[None, :] - 2.0 * b_dot  # [BN, BK]
        b_r = b_zn[:, None] + b_cn[None, :]
        b_bound = bound_c * b_r * b_r  # [BN, BK]
        b_key = _keys(b_d, o_k, m_k)  # [BN, BK]
        t_key = tl.min(b_key, axis=1)  # [BN]
        m_best = b_key == t_key[:, None]  # [BN, BK] one code per row: the tile's best
        # Lower bounds of NaN distances (NaN codes) and of padding codes rule nothing out.
        b_low = b_d - b_bound
        b_low = tl.where(m_k[None, :] & (b_low == b_low), b_low, float("inf"))
        t_up = tl.min(tl.where(m_best, b_d + b_bound, float("inf")), axis=1)
        t_lo_best = tl.min(tl.where(m_best, b_low, float("inf")), axis=1)
        t_lo_rest = tl.min(tl.where(m_best, float("inf"), b_low), axis=1)
        m_take = t_key < b_best
        b_lo_rest = tl.where(m_take, tl.minimum(b_lo_rest, b_lo_best), tl.minimum(b_lo_rest, t_lo_best))
        b_lo_rest = tl.minimum(b_lo_rest, t_lo_rest)
        b_up = tl.where(m_take, t_up, b_up)
        b_lo_best = tl.where(m_take, t_lo_best, b_lo_best)
        b_best = tl.minimum(b_best, t_key)
    # NaN rows, overflow and all-NaN codebooks fail the test (NaN compares false; inf < inf is false).
    return b_best, b_up < b_lo_rest


@triton.jit
def _finish(b_best, z_ptr, c_ptr, idx_ptr, dist_ptr, zq_ptr, o_n, m_n, D, stride_z, stride_c, stride_zq,
            EXACT: tl.constexpr, RETURN_ZQ: tl.constexpr, GROUP: tl.constexpr,
            BN: tl.constexpr, BD: tl.constexpr):
    """Best keys -> idx, dist (direct form, fp32), z_q; rows without a finite distance get -1."""
    b_code = b_best & 0x7FFFFFFF
    b_bits = (b_best >> 32).to(tl.int32)
    b_ok = b_bits < INF_BITS
    b_row = tl.where(b_ok, b_code, 0)  # [BN] a valid codebook row to read, even for failed rows
    if EXACT:
        # The key holds the direct-form distance itself.
        b_dist = b_bits.to(tl.float32, bitcast=True)
    else:
        # The search was approximate: the reported distance, and its finiteness, are the direct form's.
        m_c = m_n & b_ok
        b_dist = tl.zeros([BN], dtype=tl.float32)
        for d0 in range(0, D, BD * GROUP):
            b_part = tl.zeros([BN], dtype=tl.float32)
            for d1 in range(d0, tl.minimum(d0 + BD * GROUP, D), BD):
                o_d = d1 + tl.arange(0, BD)
                m_d = o_d < D
                p_z = z_ptr + o_n[:, None] * stride_z + o_d[None, :]
                p_c = c_ptr + b_row[:, None] * stride_c + o_d[None, :]
                b_z = tl.load(p_z, mask=m_c[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, BD]
                b_c = tl.load(p_c, mask=m_c[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, BD]
                b_diff = b_z - b_c
                b_part += tl.sum(b_diff * b_diff, axis=1)
            b_dist += b_part
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
def _assign_kernel(z_ptr, c_ptr, mean_ptr, cs_ptr, cl_ptr, csq_ptr, cn_ptr, key_ptr, idx_ptr, dist_ptr,
                   zq_ptr, rows_ptr, count_ptr, N, K, D, stride_z, stride_c, stride_cs, stride_zq, split,
                   n_bucket, bound_c,
                   MODE: tl.constexpr, EMULATE_BF16: tl.constexpr, SEARCH: tl.constexpr,
                   FINISH: tl.constexpr, RETURN_ZQ: tl.constexpr, ROWS: tl.constexpr,
                   GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # n_bucket is only an autotune key (N rounded up to a power of two).
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    if ROWS:
        # Only the rows listed by the certified search: rows_ptr[:count] (programs past it idle).
        m_n = o_n < tl.load(count_ptr)
        o_n = tl.load(rows_ptr + o_n, mask=m_n, other=0)
    if MODE == 3:
        b_best, b_cert = _search_certify(z_ptr, mean_ptr, cs_ptr, cl_ptr, csq_ptr, cn_ptr, o_n, m_n, K, D,
                                         stride_z, stride_cs, bound_c, EMULATE_BF16, BN, BK, BD)
        # Rows the bound cannot separate go to the plain direct-form search (second launch).
        m_retry = m_n & ~b_cert
        b_slot = tl.atomic_add(count_ptr + tl.zeros([BN], dtype=tl.int32), 1, mask=m_retry)
        tl.store(rows_ptr + b_slot, o_n, mask=m_retry)
        _finish(b_best, z_ptr, c_ptr, idx_ptr, dist_ptr, zq_ptr, o_n, m_n & b_cert, D, stride_z, stride_c,
                stride_zq, False, RETURN_ZQ, GROUP, BN, BD)
    else:
        if SEARCH:
            # Program i_s of `split` scans a contiguous run of code tiles.
            n_per = tl.cdiv(tl.cdiv(K, BK), split)
            k_lo = i_s * n_per * BK
            k_hi = tl.minimum(k_lo + n_per * BK, K)
            if MODE == 0:
                b_best = _search_exact(z_ptr, c_ptr, o_n, m_n, k_lo, k_hi, D, stride_z, stride_c,
                                       GROUP, BN, BK, BD)
            else:
                b_best = _search_dot(z_ptr, mean_ptr, cs_ptr, csq_ptr, o_n, m_n, k_lo, k_hi, D,
                                     stride_z, stride_cs, MODE, EMULATE_BF16, BN, BK, BD)
            if not FINISH:
                tl.store(key_ptr + i_s * N + o_n, b_best, mask=m_n)
        else:
            b_best = tl.full([BN], KEY_MAX, tl.int64)
            p_key = key_ptr + o_n
            for _ in range(0, split):
                b_best = tl.minimum(b_best, tl.load(p_key, mask=m_n, other=KEY_MAX))
                p_key += N
        if FINISH:
            _finish(b_best, z_ptr, c_ptr, idx_ptr, dist_ptr, zq_ptr, o_n, m_n, D, stride_z, stride_c,
                    stride_zq, MODE == 0, RETURN_ZQ, GROUP, BN, BD)


_KEY = ["n_bucket", "K", "D", "split", "MODE", "SEARCH", "FINISH", "RETURN_ZQ", "ROWS"]


# Exact mode: BN x BK x BD broadcast tiles of FMA work, no tensor cores (BD <= 64: see the bound
# in _search_exact).
_assign_exact = triton.autotune(
    configs=tune_configs(
        [
            triton.Config({"BN": 16, "BK": 32, "BD": 16}, num_warps=4),
            triton.Config({"BN": 32, "BK": 32, "BD": 16}, num_warps=8),
            triton.Config({"BN": 32, "BK": 64, "BD": 8}, num_warps=8),
            triton.Config({"BN": 64, "BK": 32, "BD": 8}, num_warps=8),
            triton.Config({"BN": 16, "BK": 64, "BD": 16}, num_warps=8),
            triton.Config({"BN": 64, "BK": 64, "BD": 4}, num_warps=8),
        ],
        triton.Config({"BN": 64, "BK": 64, "BD": 32}),
    ),
    key=_KEY,
)(_assign_kernel)

# Tensor-core tiles (every block dim >= 16 for tl.dot), for the tf32 / bf16 modes and the
# certified exact search.
_DOT_CONFIGS = [
    triton.Config({"BN": 64, "BK": 64, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BN": 128, "BK": 64, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BN": 64, "BK": 128, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BN": 128, "BK": 128, "BD": 32}, num_warps=8, num_stages=3),
    triton.Config({"BN": 32, "BK": 64, "BD": 64}, num_warps=4, num_stages=3),
    triton.Config({"BN": 16, "BK": 128, "BD": 64}, num_warps=4, num_stages=3),
]
_DOT_INTERPRETER = triton.Config({"BN": 128, "BK": 64, "BD": 64})

_assign_dot = triton.autotune(configs=tune_configs(_DOT_CONFIGS, _DOT_INTERPRETER), key=_KEY)(_assign_kernel)

# Every timing run of the certified search lists its uncertified rows again: the autotuner zeroes
# the row count before each run.
_assign_certify = triton.autotune(
    configs=tune_configs(_DOT_CONFIGS, _DOT_INTERPRETER), key=_KEY, reset_to_zero=["count_ptr"]
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


def _centred_codebook(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codebook mean ``[D]``, centred codes ``[K, D]`` and their squared norms ``[K]``, all fp32.

    The mean is over the finite codes (so one NaN code cannot poison the rest); non-finite codes
    become zero vectors with norm NaN (a NaN in the code) or +Inf, so they lose to every finite code.
    """
    c = codebook.to(torch.float32)
    usable = torch.isfinite(c).all(1)  # [K]
    # Summed in float64: a codebook of huge finite values must not overflow its mean.
    total = torch.where(usable[:, None], c, 0.0).sum(0, dtype=torch.float64)
    mean = (total / usable.sum().clamp_min(1)).to(torch.float32)
    cs = torch.where(usable[:, None], c - mean, 0.0).contiguous()
    bad_sq = torch.where(torch.isnan(c).any(1), float("nan"), float("inf"))
    csq = torch.where(usable, cs.square().sum(1), bad_sq)
    return mean, cs, csq


def assign_fwd(z: torch.Tensor, codebook: torch.Tensor, *, precision: str = "exact",
               return_zq: bool = False, split: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """idx int64 [N], dist float32 [N], z_q [N, D] (codebook dtype) or None.

    Nearest code of each row of ``z [N, D]`` in ``codebook [K, D]`` (inputs checked by the caller:
    2-D, same device, float32/float16/bfloat16 each, K >= 1, D >= 1). Never allocates N x K.

    - ``idx``: the nearest code; among equal distances the lowest index (NumPy argmin order).
    - ``dist``: the direct-form squared distance ``sum_j (z_j - c_j)^2`` to ``codebook[idx]``,
      accumulated in fp32, whatever ``precision``.
    - ``z_q``: ``codebook[idx]`` bit for bit when ``return_zq``, written by the same launch that
      finishes the rows (the search launch itself when ``split == 1``, else the finish launch).
    - ``precision="exact"``: the chosen code is within ``(1 + 2^-16)`` of the float64 minimum
      (DESIGN.md section 4). Without a split, the certified split-bf16 search finishes the rows its
      bound separates and the direct-form search the rest (``_assign_certified``); with a split,
      the direct-form search does all rows. ``"tf32"`` / ``"bf16"``: expanded-form search on vectors
      centred on the codebook mean with the dot on tensor cores; each approximate distance is within
      ``2 (2u + u^2) |z - m| |c - m|`` (+ fp32 round-off) of the true one, u = 2^-10 (tf32, truncating)
      or 2^-8 (bf16), so the chosen code is within twice that of the minimum.
    - Rows whose minimum distance is not finite (a NaN or Inf in the row, fp32 overflow, or only
      non-finite codes) get ``idx = -1``, ``dist`` NaN when the best distance is NaN (the row holds
      a NaN, or every code holds one) else +Inf, and a zero ``z_q`` row (as ``gather`` writes -1).
      A code holding a NaN or Inf is never chosen while a finite one exists; a NaN row changes no
      other row. (One corner differs from ``torch_ops``: in exact mode, a row holding +-Inf whose
      every code holds a NaN or that same infinity at the same place gets NaN, not +Inf.)
    - ``split``: programs along the code axis per row block; ``None`` picks it from N, K and the
      GPU's SM count (1 under the interpreter). Results do not depend on it.
    """
    if precision not in _MODES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise ValueError(f"split must be a positive int or None, got {split!r}")
    n, d = z.shape
    k = codebook.shape[0]
    if k >= 2**31:
        raise ValueError(f"the code index must fit the key's 31 bits, got K = {k}")
    z, codebook = row_major(z), row_major(codebook)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    dist = torch.empty(n, dtype=torch.float32, device=z.device)
    z_q = torch.empty(n, d, dtype=codebook.dtype, device=z.device) if return_zq else None
    if n == 0:
        return idx, dist, z_q

    mode = _MODES[precision]
    split = _auto_split(n, k, z.device) if split is None else split
    # (The certified search counts its listed rows in int32.)
    if mode == 0 and split == 1 and _CERTIFIED_SEARCH and n < 2**31:
        _assign_certified(z, codebook, idx, dist, z_q)
        return idx, dist, z_q
    if mode == 0:
        mean, cs, csq = dist, codebook, dist  # unused by the exact search
    else:
        mean, cs, csq = _centred_codebook(codebook)
    zq_arg = z_q if return_zq else dist
    keys = torch.empty(split, n, dtype=torch.int64, device=z.device) if split > 1 else idx
    args = (z, codebook, mean, cs, cs, csq, csq, keys, idx, dist, zq_arg, idx, idx,
            n, k, d, z.stride(0), codebook.stride(0), cs.stride(0), d, split,
            triton.next_power_of_2(n), 0.0)
    flags = dict(MODE=mode, EMULATE_BF16=interpreting(), RETURN_ZQ=return_zq, ROWS=False, GROUP=_GROUP)
    launch = _assign_exact if mode == 0 else _assign_dot

    def grid(meta):
        return (triton.cdiv(n, meta["BN"]), split)

    if split == 1:
        launch[grid](*args, SEARCH=True, FINISH=True, **flags)
    else:
        launch[grid](*args, SEARCH=True, FINISH=False, **flags)
        _assign_kernel[(triton.cdiv(n, _FINISH_BN), 1)](
            *args, SEARCH=False, FINISH=True, BN=_FINISH_BN, BK=16, BD=_FINISH_BD, **flags)
    return idx, dist, z_q


def _certify_bound(d: int) -> float:
    """C of the certified search's bound B = C (|z - m| + |c - m|)^2 (see _search_certify)."""
    return 3.5 * 2.0**-16 + 3.5 * d * 2.0**-23


def _assign_certified(z, codebook, idx, dist, z_q) -> torch.Tensor:
    """Exact assignment in two launches: the certified split-bf16 search finishes every row its
    bound separates and lists the others, then the direct-form search finishes the listed rows.

    Writes ``idx``, ``dist`` and ``z_q`` (when not None); returns the number of listed rows (int32
    ``[1]`` on the device, for tests and tuning)."""
    n, d = z.shape
    k = codebook.shape[0]
    mean, cs, csq = _centred_codebook(codebook)
    # The codes' bf16 parts, made once per call. The interpreter keeps them in fp32 (it mis-converts
    # bf16 subnormals on load); a GPU reads half the bytes.
    hi = cs.to(torch.bfloat16)
    lo = (cs - hi.float()).to(torch.bfloat16)
    if interpreting():
        hi, lo = hi.float(), lo.float()
    cn = csq.sqrt()
    rows = torch.empty(n, dtype=torch.int64, device=z.device)
    count = torch.zeros(1, dtype=torch.int32, device=z.device)
    return_zq = z_q is not None
    zq_arg = z_q if return_zq else dist
    common = (z, codebook, mean, hi, lo, csq, cn, idx, idx, dist, zq_arg, rows, count,
              n, k, d, z.stride(0), codebook.stride(0), hi.stride(0), d, 1,
              triton.next_power_of_2(n), _certify_bound(d))
    flags = dict(EMULATE_BF16=interpreting(), SEARCH=True, FINISH=True, RETURN_ZQ=return_zq, GROUP=_GROUP)

    def grid(meta):
        return (triton.cdiv(n, meta["BN"]), 1)

    _assign_certify[grid](*common, MODE=_CERTIFY, ROWS=False, **flags)
    # Sized for every row; programs past the listed count return at once (no host sync).
    _assign_exact[grid](*common, MODE=0, ROWS=True, **flags)
    return count


# The certified search serves exact mode whenever the code axis is not split (tests switch it off
# to compare with the plain direct-form search).
_CERTIFIED_SEARCH = True
