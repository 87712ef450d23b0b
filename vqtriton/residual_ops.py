"""Residual VQ as ops: every level in one launch (``residual_assign``, ``residual_quantize``, its one-launch
backward, ``residual_code_stats``).

The public functions check their inputs, stack the codebooks (``[L, K, D]``, or per-level sizes
``[K_l, D]``) into one ``[sum K_l, D]`` tensor (a view or a ``torch.cat``: the gradient reaches the
caller's tensors through it), normalise them for the cosine metric (``functional.unit``,
differentiable: the normalisation's Jacobian reaches raw codebooks by autograd), flatten z to rows
and call the ``torch.library`` custom ops below (``torch.ops.vqtriton.residual_*``: fake
implementations, ``register_autograd``; opaque to ``torch.compile`` as every op of
:mod:`vqtriton.custom_ops`, whose list this family keeps out of), through :func:`vqtriton.eager.call`
(the same implementation without the dispatcher in eager mode).

The training op returns, per row and level, two copies of each level's distance (as ``quantize``
returns ``dist_codebook`` / ``dist_commitment``): the caller weights, masks and reduces them as it
likes, and those weights reach the backward per row and level. The backward is one launch that
replays each row's residuals from z and the step's codes (``kernels/residual.py``). The codes are
saved by the op itself (a copy of the stacked codebooks, ``sum K_l x D``): an EMA step rewrites a
codebook in place after the forward, and that must not change this step's gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vqtriton import checks
from vqtriton.backend import choose, ops
from vqtriton.eager import call as _op  # torch.ops.vqtriton.<name>, without its dispatch in eager mode
from vqtriton.functional import METRICS, PRECISIONS, deterministic_mode, unit
from vqtriton.torch_ops import acc_dtype as _acc

__all__ = [
    "residual_assign",
    "residual_quantize",
    "residual_code_stats",
    "ResidualAssignResult",
    "ResidualQuantizeResult",
    "OUTPUT_GRADS",
]

OUTPUT_GRADS = ("first", "every")


class ResidualAssignResult(NamedTuple):
    """What ``residual_assign`` returns (no gradient)."""

    indices: Tensor  # int64 [..., L]; -1: masked, dropped, or no finite distance
    z_q: Tensor  # [..., D] the sum of the chosen codes, float32 (float64 for float64 inputs)
    distances: Tensor  # [..., L] each level's squared distance to its code, float32 (float64)


class ResidualQuantizeResult(NamedTuple):
    """What ``residual_quantize`` returns. ``z_q`` has the value of the sum of the chosen codes and passes
    its gradient to z (``output_grad``); ``dist_codebook`` and ``dist_commitment`` ``[..., L]`` hold the
    same values, each level's ``|x_l - q_l|^2``, with different gradients: the first trains the codebooks
    only (``|sg x_l - q_l|^2``), the second z only (``|x_l - sg q_l|^2``)."""

    z_q: Tensor
    indices: Tensor
    dist_codebook: Tensor
    dist_commitment: Tensor


# --- the custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("vqtriton::residual_assign", mutates_args=())
def _assign_op(z: Tensor, codebooks: Tensor, sizes: list[int], precision: str, cosine: bool, keep: Tensor | None,
               levels: Tensor | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(idx int64 [N, L], z_q [N, D], dist [N, L])`` of the residual loop over the stacked codebooks."""
    return ops(backend).residual_assign_fwd(z, codebooks, sizes, precision=precision, cosine=cosine, keep=keep,
                                            levels=levels)


@_assign_op.register_fake
def _(z, codebooks, sizes, precision, cosine, keep, levels, backend):
    n, n_levels, dt = z.shape[0], len(sizes), _acc(z, codebooks)
    idx = z.new_empty(n, n_levels, dtype=torch.int64)
    return idx, z.new_empty(z.shape, dtype=dt), z.new_empty(n, n_levels, dtype=dt)


@torch.library.custom_op("vqtriton::residual_quantize", mutates_args=())
def _quantize_op(z: Tensor, codebooks: Tensor, sizes: list[int], precision: str, cosine: bool, keep: Tensor | None,
                 levels: Tensor | None, output_grad: str, rotation_trick: bool, deterministic: bool, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(z_q [N, D], idx [N, L], dist_codebook [N, L], dist_commitment [N, L], codes)``: the forward of
    ``_assign_op`` (one launch), the distance twice, and ``codes``, a copy of the stacked codebooks that
    the backward reads (so a codebook rewritten in place after the forward changes nothing)."""
    idx, z_q, dist = ops(backend).residual_assign_fwd(z, codebooks, sizes, precision=precision, cosine=cosine,
                                                      keep=keep, levels=levels)
    return z_q, idx, dist, dist.clone(), codebooks.clone(memory_format=torch.contiguous_format)


@_quantize_op.register_fake
def _(z, codebooks, sizes, precision, cosine, keep, levels, output_grad, rotation_trick, deterministic, backend):
    n, dt = z.shape[0], _acc(z, codebooks)
    dist = z.new_empty(n, len(sizes), dtype=dt)
    return (z.new_empty(z.shape, dtype=dt), z.new_empty(n, len(sizes), dtype=torch.int64), dist, torch.empty_like(dist),
            torch.empty_like(codebooks, memory_format=torch.contiguous_format))


def _quantize_setup(ctx, inputs, output):
    z, codebooks, sizes, _, cosine, keep, levels, output_grad, rotation_trick, deterministic, backend = inputs
    _, idx, _, _, codes = output
    ctx.mark_non_differentiable(codes)
    ctx.save_for_backward(z, codes, idx, keep, levels)
    ctx.meta = (sizes, cosine, output_grad, rotation_trick, deterministic, backend, codebooks.dtype)


def _quantize_grad(ctx, g_zq, _g_idx, g_codebook, g_commitment, _g_codes):
    sizes, cosine, output_grad, rotation_trick, deterministic, backend, dtype = ctx.meta
    z, codes, idx, keep, levels = ctx.saved_tensors
    need_z, need_codebook = ctx.needs_input_grad[:2]
    dz, dcodebooks = _op(
        "residual_quantize_backward", z, codes, sizes, idx, g_zq, g_commitment, g_codebook, cosine, output_grad,
        rotation_trick, keep, levels, need_codebook, deterministic, backend)
    return (dz if need_z else None, dcodebooks.to(dtype) if need_codebook else None, *[None] * 9)


torch.library.register_autograd("vqtriton::residual_quantize", _quantize_grad, setup_context=_quantize_setup)


@torch.library.custom_op("vqtriton::residual_quantize_backward", mutates_args=())
def _backward_op(z: Tensor, codes: Tensor, sizes: list[int], idx: Tensor, grad_zq: Tensor, w: Tensor, v: Tensor,
                 cosine: bool, output_grad: str, rotation_trick: bool, keep: Tensor | None, levels: Tensor | None,
                 codebook_grad: bool, deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    """``(dz [N, D], dcodebooks [sum K_l, D])``, one launch (``kernels.residual.residual_backward``): ``w``,
    ``v [N, L]`` the gradients of the commitment and codebook distances, ``grad_zq`` that of z_q. Without
    ``codebook_grad`` no scatter runs and ``dcodebooks`` is an empty ``[0, D]`` tensor."""
    dz, dcb = ops(backend).residual_backward(
        z, codes, sizes, idx, grad_zq, w, v if codebook_grad else None, cosine=cosine, output_grad=output_grad,
        rotate=rotation_trick, keep=keep, levels=levels, deterministic=deterministic)
    return dz, z.new_empty(0, z.shape[1], dtype=_acc(z, codes)) if dcb is None else dcb


@_backward_op.register_fake
def _(z, codes, sizes, idx, grad_zq, w, v, cosine, output_grad, rotation_trick, keep, levels, codebook_grad,
      deterministic, backend):
    return torch.empty_like(z), z.new_empty(codes.shape[0] if codebook_grad else 0, z.shape[1], dtype=_acc(z, codes))


@torch.library.custom_op("vqtriton::residual_stats", mutates_args=())
def _stats_op(z: Tensor, codes: Tensor, sizes: list[int], idx: Tensor, cosine: bool, deterministic: bool,
              backend: str) -> tuple[Tensor, Tensor]:
    """Every level's per-code counts (float32 ``[sum K_l]``) and sums of its inputs x_l (``[sum K_l, D]``)
    for indices ``[N, L]`` in range (from the residual ops: the values are not checked here)."""
    return ops(backend).residual_stats(z, codes, sizes, idx, cosine=cosine, deterministic=deterministic)


@_stats_op.register_fake
def _(z, codes, sizes, idx, cosine, deterministic, backend):
    return codes.new_empty(codes.shape[0], dtype=torch.float32), z.new_empty(codes.shape, dtype=_acc(z, codes))


# --- the public functions --------------------------------------------------------------------------


def _stacked(codebooks) -> tuple[Tensor, list[int]]:
    """Checked codebooks as one ``[sum K_l, D]`` tensor (differentiable) and the sizes ``K_l``."""
    if isinstance(codebooks, Tensor):
        checks.float_tensor("codebooks", codebooks)
        if codebooks.dim() != 3 or 0 in codebooks.shape:
            raise ValueError(
                f"codebooks must be [L, K, D] with L, K, D >= 1 (or a list of [K_l, D]), got shape "
                f"{tuple(codebooks.shape)}")
        n_levels, k, d = codebooks.shape
        return codebooks.reshape(n_levels * k, d), [k] * n_levels
    if not isinstance(codebooks, (list, tuple)):
        raise TypeError(f"codebooks must be a tensor [L, K, D] or a list of tensors [K_l, D], got "
                        f"{type(codebooks).__name__}")
    if not codebooks:
        raise ValueError("codebooks must hold at least one level, got an empty sequence")
    for l, c in enumerate(codebooks):
        checks.float_tensor(f"codebooks[{l}]", c)
        if c.dim() != 2 or 0 in c.shape:
            raise ValueError(f"codebooks[{l}] must be 2-D [K_l, D] with K_l, D >= 1, got shape {tuple(c.shape)}")
    first = codebooks[0]
    for l, c in enumerate(codebooks):
        if c.shape[1] != first.shape[1] or c.dtype != first.dtype or c.device != first.device:
            raise ValueError(
                f"every level's codebook must have the same D, dtype and device: codebooks[0] is "
                f"{tuple(first.shape)} {first.dtype} on {first.device}, codebooks[{l}] {tuple(c.shape)} {c.dtype} "
                f"on {c.device}")
    return torch.cat(list(codebooks)), [c.shape[0] for c in codebooks]


def _inputs(z, codebooks, metric: str, precision: str, mask, levels):
    """The checked rows ``[N, D]``, stacked codebooks, sizes, flat mask ``[N]`` (or None) and levels."""
    flat, sizes = _stacked(codebooks)
    checks.float_tensor("z", z)
    if z.dim() < 1 or z.shape[-1] != flat.shape[1]:
        raise ValueError(f"z must be [..., D] with D = {flat.shape[1]} (the codebooks'), got z {tuple(z.shape)}")
    checks.same_device(z=z, codebooks=flat)
    checks.choice("metric", metric, METRICS)
    checks.choice("precision", precision, PRECISIONS)
    keep = None
    if mask is not None:
        what = f"z's shape without the last dim, {tuple(z.shape[:-1])}"
        keep = checks.mask(mask, z.shape[:-1], z.device, what).reshape(-1)
    if levels is not None:
        if not isinstance(levels, Tensor) or levels.dim() != 0 or levels.is_floating_point() or levels.is_complex() \
                or levels.dtype == torch.bool:
            raise TypeError(
                f"levels must be None or a 0-dim integer tensor (the number of leading levels to run, decided on "
                f"the device), got {levels.dtype if isinstance(levels, Tensor) else type(levels).__name__} "
                f"of shape {tuple(getattr(levels, 'shape', ()))}")
        if levels.device != z.device:
            raise ValueError(f"tensors must be on one device, got levels on {levels.device}, z on {z.device}")
    rows = z.reshape(math.prod(z.shape[:-1]), z.shape[-1])
    return rows, flat, sizes, keep, levels


def residual_assign(z: Tensor, codebooks, *, metric: str = "l2", precision: str = "exact",
                    mask: Tensor | None = None, levels: Tensor | None = None,
                    backend: str | None = None) -> ResidualAssignResult:
    """Residual VQ of ``z [..., D]`` over L codebooks, every level in one launch; no gradient.

    ``codebooks``: a ``[L, K, D]`` tensor, or a list / tuple of L tensors ``[K_l, D]`` (sizes may differ;
    same D, dtype and device). Level l takes ``i_l = nearest(x_l, C_l)`` with ``x_l = r_l``,
    ``r_0 = z``, ``r_{l+1} = r_l - C_l[i_l]`` (the residual in float32, float64 for float64 inputs), each
    level under ``assign``'s contract for ``precision`` (exact: a true nearest code of the residual as
    computed, lowest index on ties). ``metric="cosine"``: ``x_l = r_l / |r_l|`` against the normalised
    codes, and the normalised code is subtracted (vector-quantize-pytorch's residual semantics).

    Returns ``ResidualAssignResult(indices int64 [..., L], z_q [..., D], distances [..., L])``: ``z_q`` is
    the sum of the chosen codes, ``distances[..., l]`` the squared distance ``|x_l - C_l[i_l]|^2``.
    ``mask`` (bool, ``z.shape[:-1]``): masked vectors get -1 at every level, a zero ``z_q`` and distance 0,
    whatever they hold (NaN padding included). ``levels``: a 0-dim integer tensor n on z's device (quantize
    dropout, never read on the host): levels >= n act as masked. A vector with no finite distance at some
    level (a NaN or Inf, or float32 overflow) gets -1 from that level on, its ``z_q`` stops there, and
    every later level repeats that distance (NaN or +Inf). Memory: never ``N x K``.
    """
    rows, flat, sizes, keep, levels = _inputs(z, codebooks, metric, precision, mask, levels)
    with torch.no_grad():
        rows, flat = rows.detach(), flat.detach()
        cosine = metric == "cosine"
        if cosine:
            flat = unit(flat)
        name = choose(rows, flat, backend=backend)
        idx, z_q, dist = _op("residual_assign", rows, flat, sizes, precision, cosine, keep, levels, name)
    lead = z.shape[:-1]
    return ResidualAssignResult(idx.reshape(*lead, len(sizes)), z_q.reshape(z.shape), dist.reshape(*lead, len(sizes)))


def residual_quantize(z: Tensor, codebooks, *, metric: str = "l2", precision: str = "exact",
                      mask: Tensor | None = None, levels: Tensor | None = None, output_grad: str = "first",
                      rotation_trick: bool = False, backend: str | None = None,
                      deterministic: bool | None = None) -> ResidualQuantizeResult:
    """The residual VQ training step's op: ``residual_assign``'s forward (one launch) with gradients.

    Returns ``ResidualQuantizeResult(z_q, indices, dist_codebook, dist_commitment)`` (float32, or float64
    for float64 inputs; ``[..., D]``, ``[..., L]``). Level l's terms, for the caller to weight, mask and
    reduce (``(dist_codebook + beta * dist_commitment).sum(-1).mean()``, say): ``dist_codebook`` is
    ``|sg x_l - q_l|^2`` and trains the codebooks only; ``dist_commitment`` is ``|x_l - sg q_l|^2`` and
    trains z only, through ``r_l`` (``dr_l / dz = I``: the residual subtracts detached codes, so every
    level's commitment reaches z). The gradient G reaching ``z_q`` passes to z:

    - ``output_grad="first"`` (vqtriton's ``ResidualVQ``): the output is level 0's straight-through
      output plus the detached later codes, so z gets ``T_0(G)``;
    - ``"every"`` (vector-quantize-pytorch's ``ResidualVQ``): each level's output is its own straight-through
      output, so z gets ``sum_l T_l(G)`` over the levels that ran;

    ``T_l`` the identity or, with ``rotation_trick=True``, the rotation trick from ``x_l`` to ``q_l``
    (scaled by ``|q_l| / |x_l|``; see ``quantize``). With ``metric="cosine"`` every term also passes the
    normalisation's Jacobian. Masked vectors and dropped levels get distance 0 and no gradient.
    vector-quantize-pytorch's ``quant_grad_frac > 0`` (a fraction of each code's gradient kept in the
    residual) is not part of this op: it makes ``dr_l / dz`` depend on the codes' gradients; run the
    level loop for it. ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``):
    bitwise reproducible codebook gradients (an extra fp32 ``[N L, D]`` buffer in the backward).
    """
    rows, flat, sizes, keep, levels = _inputs(z, codebooks, metric, precision, mask, levels)
    checks.choice("output_grad", output_grad, OUTPUT_GRADS)
    checks.choice("rotation_trick", rotation_trick, (False, True))
    cosine = metric == "cosine"
    if cosine:
        flat = unit(flat)
    rows = rows.contiguous()  # bitwise layout-independence, as in quantize
    name = choose(rows, flat, backend=backend)
    z_q, idx, d_codebook, d_commitment, _ = _op(
        "residual_quantize", rows, flat.contiguous(), sizes, precision, cosine, keep, levels, output_grad,
        bool(rotation_trick), deterministic_mode(deterministic), name)
    lead, n_levels = z.shape[:-1], len(sizes)
    return ResidualQuantizeResult(z_q.reshape(z.shape), idx.reshape(*lead, n_levels),
                                  d_codebook.reshape(*lead, n_levels), d_commitment.reshape(*lead, n_levels))


def residual_code_stats(z: Tensor, codebooks, indices: Tensor, *, metric: str = "l2", backend: str | None = None,
                        deterministic: bool | None = None, check_indices: bool = True):
    """Every level's EMA statistics in one launch: per code, how many vectors chose it and the sum of their
    level inputs ``x_l`` (the residual ``r_l``, or ``r_l / |r_l|`` for cosine), replayed from ``z`` and
    ``indices [..., L]`` (index -1 skipped). Returns ``(counts, sums)``: float32 ``[L, K]`` and ``[L, K, D]``
    for a ``[L, K, D]`` codebook tensor, else lists of ``[K_l]`` and ``[K_l, D]``. No gradient.

    The index values are range-checked (one host sync; one a level when the levels' sizes differ) unless
    ``check_indices=False``: a training step passes the indices ``residual_assign`` / ``residual_quantize``
    returned, in range by construction, and then nothing is read on the host (the call compiles whole).
    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``): bitwise reproducible sums."""
    rows, flat, sizes, _, _ = _inputs(z, codebooks, metric, "exact", None, None)
    idx = checks.indices(indices, device=flat.device)
    if idx.shape != (*z.shape[:-1], len(sizes)):
        raise ValueError(f"indices must have shape z.shape[:-1] + (L,) = {(*z.shape[:-1], len(sizes))}, got "
                         f"{tuple(idx.shape)}")
    idx = idx.reshape(-1, len(sizes))
    if check_indices:
        if len(set(sizes)) == 1:
            checks.index_range(idx, sizes[0])
        else:
            for l, k in enumerate(sizes):
                checks.index_range(idx[:, l], k, f"indices[..., {l}]")
    with torch.no_grad():
        flat = unit(flat.detach()) if metric == "cosine" else flat.detach()
        name = choose(rows, flat, backend=backend)
        counts, sums = _op("residual_stats", rows.detach().contiguous(), flat.contiguous(), sizes, idx.contiguous(),
                           metric == "cosine", deterministic_mode(deterministic), name)
    if isinstance(codebooks, Tensor):
        return counts.reshape(len(sizes), -1), sums.reshape(*codebooks.shape)
    return list(counts.split(sizes)), list(sums.split(sizes))
