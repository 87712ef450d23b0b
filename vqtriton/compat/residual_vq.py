"""``vqtriton.compat.ResidualVQ``: a drop-in for vector-quantize-pytorch's ``ResidualVQ``.

vqp 1.32.0's constructor (keyword-only ``dim``, ``num_quantizers``, ``codebook_size`` (one size or a tuple of
one per level), ``codebook_dim``, ``shared_codebook``, ``diveq``, ``heads`` (1), ``quantize_dropout``,
``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``, ``accept_image_fmap``,
``implicit_neural_codebook``, ``mlp_kwargs``, ``beam_size``, ``eval_beam_size``,
``beam_score_quantizer_weights``, ``quant_grad_frac``, ``return_zeros_for_masked_padding`` and
``**vq_kwargs``, every level's :class:`~vqtriton.compat.VectorQuantize` arguments) and forward
(``quantized, indices, losses = rvq(x, mask=None, ...)``; ``losses`` one per level), its outputs and
shapes, ``codebooks``, ``get_codes_from_indices``, ``get_output_from_indices``, and its state_dict keys
(``project_in.*``, ``project_out.*``, ``layers.{i}._codebook.*``, ``mlps.{i}.*``) in both directions.

The quantizer is :class:`vqtriton.ResidualVQ` (``rvq.residual``) with vqp's gradient convention
(``output_gradient="every"``): this module maps arguments, layouts, loss conventions and checkpoint keys.
Differences from vqp, by design (each also in the README):

- exact nearest codes (and exact top-k for the beam search; vqp's fp32 ``cdist`` may differ on near-ties);
- quantize dropout is drawn on the device, the same on every rank, with no host read (vqp reads a seed with
  ``.item()``): the same distribution as vqp's, other draws; ``rand_quantize_dropout_fixed_seed`` gives
  vqp's own cutoff (computed on the host from that Python int, as vqp does);
- a shared EMA codebook takes one EMA step per training step from every level's counts and sums (vqp decays
  its statistics once per level), and restarts dead codes from all levels' residuals once per step;
- channel-first inputs (``channel_last=False`` among ``vq_kwargs``, ``accept_image_fmap``, ``accept_3d_fmap``)
  work (vqp's residual loop crashes on them: it stacks the indices on the wrong axis): ``quantized`` in the
  input's layout, ``indices [B, N, Q]`` (``[B, H, W, Q]``); projections act on the channels (vqp's
  ``project_in`` acts on the last axis of a feature map);
- ``forward(x, indices=...)`` (vqp crashes there): the teacher-forced reconstruction (the sum of the given
  codes) and the sum over levels of the cross entropy of each level's code logits against its given index.
- the beam search updates every level's codebook from the chosen path (vqp's updates only the first level's:
  it takes ``all_residuals[..., 0, :]``, level 0's residual, where it means the first path's);
- QINCo's per-token codebooks are searched exactly in row chunks (vqp: ``-pairwise_distance``, which adds
  1e-6 to each difference), never all ``[N, K, d]`` codes at once;
- a shared codebook with an ``in_place_codebook_optimizer`` takes one optimiser step per training step, after
  every level added its gradient (vqp's takes that step only for an EMA codebook, so a learnable shared
  codebook's in-place optimiser never steps there).
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat._common import dropout_count, dropout_translation, refuse, set_vqp_dropout
from vqtriton.compat.vector_quantize import (
    UNSUPPORTED, CodebookViews, VectorQuantize, codebook_from_vqp, codebook_to_vqp, init_codes_, positions, translate,
    vqp_loss, vqp_loss_from_parts,
)
from vqtriton.residual import ResidualVQ as NativeResidualVQ

__all__ = ["ResidualVQ"]

# vqp's VectorQuantize arguments that a residual level takes from vq_kwargs, with their defaults.
_VQ_DEFAULTS = {n: p.default for n, p in inspect.signature(VectorQuantize.__init__).parameters.items()
                if n not in ("self", "dim", "codebook_size")}
# VectorQuantize arguments the residual module sets for its levels itself.
_SET_BY_RVQ = ("codebook_dim", "accept_image_fmap", "return_zeros_for_masked_padding")


def _level_arguments(vq_kwargs: dict) -> dict:
    """vq_kwargs completed with VectorQuantize's defaults; an unknown name is a TypeError (as vqp's levels
    raise), an unimplemented value a NotImplementedError naming it."""
    unknown = sorted(set(vq_kwargs) - set(_VQ_DEFAULTS))
    if unknown:
        raise TypeError(f"vqtriton.compat.ResidualVQ got unexpected keyword arguments {unknown} (not VectorQuantize's)")
    given = {**_VQ_DEFAULTS, **vq_kwargs}
    refuse("ResidualVQ", given, UNSUPPORTED, "a VectorQuantize argument of its levels")
    return given


class ResidualVQ(nn.Module):
    """vector-quantize-pytorch 1.32.0's ``ResidualVQ`` on vqtriton (see the module docstring).
    vqtriton's own ``precision``, ``backend`` and ``deterministic`` may be given among ``vq_kwargs``."""

    def __init__(
        self,
        *,
        dim,
        num_quantizers=None,
        codebook_size,
        codebook_dim=None,
        shared_codebook=False,
        diveq=False,
        heads=1,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        accept_image_fmap=False,
        implicit_neural_codebook=False,
        mlp_kwargs=dict(),  # noqa: B006 (vqp's default, never mutated here)
        beam_size=None,
        eval_beam_size=None,
        beam_score_quantizer_weights=None,
        quant_grad_frac=0.0,
        return_zeros_for_masked_padding=True,
        **vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError(f"residual vq is not compatible with multi-headed codes (as in vqp), got heads = {heads}")
        level = _level_arguments(vq_kwargs)
        self.dim = checks.integer("dim", dim, 1)
        self.codebook_dim = self.dim if codebook_dim is None else checks.integer("codebook_dim", codebook_dim, 1)
        sizes = tuple(codebook_size) if isinstance(codebook_size, (tuple, list)) else codebook_size
        if num_quantizers is None and not isinstance(sizes, tuple):
            raise ValueError("give num_quantizers, or codebook_size as a tuple of one size per level (as in vqp)")
        self.accept_image_fmap = bool(accept_image_fmap)
        self.channel_last = bool(level["channel_last"])
        self.accept_3d_fmap = bool(level["accept_3d_fmap"])
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        self.diveq = bool(diveq)
        self.shared_codebook = bool(shared_codebook)
        if self.implicit_neural_codebook:
            level.update(learnable_codebook=True, ema_update=False)
        if self.diveq:
            level.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False, commitment_weight=0.0)
        self.has_projections = self.codebook_dim != self.dim
        self.project_in = nn.Linear(self.dim, self.codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if self.has_projections else nn.Identity()

        cd = self.codebook_dim
        native, self.settings = translate(
            cd, 1, decay=level["decay"], eps=level["eps"], freeze_codebook=level["freeze_codebook"],
            kmeans_init=level["kmeans_init"], kmeans_iters=level["kmeans_iters"], sync_kmeans=level["sync_kmeans"],
            use_cosine_sim=level["use_cosine_sim"], threshold_ema_dead_code=level["threshold_ema_dead_code"],
            commitment_weight=level["commitment_weight"], stochastic_sample_codes=level["stochastic_sample_codes"],
            sample_codebook_temp=level["sample_codebook_temp"], straight_through=level["straight_through"],
            rotation_trick=level["rotation_trick"], directional_reparam=level["directional_reparam"],
            directional_reparam_variance=level["directional_reparam_variance"], sync_codebook=level["sync_codebook"],
            ema_update=level["ema_update"], learnable_codebook=level["learnable_codebook"],
            manual_ema_update=level["manual_ema_update"] and not self.shared_codebook,
            route_gradients_to_input=level["route_gradients_to_input"],
            commitment_use_cross_entropy_loss=level["commitment_use_cross_entropy_loss"],
            orthogonal_reg_weight=level["orthogonal_reg_weight"],
            orthogonal_reg_active_codes_only=level["orthogonal_reg_active_codes_only"],
            orthogonal_reg_max_codes=level["orthogonal_reg_max_codes"], sync_update_v=level["sync_update_v"],
            vq_bridge=level["vq_bridge"], codebook_diversity_loss_weight=level["codebook_diversity_loss_weight"],
            codebook_diversity_temperature=level["codebook_diversity_temperature"],
            affine_param=level["affine_param"], sync_affine_param=level["sync_affine_param"],
            affine_param_batch_decay=level["affine_param_batch_decay"],
            affine_param_codebook_decay=level["affine_param_codebook_decay"],
            in_place_codebook_optimizer=level["in_place_codebook_optimizer"],
            # a shared codebook: one in-place step after the last level (as vqp's, whose levels are then manual)
            manual_in_place_optimizer_update=level["manual_in_place_optimizer_update"] and not self.shared_codebook,
            precision=level["precision"], backend=level["backend"], deterministic=level["deterministic"],
        )
        native.pop("heads"), native.pop("shared_codebook")
        num_q = num_quantizers if not isinstance(sizes, tuple) else len(sizes)
        set_vqp_dropout(self, num_q, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        weights = beam_score_quantizer_weights
        self.beam_size, self.eval_beam_size = beam_size, eval_beam_size if eval_beam_size is not None else beam_size
        # The residual module and its levels' random codebooks must not shift the generator: vqp's codes are
        # drawn below, in vqp's order, so that one seed gives vqp's initial state.
        with torch.random.fork_rng(devices=[]):
            self.residual = NativeResidualVQ(
                cd, sizes, num_quantizers, shared_codebook=self.shared_codebook, **dropout_translation(self),
                output_gradient="every", quant_grad_frac=quant_grad_frac, implicit_neural_codebook=self.implicit_neural_codebook,
                mlp_kwargs=mlp_kwargs or None, beam_size=beam_size, eval_beam_size=eval_beam_size,
                beam_score_weights=None if weights is None else [float(w) for w in weights], diveq=self.diveq, **native,
            )
        self.num_quantizers = self.residual.num_quantizers
        self._unused = []
        for i, layer in enumerate(self.residual.layers):
            if i > 0 and self.shared_codebook:  # vqp draws every level's codes, then keeps the first level's
                init_codes_(copy.deepcopy(layer), 1, level["kmeans_init"], level["use_cosine_sim"], self.settings.ema)
                continue
            unused = init_codes_(layer, 1, level["kmeans_init"], level["use_cosine_sim"], self.settings.ema)
            if unused is not None:
                self.register_buffer(f"_vqp_cluster_size_{i}", unused["cluster_size"], persistent=False)
                self.register_buffer(f"_vqp_embed_avg_{i}", unused["embed_avg"], persistent=False)
            if not self.settings.ema and not self.settings.codebook_is_parameter:
                layer.codebook.requires_grad_(False)
        if self.residual.mlps is not None:
            for m in self.residual.mlps.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        self._register_state_dict_hook(_to_vqp_layout)
        self._register_load_state_dict_pre_hook(_from_vqp_layout, with_module=True)

    def _level_unused(self, i: int) -> dict | None:
        j = 0 if self.shared_codebook else i
        if not hasattr(self, f"_vqp_cluster_size_{j}"):
            return None
        return {"cluster_size": getattr(self, f"_vqp_cluster_size_{j}"), "embed_avg": getattr(self, f"_vqp_embed_avg_{j}")}

    # --- vqp's properties ----------------------------------------------------------------------------

    @property
    def layers(self) -> tuple:
        """vqp's levels as far as code reads them: each with ``_codebook`` (:class:`CodebookView`),
        ``codebook``, ``codebook_size``; the native levels are ``self.residual.layers``."""
        return tuple(_Level(layer, self._level_unused(i), self.settings) for i, layer in enumerate(self.residual.layers))

    @property
    def mlps(self):
        return self.residual.mlps if self.residual.mlps is not None else (None,) * (self.num_quantizers - 1)

    @property
    def codebook_size(self) -> int:
        return self.residual.codebook_sizes[0]

    @property
    def codebook_sizes(self) -> tuple:
        return self.residual.codebook_sizes

    @property
    def uniform_codebook_size(self) -> bool:
        return len(set(self.codebook_sizes)) == 1

    @property
    def codebooks(self):
        """Every level's codes: ``[Q, K, d]``, or a tuple of ``[K_l, d]`` when the sizes differ (as vqp)."""
        books = tuple(layer.codebook for layer in self.residual.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    # --- the call ---------------------------------------------------------------------------------------

    def forward(
        self,
        x,
        mask=None,
        indices=None,
        return_all_codes=False,
        sample_codebook_temp=None,
        freeze_codebook=False,
        beam_size=None,
        rand_quantize_dropout_fixed_seed=None,
    ):
        """``(quantized, indices [..., Q], losses [Q])``, plus every level's codes ``[Q, ..., d]`` with
        ``return_all_codes``; with ``indices`` given (``[..., Q]`` or a list of ``[...]``): ``(quantized,
        cross-entropy loss)``."""
        levels = None if indices is not None else dropout_count(self, rand_quantize_dropout_fixed_seed, needs_grad=False)
        return self._forward(x, mask, indices, return_all_codes, sample_codebook_temp, freeze_codebook, beam_size, levels)

    def _forward(self, x, mask, indices, return_all_codes, sample_codebook_temp, freeze_codebook, beam_size, levels):
        checks.float_tensor("x", x)
        if indices is not None:
            return self._cross_entropy(x, mask, indices)
        channel_first = self._channel_first(x)
        if mask is not None and x.dim() != 3:
            raise ValueError(f"mask needs x [B, N, D] (or [B, D, N]), got x {tuple(x.shape)}")
        x_last = x.movedim(1, -1) if channel_first else x
        if x_last.shape[-1] != self.dim:
            raise ValueError(f"x must have dim = {self.dim} channels, got x {tuple(x.shape)}")
        z = self.project_in(x_last)
        temperature = sample_codebook_temp if self.settings.stochastic else None
        beam = self.residual.beam_size if self.training else self.residual.eval_beam_size
        beam = beam if beam_size is None else beam_size
        searching = beam is not None and beam > 1
        parts = self.settings.needs_parts and not searching
        if searching and self.training and self.residual.layers[0].in_place_optimizer is not None:
            raise ValueError("the beam search in training is not supported with an in_place_codebook_optimizer (vqp "
                             "refuses its top-k codes in training with one)")
        if searching and self.training and self.settings.needs_parts:
            raise NotImplementedError("vqtriton.compat.ResidualVQ: the beam search in training with "
                                      "commitment_use_cross_entropy_loss (vqp refuses it too) or orthogonal_reg_weight > 0 "
                                      "is not implemented")
        out, idx, _, losses, *breakdowns = self.residual(
            z, mask, return_all_losses=True, num_active=levels, temperature=temperature, freeze_codebook=freeze_codebook,
            beam_size=beam_size, route_gradients_to_input=self.settings.route_gradients_to_input and z.requires_grad,
            return_breakdowns=parts, diversity_positions=positions(z),
        )
        out = self.project_out(out)
        if mask is not None:
            fill = torch.zeros_like(out) if self.return_zeros_for_masked_padding else x_last
            out = torch.where(mask.unsqueeze(-1), out, fill)
        if channel_first:
            out = out.movedim(-1, 1)
        if parts:
            losses = torch.stack([vqp_loss_from_parts(p, self.settings, self.training) for p in breakdowns[0]])
        else:
            losses = vqp_loss(losses, self.settings, self.training, per_candidate=searching)
        if losses.dim() == 0:
            losses = losses.expand(self.num_quantizers)
        result = (out, idx, losses)
        return (*result, self.get_codes_from_indices(idx)) if return_all_codes else result

    def _channel_first(self, t: torch.Tensor) -> bool:
        return t.dim() > 2 and (not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap)

    def _cross_entropy(self, x, mask, indices):
        """vqp's ``indices=`` path as it intends (vqp's own crashes): ``(quantized, loss)``, ``quantized`` the
        reconstruction from the given codes, ``loss`` the sum over levels of each level's cross entropy of its
        code logits (on the residual the given codes leave) against its given index."""
        if isinstance(indices, (list, tuple)):
            indices = torch.stack(list(indices), -1)
        channel_first = self._channel_first(x)
        x_last = x.movedim(1, -1) if channel_first else x
        out, losses = self.residual.cross_entropy(self.project_in(x_last), indices, mask)
        out = self.project_out(out)
        if mask is not None:
            fill = torch.zeros_like(out) if self.return_zeros_for_masked_padding else x_last
            out = torch.where(mask.unsqueeze(-1), out, fill)
        return (out.movedim(-1, 1) if channel_first else out), losses.sum()

    # --- indices back to codes ----------------------------------------------------------------------

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Every level's codes ``[Q, B, ..., d]`` (channel-last, as vqp) for ``indices [B, ..., q]``; fewer
        levels than Q (with quantize dropout) are padded with -1, which gives zeros."""
        q = indices.shape[-1]
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("quantize dropout must be on to reconstruct from fewer levels than num_quantizers "
                                 f"(as in vqp): got indices for {q} of {self.num_quantizers}")
            indices = nn.functional.pad(indices, (0, self.num_quantizers - q), value=-1)
        return self.residual.get_codes_from_indices(indices)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``project_out`` of the sum of the levels' codes, channel-last (as vqp)."""
        return self.project_out(self.get_codes_from_indices(indices).sum(0))


class _Level(CodebookViews):
    """One level as vqp's ``rvq.layers[i]`` shows it (a view of the native level)."""

    _num_books = 1

    def __init__(self, layer, unused, settings):
        self.quantizer, self._unused_stats, self._settings = layer, unused, settings

    def _unused(self) -> dict | None:
        return self._unused_stats

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook

    @property
    def codebook_size(self) -> int:
        return self.quantizer.num_codes

    @property
    def ema_update(self) -> bool:
        return self._settings.ema


# --- state_dict in vqp's layout ---------------------------------------------------------------------


def _to_vqp_layout(module: ResidualVQ, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: ``residual.layers.{i}.*`` as vqp's ``layers.{i}._codebook.*`` (every level, also
    when they share one codebook, as vqp lists it), ``residual.mlps.*`` as ``mlps.*``, in vqp's order."""
    ours = prefix + "residual."
    for i, layer in enumerate(module.residual.layers):
        codebook_to_vqp(state_dict, f"{ours}layers.{i}.", f"{prefix}layers.{i}._codebook.", layer, 1,
                        module.settings.codebook_is_parameter, module._level_unused(i))
    for key in [k for k in state_dict if k.startswith(ours)]:
        state_dict[prefix + key[len(ours):]] = state_dict.pop(key)
    # vqp's order: the projections, then every level's codebook, then the MLPs.
    moved = [k for k in state_dict if k.startswith(prefix + "mlps.")]
    for k in moved:
        state_dict[k] = state_dict.pop(k)


def _from_vqp_layout(module: ResidualVQ, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: vqp's keys to the native module's; this module's own layout
    (``residual.*``) passes unchanged."""
    if prefix + "layers.0._codebook.embed" not in state_dict:
        return
    ours = prefix + "residual."
    for i, layer in enumerate(module.residual.layers):
        codebook_from_vqp(state_dict, f"{prefix}layers.{i}._codebook.", f"{ours}layers.{i}.", layer, 1,
                          module._level_unused(i), "codebook_size, num_quantizers and codebook_dim")
    for key in [k for k in state_dict if k.startswith(prefix + "mlps.")]:
        state_dict[ours + key[len(prefix):]] = state_dict.pop(key)
