"""``vqtriton.compat.LFQ``: a drop-in for vector-quantize-pytorch's ``LFQ`` over :class:`vqtriton.LFQ`.

vector-quantize-pytorch (vqp) 1.32.0's constructor with its defaults (every argument implemented,
none refused), ``quantized, indices, aux_loss = lfq(x, inv_temperature=100., return_loss_breakdown=False,
mask=None)`` with its layouts (``[B, N, D]``; ``[B, D, ...]`` for 4-D and 5-D inputs or ``channel_first``),
indices (int64, **first channel most significant**, as the native module), ``indices_to_codes``,
``codebook``, and its state_dict keys (``project_in.*``, ``project_out.*``, ``mask``, ``orthogonal_rot``,
``activation.*``). The entropy terms use vqp's clamp (``-sum p log max(p, 1e-5)``), computed exactly
without vqp's ``N x 2^d`` softmax (:mod:`vqtriton.entropy`). Differences, on purpose:

- A ``mask [B, N]`` selects vectors for the batch entropy as it does for the per-sample entropy. vqp's
  ``original_input[mask]`` then flattens the codebook dim into the rows, so its "batch" distribution is
  each vector's own and its batch entropy equals the per-sample one (a ``[B]`` mask works in vqp).
- ``frac_per_sample_entropy`` drawing no vector gives entropies of 0 (vqp: NaN). Without a mask the
  draw is vqp's (``torch.randn(n).argsort() < k``, the same rows from the same seed on the CPU); with a
  mask it is made without a host sync, so the rows differ (the distribution does not).
- Quantization is always in float32 (float64 inputs in float64); in eval mode the output keeps its
  straight-through gradient (vqp's has none); ``force_quantization_f32=False`` changes nothing.
- Under ``torch.distributed`` the batch distribution is the mean over all ranks' kept vectors (vqp
  averages the ranks' means, which weighs ranks with fewer vectors more).
"""

from __future__ import annotations

from collections import namedtuple
from math import log2

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat._scalar import CosineSimLinear, register_vqp_layout
from vqtriton.lfq import LFQ as NativeLFQ

__all__ = ["LFQ", "Return", "LossBreakdown", "native_lfq_kwargs", "vqp_mask"]

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

# vqp's clamp inside the entropies' logs.
VQP_ENTROPY_EPS = 1e-5


def native_lfq_kwargs(*, entropy_loss_weight, commitment_loss_weight, diversity_gamma, straight_through_activation,
                      frac_per_sample_entropy, experimental_softplus_entropy_loss, entropy_loss_offset, spherical,
                      orthogonal_rotation, codebook_scale, soft_clamp_input_value) -> dict:
    """vqp's LFQ arguments as :class:`vqtriton.LFQ`'s (shared with ``compat.ResidualLFQ``)."""
    if not (0 < frac_per_sample_entropy <= 1):
        raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy}")
    if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
        raise ValueError(f"soft_clamp_input_value must be >= codebook_scale = {codebook_scale}, got {soft_clamp_input_value}")
    activation = None if isinstance(straight_through_activation, nn.Identity) else straight_through_activation
    return dict(
        entropy_weight=entropy_loss_weight, commitment_weight=commitment_loss_weight, diversity_gamma=diversity_gamma,
        activation=activation, entropy_fraction=frac_per_sample_entropy,
        softplus_offset=entropy_loss_offset if experimental_softplus_entropy_loss else None, spherical=spherical,
        rotation=orthogonal_rotation, scale=codebook_scale, soft_clamp=soft_clamp_input_value,
        entropy_eps=VQP_ENTROPY_EPS,
    )


def vqp_mask(mask, lead: torch.Size) -> torch.Tensor | None:
    """vqp's ``mask`` (``[B]``, or ``[B, N]`` over the vectors flattened after the batch dim) as a mask of
    the vectors' shape ``lead`` (``[B, ...]``)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    n = lead[1:].numel()
    if tuple(mask.shape) == tuple(lead[:1]):
        return mask.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
    if tuple(mask.shape) == (lead[0], n):
        return mask.reshape(lead)
    raise ValueError(f"mask must be [B] = [{lead[0]}] or [B, N] = [{lead[0]}, {n}] (N: the vectors per batch entry), "
                     f"got {tuple(mask.shape)}")


class LFQ(nn.Module):
    """vector-quantize-pytorch 1.32.0's ``LFQ`` on :class:`vqtriton.LFQ` (``lfq.quantizer``; see the module
    docstring). ``backend`` and ``generator`` (keyword-only, vqtriton's own) pass to the native module."""

    def __init__(
        self,
        *,
        dim=None,
        codebook_size=None,
        entropy_loss_weight=0.1,
        commitment_loss_weight=0.0,
        diversity_gamma=1.0,
        straight_through_activation=nn.Identity(),
        num_codebooks=1,
        keep_num_codebooks_dim=None,
        codebook_scale=1.0,
        frac_per_sample_entropy=1.0,
        has_projections=None,
        projection_has_bias=True,
        soft_clamp_input_value=None,
        cosine_sim_project_in=False,
        cosine_sim_project_in_scale=None,
        channel_first=None,
        experimental_softplus_entropy_loss=False,
        entropy_loss_offset=5.0,
        spherical=False,
        force_quantization_f32=True,
        orthogonal_rotation=False,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("either dim or codebook_size must be specified for LFQ")
        if codebook_size is not None:
            codebook_size = checks.integer("codebook_size", codebook_size, 2)
            if not log2(codebook_size).is_integer():
                raise ValueError(f"codebook_size must be a power of 2 for lookup free quantization, got {codebook_size}")
        self.num_codebooks = checks.integer("num_codebooks", num_codebooks, 1)
        self.codebook_size = 2**dim if codebook_size is None else codebook_size
        self.codebook_dim = int(log2(self.codebook_size))
        inner = self.codebook_dim * self.num_codebooks
        self.dim = inner if dim is None else checks.integer("dim", dim, 1)
        keep = self.num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
        if self.num_codebooks > 1 and not keep:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True (the indices' codebook dim; as vqp)")
        self.keep_num_codebooks_dim = keep
        self.channel_first = channel_first
        self.has_projections = self.dim != inner if has_projections is None else bool(has_projections)
        if cosine_sim_project_in:
            scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
            make_in = lambda: CosineSimLinear(self.dim, inner, scale=scale)  # noqa: E731
        else:
            make_in = lambda: nn.Linear(self.dim, inner, bias=projection_has_bias)  # noqa: E731
        self.project_in = make_in() if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, self.dim, bias=projection_has_bias) if self.has_projections else nn.Identity()
        self.codebook_scale = codebook_scale
        self.spherical = bool(spherical)
        self.force_quantization_f32 = force_quantization_f32
        self.quantizer = NativeLFQ(
            inner, heads=self.num_codebooks, backend=backend, generator=generator,
            **native_lfq_kwargs(
                entropy_loss_weight=entropy_loss_weight, commitment_loss_weight=commitment_loss_weight,
                diversity_gamma=diversity_gamma, straight_through_activation=straight_through_activation,
                frac_per_sample_entropy=frac_per_sample_entropy,
                experimental_softplus_entropy_loss=experimental_softplus_entropy_loss,
                entropy_loss_offset=entropy_loss_offset, spherical=spherical, orthogonal_rotation=orthogonal_rotation,
                codebook_scale=codebook_scale, soft_clamp_input_value=soft_clamp_input_value,
            ),
        )
        register_vqp_layout(self)

    # --- vqp's attributes ----------------------------------------------------------------------------

    @property
    def mask(self) -> torch.Tensor:
        """vqp's bit weights ``2^(d-1-i)`` (int64 ``[d]``)."""
        return self.quantizer._powers

    @property
    def codebook(self) -> torch.Tensor:
        """vqp's ``codebook`` buffer: all ``2^d`` codes ``+-codebook_scale`` ``[codebook_size, d]`` (not
        normalised even when spherical: vqp normalises where it uses them)."""
        return torch.where(self.quantizer.codebook > 0, self.codebook_scale, -self.codebook_scale)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def orthogonal_rot(self) -> torch.Tensor | None:
        return self.quantizer.rotation

    @property
    def activation(self):
        return self.quantizer.activation or nn.Identity()

    # --- the call -----------------------------------------------------------------------------------

    def _transposes(self, images: bool) -> bool:
        return images if self.channel_first is None else bool(self.channel_first)

    def forward(self, x, inv_temperature=100.0, return_loss_breakdown=False, mask=None):
        """``Return(quantized, indices, entropy_aux_loss)``, plus a ``LossBreakdown`` with ``return_loss_breakdown``."""
        checks.float_tensor("x", x)
        move = self._transposes(x.dim() >= 4)
        x_last = x.movedim(1, -1) if move else x
        if x_last.shape[-1] != self.dim:
            raise ValueError(f"expected dimension of {self.dim} but received {x_last.shape[-1]} (x {tuple(x.shape)})")
        h = self.project_in(x_last)
        keep = vqp_mask(mask, h.shape[:-1])
        out, idx, loss, parts = self.quantizer(h, keep, inv_temperature=inv_temperature, return_breakdown=True)
        if keep is not None:  # vqp's mask selects vectors for the losses only: every vector is quantized
            out, idx = self.quantizer.quantize(h)
        out = self.project_out(out)
        out = out.movedim(-1, 1) if move else out
        if self.keep_num_codebooks_dim and self.num_codebooks == 1:
            idx = idx[..., None]
        ret = Return(out, idx, loss)
        return (ret, LossBreakdown(*parts)) if return_loss_breakdown else ret

    def indices_to_codes(self, indices, project_out=True):
        """The codes (``project_out``-ed by default) of ``indices``, in the input layout."""
        idx = checks.indices(indices, device=self.mask.device)
        move = self._transposes(idx.dim() >= 3 + int(self.keep_num_codebooks_dim))
        if self.keep_num_codebooks_dim and self.num_codebooks == 1:
            idx = idx[..., 0]
        codes = self.quantizer.indices_to_codes(idx)
        codes = self.project_out(codes) if project_out else codes
        return codes.movedim(-1, 1) if move else codes
