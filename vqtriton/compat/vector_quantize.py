"""``vqtriton.compat.VectorQuantize``: a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

The same constructor arguments and defaults as vector-quantize-pytorch (vqp) 1.32.0, the same call
``quantized, indices, loss = vq(x, mask=None, lens=None, ...)`` with the same shapes in training and eval
mode, ``get_output_from_indices`` / ``get_codes_from_indices``, ``update_indices``, the ``_codebook`` view
(``embed``, ``cluster_size``, ``embed_avg``, ``initted``, ``update_ema()``), and vqp's checkpoints: the
state_dict keys and shapes are vqp's (``_codebook.embed``, ``_codebook.cluster_size``,
``_codebook.embed_avg``, ``_codebook.initted``, ``project_in.*``, ``project_out.*``), in both directions.
The quantizer itself is :class:`vqtriton.VectorQuantizer` (``vq.quantizer``): this module only translates
arguments, layouts, loss conventions and state_dict keys. Every vqp 1.32.0 argument is implemented
(``UNSUPPORTED`` is empty; an argument listed there would raise ``NotImplementedError`` naming it when given
a value other than vqp's default); none is ignored.

``affine_param`` (with its decays and ``sync_affine_param``) is the native ``affine=True`` with vqp's rule of
moving the batch statistics in eval calls too; its buffers appear under vqp's names (``_codebook.batch_mean``,
``batch_variance``, ``codebook_mean_needs_init``, ``codebook_mean``, ``codebook_variance_needs_init``,
``codebook_variance``), the batch statistics only once a batch was seen (vqp registers them as None until its
first call, and None buffers are not in a state_dict). ``in_place_codebook_optimizer`` is the native
``in_place_optimizer``: vqp's backward and optimiser step inside the training forward, run eagerly (a graph
break under torch.compile).

vqp's conventions kept: the codebook initialised as vqp does (kaiming-uniform, zeros under k-means
init; the same values as vqp's for the same seed); ``decay`` and ``eps`` of the EMA (a learnable codebook
that restarts dead codes tracks its usage with that same ``decay``); the rotation trick on by default for
``dim > 1``; the loss ``commitment_weight * mse`` in training (for a learnable codebook that same mse also
trains the codebook) and 0 in eval mode; masked vectors give zeros and index -1; in eval mode, or when
the input does not require a gradient, the output is the codes themselves (a learnable codebook's gradient,
none to the input), as vqp. Differences, by design: assignment is the exact nearest code (vqp's fp32
``cdist`` can pick another on near-ties); a restarted code starts with cluster size ``max(1, threshold)``,
not ``threshold``; ``get_output_from_indices`` applies ``project_out`` to channel-last codes also for
channel-first layouts (vqp applies it to the wrong axis there); sampled codes (``stochastic_sample_codes``)
come from a counter-based generator, not torch's (the same distribution, other draws). With ``affine_param``:
before a first training call the codes' own statistics stand in for the codebook mean and variance (vqp reads
its uninitialised ``torch.empty`` buffers there); a batch without a kept vector leaves the batch statistics
(vqp's become NaN), and non-finite vectors count in none of them; ``get_output_from_indices`` returns the codes
through the affine map, as the forward outputs them (vqp's returns the raw codes).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn

from vqtriton import checks
from vqtriton.compat._common import refuse
from vqtriton.layer import VectorQuantizer

__all__ = ["VectorQuantize", "LossBreakdown", "UNSUPPORTED", "UNSUPPORTED_FORWARD", "CodebookView"]

# vqp's fourth output with return_loss_breakdown=True (the terms this module has; the others are 0).
LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

# vqp's constructor arguments not implemented here, with vqp's defaults: any other value is refused (none
# today: every one is implemented; the machinery stays for arguments a later vqp adds).
UNSUPPORTED: dict = {}
# vqp's forward arguments not implemented here, with their defaults (none: every one is).
UNSUPPORTED_FORWARD: dict = {}


def _projection(dim_in: int, dim_out: int, layernorm: bool) -> nn.Module:
    """vqp's ``project_in``: a Linear, followed by a LayerNorm with ``layernorm`` (an nn.Sequential then)."""
    linear = nn.Linear(dim_in, dim_out)
    return nn.Sequential(linear, nn.LayerNorm(dim_out)) if layernorm else linear


@dataclass(frozen=True)
class Settings:
    """What a translator keeps of vqp's arguments besides the native layer's own (see :func:`translate`)."""

    ema: bool
    learnable: bool
    stochastic: bool
    commitment_weight: float
    has_commitment_loss: bool
    route_gradients_to_input: bool
    cross_entropy_commitment: bool = False
    orthogonal_reg_weight: float = 0.0
    diversity_weight: float = 0.0

    @property
    def codebook_is_parameter(self) -> bool:
        """vqp's codebook is a parameter when learnable or trained by the orthogonal regulariser."""
        return self.learnable or self.orthogonal_reg_weight > 0

    @property
    def needs_parts(self) -> bool:
        """vqp's training loss needs the native loss's terms apart (not the sum)."""
        return self.cross_entropy_commitment or self.orthogonal_reg_weight > 0 or self.diversity_weight > 0


def translate(dim: int, codebook_size: int, *, heads: int = 1, separate_codebook_per_head: bool = False, decay=0.8,
              eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10, sync_kmeans=True,
              use_cosine_sim=False, threshold_ema_dead_code=0, commitment_weight=1.0, stochastic_sample_codes=False,
              sample_codebook_temp=1.0, straight_through=False, rotation_trick=None, directional_reparam=False,
              directional_reparam_variance=5e-3, sync_codebook=None, ema_update=None, learnable_codebook=None,
              manual_ema_update=False, route_gradients_to_input=True, commitment_use_cross_entropy_loss=False,
              orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
              sync_update_v=0.0, vq_bridge=None, codebook_diversity_loss_weight=0.0,
              codebook_diversity_temperature=100.0, affine_param=False, sync_affine_param=False,
              affine_param_batch_decay=0.99, affine_param_codebook_decay=0.9, in_place_codebook_optimizer=None,
              manual_in_place_optimizer_update=False, precision="exact", backend=None,
              deterministic=None) -> tuple[dict, Settings]:
    """vqp's codebook arguments (with its defaults and its argument checks) as the keyword arguments of a
    :class:`vqtriton.VectorQuantizer` of ``dim`` channels (the codebook's, after ``project_in``), and the
    :class:`Settings` a translator needs. One place for VectorQuantize and the residual translators."""
    bridged = vq_bridge is not None
    ema = not directional_reparam and not bridged if ema_update is None else bool(ema_update)
    learnable = bool(directional_reparam) or bridged if learnable_codebook is None else bool(learnable_codebook)
    if bridged and (ema or not learnable):
        raise ValueError("vq_bridge needs learnable_codebook=True and ema_update=False (as in vqp)")
    rotation = (not directional_reparam and dim > 1) if rotation_trick is None else bool(rotation_trick)
    if use_cosine_sim and learnable:
        raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True (as in vqp)")
    if ema and learnable:
        raise ValueError("learnable_codebook=True needs ema_update=False: an EMA codebook is not learned (as in vqp)")
    if sum(map(bool, (straight_through, rotation, directional_reparam))) > 1:
        raise ValueError("at most one of straight_through, rotation_trick and directional_reparam may be on (as in vqp; "
                         "rotation_trick defaults to True for dim > 1)")
    if directional_reparam and threshold_ema_dead_code == 0:
        raise ValueError("directional_reparam=True needs threshold_ema_dead_code > 0 (as in vqp)")
    if straight_through and learnable:
        raise ValueError("straight_through=True is not allowed with a learnable codebook (as in vqp)")
    if sync_update_v > 0 and not learnable:
        raise ValueError("sync_update_v > 0 needs learnable_codebook=True (as in vqp)")
    if orthogonal_reg_active_codes_only and heads > 1 and separate_codebook_per_head:
        raise ValueError("orthogonal_reg_active_codes_only is not compatible with separate codebooks per head (as in vqp)")
    if affine_param and use_cosine_sim:
        raise ValueError("affine_param=True is only compatible with the euclidean codebook, not use_cosine_sim (as in vqp)")
    if in_place_codebook_optimizer is not None and not (learnable or orthogonal_reg_weight > 0):
        raise ValueError("in_place_codebook_optimizer needs a codebook parameter: learnable_codebook=True (or "
                         "orthogonal_reg_weight > 0); vqp's optimizer would get an empty parameter list")
    temperature = checks.real("sample_codebook_temp", sample_codebook_temp, lambda v: True, "a number")
    native = dict(
        beta=1.0,
        ema_decay=decay if ema else None,
        usage_decay=decay,
        eps=eps,
        metric="cosine" if use_cosine_sim else "l2",
        kmeans_init=kmeans_init,
        kmeans_iters=kmeans_iters,
        sync_kmeans=sync_kmeans,
        dead_code_threshold=threshold_ema_dead_code,
        heads=heads,
        shared_codebook=heads > 1 and not separate_codebook_per_head,
        sync=sync_codebook,
        rotation_trick=rotation,
        directional_reparam=bool(directional_reparam),
        directional_reparam_variance=directional_reparam_variance,
        route_gradients_to_input=bool(route_gradients_to_input),
        # vqp's eval output is the codes: no straight-through gradient to the input.
        straight_through_in_eval=False,
        # vqp samples only with stochastic_sample_codes; sample_codebook_temp alone changes nothing.
        sample_temperature=max(temperature, 0.0) if stochastic_sample_codes else 0.0,
        freeze_codebook=bool(freeze_codebook),
        manual_ema_update=bool(manual_ema_update),
        commitment_cross_entropy=bool(commitment_use_cross_entropy_loss),
        orthogonal_reg_weight=orthogonal_reg_weight,
        orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
        orthogonal_reg_max_codes=orthogonal_reg_max_codes,
        sync_update_v=sync_update_v,
        codebook_fn=vq_bridge,
        codebook_diversity_weight=codebook_diversity_loss_weight,
        codebook_diversity_temperature=codebook_diversity_temperature,
        affine=bool(affine_param),
        affine_batch_decay=affine_param_batch_decay,
        affine_codebook_decay=affine_param_codebook_decay,
        # vqp moves its batch statistics in eval calls too, and synchronises them only with sync_affine_param.
        affine_eval_update=True,
        sync_affine=bool(sync_affine_param),
        in_place_optimizer=in_place_codebook_optimizer,
        manual_in_place_update=bool(manual_in_place_optimizer_update),
        reduction="mean",
        precision=precision,
        backend=backend,
        deterministic=deterministic,
    )
    c = checks.real("commitment_weight", commitment_weight, lambda v: v >= 0, ">= 0")
    settings = Settings(ema, learnable, bool(stochastic_sample_codes), c, c > 0 and not directional_reparam,
                        bool(route_gradients_to_input), bool(commitment_use_cross_entropy_loss), float(orthogonal_reg_weight),
                        float(codebook_diversity_loss_weight))
    return native, settings


def vqp_loss_from_parts(parts, settings: Settings, training: bool) -> torch.Tensor:
    """vqp's training loss from a native layer's :class:`~vqtriton.QuantizerBreakdown` (beta = 1):
    ``commitment_weight * commitment + orthogonal_reg_weight * orthogonal``, the commitment being the cross
    entropy, or the mse (for a learnable codebook with both stop-gradient terms' gradients, as
    :func:`vqp_loss`); 0 in eval mode."""
    zero = parts.commitment_loss.new_zeros(())
    if not training:
        return zero
    if settings.cross_entropy_commitment:
        commit = parts.commitment_loss
    elif settings.ema:
        commit = parts.commitment_loss
    else:
        both = parts.codebook_loss + parts.commitment_loss
        commit = both - 0.5 * both.detach()
    loss = settings.commitment_weight * commit if settings.has_commitment_loss else zero
    if parts.diversity_loss is not None:
        loss = loss + settings.diversity_weight * parts.diversity_loss
    if parts.orthogonal_loss is not None:
        loss = loss + settings.orthogonal_reg_weight * parts.orthogonal_loss
    return loss


def positions(x_last) -> int:
    """vqp's sequence positions of channel-last vectors ``[B, ..., D]`` (its codebook-diversity loss averages
    over the batch at each): every vector of a sample is a position (one for ``[B, D]``)."""
    return max(1, x_last[0, ..., 0].numel()) if x_last.dim() > 2 else 1


def vqp_loss(loss: torch.Tensor, settings: Settings, training: bool, *, per_candidate: bool = False) -> torch.Tensor:
    """vqp's loss from a native layer's (beta = 1): ``commitment_weight * mse`` in training. A learnable (or
    frozen) codebook's single ``mse(z_q, x)`` is what the native layer splits into two stop-gradient terms of
    that same value (codebook + commitment): their sum less half its value keeps the gradients of both and the
    value of one. In eval mode vqp returns 0 (top-k candidates keep their losses, as vqp)."""
    if not training and not per_candidate:
        return loss.new_zeros(())
    if not settings.ema:
        loss = loss - 0.5 * loss.detach()
    if not settings.has_commitment_loss:
        return loss if per_candidate and not training else loss.new_zeros(())
    return settings.commitment_weight * loss


class CodebookView:
    """vqp's ``vq._codebook`` for one native layer: ``embed`` ``[C, K, d]``, ``cluster_size`` ``[C, K]``,
    ``embed_avg``, ``initted`` (views of the layer's tensors; a learned codebook that tracks no usage shows
    the unused statistics kept for vqp's checkpoints), ``codebook_size``, ``num_codebooks`` and
    ``update_ema()`` (an EMA codebook's codes from its statistics)."""

    def __init__(self, quantizer: VectorQuantizer, num_books: int, unused: dict | None):
        self._q, self.num_codebooks, self._unused = quantizer, num_books, unused
        self.codebook_size = quantizer.num_codes

    def _shaped(self, t: torch.Tensor, trailing: tuple = ()) -> torch.Tensor:
        return t.view(self.num_codebooks, self.codebook_size, *trailing)

    @property
    def embed(self) -> torch.Tensor:
        return self._shaped(self._q.codebook, (self._q.head_dim,))

    @property
    def cluster_size(self) -> torch.Tensor:
        return self._shaped(self._q.cluster_size if self._q.keeps_statistics else self._unused["cluster_size"])

    @property
    def embed_avg(self) -> torch.Tensor:
        return self._shaped(self._q.embed_sum if self._q.keeps_statistics else self._unused["embed_avg"], (self._q.head_dim,))

    @property
    def initted(self) -> torch.Tensor:
        return self._q.initted

    def _affine(self, name: str):
        return getattr(self._q, name).view(self.num_codebooks, 1, self._q.head_dim) if self._q.affine else None

    @property
    def batch_mean(self) -> torch.Tensor | None:
        """vqp's running batch mean ``[C, 1, d]`` (None before a first batch, or without ``affine_param``, as vqp)."""
        return self._affine("affine_batch_mean") if self._q.affine and bool(self._q.affine_batch_initted.all()) else None

    @property
    def batch_variance(self) -> torch.Tensor | None:
        return self._affine("affine_batch_var") if self.batch_mean is not None else None

    @property
    def codebook_mean(self) -> torch.Tensor | None:
        return self._affine("affine_codebook_mean")

    @property
    def codebook_variance(self) -> torch.Tensor | None:
        return self._affine("affine_codebook_var")

    @property
    def codebook_mean_needs_init(self) -> torch.Tensor | None:
        return ~self._q.affine_codebook_initted.all() if self._q.affine else None

    codebook_variance_needs_init = codebook_mean_needs_init

    def update_ema(self) -> None:
        self._q.refresh_codes()


class VqpTransform:
    """vqp's ``codebook_transform_fn`` (a callable of the codebook ``[1, K, d]`` returning per-token codes
    ``[1, b, n, K, d]``) as :class:`vqtriton.qinco.RowCodebooks`: called once per codebook it is given (the
    codebook as the layer compares it; again when those codes have changed in place); its codes are the rows'
    codebooks."""

    def __init__(self, fn, rows: int):
        self._fn, self._rows, self._table, self._source = fn, rows, None, None

    def _codes(self, codebook: torch.Tensor) -> torch.Tensor:
        # Built again for other codes (an in-place optimiser step changes them between its two passes).
        source = (codebook, codebook._version)
        if self._table is None or self._source[0] is not codebook or self._source[1] != source[1]:
            self._source = source
            with torch.enable_grad():  # built once (the search asks first, without gradient): keep its graph
                table = self._fn(codebook.unsqueeze(0))
                if not isinstance(table, torch.Tensor) or table.dim() != 5 or table.shape[0] != 1:
                    raise ValueError(f"codebook_transform_fn must return codes [1, b, n, K, d], got "
                                     f"{tuple(getattr(table, 'shape', ()))}")
                self._table = table.reshape(self._rows, *table.shape[-2:])
        return self._table

    def codes(self, codebook: torch.Tensor, rows: slice) -> torch.Tensor:
        return self._codes(codebook)[rows].detach()

    def chosen(self, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        table = self._codes(codebook)
        flat = idx.reshape(idx.shape[0], -1).clamp_min(0)
        out = table.gather(1, flat.unsqueeze(-1).expand(*flat.shape, table.shape[-1]))
        out = torch.where((idx.reshape(flat.shape) >= 0).unsqueeze(-1), out, 0)
        return out.reshape(*idx.shape, table.shape[-1])


def init_codes_(quantizer: VectorQuantizer, num_books: int, kmeans_init: bool, cosine: bool, ema: bool) -> dict | None:
    """vqp's initial codebook on a native layer: zeros under k-means init, else kaiming-uniform ``[C, K, d]``
    (l2-normalised for cosine; the same draw as vqp's), statistics to match. Returns, for a layer without
    statistics, vqp's unused ``cluster_size`` / ``embed_avg`` (kept only so that its checkpoints round-trip)."""
    shape = (num_books, quantizer.num_codes, quantizer.head_dim)
    codes = torch.zeros(shape)
    if not kmeans_init:
        nn.init.kaiming_uniform_(codes)
        if cosine:
            codes = nn.functional.normalize(codes, dim=-1, eps=1e-6)
    with torch.no_grad():
        quantizer.codebook.copy_(codes.view_as(quantizer.codebook))
        if quantizer.keeps_statistics:
            quantizer.embed_sum.copy_(codes.view_as(quantizer.embed_sum))
            quantizer.cluster_size.fill_(1.0)
            return None
    return {"cluster_size": torch.ones(shape[:2]), "embed_avg": codes.clone()}


def _vqp_shapes(quantizer: VectorQuantizer, num_books: int) -> dict:
    """vqp's name -> (native name, vqp's shape) of each codebook tensor: ``[C, K, ...]``."""
    lead = (num_books, quantizer.num_codes)
    d = quantizer.head_dim
    return {"embed": ("codebook", (*lead, d)), "cluster_size": ("cluster_size", lead),
            "embed_avg": ("embed_sum", (*lead, d)), "initted": ("initted", ())}


def codebook_to_vqp(state_dict: dict, ours: str, theirs: str, quantizer: VectorQuantizer, num_books: int,
                    learnable_param: bool, unused: dict | None) -> None:
    """In ``state_dict``, a native layer's tensors (keys ``ours + name``) under vqp's names (``theirs +
    name``) and shapes, in vqp's order (a learnable codebook is a parameter, listed before the buffers; else
    a buffer registered last). A layer without statistics writes vqp's unused ones as loaded (or initialised)."""
    if unused is not None:
        state_dict[ours + "cluster_size"] = unused["cluster_size"].detach().clone()
        state_dict[ours + "embed_sum"] = unused["embed_avg"].detach().clone()
    shapes = _vqp_shapes(quantizer, num_books)
    order = ("embed", "initted", "cluster_size", "embed_avg")
    for vqp_name in order if learnable_param else (*order[1:], order[0]):
        name, shape = shapes[vqp_name]
        state_dict[theirs + vqp_name] = state_dict.pop(ours + name).reshape(shape)
    if quantizer.affine:
        _affine_to_vqp(state_dict, ours, theirs, quantizer, num_books)
    bridge = ours + "codebook_fn."  # vqp's vq_bridge: a submodule of its codebook, after the codebook's tensors
    for key in [k for k in state_dict if k.startswith(bridge)]:
        state_dict[theirs + "vq_bridge." + key[len(bridge):]] = state_dict.pop(key)


def codebook_from_vqp(state_dict: dict, theirs: str, ours: str, quantizer: VectorQuantizer, num_books: int,
                      unused: dict | None, what: str) -> None:
    """The inverse of :func:`codebook_to_vqp` (a ``load_state_dict`` pre-hook's work); a key that is absent
    is left for load_state_dict to report; a shape that differs is a ValueError naming ``what`` must match."""
    bridge = theirs + "vq_bridge."
    for key in [k for k in state_dict if k.startswith(bridge)]:
        state_dict[ours + "codebook_fn." + key[len(bridge):]] = state_dict.pop(key)
    if quantizer.affine:
        _affine_from_vqp(state_dict, theirs, ours, quantizer, num_books, what)
    for vqp_name, (name, shape) in _vqp_shapes(quantizer, num_books).items():
        value = _pop_checked(state_dict, theirs + vqp_name, shape, what)
        if value is None:
            continue
        if hasattr(quantizer, name):
            state_dict[ours + name] = value.reshape(getattr(quantizer, name).shape)
        else:  # a learned codebook's unused statistics
            with torch.no_grad():
                unused["embed_avg" if vqp_name == "embed_avg" else "cluster_size"].copy_(value)


def _pop_checked(state_dict: dict, key: str, shape: tuple, what: str) -> torch.Tensor | None:
    """``state_dict.pop(key)`` (None when absent), a ValueError naming ``what`` when its shape is not ``shape``."""
    if key not in state_dict:
        return None
    value = state_dict.pop(key)
    if tuple(value.shape) != shape:
        raise ValueError(f"{key} has shape {tuple(value.shape)} in the checkpoint, this module expects {shape} "
                         f"({what} must match the checkpoint's)")
    return value


# vqp's affine buffers -> the native layer's: (batch mean, batch variance, codebook mean, codebook variance).
_AFFINE_NAMES = {"batch_mean": "affine_batch_mean", "batch_variance": "affine_batch_var",
                 "codebook_mean": "affine_codebook_mean", "codebook_variance": "affine_codebook_var"}


def _affine_to_vqp(state_dict: dict, ours: str, theirs: str, quantizer: VectorQuantizer, num_books: int) -> None:
    """The affine map's statistics in vqp's names, shapes ``[C, 1, d]`` and order. vqp registers its batch
    statistics as None until its first call (a None buffer is not in a state_dict): they are written only
    once every codebook has seen a batch; its ``*_needs_init`` flags are the negated ``initted`` flags."""
    shape = (num_books, 1, quantizer.head_dim)
    values = {vqp: state_dict.pop(ours + name) for vqp, name in _AFFINE_NAMES.items()}
    batch_seen = bool(state_dict.pop(ours + "affine_batch_initted").all())
    needs_init = ~state_dict.pop(ours + "affine_codebook_initted").all()
    if batch_seen:
        state_dict[theirs + "batch_mean"] = values["batch_mean"].reshape(shape)
        state_dict[theirs + "batch_variance"] = values["batch_variance"].reshape(shape)
    for stat in ("codebook_mean", "codebook_variance"):
        state_dict[theirs + stat + "_needs_init"] = needs_init.clone()
        state_dict[theirs + stat] = values[stat].reshape(shape)


def _affine_from_vqp(state_dict: dict, theirs: str, ours: str, quantizer: VectorQuantizer, num_books: int,
                     what: str) -> None:
    """The inverse of :func:`_affine_to_vqp`: a checkpoint from before vqp's first call (no batch statistics)
    loads with the batch statistics not yet seen. A checkpoint without vqp's affine buffers is left for
    load_state_dict to report (the native keys are then missing)."""
    if theirs + "codebook_mean_needs_init" not in state_dict:
        return
    shape = (num_books, 1, quantizer.head_dim)
    lead = quantizer.affine_batch_initted.shape
    needs_init = state_dict.pop(theirs + "codebook_mean_needs_init").bool()
    needs_init = needs_init | state_dict.pop(theirs + "codebook_variance_needs_init", needs_init).bool()
    state_dict[ours + "affine_codebook_initted"] = (~needs_init).expand(lead).clone()
    batch_seen = theirs + "batch_mean" in state_dict
    state_dict[ours + "affine_batch_initted"] = torch.full(lead, batch_seen, dtype=torch.bool)
    for vqp_name, name in _AFFINE_NAMES.items():
        if vqp_name.startswith("batch") and not batch_seen:  # not seen yet: this module's placeholder stays
            state_dict[ours + name] = getattr(quantizer, name).detach().clone()
            continue
        value = _pop_checked(state_dict, theirs + vqp_name, shape, what)
        if value is not None:
            state_dict[ours + name] = value.reshape(getattr(quantizer, name).shape)


def vqp_ema_weight(weight, num_books: int):
    """vqp's ``ema_update_weight`` for a native layer: a tensor as it is (``[K]`` or ``[C, K]``); a callable
    of vqp's ``(embed_sum [C, K, d], cluster_size [C, K])`` wrapped to take the native shapes."""
    if weight is None or isinstance(weight, torch.Tensor) or not callable(weight):
        return weight

    def native(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        lead = (num_books, counts.shape[-1])
        return weight(sums.reshape(*lead, sums.shape[-1]), counts.reshape(lead))

    return native


class CodebookViews:
    """What vqp's ``VectorQuantize`` shows of its codebook, read from the native layer ``self.quantizer``: the
    views of :class:`VectorQuantize` and of each ``ResidualVQ`` level (``rvq.layers[i]``). Needs
    ``_num_books`` (the native layer's codebooks) and ``_unused()`` (the statistics kept for vqp only)."""

    @property
    def use_cosine_sim(self) -> bool:
        return self.quantizer.metric == "cosine"

    @property
    def in_place_codebook_optimizer(self):
        """The optimiser ``in_place_codebook_optimizer`` made of the codebook's parameters (None without one)."""
        return self.quantizer.in_place_optimizer

    @property
    def manual_in_place_optimizer_update(self) -> bool:
        return self.quantizer.manual_in_place_update

    @property
    def _codebook(self) -> CodebookView:
        """vqp's ``Codebook`` module's tensors (views), for code that reads them (``vq._codebook.embed_avg``)."""
        return CodebookView(self.quantizer, self._num_books, self._unused())

    def update_in_place_optimizer(self) -> None:
        """vqp's in-place codebook optimiser step (gradients averaged over ranks when the codebook is
        synchronised), then ``zero_grad()``: what ``manual_in_place_optimizer_update=True`` leaves to the caller;
        nothing without an ``in_place_codebook_optimizer``."""
        self.quantizer.update_in_place_optimizer()


class VectorQuantize(CodebookViews, nn.Module):
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
        self.dim = checks.integer("dim", dim, 1)
        self.codebook_size = checks.integer("codebook_size", codebook_size, 1)
        self.heads = checks.integer("heads", heads, 1)
        codebook_dim = self.dim if codebook_dim is None else checks.integer("codebook_dim", codebook_dim, 1)
        self.separate_codebook_per_head = bool(separate_codebook_per_head)
        inner = codebook_dim * self.heads
        native, self.settings = translate(
            inner, self.codebook_size, heads=self.heads, separate_codebook_per_head=separate_codebook_per_head,
            decay=decay, eps=eps, freeze_codebook=freeze_codebook, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans, use_cosine_sim=use_cosine_sim, threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=commitment_weight, stochastic_sample_codes=stochastic_sample_codes,
            sample_codebook_temp=sample_codebook_temp, straight_through=straight_through,
            rotation_trick=self.dim > 1 and not directional_reparam if rotation_trick is None else rotation_trick,
            directional_reparam=directional_reparam, directional_reparam_variance=directional_reparam_variance,
            sync_codebook=sync_codebook, ema_update=ema_update, learnable_codebook=learnable_codebook,
            manual_ema_update=manual_ema_update, route_gradients_to_input=route_gradients_to_input,
            commitment_use_cross_entropy_loss=commitment_use_cross_entropy_loss,
            orthogonal_reg_weight=orthogonal_reg_weight, orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes, sync_update_v=sync_update_v, vq_bridge=vq_bridge,
            codebook_diversity_loss_weight=codebook_diversity_loss_weight,
            codebook_diversity_temperature=codebook_diversity_temperature, affine_param=affine_param,
            sync_affine_param=sync_affine_param, affine_param_batch_decay=affine_param_batch_decay,
            affine_param_codebook_decay=affine_param_codebook_decay, in_place_codebook_optimizer=in_place_codebook_optimizer,
            manual_in_place_optimizer_update=manual_in_place_optimizer_update, precision=precision, backend=backend,
            deterministic=deterministic,
        )
        self.rotation_trick = native["rotation_trick"]
        self.commitment_weight = self.settings.commitment_weight
        self.channel_last = bool(channel_last)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.accept_3d_fmap = bool(accept_3d_fmap)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.ema = self.settings.ema
        self.learnable_codebook = self.settings.learnable

        self.has_projections = inner != self.dim
        self.project_in = _projection(self.dim, inner, layernorm_after_project_in) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, self.dim) if self.has_projections else nn.Identity()
        # The quantizer's own random codebook must not shift the generator: the codes below are drawn
        # where vqp draws them, after the projections, so that one seed gives vqp's initial codebook.
        with torch.random.fork_rng(devices=[]):
            self.quantizer = VectorQuantizer(inner, self.codebook_size, **native)
        unused = init_codes_(self.quantizer, self._num_books, kmeans_init, use_cosine_sim, self.ema)
        if unused is not None:
            self.register_buffer("_vqp_cluster_size", unused["cluster_size"], persistent=False)
            self.register_buffer("_vqp_embed_avg", unused["embed_avg"], persistent=False)
        if not self.ema and not self.settings.codebook_is_parameter:
            self.quantizer.codebook.requires_grad_(False)  # vqp's frozen codebook: neither EMA nor learned
        self._register_state_dict_hook(_to_vqp_layout)
        self._register_load_state_dict_pre_hook(_from_vqp_layout, with_module=True)

    @property
    def _num_books(self) -> int:
        return self.heads if self.separate_codebook_per_head else 1

    def _unused(self) -> dict | None:
        if self.quantizer.keeps_statistics:
            return None
        return {"cluster_size": self._vqp_cluster_size, "embed_avg": self._vqp_embed_avg}

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
        shape without the channel dim (``[..., heads]``). ``topk=k``: the ``k`` nearest codes of each vector
        (``quantized [..., k, D]``, ``indices [..., k]``, a loss per candidate), no codebook update.
        ``indices`` given (the shape ``indices`` has): ``(quantized, cross-entropy loss)``, the loss of the code
        logits against them (vqp's NaturalSpeech 2 loss); ``quantized`` is this call's output as without them
        (vqp returns the raw, unprojected codes there).
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
        if topk is not None and self.heads > 1:
            raise ValueError(f"topk codes are only supported for one head (as in vqp), got heads = {self.heads}")
        if topk is not None and return_loss_breakdown:
            raise ValueError("return_loss_breakdown with topk: give one or the other")
        if topk is not None and self.training and self.quantizer.in_place_optimizer is not None:
            raise ValueError("topk codes in training are not supported with an in_place_codebook_optimizer (as in vqp)")
        if topk is not None and self.training and self.settings.needs_parts:
            raise ValueError("topk codes in training are not supported with commitment_use_cross_entropy_loss (as in "
                             "vqp) or orthogonal_reg_weight > 0 (not implemented here)")
        parts_needed = return_loss_breakdown or (self.settings.needs_parts and topk is None and indices is None)
        channel_first = self._channel_first(x)
        x_last = x.movedim(1, -1) if channel_first else x
        z = self.project_in(x_last)
        transform = None if codebook_transform_fn is None else VqpTransform(codebook_transform_fn, z[..., 0].numel())
        temperature = sample_codebook_temp if self.settings.stochastic else None
        z_q, idx, loss, *parts = self.quantizer(
            z, mask, return_breakdown=parts_needed, topk=None if topk is None else int(topk),
            temperature=temperature, freeze_codebook=freeze_codebook, ema_update=ema_update,
            ema_update_weight=vqp_ema_weight(ema_update_weight, self._num_books), accum_ema_update=accum_ema_update,
            route_gradients_to_input=self.settings.route_gradients_to_input and x.requires_grad,
            codebook_transform=transform, target_indices=indices, diversity_positions=positions(x_last),
        )
        if indices is not None:  # the native forward returned (z_q, idx, loss, cross entropy[, breakdown])
            ce, parts = parts[0], parts[1:]
        out = self.project_out(z_q)
        if mask is not None:
            fill = torch.zeros_like(x_last) if self.return_zeros_for_masked_padding else x_last
            keep = mask.view(*mask.shape, *[1] * (out.dim() - mask.dim()))
            out = torch.where(keep, out, fill.unsqueeze(-2) if topk is not None else fill)
        if channel_first:
            out = out.movedim(-1, 1)
        if indices is not None:
            return out, ce
        if parts_needed and topk is None:
            loss = vqp_loss_from_parts(parts[0], self.settings, self.training)
        else:
            loss = vqp_loss(loss, self.settings, self.training, per_candidate=topk is not None)
        if return_loss_breakdown:
            zero = loss.new_zeros(())
            train = self.training
            commitment = parts[0].commitment_loss if train and self.settings.has_commitment_loss else zero
            ortho = parts[0].orthogonal_loss if train else zero
            diversity = parts[0].diversity_loss if train else zero
            in_place = parts[0].in_place_loss if train else zero
            return out, idx, loss, LossBreakdown(commitment, diversity, ortho, in_place)
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

    # --- codebook updates from given indices -------------------------------------------------------

    def update_indices(self, x, indices, mask=None) -> None:
        """vqp's ``update_indices``: the training step's codebook update (EMA, dead codes) from ``indices``
        of the vectors ``x`` (after a ``topk`` call, say), in ``forward``'s layouts."""
        self._check_layout(x, mask)
        x_last = x.movedim(1, -1) if self._channel_first(x) else x
        with torch.no_grad():
            self.quantizer.update_indices(self.project_in(x_last), indices, mask)

    update_ema_indices = update_indices

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


def _to_vqp_layout(module: VectorQuantize, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: the quantizer's tensors under vqp's names and shapes."""
    codebook_to_vqp(state_dict, prefix + "quantizer.", prefix + "_codebook.", module.quantizer, module._num_books,
                    module.settings.codebook_is_parameter, module._unused())


def _from_vqp_layout(module: VectorQuantize, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: vqp's keys (``_codebook.*``) to the quantizer's, reshaped; a state_dict
    in this module's own layout (``quantizer.*``) passes unchanged."""
    if prefix + "_codebook.embed" not in state_dict:
        return
    codebook_from_vqp(state_dict, prefix + "_codebook.", prefix + "quantizer.", module.quantizer, module._num_books,
                      module._unused(), "codebook_size, heads, separate_codebook_per_head and codebook_dim")
