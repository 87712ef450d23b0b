"""NumPy float64 reference of finite scalar quantization (FSQ; Mentzer et al., "Finite Scalar
Quantization: VQ-VAE Made Simple", ICLR 2024), the definitions ``vqtriton.FSQ`` is tested against.

Each of the ``d`` channels of a vector has its own number of levels ``L_i >= 2`` and is quantized on
its own: a bound maps ``z_i`` into a range of ``L_i`` integers, rounding (straight-through) picks the
level ``k_i in {0, ..., L_i - 1}``, and the code is ``k_i`` mapped back into ``[-1, 1]``:

    standard (the paper's)   b = tanh(z + s) h - o,  h = (L - 1)(1 + eps) / 2,  o = 1/2 for even L else 0,
                             s = atanh(o / h);  k = round(b) + floor(L / 2);  code = (k - floor(L/2)) / floor(L/2)
    symmetric                k = floor((L - 1)(tanh(z) + 1) / 2 + 1/2);  code = 2 k / (L - 1) - 1
                             ("preserve_symmetry": Zhao et al. 2024, arXiv 2411.19842, section 3.2)
    hard_clamp               clamp(., -1, 1) in place of tanh (and no atanh in the shift)

The straight-through gradient ``d code / d z`` is the derivative of the bound (rounding held fixed):
``h tanh'(z + s) / floor(L/2)`` (standard), ``tanh'(z)`` (symmetric); with ``hard_clamp`` the clamp's
derivative (1 inside, 0 outside) replaces ``tanh'``. Noise dropout (symmetric only; training) replaces
a code by ``clamp(code + u, -1, 1)``, ``u`` uniform in ``[-1/2, 1/2)``, where a Bernoulli draw says so.

A vector's index is its levels in mixed radix with the **first channel most significant** (C order,
``np.ravel_multi_index``): ``index = sum_i k_i prod_{j > i} L_j``. (vector-quantize-pytorch numbers
them with the first channel least significant: ``fsq_index(..., first_most_significant=False)``.)
Imports NumPy only.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "fsq_check_levels",
    "fsq_levels",
    "fsq_codes_from_levels",
    "fsq_quantize",
    "fsq_quantize_grad",
    "fsq_index",
    "fsq_levels_from_index",
    "fsq_codes_from_index",
    "fsq_implicit_codebook",
    "fsq_noise",
    "fsq_noise_grad",
]

# The bound's slack (vector-quantize-pytorch's and the paper's eps): tanh never reaches +-h, so the
# outermost levels are reached by finite inputs.
_BOUND_EPS = 1e-3


def fsq_check_levels(levels, symmetric: bool = False) -> np.ndarray:
    """``levels`` as an int64 array ``[d]`` of integers ``>= 2`` (``2`` only with ``symmetric``: the
    standard bound maps two levels onto the codes ``{-1, 0}``)."""
    lv = np.asarray(levels)
    if lv.ndim != 1 or lv.size == 0 or not np.issubdtype(lv.dtype, np.integer):
        raise ValueError(f"levels must be a non-empty list of integers, got {levels!r}")
    if (lv < 2).any() or (not symmetric and (lv == 2).any()):
        need = ">= 2" if symmetric else ">= 3 (2 levels need symmetric=True)"
        raise ValueError(f"every level must be {need}, got {levels!r}")
    return lv.astype(np.int64)


def _bound_parts(lv: np.ndarray, hard_clamp: bool):
    half_l = (lv - 1) * (1 + _BOUND_EPS) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    shift = offset / half_l if hard_clamp else np.arctanh(offset / half_l)
    return half_l, offset, shift


def _squash(t: np.ndarray, hard_clamp: bool) -> np.ndarray:
    return np.clip(t, -1.0, 1.0) if hard_clamp else np.tanh(t)


def _squash_grad(t: np.ndarray, hard_clamp: bool) -> np.ndarray:
    return ((t >= -1) & (t <= 1)).astype(np.float64) if hard_clamp else 1.0 - np.tanh(t) ** 2


def fsq_levels(z, levels, *, symmetric: bool = False, hard_clamp: bool = False) -> np.ndarray:
    """The level ``k`` (int64, in ``[0, L_i)``) of every element of ``z [..., d]``."""
    lv = fsq_check_levels(levels, symmetric)
    z = np.asarray(z, dtype=np.float64)
    if z.shape[-1:] != lv.shape:
        raise ValueError(f"z must be [..., {lv.size}] (one channel per level), got {z.shape}")
    if symmetric:
        return np.floor((lv - 1) * (_squash(z, hard_clamp) + 1) / 2 + 0.5).astype(np.int64)
    half_l, offset, shift = _bound_parts(lv, hard_clamp)
    bounded = _squash(z + shift, hard_clamp) * half_l - offset
    # Clamped: past L = 1000 the bound's slack passes half a level (a saturated input would leave [0, L)).
    return np.clip(np.round(bounded) + lv // 2, 0, lv - 1).astype(np.int64)


def fsq_codes_from_levels(k, levels, *, symmetric: bool = False) -> np.ndarray:
    """The codes in ``[-1, 1]`` of levels ``k [..., d]``."""
    lv = fsq_check_levels(levels, symmetric)
    k = np.asarray(k, dtype=np.float64)
    if symmetric:
        return k * (2.0 / (lv - 1)) - 1.0
    half = lv // 2
    return (k - half) / half


def fsq_quantize(z, levels, *, symmetric: bool = False, hard_clamp: bool = False):
    """``(codes [..., d], indices [...])`` of ``z [..., d]`` (index: first channel most significant)."""
    k = fsq_levels(z, levels, symmetric=symmetric, hard_clamp=hard_clamp)
    return fsq_codes_from_levels(k, levels, symmetric=symmetric), fsq_index(k, levels)


def fsq_quantize_grad(z, levels, *, symmetric: bool = False, hard_clamp: bool = False) -> np.ndarray:
    """``d code / d z`` elementwise under the straight-through estimator (the bound's derivative)."""
    lv = fsq_check_levels(levels, symmetric)
    z = np.asarray(z, dtype=np.float64)
    if symmetric:
        return _squash_grad(z, hard_clamp)
    half_l, _, shift = _bound_parts(lv, hard_clamp)
    return half_l * _squash_grad(z + shift, hard_clamp) / (lv // 2)


def _basis(lv: np.ndarray, first_most_significant: bool) -> np.ndarray:
    if first_most_significant:
        return np.concatenate([np.cumprod(lv[::-1])[::-1][1:], [1]]).astype(np.int64)
    return np.concatenate([[1], np.cumprod(lv)[:-1]]).astype(np.int64)


def fsq_index(k, levels, *, first_most_significant: bool = True) -> np.ndarray:
    """The mixed-radix index (int64 ``[...]``) of levels ``k [..., d]``."""
    lv = np.asarray(levels, dtype=np.int64)
    return (np.asarray(k, dtype=np.int64) * _basis(lv, first_most_significant)).sum(-1)


def fsq_levels_from_index(indices, levels, *, first_most_significant: bool = True) -> np.ndarray:
    """The levels ``[..., d]`` of indices ``[...]`` in ``[0, prod L)``: the inverse of :func:`fsq_index`."""
    lv = np.asarray(levels, dtype=np.int64)
    idx = np.asarray(indices, dtype=np.int64)
    return (idx[..., None] // _basis(lv, first_most_significant)) % lv


def fsq_codes_from_index(indices, levels, *, symmetric: bool = False, first_most_significant: bool = True):
    """The codes ``[..., d]`` of indices ``[...]``."""
    k = fsq_levels_from_index(indices, levels, first_most_significant=first_most_significant)
    return fsq_codes_from_levels(k, levels, symmetric=symmetric)


def fsq_implicit_codebook(levels, *, symmetric: bool = False) -> np.ndarray:
    """Every code, in index order: ``[prod L, d]``."""
    lv = np.asarray(levels, dtype=np.int64)
    return fsq_codes_from_index(np.arange(int(np.prod(lv))), lv, symmetric=symmetric)


def fsq_noise(codes, drop, offset) -> np.ndarray:
    """Noise dropout with explicit draws: ``clamp(code + offset, -1, 1)`` where ``drop``, else the code
    (``offset`` uniform in ``[-1/2, 1/2)``, ``drop`` Bernoulli(p), both of the codes' shape)."""
    codes = np.asarray(codes, dtype=np.float64)
    return np.where(drop, np.clip(codes + np.asarray(offset, dtype=np.float64), -1.0, 1.0), codes)


def fsq_noise_grad(codes, drop, offset) -> np.ndarray:
    """``d out / d code`` of :func:`fsq_noise`: 0 where a noisy value was clamped, else 1."""
    noisy = np.asarray(codes, dtype=np.float64) + np.asarray(offset, dtype=np.float64)
    inside = (noisy >= -1) & (noisy <= 1)
    return np.where(drop, inside, True).astype(np.float64)
