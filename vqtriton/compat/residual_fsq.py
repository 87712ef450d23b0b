"""``vqtriton.compat.ResidualFSQ``: a drop-in for vector-quantize-pytorch's ``ResidualFSQ`` over
:class:`vqtriton.ResidualFSQ`.

vector-quantize-pytorch (vqp) 1.32.0's constructor with its defaults (``**kwargs`` are every level's
``FSQ`` arguments), ``quantized, indices = rfsq(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)``
with its layouts, int32 indices in vqp's FSQ order per level (``-1`` for a dropped level),
``get_codes_from_indices``, ``get_output_from_indices``, ``codebooks``, and vqp's state_dict keys
(``project_in.*``, ``project_out.*``, ``layers.<l>.orthogonal_rot``). The output's gradient reaches ``x``
through every level's straight-through path, as in vqp (the native default passes it once).
Differences, on purpose:

- Quantize dropout: with ``rand_quantize_dropout_fixed_seed`` the levels kept are vqp's (its own
  ``random.Random(seed)`` draw); without it the count is drawn on the device (same distribution, no
  host sync: vqp reads a seed from the GPU each step), so it differs from vqp's for the same torch seed.
  Dropped levels are computed and masked when the count is drawn on the device.
- ``is_channel_first``: ``get_output_from_indices`` / ``get_codes_from_indices`` take the indices in the
  forward's layout (``[B, Q, ...]``) and ``get_output_from_indices`` returns the forward's layout, so the
  round trip holds (vqp reads ``[B, ..., Q]`` there and returns channel-last outputs); ``return_all_codes``
  gives the codes of the forward's indices (vqp reads the channel-first indices as channel-last).
- Indices are int32 also when levels are dropped (vqp's stack then promotes them to int64);
  ``return_indices=False`` gives ``None`` indices (vqp fails stacking them).
- Everything listed for :class:`vqtriton.compat.FSQ` holds per level (float32 levels, ``noise_dropout``).
"""

from __future__ import annotations

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat._common import dropout_count, dropout_translation, set_vqp_dropout
from vqtriton.compat._scalar import register_vqp_layout, with_codebook_dim
from vqtriton.compat.fsq import from_vqp_indices, to_vqp_indices, vqp_basis
from vqtriton.residual_scalar import ResidualFSQ as NativeResidualFSQ

__all__ = ["ResidualFSQ"]

# Every level's FSQ arguments vqp passes through ``**kwargs`` (FSQ's signature, less what ResidualFSQ sets).
_FSQ_KWARGS = {"num_codebooks": 1, "keep_num_codebooks_dim": None, "scale": None,
               "allowed_dtypes": (torch.float32, torch.float64), "channel_first": False, "projection_has_bias": True,
               "return_indices": True, "force_quantization_f32": True, "noise_dropout": 0.0,
               "orthogonal_rotation": False}


def _level_kwargs(kwargs: dict) -> dict:
    """vqp's per-level FSQ arguments, checked: the ones vqp's ResidualFSQ sets itself, or that cannot work
    there (each level must map ``len(levels)`` channels to themselves), raise as vqp does."""
    for name in ("levels", "dim", "preserve_symmetry", "bound_hard_clamp"):
        if name in kwargs:
            raise TypeError(f"ResidualFSQ sets every level's {name} itself (vqp: got multiple values for {name!r})")
    unknown = set(kwargs) - set(_FSQ_KWARGS)
    if unknown:
        raise TypeError(f"FSQ got unexpected keyword arguments {sorted(unknown)}")
    out = {**_FSQ_KWARGS, **kwargs}
    if out["num_codebooks"] != 1 or out["channel_first"]:
        raise ValueError("ResidualFSQ's levels take num_codebooks=1 and channel_first=False (vqp asserts that its "
                         "levels have no projections, and reads channel-last residuals)")
    return out


class ResidualFSQ(nn.Module):
    """vector-quantize-pytorch 1.32.0's ``ResidualFSQ`` on :class:`vqtriton.ResidualFSQ` (``rfsq.quantizer``;
    see the module docstring). ``generator`` (keyword-only, vqtriton's own) draws dropout and noise."""

    def __init__(
        self,
        *,
        levels,
        num_quantizers,
        dim=None,
        is_channel_first=False,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        soft_clamp_input_value=None,
        bound_hard_clamp=True,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        super().__init__()
        levels = list(levels)
        extra = _level_kwargs(kwargs)
        self.levels = levels
        codebook_dim = len(levels)
        self.dim = codebook_dim if dim is None else checks.integer("dim", dim, 1)
        self.is_channel_first = bool(is_channel_first)
        set_vqp_dropout(self, num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        self.keep_num_codebooks_dim = bool(extra["keep_num_codebooks_dim"])
        self.return_indices = bool(extra["return_indices"])
        self.has_projections = codebook_dim != self.dim
        self.project_in = nn.Linear(self.dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, self.dim) if self.has_projections else nn.Identity()
        self.quantizer = NativeResidualFSQ(
            levels, self.num_quantizers, hard_clamp=bound_hard_clamp, soft_clamp=soft_clamp_input_value,
            output_gradient="every", noise_dropout=extra["noise_dropout"], rotation=extra["orthogonal_rotation"],
            generator=generator,
            **dropout_translation(self),
        )
        self.codebook_size = self.quantizer.codebook_size
        self.register_buffer("_basis", vqp_basis(levels), persistent=False)
        register_vqp_layout(self)

    @property
    def scales(self) -> torch.Tensor:
        return self.quantizer.scales

    @property
    def soft_clamp_input_value(self) -> torch.Tensor | None:
        return self.quantizer.soft_clamp

    @property
    def codebooks(self) -> torch.Tensor:
        """Every level's codes ``[num_quantizers, codebook_size, d]`` in vqp's index order (unscaled)."""
        order = from_vqp_indices(self.quantizer.layers[0], self._basis,
                                 torch.arange(self.codebook_size, device=self._basis.device))
        return self.quantizer.codebooks[:, order]

    # --- the call -----------------------------------------------------------------------------------

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        """``(quantized, indices)``, plus every level's codes ``[Q, B, ..., d]`` with ``return_all_codes``."""
        checks.float_tensor("x", x)
        x_last = x.movedim(1, -1) if self.is_channel_first else x
        if x_last.shape[-1] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} channels, got x {tuple(x.shape)}")
        z_q, native = self.quantizer(self.project_in(x_last), num_active=dropout_count(self, rand_quantize_dropout_fixed_seed))
        out = self.project_out(z_q)
        indices = self._to_vqp(native) if self.return_indices else None
        if self.is_channel_first:
            out = out.movedim(-1, 1)
            indices = None if indices is None else indices.movedim(-1, 1)
        if not return_all_codes:
            return out, indices
        return out, indices, with_codebook_dim(self, self.quantizer.get_codes_from_indices(native))

    def _to_vqp(self, native: torch.Tensor) -> torch.Tensor:
        idx = to_vqp_indices(self.quantizer.layers[0], self._basis, native)
        return idx.unsqueeze(-2) if self.keep_num_codebooks_dim else idx

    def _from_vqp(self, indices) -> torch.Tensor:
        """vqp-layout indices (the forward's) as the native module's ``[..., q]``."""
        idx = checks.indices(indices, device=self._basis.device)
        idx = idx.movedim(1, -1) if self.is_channel_first else idx
        idx = idx.squeeze(-2) if self.keep_num_codebooks_dim else idx
        checks.index_range(idx, self.codebook_size)
        return from_vqp_indices(self.quantizer.layers[0], self._basis, idx)

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        """Every level's scaled codes ``[num_quantizers, B, ..., d]`` of ``indices`` (the forward's layout;
        fewer trailing levels than ``num_quantizers`` count as dropped)."""
        return with_codebook_dim(self, self.quantizer.get_codes_from_indices(self._from_vqp(indices)))

    def get_output_from_indices(self, indices) -> torch.Tensor:
        """``project_out`` of the sum of the levels' codes, in the forward's output layout."""
        out = self.project_out(with_codebook_dim(self, self.quantizer.get_output_from_indices(self._from_vqp(indices))))
        return out.movedim(-1, 1) if self.is_channel_first else out
