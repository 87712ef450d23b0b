"""NumPy float64 reference of residual vector quantization (SoundStream, EnCodec, DAC): the ground truth.

The residual loop over L codebooks ``C_l [K_l, D]`` (sizes may differ per level):

    r_0 = z,   x_l = r_l (l2) or r_l / |r_l| (cosine),   i_l = nearest(x_l, C_l'),   r_{l+1} = r_l - C_l'[i_l]

with ``C_l' = C_l`` (l2) or the l2-normalised codes (cosine: each level compares its normalised residual
with normalised codes, and subtracts the normalised code; the residual itself is not normalised, as
vector-quantize-pytorch's ResidualVQ with ``use_cosine_sim``). The output is ``z_q = sum_l C_l'[i_l]``.

    residual_nearest(z, codebooks, ...)       indices [..., L], z_q [..., D], distances [..., L]
    residual_inputs(z, codebooks, indices)    every level's input x_l and code q_l for given indices
    residual_quantize_grad(...)               the analytic gradients of the training terms
    residual_code_stats(z, codebooks, idx)    per level: counts and sums of the inputs x_l per code

Ties go to the lowest index (NumPy argmin). ``mask`` (bool, ``z.shape[:-1]``): masked vectors get -1
at every level, distance 0 and add nothing, whatever they hold. ``levels`` (an int n, or None for all):
levels >= n act as masked for every vector (quantize dropout). A vector with no finite distance at some
level (a NaN or Inf in it, or only non-finite codes) gets -1 from that level on and adds nothing more;
every later level repeats that level's distance: NaN when the vector holds a NaN (or every code of
that level does), else +Inf.

Gradients, with the VQ stop-gradients (``w_l, v_l`` the gradients reaching level l's commitment
distance ``|x_l - sg q_l|^2`` and codebook distance ``|sg x_l - q_l|^2``, ``G`` the one reaching z_q):

    dz       = sum_l J_l^T (2 w_l (x_l - q_l) + [l in S] T_l(G))        (dr_l / dz = I: the residual
    dC_l[k]  = J_c^T sum_{rows with i_l = k} 2 v_l (q_l - x_l)           subtracts detached codes)

``J_l`` the Jacobian of ``x_l`` in ``r_l`` (I for l2), ``J_c`` that of the normalised code in the raw
one (I for l2), ``S = {0}`` for ``output_grad="first"`` (the output is level 0's straight-through
output plus the detached later codes: vqtriton's ResidualVQ) or every level for ``"every"`` (each
level's output is its own straight-through output: vector-quantize-pytorch's), and ``T_l`` the identity
or, with ``rotation_trick``, ``rotation_trick_grad(x_l, q_l, G)`` (Fifty et al., ICLR 2025).

This module imports NumPy only (and the VQ-VAE reference beside it).
"""

from __future__ import annotations

import numpy as np

from .vqvae import normalize, rotation_trick_grad, squared_distances

__all__ = [
    "residual_nearest",
    "residual_inputs",
    "residual_quantize_grad",
    "residual_code_stats",
    "normalize_vjp",
]

METRICS = ("l2", "cosine")
OUTPUT_GRADS = ("first", "every")
_EPS = 1e-12  # normalize's eps


def _books(codebooks) -> list[np.ndarray]:
    """``[L, K, D]`` or a sequence of ``[K_l, D]`` as a list of float64 ``[K_l, D]``."""
    books = [np.asarray(c, dtype=np.float64) for c in codebooks]
    if not books or any(c.ndim != 2 or c.shape[0] < 1 or c.shape[1] != books[0].shape[1] for c in books):
        raise ValueError(f"codebooks must be L >= 1 arrays [K_l >= 1, D] of one D, got {[c.shape for c in books]}")
    return books


def _rows(z, d: int) -> tuple[np.ndarray, tuple]:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim < 1 or z.shape[-1] != d:
        raise ValueError(f"z must be [..., D] with D = {d}, got {z.shape}")
    return z.reshape(-1, d), z.shape[:-1]


def _ran(mask, levels, lead: tuple, n: int, n_levels: int) -> np.ndarray:
    """Bool ``[N, L]``: level l ran for vector n (kept and l < levels)."""
    keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    if keep.shape != (n,):
        raise ValueError(f"mask must have shape {lead}, got {np.shape(mask)}")
    n_run = n_levels if levels is None else int(levels)
    return keep[:, None] & (np.arange(n_levels) < n_run)[None, :]


def _indices(indices, n: int, n_levels: int) -> np.ndarray:
    idx = np.asarray(indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integer, got dtype {idx.dtype}")
    if idx.size != n * n_levels:
        raise ValueError(f"indices must be [..., L] with L = {n_levels} for {n} vectors, got shape {idx.shape}")
    return idx.reshape(n, n_levels)


def _metric(metric: str, books: list[np.ndarray]) -> list[np.ndarray]:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return [normalize(c) for c in books] if metric == "cosine" else books


def residual_nearest(z, codebooks, metric: str = "l2", mask=None, levels=None):
    """``(indices int64 [..., L], z_q [..., D], distances [..., L])`` of the residual loop, float64.

    ``distances[..., l]`` is the direct-form ``|x_l - C_l'[i_l]|^2`` (``2 - 2 cos`` for cosine)."""
    books = _books(codebooks)
    codes = _metric(metric, books)
    x, lead = _rows(z, books[0].shape[1])
    n, n_levels = x.shape[0], len(books)
    ran = _ran(mask, levels, lead, n, n_levels)
    alive = np.ones(n, bool) if mask is None else np.asarray(mask, bool).reshape(-1).copy()
    r = np.where(alive[:, None], x, 0.0)  # masked vectors: whatever they hold
    fail = np.zeros(n)
    idx = np.full((n, n_levels), -1, dtype=np.int64)
    dist = np.zeros((n, n_levels))
    z_q = np.zeros_like(r)
    for l, c in enumerate(codes):
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf vectors fail on purpose
            xl = normalize(r) if metric == "cosine" else r
            d = squared_distances(xl, c) if n else np.zeros((0, c.shape[0]))
        d_ok = np.where(np.isfinite(d), d, np.inf)
        best = np.argmin(d_ok, axis=1) if n else np.zeros(0, np.int64)
        found = np.isfinite(d_ok[np.arange(n), best]) if n else np.zeros(0, bool)
        nan = np.isnan(xl).any(1) | np.isnan(c).any(1).all()
        on = alive & ran[:, l]
        ok = on & found
        fail = np.where(on & ~ok, np.where(nan, np.nan, np.inf), fail)
        alive &= ok | ~on
        idx[:, l] = np.where(ok, best, -1)
        dist[:, l] = np.where(ok, d[np.arange(n), best] if n else 0.0, np.where(ran[:, l], fail, 0.0))
        q = np.where(ok[:, None], c[np.where(ok, best, 0)], 0.0)
        r, z_q = r - q, z_q + q
    return idx.reshape(*lead, n_levels), z_q.reshape(*lead, x.shape[1]), dist.reshape(*lead, n_levels)


def residual_inputs(z, codebooks, indices, metric: str = "l2"):
    """``(x [L, N, D], q [L, N, D], r [L, N, D])``: each level's input, code (0 for index -1) and residual
    for the given ``indices [..., L]``, rows flattened."""
    books = _books(codebooks)
    codes = _metric(metric, books)
    r, _ = _rows(z, books[0].shape[1])
    idx = _indices(indices, r.shape[0], len(books))
    xs, qs, rs = [], [], []
    for l, c in enumerate(codes):
        i = idx[:, l]
        q = np.where((i >= 0)[:, None], c[np.maximum(i, 0)], 0.0)
        xs.append(normalize(r) if metric == "cosine" else r)
        qs.append(q)
        rs.append(r)
        r = r - q
    return np.stack(xs), np.stack(qs), np.stack(rs)


def normalize_vjp(a, g, eps: float = _EPS) -> np.ndarray:
    """``J^T g`` for ``normalize(a) = a / max(|a|, eps)`` along the last dim: ``(g - u (u.g)) / |a|``
    with ``u = a / |a|``, or ``g / eps`` where ``|a| < eps``."""
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    u = normalize(a, eps)
    proj = np.where(norm > eps, np.sum(u * g, -1, keepdims=True), 0.0)
    return (g - u * proj) / np.maximum(norm, eps)


def residual_quantize_grad(z, codebooks, indices, grad_z_q, w, v, metric: str = "l2", output_grad: str = "first",
                           rotation_trick: bool = False, mask=None, levels=None):
    """``(dz [..., D], [dC_l [K_l, D]])``: the gradients above, for given ``indices [..., L]``, ``grad_z_q
    [..., D]`` and per-level weights ``w, v [..., L]`` (the gradients reaching each vector's commitment
    and codebook distance). Levels that did not run for a vector (``mask``, ``levels``) contribute
    nothing; an index of -1 has code 0 and adds no codebook gradient."""
    if output_grad not in OUTPUT_GRADS:
        raise ValueError(f"output_grad must be one of {OUTPUT_GRADS}, got {output_grad!r}")
    books = _books(codebooks)
    z64, lead = _rows(z, books[0].shape[1])
    n, n_levels = z64.shape[0], len(books)
    ran = _ran(mask, levels, lead, n, n_levels)
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    idx = np.where(ran, _indices(indices, n, n_levels), -1)
    x, q, r = residual_inputs(np.where(keep[:, None], z64, 0.0), books, idx, metric)
    g = np.asarray(grad_z_q, np.float64).reshape(n, -1)
    w = np.broadcast_to(np.asarray(w, np.float64), lead + (n_levels,)).reshape(n, n_levels)
    v = np.broadcast_to(np.asarray(v, np.float64), lead + (n_levels,)).reshape(n, n_levels)
    dz = np.zeros_like(z64)
    grads = []
    for l, c in enumerate(books):
        act = ran[:, l][:, None]
        h = np.where(act, 2.0 * w[:, l, None] * (x[l] - q[l]), 0.0)
        if output_grad == "every" or l == 0:
            t = rotation_trick_grad(x[l], q[l], g) if rotation_trick else g
            h = h + np.where(act, t, 0.0)
        dz += normalize_vjp(r[l], h) if metric == "cosine" else h
        i = idx[:, l]
        rows = np.where((i >= 0)[:, None], 2.0 * v[:, l, None] * (q[l] - x[l]), 0.0)
        dc = np.zeros_like(c)
        np.add.at(dc, np.maximum(i, 0), rows)
        grads.append(normalize_vjp(c, dc) if metric == "cosine" else dc)
    return dz.reshape(*lead, dz.shape[-1]), grads


def residual_code_stats(z, codebooks, indices, metric: str = "l2"):
    """``([counts [K_l]], [sums [K_l, D]])``: per level, how many vectors chose each code and the sum of
    their inputs x_l (index -1 skipped): every level's EMA statistics."""
    books = _books(codebooks)
    x, _, _ = residual_inputs(z, books, indices, metric)
    idx = _indices(indices, x.shape[1], len(books))
    counts, sums = [], []
    for l, c in enumerate(books):
        i = idx[:, l]
        keep = i >= 0
        counts.append(np.bincount(i[keep], minlength=c.shape[0]).astype(np.float64))
        s = np.zeros_like(c)
        np.add.at(s, i[keep], x[l][keep])
        sums.append(s)
    return counts, sums
