"""``vqtriton.compat.GroupedResidualVQ``: a drop-in for vector-quantize-pytorch's ``GroupedResidualVQ``.

vqp 1.32.0's constructor (keyword-only ``dim``, ``groups``, ``accept_image_fmap`` and every
:class:`~vqtriton.compat.ResidualVQ` argument) and forward: the channels split into ``groups`` equal
chunks, each quantized by its own :class:`~vqtriton.compat.ResidualVQ` (``rvqs[g]``; state_dict keys
``rvqs.{g}.layers.{i}._codebook.*``); ``quantized`` (the chunks' outputs concatenated), ``indices [G, ..., Q]``
and ``losses [G, Q]``. As in vqp every group drops the same levels in a training step: one draw, on the
device (vqp reads a seed on the host with ``.item()``), shared by the groups.
"""

from __future__ import annotations

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat.residual_vq import ResidualVQ

__all__ = ["GroupedResidualVQ"]


class GroupedResidualVQ(nn.Module):
    """vector-quantize-pytorch 1.32.0's ``GroupedResidualVQ`` on vqtriton (see the module docstring)."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        self.dim = checks.integer("dim", dim, 1)
        self.groups = checks.integer("groups", groups, 1)
        if self.dim % self.groups:
            raise ValueError(f"dim must be divisible by groups (as in vqp), got dim = {self.dim} and groups = {self.groups}")
        self.accept_image_fmap = bool(accept_image_fmap)
        self.rvqs = nn.ModuleList(
            ResidualVQ(dim=self.dim // self.groups, accept_image_fmap=accept_image_fmap, **kwargs) for _ in range(self.groups)
        )

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        """Every group's codes, stacked: ``[G, Q, B, ..., d]`` for ``indices [G, B, ..., Q]``."""
        return torch.stack(tuple(rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices) -> torch.Tensor:
        """The groups' outputs from ``indices [G, B, ..., Q]``, concatenated along ``split_dim``."""
        return torch.cat(tuple(rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)), dim=self.split_dim)

    def forward(self, x, indices=None, return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False, mask=None):
        """``(quantized, indices [G, ..., Q], losses [G, Q])`` (plus each group's codes with ``return_all_codes``);
        with ``indices`` (one per group): ``(quantized, summed cross-entropy loss)``."""
        checks.float_tensor("x", x)
        split = self.split_dim
        if x.dim() < 2 or x.shape[split] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} channels in dim {split}, got x {tuple(x.shape)}")
        chunks = x.chunk(self.groups, dim=split)
        indices = () if indices is None else indices
        if len(indices) not in (0, self.groups):
            raise ValueError(f"indices must hold one tensor per group ({self.groups}), got {len(indices)}")
        levels = self.rvqs[0].residual.draw_levels(x.device) if self.training and self.rvqs[0].quantize_dropout else None
        outs = [
            rvq._forward(chunk, mask, indices[g] if indices else None, return_all_codes, sample_codebook_temp,
                         freeze_codebook, None, levels)
            for g, (rvq, chunk) in enumerate(zip(self.rvqs, chunks))
        ]
        if indices:
            return torch.cat([o[0] for o in outs], dim=split), sum(o[1] for o in outs)
        quantized = torch.cat([o[0] for o in outs], dim=split)
        result = (quantized, torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs]))
        return (*result, tuple(o[3] for o in outs)) if return_all_codes else result
