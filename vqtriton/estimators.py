"""How a quantizer's output passes its gradient on: straight through, rotated, DiVeQ's noisy direction, or
not to the input at all.

The fused ``quantize`` op carries the first two in its one-launch backward; these are the same estimators
for the paths that do not run it (top-k candidates, per-row codebooks, a codebook gradient through the
output), in plain torch on rows ``[..., D]``, O(N D):

- :func:`straight_through`: value ``codes``, gradient to ``z`` unchanged (none to the codes).
- :func:`rotated`: value ``codes``, gradient to ``z`` as the rotation trick's ``lam R^T g`` (Fifty et al.,
  ICLR 2025; :func:`vqtriton.torch_ops.rotation`, the formula the kernel uses).
- :func:`directional`: DiVeQ (Vali et al., "DiVeQ: differentiable vector quantization using the
  reparameterization trick"): ``z + sg[unit(codes - z + sqrt(variance) eps)] * |codes - z|``, whose
  gradient reaches both ``z`` and the codes through the length of the error.
- :func:`frac_gradient`: ``frac t + (1 - frac) sg[t]``: the value of ``t`` with a fraction of its gradient
  (residual VQ's ``quant_grad_frac``).

Each straight-through value is exactly ``codes`` (``codes + (z - sg[z])`` adds an exact zero), so a
quantized output equals the codes of its indices bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vqtriton import checks
from vqtriton.codebook_state import draws
from vqtriton.torch_ops import rotation

__all__ = ["straight_through", "rotated", "directional", "frac_gradient"]


def straight_through(z: Tensor, codes: Tensor) -> Tensor:
    """The value of ``codes``, the gradient of ``z``: ``sg[codes] + (z - sg[z])``."""
    return codes.detach() + (z - z.detach())


class _Rotated(torch.autograd.Function):
    """Value ``codes``; the gradient reaching it goes to ``z`` rotated (rows of the last dim)."""

    @staticmethod
    def forward(ctx, z: Tensor, codes: Tensor) -> Tensor:
        ctx.save_for_backward(z, codes)
        return codes.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        z, codes = ctx.saved_tensors
        d = z.shape[-1]
        dz = rotation(z.reshape(-1, d), codes.reshape(-1, d).to(z.dtype), g.reshape(-1, d).to(z.dtype))
        return dz.reshape(z.shape), None


def rotated(z: Tensor, codes: Tensor) -> Tensor:
    """The value of ``codes``; the gradient to ``z`` through the rotation trick (none to the codes)."""
    return _Rotated.apply(z, codes.detach())


def directional(z: Tensor, codes: Tensor, variance: float, generator: torch.Generator | None = None) -> Tensor:
    """DiVeQ's output ``z + sg[unit(e + sqrt(variance) eps)] |e|``, ``e = codes - z``, ``eps ~ N(0, I)``
    (drawn with ``generator``; unit: l2-normalised with eps 1e-6, as vector-quantize-pytorch). Gradients
    reach ``z`` and ``codes``; ``variance=0`` makes it deterministic (value: the codes, to rounding)."""
    checks.real("variance", variance, lambda v: v >= 0, ">= 0")
    if z.shape != codes.shape:
        raise ValueError(f"z and codes must have the same shape, got z {tuple(z.shape)} and codes {tuple(codes.shape)}")
    err = codes - z
    noise = torch.randn(err.shape, dtype=err.dtype, device=err.device, **draws(generator))
    direction = F.normalize(err.detach() + math.sqrt(variance) * noise, dim=-1, eps=1e-6)
    return z + direction * err.norm(dim=-1, keepdim=True)


def frac_gradient(t: Tensor, frac: float) -> Tensor:
    """``t``'s value with ``frac`` of its gradient (``frac <= 0``: none)."""
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()
