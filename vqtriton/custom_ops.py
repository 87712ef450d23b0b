"""The ops as ``torch.library`` custom ops (``torch.ops.vqtriton.*``), with their gradients.

The floor between the launchers and :mod:`vqtriton.functional`: each op takes 2-D rows that
functional has checked, and a ``backend`` name (``"triton"`` or ``"torch"``, see
:mod:`vqtriton.backend`) that picks whose launcher its body calls. To ``torch.compile`` every op
is opaque: dynamo and AOTAutograd run only its fake implementation (output shapes and dtypes from
the input shapes), so a Triton launch, or the torch path's chunk loop, never breaks a graph.
(``custom_op``, not ``triton_op``: under TRITON_INTERPRET a ``triton_op`` would run the kernel on
fake tensors; see DESIGN.md section 5a.)

The gradients are registered with ``register_autograd`` and carry the VQ-VAE stop-gradients:

- ``lookup``: ``z_q = codebook[idx]``; the gradient scatters into the codebook (``scatter_add``).
- ``squared_error``: ``sum (a - b)^2`` per row, total or mean; gradients ``+-2 (a - b) g``.
- ``quantize``: nearest codes, ``z_q`` and two copies of each row's squared distance, one for the
  codebook term and one for the commitment term. Backward (``quantize_backward``, one launch): the
  straight-through output passes its gradient to ``z`` (as it is, or rotated: the rotation trick)
  and none to the codebook; the commitment copy trains only ``z``, the codebook copy only the codebook.

``assign``, ``code_stats`` and ``code_counts`` have no gradient (indices and statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqtriton import checks
from vqtriton.eager import call as _op  # torch.ops.vqtriton.<name>, without its dispatch in eager mode
from vqtriton.backend import ops
from vqtriton.torch_ops import acc_dtype as _acc  # the dtype of distances, sums and statistics
from vqtriton.torch_ops import to_dtype as _to_dtype

__all__ = [
    "assign",
    "quantize",
    "quantize_backward",
    "lookup",
    "scatter_add",
    "squared_error",
    "sqerr_backward",
    "code_stats",
    "code_counts",
]


# --- assign ------------------------------------------------------------------------------------------


@torch.library.custom_op("vqtriton::assign", mutates_args=())
def assign(
    z: Tensor,
    codebook: Tensor,
    precision: str,
    backend: str,
    k: int = 0,
    temperature: float = 0.0,
    seed: Tensor | None = None,
    cosine: bool = False,
) -> tuple[Tensor, Tensor]:
    """Nearest code of each row of ``z [N, D]``: ``(idx int64 [N], dist [N])``. With ``k >= 1`` the k
    nearest, nearest first (``[N, k]`` each); with ``temperature > 0`` instead one Gumbel-max draw per row,
    keyed by ``seed`` (a 0-dim int64 tensor), with the L2 logits or, with ``cosine``, the cosine ones."""
    if temperature > 0:
        idx, dist, _ = ops(backend).sample_fwd(z, codebook, temperature, seed, cosine=cosine)
    elif k > 0:
        idx, dist = ops(backend).topk_fwd(z, codebook, k, precision=precision)
    else:
        idx, dist, _ = ops(backend).assign_fwd(z, codebook, precision=precision)
    return idx, dist


@assign.register_fake
def _(z, codebook, precision, backend, k=0, temperature=0.0, seed=None, cosine=False):
    shape = (z.shape[0], k) if k > 0 and not temperature > 0 else (z.shape[0],)
    return z.new_empty(shape, dtype=torch.int64), z.new_empty(shape, dtype=_acc(z, codebook))


# --- quantize ----------------------------------------------------------------------------------------


@torch.library.custom_op("vqtriton::quantize", mutates_args=())
def quantize(
    z: Tensor,
    codebook: Tensor,
    precision: str,
    backend: str,
    deterministic: bool,
    rotation_trick: bool,
    temperature: float = 0.0,
    seed: Tensor | None = None,
    cosine: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z_q [N, D], idx [N], dist_codebook [N], dist_commitment [N])``: one assign launch whose
    epilogue writes ``z_q = codebook[idx]``, in the wider of the two dtypes (so it holds the codes
    exactly: the backward reads them from it); the distance copies have the same values and different
    gradients. ``rotation_trick``: z_q's gradient reaches z rotated (``quantize_backward``). With
    ``temperature > 0`` the codes are Gumbel-max draws (as ``assign``'s), the rest unchanged."""
    if temperature > 0:
        idx, dist, z_q = ops(backend).sample_fwd(z, codebook, temperature, seed, cosine=cosine, return_zq=True)
    else:
        idx, dist, z_q = ops(backend).assign_fwd(z, codebook, precision=precision, return_zq=True)
    return _to_dtype(z_q, torch.promote_types(z.dtype, codebook.dtype)), idx, dist, dist.clone()


@quantize.register_fake
def _(z, codebook, precision, backend, deterministic, rotation_trick, temperature=0.0, seed=None, cosine=False):
    n, dt = z.shape[0], _acc(z, codebook)
    z_q = z.new_empty(z.shape, dtype=torch.promote_types(z.dtype, codebook.dtype))
    return z_q, z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=dt), z.new_empty(n, dtype=dt)


def _quantize_setup(ctx, inputs, output):
    z, codebook, _, backend, deterministic, rotation_trick = inputs[:6]
    z_q, idx = output[:2]
    # The codes this step used, not the codebook: an EMA step rewrites the codebook in place afterwards.
    ctx.save_for_backward(z, z_q, idx)
    ctx.meta = (backend, deterministic, rotation_trick, codebook.shape[0], codebook.dtype)


def _quantize_grad(ctx, g_zq, _g_idx, g_codebook, g_commitment):
    backend, deterministic, rotation_trick, num_codes, dtype = ctx.meta
    z, z_q, idx = ctx.saved_tensors
    need_z, need_codebook = ctx.needs_input_grad[:2]
    dz, dcodebook = _op(
        "quantize_backward",
        z, z_q, idx, g_zq, g_commitment, g_codebook, num_codes, need_codebook, deterministic, rotation_trick, backend,
    )
    return (dz if need_z else None, dcodebook.to(dtype) if need_codebook else None) + (None,) * 7


torch.library.register_autograd("vqtriton::quantize", _quantize_grad, setup_context=_quantize_setup)


@torch.library.custom_op("vqtriton::quantize_backward", mutates_args=())
def quantize_backward(
    z: Tensor,
    z_q: Tensor,
    idx: Tensor,
    grad_zq: Tensor,
    w: Tensor,
    v: Tensor,
    num_codes: int,
    codebook_grad: bool,
    deterministic: bool,
    rotate: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(dz, dcodebook)``: ``dz = G + 2 w (z - z_q)``, ``dcodebook = scatter 2 v (z_q - z)`` with
    ``w, v [N]`` the gradients of the commitment and codebook distances and ``G = grad_zq`` (rotated
    with ``rotate``: the rotation trick). Without ``codebook_grad`` no scatter runs and ``dcodebook``
    is an empty ``[0, D]`` tensor."""
    dz, dcodebook = ops(backend).quantize_backward(
        z, z_q, idx, grad_zq, w, v if codebook_grad else None, num_codes, deterministic=deterministic, rotate=rotate
    )
    if dcodebook is None:
        dcodebook = z.new_empty(0, z.shape[1], dtype=_acc(z, z_q))
    return dz, dcodebook


@quantize_backward.register_fake
def _(z, z_q, idx, grad_zq, w, v, num_codes, codebook_grad, deterministic, rotate, backend):
    return torch.empty_like(z), z.new_empty(num_codes if codebook_grad else 0, z.shape[1], dtype=_acc(z, z_q))


# --- lookup ------------------------------------------------------------------------------------------


@torch.library.custom_op("vqtriton::lookup", mutates_args=())
def lookup(idx: Tensor, codebook: Tensor, backend: str, deterministic: bool) -> Tensor:
    """``codebook[idx]`` for int64 ``idx [N]`` in ``[-1, K)``, -1 giving zeros. The range is checked
    here, on the values, before the launch (the only op that reads a value on the host: its indices
    come from the user, and an index out of range would make the kernel read outside the codebook)."""
    checks.index_range(idx, codebook.shape[0])
    return ops(backend).gather(idx, codebook)


@lookup.register_fake
def _(idx, codebook, backend, deterministic):
    return codebook.new_empty(idx.shape[0], codebook.shape[1])


def _lookup_setup(ctx, inputs, output):
    idx, codebook, backend, deterministic = inputs
    ctx.save_for_backward(idx)
    ctx.meta = (backend, deterministic, codebook.shape[0], codebook.dtype)


def _lookup_grad(ctx, grad):
    backend, deterministic, num_codes, dtype = ctx.meta
    if not ctx.needs_input_grad[1]:
        return None, None, None, None
    (idx,) = ctx.saved_tensors
    dcodebook = _op("scatter_add", idx, grad, num_codes, deterministic, backend)
    return None, dcodebook.to(dtype), None, None


torch.library.register_autograd("vqtriton::lookup", _lookup_grad, setup_context=_lookup_setup)


@torch.library.custom_op("vqtriton::scatter_add", mutates_args=())
def scatter_add(idx: Tensor, rows: Tensor, num_codes: int, deterministic: bool, backend: str) -> Tensor:
    """``out[k] = sum of rows[i] over idx[i] == k`` (-1 skipped): ``[num_codes, D]``, float32 (float64)."""
    return ops(backend).scatter_add(idx, rows, num_codes, deterministic=deterministic)


@scatter_add.register_fake
def _(idx, rows, num_codes, deterministic, backend):
    return rows.new_empty(num_codes, rows.shape[1], dtype=_acc(rows))


# --- squared_error -----------------------------------------------------------------------------------


@torch.library.custom_op("vqtriton::squared_error", mutates_args=())
def squared_error(a: Tensor, b: Tensor, reduction: str, backend: str) -> Tensor:
    """``sum (a - b)^2`` of rows ``[N, D]``: per row ``[N]`` (``"none"``), total or mean (0-dim)."""
    o = ops(backend)
    if reduction == "none":
        return o.sqerr_rows(a, b)
    total = o.sqerr_sum(a, b)
    return total / a.numel() if reduction == "mean" else total


@squared_error.register_fake
def _(a, b, reduction, backend):
    shape = (a.shape[0],) if reduction == "none" else ()
    return a.new_empty(shape, dtype=_acc(a, b))


def _squared_error_setup(ctx, inputs, output):
    a, b, reduction, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.meta = (backend, reduction)


def _squared_error_grad(ctx, grad):
    backend, reduction = ctx.meta
    a, b = ctx.saved_tensors
    if reduction == "mean":
        grad = grad / a.numel()
    need_a, need_b = ctx.needs_input_grad[:2]
    same = a.dtype == b.dtype
    backward = lambda *args: _op("sqerr_backward", *args)  # noqa: E731
    grad_a = backward(a, b, grad, backend) if need_a or (need_b and same) else None
    grad_b = None
    if need_b:
        # Same dtype: the exact negation of grad_a. Else rounded to b's own dtype: -grad_a, rounded to
        # a narrower a.dtype, would lose b's precision (or overflow when a is float16).
        grad_b = -grad_a if same else backward(b, a, grad, backend)
    return grad_a if need_a else None, grad_b, None, None


torch.library.register_autograd("vqtriton::squared_error", _squared_error_grad, setup_context=_squared_error_setup)


@torch.library.custom_op("vqtriton::sqerr_backward", mutates_args=())
def sqerr_backward(a: Tensor, b: Tensor, grad: Tensor, backend: str) -> Tensor:
    """``2 (a - b) grad`` in ``a.dtype``; ``grad`` is 0-dim (the total's) or ``[N]`` (per row)."""
    return ops(backend).sqerr_backward(a, b, grad)


@sqerr_backward.register_fake
def _(a, b, grad, backend):
    return torch.empty_like(a)


# --- per-code statistics -----------------------------------------------------------------------------


@torch.library.custom_op("vqtriton::code_stats", mutates_args=())
def code_stats(idx: Tensor, x: Tensor, num_codes: int, deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Per-code counts (float32 ``[K]``) and sums (``[K, D]``) of the rows of ``x`` with ``idx >= 0``."""
    return ops(backend).code_stats(idx, x, num_codes, deterministic=deterministic)


@code_stats.register_fake
def _(idx, x, num_codes, deterministic, backend):
    return x.new_empty(num_codes, dtype=torch.float32), x.new_empty(num_codes, x.shape[1], dtype=_acc(x))


@torch.library.custom_op("vqtriton::code_counts", mutates_args=())
def code_counts(idx: Tensor, num_codes: int, backend: str) -> Tensor:
    """Per-code counts (float32 ``[K]``) of the indices ``>= 0``."""
    counts, _ = ops(backend).code_stats(idx, None, num_codes)
    return counts


@code_counts.register_fake
def _(idx, num_codes, backend):
    return idx.new_empty(num_codes, dtype=torch.float32)
