"""``vqtriton.compat.VectorQuantize``: a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

The same constructor arguments and defaults as vector-quantize-pytorch (vqp) 1.32.0, the same call
``quantized, indices, loss = vq(x, mask=None, lens=None)`` with the same shapes in training and eval
mode, ``get_output_from_indices`` / ``get_codes_from_indices``, and vqp's checkpoints: the state_dict
keys and shapes are vqp's (``_codebook.embed``, ``_codebook.cluster_size``, ``_codebook.embed_avg``,
``_codebook.initted``, ``project_in.*``, ``project_out.*``), in both directions. The quantizer itself is
:class:`vqtriton.VectorQuantizer` (``vq.quantizer``): this module only translates arguments, layouts,
loss conventions and state_dict keys. A vqp argument it does not implement raises
``NotImplementedError`` naming it when given a value other than vqp's default; none is ignored.

vqp's conventions kept: the codebook initialised as vqp does (kaiming-uniform, zeros under k-means
init; the same values as vqp's for the same seed); ``decay`` and ``eps`` of the EMA; the rotation
trick on by default for ``dim > 1``; the loss ``commitment_weight * mse`` in training (for a learnable
codebook that same mse also trains the codebook) and 0 in eval mode; masked vectors give zeros and
index -1. Differences, by design: assignment is the exact nearest code (vqp's fp32 ``cdist`` can
pick another on near-ties); EMA statistics follow :class:`~vqtriton.VectorQuantizer` (a restarted
code starts with cluster size ``max(1, threshold)``, not ``threshold``); ``get_output_from_indices``
applies ``project_out`` to channel-last codes also for channel-first layouts (vqp applies it to the
wrong axis there); in eval mode the output keeps its straight-through gradient.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat._common import refuse
from vqtriton.layer import VectorQuantizer

__all__ = ["VectorQuantize", "LossBreakdown", "UNSUPPORTED", "UNSUPPORTED_FORWARD"]

# vqp's fourth output with return_loss_breakdown=True (the terms this module has; the others are 0).
LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

# vqp's constructor arguments not implemented here, with vqp's defaults: any other value is refused.
UNSUPPORTED = {
    "freeze_codebook": False,
    "sync_kmeans": True,
    "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "stochastic_sample_codes": False,
    "straight_through": False,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_affine_param": False,
    "vq_bridge": None,
    "manual_ema_update": False,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
    "route_gradients_to_input": True,
}
# vqp's forward arguments not implemented here, with their defaults.
UNSUPPORTED_FORWARD = {
    "indices": None,
    "topk": None,
    "freeze_codebook": None,
    "codebook_transform_fn": None,
    "ema_update_weight": None,
    "accum_ema_update": False,
    "ema_update": None,
}


def _projection(dim_in: int, dim_out: int, layernorm: bool) -> nn.Module:
    """vqp's ``project_in``: a Linear, followed by a LayerNorm with ``layernorm`` (an nn.Sequential then)."""
    linear = nn.Linear(dim_in, dim_out)
    return nn.Sequential(linear, nn.LayerNorm(dim_out)) if layernorm else linear


class VectorQuantize(nn.Module):
    """vector-quantize-pytorch 1.32.0's ``VectorQuantize`` on vqtriton's kernels (see the module docstring).

    ``precision``, ``backend`` and ``deterministic`` (keyword-only, vqtriton's own) pass to
    :class:`vqtriton.VectorQuantizer`.
    """

    def __init__(
        self,
        dim,
        codebook_size,
        codebook_dim=None,
        heads=1,
        separate_codebook_per_head=False,
        decay=0.8,
        eps=1e-5,
        freeze_codebook=False,
        kmeans_init=False,
        kmeans_iters=10,
        sync_kmeans=True,
        use_cosine_sim=False,
        layernorm_after_project_in=False,
        threshold_ema_dead_code=0,
        channel_last=True,
        accept_image_fmap=False,
        accept_3d_fmap=False,
        commitment_weight=1.0,
        commitment_use_cross_entropy_loss=False,
        orthogonal_reg_weight=0.0,
        orthogonal_reg_active_codes_only=False,
        orthogonal_reg_max_codes=None,
        codebook_diversity_loss_weight=0.0,
        codebook_diversity_temperature=100.0,
        stochastic_sample_codes=False,
        sample_codebook_temp=1.0,
        straight_through=False,
        rotation_trick=None,
        directional_reparam=False,
        directional_reparam_variance=5e-3,
        sync_codebook=None,
        sync_affine_param=False,
        ema_update=None,
        vq_bridge=None,
        manual_ema_update=False,
        learnable_codebook=None,
        in_place_codebook_optimizer=None,
        manual_in_place_optimizer_update=False,
        affine_param=False,
        affine_param_batch_decay=0.99,
        affine_param_codebook_decay=0.9,
        sync_update_v=0.0,
        return_zeros_for_masked_padding=True,
        route_gradients_to_input=True,
        *,
        precision: str = "exact",
        backend: str | None = None,
        deterministic: bool | None = None,
    ):
        super().__init__()
        refuse("VectorQuantize", locals(), UNSUPPORTED, "constructor")
        # sample_codebook_temp only acts with stochastic_sample_codes or straight_through (both refused):
        # without them vqp takes the argmax and never reads it, and neither does this module.
        self.dim = checks.integer("dim", dim, 1)
        self.codebook_size = checks.integer("codebook_size", codebook_size, 1)
        self.heads = checks.integer("heads", heads, 1)
        codebook_dim = self.dim if codebook_dim is None else checks.integer("codebook_dim", codebook_dim, 1)
        self.separate_codebook_per_head = bool(separate_codebook_per_head)
        ema = True if ema_update is None else bool(ema_update)
        learnable = False if learnable_codebook is None else bool(learnable_codebook)
        self.rotation_trick = self.dim > 1 if rotation_trick is None else bool(rotation_trick)
        if use_cosine_sim and learnable:
            raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True (as in vqp)")
        if ema and learnable:
            raise ValueError("learnable_codebook=True needs ema_update=False: an EMA codebook is not learned (as in vqp)")
        if threshold_ema_dead_code > 0 and not ema:
            raise NotImplementedError(
                "vqtriton.compat.VectorQuantize implements threshold_ema_dead_code > 0 only with ema_update=True "
                "(dead codes are found by the EMA cluster sizes)"
            )
        self.commitment_weight = checks.real("commitment_weight", commitment_weight, lambda v: v >= 0, ">= 0")
        self.channel_last = bool(channel_last)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.accept_3d_fmap = bool(accept_3d_fmap)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.ema = ema
        self.learnable_codebook = learnable

        inner = codebook_dim * self.heads
        self.has_projections = inner != self.dim
        self.project_in = _projection(self.dim, inner, layernorm_after_project_in) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, self.dim) if self.has_projections else nn.Identity()
        # The quantizer's own random codebook must not shift the generator: the codes below are drawn
        # where vqp draws them, after the projections, so that one seed gives vqp's initial codebook.
        with torch.random.fork_rng(devices=[]):
            self.quantizer = VectorQuantizer(
                inner,
                self.codebook_size,
                beta=1.0,
                ema_decay=decay if ema else None,
                eps=eps,
                metric="cosine" if use_cosine_sim else "l2",
                kmeans_init=kmeans_init,
                kmeans_iters=kmeans_iters,
                dead_code_threshold=threshold_ema_dead_code,
                heads=self.heads,
                shared_codebook=self.heads > 1 and not self.separate_codebook_per_head,
                sync=sync_codebook,
                rotation_trick=self.rotation_trick,
                reduction="mean",
                precision=precision,
                backend=backend,
                deterministic=deterministic,
            )
        self._init_codes(kmeans_init, use_cosine_sim)
        if not ema and not learnable:
            self.quantizer.codebook.requires_grad_(False)  # vqp's frozen codebook: neither EMA nor learned
        self._register_state_dict_hook(_to_vqp_layout)
        self._register_load_state_dict_pre_hook(_from_vqp_layout, with_module=True)

    @torch.no_grad()
    def _init_codes(self, kmeans_init: bool, cosine: bool) -> None:
        """vqp's initial codebook: zeros under k-means init, else kaiming-uniform ``[C, K, d]``
        (l2-normalised for cosine), C the number of codebooks; EMA statistics to match."""
        shape = (self._num_books, self.codebook_size, self.quantizer.head_dim)
        codes = torch.zeros(shape)
        if not kmeans_init:
            nn.init.kaiming_uniform_(codes)
            if cosine:
                codes = nn.functional.normalize(codes, dim=-1, eps=1e-6)
        q = self.quantizer
        q.codebook.copy_(codes.view_as(q.codebook))
        if self.ema:
            q.embed_sum.copy_(codes.view_as(q.embed_sum))
            q.cluster_size.fill_(1.0)
        else:
            # vqp keeps EMA statistics that a learned (or frozen) codebook never uses; they are kept here
            # too, only so that its checkpoints round-trip exactly.
            self.register_buffer("_vqp_cluster_size", torch.ones(shape[:2]), persistent=False)
            self.register_buffer("_vqp_embed_avg", codes.clone(), persistent=False)

    @property
    def _num_books(self) -> int:
        return self.heads if self.separate_codebook_per_head else 1

    # --- vqp's properties ----------------------------------------------------------------------------

    @property
    def ema_update(self) -> bool:
        return self.ema

    @property
    def codebook(self) -> torch.Tensor:
        """The codes: ``[K, d]``, or ``[heads, K, d]`` with separate codebooks per head (as vqp)."""
        return self.quantizer.codebook

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self.quantizer.codebook.copy_(codes)

    # --- the call ---------------------------------------------------------------------------------------

    def forward(
        self,
        x,
        indices=None,
        mask=None,
        lens=None,
        topk=None,
        sample_codebook_temp=None,
        freeze_codebook=None,
        return_loss_breakdown=False,
        codebook_transform_fn=None,
        ema_update_weight=None,
        accum_ema_update=False,
        ema_update=None,
    ):
        """``(quantized, indices, loss)`` (plus a :class:`LossBreakdown` with ``return_loss_breakdown``).

        ``x``: ``[B, N, D]`` (``[B, D, N]`` with ``channel_last=False``; ``[B, D, H, W]`` with
        ``accept_image_fmap``, ``[B, D, T, H, W]`` with ``accept_3d_fmap``; ``[B, D]`` for one vector
        each). ``mask [B, N]`` (or ``lens [B]``) marks the vectors to quantize. ``indices`` has ``x``'s
        shape without the channel dim (``[..., heads]``).
        """
        refuse("VectorQuantize", locals(), UNSUPPORTED_FORWARD, "forward")
        checks.float_tensor("x", x)
        if mask is not None and lens is not None:
            raise ValueError("give mask or lens, not both")
        if lens is not None:
            if x.dim() != 3:
                raise ValueError(f"lens needs x [B, N, D] (or [B, D, N]), got x {tuple(x.shape)}")
            n = x.shape[1] if self.channel_last else x.shape[2]
            mask = torch.arange(n, device=lens.device) < lens[:, None]
        self._check_layout(x, mask)
        channel_first = self._channel_first(x)
        x_last = x.movedim(1, -1) if channel_first else x
        z_q, idx, loss, *parts = self.quantizer(self.project_in(x_last), mask, return_breakdown=return_loss_breakdown)
        out = self.project_out(z_q)
        if mask is not None:
            fill = torch.zeros_like(x_last) if self.return_zeros_for_masked_padding else x_last
            out = torch.where(mask.unsqueeze(-1), out, fill)
        out = out.movedim(-1, 1) if channel_first else out
        loss = self._loss(loss)
        if return_loss_breakdown:
            zero = loss.new_zeros(())
            commitment = parts[0].commitment_loss if self.training else zero
            return out, idx, loss, LossBreakdown(commitment, zero, zero, zero)
        return out, idx, loss

    def _check_layout(self, x: torch.Tensor, mask) -> None:
        fmap = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        if fmap is not None and x.dim() != fmap:
            raise ValueError(f"accept_{'image' if fmap == 4 else '3d'}_fmap=True needs a {fmap}-D x, got x {tuple(x.shape)}")
        if fmap is None and x.dim() not in (2, 3):
            raise ValueError(f"x must be [B, N, D], [B, D, N] (channel_last=False) or [B, D], got x {tuple(x.shape)}")
        if mask is not None and (x.dim() != 3 or fmap is not None):
            raise ValueError(f"mask (or lens) needs x [B, N, D] (or [B, D, N]), got x {tuple(x.shape)}")

    def _channel_first(self, t: torch.Tensor) -> bool:
        """Whether vqp's layout puts the channels in dim 1 (a single vector per row ``[B, D]`` never moves)."""
        return t.dim() > 2 and (not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap)

    def _loss(self, loss: torch.Tensor) -> torch.Tensor:
        """vqp's loss from the quantizer's: ``commitment_weight * mse`` in training, where a learnable (or
        frozen) codebook's single ``mse(z_q, x)`` is what the quantizer splits into two stop-gradient
        terms of that same value (beta = 1): their sum less half its value keeps the gradients of both
        and the value of one. In eval mode vqp returns 0, and so does this."""
        if not self.training:
            return loss.new_zeros(())
        if not self.ema:
            loss = loss - 0.5 * loss.detach()
        return self.commitment_weight * loss

    # --- indices back to codes ----------------------------------------------------------------------

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes (before ``project_out``) of ``indices``, in the input layout (channel dim 1 for
        channel-first inputs); -1 gives zeros. With heads sharing one codebook, ``[..., heads, d]``
        (vqp's shape there), else the heads' codes concatenated."""
        codes = self.quantizer.get_output_from_indices(indices)
        if self.heads > 1 and not self.separate_codebook_per_head:
            codes = codes.unflatten(-1, (self.heads, -1))
        return codes.movedim(-1, 1) if self._channel_first(codes) else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``project_out`` of the codes of ``indices``, in the input layout."""
        codes = self.project_out(self.quantizer.get_output_from_indices(indices))
        return codes.movedim(-1, 1) if self._channel_first(codes) else codes


# --- state_dict in vqp's layout ---------------------------------------------------------------------

def _vqp_shapes(module: VectorQuantize) -> dict:
    """vqp's name -> (our name, vqp's shape) of each codebook tensor: ``[C, K, ...]``, C the number of
    codebooks (1 without separate codebooks per head)."""
    lead = (module._num_books, module.codebook_size)
    d = module.quantizer.head_dim
    return {"embed": ("codebook", (*lead, d)), "cluster_size": ("cluster_size", lead),
            "embed_avg": ("embed_sum", (*lead, d)), "initted": ("initted", ())}


def _to_vqp_layout(module: VectorQuantize, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: the quantizer's tensors under vqp's names and shapes. A learned codebook has
    no EMA statistics: vqp's unused buffers are written as they were loaded (or initialised)."""
    ours, theirs = prefix + "quantizer.", prefix + "_codebook."
    shapes = _vqp_shapes(module)
    if not module.ema:
        state_dict[ours + "cluster_size"] = module._vqp_cluster_size.detach().clone()
        state_dict[ours + "embed_sum"] = module._vqp_embed_avg.detach().clone()
    # vqp's order: a learnable codebook is a parameter (listed before buffers), else a buffer registered last.
    order = ("embed", "initted", "cluster_size", "embed_avg")
    for vqp_name in order if module.learnable_codebook else (*order[1:], order[0]):
        name, shape = shapes[vqp_name]
        state_dict[theirs + vqp_name] = state_dict.pop(ours + name).reshape(shape)


def _from_vqp_layout(module: VectorQuantize, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: vqp's keys (``_codebook.*``) to the quantizer's, reshaped; a state_dict
    in this module's own layout (``quantizer.*``) passes unchanged. A learned codebook drops vqp's EMA
    statistics into the buffers that keep them for saving. A key that is absent is reported by
    load_state_dict."""
    theirs, ours = prefix + "_codebook.", prefix + "quantizer."
    if theirs + "embed" not in state_dict:
        return
    for vqp_name, (name, shape) in _vqp_shapes(module).items():
        if theirs + vqp_name not in state_dict:
            continue
        value = state_dict.pop(theirs + vqp_name)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{theirs + vqp_name} has shape {tuple(value.shape)} in the checkpoint, this module expects {shape} "
                f"(codebook_size, heads, separate_codebook_per_head and codebook_dim must match the checkpoint's)"
            )
        if hasattr(module.quantizer, name):
            state_dict[ours + name] = value.reshape(getattr(module.quantizer, name).shape)
        else:  # a learned codebook's unused EMA statistics
            with torch.no_grad():
                getattr(module, "_vqp_" + vqp_name).copy_(value)
