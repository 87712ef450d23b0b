"""``torch.autograd.Function``s around the launchers, with the VQ-VAE stop-gradients.

Each takes 2-D rows and a backend name (``"triton"`` or ``"torch"``, see :mod:`vqtriton.backend`);
:mod:`vqtriton.functional` checks inputs, flattens leading dims and picks the backend.

- ``Lookup``: ``z_q = codebook[idx]``; the gradient scatters into the codebook.
- ``SquaredError``: ``sum (a - b)^2`` per row, total or mean; gradients ``+-2 (a - b) g`` to both.
- ``Quantize``: the fused VQ step. Forward: the assign kernel, whose epilogue writes z_q and the
  row squared errors (the distances to the chosen codes), then their sum.
  Backward (one launch): ``dz = g_zq + 2 s (g_commit + beta g_loss) (z - z_q)`` and
  ``dcodebook = scatter_idx 2 s (g_codebook + g_loss) (z_q - z)``: the straight-through output
  passes its gradient to ``z`` and none to the codebook, the commitment term trains only ``z``,
  the codebook term trains only the codebook (``s`` is 1 for sums, ``1 / (N D)`` for means).
"""

from __future__ import annotations

import torch

from vqtriton.backend import ops

__all__ = ["Lookup", "SquaredError", "Quantize"]


class Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: torch.Tensor, codebook: torch.Tensor, backend: str, deterministic: bool):
        ctx.save_for_backward(idx)
        ctx.meta = (backend, deterministic, codebook.shape[0], codebook.dtype)
        ctx.mark_non_differentiable(idx)
        return ops(backend).gather(idx, codebook)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        backend, deterministic, num_codes, dtype = ctx.meta
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        (idx,) = ctx.saved_tensors
        dcodebook = ops(backend).scatter_add(idx, grad.contiguous(), num_codes, deterministic=deterministic)
        return None, dcodebook.to(dtype), None, None


class SquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, reduction: str, backend: str):
        o = ops(backend)
        ctx.save_for_backward(a, b)
        ctx.meta = (backend, reduction)
        if reduction == "none":
            return o.sqerr_rows(a, b)
        total = o.sqerr_sum(a, b)
        return total / a.numel() if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        backend, reduction = ctx.meta
        a, b = ctx.saved_tensors
        if reduction == "mean":
            grad = grad / a.numel()
        o, grad = ops(backend), grad.contiguous()
        need_a, need_b = ctx.needs_input_grad[:2]
        same = a.dtype == b.dtype
        grad_a = o.sqerr_backward(a, b, grad) if need_a or (need_b and same) else None
        grad_b = None
        if need_b:
            # Same dtype: the exact negation of grad_a. Else rounded to b's own dtype: -grad_a, rounded to
            # a narrower a.dtype, would lose b's precision (or overflow when a is float16).
            grad_b = -grad_a if same else o.sqerr_backward(b, a, grad)
        return grad_a if need_a else None, grad_b, None, None


class Quantize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        z: torch.Tensor,
        codebook: torch.Tensor,
        beta: float,
        reduction: str,
        precision: str,
        backend: str,
        deterministic: bool,
    ):
        idx, dist, z_q = ops(backend).assign_fwd(z, codebook, precision=precision, return_zq=True)
        # The mean over no elements is NaN, as in torch.nn.functional.mse_loss.
        scale = (1.0 / z.numel() if z.numel() else float("nan")) if reduction == "mean" else 1.0
        term = dist.sum() * scale
        ctx.save_for_backward(z, codebook, idx)
        ctx.meta = (backend, deterministic, beta, scale)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)
        return z_q.to(z.dtype), idx, term, term.clone(), term + beta * term

    @staticmethod
    def backward(ctx, g_zq, _g_idx, g_codebook, g_commit, g_loss):
        backend, deterministic, beta, scale = ctx.meta
        z, codebook, idx = ctx.saved_tensors
        dt = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
        g_codebook, g_commit, g_loss = (
            torch.zeros((), dtype=dt, device=z.device) if g is None else g.to(dt)
            for g in (g_codebook, g_commit, g_loss)
        )
        coef = torch.stack([g_commit + beta * g_loss, g_codebook + g_loss]) * (2.0 * scale)
        dz, dcodebook = ops(backend).quantize_backward(
            z, codebook, idx, None if g_zq is None else g_zq.contiguous(), coef, deterministic=deterministic
        )
        return (
            dz if ctx.needs_input_grad[0] else None,
            dcodebook.to(codebook.dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
            None,
        )
