"""NumPy float64 reference of lookup-free quantization (LFQ; Yu et al., "Language Model Beats Diffusion:
Tokenizer is Key to Visual Generation", MAGVIT-v2, ICLR 2024) and its losses: what ``vqtriton.LFQ`` and
the entropy ops of :mod:`vqtriton.entropy` are tested against.

A vector ``x [d]`` (after the optional soft clamp ``v tanh(x / v)``, rotation ``x R`` and, ``spherical``
(binary spherical quantization, Zhao et al. 2024), ``s x / |x|``) is quantized channel by channel to its
sign: bit ``b_i = [x_i > 0]``, code ``c_i = m (2 b_i - 1)``, with ``m = s`` (the code scale), or
``s / sqrt(d)`` when spherical. The index is the bits read as a binary number, **first channel most
significant**: ``index = sum_i b_i 2^(d - 1 - i)``. The output is ``c`` with a straight-through gradient.

The entropy terms treat the ``2^d`` codes as a softmax over ``2 tau <x, c>`` (``tau`` the inverse
temperature), so that ``p(c | x)`` is the code distribution of one vector:

    per-sample entropy   mean_n H(p(. | x_n))            (low: confident bits)
    batch entropy        H(mean_n p(. | x_n))            (high: every code used)
    loss                 entropy_weight (per_sample - gamma batch) + commitment_weight mean (x - c)^2
                         (optionally softplus(per_sample - gamma batch + offset) for the first term)

with ``H(p) = -sum_c p_c log p_c``; vector-quantize-pytorch clamps inside the log,
``-sum_c p_c log max(p_c, eps)`` with ``eps = 1e-5`` (the ``eps`` arguments here; ``None``: exact).

The definitions (``lfq_code_probabilities`` and the entropies over it) build ``[N, 2^d]``: test sizes
only. The factored forms that the kernels use are here too, with the identities they rest on:
``p(c | x) = prod_i sigma(u_i)^{b_i} sigma(-u_i)^{1 - b_i}`` with the bit logits ``u = 4 tau m x`` (a
product of independent bits), hence

- ``H(p(. | x)) = sum_i h(sigma(u_i))``, ``h`` the binary entropy (:func:`lfq_bit_entropy`);
- with the bits split in halves (the first ``d // 2`` channels the high bits of the index),
  ``p(a, b | x) = A[a] B[b]``, and ``mean_n p = A^T B / N`` (:func:`lfq_batch_distribution`);
- with the clamp, ``-sum_c p_c log max(p_c, eps) = E_p[min(L, lambda)]``, ``L = -log p(c | x) = L_A + L_B``,
  ``lambda = -log eps``: not a sum over bits, but a sum over the ``2^(d/2) x 2^(d/2)`` grid of the two
  halves (:func:`lfq_clamped_sample_entropy`).

Imports NumPy only.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "lfq_code_magnitude",
    "lfq_transform",
    "lfq_quantize",
    "lfq_bits_from_index",
    "lfq_codes_from_index",
    "lfq_codebook",
    "lfq_bit_logits",
    "lfq_code_probabilities",
    "distribution_entropy",
    "lfq_per_sample_entropy",
    "lfq_batch_entropy",
    "lfq_commitment",
    "lfq_loss",
    "lfq_per_sample_entropy_grad",
    "lfq_batch_entropy_grad",
    "lfq_commitment_grad",
    "lfq_bit_entropy",
    "lfq_bit_entropy_grad",
    "lfq_half_distributions",
    "lfq_batch_distribution",
    "lfq_batch_distribution_grad",
    "lfq_clamped_sample_entropy",
    "lfq_clamped_sample_entropy_grad",
]


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _softplus(t: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, t)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return np.exp(-_softplus(-t))


def _weights(weight, n: int) -> np.ndarray:
    """Row weights ``[n]`` normalised to sum 1 (``None``: uniform; all zero stays all zero)."""
    w = np.ones(n) if weight is None else _f64(weight).reshape(-1)
    if w.shape != (n,) or (w < 0).any():
        raise ValueError(f"weight must be [N] = [{n}] and non-negative, got shape {np.shape(weight)}")
    total = w.sum()
    return w / total if total > 0 else w


# --- quantization ------------------------------------------------------------------------------


def lfq_code_magnitude(d: int, scale: float = 1.0, spherical: bool = False) -> float:
    """``|c_i|``: the code scale, or ``scale / sqrt(d)`` for spherical codes (unit length times scale)."""
    return float(scale) / np.sqrt(d) if spherical else float(scale)


def lfq_transform(x, *, scale: float = 1.0, spherical: bool = False, soft_clamp: float | None = None,
                  rotation=None) -> np.ndarray:
    """What LFQ quantizes: ``x`` soft-clamped (``v tanh(x / v)``), rotated (``x @ rotation``), and for
    spherical codes scaled to length ``scale`` (``x / max(|x|, 1e-12)``)."""
    x = _f64(x)
    if soft_clamp is not None:
        x = np.tanh(x / soft_clamp) * soft_clamp
    if rotation is not None:
        x = x @ _f64(rotation)
    if spherical:
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * scale
    return x


def lfq_quantize(x, *, scale: float = 1.0, spherical: bool = False):
    """``(codes [..., d], indices int64 [...])`` of transformed vectors ``x [..., d]``: signs (``x_i = 0``
    is bit 0), the index with the first channel most significant."""
    x = _f64(x)
    d = x.shape[-1]
    bits = x > 0
    codes = np.where(bits, 1.0, -1.0) * lfq_code_magnitude(d, scale, spherical)
    return codes, (bits.astype(np.int64) << np.arange(d - 1, -1, -1)).sum(-1)


def lfq_bits_from_index(indices, d: int) -> np.ndarray:
    """The bits ``[..., d]`` (0/1, int64) of indices ``[...]`` in ``[0, 2^d)``, first channel most significant."""
    return (np.asarray(indices, dtype=np.int64)[..., None] >> np.arange(d - 1, -1, -1)) & 1


def lfq_codes_from_index(indices, d: int, *, scale: float = 1.0, spherical: bool = False) -> np.ndarray:
    return (2.0 * lfq_bits_from_index(indices, d) - 1.0) * lfq_code_magnitude(d, scale, spherical)


def lfq_codebook(d: int, *, scale: float = 1.0, spherical: bool = False) -> np.ndarray:
    """All ``2^d`` codes in index order: ``[2^d, d]``."""
    return lfq_codes_from_index(np.arange(2**d), d, scale=scale, spherical=spherical)


# --- the entropy terms, by definition (the full softmax over 2^d codes) --------------------------


def lfq_bit_logits(x, inv_temperature: float, magnitude: float) -> np.ndarray:
    """``u = 4 tau m x``: ``p(b_i = 1 | x) = sigma(u_i)`` under the softmax over ``2 tau <x, c>``."""
    return 4.0 * inv_temperature * magnitude * _f64(x)


def _log_probs(x, inv_temperature: float, magnitude: float) -> np.ndarray:
    """``log p(c | x)`` ``[N, 2^d]`` by a log-softmax of ``2 tau <x, c>`` over the explicit codebook."""
    x = _f64(x)
    x = x.reshape(-1, x.shape[-1])
    logits = 2.0 * inv_temperature * x @ lfq_codebook(x.shape[-1]).T * magnitude
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def lfq_code_probabilities(x, inv_temperature: float, magnitude: float) -> np.ndarray:
    """``p(c | x_n)``: ``[N, 2^d]`` for rows ``x [..., d]``, codes in index order."""
    return np.exp(_log_probs(x, inv_temperature, magnitude))


def _log_clamped(logp: np.ndarray, eps: float | None) -> np.ndarray:
    return logp if eps is None else np.maximum(logp, np.log(eps))


def _entropy_from_log(p: np.ndarray, logp: np.ndarray, eps: float | None):
    """``(H, dH/dp)`` along the last axis from probabilities and their logs."""
    value = -(p * _log_clamped(logp, eps)).sum(-1)
    grad = -_log_clamped(logp, eps) - (1.0 if eps is None else (logp >= np.log(eps)).astype(np.float64))
    return value, grad


def distribution_entropy(p, eps: float | None = None) -> np.ndarray:
    """``-sum p log p`` (``0 log 0 = 0``), or ``-sum p log max(p, eps)``, along the last axis."""
    p = _f64(p)
    logp = np.log(np.maximum(p, np.finfo(np.float64).tiny))
    return -(np.where(p > 0, p, 0.0) * _log_clamped(logp, eps)).sum(-1)


def lfq_per_sample_entropy(x, inv_temperature: float, magnitude: float, eps: float | None = None,
                           weight=None) -> float:
    """``sum_n w_n H(p(. | x_n))`` (``w``: the row weights normalised, uniform by default)."""
    logp = _log_probs(x, inv_temperature, magnitude)
    w = _weights(weight, logp.shape[0])
    return float(w @ _entropy_from_log(np.exp(logp), logp, eps)[0])


def lfq_batch_entropy(x, inv_temperature: float, magnitude: float, eps: float | None = None,
                      weight=None) -> float:
    """``H(sum_n w_n p(. | x_n))``."""
    p = lfq_code_probabilities(x, inv_temperature, magnitude)
    return float(distribution_entropy(_weights(weight, p.shape[0]) @ p, eps))


def lfq_commitment(x, codes, weight=None) -> float:
    """``mean (x - c)^2`` over the elements of the rows with non-zero weight (0 when there is none)."""
    x, codes = _f64(x), _f64(codes)
    x, codes = x.reshape(-1, x.shape[-1]), codes.reshape(-1, x.shape[-1])
    keep = np.ones(x.shape[0], bool) if weight is None else _f64(weight).reshape(-1) > 0
    count = keep.sum() * x.shape[1]
    return float(np.square(x - codes)[keep].sum() / count) if count else 0.0


def lfq_loss(per_sample: float, batch: float, commitment: float, *, entropy_weight: float = 0.1,
             diversity_gamma: float = 1.0, commitment_weight: float = 0.0,
             softplus_offset: float | None = None) -> float:
    """The LFQ loss from its three terms (``softplus_offset``: the entropy term through ``softplus(. + offset)``)."""
    aux = per_sample - diversity_gamma * batch
    if softplus_offset is not None:
        aux = float(_softplus(np.float64(aux + softplus_offset)))
    return entropy_weight * aux + commitment_weight * commitment


# --- analytic gradients, by definition ---------------------------------------------------------


def _grad_x_from_logits(dlogits: np.ndarray, d: int, inv_temperature: float, magnitude: float) -> np.ndarray:
    return dlogits @ lfq_codebook(d) * (2.0 * inv_temperature * magnitude)


def lfq_per_sample_entropy_grad(x, inv_temperature: float, magnitude: float, eps: float | None = None,
                                weight=None) -> np.ndarray:
    """``d/dx`` of :func:`lfq_per_sample_entropy`: ``[N, d]``, through the softmax
    (``dH/dlogit = p (g - <p, g>)``, ``g = dH/dp``)."""
    x = _f64(x)
    logp = _log_probs(x, inv_temperature, magnitude)
    p = np.exp(logp)
    w = _weights(weight, p.shape[0])
    g = _entropy_from_log(p, logp, eps)[1] * w[:, None]
    dlogits = p * (g - (p * g).sum(-1, keepdims=True))
    return _grad_x_from_logits(dlogits, x.shape[-1], inv_temperature, magnitude).reshape(x.shape)


def lfq_batch_entropy_grad(x, inv_temperature: float, magnitude: float, eps: float | None = None,
                           weight=None) -> np.ndarray:
    """``d/dx`` of :func:`lfq_batch_entropy`: ``[N, d]``."""
    x = _f64(x)
    logp = _log_probs(x, inv_temperature, magnitude)
    p = np.exp(logp)
    w = _weights(weight, p.shape[0])
    mean = w @ p
    _, g = _entropy_from_log(mean, np.log(np.maximum(mean, np.finfo(np.float64).tiny)), eps)
    gw = w[:, None] * g[None, :]
    dlogits = p * (gw - (p * gw).sum(-1, keepdims=True))
    return _grad_x_from_logits(dlogits, x.shape[-1], inv_temperature, magnitude).reshape(x.shape)


def lfq_commitment_grad(x, codes, weight=None) -> np.ndarray:
    """``d/dx`` of :func:`lfq_commitment` (the codes held fixed)."""
    x, codes = _f64(x), _f64(codes)
    flat = x.reshape(-1, x.shape[-1])
    keep = np.ones(flat.shape[0], bool) if weight is None else _f64(weight).reshape(-1) > 0
    count = keep.sum() * flat.shape[1]
    grad = 2.0 * (flat - codes.reshape(flat.shape)) * keep[:, None] / max(count, 1)
    return grad.reshape(x.shape)


# --- the factored forms --------------------------------------------------------------------------


def lfq_bit_entropy(u) -> np.ndarray:
    """``sum_i h(sigma(u_i))`` per row of bit logits ``u [..., d]``: ``H(p(. | x))`` without the clamp."""
    u = _f64(u)
    return (_sigmoid(u) * _softplus(-u) + _sigmoid(-u) * _softplus(u)).sum(-1)


def lfq_bit_entropy_grad(u) -> np.ndarray:
    """``d/du_i`` of :func:`lfq_bit_entropy`: ``-u_i sigma(u_i) sigma(-u_i)``."""
    u = _f64(u)
    return -u * _sigmoid(u) * _sigmoid(-u)


def _half_bits(k: int) -> np.ndarray:
    """``[2^k, k]`` 0/1: the bits of each half-index, its first channel most significant."""
    return lfq_bits_from_index(np.arange(2**k), k).astype(np.float64)


def lfq_half_distributions(u, split: int | None = None):
    """``(A [N, 2^s], B [N, 2^(d - s)])``: the distributions of the first ``s = split`` (default ``d // 2``)
    bits and of the rest, for bit logits ``u [N, d]``; ``p(c | x_n) = A[n, c >> (d - s)] B[n, c mod 2^(d - s)]``."""
    u = _f64(u)
    s = u.shape[-1] // 2 if split is None else split

    return np.exp(-_half_surprisal(u[:, :s])), np.exp(-_half_surprisal(u[:, s:]))


def _half_surprisal(v: np.ndarray) -> np.ndarray:
    """``-log`` of each half-code's probability ``[N, 2^k]`` for the logits ``v [N, k]`` of its bits: a sum
    of ``softplus(-+v_i)`` (each >= 0: no cancellation)."""
    bits = _half_bits(v.shape[-1])
    return _softplus(-v) @ bits.T + _softplus(v) @ (1.0 - bits).T


def lfq_batch_distribution(u, weight=None, split: int | None = None) -> np.ndarray:
    """``sum_n w_n p(. | x_n)`` ``[2^d]`` from bit logits ``u [N, d]``, as ``(w A)^T B`` flattened."""
    a, b = lfq_half_distributions(u, split)
    return ((_weights(weight, a.shape[0])[:, None] * a).T @ b).reshape(-1)


def lfq_batch_distribution_grad(u, g, weight=None, split: int | None = None) -> np.ndarray:
    """``d/du`` ``[N, d]`` of ``<g, lfq_batch_distribution(u)>`` for a gradient ``g [2^d]``: the two GEMMs
    ``dA = B G^T``, ``dB = (w A) G``, then ``du_i = sum_a dA A (b_i(a) - sigma(u_i))`` per half."""
    u = _f64(u)
    s = u.shape[-1] // 2 if split is None else split
    a, b = lfq_half_distributions(u, s)
    w = _weights(weight, a.shape[0])[:, None]
    gm = _f64(g).reshape(a.shape[1], b.shape[1])
    da, db = w * (b @ gm.T), (w * a) @ gm

    def half(v, p, dp):
        wp = p * dp
        return wp @ _half_bits(v.shape[-1]) - _sigmoid(v) * wp.sum(-1, keepdims=True)

    return np.concatenate([half(u[:, :s], a, da), half(u[:, s:], b, db)], -1)


def _grid(u_row: np.ndarray, split: int):
    """One row's ``(p, L)`` on the ``[2^s, 2^(d - s)]`` grid of half-codes (``L = -log p = L_A + L_B``)."""
    la, lb = _half_surprisal(u_row[None, :split])[0], _half_surprisal(u_row[None, split:])[0]
    big_l = la[:, None] + lb[None, :]
    return np.exp(-big_l), big_l


def lfq_clamped_sample_entropy(u, eps: float, split: int | None = None) -> np.ndarray:
    """``-sum_c p_c log max(p_c, eps) = E_p[min(L, -log eps)]`` per row of bit logits ``u [N, d]``, summed
    over the grid of the two halves (``O(2^d)`` per row, no ``[N, 2^d]`` at once)."""
    u = _f64(u)
    s = u.shape[-1] // 2 if split is None else split
    lam = -np.log(eps)
    out = np.empty(u.shape[0])
    for n in range(u.shape[0]):
        p, big_l = _grid(u[n], s)
        out[n] = (p * np.minimum(big_l, lam)).sum()
    return out


def lfq_clamped_sample_entropy_grad(u, eps: float, split: int | None = None) -> np.ndarray:
    """``d/du`` ``[N, d]`` of :func:`lfq_clamped_sample_entropy` (each row's own value):
    ``E_p[(b_i - sigma(u_i)) (min(L, lambda) - [L < lambda])]``."""
    u = _f64(u)
    d = u.shape[-1]
    s = d // 2 if split is None else split
    lam = -np.log(eps)
    bits = lfq_bits_from_index(np.arange(2**d), d).astype(np.float64)
    out = np.empty_like(u)
    for n in range(u.shape[0]):
        p, big_l = _grid(u[n], s)
        g = (np.minimum(big_l, lam) - (big_l < lam)).reshape(-1) * p.reshape(-1)
        out[n] = g @ bits - _sigmoid(u[n]) * g.sum()
    return out
