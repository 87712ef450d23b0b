"""NumPy float64 reference of top-k and sampled assignment, and of the sampling noise's generator.

    nearest_codes(z, codebook, k, metric)                 the k nearest codes, nearest first (lowest
                                                          index among equal distances)
    gumbel_probabilities(z, codebook, temperature, metric)  the distribution a Gumbel-max draw follows:
                                                          vector-quantize-pytorch's softmax(logits / T)
    philox4x32(key, counter)                              Philox4x32-10 (Salmon et al., SC 2011), the
                                                          counter-based generator of the sampling noise
    gumbel_noise(seed, rows, codes)                       the noise g[row, code] = -log E the kernels use

The logits are vqp's: ``-sqrt(max(d, 1e-8))`` with d the squared L2 distance (its ``-cdist``), or the
cosine similarity of the l2-normalised vectors. This module imports NumPy only, as does every module
of the ``vqtriton.reference`` package.
"""

from __future__ import annotations

import numpy as np

from .vqvae import normalize, squared_distances

__all__ = ["nearest_codes", "sampling_logits", "gumbel_probabilities", "philox4x32", "gumbel_noise"]

# Philox4x32's round multipliers and its key's increments (Weyl constants).
_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_M32 = np.uint64(0xFFFFFFFF)
# Clamp of vqp's cdist before its square root.
CDIST_EPS = 1e-8


def nearest_codes(z, codebook, k: int, metric: str = "l2") -> np.ndarray:
    """Indices ``[..., k]`` (int64) of the k nearest codes of every vector of ``z [..., D]`` in
    increasing float64 direct-form distance; among equal distances the lowest index comes first."""
    d = squared_distances(z, codebook, metric)
    if not 1 <= k <= d.shape[-1]:
        raise ValueError(f"k must lie in [1, K] = [1, {d.shape[-1]}], got {k}")
    return np.argsort(d, axis=-1, kind="stable")[..., :k].astype(np.int64)


def sampling_logits(z, codebook, metric: str = "l2") -> np.ndarray:
    """vqp's logits ``[..., K]``: ``-sqrt(max(d, 1e-8))`` (``"l2"``) or the cosine similarity (``"cosine"``)."""
    if metric == "cosine":
        z, codebook = normalize(z), normalize(codebook)
        if z.shape[-1:] != codebook.shape[-1:]:
            raise ValueError(f"z [..., D] and codebook [K, D] must share D, got {z.shape} and {codebook.shape}")
        return z @ codebook.T
    return -np.sqrt(np.maximum(squared_distances(z, codebook, metric), CDIST_EPS))


def gumbel_probabilities(z, codebook, temperature: float, metric: str = "l2") -> np.ndarray:
    """``[..., K]``: the probability of each code under a Gumbel-max draw, ``softmax(logits / temperature)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a = sampling_logits(z, codebook, metric) / float(temperature)
    a = np.exp(a - a.max(axis=-1, keepdims=True))
    return a / a.sum(axis=-1, keepdims=True)


def philox4x32(key, counter, rounds: int = 10) -> tuple[np.ndarray, ...]:
    """The four output words of Philox4x32 (``rounds`` rounds, 10 as Triton's ``tl.philox`` and
    Random123's philox4x32-10) for ``key = (k0, k1)`` and ``counter = (c0, c1, c2, c3)``: 32-bit values,
    NumPy integers or arrays (broadcast together), computed exactly in uint64."""
    k0, k1 = (np.asarray(x, dtype=np.uint64) & _M32 for x in key)
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) & _M32 for x in counter)
    for _ in range(rounds):
        p0, p1 = _M[0] * c0, _M[1] * c2  # exact: both factors < 2^32
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + _W[0]) & _M32, (k1 + _W[1]) & _M32
    return c0, c1, c2, c3


def gumbel_noise(seed: int, rows, codes) -> np.ndarray:
    """``[len(rows), len(codes)]`` float64: the Gumbel noise ``g = -log E`` of the sampling kernels. Its
    32 random bits r per (row, code) are Philox4x32-10's first word for key ``seed`` (its two's-complement
    64 bits as two words) and counter (code, row mod 2^32, row div 2^32, 0); ``E = -log U`` with the
    float32 uniform ``U = (r + 1/2) 2^-32``, and near U = 1 from ``V = (~r + 1/2) 2^-32`` instead
    (``E = -log(1 - V)`` for V < 1/16), so every E keeps its relative precision."""
    seed = int(seed) % 2**64
    rows = np.asarray(rows, dtype=np.int64).astype(np.uint64)[:, None]
    codes = np.asarray(codes, dtype=np.int64).astype(np.uint64)[None, :]
    r, _, _, _ = philox4x32((seed & 0xFFFFFFFF, seed >> 32), (codes, rows & _M32, rows >> np.uint64(32), 0))
    r = np.broadcast_to(r, (rows.shape[0], codes.shape[1]))
    u = ((r.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32)).astype(np.float64)
    v = (((_M32 - r).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32)).astype(np.float64)
    e = np.where(v < 0.0625, -np.log1p(-v), -np.log(u))
    return -np.log(e)
