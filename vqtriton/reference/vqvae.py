"""NumPy float64 reference of the VQ-VAE spec (``NN.Spec.Models.VqVae``): the ground truth.

One function per spec definition, same names in snake case, same argument order:

    encode(model, x)                      z_e = encoder(x)
    quantized(model, idx)                 z_q = codebook[idx]       (theorem: exactly the lookup)
    forward(model, x, idx)                decoder(quantized(model, idx)); x unused
    reconstruction_loss(model, x, idx)    ||dec(z_q) - x||^2
    codebook_loss(model, x, idx)          ||z_q - z_e||^2           (gradient to the codebook only)
    commitment_loss(model, x, idx)        ||z_e - z_q||^2           (gradient to the encoder only)
    loss(model, beta, x, idx)             rec + codebook + beta * commitment

Losses are sums of squares. ``idx`` is a scalar (one latent vector, the spec's case) or an integer
array (a batch of latents ``[..., D]``; the norms then sum over every vector).

Beyond the spec: ``nearest_code`` (the assignment the spec leaves to run time; lowest index wins
ties), ``squared_distances`` (direct form, the distance of the precision contract) and the analytic
gradients of each term under the VQ-VAE stop-gradients (``sg``):

    codebook term    d/d z_e = 0,                d/d codebook = scatter_idx 2 (z_q - z_e)
    commitment term  d/d z_e = 2 (z_e - z_q),    d/d codebook = 0
    reconstruction   d/d decoder output = 2 (dec(z_q) - x)
    straight-through the quantizer's output z_e + sg[z_q - z_e] passes its gradient to z_e unchanged
    rotation trick   ... or rotated and scaled: lam R^T g (Fifty et al., ICLR 2025), ``rotation_trick_grad``

This module imports NumPy only (not torch, triton, nor the rest of vqtriton), as does every module of
the ``vqtriton.reference`` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "Model",
    "encode",
    "quantized",
    "forward",
    "reconstruction_loss",
    "codebook_loss",
    "commitment_loss",
    "loss",
    "squared_distances",
    "nearest_code",
    "normalize",
    "reconstruction_loss_grad",
    "codebook_loss_grad",
    "commitment_loss_grad",
    "loss_grad",
    "straight_through_grad",
    "rotation_matrix",
    "rotation_trick_grad",
]

# Rows of z per chunk in squared_distances: bounds memory at _CHUNK * K * D float64 values.
_CHUNK_ELEMS = 1 << 22


@dataclass
class Model:
    """``Model(encoder, codebook, decoder)``: encoder obs -> latent, codebook ``[K, D]``, decoder latent -> obs."""

    encoder: Callable[[np.ndarray], np.ndarray]
    codebook: np.ndarray
    decoder: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self) -> None:
        self.codebook = np.asarray(self.codebook, dtype=np.float64)
        if self.codebook.ndim != 2:
            raise ValueError(f"codebook must be [K, D], got shape {self.codebook.shape}")

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _check_idx(model: Model, idx) -> np.ndarray:
    idx = np.asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"idx must be integer (Fin numCodes), got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= model.num_codes):
        raise IndexError(f"idx must lie in [0, {model.num_codes}), got range [{idx.min()}, {idx.max()}]")
    return idx


def _sq_norm(a: np.ndarray) -> float:
    return float(np.sum(np.square(a)))


# --- the spec ---------------------------------------------------------------------------------


def encode(model: Model, x) -> np.ndarray:
    """Pre-quantized latent ``z_e(x)``."""
    return _f64(model.encoder(_f64(x)))


def quantized(model: Model, idx) -> np.ndarray:
    """Quantized latent ``z_q`` for an explicit code index: exactly ``codebook[idx]``."""
    return model.codebook[_check_idx(model, idx)]


def forward(model: Model, x, idx) -> np.ndarray:
    """Reconstruction from an explicit code assignment; ``x`` is unused, as in the spec."""
    del x
    return _f64(model.decoder(quantized(model, idx)))


def reconstruction_loss(model: Model, x, idx) -> float:
    """``||dec(z_q) - x||^2``."""
    return _sq_norm(forward(model, x, idx) - _f64(x))


def codebook_loss(model: Model, x, idx) -> float:
    """``||z_q - z_e||^2`` (at spec level symmetric; its gradient trains only the codebook)."""
    return _sq_norm(quantized(model, idx) - encode(model, x))


def commitment_loss(model: Model, x, idx) -> float:
    """``||z_e - z_q||^2`` (its gradient trains only the encoder)."""
    return _sq_norm(encode(model, x) - quantized(model, idx))


def loss(model: Model, beta, x, idx) -> float:
    """VQ-VAE objective: ``reconstruction + codebook + beta * commitment``."""
    return (
        reconstruction_loss(model, x, idx)
        + codebook_loss(model, x, idx)
        + float(beta) * commitment_loss(model, x, idx)
    )


# --- assignment ---------------------------------------------------------------------------------


def normalize(a, eps: float = 1e-12) -> np.ndarray:
    """``a / max(||a||, eps)`` along the last dim (the cosine metric's vectors)."""
    a = _f64(a)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)


def squared_distances(z, codebook, metric: str = "l2") -> np.ndarray:
    """``d[..., k] = sum_j (z[..., j] - codebook[k, j])^2`` in the direct form, float64.

    This materialises ``[..., K]``: it is the reference, for test-sized inputs. ``metric="cosine"``
    measures the same distance between l2-normalised vectors (``2 - 2 cos``).
    """
    z, codebook = _f64(z), _f64(codebook)
    if metric == "cosine":
        z, codebook = normalize(z), normalize(codebook)
    elif metric != "l2":
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if codebook.ndim != 2 or z.shape[-1:] != codebook.shape[-1:]:
        raise ValueError(f"z [..., D] and codebook [K, D] must share D, got {z.shape} and {codebook.shape}")
    k, d = codebook.shape
    flat = z.reshape(-1, d)
    out = np.empty((flat.shape[0], k))
    step = max(1, _CHUNK_ELEMS // max(1, k * d))
    for s in range(0, flat.shape[0], step):
        out[s : s + step] = np.square(flat[s : s + step, None, :] - codebook[None, :, :]).sum(-1)
    return out.reshape(z.shape[:-1] + (k,))


def nearest_code(z, codebook, metric: str = "l2") -> np.ndarray:
    """Index of the nearest code for every vector of ``z [..., D]``; the lowest index wins ties."""
    return np.argmin(squared_distances(z, codebook, metric), axis=-1).astype(np.int64)


# --- analytic gradients (stop-gradients of the VQ-VAE objective) --------------------------------


def _scatter(idx: np.ndarray, rows: np.ndarray, num_codes: int) -> np.ndarray:
    out = np.zeros((num_codes, rows.shape[-1]))
    np.add.at(out, idx.reshape(-1), rows.reshape(-1, rows.shape[-1]))
    return out


def reconstruction_loss_grad(model: Model, x, idx) -> np.ndarray:
    """Gradient of the reconstruction term with respect to the decoder output: ``2 (dec(z_q) - x)``."""
    return 2.0 * (forward(model, x, idx) - _f64(x))


def codebook_loss_grad(model: Model, x, idx) -> tuple[np.ndarray, np.ndarray]:
    """``(d/d z_e, d/d codebook)`` of the codebook term: ``(0, scatter_idx 2 (z_q - z_e))``."""
    idx = _check_idx(model, idx)
    z_e = encode(model, x)
    diff = quantized(model, idx) - z_e
    return np.zeros_like(z_e), _scatter(idx, 2.0 * diff, model.num_codes)


def commitment_loss_grad(model: Model, x, idx) -> tuple[np.ndarray, np.ndarray]:
    """``(d/d z_e, d/d codebook)`` of the commitment term: ``(2 (z_e - z_q), 0)``."""
    z_e = encode(model, x)
    return 2.0 * (z_e - quantized(model, idx)), np.zeros_like(model.codebook)


def straight_through_grad(grad_z_q) -> np.ndarray:
    """Gradient reaching ``z_e`` through the quantizer's output ``z_e + sg[z_q - z_e]``: unchanged."""
    return _f64(grad_z_q)


def rotation_matrix(z_e, z_q, eps: float = 1e-6) -> np.ndarray:
    """The rotation trick's ``[..., D, D]`` matrices ``R = I - 2 w w^T + 2 q u^T`` with ``u = z_e / |z_e|``,
    ``q = z_q / |z_q|``, ``w = (u + q) / |u + q|`` (Fifty et al., "Restructuring Vector Quantization
    with the Rotation Trick", ICLR 2025, section 4.2): the rotation in the plane of u and q taking u to
    q. Norms are clamped at ``eps`` (vector-quantize-pytorch's safe division)."""
    z_e, z_q = _f64(z_e), _f64(z_q)

    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)

    u, q = unit(z_e), unit(z_q)
    w = unit(u + q)
    eye = np.eye(z_e.shape[-1])
    return eye - 2.0 * w[..., :, None] * w[..., None, :] + 2.0 * q[..., :, None] * u[..., None, :]


def rotation_trick_grad(z_e, z_q, grad_z_q, eps: float = 1e-6) -> np.ndarray:
    """Gradient reaching ``z_e`` through the rotation trick's output ``sg[lam R] z_e`` (value ``z_q``,
    ``lam = |z_q| / |z_e|``): ``lam R^T grad_z_q``, with the explicit matrices of ``rotation_matrix``."""
    z_e, z_q = _f64(z_e), _f64(z_q)
    lam = np.linalg.norm(z_q, axis=-1) / np.maximum(np.linalg.norm(z_e, axis=-1), eps)
    r = rotation_matrix(z_e, z_q, eps)
    return lam[..., None] * np.einsum("...ij,...i->...j", r, _f64(grad_z_q))


def loss_grad(model: Model, beta, x, idx, grad_decoder_input) -> tuple[np.ndarray, np.ndarray]:
    """``(d/d z_e, d/d codebook)`` of the whole objective under straight-through training.

    ``grad_decoder_input`` is the reconstruction term's gradient with respect to the decoder's input
    ``z_q`` (the decoder's Jacobian applied to ``reconstruction_loss_grad``); the straight-through
    estimator hands it to ``z_e``, and it never reaches the codebook.
    """
    dz_cb, dc_cb = codebook_loss_grad(model, x, idx)
    dz_cm, dc_cm = commitment_loss_grad(model, x, idx)
    dz = straight_through_grad(grad_decoder_input) + dz_cb + float(beta) * dz_cm
    return dz, dc_cb + float(beta) * dc_cm
