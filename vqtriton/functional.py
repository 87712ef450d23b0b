"""The public ops: ``assign`` (and its top-k), ``sample_codes``, ``lookup``, ``squared_error``, ``quantize``,
``verify_assignment``.

Each checks its inputs (see :mod:`vqtriton.checks`), flattens leading dims to rows ``[N, D]``,
picks the backend (:mod:`vqtriton.backend`) and calls the autograd Function or launcher.
Latents are ``[..., D]``; the codebook is ``[K, D]``; indices are int64 ``[...]``, -1 meaning
"no code" (a masked vector, or one with no finite distance: a NaN/Inf in it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vqtriton import backend as _backend
from vqtriton import checks, custom_ops  # noqa: F401  (custom_ops registers torch.ops.vqtriton)
from vqtriton.eager import call as _op  # torch.ops.vqtriton.<name>, without its dispatch in eager mode
from vqtriton.backend import choose

__all__ = ["assign", "sample_codes", "lookup", "squared_error", "quantize", "verify_assignment", "QuantizeResult"]

METRICS = ("l2", "cosine")
PRECISIONS = ("exact", "tf32", "bf16")
REDUCTIONS = ("sum", "mean", "none")
# Slack of the exactness contract: d(z, c_idx) <= (1 + 2^-16) min_k d(z, c_k).
CONTRACT_RTOL = 2.0**-16


class QuantizeResult(NamedTuple):
    """What ``quantize`` returns. ``z_q`` is the straight-through output (value ``codebook[idx]``,
    gradient to ``z``); the losses are 0-dim tensors; ``loss = codebook_loss + beta * commitment_loss``."""

    z_q: torch.Tensor
    indices: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    loss: torch.Tensor


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` as ``[N, D]`` (a view when strides allow)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def deterministic_mode(flag: bool | None) -> bool:
    """``flag``, or when None whether ``torch.use_deterministic_algorithms`` is on."""
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def unit(t: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` l2-normalised along ``dim`` (eps 1e-12, as ``F.normalize``): the cosine metric's vectors.

    Returned in ``dtype`` (default: ``t``'s, at least float32). The norm is taken in float64: in
    float32 it overflows for entries past ~1e19 (a finite vector would become a zero vector and
    silently take code 0) and underflows below ~1e-19. Differentiable.
    """
    out = F.normalize(t.to(torch.float64), dim=dim, eps=1e-12)
    return out.to(dtype or torch.promote_types(t.dtype, torch.float32))


def assign(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    precision: str = "exact",
    return_distance: bool = False,
    *,
    k: int | None = None,
    backend: str | None = None,
):
    """Index of the nearest code for every vector of ``z [..., D]``: int64 ``[...]``, no gradient.

    ``precision="exact"`` returns a true nearest code (lowest index on exact ties): its float64
    direct-form distance is within ``(1 + 2^-16)`` of the minimum. ``"tf32"`` / ``"bf16"`` trade
    that guarantee for tensor-core speed on a GPU. ``metric="cosine"`` compares l2-normalised
    vectors. With ``return_distance`` also returns the squared distance to the chosen code
    (float32; ``2 - 2 cos`` for cosine). Vectors holding a NaN or Inf get index -1, distance NaN/Inf.

    ``k`` (an int in ``[1, K]``): the k nearest codes instead, nearest first, ``[..., k]`` (and distances
    ``[..., k]``). In exact mode the code at position j is within ``(1 + 2^-16)`` of the true j-th
    smallest distance, and among equal distances the lowest index comes first; a slot without a finite
    distance (fewer than k finite codes; every slot of a NaN/Inf vector) gets -1 and distance +Inf, or
    NaN where ``k=None`` would give NaN. The Triton kernel serves k <= 64; above, the PyTorch path runs
    (a forced ``backend="triton"`` raises).
    """
    checks.codebook(codebook)
    checks.latents(z, codebook)
    checks.choice("metric", metric, METRICS)
    checks.choice("precision", precision, PRECISIONS)
    top = 0 if k is None else _top_k(k, codebook.shape[0])
    # Detached inputs: nothing below records a graph (no no_grad context needed, a cost per call).
    zr, c = z.detach(), codebook.detach()
    zr = zr if zr.dim() == 2 else _rows(zr)
    if metric == "cosine":
        zr, c = unit(zr), unit(c)
    name = choose(zr, c, backend=backend)
    if top and name == "triton":
        name = _topk_backend(top, backend)
    idx, dist = _op("assign", zr, c, precision, name, top)
    shape = z.shape[:-1] + ((top,) if top else ())
    if idx.shape != shape:
        idx, dist = idx.reshape(shape), dist.reshape(shape)
    return (idx, dist) if return_distance else idx


def _top_k(k, num_codes: int) -> int:
    k = checks.integer("k", k, 1)
    if k > num_codes:
        raise ValueError(f"k must be <= K = {num_codes} (the codebook's number of codes), got k = {k}")
    return k


def _topk_backend(k: int, backend: str | None) -> str:
    """The backend of a top-k assignment the Triton backend was chosen for: the kernel serves k <= its
    MAX_K; above, the PyTorch path, unless Triton was asked for by name."""
    from vqtriton.kernels.topk import MAX_K

    if k <= MAX_K:
        return "triton"
    if _backend._requested(backend) == "triton":
        raise RuntimeError(f"backend 'triton' was requested but cannot run: the top-k kernel serves k <= {MAX_K}, "
                           f"got k = {k}")
    return "torch"


def _seed(seed, device: torch.device) -> torch.Tensor:
    """The sampling seed as a 0-dim int64 tensor on ``device``: a Python int in int64's range, or a
    0-dim integer tensor on that device (converted there: its value is never read on the host)."""
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an int or a 0-dim integer tensor, got a {seed.dtype} tensor")
        if seed.dim() != 0:
            raise ValueError(f"seed must be a 0-dim tensor, got shape {tuple(seed.shape)}")
        if seed.device != torch.device(device):
            raise ValueError(f"tensors must be on one device, got seed on {seed.device}, z on {device}")
        return seed.to(torch.int64)
    seed = checks.integer("seed", seed)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit int64, [-2^63, 2^63), got {seed}")
    return torch.full((), seed, dtype=torch.int64, device=device)


def sample_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float,
    seed,
    *,
    metric: str = "l2",
    return_distance: bool = False,
    backend: str | None = None,
):
    """One code per vector of ``z [..., D]``, drawn with probability ``softmax_k(logit_k / temperature)``:
    int64 ``[...]``, no gradient (vector-quantize-pytorch's ``stochastic_sample_codes``).

    ``logit_k = -sqrt(max(d_k, 1e-8))``, ``d_k`` the squared L2 distance (vqp's ``-cdist``), or for
    ``metric="cosine"`` the cosine similarity of the l2-normalised vectors. Gumbel-max, fused into the
    assignment: ``argmax_k logit_k / temperature + g[row, k]``, the Gumbel noise g from a counter-based
    generator (Philox4x32-10) keyed by (seed, row, code), rows counted over ``z``'s leading dims in
    order. So a seed reproduces a draw on both backends and whatever the launch configuration, and no
    N x K tensor (of logits or noise) is ever made. Use a new seed per step (and per level of a
    residual quantizer): equal seeds give equal noise.

    ``temperature``: a finite float > 0 (towards 0: the nearest code). ``seed``: a Python int (int64's
    range) or a 0-dim integer tensor on ``z``'s device, never read on the host (a compiled step can draw
    it with ``torch.randint``). With ``return_distance`` also the squared distance to the drawn code
    (float32; ``2 - 2 cos`` for cosine). Vectors holding a NaN or Inf get index -1, distance NaN/Inf.
    """
    checks.codebook(codebook)
    checks.latents(z, codebook)
    checks.choice("metric", metric, METRICS)
    temperature = checks.real("temperature", temperature, lambda v: v > 0, "> 0")
    seed = _seed(seed, z.device)
    with torch.no_grad():
        zr, c = _rows(z.detach()), codebook.detach()
        if metric == "cosine":
            zr, c = unit(zr), unit(c)
        name = choose(zr, c, backend=backend)
        idx, dist = _op("assign", zr, c, "exact", name, 0, temperature, seed, metric == "cosine")
    idx = idx.reshape(z.shape[:-1])
    return (idx, dist.reshape(z.shape[:-1])) if return_distance else idx


def lookup(
    indices: torch.Tensor,
    codebook: torch.Tensor,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """``codebook[indices]``: ``[..., D]``, bit-exact; index -1 gives a zero vector.

    The gradient flows to the codebook (a scatter-add in float32). ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``) makes it bitwise reproducible.
    """
    checks.codebook(codebook)
    idx = checks.indices(indices, device=codebook.device)  # the values: in the op, before its launch
    name = choose(codebook, backend=backend)
    out = _op("lookup", idx.reshape(-1), codebook, name, deterministic_mode(deterministic))
    return out.reshape(*idx.shape, codebook.shape[1])


def squared_error(
    a: torch.Tensor, b: torch.Tensor, reduction: str = "sum", *, backend: str | None = None
) -> torch.Tensor:
    """``sum (a - b)^2`` with float32 accumulation; gradients flow to both inputs.

    ``reduction="sum"`` is the spec's squared norm; ``"mean"`` divides by the number of elements
    (as ``F.mse_loss``); ``"none"`` gives the per-vector sums over the last dim, shape ``a.shape[:-1]``.
    The result is float32 (float64 for float64 inputs).
    """
    checks.float_tensor("a", a)
    checks.float_tensor("b", b)
    checks.choice("reduction", reduction, REDUCTIONS)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    checks.same_device(a=a, b=b)
    lead = a.shape[:-1] if a.dim() else ()
    ar, br = (_rows(a), _rows(b)) if a.dim() else (a.reshape(1, 1), b.reshape(1, 1))
    # Contiguous rows: the launchers take any row stride, but the torch path's reductions would add in
    # a layout-dependent order; this way a strided view gets the bits of its contiguous copy.
    out = _op("squared_error", ar.contiguous(), br.contiguous(), reduction, choose(ar, br, backend=backend))
    return out.reshape(lead) if reduction == "none" else out


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    reduction: str = "sum",
    *,
    mask: torch.Tensor | None = None,
    rotation_trick: bool = False,
    precision: str = "exact",
    backend: str | None = None,
    deterministic: bool | None = None,
    temperature: float = 0.0,
    seed=None,
    sample_metric: str = "l2",
) -> QuantizeResult:
    """The fused VQ step on ``z [..., D]``: nearest codes, straight-through output and both VQ losses.

    ``codebook_loss = ||sg[z] - z_q||^2`` trains the codebook only, ``commitment_loss =
    ||z - sg[z_q]||^2`` trains ``z`` only, ``loss = codebook_loss + beta * commitment_loss``;
    ``reduction`` is ``"sum"`` (the spec's squared norms) or ``"mean"`` (over the elements of the
    kept vectors: ``z.numel()`` without a mask). The output ``z_q`` has the value ``codebook[idx]``
    (in ``z.dtype``) and passes its gradient to ``z`` unchanged, none to the codebook.

    ``mask`` (bool, ``z.shape[:-1]``) marks the vectors to quantize; the others get index -1, a zero
    ``z_q`` and no gradient, and count in no loss, whatever their values (NaN padding included).
    They are decided on the device (no host sync); each costs the work of a kept vector.

    ``rotation_trick=True`` (Fifty et al., ICLR 2025): ``z_q`` keeps its value, but the gradient
    reaching it passes to ``z`` rotated by the rotation taking ``z``'s direction to ``z_q``'s and
    scaled by ``|z_q| / |z|`` (both held constant; norms clamped at 1e-6, as vector-quantize-pytorch
    does), instead of unchanged. The losses' gradients do not change.

    ``temperature > 0``: the codes are drawn as ``sample_codes`` draws them (``seed`` required;
    ``precision`` does not apply), with the logits of ``sample_metric``: ``"l2"`` (``-sqrt(d)``) or
    ``"cosine"`` (``1 - d / 2``: the cosine similarity, for l2-normalised ``z`` and codes, as the layer
    passes them); ``z_q``, the losses and the backward are as above for the drawn codes.
    """
    checks.codebook(codebook)
    checks.latents(z, codebook)
    checks.choice("reduction", reduction, ("sum", "mean"))
    checks.choice("precision", precision, PRECISIONS)
    beta = checks.real("beta", beta, lambda v: v >= 0, ">= 0")
    checks.choice("rotation_trick", rotation_trick, (False, True))
    temperature = checks.real("temperature", temperature, lambda v: v >= 0, ">= 0")
    checks.choice("sample_metric", sample_metric, METRICS)
    if temperature > 0 and seed is None:
        raise ValueError("seed is required when temperature > 0 (an int or a 0-dim integer tensor)")
    seed = None if seed is None else _seed(seed, z.device)
    keep = None
    if mask is not None:
        keep = checks.mask(mask, z.shape[:-1], z.device, f"z's shape without the last dim, {tuple(z.shape[:-1])}")
    z_q, idx, codebook_loss, commitment_loss, count = quantize_sums(
        z, codebook, keep, precision, backend, deterministic, bool(rotation_trick), temperature, seed, sample_metric)
    if reduction == "mean":  # the mean over no elements is NaN, as in torch.nn.functional.mse_loss
        codebook_loss, commitment_loss = codebook_loss / count, commitment_loss / count
    return QuantizeResult(z_q, idx, codebook_loss, commitment_loss, codebook_loss + beta * commitment_loss)


def quantize_sums(z: torch.Tensor, codebook: torch.Tensor, keep: torch.Tensor | None, precision: str,
                  backend: str | None, deterministic: bool | None, rotation_trick: bool, temperature: float,
                  seed: torch.Tensor | None, sample_metric: str):
    """``quantize``'s work on checked arguments (a bool ``keep`` of ``z.shape[:-1]`` or None, ``seed`` a tensor
    or None): ``(z_q, indices, codebook_sum, commitment_sum, count)``, the two terms summed over the kept
    vectors and ``count`` their number of elements (an int, or a 0-dim tensor with a mask). For callers that
    checked their settings once (``VectorQuantizer``): no per-call check of what cannot have changed."""
    zr = z if z.dim() == 2 else _rows(z)
    zr = zr.contiguous()  # bitwise layout-independence, as in squared_error
    if keep is not None:
        keep = keep.reshape(-1, 1)
        zr = torch.where(keep, zr, 0)  # finite stand-ins, cut off from z's gradient
    name = choose(zr, codebook, backend=backend)
    z_q, idx, d_codebook, d_commitment = _op(
        "quantize", zr, codebook.contiguous(), precision, name, deterministic_mode(deterministic), rotation_trick,
        temperature, seed if temperature > 0 else None, sample_metric == "cosine",
    )
    if z_q.dtype != z.dtype:
        z_q = z_q.to(z.dtype)
    count = zr.numel()
    if keep is not None:
        z_q, idx = torch.where(keep, z_q, 0), torch.where(keep[:, 0], idx, -1)
        d_codebook, d_commitment = torch.where(keep[:, 0], d_codebook, 0), torch.where(keep[:, 0], d_commitment, 0)
        count = keep.sum() * z.shape[-1]
    if z.dim() != 2:
        z_q, idx = z_q.reshape(z.shape), idx.reshape(z.shape[:-1])
    return z_q, idx, d_codebook.sum(), d_commitment.sum(), count


def verify_assignment(
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    metric: str = "l2",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Bool ``[...]``: is ``indices`` a nearest code of each vector, within fp32 rounding?

    True where the float64 direct-form distance to the given code is within ``(1 + 2^-16)`` of the
    distance to the code that exact ``assign`` finds: the certified index the spec wants handed
    to it. Index -1 (no code) is never verified. Memory is O(N D); no N x K matrix.
    """
    checks.codebook(codebook)
    checks.latents(z, codebook)
    checks.choice("metric", metric, METRICS)
    idx = checks.indices(indices, device=codebook.device)
    checks.index_range(idx, codebook.shape[0])
    if idx.shape != z.shape[:-1]:
        raise ValueError(f"indices must have shape z.shape[:-1] = {tuple(z.shape[:-1])}, got {tuple(idx.shape)}")
    best = assign(z, codebook, metric=metric, backend=backend)
    with torch.no_grad():
        zz, c = z.detach().to(torch.float64), codebook.detach().to(torch.float64)
        if metric == "cosine":
            zz, c = unit(zz), unit(c)
        d_given = (zz - c[idx.clamp_min(0)]).square().sum(-1)
        d_best = (zz - c[best.clamp_min(0)]).square().sum(-1)
        return (idx >= 0) & (best >= 0) & (d_given <= d_best * (1.0 + CONTRACT_RTOL))
