"""``VectorQuantizer``: the VQ layer over the fused ``quantize`` op.

The codebook is either learned (an ``nn.Parameter`` trained by the codebook loss) or moved by
exponential moving averages of per-code counts and sums (``ema_decay``, Sonnet / VQ-VAE-2), with the
L2 or cosine metric, k-means initialisation on the first training batch, dead-code restart,
channel-first inputs, padding masks, several heads (groups of channels, each with its own codebook or
one shared) and ``torch.distributed`` synchronisation. Per-code statistics come from the ``code_stats``
launcher (one pass over the indices, no one-hot, no N x K) and stay float32 whatever the module's dtype.

One training step, in order: k-means (first batch only), ``quantize`` with the current codebook (this
step's output, indices and loss), the EMA update, dead-code restart. Heads run that same single-codebook
machinery once per codebook, on their group of channels. The state updates are the small functions of
:mod:`vqtriton.codebook_state`; like the rest of the step they read no value on the host, so the step
compiles whole (``torch.compile(fullgraph=True)``): see the README's torch.compile section.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
from torch import nn

from vqtriton import checks, code_logits, distributed, estimators, functional, qinco, torch_ops
from vqtriton import codebook_state as state
from vqtriton.backend import BACKENDS, choose
from vqtriton.eager import call as _op  # torch.ops.vqtriton.<name>, without its dispatch in eager mode
from vqtriton.functional import METRICS, PRECISIONS, QuantizeResult, assign, deterministic_mode, lookup, unit
from vqtriton.qinco import RowCodebooks
from vqtriton.torch_ops import to_dtype as _to_dtype

__all__ = ["VectorQuantizer", "QuantizerBreakdown"]

REDUCTIONS = ("mean", "sum")
# Buffers that stay float32 when the module is cast to another dtype (see VectorQuantizer._apply).
_AFFINE_STATS = ("affine_batch_mean", "affine_batch_var", "affine_codebook_mean", "affine_codebook_var")
_FP32_STATS = ("cluster_size", "embed_sum", "accum_counts", "accum_sums", *_AFFINE_STATS)
# The variance floor of the affine map's standard deviations (vector-quantize-pytorch's).
_AFFINE_MIN_VAR = 1e-5


class QuantizerBreakdown(NamedTuple):
    """The 4th value of ``VectorQuantizer(..., return_breakdown=True)``, over the batch's kept vectors
    (this rank's batch: nothing here is synchronised).

    ``perplexity = exp(-sum p log p)`` of the code usage ``p``; ``usage`` is the fraction of codes used.
    With separate codebooks per head, each is the mean over heads; the losses combine as the layer's loss.
    ``orthogonal_loss``, ``diversity_loss``: a training step's regularisers (before their weights; 0 when off).
    ``in_place_loss``: the loss the in-place optimiser step minimised (detached; 0 when none ran).
    """

    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    orthogonal_loss: torch.Tensor | None = None
    diversity_loss: torch.Tensor | None = None
    in_place_loss: torch.Tensor | None = None


def _usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity and fraction of codes used, from per-code counts (1 and 0 when nothing was counted)."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum()), (counts > 0).float().mean()


def _combine(values: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """Per-head values as one: the mean over heads (equal-sized groups: the mean over all elements) or the sum."""
    if len(values) == 1:
        return values[0]
    stacked = torch.stack(values)
    return stacked.mean() if reduction == "mean" else stacked.sum()


def _breakdown(results: list, counts: list[torch.Tensor], reduction: str) -> QuantizerBreakdown:
    """The breakdown from each codebook's ``quantize`` result and counts: losses as the layer's loss,
    perplexity and usage averaged over codebooks."""
    usage = [_usage(c) for c in counts]
    return QuantizerBreakdown(
        _combine([r.codebook_loss for r in results], reduction),
        _combine([r.commitment_loss for r in results], reduction),
        torch.stack([u[0] for u in usage]).mean(),
        torch.stack([u[1] for u in usage]).mean(),
    )


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of ``z``: ``z_q, indices, loss = vq(z, mask=None)``.

    ``z`` holds vectors of ``dim`` channels along ``channel_dim`` (``-1``: ``[..., D]``; ``1``:
    ``[B, C, H, W]`` or ``[B, C, T]``); ``z_q`` has ``z``'s shape and dtype, value the nearest code,
    gradient straight through to ``z``; ``indices`` is int64, ``z``'s shape without the channel dim.
    ``mask`` (bool, that same shape) marks the vectors to quantize: the others get index -1, a zero
    ``z_q``, and count in no loss, statistic, k-means or metric. A batch with no kept vector has loss 0.

    - Learned codebook (``ema_decay=None``): ``vq.codebook`` is an ``nn.Parameter``,
      ``loss = codebook_loss + beta * commitment_loss``.
    - EMA codebook: ``vq.codebook`` is a buffer, ``loss = beta * commitment_loss``; each training step
      updates the float32 buffers ``cluster_size`` ``[K]`` and ``embed_sum`` ``[K, D]`` with the batch's
      counts ``n`` and sums ``s``: ``cluster_size <- g cluster_size + (1 - g) n``, ``embed_sum <- g
      embed_sum + (1 - g) s``, then ``codebook = embed_sum / size`` with the Laplace-smoothed
      ``size = (cluster_size + eps) / (N + K eps) N``, ``N = sum(cluster_size)`` (l2-normalised for the
      cosine metric). The step's output uses the codebook from before the update. ``ema_decay=1`` keeps
      the statistics as they are. ``manual_ema_update=True``: the statistics move but the codes are
      recomputed from them only by :meth:`refresh_codes`.
    - ``metric="cosine"``: inputs and codes are l2-normalised (per head); ``z_q`` is the normalised code.
    - ``kmeans_init``: ``kmeans_iters`` Lloyd iterations on the first training batch seed the codebook
      (the ``initted`` buffer records it; a batch with no usable vector leaves it False, and eager mode
      tries again on the next batch). ``sync_kmeans=False``: each rank runs its own k-means.
    - ``dead_code_threshold``: codes whose ``cluster_size`` falls below it are re-seeded from random
      vectors of the batch. A learned codebook then keeps ``cluster_size`` and ``embed_sum`` too, as usage
      statistics moved with ``usage_decay`` (they never change its codes otherwise).
    - ``freeze_codebook``: training steps change no codebook state and give the codebook no gradient.
    - Masked vectors are decided on the device: each still costs the assignment work of a kept one.
    - ``heads=H``: the ``dim`` channels split into ``H`` groups of ``dim / H``, each quantized against
      its own codebook: ``vq.codebook`` is ``[H, K, dim / H]`` (``cluster_size`` ``[H, K]``, ``embed_sum``
      ``[H, K, dim / H]``; k-means, EMA and restarts per head). With ``shared_codebook=True`` all groups
      use one codebook ``[K, dim / H]`` whose statistics count every group's vectors. ``indices`` gains a
      trailing ``H`` dim; the loss is the mean over all elements (``"mean"``) or the sum (``"sum"``).
    - ``sync`` (``None``: on when ``torch.distributed`` is initialised with more than one rank): every
      rank keeps one codebook. The EMA counts and sums are summed over ranks before each update (the
      same update as one process training on the concatenated batch); the first synchronised training
      step copies rank 0's codebook state to all ranks; k-means starts from codes sampled on the rank
      with the most vectors and sums its Lloyd statistics over ranks; dead codes are found from the
      synchronised ``cluster_size`` and re-seeded from that same kind of source rank. Every collective
      has a shape fixed by ``K``, ``dim``, ``H`` and the world size, so ranks with uneven or empty
      batches join the same collectives. Collectives happen in training mode only: every rank must run
      each training forward. A learned codebook under ``DistributedDataParallel`` needs no more (DDP
      averages its gradient); the loss and ``QuantizerBreakdown`` stay per rank.
    - How ``z_q`` passes its gradient on (:mod:`vqtriton.estimators`): straight through to ``z`` (the
      default); ``rotation_trick``: rotated and scaled (Fifty et al., ICLR 2025; see
      :func:`vqtriton.functional.quantize`); ``directional_reparam``: DiVeQ's noisy direction (training
      steps; noise variance ``directional_reparam_variance``), which also trains a learned codebook
      through the output; ``route_gradients_to_input=False``: ``z_q`` is the codes themselves (a learned
      codebook's gradient, none to ``z``). In eval mode the same, unless ``straight_through_in_eval=False``,
      which makes an eval ``z_q`` the codes (vector-quantize-pytorch's eval output).
    - ``sample_temperature=t > 0``: training steps sample each code from ``softmax(logits / t)`` (Gumbel-max,
      logits ``-sqrt(d)`` for l2 and the cosine similarity for cosine; :func:`vqtriton.functional.quantize`)
      instead of taking the nearest; eval steps take the nearest.
    - ``commitment_cross_entropy=True``: the commitment term is the cross entropy of the code logits against
      the chosen codes (:meth:`code_cross_entropy`; it trains ``z`` and a learned codebook through the
      logits) instead of the squared error.
    - ``orthogonal_reg_weight=w > 0`` (training steps): ``w`` times the orthogonality regulariser of the codes
      (Shin et al. 2021, eq. 2): ``sum_ij cos(c_i, c_j)^2 / (C n^2) - 1 / n`` over the ``n`` codes of each of
      the ``C`` codebooks, computed as ``|U^T W U|_F^2`` (``U`` the unit codes, a ``d x d`` Gram matrix: never
      ``K x K``); ``orthogonal_reg_active_codes_only``: over the codes this batch's kept vectors chose;
      ``orthogonal_reg_max_codes``: over a random subset of at most that many of them. An EMA codebook is
      then an ``nn.Parameter`` (its gradient: the regulariser's, of the codes after the step's EMA update, as
      vector-quantize-pytorch), still moved by the EMA.
    - ``codebook_diversity_weight=w > 0`` (training steps, one codebook): ``w`` times minus the entropy of the
      mean code distribution ``softmax(codebook_diversity_temperature * logits)`` (the logits of
      :meth:`code_cross_entropy`), the mean taken over the kept vectors of each position
      (``forward(diversity_positions=n)``: vector i is at position ``i % n`` in the leading dims' order;
      default one position) and the entropies averaged over positions (vector-quantize-pytorch's
      ``codebook_diversity_loss``); chunked (:mod:`vqtriton.code_logits`), never N x K.
    - ``sync_update_v=v`` (training steps, learned codebook): ``z_q``'s gradient scaled by ``1 + v`` (the
      synchronised update rule (21) of Huh et al., "Straightening out the straight-through estimator").
    - ``reduction``: ``"mean"`` over the kept elements, or ``"sum"`` (the spec's squared norms).
    - ``precision``, ``backend``: passed to :func:`vqtriton.functional.quantize`.
    - ``deterministic`` (``None``: follow ``torch.use_deterministic_algorithms``): bitwise reproducible
      codebook gradients and EMA statistics.
    - ``codebook_fn`` (a module, learned codebook): the codes the layer uses are ``codebook_fn(codebook)``
      (``[C, K, d]`` in and out, C the number of codebooks; FVQ's "vq bridge", vector-quantize-pytorch's
      ``vq_bridge``); the function trains with the codebook, through the losses and any output gradient.
    - ``affine=True`` (l2 metric; vector-quantize-pytorch's ``affine_param``): the codes are compared and
      output through an affine map that gives them the inputs' running statistics, ``c' = (c - m_c) s_b / s_c
      + m_b``, per channel and codebook, ``m`` the running means and ``s = sqrt(max(var, 1e-5))`` of the running
      (biased) variances: ``m_b``, ``s_b`` of the batches' kept, finite vectors (moved by
      ``affine_batch_decay``), ``m_c``, ``s_c`` of the codes themselves (moved by ``affine_codebook_decay``).
      Each training call first moves them (the first value is taken as it is; a batch without a kept vector
      leaves the batch statistics), in every training call (``freeze_codebook`` and ``topk`` included), and
      with ``affine_eval_update=True`` in eval calls too (the batch statistics only: vector-quantize-pytorch's
      rule). Until a first value exists, the codes' own statistics stand in (the map is then the identity).
      The EMA statistics count the inputs mapped back, ``(x - m_b) s_c / s_b + m_c``; dead codes restart from
      the inputs as they are. The float32 buffers ``affine_batch_mean``, ``affine_batch_var``,
      ``affine_codebook_mean``, ``affine_codebook_var`` (``[d]``, ``[H, d]`` with separate codebooks) and the
      bool ``affine_batch_initted``, ``affine_codebook_initted`` hold them. ``sync_affine`` (None: as ``sync``)
      computes the batch statistics over every rank's vectors (two all-reduces, in eval calls too when they
      update).
    - ``in_place_optimizer`` (a callable, given the codebook's parameters: the codebook when it is a parameter
      and ``codebook_fn``'s, returning a ``torch.optim.Optimizer``; vector-quantize-pytorch's
      ``in_place_codebook_optimizer``): a training call (not frozen, not top-k) first quantizes its vectors,
      back-propagates the codebook loss of those codes (``sg[z]`` against them, reduced as the layer's loss)
      into the codebook's parameters, makes the step's codebook update (EMA, restarts) from those indices and
      takes one optimiser step (``manual_in_place_update=True``: leaves the step to
      :meth:`update_in_place_optimizer`); then it quantizes again with the new codes, and that is the call's
      output, indices and loss (no second codebook update; the affine statistics move again). Synchronised
      (``sync``), the gradients are averaged over ranks before the step. It runs ``backward()`` and an
      optimiser step inside the forward, so it runs eagerly under ``torch.compile`` (``torch.compiler.disable``:
      one graph break; ``fullgraph=True`` cannot hold it), and in a residual level dropped this step it reads
      the 0-dim "level runs" flag on the host.
    - ``generator`` (a ``torch.Generator`` on the codebook's device, or None for torch's global one): every
      random draw of the layer (k-means starts, dead-code restarts, sampling seeds, DiVeQ's noise).
      torch.compile cannot trace a Generator (torch 2.13): compile layers built with ``generator=None``.
    - k-means and dead-code restarts seed codes only from rows that are all finite.

    The loss is computed in eval mode too; codebook updates (k-means, EMA, restarts) happen only in
    training mode. Under autocast the work runs in float32 (or the module's dtype, if wider).
    """

    def __init__(
        self,
        dim: int,
        num_codes: int,
        *,
        beta: float = 0.25,
        ema_decay: float | None = None,
        eps: float = 1e-5,
        metric: str = "l2",
        channel_dim: int = -1,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
        heads: int = 1,
        shared_codebook: bool = False,
        sync: bool | None = None,
        sync_kmeans: bool = True,
        rotation_trick: bool = False,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        route_gradients_to_input: bool = True,
        straight_through_in_eval: bool = True,
        sample_temperature: float = 0.0,
        freeze_codebook: bool = False,
        manual_ema_update: bool = False,
        commitment_cross_entropy: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        sync_update_v: float = 0.0,
        codebook_diversity_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        reduction: str = "mean",
        precision: str = "exact",
        backend: str | None = None,
        deterministic: bool | None = None,
        generator: torch.Generator | None = None,
        codebook_fn: nn.Module | None = None,
        affine: bool = False,
        affine_batch_decay: float = 0.99,
        affine_codebook_decay: float = 0.9,
        affine_eval_update: bool = False,
        sync_affine: bool | None = None,
        in_place_optimizer: Callable | None = None,
        manual_in_place_update: bool = False,
    ):
        super().__init__()
        self.dim = checks.integer("dim", dim, 1)
        self.num_codes = checks.integer("num_codes", num_codes, 1)
        self.beta = checks.real("beta", beta, lambda v: v >= 0, ">= 0")
        decay_ok = lambda v: 0 < v <= 1  # noqa: E731
        self.ema_decay = None if ema_decay is None else checks.real("ema_decay", ema_decay, decay_ok, "in (0, 1]")
        self.eps = checks.real("eps", eps, lambda v: v > 0, "> 0")
        self.metric = checks.choice("metric", metric, METRICS)
        self.channel_dim = checks.integer("channel_dim", channel_dim)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = checks.integer("kmeans_iters", kmeans_iters, 0)
        self.dead_code_threshold = checks.real("dead_code_threshold", dead_code_threshold, lambda v: v >= 0, ">= 0")
        self.usage_decay = checks.real("usage_decay", usage_decay, decay_ok, "in (0, 1]")
        self.heads = checks.integer("heads", heads, 1)
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim = {self.dim} and heads = {self.heads}")
        self.head_dim = self.dim // self.heads
        self.shared_codebook = bool(shared_codebook)
        if not (sync is None or isinstance(sync, bool)):
            raise TypeError(f"sync must be None, True or False, got {sync!r}")
        self.sync = sync
        self.sync_kmeans = bool(sync_kmeans)
        self.rotation_trick = checks.choice("rotation_trick", rotation_trick, (False, True))
        self.directional_reparam = checks.choice("directional_reparam", directional_reparam, (False, True))
        if self.rotation_trick and self.directional_reparam:
            raise ValueError("rotation_trick and directional_reparam are two ways of passing z_q's gradient: choose one")
        self.directional_reparam_variance = checks.real(
            "directional_reparam_variance", directional_reparam_variance, lambda v: v >= 0, ">= 0"
        )
        self.route_gradients_to_input = bool(route_gradients_to_input)
        self.straight_through_in_eval = bool(straight_through_in_eval)
        self.sample_temperature = checks.real("sample_temperature", sample_temperature, lambda v: v >= 0, ">= 0")
        self.freeze_codebook = bool(freeze_codebook)
        self.manual_ema_update = bool(manual_ema_update)
        self.commitment_cross_entropy = bool(commitment_cross_entropy)
        self.orthogonal_reg_weight = checks.real("orthogonal_reg_weight", orthogonal_reg_weight, lambda v: v >= 0, ">= 0")
        self.orthogonal_reg_active_codes_only = bool(orthogonal_reg_active_codes_only)
        self.orthogonal_reg_max_codes = None if orthogonal_reg_max_codes is None else checks.integer(
            "orthogonal_reg_max_codes", orthogonal_reg_max_codes, 1)
        self.sync_update_v = checks.real("sync_update_v", sync_update_v, lambda v: 0 <= v <= 1, "in [0, 1]")
        self.codebook_diversity_weight = checks.real("codebook_diversity_weight", codebook_diversity_weight,
                                                     lambda v: v >= 0, ">= 0")
        self.codebook_diversity_temperature = checks.real("codebook_diversity_temperature", codebook_diversity_temperature,
                                                          lambda v: True, "a number")
        self.reduction = checks.choice("reduction", reduction, REDUCTIONS)
        self.precision = checks.choice("precision", precision, PRECISIONS)
        self.backend = checks.choice("backend", backend, (None, *BACKENDS))
        self.deterministic = checks.choice("deterministic", deterministic, (None, True, False))
        checks.generator(generator)
        self.generator = generator
        self.affine = bool(affine)
        if self.affine and self.metric == "cosine":
            raise ValueError("affine=True needs the l2 metric: it maps the codes onto the inputs' mean and variance")
        in_unit = lambda v: 0 <= v <= 1  # noqa: E731
        self.affine_batch_decay = checks.real("affine_batch_decay", affine_batch_decay, in_unit, "in [0, 1]")
        self.affine_codebook_decay = checks.real("affine_codebook_decay", affine_codebook_decay, in_unit, "in [0, 1]")
        self.affine_eval_update = bool(affine_eval_update)
        if not (sync_affine is None or isinstance(sync_affine, bool)):
            raise TypeError(f"sync_affine must be None, True or False, got {sync_affine!r}")
        self.sync_affine = sync_affine
        self.manual_in_place_update = bool(manual_in_place_update)

        # One codebook per head, stacked, unless there is one head or one shared codebook.
        self.num_books = 1 if self.shared_codebook else self.heads
        if self.codebook_diversity_weight > 0 and self.num_books > 1:
            raise NotImplementedError("codebook_diversity_weight > 0 is implemented for one codebook (one head, or heads "
                                      "sharing one codebook), not separate codebooks per head")
        book_shape = (self.num_codes, self.head_dim)
        if self.num_books > 1:
            book_shape = (self.heads, *book_shape)
        # Drawn where the generator lives (a CUDA generator draws on its GPU), kept on the CPU until .to().
        draw_on = None if generator is None else generator.device
        codebook = self._to_metric(torch.randn(book_shape, generator=generator, device=draw_on).cpu())
        # Statistics: an EMA codebook's, or a learned codebook's usage when it restarts dead codes.
        self.keeps_statistics = self.ema_decay is not None or self.dead_code_threshold > 0
        if self.ema_decay is None or self.orthogonal_reg_weight > 0:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
        if self.keeps_statistics:
            self.register_buffer("cluster_size", torch.ones(book_shape[:-1], dtype=torch.float32))
            self.register_buffer("embed_sum", codebook.to(torch.float32, copy=True))
            # Statistics of accumulating calls (forward(accum_ema_update=True)), added to the next update.
            self.register_buffer("accum_counts", torch.zeros(book_shape[:-1], dtype=torch.float32), persistent=False)
            self.register_buffer("accum_sums", torch.zeros(book_shape, dtype=torch.float32), persistent=False)
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        if self.affine:  # running statistics of the batches and of the codes, per codebook: [d] or [H, d]
            lead, d = book_shape[:-2], self.head_dim
            for name, fill in zip(_AFFINE_STATS, (0.0, 1.0, 0.0, 1.0)):
                self.register_buffer(name, torch.full((*lead, d), fill, dtype=torch.float32))
            self.register_buffer("affine_batch_initted", torch.zeros(lead, dtype=torch.bool))
            self.register_buffer("affine_codebook_initted", torch.zeros(lead, dtype=torch.bool))
        if codebook_fn is not None:
            if not callable(codebook_fn):
                raise TypeError(f"codebook_fn must be a module (or callable), got {type(codebook_fn).__name__}")
            if self.ema_decay is not None:
                raise ValueError("codebook_fn needs a learned codebook (ema_decay=None): the EMA moves the codes themselves")
        self.codebook_fn = codebook_fn
        self.in_place_optimizer = None
        if in_place_optimizer is not None:
            if not callable(in_place_optimizer):
                raise TypeError(f"in_place_optimizer must be a callable of the codebook's parameters returning an "
                                f"optimizer, got {type(in_place_optimizer).__name__}")
            params = [p for p in self._codebook_parameters() if p.requires_grad]
            if not params:
                raise ValueError("in_place_optimizer needs codebook parameters: a learned codebook (ema_decay=None), an "
                                 "EMA codebook with orthogonal_reg_weight > 0, or a codebook_fn with parameters")
            self.in_place_optimizer = in_place_optimizer(params)
        # Host-side mirrors of state, so that a step branches on Python values only (no sync). Loading a
        # state_dict re-reads the first from ``initted`` (see _load_from_state_dict).
        self._kmeans_pending = self.kmeans_init
        self._state_synced = False
        self._accum_pending = False

    def extra_repr(self) -> str:
        mode = "learned" if self.ema_decay is None else f"ema_decay={self.ema_decay}"
        heads = "" if self.heads == 1 else f", heads={self.heads}, shared_codebook={self.shared_codebook}"
        return f"{self.dim}, {self.num_codes}, {mode}{heads}, metric={self.metric!r}, beta={self.beta}"

    # --- the forward pass ---------------------------------------------------------------------------

    def forward(
        self,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        return_breakdown: bool = False,
        reduction: str | None = None,
        topk: int | None = None,
        temperature: float | None = None,
        freeze_codebook: bool | None = None,
        ema_update: bool | None = None,
        ema_update_weight=None,
        accum_ema_update: bool = False,
        route_gradients_to_input: bool | None = None,
        codebook_transform: RowCodebooks | None = None,
        target_indices: torch.Tensor | None = None,
        diversity_positions: int | None = None,
        _active: torch.Tensor | None = None,
        _update: bool = True,
        _collect: list | None = None,
        _optimizer_step: bool = True,
    ):
        """``(z_q, indices, loss)``, plus the cross entropy with ``target_indices``, plus a
        :class:`QuantizerBreakdown` with ``return_breakdown``.

        Per call (None: the layer's own setting):

        - ``reduction`` overrides the layer's (``VQVAE.loss`` uses it).
        - ``topk=k`` (one head): the ``k`` nearest codes of each vector, in increasing distance:
          ``z_q [..., k, D]`` (channel dim moved as the layer's; each candidate passes its gradient to its
          vector), ``indices [..., k]``, and ``loss [..., k]``, each candidate's own loss (per vector:
          ``"mean"`` over its ``D`` elements, or the sum). Such a call changes no codebook state (see
          :meth:`update_indices`).
        - ``temperature``: the sampling temperature of a training step (0: nearest codes).
        - ``freeze_codebook``: no codebook update and no codebook gradient this call.
        - ``ema_update=False``: an EMA codebook's codes are not recomputed this step (its statistics still
          move when dead codes are restarted, which reads them); ``ema_update_weight``: a float tensor
          ``[K]`` (``[H, K]`` with separate codebooks) scaling each code's EMA step, or a callable of the
          step's (synchronised) ``embed_sum`` sums and ``cluster_size`` counts returning it;
          ``accum_ema_update=True``: the step's counts and sums are only accumulated (no EMA step, no
          restart), to be added to the next ordinary step's (gradient accumulation).
        - ``route_gradients_to_input``: see the class docstring.
        - ``codebook_transform`` (one head): per-row codebooks (:class:`vqtriton.qinco.RowCodebooks`):
          each vector is quantized against its own codes (QINCo's implicit neural codebooks).
        - ``target_indices`` (``indices``' shape; -1: no target): also returns :meth:`code_cross_entropy`
          against them, from the codebook this call quantizes with (before its update). Their values are
          range-checked on the host (one sync: a graph break under torch.compile, like any given indices).

        ``_active``, ``_update``, ``_collect`` are for :class:`~vqtriton.ResidualVQ`: ``_active`` (0-dim
        bool) False makes the call a level that did not run (every vector masked, no codebook change);
        ``_update=False`` leaves the codebook state to the caller, and ``_collect`` (a list) receives this
        call's rows, masks and indices for it (:meth:`_update_collected`); ``_optimizer_step=False`` leaves the
        in-place optimiser's step to the caller (a codebook shared by residual levels steps once per step).
        """
        reduction = self.reduction if reduction is None else checks.choice("reduction", reduction, REDUCTIONS)
        if topk is not None:
            topk = checks.integer("topk", topk, 1)
        if (topk is not None or codebook_transform is not None) and self.heads > 1:
            raise ValueError(f"topk and codebook_transform need one head, got heads = {self.heads}")
        if topk is not None and return_breakdown:
            raise ValueError("return_breakdown describes one code per vector: it cannot be combined with topk")
        temperature = self.sample_temperature if temperature is None else checks.real(
            "temperature", temperature, lambda v: v >= 0, ">= 0")
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        rows, lead = self._rows(z)
        codebook = self.codebook
        checks.same_device(z=z, codebook=codebook)
        checks.generator_device(self.generator, z.device)
        keep = self._kept(mask, lead, z)
        if _active is not None:
            keep = _active.expand(rows.shape[0]) if keep is None else keep & _active
        route = self.route_gradients_to_input if route_gradients_to_input is None else bool(route_gradients_to_input)
        mode = self._output_mode(route)
        temperature = temperature if self.training else 0.0
        # No autocast inside: assignment stays exact and statistics fp32 on every backend, torch included.
        with _no_autocast(z.device.type):
            # The rows, in the wider of z's and the codebook's dtype, as the metric compares them.
            x = _to_dtype(rows, torch.promote_types(z.dtype, codebook.dtype))
            parts = [self._to_metric(p) for p in self._split(x)]  # one [n, dim / H] per codebook
            kept = self._split_keep(keep, x.shape[0])  # one [n] bool (or None) per codebook
            sync = self.training and distributed.is_active(self.sync)
            if sync and not self._state_synced:
                self._broadcast_state()
            if self.training and self._kmeans_pending:
                self._kmeans(parts, kept, sync and self.sync_kmeans)
            affine = self.affine and (self.training or self.affine_eval_update)
            if affine:
                self._update_affine(parts, kept, _active)
            in_place = self.in_place_optimizer is not None and self.training and not freeze and topk is None
            if in_place:  # the codes after the in-place step quantize this call (its codebook update done)
                in_place_loss = self._in_place_step(
                    parts, kept, temperature, codebook_transform, sync, _active, _update, _collect,
                    dict(ema_update=ema_update, weight=ema_update_weight, accumulate=accum_ema_update), _optimizer_step)
                if affine:  # as vector-quantize-pytorch's second pass: the statistics move again
                    self._update_affine(parts, kept, _active)
            seed = self._seed(z.device) if temperature > 0 else None
            results = [
                self._quantize_book(b, p, m, mode=mode, topk=topk, temperature=temperature, seed=seed,
                                    freeze=freeze, transform=codebook_transform)
                for b, (p, m) in enumerate(zip(parts, kept))
            ]
            results = [self._scaled(r, m, p, reduction, topk is not None) for r, p, m in zip(results, parts, kept)]
            if target_indices is not None:
                ce = self._cross_entropy(parts, kept, target_indices, lead, freeze)
            losses = [r.loss for r in results]
            extra = 0  # the regularisers: once per call (not once per codebook, which "sum" would count H times)
            if self.commitment_cross_entropy and topk is None:  # the commitment term: the code logits' CE
                # No kept row (a fully masked call, a level quantize dropout left out): 0, not 0 / 0.
                ce_own = self._cross_entropy_books(parts, kept, [r.indices for r in results], freeze, empty=0.0)
                cb = [r.codebook_loss if self.ema_decay is None else r.codebook_loss * 0 for r in results]
                losses = [c + self.beta * ce_own for c in cb]
                results = [r._replace(commitment_loss=ce_own) for r in results]
            update = self.training and _update and not freeze and topk is None and self.keeps_statistics and not in_place
            stats = None
            if (update or return_breakdown) and topk is None:
                stats = self._stats([r.indices for r in results], self._ema_inputs(parts) if update else None)
            if return_breakdown:  # this rank's counts, before the EMA step sums them over ranks
                breakdown = _breakdown(results, [counts for counts, _ in stats], reduction)
                zero = breakdown.codebook_loss.new_zeros(())
                breakdown = breakdown._replace(orthogonal_loss=zero, diversity_loss=zero,
                                               in_place_loss=in_place_loss if in_place else zero)
            if self.training and self.codebook_diversity_weight > 0 and topk is None:  # this step's logits
                diversity = self._diversity(parts[0], kept[0], diversity_positions, freeze)
                if _active is not None:
                    diversity = torch.where(_active, diversity, 0)
                extra = extra + self.codebook_diversity_weight * diversity
                if return_breakdown:
                    breakdown = breakdown._replace(diversity_loss=diversity)
            if update:
                self._update_books(stats, parts, kept, sync, _active, ema_update=ema_update,
                                   weight=ema_update_weight, accumulate=accum_ema_update)
            if self.training and self.orthogonal_reg_weight > 0:  # on the codes after this step's update (vqp's)
                ortho = self._orthogonal_loss([r.indices for r in results], freeze)
                if _active is not None:  # a level that did not run has no loss
                    ortho = torch.where(_active, ortho, 0)
                extra = extra + self.orthogonal_reg_weight * ortho
                if return_breakdown:
                    breakdown = breakdown._replace(orthogonal_loss=ortho)
            if _collect is not None and not in_place:  # (the in-place step collected its own indices)
                _collect.append((parts, kept, [r.indices for r in results], _active, self._ema_inputs(parts)))
        z_q, indices = self._join([r.z_q for r in results], [r.indices for r in results], x.shape[0])
        k = () if topk is None else (z_q.shape[1],)
        if self.training and self.sync_update_v > 0:
            z_q = z_q + self.sync_update_v * (z_q - z_q.detach())
        z_q = self._layout(_to_dtype(z_q, z.dtype), (*lead, *k, self.dim), z.dim())
        indices = _shaped(indices, (*lead, *indices.shape[1:]))
        loss = (losses[0] + extra).reshape(*lead, *k) if topk is not None else _combine(losses, reduction) + extra
        out = (z_q, indices, loss) + ((ce,) if target_indices is not None else ())
        return (*out, breakdown) if return_breakdown else out

    def _output_mode(self, route: bool) -> str:
        """How this call's z_q passes its gradient: "straight_through", "rotation", "directional" or "codes"."""
        if not route or not (self.training or self.straight_through_in_eval):
            return "codes"
        if self.directional_reparam and self.training:
            return "directional"
        return "rotation" if self.rotation_trick else "straight_through"

    def _seed(self, device: torch.device) -> torch.Tensor:
        """A sampling seed drawn on the device (no host read): a 0-dim int64 tensor."""
        return torch.randint(0, 2**31 - 1, (), device=device, **state.draws(self.generator))

    def _quantize_book(self, b: int, p: torch.Tensor, m, *, mode: str, topk, temperature: float, seed,
                       freeze: bool, transform) -> QuantizeResult:
        """One codebook's quantization of its rows ``p [n, d]`` (kept where ``m``): the fused ``quantize`` op
        where it covers the call, else the indices of ``assign`` / ``sample_codes`` / the per-row search and
        the losses and output in torch (O(n d), or O(n k d) for top-k). Losses are sums over the kept rows
        (per candidate, ``[n, k]``, for top-k)."""
        codes = self._codes(b, p.dtype)
        if freeze:
            codes = codes.detach()
        if transform is None and topk is None and mode in ("straight_through", "rotation"):
            # The settings were checked once, in __init__: functional.quantize's work without its checks.
            z_q, idx, cb, cm, _ = functional.quantize_sums(
                p, codes, m, self.precision, self.backend, self.deterministic, mode == "rotation", temperature,
                seed if temperature > 0 else None, self.metric)
            return QuantizeResult(z_q, idx, cb, cm, None)
        opts = dict(precision=self.precision, backend=self.backend)
        pz = p if m is None else torch.where(m.unsqueeze(1), p, 0)  # finite stand-ins, cut off from z
        with torch.no_grad():
            if transform is not None:
                idx = qinco.nearest(pz, codes, transform, self._to_metric, k=None if topk is None else min(topk, self.num_codes),
                                    temperature=temperature, metric=self.metric, generator=self.generator)
            elif topk is not None:
                idx = assign(pz, codes, k=min(topk, self.num_codes), **opts)
            elif temperature > 0:
                idx = functional.sample_codes(pz, codes, temperature, seed, metric=self.metric, backend=self.backend)
            else:
                idx = assign(pz, codes, **opts)
            if m is not None:
                idx = torch.where(m.view(-1, *[1] * (idx.dim() - 1)), idx, -1)
        raw = self._to_metric(transform.chosen(codes, idx)) if transform is not None else _gather(idx, codes)
        raw = raw.to(p.dtype)
        zz = pz.unsqueeze(1).expand_as(raw) if idx.dim() > 1 else pz
        codebook_rows = (zz.detach() - raw).square().sum(-1)
        commitment_rows = (zz - raw.detach()).square().sum(-1)
        if mode == "codes":
            out = raw
        elif mode == "directional":
            out = estimators.directional(zz, raw, self.directional_reparam_variance, self.generator)
        else:
            out = (estimators.rotated if mode == "rotation" else estimators.straight_through)(zz, raw)
        if m is not None:
            out = torch.where(m.view(-1, *[1] * (out.dim() - 1)), out, 0)
        if idx.dim() == 1:
            codebook_rows, commitment_rows = codebook_rows.sum(), commitment_rows.sum()
        return QuantizeResult(out, idx, codebook_rows, commitment_rows, None)

    def code_cross_entropy(self, z: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean over the given codes (``indices >= 0``, kept by ``mask``) of ``-log softmax(logits)[index]``,
        the softmax over every code of the vector's codebook: vector-quantize-pytorch's cross-entropy loss
        (``forward(x, indices=...)``), with its logits ``-sqrt(max(d, 1e-8))`` (l2; ``d`` in the expanded form)
        or the cosine similarity. ``indices`` has ``forward``'s output shape. Differentiable to ``z`` and a
        learned codebook; chunked (:mod:`vqtriton.code_logits`): never an N x K matrix. NaN when no vector
        has a code (as ``F.cross_entropy``)."""
        rows, lead = self._rows(z)
        keep = self._kept(mask, lead, z)
        with torch.autocast(z.device.type, enabled=False):
            x = rows.to(torch.promote_types(z.dtype, self.codebook.dtype))
            parts = [self._to_metric(p) for p in self._split(x)]
            return self._cross_entropy(parts, self._split_keep(keep, x.shape[0]), indices, lead, self.freeze_codebook)

    def _cross_entropy(self, parts: list, kept: list, target, lead, freeze: bool) -> torch.Tensor:
        idx = checks.indices(target, "target_indices", device=self.codebook.device)
        want = (*lead, self.heads) if self.heads > 1 else tuple(lead)
        if tuple(idx.shape) != want:
            raise ValueError(f"target indices must have shape {want}, got {tuple(idx.shape)}")
        checks.index_range(idx, self.num_codes, "target indices")
        idx = idx.reshape(parts[0].shape[0] if self.num_books == 1 else -1, *(() if self.num_books == 1 else (self.heads,)))
        books = [idx.reshape(-1)] if self.num_books == 1 else list(idx.unbind(1))
        return self._cross_entropy_books(parts, kept, books, freeze)

    def _cross_entropy_books(self, parts: list, kept: list, books: list, freeze: bool,
                             empty: float = float("nan")) -> torch.Tensor:
        """The mean cross entropy over every codebook's rows with a target (``books``: one ``[n]`` each);
        ``empty`` where no row has one (NaN, as torch's mean cross entropy of no targets, or 0)."""
        total, count = 0, 0
        for b, (p, m, t) in enumerate(zip(parts, kept, books)):
            t = t if m is None else torch.where(m, t, -1)
            # A copy: the step's codebook update (EMA, restarts) rewrites the codebook in place afterwards.
            codes = self._codes(b, p.dtype).clone()
            total = total + code_logits.cross_entropy_sum(p, codes.detach() if freeze else codes, t,
                                                          cosine=self.metric == "cosine")
            count = count + (t >= 0).sum()
        return torch.where(count > 0, total / count.clamp_min(1), empty)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of ``indices`` in the layer's input layout (``channel_dim`` honoured), -1 giving zeros.

        ``indices`` is ``[...]``, or ``[..., H]`` with heads. Normalised codes for the cosine metric; the
        gradient flows to a learned codebook.
        """
        if self.heads > 1 and (not isinstance(indices, torch.Tensor) or indices.shape[-1:] != (self.heads,)):
            shape = tuple(getattr(indices, "shape", ()))
            raise ValueError(f"indices must be [..., heads] with heads = {self.heads}, got shape {shape}")
        dtype = self.codebook.dtype
        if self.num_books == 1:  # one head, or one codebook shared by the heads: [..., H, d] -> [..., D]
            codes = lookup(indices, self._codes(0, dtype), backend=self.backend)
            codes = codes if self.heads == 1 else codes.flatten(-2)
        else:
            codes = torch.cat(
                [lookup(indices[..., h], self._codes(h, dtype), backend=self.backend) for h in range(self.heads)], -1
            )
        return codes.movedim(-1, self.channel_dim)

    decode = get_output_from_indices

    def transform_input(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` as the quantizer compares it: l2-normalised along ``channel_dim`` (per head) for cosine, else as is."""
        if self.heads == 1 or self.metric != "cosine":
            return self._to_metric(z, self.channel_dim)
        z = z.movedim(self.channel_dim, -1)
        z = self._to_metric(z.unflatten(-1, (self.heads, self.head_dim))).flatten(-2)
        return z.movedim(-1, self.channel_dim)

    # --- codebook updates from given indices ---------------------------------------------------------

    def update_indices(
        self,
        z: torch.Tensor,
        indices: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        ema_update: bool | None = None,
        ema_update_weight=None,
        accum_ema_update: bool = False,
        check_indices: bool = True,
        _active: torch.Tensor | None = None,
    ) -> None:
        """The codebook update of a training step, from given ``indices`` of the vectors ``z`` (``z``'s layout,
        as ``forward``; ``indices`` its shape without the channel dim, ``[..., H]`` with heads; -1 counts
        nowhere): the EMA step and dead-code restart that ``forward`` would do had it chosen them (after a
        top-k call, or a beam search's final choice). The options are ``forward``'s. A layer without
        statistics (a learned codebook that restarts no code) has nothing to update. The index values are
        range-checked (one host sync) unless ``check_indices=False`` (indices this layer's own search
        returned: then nothing is read on the host)."""
        if not self.keeps_statistics:
            return
        rows, lead = self._rows(z)
        idx = checks.indices(indices, device=self.codebook.device)
        want = (*lead, self.heads) if self.heads > 1 else tuple(lead)
        if tuple(idx.shape) != want:
            raise ValueError(f"indices must have shape {want} for z {tuple(z.shape)}, got {tuple(idx.shape)}")
        if check_indices:
            checks.index_range(idx, self.num_codes)
        keep = self._kept(mask, lead, z)
        if _active is not None:
            keep = _active.expand(rows.shape[0]) if keep is None else keep & _active
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            x = rows.to(torch.promote_types(z.dtype, self.codebook.dtype))
            parts = [self._to_metric(p) for p in self._split(x)]
            kept = self._split_keep(keep, x.shape[0])
            idx = idx.reshape(x.shape[0], -1)
            books = [idx.reshape(-1)] if self.num_books == 1 else list(idx.unbind(1))
            books = [i if m is None else torch.where(m, i, -1) for i, m in zip(books, kept)]
            sync = distributed.is_active(self.sync)
            self._update_books(self._stats(books, self._ema_inputs(parts)), parts, kept, sync, _active, ema_update=ema_update,
                               weight=ema_update_weight, accumulate=accum_ema_update)

    update_ema_indices = update_indices

    @torch.no_grad()
    def _update_collected(self, collected: list, sync: bool) -> None:
        """One update from several calls' rows and indices (``_collect``): a codebook shared by residual
        levels takes one EMA step per training step from the sum of the levels' counts and sums, and
        restarts dead codes from all the levels' rows (the statistics count each call's rows as that call's
        affine map gave them back)."""
        parts, kept, books, counted = [], [], [], []
        for b in range(self.num_books):
            rows = [c[0][b] for c in collected]
            counted.append(torch.cat([c[4][b] for c in collected]))
            keeps = []
            for c in collected:
                m, active = c[1][b], c[3]
                m = m if active is None else (active.expand(c[0][b].shape[0]) if m is None else m & active)
                keeps.append(torch.ones(c[0][b].shape[0], dtype=torch.bool, device=rows[0].device) if m is None else m)
            parts.append(torch.cat(rows))
            kept.append(torch.cat(keeps))
            books.append(torch.cat([c[2][b].reshape(-1) for c in collected]))
        self._update_books(self._stats(books, counted), parts, kept, sync, None)

    @torch.no_grad()
    def refresh_codes(self) -> None:
        """An EMA codebook's codes recomputed from its statistics (``embed_sum / size``): the update that
        ``manual_ema_update=True`` leaves to the caller."""
        if self.ema_decay is None:
            raise ValueError("refresh_codes needs an EMA codebook (ema_decay): a learned codebook's codes are its parameters")
        for b in range(self.num_books):
            state.refresh_(self._book(b), self.eps)


    # --- layout: [..., D] or channel-first, with a mask, to and from rows -----------------------

    def _rows(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """``z`` as rows ``[N, D]`` (channel dim last) and the shape of its leading dims."""
        checks.float_tensor("z", z)
        if not -z.dim() <= self.channel_dim < z.dim() or z.shape[self.channel_dim] != self.dim:
            raise ValueError(
                f"z must have dim = {self.dim} channels in dim {self.channel_dim}, got shape {tuple(z.shape)}"
            )
        if self.channel_dim % z.dim() != z.dim() - 1:
            z = z.movedim(self.channel_dim, -1)
        return z if z.dim() == 2 else z.reshape(-1, self.dim), z.shape[:-1]

    def _layout(self, t: torch.Tensor, shape: tuple, ndim: int) -> torch.Tensor:
        """Rows' outputs ``t`` in the input's layout: ``shape`` (channels last), the channel dim moved back
        for channel-first inputs of ``ndim`` dims. (No view where none is needed: each is an autograd node.)"""
        t = _shaped(t, shape)
        return t if self.channel_dim % ndim == ndim - 1 else t.movedim(-1, self.channel_dim)

    def _kept(self, mask, lead: torch.Size, z: torch.Tensor) -> torch.Tensor | None:
        """The flat bool mask ``[N]`` of the vectors to quantize, or None for all of them."""
        if mask is None:
            return None
        what = f"z's shape without the channel dim, {tuple(lead)} for z {tuple(z.shape)}"
        return checks.mask(mask, lead, z.device, what).reshape(-1)

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Rows ``[n, D]`` as the rows each codebook quantizes: ``[n, D]``; ``[n H, D / H]`` for a shared
        codebook; one ``[n, D / H]`` per head for separate codebooks."""
        if self.heads == 1:
            return [x]
        if self.shared_codebook:
            return [x.reshape(-1, self.head_dim)]
        return list(x.split(self.head_dim, dim=1))

    def _join(self, z_qs: list[torch.Tensor], indices: list[torch.Tensor], n: int):
        """The inverse of ``_split`` for the outputs: rows ``[n, D]`` and indices ``[n]`` (``[n, H]`` with heads)."""
        if self.heads == 1:
            return z_qs[0], indices[0]
        if self.shared_codebook:
            return z_qs[0].reshape(n, self.dim), indices[0].reshape(n, self.heads)
        return torch.cat(z_qs, 1), torch.stack(indices, 1)

    def _split_keep(self, keep: torch.Tensor | None, n: int) -> list[torch.Tensor | None]:
        """The mask of each codebook's rows (as ``_split`` cuts them) from the mask of the ``n`` vectors."""
        if keep is not None and self.heads > 1 and self.shared_codebook:
            keep = keep.unsqueeze(1).expand(n, self.heads).reshape(-1)
        return [keep] * self.num_books

    def _scaled(self, r, keep: torch.Tensor | None, x: torch.Tensor, reduction: str, per_vector: bool = False):
        """A ``quantize`` result of sums as the layer reports it, with the layer's loss (``codebook + beta
        commitment``; ``beta commitment`` for an EMA codebook): ``"mean"`` divides by the number of kept
        elements, at least 1 (a batch with no kept vector has loss 0, not NaN); ``per_vector`` (top-k: one
        loss per candidate) divides by the vector's ``D`` elements."""
        cb, cm = r.codebook_loss, r.commitment_loss
        if reduction == "mean":
            if per_vector:
                count = x.shape[1]
            else:
                count = (x.shape[0] if keep is None else keep.sum()) * x.shape[1]
                count = max(count, 1) if keep is None else count.clamp_min(1)
            cb, cm = cb / count, cm / count
        loss = torch.add(cb, cm, alpha=self.beta) if self.ema_decay is None else self.beta * cm
        return r._replace(codebook_loss=cb, commitment_loss=cm, loss=loss)

    def _to_metric(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return unit(t, dim, t.dtype) if self.metric == "cosine" else t

    # --- one codebook: the b-th of num_books ---------------------------------------------------

    def _book(self, b: int) -> state.Book:
        """Codebook ``b`` and its statistics, as views: writing to them updates the module's tensors."""
        stats = (self.cluster_size, self.embed_sum) if self.keeps_statistics else (None, None)
        tensors = (self.codebook, *stats)
        if self.num_books > 1:
            tensors = tuple(None if t is None else t[b] for t in tensors)
        return state.Book(*tensors, self._to_metric, self.ema_decay is not None)

    def _codes(self, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Codebook ``b`` as the quantizer compares it, in ``dtype``. (No copy for an EMA codebook, which
        the EMA step rewrites in place: the backward reads the codes from the step's own z_q.)"""
        if self.codebook_fn is not None:
            books = self.codebook_fn(self.codebook.reshape(self.num_books, self.num_codes, self.head_dim))
            codes = self._to_metric(books[b].to(dtype))
        else:
            codes = self.codebook if self.num_books == 1 else self.codebook[b]  # the Book's codes (_book)
            codes = self._to_metric(_to_dtype(codes, dtype))
        if not self.affine:
            return codes
        (m_b, s_b), (m_c, s_c) = self._affine_moments(b, codes.dtype)
        return (codes - m_c) * (s_b / s_c) + m_b

    # --- the affine map (affine=True): running statistics of the batches and of the codes ---------------

    def _slot(self, t: torch.Tensor, b: int) -> torch.Tensor:
        return t[b] if self.num_books > 1 else t

    def _affine_moments(self, b: int, dtype: torch.dtype):
        """Codebook ``b``'s ``((m_b, s_b), (m_c, s_c))``, means and standard deviations ``[d]`` in ``dtype`` (at
        least float32): the stored running values, or before a first one the codes' own (the identity map)."""
        wide = torch.promote_types(dtype, torch.float32)
        raw = self._slot(self.codebook, b).detach().to(wide)
        c_init = self._slot(self.affine_codebook_initted, b)
        m_c = torch.where(c_init, self._slot(self.affine_codebook_mean, b).to(wide), raw.mean(0))
        v_c = torch.where(c_init, self._slot(self.affine_codebook_var, b).to(wide), raw.var(0, unbiased=False))
        b_init = self._slot(self.affine_batch_initted, b)
        m_b = torch.where(b_init, self._slot(self.affine_batch_mean, b).to(wide), m_c)
        v_b = torch.where(b_init, self._slot(self.affine_batch_var, b).to(wide), v_c)
        std = lambda v: v.clamp_min(_AFFINE_MIN_VAR).sqrt().to(dtype)  # noqa: E731
        return (m_b.to(dtype), std(v_b)), (m_c.to(dtype), std(v_c))

    def _ema_inputs(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The rows the EMA statistics count: as they are, or mapped back by the inverse affine map."""
        if not self.affine:
            return parts
        mapped = []
        for b, p in enumerate(parts):
            (m_b, s_b), (m_c, s_c) = self._affine_moments(b, p.dtype)
            mapped.append((p.detach() - m_b) * (s_c / s_b) + m_c)
        return mapped

    @torch.no_grad()
    def _update_affine(self, parts: list[torch.Tensor], kept: list, active) -> None:
        """One step of the running statistics (class docstring): the codes' in training, the batch's kept,
        finite rows' always (a batch without one, or a level that did not run, leaves them)."""
        sync = distributed.is_active(self.sync if self.sync_affine is None else self.sync_affine)
        found = []
        for b, (p, m) in enumerate(zip(parts, kept)):
            if self.training:
                raw = self._slot(self.codebook, b).detach().float()
                c_init = self._slot(self.affine_codebook_initted, b)
                state.running_(self._slot(self.affine_codebook_mean, b), raw.mean(0), self.affine_codebook_decay, c_init, active)
                state.running_(self._slot(self.affine_codebook_var, b), raw.var(0, unbiased=False),
                               self.affine_codebook_decay, c_init, active)
            mean, var, ok = state.moments(p, self._valid(p, m), sync=sync)
            ok = ok if active is None else ok & active
            b_init = self._slot(self.affine_batch_initted, b)
            state.running_(self._slot(self.affine_batch_mean, b), mean, self.affine_batch_decay, b_init, ok)
            state.running_(self._slot(self.affine_batch_var, b), var, self.affine_batch_decay, b_init, ok)
            found.append(ok)
        ok = found[0] if self.num_books == 1 else torch.stack(found)
        self.affine_batch_initted.copy_(self.affine_batch_initted | ok)
        if self.training:
            ran = True if active is None else active
            self.affine_codebook_initted.copy_(self.affine_codebook_initted | ran)

    # --- the in-place optimiser (in_place_optimizer) ----------------------------------------------------

    def _codebook_parameters(self) -> list[nn.Parameter]:
        """The codebook's parameters: the codes when they are a parameter, then ``codebook_fn``'s."""
        params = [self.codebook] if isinstance(self.codebook, nn.Parameter) else []
        if isinstance(self.codebook_fn, nn.Module):
            params += list(self.codebook_fn.parameters())
        return params

    @torch.compiler.disable  # backward() and an optimiser step inside the forward: eager, a graph break
    def _in_place_step(self, parts, kept, temperature: float, transform, sync: bool, active, update: bool,
                       collect, update_kw: dict, step: bool = True) -> torch.Tensor:
        """The in-place optimiser's part of a training call (class docstring): quantize ``parts`` (detached),
        back-propagate the codebook loss into the codebook's parameters, the codebook update from these
        indices (or, with ``update=False``, the indices collected for the caller), then the optimiser step
        unless manual (or ``step`` is False). Returns the loss (detached). Backward comes before the codebook update: its gradient
        reads only the codes it was computed from, so the result is vector-quantize-pytorch's order (update,
        backward, step), without touching a tensor autograd saved."""
        if active is not None and not bool(active):  # a level that did not run: no step (one host read)
            return parts[0].new_zeros(())
        with torch.enable_grad():
            seed = self._seed(parts[0].device) if temperature > 0 else None
            results = [
                self._quantize_book(b, p.detach(), m, mode="straight_through", topk=None, temperature=temperature,
                                    seed=seed, freeze=False, transform=transform)
                for b, (p, m) in enumerate(zip(parts, kept))
            ]
            results = [self._scaled(r, m, p, self.reduction) for r, p, m in zip(results, parts, kept)]
            loss = _combine([r.codebook_loss for r in results], self.reduction)
            if loss.requires_grad:  # (not when the parameters were set not to require one)
                loss.backward()
        indices = [r.indices for r in results]
        if update and self.keeps_statistics:
            self._update_books(self._stats(indices, self._ema_inputs(parts)), parts, kept, sync, active, **update_kw)
        if collect is not None:
            collect.append((parts, kept, indices, active, self._ema_inputs(parts)))
        if step and not self.manual_in_place_update:
            self.update_in_place_optimizer()
        return loss.detach()

    @torch.compiler.disable  # an optimiser step: eager (a graph break when a compiled forward calls it)
    @torch.no_grad()
    def update_in_place_optimizer(self) -> None:
        """The in-place optimiser's step and ``zero_grad()`` (vector-quantize-pytorch's name; what
        ``manual_in_place_update=True`` leaves to the caller). Synchronised (``sync``), each parameter's
        gradient is first averaged over ranks (a missing gradient counts as zeros, so every rank joins the same
        collectives). Nothing happens without an in-place optimiser."""
        opt = self.in_place_optimizer
        if opt is None:
            return
        if distributed.is_active(self.sync):
            params = [p for group in opt.param_groups for p in group["params"]]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            groups: dict = {}
            for p in params:
                groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
            for grads in groups.values():
                distributed.all_reduce_sum_(*grads)
                torch._foreach_div_(grads, distributed.world_size())
        opt.step()
        opt.zero_grad()

    # --- codebook updates (training mode): the functions of codebook_state ------------------------

    def _valid(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The rows a code may be seeded from: kept, and all finite."""
        finite = torch.isfinite(x).all(1)
        return finite if keep is None else finite & keep

    def _stats(self, indices: list[torch.Tensor], parts: list[torch.Tensor] | None) -> list:
        """Per-code counts (and, given the rows, sums) of each codebook's indices."""
        det = deterministic_mode(self.deterministic)
        return [
            state.code_stats(i, None if parts is None else parts[b], self.num_codes, backend=self.backend, deterministic=det)
            for b, i in enumerate(indices)
        ]

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Rank 0's codebook, statistics and ``initted`` on every rank (the first synchronised step)."""
        names = [n for n in ("codebook", *_FP32_STATS) if hasattr(self, n)]
        flags = [getattr(self, n) for n in ("affine_batch_initted", "affine_codebook_initted") if hasattr(self, n)]
        state.broadcast_([getattr(self, n).data for n in names], self.initted, *flags)
        self._state_synced = True
        if not torch.compiler.is_compiling():  # compiled, every rank keeps its own mirror (load on every rank)
            self._read_kmeans_pending()

    @torch.no_grad()
    def _kmeans(self, parts: list[torch.Tensor], kept: list, sync: bool) -> None:
        """Seed every code of every codebook by k-means on its rows (``codebook_state.kmeans``). A codebook
        with no usable row keeps its codes; ``initted`` becomes True when every codebook found rows."""
        found = []
        for b, (p, keep) in enumerate(zip(parts, kept)):
            x = p.detach().float()
            centres, ok = state.kmeans(
                x, self._valid(x, keep), self.num_codes, self.kmeans_iters, normalise=self._to_metric,
                backend=self.backend, deterministic=deterministic_mode(self.deterministic), sync=sync,
                generator=self.generator,
            )
            state.reseed_(self._book(b), ok.expand(self.num_codes), centres, self.dead_code_threshold, self.eps)
            found.append(ok)
        self.initted.copy_(self.initted | torch.stack(found).all())
        # Compiled, nothing can be read: the k-means step counts as done (``initted`` holds the truth).
        self._kmeans_pending = False if torch.compiler.is_compiling() else self._read_kmeans_pending()

    def _read_kmeans_pending(self) -> bool:
        """``initted`` read into its host mirror: one sync, on the rare occasions that change it (not
        for a module on the meta device, which has no values yet)."""
        if not self.initted.is_meta:
            self._kmeans_pending = self.kmeans_init and not bool(self.initted)
        return self._kmeans_pending

    def _diversity(self, p: torch.Tensor, keep, positions: int | None, freeze: bool) -> torch.Tensor:
        """The codebook-diversity loss of the one codebook's rows ``p`` (class docstring). The codes are those
        this step quantized with (a copy: the step's update rewrites the codebook afterwards)."""
        n_pos = 1 if positions is None else checks.integer("diversity_positions", positions, 1)
        per_vector = self.heads if self.shared_codebook else 1  # rows of a shared codebook: (vector, head)
        group = (torch.arange(p.shape[0], device=p.device) // per_vector) % n_pos
        if keep is not None:
            group = torch.where(keep, group, -1)
        codes = self._codes(0, p.dtype).clone()
        return code_logits.diversity_loss(p, codes.detach() if freeze else codes, group, n_pos,
                                          temperature=self.codebook_diversity_temperature, cosine=self.metric == "cosine")

    def _orthogonal_loss(self, indices: list[torch.Tensor], freeze: bool = False) -> torch.Tensor:
        """The orthogonality regulariser (class docstring) of the codebooks, over the codes that ``indices``
        (each codebook's, -1 for none) chose when only active codes count, and a random subset of at most
        ``orthogonal_reg_max_codes`` of them (the same subset for every codebook, drawn with the generator).
        ``freeze``: the codebook gets no gradient from it."""
        k = self.num_codes
        books = self.codebook.reshape(self.num_books, k, self.head_dim).clone()  # the EMA rewrites it in place
        books = books.detach() if freeze else books
        unit_codes = torch.nn.functional.normalize(books.to(torch.promote_types(books.dtype, torch.float32)), dim=-1, eps=1e-6)
        weight = None
        if self.orthogonal_reg_active_codes_only:
            counts = sum(_op("code_counts", i.reshape(-1), k, choose(i, backend=self.backend)) for i in indices)
            weight = counts > 0
        if self.orthogonal_reg_max_codes is not None and self.orthogonal_reg_max_codes < k:
            avail = torch.ones(k, dtype=torch.bool, device=books.device) if weight is None else weight
            key = torch.rand(k, device=books.device, **state.draws(self.generator)).masked_fill_(~avail, 2.0)
            rank = torch.empty_like(key, dtype=torch.int64).scatter_(0, key.argsort(), torch.arange(k, device=key.device))
            weight = avail & (rank < self.orthogonal_reg_max_codes)
        if weight is None:
            gram, n = unit_codes.transpose(1, 2) @ unit_codes, float(k)
        else:
            w = weight.float()
            gram = unit_codes.transpose(1, 2) @ (unit_codes * w.view(1, k, 1))
            n = w.sum().clamp_min(1)
        return gram.square().sum() / (self.num_books * n * n) - 1 / n

    def _weights(self, weight, stats: list):
        """``ema_update_weight`` as one float tensor ``[K]`` per codebook (None: plain EMA steps)."""
        if weight is None:
            return [None] * self.num_books
        if callable(weight) and not isinstance(weight, torch.Tensor):
            counts = [c for c, _ in stats]
            sums = [s for _, s in stats]
            if self.num_books == 1:
                weight = weight(sums[0], counts[0])
            else:
                weight = weight(torch.stack(sums), torch.stack(counts))
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() and weight.dtype != torch.bool:
            raise TypeError(f"ema_update_weight must be a float tensor (or a callable returning one), got {weight!r}")
        want = (self.num_codes,) if self.num_books == 1 else (self.num_books, self.num_codes)
        if tuple(weight.shape) not in (want, (self.num_codes,), (1, self.num_codes)):
            raise ValueError(f"ema_update_weight must have shape {want} (or [num_codes]), got {tuple(weight.shape)}")
        weight = weight.to(self.codebook.device, torch.float32).reshape(-1, self.num_codes)
        return [weight[b if weight.shape[0] > 1 else 0] for b in range(self.num_books)]

    @torch.no_grad()
    def _update_books(self, stats: list, parts: list[torch.Tensor], kept: list, sync: bool, active, *,
                      ema_update: bool | None = None, weight=None, accumulate: bool = False) -> None:
        """The statistics' step of every codebook and its dead-code restart; synchronised, the per-code
        counts and sums of all codebooks are first summed over ranks (one collective).

        An EMA codebook recomputes its codes from the statistics unless ``ema_update`` is False or the
        layer's EMA is manual; with ``ema_update=False`` and no dead-code restart nothing is tracked at all
        (vector-quantize-pytorch's rule). ``accumulate``: the counts and sums only add to ``accum_counts``
        / ``accum_sums``, which the next update adds to its own."""
        ema = self.ema_decay is not None and ema_update is not False
        if not ema and self.dead_code_threshold == 0:
            return
        if sync:
            distributed.all_reduce_sum_(*(counts for counts, _ in stats), *(sums for _, sums in stats))
        if accumulate:
            for b, (counts, sums) in enumerate(stats):
                if active is not None:
                    counts, sums = torch.where(active, counts, 0.0), torch.where(active, sums, 0.0)
                self._slot(self.accum_counts, b).add_(counts)
                self._slot(self.accum_sums, b).add_(sums)
            self._accum_pending = True
            return
        weights = self._weights(weight, stats)
        decay = self.usage_decay if self.ema_decay is None else self.ema_decay
        refresh = ema and not self.manual_ema_update
        for b, ((counts, sums), x, keep) in enumerate(zip(stats, parts, kept)):
            if self._accum_pending:
                counts = counts + self._slot(self.accum_counts, b)
                sums = sums + self._slot(self.accum_sums, b)
            book = self._book(b)
            state.ema_update_(book, counts, sums, decay, self.eps, active, weight=weights[b], refresh=refresh)
            if self.dead_code_threshold > 0:
                x = x.detach()
                state.restart_dead_codes_(
                    book, x, self._valid(x, keep), self.dead_code_threshold, self.eps, sync=sync, active=active,
                    generator=self.generator,
                )
        if self._accum_pending:
            self.accum_counts.zero_()
            self.accum_sums.zero_()
            self._accum_pending = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._read_kmeans_pending()

    # --- dtype casts ------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Moves and casts like any module, except that the statistics stay float32: a cast such as
        ``.to(torch.bfloat16)`` only moves them (from their full-precision values) to the new device."""
        stats = {name: self._buffers[name] for name in _FP32_STATS if name in self._buffers}
        super()._apply(fn, recurse)
        for name, old in stats.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


def _shaped(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``t.reshape(shape)``, without a view (an autograd node) when ``t`` has that shape already."""
    return t if t.shape == shape else t.reshape(shape)


def _no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or no context when autocast is off there already
    (entering one costs more than some of the ops it would wrap)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _gather(idx: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``codes[idx]`` for indices of any shape (-1: a zero row), differentiable to ``codes``; no host read
    (the indices come from an assignment, in range by construction)."""
    return torch_ops.gather(idx.reshape(-1), codes).reshape(*idx.shape, codes.shape[1])
