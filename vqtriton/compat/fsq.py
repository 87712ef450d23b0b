"""``vqtriton.compat.FSQ``: a drop-in for vector-quantize-pytorch's ``FSQ`` over :class:`vqtriton.FSQ`.

vector-quantize-pytorch (vqp) 1.32.0's constructor with its defaults, ``out, indices = fsq(z)`` with its
layouts (``[B, N, D]``; ``[B, D, ...]`` for 4-D and 5-D inputs or ``channel_first``), int32 indices in vqp's
order (**first channel least significant**: ``sum_i k_i prod_{j < i} L_j``; the native module numbers
them the other way), ``indices_to_codes``, ``codes_to_indices``, ``indices_to_level_indices``,
``implicit_codebook``, and vqp's state_dict keys (``project_in.*``, ``project_out.*``, ``orthogonal_rot``).
Nothing is refused. Differences, on purpose:

- Levels are always computed in float32 (float64 inputs in float64), whatever ``allowed_dtypes`` and
  ``force_quantization_f32`` say: vqp computes them in the input's dtype when allowed, and in bfloat16
  the bound rounds onto half the levels' boundaries (vqp #114). The output has vqp's dtype.
- ``noise_dropout=p`` replaces a code with probability ``p``; vqp's ``full_like(z, p).bernoulli_()`` draws
  with probability 1/2 whatever ``p`` is (``bernoulli_()``'s own default). With ``p = 1/2`` both make the
  same draws from the same seed.
- Indices are exact integers for any codebook size (vqp sums float32 products: inexact past 2^24); more
  than 2^31 - 1 codes give int64 indices (vqp's int32 would overflow).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat._scalar import register_vqp_layout
from vqtriton.fsq import FSQ as NativeFSQ

__all__ = ["FSQ", "vqp_basis", "to_vqp_indices", "from_vqp_indices"]

_INT32_MAX = 2**31 - 1


def vqp_basis(levels) -> torch.Tensor:
    """vqp's index basis: ``prod_{j < i} L_j`` (the first channel least significant), int64 ``[d]``."""
    return torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.int64)


def index_dtype(codebook_size: int) -> torch.dtype:
    """vqp's int32 indices, or int64 where int32 cannot hold every index."""
    return torch.int32 if codebook_size <= _INT32_MAX else torch.int64


def to_vqp_indices(fsq: NativeFSQ, basis: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
    """Native one-codebook FSQ indices (any shape; -1 kept) in vqp's order, int32 (int64 past int32)."""
    idx = (fsq.levels_from_indices(native.clamp_min(0)) * basis).sum(-1)
    return torch.where(native >= 0, idx, -1).to(index_dtype(fsq.codebook_size))


def from_vqp_indices(fsq: NativeFSQ, basis: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """vqp-ordered one-codebook FSQ indices (any shape; -1 kept) as the native module's, int64."""
    idx = indices.to(torch.int64)
    k = (idx.clamp_min(0)[..., None] // basis) % fsq._levels
    return torch.where(idx >= 0, (k * fsq._basis).sum(-1), -1)


class FSQ(nn.Module):
    """vector-quantize-pytorch 1.32.0's ``FSQ`` on :class:`vqtriton.FSQ` (``fsq.quantizer``; see the module
    docstring). ``generator`` (keyword-only, vqtriton's own) draws the noise dropout."""

    def __init__(
        self,
        levels,
        dim=None,
        num_codebooks=1,
        keep_num_codebooks_dim=None,
        scale=None,
        allowed_dtypes=(torch.float32, torch.float64),
        channel_first=False,
        projection_has_bias=True,
        return_indices=True,
        force_quantization_f32=True,
        preserve_symmetry=False,
        noise_dropout=0.0,
        bound_hard_clamp=False,
        orthogonal_rotation=False,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        levels = list(levels)
        self.num_codebooks = checks.integer("num_codebooks", num_codebooks, 1)
        keep = self.num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
        if self.num_codebooks > 1 and not keep:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True (the indices' codebook dim; as vqp)")
        self.keep_num_codebooks_dim = keep
        self.codebook_dim = len(levels)
        self.effective_codebook_dim = self.codebook_dim * self.num_codebooks
        self.dim = self.effective_codebook_dim if dim is None else checks.integer("dim", dim, 1)
        self.scale = scale
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32
        self.channel_first = bool(channel_first)
        self.return_indices = bool(return_indices)
        self.preserve_symmetry = bool(preserve_symmetry)
        self.noise_dropout = noise_dropout
        self.bound_hard_clamp = bool(bound_hard_clamp)
        self.orthogonal_rotation = bool(orthogonal_rotation)
        self.has_projections = self.dim != self.effective_codebook_dim
        inner = self.effective_codebook_dim
        self.project_in = nn.Linear(self.dim, inner, bias=projection_has_bias) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, self.dim, bias=projection_has_bias) if self.has_projections else nn.Identity()
        self.quantizer = NativeFSQ(
            levels, heads=self.num_codebooks, symmetric=self.preserve_symmetry, hard_clamp=self.bound_hard_clamp,
            noise_dropout=noise_dropout, rotation=self.orthogonal_rotation, generator=generator,
        )
        self.codebook_size = self.quantizer.codebook_size
        # vqp's buffers: the levels and its index basis (the first channel least significant).
        self.register_buffer("_levels", self.quantizer._levels.to(torch.int32), persistent=False)
        self.register_buffer("_basis", vqp_basis(levels), persistent=False)
        register_vqp_layout(self)

    # --- the call -----------------------------------------------------------------------------------

    def _moves_channels(self, ndim_images: bool) -> bool:
        return ndim_images or self.channel_first

    def forward(self, z):
        """``(out, indices)``: ``indices`` None with ``return_indices=False``."""
        checks.float_tensor("z", z)
        move = self._moves_channels(z.dim() >= 4)
        x = z.movedim(1, -1) if move else z
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected dimension of {self.dim} but found dimension of {x.shape[-1]} (z {tuple(z.shape)})")
        codes, native = self.quantizer(self.project_in(x))
        out = self.project_out(codes)
        out = out.movedim(-1, 1) if move else out
        if not self.return_indices:
            return out, None
        indices = to_vqp_indices(self.quantizer, self._basis, native)
        return out, indices[..., None] if self.keep_num_codebooks_dim and self.num_codebooks == 1 else indices

    # --- indices and codes ------------------------------------------------------------------------

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The output (``project_out`` of the codes) for vqp-ordered ``indices``, in the input layout."""
        idx = checks.indices(indices, device=self._basis.device)
        images = idx.dim() >= 3 + int(self.keep_num_codebooks_dim)
        if self.keep_num_codebooks_dim and self.num_codebooks == 1:
            idx = idx[..., 0]
        checks.index_range(idx, self.codebook_size)
        codes = self.project_out(self.quantizer.indices_to_codes(from_vqp_indices(self.quantizer, self._basis, idx)))
        return codes.movedim(-1, 1) if self._moves_channels(images) else codes

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """vqp-ordered int32 indices of codes ``[..., d]`` (one codebook's channels, before any rotation)."""
        checks.float_tensor("zhat", zhat)
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must be [..., {self.codebook_dim}], got {tuple(zhat.shape)}")
        return (self.quantizer.levels_from_codes(zhat) * self._basis).sum(-1).to(index_dtype(self.codebook_size))

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Each channel's level ``[..., d]`` of vqp-ordered indices."""
        idx = checks.indices(indices, device=self._basis.device)
        return (idx[..., None] // self._basis) % self.quantizer._levels

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """Every code ``[codebook_size, d]`` in vqp's index order."""
        vqp_order = torch.arange(self.codebook_size, device=self._basis.device)
        return self.quantizer.implicit_codebook[from_vqp_indices(self.quantizer, self._basis, vqp_order)]

    @property
    def orthogonal_rot(self) -> torch.Tensor | None:
        return self.quantizer.rotation
