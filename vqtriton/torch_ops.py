"""Portable PyTorch implementations of the ops: the CPU fallback and a second opinion.

Each function has the signature of the kernel launcher of the same name in ``vqtriton.kernels``
(``backend.ops`` hands out either set), takes 2-D ``[N, D]`` rows (the functional layer flattens
leading dims and checks inputs), and reads an index of -1 as "no code". None allocates ``N x K``: assignment works in row chunks of at most ``_CHUNK_ELEMS``
distances. Accumulation is in float32 for float32/float16/bfloat16 inputs and float64 for float64.
"""

from __future__ import annotations

import torch

__all__ = [
    "assign_fwd",
    "gather",
    "scatter_add",
    "sqerr_rows",
    "sqerr_sum",
    "sqerr_backward",
    "code_stats",
    "quantize_backward",
]

# Distances held at once by `assign` (row chunk x K): 4M float64 values, 32 MiB.
_CHUNK_ELEMS = 1 << 22
# Unit roundoff of float64.
_U64 = 2.0**-53


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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

    Exact in the sense of the precision contract: candidates come from the float64 expanded form on
    vectors centred on the codebook mean, every code within a rigorous bound of the row minimum is
    re-ranked in the direct form sum((z - c)^2) in float64, and the lowest index wins exact ties.
    Rows whose minimum distance is not finite (a NaN or Inf in the row, or fp32 overflow) get
    index -1; ``dist`` is then NaN or Inf.
    """
    n, d = z.shape
    k = codebook.shape[0]
    out_dtype = acc_dtype(z, codebook)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    dist = torch.empty(n, dtype=out_dtype, device=z.device)
    if n == 0:
        return idx, dist, gather(idx, codebook) if return_zq else None
    c64 = codebook.to(torch.float64)
    # Distances are translation-invariant: centring on the mean of the finite codes keeps the
    # expanded form accurate when all vectors share a large offset. Non-finite codes are never chosen.
    usable = torch.isfinite(c64).all(-1)
    mean = c64[usable].mean(0) if bool(usable.any()) else torch.zeros_like(c64[0])
    c64 = c64 - mean
    c_sq = c64.square().sum(-1)  # [K]
    c_sq_max = torch.where(usable, c_sq, 0.0).max()
    # |expanded - exact| <= gamma (|z|^2 + |c|^2 + 2|z||c|) <= 2 gamma (|z|^2 + max|c|^2) for every
    # code, so any code within twice that of the row minimum may be the true nearest one.
    gamma = (d + 2) * _U64 / (1 - (d + 2) * _U64)
    step = max(1, _CHUNK_ELEMS // k)
    for s in range(0, n, step):
        zz = z[s : s + step].to(torch.float64)
        zc = zz - mean  # [n_c, D]
        z_sq = zc.square().sum(-1)  # [n_c]
        approx = torch.addmm(c_sq.unsqueeze(0), zc, c64.T, alpha=-2.0).add_(z_sq.unsqueeze(1))
        inf = float("inf")
        row_min = approx.nan_to_num_(nan=inf, posinf=inf, neginf=inf).amin(1)
        finite = torch.isfinite(row_min)
        window = torch.where(finite, row_min + 4.0 * gamma * (z_sq + c_sq_max), -float("inf"))
        rows, codes = torch.nonzero(approx <= window.unsqueeze(1), as_tuple=True)
        del approx
        exact = _pair_distances(zc, c64, rows, codes)
        best_d = torch.full_like(row_min, float("inf")).scatter_reduce(0, rows, exact, "amin")
        at_min = torch.where(exact == best_d[rows], codes, k)
        best = torch.full_like(row_min, k, dtype=torch.int64).scatter_reduce(0, rows, at_min, "amin")
        best = torch.where(finite & (best < k), best, -1)
        # The reported distance is the direct form on the inputs as given (no centring).
        row_dist = (zz - codebook.index_select(0, best.clamp_min(0)).to(torch.float64)).square().sum(-1)
        row_dist = torch.where(best >= 0, row_dist, _nonfinite_distance(zz, codebook)).to(out_dtype)
        # A distance that overflows the output dtype is no finite distance either.
        idx[s : s + step] = torch.where(torch.isfinite(row_dist), best, -1)
        dist[s : s + step] = row_dist
    return idx, dist, gather(idx, codebook) if return_zq else None


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


def gather(idx: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[idx]`` for int64 ``idx [N]``, bit-exact; rows with index -1 are zeros."""
    out = codebook.index_select(0, idx.clamp_min(0))
    return out.masked_fill_((idx < 0).unsqueeze(-1), 0)


def scatter_add(idx: torch.Tensor, rows: torch.Tensor, num_codes: int, *, deterministic: bool = False) -> torch.Tensor:
    """``out[k] = sum_{i: idx[i] = k} rows[i]`` into a ``[K, D]`` float32 (float64) buffer; -1 skipped.

    ``index_add_`` is deterministic on the CPU, and on CUDA only under ``torch.use_deterministic_algorithms``
    (it uses atomics otherwise). ``deterministic=True`` on CUDA therefore takes ``index_put_(...,
    accumulate=True)``, which on CUDA always runs the sort-based kernel that deterministic mode picks
    for ``index_add_`` (on the CPU it is the other way round, so the CPU keeps ``index_add_``).
    """
    dt = acc_dtype(rows)
    keep = idx >= 0
    out = torch.zeros(num_codes, rows.shape[-1], dtype=dt, device=rows.device)
    if deterministic and out.is_cuda:
        return out.index_put_((idx[keep],), rows[keep].to(dt), accumulate=True)
    return out.index_add_(0, idx[keep], rows[keep].to(dt))


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
    counts = torch.bincount(idx[idx >= 0], minlength=num_codes).to(torch.float32)
    sums = None if z is None else scatter_add(idx, z, num_codes, deterministic=deterministic)
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
    dt = acc_dtype(z, z_q)
    diff = z_q.to(dt) - z.to(dt)
    dz = (-2.0 * w.to(dt)).unsqueeze(1) * diff
    if grad_out is not None:
        g = grad_out.to(dt)
        dz = dz + (rotation(z.to(dt), z_q.to(dt), g) if rotate else g)
    if v is None:
        return dz.to(z.dtype), None
    rows = (2.0 * v.to(dt)).unsqueeze(1) * diff
    return dz.to(z.dtype), scatter_add(idx, rows, num_codes, deterministic=deterministic)
