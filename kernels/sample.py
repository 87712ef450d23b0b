"""Gumbel-max sampled assignment: each row draws a code with probability softmax(logit / T), fused,
never an N x K tensor (of logits or of noise).

The logits are vector-quantize-pytorch's: ``logit_k = -sqrt(max(d_k, 1e-8))`` for the L2 metric (its
``-cdist``) and the cosine similarity ``1 - d_k / 2`` of l2-normalised vectors for ``cosine``, with
``d_k`` the squared distance. Gumbel-max: ``argmax_k logit_k / T + g_k`` with g standard Gumbel is such
a draw. With ``g = -log E``, E ~ Exp(1), and the argmax scaled by T > 0 (which keeps it), each row
takes the code of least ``score_k = -T logit_k + T log E_k``:

- L2: ``sqrt(max(d_k, 1e-8)) + T log E_k``; cosine: ``d_k / 2 + T log E_k`` (the constant dropped).
  Written this way nothing overflows for small T (``logit / T`` would), and T -> 0 is the nearest
  code.
- ``d_k``: the split-bf16 expanded form on tensor cores (``assign._dot_tile`` mode 3, the certified
  search's arithmetic: within about 2^-16 (|x|^2 + |y|^2) of the direct form after centring), so a
  logit is off by ~1e-5 of the vectors' scale, far below what sampling resolves.
- ``E_k``: from 32 random bits per (row, code): Philox4x32-10 (Triton's ``tl.philox``) keyed by the
  64-bit seed, counter ``(code, row mod 2^32, row div 2^32, 0)``, first output word r. So the noise of
  (row, code) depends on (seed, row, code) only: not on the block sizes, the split, K or the other
  rows. ``E = -log(U)``, ``U = (r + 1/2) 2^-32``; near U = 1 (small E: the draws that win) it is
  computed from ``V = 1 - U = (~r + 1/2) 2^-32`` by the series of ``-log(1 - V)``, so every E keeps
  about fp32's relative precision. ``vqtriton.torch_ops.gumbel_log_e`` draws the same Philox words and the
  same fp32 uniforms in int64 PyTorch arithmetic (``vqtriton.reference.philox4x32``: NumPy), and takes
  their logs in float64 (the kernel: the fp32 series), so both paths sample the same code but for draws
  within that rounding of a tie.

The seed is read on the device (a 0-dim int64 tensor), so a compiled training step can draw it with
``torch.randint`` and never sync. With the code axis split (small N, large K), each program's best
(score, code) goes to a ``[split, N]`` key buffer and a finish-only launch takes the minimum, as for
k = 1. The finish writes idx, the direct-form distance to the drawn code and, for ``quantize``, z_q.

Cost (predicted, no GPU here): the 10 Philox rounds (about 60 integer instructions), two logs and a
square root per (row, code) on CUDA cores, next to three bf16 products per (row, code, dim) on tensor
cores: the noise dominates for D <= ~256, about 1 clock per (row, code) per SM on an H100, so ~60 us
at N = 16384, K = 1024 on 132 SMs (plus the centring passes). vqp materialises the [N, K] logits and
noise (several full passes over N x K floats).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqtriton.kernels import interpreting, tune_configs
from vqtriton.kernels.assign import (
    _DIST_BD, _DOT_CONFIGS, _GROUP, INF_BITS, NAN_BITS, NO_CODE, _auto_split, _certify_bound, _code_run, _dot_tile,
    _finish, _fit_bd, _key_value, _launch_finish, _merge_tile, _min_over_runs, _prepare, _rank_key, _row_block,
    _search_grid,
)
from vqtriton.kernels.centre import centre_rows, centred_codebook

__all__ = ["sample_fwd"]

# Below this V = 1 - U, E = -log(1 - V) comes from its series (five terms: error < V^6 / 6, under
# fp32's rounding); above, from -log(U) (U <= 15/16: no cancellation).
_SERIES_BELOW = tl.constexpr(0.0625)


@triton.jit
def _philox_bits(seed, o_n, o_k):
    """``[BN, BK]`` uint32: the first word of Philox4x32-10 with key ``seed`` (int64, as its two 32-bit
    halves) and counter ``(code, row lo, row hi, 0)`` for rows ``o_n`` (int64 [BN]) and codes ``o_k`` [BK]."""
    b_zero = tl.zeros([o_n.shape[0], o_k.shape[0]], dtype=tl.uint32)
    c0 = o_k[None, :].to(tl.uint32) + b_zero
    c1 = (o_n & 0xFFFFFFFF).to(tl.uint32)[:, None] + b_zero
    c2 = (o_n >> 32).to(tl.uint32)[:, None] + b_zero
    r, _, _, _ = tl.philox(seed, c0, c1, c2, b_zero)
    return r


@triton.jit
def _gumbel_log_e(seed, o_n, o_k):
    """``[BN, BK]`` fp32 ``log E``, E ~ Exp(1), from ``_philox_bits`` (the Gumbel noise is ``-log E``)."""
    r = _philox_bits(seed, o_n, o_k)
    b_u = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (r + 1/2) 2^-32, exact scaling
    b_v = ((~r).to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 1 - U, with its own precision
    b_series = b_v * (1.0 + b_v * (0.5 + b_v * (0.3333333333333333 + b_v * (0.25 + b_v * 0.2))))
    b_e = tl.where(b_v < _SERIES_BELOW, b_series, -tl.log(b_u))
    return tl.log(b_e)


@triton.jit
def _sample_kernel(z_ptr, c_ptr, xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, aux_ptr, seed_ptr,
                   key_ptr, idx_ptr, dist_ptr, zq_ptr,
                   N, K, D, stride_z, stride_c, stride_x, stride_cs, stride_zq, split, n_bucket, temperature,
                   COSINE: tl.constexpr, EMULATE_BF16: tl.constexpr, SEARCH: tl.constexpr, FINISH: tl.constexpr,
                   RETURN_ZQ: tl.constexpr, GROUP: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # n_bucket is only an autotune key (N rounded up to a power of two).
    o_n, m_n = _row_block(N, BN)
    if SEARCH:
        seed = tl.load(seed_ptr)
        k_lo, k_hi = _code_run(K, split, BK)
        b_min = tl.full([BN], float("inf"), tl.float32)
        b_code = tl.full([BN], NO_CODE, tl.int32)
        for k0 in range(k_lo, k_hi, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < k_hi
            b_d = _dot_tile(xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, o_n, m_n, o_k, m_k, D, stride_x,
                            stride_cs, 3, EMULATE_BF16, BN, BK, BD)  # [BN, BK] padding / non-finite codes: +Inf
            if COSINE:
                b_s = 0.5 * b_d
            else:
                b_s = tl.sqrt(tl.maximum(b_d, 1e-8))
            b_s = b_s + temperature * _gumbel_log_e(seed, o_n, o_k)
            # NaN only in rows holding a NaN or Inf (failed in the finish): rank it last.
            b_s = tl.where(b_s == b_s, b_s, float("inf"))
            b_min, b_code = _merge_tile(b_min, b_code, b_s, o_k)
        b_key = _rank_key(b_min, b_code)
        if not FINISH:
            tl.store(key_ptr + tl.program_id(1).to(tl.int64) * N + o_n, b_key, mask=m_n)
    else:
        b_key = _min_over_runs(key_ptr, o_n, m_n, N, split, BN)
    if FINISH:
        b_xsq = tl.load(xsq_ptr + o_n, mask=m_n, other=0.0)
        # No code for a row holding a NaN or Inf (|x|^2 not finite), or with no finite code: NaN for a
        # NaN row or an all-NaN codebook (aux[0] = 0), else +Inf, as assign decides.
        b_all_nan = tl.load(aux_ptr + tl.zeros([BN], dtype=tl.int32)) == 0
        m_ok = (_key_value(b_key) < float("inf")) & (b_xsq < float("inf"))
        b_bits = tl.where(m_ok, 0, tl.where((b_xsq != b_xsq) | b_all_nan, NAN_BITS, INF_BITS))
        b_best = (b_bits.to(tl.int64) << 32) | tl.where(m_ok, b_key & 0x7FFFFFFF, 0)
        # _finish measures the drawn code's direct-form distance (a row whose distance overflows fails).
        _finish(b_best, z_ptr, c_ptr, idx_ptr, dist_ptr, zq_ptr, o_n, m_n, D, stride_z, stride_c, stride_zq,
                False, RETURN_ZQ, GROUP, BN, _DIST_BD)


_KEY = ["n_bucket", "K", "D", "split", "COSINE", "SEARCH", "FINISH", "RETURN_ZQ"]
# The tensor-core tiles with at most 32 (row, code) pairs per thread: each pair holds four Philox words
# while its noise is made, and the [64, 128] / [128, 128] tiles spilled 460-700 B a thread on sm_90
# (benchmarks/resources.py, triton 3.9). The interpreter pays per block operation, not per element:
# numpy-sized row blocks there.
_CONFIGS = [c for c in _DOT_CONFIGS if c.kwargs["BN"] * c.kwargs["BK"] <= 32 * 32 * c.num_warps]
_INTERPRETER = triton.Config({"BN": 1024, "BK": 64, "BD": 64})
_sample = triton.autotune(configs=tune_configs(_CONFIGS, _INTERPRETER), key=_KEY,
                          prune_configs_by={"early_config_prune": _fit_bd})(_sample_kernel)


def sample_fwd(z: torch.Tensor, codebook: torch.Tensor, temperature: float, seed: torch.Tensor, *,
               cosine: bool = False, return_zq: bool = False, split: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """idx int64 [N], dist float32 [N], z_q [N, D] (codebook dtype) or None: one Gumbel-max draw per row
    of ``z [N, D]`` from ``codebook [K, D]`` (inputs checked by the caller, as for ``assign_fwd``).

    Code k is drawn with probability ``softmax_k(logit_k / temperature)``, ``logit_k =
    -sqrt(max(d_k, 1e-8))`` (``cosine=False``) or ``1 - d_k / 2`` (``cosine=True``: the cosine
    similarity, for l2-normalised inputs), ``d_k`` the squared distance. ``seed``: a 0-dim integer tensor
    on z's device, read there; the noise of (row, code) depends on (seed, row, code) only, so a seed
    reproduces a draw whatever the launch configuration. ``temperature`` > 0.

    ``dist``: the direct-form fp32 squared distance to the drawn code. Rows holding a NaN or Inf, with
    no finite code, or whose distance overflows get -1 (``dist`` NaN or +Inf, as ``assign_fwd``) and a
    zero ``z_q`` row. ``split`` as for ``assign_fwd``: results do not depend on it.
    """
    if not (isinstance(seed, torch.Tensor) and seed.dim() == 0 and not seed.is_floating_point()
            and not seed.is_complex() and seed.dtype != torch.bool):
        raise ValueError(f"seed must be a 0-dim integer tensor, got {seed!r}")
    if seed.device != z.device:
        raise ValueError(f"seed must be on z's device {z.device}, got {seed.device}")
    temperature = float(temperature)
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    z, codebook, idx, dist, z_q = _prepare(z, codebook, split, return_zq=return_zq)
    n, d = z.shape
    k = codebook.shape[0]
    if n == 0:
        return idx, dist, z_q
    seed = seed.to(torch.int64)
    split = _auto_split(n, k, z.device) if split is None else split
    cb = centred_codebook(codebook, parts=3, bound_e=_certify_bound(d))  # (as the certified search makes it)
    xh, xl, xsq = centre_rows(z, cb.mean, parts=3)
    keys = torch.empty(split, n, dtype=torch.int64, device=z.device) if split > 1 else idx
    args = (z, codebook, xh, xl, xsq, cb.hi, cb.lo, cb.sq, cb.aux, seed, keys, idx, dist, z_q if return_zq else dist,
            n, k, d, z.stride(0), codebook.stride(0), xh.stride(0), cb.hi.stride(0), d, split,
            triton.next_power_of_2(n), temperature)
    flags = dict(COSINE=bool(cosine), EMULATE_BF16=interpreting(), RETURN_ZQ=return_zq, GROUP=_GROUP)
    _sample[_search_grid(n, split)](*args, SEARCH=True, FINISH=split == 1, **flags)
    if split > 1:
        _launch_finish(_sample_kernel, n, args, **flags)
    return idx, dist, z_q
