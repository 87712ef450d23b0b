"""``vqtriton.compat.ResidualLFQ``: a drop-in for vector-quantize-pytorch's ``ResidualLFQ`` over
:class:`vqtriton.ResidualLFQ`.

vector-quantize-pytorch (vqp) 1.32.0's constructor with its defaults (``**kwargs`` are every level's
``LFQ`` arguments), ``quantized, indices, losses = rlfq(x, mask=None, return_all_codes=False,
rand_quantize_dropout_fixed_seed=None)`` with ``losses`` the per-level losses ``[Q]``,
``get_codes_from_indices``, ``get_output_from_indices``, ``codebooks``, and vqp's state_dict keys
(``project_in.*``, ``project_out.*``, ``layers.<l>.mask``, ``layers.<l>.orthogonal_rot``). Level ``l`` has
code scale ``2^-l``; the entropies use vqp's clamp, exactly and without the ``N x 2^d`` softmax. The
output's gradient reaches ``x`` through every level's straight-through path, as in vqp. Differences, on
purpose: quantize dropout as :class:`vqtriton.compat.ResidualFSQ` (vqp's draw with a fixed seed, else one
on the device); with ``spherical=True`` the codes of ``get_codes_from_indices`` are the spherical ones
the forward used (vqp looks up its unnormalised codebook there), and with ``orthogonal_rotation=True``
the rotated ones (vqp decodes without the rotation); channel-first inputs (an image or video, or
``channel_first=True``) also with projections and quantize dropout (vqp's residual loop crashes there);
and what
:class:`vqtriton.compat.LFQ` lists (masks, sampling, float32) holds per level.
"""

from __future__ import annotations

import inspect
from math import log2

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat._common import dropout_count, dropout_translation, set_vqp_dropout
from vqtriton.compat._scalar import register_vqp_layout, with_codebook_dim
from vqtriton.compat.lfq import LFQ, native_lfq_kwargs, vqp_mask
from vqtriton.residual_scalar import ResidualLFQ as NativeResidualLFQ

__all__ = ["ResidualLFQ"]

# Every level's LFQ arguments vqp passes through ``**kwargs``, with LFQ's defaults.
_LFQ_DEFAULTS = {n: p.default for n, p in inspect.signature(LFQ.__init__).parameters.items()
                 if n not in ("self", "backend", "generator")}
# Set by ResidualLFQ itself for every level (vqp: passing one raises "multiple values").
_SET_PER_LEVEL = ("dim", "codebook_size", "codebook_scale", "soft_clamp_input_value")


def _level_kwargs(kwargs: dict) -> dict:
    for name in _SET_PER_LEVEL:
        if name in kwargs:
            raise TypeError(f"ResidualLFQ sets every level's {name} itself (vqp: got multiple values for {name!r})")
    unknown = set(kwargs) - set(_LFQ_DEFAULTS)
    if unknown:
        raise TypeError(f"LFQ got unexpected keyword arguments {sorted(unknown)}")
    out = {**_LFQ_DEFAULTS, **kwargs}
    if out["num_codebooks"] != 1 or out["has_projections"] or out["cosine_sim_project_in"]:
        raise ValueError("ResidualLFQ's levels take num_codebooks=1 and no projections (vqp asserts that its "
                         "levels have no projections)")
    return out


class ResidualLFQ(nn.Module):
    """vector-quantize-pytorch 1.32.0's ``ResidualLFQ`` on :class:`vqtriton.ResidualLFQ` (``rlfq.quantizer``;
    see the module docstring). ``backend`` and ``generator`` (keyword-only, vqtriton's own) pass to it."""

    def __init__(
        self,
        *,
        dim,
        num_quantizers,
        codebook_size,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        soft_clamp_input_value=None,
        backend: str | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        super().__init__()
        extra = _level_kwargs(kwargs)
        if soft_clamp_input_value is not None and not soft_clamp_input_value >= 1.0:
            raise ValueError("soft_clamp_input_value must be >= 1 (level l clamps at soft_clamp_input_value 2^-l, "
                             f"its codebook_scale 2^-l; as vqp's assert), got {soft_clamp_input_value!r}")
        codebook_size = checks.integer("codebook_size", codebook_size, 2)
        if not log2(codebook_size).is_integer():
            raise ValueError(f"codebook_size must be a power of 2 for lookup free quantization, got {codebook_size}")
        codebook_dim = int(log2(codebook_size))
        self.dim = checks.integer("dim", dim, 1)
        self.codebook_size = codebook_size
        set_vqp_dropout(self, num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        self.keep_num_codebooks_dim = bool(extra["keep_num_codebooks_dim"])
        # The levels' layout (vqp: channel-first when True, or when None and the input is an image / video).
        self.channel_first = extra["channel_first"]
        self.has_projections = codebook_dim != self.dim
        self.project_in = nn.Linear(self.dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, self.dim) if self.has_projections else nn.Identity()
        level = native_lfq_kwargs(
            **{n: extra[n] for n in ("entropy_loss_weight", "commitment_loss_weight", "diversity_gamma",
                                     "straight_through_activation", "frac_per_sample_entropy",
                                     "experimental_softplus_entropy_loss", "entropy_loss_offset", "spherical",
                                     "orthogonal_rotation")},
            codebook_scale=1.0, soft_clamp_input_value=None,
        )
        del level["scale"], level["soft_clamp"]  # every level's own: 2^-l and soft_clamp_input_value 2^-l
        self.quantizer = NativeResidualLFQ(
            codebook_dim, self.num_quantizers, soft_clamp=soft_clamp_input_value, output_gradient="every",
            backend=backend, generator=generator,
            **dropout_translation(self),
            **level,
        )
        register_vqp_layout(self)

    @property
    def codebooks(self) -> torch.Tensor:
        """Every level's codebook ``[num_quantizers, codebook_size, d]``: ``+-2^-l`` (vqp's buffers, not
        normalised even when spherical)."""
        scales = self.quantizer.scales[:, None, None]
        return torch.where(self.quantizer.codebooks > 0, scales, -scales)

    def forward(self, x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        """``(quantized, indices, losses)``, plus every level's codes ``[Q, B, N, d]`` with ``return_all_codes``."""
        checks.float_tensor("x", x)
        first = self.channel_first if self.channel_first is not None else x.dim() >= 4
        x = x.movedim(1, -1) if first and x.dim() >= 2 else x
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} channels ({'dim 1' if first else 'last'}), got x "
                             f"{tuple(x.shape)} channel-last")
        h = self.project_in(x)
        n = dropout_count(self, rand_quantize_dropout_fixed_seed)
        if n is None:  # one draw for both calls below
            n = self.quantizer.draw_levels(x.device)
        keep = vqp_mask(mask, h.shape[:-1])
        z_q, native, _, losses = self.quantizer(h, keep, num_active=n, return_all_losses=True)
        if keep is not None:  # vqp's mask selects vectors for the losses only: every vector is quantized
            z_q, native = self.quantizer.quantize(h, num_active=n)
        out = self.project_out(z_q)
        out = out.movedim(-1, 1) if first and out.dim() >= 2 else out  # indices stay [B, ..., Q], as vqp's
        indices = native.unsqueeze(-2) if self.keep_num_codebooks_dim else native
        if not return_all_codes:
            return out, indices, losses
        return out, indices, losses, with_codebook_dim(self, self.quantizer.get_codes_from_indices(native))

    def _native(self, indices) -> torch.Tensor:
        idx = checks.indices(indices, device=self.quantizer.scales.device)
        return idx.squeeze(-2) if self.keep_num_codebooks_dim else idx

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        """Every level's codes ``[num_quantizers, B, ..., d]`` of ``indices [B, ..., q]`` (-1: none)."""
        return with_codebook_dim(self, self.quantizer.get_codes_from_indices(self._native(indices)))

    def get_output_from_indices(self, indices) -> torch.Tensor:
        """``project_out`` of the sum of the levels' codes."""
        return self.project_out(with_codebook_dim(self, self.quantizer.get_output_from_indices(self._native(indices))))
