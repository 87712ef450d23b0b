"""What the scalar quantizers (``FSQ``, ``LFQ`` and their residual stacks) share: the layout of their
vectors (channels along ``channel_dim``, split into heads), masks, the optional random rotation, and
the ``generator`` their random draws take."""

from __future__ import annotations

import torch
from torch import nn

from vqtriton import checks
from vqtriton.torch_ops import acc_dtype

__all__ = ["orthogonal", "channel_rows", "to_layout", "kept", "masked", "finite_only", "head_indices"]


def orthogonal(d: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random ``[d, d]`` orthogonal matrix: ``nn.init.orthogonal_``, the draw vector-quantize-pytorch makes."""
    return nn.init.orthogonal_(torch.empty(d, d), generator=generator)


def channel_rows(z: torch.Tensor, channel_dim: int, heads: int, d: int) -> tuple[torch.Tensor, torch.Size]:
    """``z``'s vectors channel-last as ``[..., heads, d]`` in float32 (float64 for float64 ``z``: the
    quantizers never compute in half precision), and ``z``'s shape without the channel dim."""
    checks.float_tensor("z", z)
    dim = heads * d
    if not -z.dim() <= channel_dim < z.dim() or z.shape[channel_dim] != dim:
        raise ValueError(f"z must have dim = {dim} channels in dim {channel_dim}, got shape {tuple(z.shape)}")
    x = z.movedim(channel_dim, -1)
    return x.to(acc_dtype(x)).unflatten(-1, (heads, d)), x.shape[:-1]


def to_layout(x: torch.Tensor, dtype: torch.dtype, channel_dim: int) -> torch.Tensor:
    """``[..., heads, d]`` back to ``[..., heads * d]`` with the channels in ``channel_dim``, in ``dtype``."""
    return x.flatten(-2).to(dtype).movedim(-1, channel_dim)


def kept(mask, lead: torch.Size, z: torch.Tensor) -> torch.Tensor | None:
    """The checked bool mask of the vectors to quantize (``lead``: ``z``'s shape without the channel dim)."""
    if mask is None:
        return None
    return checks.mask(mask, lead, z.device, f"z's shape without the channel dim, {tuple(lead)} for z {tuple(z.shape)}")


def masked(out: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None, heads: int):
    """Masked-out vectors as the library writes them: zeros in ``out [..., heads, d]``, -1 in ``indices``
    (``[..., heads]``, or ``[...]`` for one head)."""
    if keep is None:
        return out, indices
    return torch.where(keep[..., None, None], out, 0.0), torch.where(keep[..., None] if heads > 1 else keep, indices, -1)


def finite_only(indices: torch.Tensor, x: torch.Tensor, heads: int) -> torch.Tensor:
    """``indices`` with -1 for every vector (per head) of ``x [..., heads, d]`` that holds a NaN or +-Inf:
    a non-finite latent has no code, as for ``vqtriton.assign``."""
    finite = torch.isfinite(x).all(-1)
    return torch.where(finite if heads > 1 else finite.squeeze(-1), indices, -1)


def head_indices(indices, heads: int, codebook_size: int, device) -> torch.Tensor:
    """User indices (``[...]``, or ``[..., heads]`` with heads) checked and as int64 ``[..., heads]``: values in
    ``[-1, codebook_size)`` (read on the host: the decoding path's one sync)."""
    idx = checks.indices(indices, device=device)
    if heads > 1:
        if idx.shape[-1:] != (heads,):
            raise ValueError(f"indices must be [..., heads] with heads = {heads}, got shape {tuple(idx.shape)}")
    else:
        idx = idx[..., None]
    checks.index_range(idx, codebook_size)
    return idx
