"""Portable PyTorch implementations of the ops: the CPU fallback and a second opinion.

Each function has the signature of the kernel launcher of the same name in ``vqtriton.kernels``
(``backend.ops`` hands out either set), takes 2-D ``[N, D]`` rows (the functional layer flattens
leading dims and checks inputs), and reads an index of -1 as "no code". None allocates ``N x K``: assignment works in row chunks of at most ``_CHUNK_ELEMS``
distances. Accumulation is in float32 for float32/float16/bfloat16 inputs and float64 for float64.
"""

from __future__ import annotations

import contextlib

import functools
import math
from typing import NamedTuple

import torch

# LFQ's entropy launchers: their torch path has a file of its own.
from vqtriton.entropy_torch import distribution_entropy, distribution_entropy_grad, lfq_halves, lfq_halves_backward

__all__ = [
    "assign_fwd",
    "topk_fwd",
    "sample_fwd",
    "gather",
    "scatter_add",
    "sqerr_rows",
    "sqerr_sum",
    "sqerr_backward",
    "code_stats",
    "quantize_backward",
    "lfq_halves",
    "lfq_halves_backward",
    "distribution_entropy",
    "distribution_entropy_grad",
    "residual_assign_fwd",
    "residual_backward",
    "residual_stats",
]

# Distances held at once by `assign` (row chunk x K): 4M float64 values, 32 MiB.
_CHUNK_ELEMS = 1 << 22
# Up to this many (row, code, dim) terms `assign` computes every direct-form distance (256 KiB of float64).
_DIRECT_ELEMS = 1 << 15
# The candidate search's working dtypes: (unit roundoff, [lo, hi] range of s + t where its bound holds, s and
# t the squared norms of a centred row and of the largest centred code). Below lo, underflow could dominate
# the rounding error (the bound is relative); above hi, the expanded form could overflow.
_SEARCH = {
    torch.float32: (2.0**-24, 2.0**-100, 2.0**124),
    torch.float64: (2.0**-53, 2.0**-1000, 2.0**1020),
}


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when ``t`` has that dtype already (a no-op ``to`` still costs about
    a microsecond on the host, and a small batch's step makes dozens)."""
    return t if t.dtype == dtype else t.to(dtype)


def assign_fwd(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    precision: str = "exact",
    return_zq: bool = False,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest code of each row of ``z [N, D]`` in ``codebook [K, D]``: ``(idx int64 [N], dist [N], z_q)``.

    Every ``precision`` gives the exact answer here (the low-precision modes exist for tensor
    cores); ``split`` is a kernel launch detail and is ignored. ``z_q = codebook[idx]`` when
    ``return_zq``.

    Exact in the sense of the precision contract, in float64: the codes are ranked by the direct form
    ``sum((z - c)^2)`` on the inputs as given (the reference's distance; centring would round, and break
    exact ties at random), lowest index first among equal distances. A few pairs (``N K D`` up to
    ``_DIRECT_ELEMS``) are all ranked so; otherwise a candidate search (:func:`_search`: the expanded
    form on vectors centred on the codebook mean, float32 for float32/float16/bfloat16 inputs, with a
    rigorous error bound) leaves each row its candidates, and a row with more than one has them ranked.
    Rows with no finite distance (a NaN or Inf in the row, or overflow of the output dtype) get index
    -1; ``dist`` (the ranking's distance) is then NaN or Inf.
    """
    n, d = z.shape
    k = codebook.shape[0]
    out_dtype = acc_dtype(z, codebook)
    if n == 0:
        idx = torch.empty(0, dtype=torch.int64, device=z.device)
        return idx, torch.empty(0, dtype=out_dtype, device=z.device), gather(idx, codebook) if return_zq else None
    inf = float("inf")
    if n * k * d <= _DIRECT_ELEMS:  # so few pairs that finding candidates would cost more than ranking them all
        zz = z.to(torch.float64)
        best_d, best = (zz.unsqueeze(1) - codebook.to(torch.float64)).square().sum(-1).nan_to_num_(
            nan=inf, posinf=inf).min(1)
        parts = [_nearest(zz, codebook, best, out_dtype, best_d)]
    else:
        # float32 search when its GEMM rounds as IEEE float32 does (no TF32 / bf16 mode set for it) and counts
        # stay exact in it, else float64.
        fp32 = out_dtype == torch.float32 and k < 2**24 and _ieee_fp32_gemm(z.device)
        stages = [torch.float32, torch.float64] if fp32 else [torch.float64]
        books = _Books(codebook)
        step = max(1, _CHUNK_ELEMS // k)
        parts = []
        for s in range(0, n, step):
            chunk = z if n <= step else z[s : s + step]
            zz = chunk.to(torch.float64)
            best, within, single = _search(chunk, books, stages, k)
            # Mostly each row has one candidate: its nearest code. Else the candidates are ranked.
            rows = None if single else (within.sum(1) > 1).nonzero()[:, 0]
            if rows is not None and rows.shape[0]:
                r, c = within.index_select(0, rows).nonzero(as_tuple=True)
                pair_d = _pair_distances(zz.index_select(0, rows), codebook.to(torch.float64), r, c).nan_to_num_(
                    nan=inf, posinf=inf)
                row_d = torch.full((rows.shape[0],), inf, dtype=torch.float64, device=z.device)
                row_d.scatter_reduce_(0, r, pair_d, "amin")
                at_min = torch.where(pair_d == row_d[r], c, k)  # lowest index among equal distances
                best = best.index_copy(0, rows, torch.full_like(rows, k).scatter_reduce_(0, r, at_min, "amin"))
            parts.append(_nearest(zz, codebook, best, out_dtype))
    idx, dist, codes, found = parts[0] if len(parts) == 1 else (
        *(torch.cat(t) for t in list(zip(*parts))[:3]), all(p[3] for p in parts))
    if not return_zq:
        return idx, dist, None
    # Every row found a code (known from _nearest's check): its codes as gathered, no -1 to mask.
    return idx, dist, codes if found else gather(idx, codebook)


def _nearest(zz: torch.Tensor, codebook: torch.Tensor, best: torch.Tensor, out_dtype: torch.dtype,
             best_d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``(idx, dist, codes, found)`` of float64 rows ``zz`` from each row's chosen code ``best`` and its
    direct-form distance ``best_d`` (float64; computed here when not given): ``dist`` that distance in
    ``out_dtype``, ``codes = codebook[best]``; -1 and ``_nonfinite_distance`` for a row with no finite
    distance, -1 also where the distance overflows ``out_dtype``; ``found``: no row got -1 (then ``codes`` is
    ``codebook[idx]``)."""
    inf = float("inf")
    codes = codebook.index_select(0, best)
    if best_d is None:
        best_d = (zz - codes).square().sum(-1)  # float64: zz's dtype
    dist = best_d.to(out_dtype)
    if float(dist.sum()) < inf:  # the usual case: every row found its code (an overflowing sum only looks again)
        return best, dist, codes, True
    none = ~(best_d < inf)
    best, best_d = torch.where(none, -1, best), torch.where(none, _nonfinite_distance(zz, codebook), best_d)
    dist = best_d.to(out_dtype)
    return torch.where(dist < inf, best, -1), dist, codes, False


def _ieee_fp32_gemm(device: torch.device) -> bool:
    """Whether a float32 GEMM on ``device`` rounds as IEEE float32 (the float32 search's bound assumes it):
    not under TF32 or bf16 modes (``torch.backends.*.fp32_precision``, or the legacy
    ``torch.set_float32_matmul_precision`` / ``allow_tf32``, which set them; before torch 2.9, which has no
    ``fp32_precision``, only the "highest" precision counts)."""
    if device.type == "cpu":
        backend = torch.backends.mkldnn.matmul
    elif device.type == "cuda":
        backend = torch.backends.cuda.matmul
    else:
        return False
    mode = getattr(backend, "fp32_precision", None)
    if mode is None:  # torch < 2.9
        return torch.get_float32_matmul_precision() == "highest" and not (
            device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    if mode == "none":  # not set for this backend: the generic setting
        mode = torch.backends.fp32_precision
    return mode in ("none", "ieee")


@contextlib.contextmanager
def cuda_fp32_matmul(tf32: bool):
    """cuBLAS float32 GEMMs in TF32 (``tf32``) or IEEE float32 inside the block, the setting restored after:
    through ``torch.backends.cuda.matmul.fp32_precision`` where torch has it (2.9+, where reading the
    legacy ``allow_tf32`` after the new API has set it raises), else ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    old = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if tf32 else "ieee") if name == "fp32_precision" else tf32)
    try:
        yield
    finally:
        setattr(matmul, name, old)


class _Centred(NamedTuple):
    """The codebook as the candidate search sees it in one dtype: the codes centred on the mean of the
    finite ones, their squared norms (NaN / Inf for a code holding one, or overflowing the dtype), the
    largest squared norm of a finite code (0 with none) and whether every code is finite.

    Distances are translation-invariant: centring keeps the expanded form accurate when all vectors
    share a large offset. Non-finite codes are never chosen."""

    codes: torch.Tensor  # [K, D]
    mean: torch.Tensor  # [D]
    sq: torch.Tensor  # [K]
    sq_max: float
    finite: bool


def _centred(codebook: torch.Tensor, dtype: torch.dtype) -> _Centred:
    c = to_dtype(codebook, dtype)
    mean = c.mean(0)
    codes = c - mean
    sq = codes.square().sum(-1)  # [K]
    sq_max = float(sq.max())
    if math.isfinite(sq_max):
        return _Centred(codes, mean, sq, sq_max, True)
    usable = torch.isfinite(c).all(-1)
    if bool(usable.all()):  # finite codes whose squared norms overflow the dtype: rows cannot use it
        return _Centred(codes, mean, sq, sq_max, True)
    mean = c[usable].mean(0) if bool(usable.any()) else torch.zeros_like(c[0])  # a NaN or Inf: the others' mean
    codes = c - mean
    sq = codes.square().sum(-1)
    return _Centred(codes, mean, sq, float(torch.where(usable, sq, 0.0).max()), False)


class _Books(dict):
    """``books[dtype]``: the codebook :func:`_centred` in that dtype, computed on first use."""

    def __init__(self, codebook: torch.Tensor):
        super().__init__()
        self.codebook = codebook

    def __missing__(self, dtype: torch.dtype) -> _Centred:
        self[dtype] = book = _centred(self.codebook, dtype)
        return book


def _gamma(n: int, u: float = 2.0**-53) -> float:
    """The classic bound ``n u / (1 - n u)`` on the relative error of ``n`` rounded operations (unit roundoff ``u``)."""
    return n * u / (1 - n * u)


def _search(z: torch.Tensor, books: _Books, stages: list, k: int):
    """Each row's candidates: ``(best [n], within [n, K], single)``. ``within`` is 1 for every code that may
    be the row's nearest (the true nearest always among them) and 0 elsewhere; ``best`` is the candidate of
    a row with one; ``single``: every row has one.

    The first of the ``stages`` (working dtypes) serves the rows where its bound holds (:func:`_candidates`);
    the others go on to the next stage, and after the last every code is a candidate (rows whose float64
    expanded form could overflow: ranked in the direct form), none for a row holding a NaN or Inf."""
    if not stages:  # every code, except for a row holding a NaN or Inf: it has no finite distance to rank
        n, finite = z.shape[0], torch.isfinite(z).all(1, keepdim=True)
        return z.new_zeros(n, dtype=torch.int64), finite.expand(n, k).to(torch.float64), k == 1
    best, within, st = _candidates(z, books[stages[0]])
    _, lo, hi = _SEARCH[stages[0]]
    st_lo, st_hi = st.aminmax()
    if lo <= float(st_lo) and float(st_hi) <= hi:  # every row's bound holds (False for a NaN)
        # Each row has at least one candidate (its least approximation), so exactly one each iff they sum to n
        # (0/1 sums below 2^24: exact in float32).
        return best, within, float(within.sum()) == z.shape[0]
    rows = (st.clamp(lo, hi) != st).nonzero()[:, 0]  # NaN compares unequal: its row goes on
    r_best, r_within, _ = _search(z.index_select(0, rows), books, stages[1:], k)
    return best.index_copy(0, rows, r_best), within.index_copy(0, rows, r_within.to(within.dtype)), False


@functools.lru_cache(maxsize=32)
def _code_index(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[K]``: the code indices as floats. A 0/1 row with one candidate times it gives that candidate's index
    (one GEMV, exact for K < 2^24)."""
    return torch.arange(k, dtype=dtype, device=device)


def _candidates(z: torch.Tensor, book: _Centred):
    """``(best [n], within [n, K], st [n])`` for rows ``z [n, D]`` from the expanded form in ``book``'s dtype
    (see :func:`_search`); ``st = s + t`` below.

    ``approx_k = |c_k|^2 - 2 z.c_k`` on the centred vectors is ``d_k - |z|^2`` up to an error ``e_k``, and
    ``|z|^2`` is the same for every code of a row: so a code whose ``approx`` exceeds the row's least one
    by more than twice the bound on ``|e_k|`` cannot be the nearest. The bound, for rows of squared norm
    ``s`` and codes of squared norm at most ``t`` (both as computed; ``u`` the unit roundoff):
    the centring rounds each entry by at most ``u`` of itself, moving ``sqrt(d_k)`` by at most
    ``u (|z| + |c_k|)``, hence ``d_k`` by ``(2u + u^2)(|z| + |c_k|)^2``; the GEMM with its addend is a sum
    of D + 1 terms and ``|c_k|^2`` one of D, rounded in any order (FMA included): ``gamma_{2D+1}
    (|z| + |c_k|)^2`` together; ``(|z| + |c_k|)^2 <= 2 (s + t) / (1 - gamma_D)``. So ``|e_k| <=
    2 gamma_{3D+4} (s + t)``, and the window is ``4 gamma_{3D+8} (s + t)``: the margin covers the
    rounding of the window itself. The bound is relative: it holds where ``s + t`` lies in the dtype's
    ``_SEARCH`` range, where nothing overflows and underflow (absolute errors of at most ``(2D + 2) 2^-149``
    in float32) stays far below it; a row holding a NaN or Inf has ``st`` NaN or Inf, out of it.
    ``within`` is a float 0/1 tensor and ``best`` comes from it by :func:`_code_index` (on the CPU an argmin
    and a bool comparison over ``[n, K]`` each cost more than the GEMM)."""
    dtype = book.codes.dtype
    u = _SEARCH[dtype][0]
    zc = to_dtype(z, dtype) - book.mean  # [n, D]
    approx = torch.addmm(book.sq, zc, book.codes.T, alpha=-2.0)  # [n, K]
    if not book.finite:  # a code holding a NaN or Inf is never a candidate
        inf = float("inf")
        approx.nan_to_num_(nan=inf, posinf=inf, neginf=inf)
    st = zc.square().sum(-1, keepdim=True).add_(book.sq_max)  # [n, 1]: s + t
    within = approx.le_(torch.add(approx.amin(1, keepdim=True), st, alpha=4.0 * _gamma(3 * z.shape[1] + 8, u)))
    return torch.mv(within, _code_index(approx.shape[1], dtype, z.device)).long(), within, st[:, 0]


def _reported(zz: torch.Tensor, codebook: torch.Tensor, best: torch.Tensor, fail: torch.Tensor, out_dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, dist)`` for chosen codes ``best`` (-1: none) of float64 rows ``zz``: the distance is the
    direct form on the inputs as given (no centring), in ``out_dtype``; ``fail`` where there is no code.
    A distance that overflows the output dtype is no finite distance either: index -1 there."""
    row_dist = (zz - codebook.index_select(0, best.clamp_min(0)).to(torch.float64)).square().sum(-1)
    row_dist = torch.where(best >= 0, row_dist, fail).to(out_dtype)
    return torch.where(torch.isfinite(row_dist), best, -1), row_dist


def _pair_distances(zc: torch.Tensor, c64: torch.Tensor, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Direct-form ``sum((zc[r] - c[k])^2)`` for each (row, code) pair, in blocks of bounded memory."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=zc.device)
    step = max(1, _CHUNK_ELEMS // max(1, zc.shape[1]))
    for s in range(0, rows.shape[0], step):
        r, c = rows[s : s + step], codes[s : s + step]
        out[s : s + step] = (zc.index_select(0, r) - c64.index_select(0, c)).square().sum(-1)
    return out


def _nonfinite_distance(zz: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """NaN for rows holding a NaN (or facing an all-NaN codebook), else +Inf."""
    has_nan = torch.isnan(zz).any(-1) | bool(torch.isnan(codebook).any(-1).all())
    return torch.where(has_nan, float("nan"), float("inf")).to(zz.dtype)


def _chunk_distances(z: torch.Tensor, mean: torch.Tensor, c64: torch.Tensor, c_sq: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a chunk of rows ``z [n, D]``: ``(zz, z_sq, d2)``, the rows in float64, their squared norms
    centred on ``mean`` and the float64 expanded-form squared distances ``[n, K]`` to the codes centred on
    it (``c64``, ``c_sq`` from ``_centred``: ``|z - m|^2 + |c - m|^2 - 2 (z - m).(c - m)``)."""
    zz = z.to(torch.float64)
    zc = zz - mean
    z_sq = zc.square().sum(-1)
    return zz, z_sq, torch.addmm(c_sq.unsqueeze(0), zc, c64.T, alpha=-2.0).add_(z_sq.unsqueeze(1))


def topk_fwd(
    z: torch.Tensor, codebook: torch.Tensor, k: int, *, precision: str = "exact", split: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codes of each row of ``z [N, D]``, nearest first: ``(idx int64 [N, k], dist [N, k])``.

    Exact as ``assign_fwd`` for every ``precision`` (``split`` is ignored): every code within the
    rigorous window of the k-th smallest float64 expanded-form distance is re-ranked in the direct form,
    and a stable sort orders them (lowest index among equal distances). A slot without a finite distance
    (fewer than k finite codes, a NaN or Inf in the row, overflow of the output dtype) gets -1 and
    ``dist`` NaN for a row holding a NaN (or facing an all-NaN codebook), else +Inf.
    """
    n, d = z.shape
    num_codes = codebook.shape[0]
    out_dtype = acc_dtype(z, codebook)
    idx = torch.empty(n, k, dtype=torch.int64, device=z.device)
    dist = torch.empty(n, k, dtype=out_dtype, device=z.device)
    c64, mean, c_sq, c_sq_max, _ = _centred(codebook, torch.float64)
    c_raw = codebook.to(torch.float64)
    # The bound of _candidates, here on full distances (|z|^2 added: D more rounded terms).
    gamma, inf = _gamma(4 * d + 8), float("inf")
    step = max(1, _CHUNK_ELEMS // num_codes)
    for s in range(0, n, step):
        zz, z_sq, approx = _chunk_distances(z[s : s + step], mean, c64, c_sq)
        approx.nan_to_num_(nan=inf, posinf=inf, neginf=inf)
        # The true k nearest have exact distances <= the k-th smallest approximation + the bound, so
        # approximations within twice the bound of it (+Inf: every code, when fewer than k are finite).
        kth = approx.topk(k, dim=1, largest=False).values[:, -1]
        window = torch.where(torch.isfinite(z_sq), kth + 4.0 * gamma * (z_sq + c_sq_max), -inf)
        rows, codes = torch.nonzero(approx <= window.unsqueeze(1), as_tuple=True)
        # The buffer again: direct-form distances of the candidates, +Inf elsewhere. On the inputs as
        # given, not centred (centring rounds, and would break exact ties at random).
        exact = approx.fill_(inf)
        exact[rows, codes] = _pair_distances(zz, c_raw, rows, codes).nan_to_num_(nan=inf, posinf=inf)
        best_d, best = torch.sort(exact, dim=1, stable=True)
        del exact
        best = torch.where(torch.isfinite(best_d[:, :k]), best[:, :k], -1)
        fail = _nonfinite_distance(zz, codebook)
        for j in range(k):
            idx[s : s + step, j], dist[s : s + step, j] = _reported(zz, codebook, best[:, j], fail, out_dtype)
    return idx, dist


# (row, code) pairs per chunk of `sample_fwd`: its noise takes ~10 int64 temporaries of this size
# (256 KiB each: in cache). Measured on the 2-core CPU: 0.10-0.15 s per 2^19 pairs of noise in chunks of
# 2^14, 0.4-0.6 s in chunks of 2^19, and erratic (1-17 s) at 2^16, where torch starts to split each op
# over threads.
_SAMPLE_CHUNK_ELEMS = 1 << 15
# Philox4x32-10, as Triton's tl.philox: the round multipliers and the key's increments (Weyl constants).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_M32 = 0xFFFFFFFF


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for ``a < 2^32`` and int64 ``b`` in [0, 2^32), in int64
    arithmetic that never overflows (b in 16-bit halves)."""
    lo = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (lo >> 16)  # < 2^49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo & 0xFFFF)


def philox_bits(seed: torch.Tensor, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``[n, K]`` int64 holding uint32 values: the sampling kernel's noise bits (``kernels/sample.py``,
    ``_philox_bits``) for int64 ``rows [n]`` and ``codes [K]``: the first word of Philox4x32-10 with key
    ``seed`` (a 0-dim integer tensor: its two's-complement 64 bits) and counter (code, row mod 2^32,
    row div 2^32, 0). Bit for bit what Triton computes."""
    seed = seed.to(torch.int64)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = codes.to(torch.int64)[None, :]
    c1, c2, c3 = (rows & _M32)[:, None], (rows >> 32)[:, None], 0
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_M[1], c2)
        hi_a, lo_a = _mul32(_PHILOX_M[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
    return c0.expand(rows.shape[0], codes.shape[0])


def gumbel_log_e(seed: torch.Tensor, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``[n, K]`` float64 ``log E`` (E ~ Exp(1); the Gumbel noise is ``-log E``) from ``philox_bits``, as
    the kernel's ``_gumbel_log_e``: the same fp32 uniforms ``U = (r + 1/2) 2^-32`` and ``V = 1 - U`` (from
    ``~r``), then ``E = -log(1 - V)`` for V < 1/16 and ``-log(U)`` else, here in float64."""
    r = philox_bits(seed, rows, codes)
    u = ((r.to(torch.float32) + 0.5) * 2.0**-32).to(torch.float64)
    v = (((_M32 - r).to(torch.float32) + 0.5) * 2.0**-32).to(torch.float64)
    return torch.where(v < 0.0625, -torch.log1p(-v), -torch.log(u)).log()


def sample_fwd(
    z: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float,
    seed: torch.Tensor,
    *,
    cosine: bool = False,
    return_zq: bool = False,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One Gumbel-max draw per row of ``z [N, D]``: ``(idx int64 [N], dist [N], z_q)``, as the kernel
    (``kernels/sample.py``) with the same noise bits, the scores in float64: the code of least
    ``sqrt(max(d, 1e-8)) + T log E`` (``cosine``: ``d / 2 + T log E``), d the float64 squared distance
    (expanded form, centred), lowest index on ties. ``dist`` and the NaN / Inf policy as ``assign_fwd``.
    Row chunks bound the memory (the noise's int64 words included); ``split`` is ignored."""
    n, d = z.shape
    num_codes = codebook.shape[0]
    out_dtype = acc_dtype(z, codebook)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    dist = torch.empty(n, dtype=out_dtype, device=z.device)
    c64, mean, c_sq, _, _ = _centred(codebook, torch.float64)
    usable = torch.isfinite(c_sq)
    codes = torch.arange(num_codes, device=z.device)
    inf = float("inf")
    step = max(1, _SAMPLE_CHUNK_ELEMS // num_codes)
    for s in range(0, n, step):
        zz, z_sq, d2 = _chunk_distances(z[s : s + step], mean, c64, c_sq)
        score = d2.mul_(0.5) if cosine else d2.clamp_min_(1e-8).sqrt_()
        rows = torch.arange(s, s + zz.shape[0], device=z.device)
        score.add_(gumbel_log_e(seed, rows, codes), alpha=temperature)
        score = torch.where(usable, score, inf).nan_to_num_(nan=inf, posinf=inf)
        best = score.argmin(1)  # the first of equal minima: the lowest index
        ok = torch.isfinite(score.gather(1, best.unsqueeze(1)).squeeze(1)) & torch.isfinite(z_sq)
        best = torch.where(ok, best, -1)
        fail = _nonfinite_distance(zz, codebook)
        idx[s : s + step], dist[s : s + step] = _reported(zz, codebook, best, fail, out_dtype)
    return idx, dist, gather(idx, codebook) if return_zq else None


def gather(idx: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[idx]`` for int64 ``idx [N]``, bit-exact; rows with index -1 are zeros."""
    out = codebook.index_select(0, idx.clamp_min(0))
    return out.masked_fill_((idx < 0).unsqueeze(-1), 0)


def scatter_add(idx: torch.Tensor, rows: torch.Tensor, num_codes: int, *, deterministic: bool = False,
                alpha: float = 1.0) -> torch.Tensor:
    """``out[k] = alpha * sum_{i: idx[i] = k} rows[i]`` into a ``[K, D]`` float32 (float64) buffer; -1 skipped.
    (``alpha``, a power of two in practice, saves the caller a pass; the kernel launcher has none.)"""
    return _scatter_slots(_slots(idx, num_codes), rows, num_codes, deterministic, alpha)


def _slots(idx: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``idx`` with -1 mapped to K: the spare last row (bin) that masked rows add to, cut off after."""
    return idx.remainder(num_codes + 1)


def _scatter_slots(slot: torch.Tensor, rows: torch.Tensor, num_codes: int, deterministic: bool, alpha: float = 1.0
                   ) -> torch.Tensor:
    """``scatter_add`` on ``slot = _slots(idx)``: the last row of a ``[K + 1, D]`` buffer takes the -1 rows and
    is cut off (no boolean mask: selecting the kept rows costs a sync and two copies). The result is a view of
    the buffer's first K rows, at storage offset 0 as the op's fake implementation says.

    ``index_add_`` is deterministic on the CPU, and on CUDA only under ``torch.use_deterministic_algorithms``
    (it uses atomics otherwise). ``deterministic=True`` on CUDA therefore takes ``index_put_(...,
    accumulate=True)``, which on CUDA always runs the sort-based kernel that deterministic mode picks
    for ``index_add_`` (on the CPU it is the other way round, so the CPU keeps ``index_add_``).
    """
    dt = acc_dtype(rows)
    rows = to_dtype(rows, dt)
    out = torch.zeros(num_codes + 1, rows.shape[-1], dtype=dt, device=rows.device)
    if deterministic and out.is_cuda:
        out.index_put_((slot,), rows * alpha if alpha != 1.0 else rows, accumulate=True)
    else:
        out.index_add_(0, slot, rows, alpha=alpha)
    return out[:num_codes]


def sqerr_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j (a - b)^2`` per row, accumulated in float32 (float64 for float64 inputs)."""
    dt = acc_dtype(a, b)
    return (a.to(dt) - b.to(dt)).square().sum(-1)


def sqerr_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total ``sum (a - b)^2`` as a 0-dim float32 (float64) tensor."""
    return sqerr_rows(a, b).sum()


def sqerr_backward(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``2 (a - b) grad`` in ``a.dtype``; ``grad`` is 0-dim (the total) or ``[N]`` (per row)."""
    dt = acc_dtype(a, b)
    g = grad.to(dt).reshape(-1, 1) if grad.dim() else grad.to(dt)
    return (2.0 * (a.to(dt) - b.to(dt)) * g).to(a.dtype)


def code_stats(
    idx: torch.Tensor, z: torch.Tensor | None, num_codes: int, *, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-code counts (float32 ``[K]``) and vector sums (``[K, D]``) of the rows with ``idx >= 0``."""
    slot = _slots(idx, num_codes)
    counts = torch.bincount(slot, minlength=num_codes + 1)[:num_codes].to(torch.float32)
    sums = None if z is None else _scatter_slots(slot, z, num_codes, deterministic)
    return counts, sums


# vector-quantize-pytorch's clamp of the norms in the rotation trick (kernels/quantize.py: the same).
ROTATION_EPS = 1e-6


def rotation(z: torch.Tensor, z_q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The rotation trick's gradient for ``z`` from the gradient ``g`` reaching ``z_q`` (rows ``[N, D]``,
    computed in their dtype): ``lam R^T g`` with ``R = I - 2 w w^T + 2 q u^T``, ``u = z / |z|``,
    ``q = z_q / |z_q|``, ``w = (u + q) / |u + q|``, ``lam = |z_q| / |z|``, all held constant
    (Fifty et al. 2024, section 4.2), norms clamped at ``ROTATION_EPS``."""
    u = z / z.norm(dim=1, keepdim=True).clamp_min(ROTATION_EPS)
    q = z_q / z_q.norm(dim=1, keepdim=True).clamp_min(ROTATION_EPS)
    w = (u + q) / (u + q).norm(dim=1, keepdim=True).clamp_min(ROTATION_EPS)
    lam = z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True).clamp_min(ROTATION_EPS)
    dot = lambda a, b: (a * b).sum(1, keepdim=True)  # noqa: E731
    return lam * (g - 2.0 * dot(w, g) * w + 2.0 * dot(q, g) * u)


def quantize_backward(
    z: torch.Tensor,
    z_q: torch.Tensor,
    idx: torch.Tensor,
    grad_out: torch.Tensor | None,
    w: torch.Tensor,
    v: torch.Tensor | None,
    num_codes: int,
    *,
    deterministic: bool = False,
    rotate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused VQ backward from the forward's codes ``z_q = codebook[idx]`` and per-row weights
    ``w, v [N]`` (the gradients reaching each row's commitment and codebook distance):

    ``dz = G + 2 w (z - z_q)`` and ``dcodebook = scatter_idx 2 v (z_q - z)`` (None when ``v`` is), with
    ``G = grad_out``, or its ``rotation`` when ``rotate``.
    """
    dt, out_dtype = acc_dtype(z, z_q), z.dtype
    z, z_q, w = to_dtype(z, dt), to_dtype(z_q, dt), to_dtype(w, dt)
    diff = z_q - z
    dz = (-2.0 * w).unsqueeze(1) * diff  # rounded as the kernel rounds it (no fused multiply-add)
    if grad_out is not None:
        g = to_dtype(grad_out, dt)
        dz = dz + (rotation(z, z_q, g) if rotate else g)
    dz = to_dtype(dz, out_dtype)
    if v is None:
        return dz, None
    return dz, scatter_add(idx, to_dtype(v, dt).unsqueeze(1) * diff, num_codes, deterministic=deterministic, alpha=2.0)


# The residual VQ launchers: their torch path has a file of its own (it calls the launchers above).
from vqtriton.residual_torch import residual_assign_fwd, residual_backward, residual_stats  # noqa: E402
