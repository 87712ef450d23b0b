"""``ResidualVQ``: residual vector quantization (SoundStream, EnCodec, DAC) over ``VectorQuantizer`` levels.

Level ``l`` quantizes what the levels before it left: ``r_0 = z``, ``r_{l+1} = r_l - sg[q_l]``, with
``q_l`` the code level ``l`` chose for ``r_l``. The output is ``sum_l q_l``. Gradients:

- ``output_gradient="first"`` (the default): the output passes its gradient straight through to ``z``
  once (it is level 0's straight-through output plus the values of the other levels' codes);
  ``"every"`` (vector-quantize-pytorch's): the output is the sum of every level's straight-through (or
  rotated) output, so ``z`` receives the output's gradient once per level;
- each level's commitment term ``||r_l - sg[q_l]||^2`` reaches ``z`` through ``r_l`` (``dr_l/dz = I``):
  the residual subtracts the *detached* codes. Subtracting the straight-through outputs instead, as
  EnCodec did (facebookresearch/encodec#25), gives ``dr_l/dz = 0`` for ``l >= 1``, and the encoder never
  feels the later levels' commitment. ``quant_grad_frac=f`` subtracts ``f q_l + (1 - f) sg[q_l]`` instead
  (a fraction of each level's output gradient reaches the next residual, as vector-quantize-pytorch).

Where the fused residual ops cover a call, every level runs in one launch: :func:`vqtriton.residual_quantize`
(forward and its one-launch backward) in training and whenever a gradient is needed,
:func:`vqtriton.residual_assign` otherwise; the per-level losses come from their per-row distances, the EMA
statistics of every level from one ``residual_stats`` launch, then each level's EMA step and dead-code
restart as before. The level loop (one ``VectorQuantizer`` call per level) runs what they do not cover: a
k-means step, QINCo's per-row codebooks (:mod:`vqtriton.qinco`), the beam search (the ``k`` nearest codes
of each path, :func:`vqtriton.assign` with ``k``), sampled codes, ``quant_grad_frac > 0``, DiVeQ, heads,
the levels' cross-entropy commitment, orthogonality and diversity terms, ``sync_update_v``, a
``codebook_fn``, the affine map, an in-place optimiser, and outputs that pass the gradient to a codebook (``route_gradients_to_input=False``, or
``straight_through_in_eval=False`` in eval mode when a gradient is needed). Both give the same indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vqtriton import checks, distributed, estimators, torch_ops
from vqtriton import codebook_state as state
from vqtriton.backend import choose
from vqtriton.eager import call as _op  # torch.ops.vqtriton.<name>, without its dispatch in eager mode
from vqtriton.functional import deterministic_mode
from vqtriton.layer import VectorQuantizer
from vqtriton.qinco import QincoCodes, QincoMLP
from vqtriton.residual_ops import residual_assign, residual_quantize

__all__ = ["ResidualVQ", "dropout_levels"]

OUTPUT_GRADIENTS = ("first", "every")
# vector-quantize-pytorch's noise variance for DiVeQ on the residual sum.
DIVEQ_VARIANCE = 5e-3


def checked_num_active(num_active, q: int, device) -> int | torch.Tensor:
    """A residual stack's ``num_active`` argument, checked: an int in ``[1, q]``, or a 0-dim integer tensor
    (moved to ``device``; its value is never read on the host)."""
    if isinstance(num_active, torch.Tensor):
        if num_active.dim() != 0 or num_active.is_floating_point() or num_active.dtype == torch.bool:
            raise ValueError(f"num_active must be an int or a 0-dim integer tensor, got {num_active.dtype} of shape "
                             f"{tuple(num_active.shape)}")
        return num_active.to(device)
    n = checks.integer("num_active", num_active, 1)
    if n > q:
        raise ValueError(f"num_active must be in [1, {q}], got {n}")
    return n


def dropout_levels(q: int, p: float, cutoff: int, multiple_of: int, generator, device) -> torch.Tensor:
    """Quantize dropout's draw (every residual module's): how many leading levels of ``q`` a training step
    keeps, as a 0-dim int64 tensor made on ``device`` (no host sync): ``q``, or with probability ``p`` an
    ``n`` with ``n - 1`` uniform in ``cutoff .. q - 2``, rounded up to a multiple of ``multiple_of`` (at most
    ``q``). Two draws from ``generator`` (None: torch's global generator)."""
    drop = torch.rand((), device=device, **state.draws(generator)) < p
    if cutoff < q - 1:
        kept = torch.randint(cutoff + 1, q, (), device=device, **state.draws(generator))
    else:
        kept = torch.full((), q, dtype=torch.int64, device=device)
    if multiple_of > 1:
        kept = ((kept + multiple_of - 1) // multiple_of * multiple_of).clamp_max(q)
    return torch.where(drop, kept, q)


class ResidualVQ(nn.Module):
    """``z_q, indices, loss = rvq(z, mask=None)``: ``num_quantizers`` levels of :class:`VectorQuantizer`.

    ``layer_kwargs`` configure every level (``beta``, ``ema_decay``, ``metric``, ``channel_dim``, ``heads``,
    ``kmeans_init``, ``sync``, ``rotation_trick``, ...); ``rvq.layers`` is the ``nn.ModuleList`` of levels.
    ``num_codes`` is one size for every level or a sequence of one per level (then ``num_quantizers`` may be
    None). ``z_q`` has ``z``'s shape and dtype (the residuals are computed in float32, or float64 for float64
    ``z``); ``indices`` is each level's indices stacked on a trailing dim: ``[..., num_quantizers]``
    (``[..., H, num_quantizers]`` with heads); ``loss`` is the sum of the levels' losses. ``mask`` goes to
    every level.

    - ``shared_codebook=True``: every level is the same module (``layers[l] is layers[0]``), so one codebook
      quantizes every residual. An EMA codebook (or one with dead-code restarts) takes one update per
      training step, from the counts and sums of all levels together, and restarts dead codes from all the
      levels' residuals; with an ``in_place_optimizer`` every level's in-place pass adds its gradient and the
      optimiser steps once per training step, after the last level.
    - ``quantize_dropout=p``: in training mode, with probability ``p`` a step keeps only the first ``n``
      levels, ``n - 1`` uniform in ``quantize_dropout_cutoff_index .. num_quantizers - 2`` and then rounded
      up to a multiple of ``quantize_dropout_multiple_of`` (at most ``num_quantizers``), for the whole batch
      (SoundStream's bitrate dropout; EnCodec's structured version with a multiple). A dropped level's
      indices are -1, its loss 0, its codebook unchanged (no EMA step, no restart). The draw stays on the
      device (``generator``), so there is no host sync and the step compiles whole: a dropped level is a
      level whose every vector is masked, and still costs its assignment work. When the levels synchronise
      over ``torch.distributed``, rank 0's draw is broadcast. Under ``DistributedDataParallel`` a dropped
      level's learned codebook gets a zero gradient. While a level still waits for its k-means
      initialisation, no level is dropped. ``forward(num_active=n)`` fixes ``n`` for a call instead.
    - ``implicit_neural_codebook=True`` (QINCo): level ``l >= 1`` quantizes against per-row codes
      ``mlps[l - 1](codebook, x_hat)``, ``x_hat`` the output of the levels before it (:mod:`vqtriton.qinco`;
      ``mlp_kwargs`` go to :class:`~vqtriton.qinco.QincoMLP`); learned codebooks, one head.
    - ``beam_size=B`` (``eval_beam_size`` for eval mode, default ``beam_size``): a beam search keeps the
      ``B`` paths of best score, a path's score being ``-sum_l w_l loss_l`` over its levels' candidate losses
      (``beam_score_weights`` ``w``, default 1); each level extends each path by its ``B`` nearest codes.
      The losses returned are those of the best path; a training step then updates every level's codebook
      from that path's indices (:meth:`VectorQuantizer.update_indices`). Rows ``[..., D]``, one head.
    - ``diveq=True`` (DiVeQ for residual VQ): the levels' outputs are their codes (a learned codebook's
      gradient, ``route_gradients_to_input=False``), each residual subtracts its level's output with its
      gradient (``quant_grad_frac=1``), and the sum passes its gradient to ``z`` and every codebook through
      :func:`vqtriton.estimators.directional` (noise variance 5e-3); ``output_gradient`` is ``"every"``.
    - ``generator``: the random draws of the dropout and of every level (see :class:`VectorQuantizer`).
    - ``rvq.fused`` (default True): run the fused residual ops where they cover the call (module docstring);
      False always runs the level loop (the same indices; a reference).
    """

    def __init__(
        self,
        dim: int,
        num_codes: int | Sequence[int],
        num_quantizers: int | None = None,
        *,
        shared_codebook: bool = False,
        quantize_dropout: float = 0.0,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        output_gradient: str | None = None,
        quant_grad_frac: float = 0.0,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict | None = None,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_weights: Sequence[float] | None = None,
        diveq: bool = False,
        generator: torch.Generator | None = None,
        **layer_kwargs,
    ):
        super().__init__()
        sizes = self._sizes(num_codes, num_quantizers)
        self.num_quantizers = len(sizes)
        self.codebook_sizes = sizes
        self.quantize_dropout = checks.real("quantize_dropout", quantize_dropout, lambda v: 0 <= v <= 1, "in [0, 1]")
        q = self.num_quantizers
        self.quantize_dropout_cutoff_index = checks.integer("quantize_dropout_cutoff_index", quantize_dropout_cutoff_index, 0)
        if self.quantize_dropout_cutoff_index >= q:
            raise ValueError(f"quantize_dropout_cutoff_index must be < num_quantizers = {q}, "
                             f"got {self.quantize_dropout_cutoff_index}")
        self.quantize_dropout_multiple_of = checks.integer("quantize_dropout_multiple_of", quantize_dropout_multiple_of, 1)
        self.diveq = bool(diveq)
        default_gradient = "every" if self.diveq else "first"
        self.output_gradient = checks.choice("output_gradient", default_gradient if output_gradient is None else output_gradient,
                                             OUTPUT_GRADIENTS)
        self.quant_grad_frac = checks.real("quant_grad_frac", quant_grad_frac, lambda v: 0 <= v <= 1, "in [0, 1]")
        self.shared_codebook = bool(shared_codebook)
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        checks.generator(generator)
        self.generator = generator
        learned_only = [name for name, on in (("implicit_neural_codebook", self.implicit_neural_codebook),
                                              ("diveq", self.diveq)) if on]
        if learned_only and layer_kwargs.get("ema_decay") is not None:
            raise ValueError(f"{learned_only[0]}=True needs learned codebooks (ema_decay=None)")
        if self.diveq:
            if self.output_gradient != "every":
                raise ValueError("diveq=True sums every level's output with its gradient: output_gradient must be 'every'")
            layer_kwargs.setdefault("route_gradients_to_input", False)
            self.quant_grad_frac = 1.0
        if self.shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"shared_codebook=True needs one codebook size for every level, got {sizes}")

        if self.shared_codebook:
            layers = [VectorQuantizer(dim, sizes[0], generator=generator, **layer_kwargs)] * q
        else:
            layers = [VectorQuantizer(dim, k, generator=generator, **layer_kwargs) for k in sizes]
        self.layers = nn.ModuleList(layers)
        first = self.layers[0]
        self.mlps = None
        if self.implicit_neural_codebook:
            if first.heads > 1:
                raise ValueError(f"implicit_neural_codebook=True needs one head, got heads = {first.heads}")
            l2norm = first.metric == "cosine"
            self.mlps = nn.ModuleList(QincoMLP(dim, l2norm_output=l2norm, **(mlp_kwargs or {})) for _ in range(q - 1))
        elif mlp_kwargs:
            raise ValueError("mlp_kwargs configure the implicit neural codebook: give implicit_neural_codebook=True")

        self.beam_size = None if beam_size is None else checks.integer("beam_size", beam_size, 1)
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size")
        self.eval_beam_size = self.beam_size if eval_beam_size is None else checks.integer("eval_beam_size", eval_beam_size, 1)
        weights = [1.0] * q if beam_score_weights is None else [checks.real("beam_score_weights", w, lambda v: True, "a number")
                                                               for w in beam_score_weights]
        if len(weights) != q:
            raise ValueError(f"beam_score_weights needs one weight per level ({q}), got {len(weights)}")
        self._beam_weights = weights  # host floats: the beam search multiplies by them without a device read
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        self.fused = True

    @staticmethod
    def _sizes(num_codes, num_quantizers) -> tuple[int, ...]:
        if isinstance(num_codes, Sequence) and not isinstance(num_codes, str):
            sizes = tuple(checks.integer("num_codes", k, 1) for k in num_codes)
            if not sizes:
                raise ValueError("num_codes must name at least one level's codebook size")
            if num_quantizers is not None and checks.integer("num_quantizers", num_quantizers, 1) != len(sizes):
                raise ValueError(f"num_quantizers = {num_quantizers} but num_codes gives {len(sizes)} sizes: {sizes}")
            return sizes
        if num_quantizers is None:
            raise ValueError("num_quantizers is needed when num_codes is one size")
        return (checks.integer("num_codes", num_codes, 1),) * checks.integer("num_quantizers", num_quantizers, 1)

    def extra_repr(self) -> str:
        return (
            f"num_quantizers={self.num_quantizers}, shared_codebook={self.shared_codebook}, "
            f"quantize_dropout={self.quantize_dropout}, output_gradient={self.output_gradient!r}"
        )

    # --- the forward pass ---------------------------------------------------------------------------

    def forward(
        self,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        return_all_losses: bool = False,
        num_active: int | torch.Tensor | None = None,
        temperature: float | None = None,
        freeze_codebook: bool | None = None,
        beam_size: int | None = None,
        route_gradients_to_input: bool | None = None,
        return_breakdowns: bool = False,
        diversity_positions: int | None = None,
    ):
        """``(z_q, indices, loss)``, plus the per-level losses ``[num_quantizers]`` with ``return_all_losses``,
        plus each level's :class:`~vqtriton.QuantizerBreakdown` (a list) with ``return_breakdowns`` (the
        level loop runs then; not with the beam search).

        ``num_active`` (an int, or a 0-dim integer tensor on the device): run only the first ``num_active``
        levels this call (the others as dropped), instead of the dropout's draw. ``temperature``,
        ``freeze_codebook``, ``route_gradients_to_input`` go to every level; ``beam_size`` overrides the
        layer's for this call (1: no beam search).
        """
        checks.float_tensor("z", z)
        checks.generator_device(self.generator, z.device)
        n_levels = self._num_active(z.device, num_active)
        beam = self.beam_size if self.training else self.eval_beam_size
        beam = beam if beam_size is None else checks.integer("beam_size", beam_size, 1)
        x = z.to(torch.promote_types(z.dtype, torch.float32))
        call = dict(temperature=temperature, freeze_codebook=freeze_codebook, route_gradients_to_input=route_gradients_to_input,
                    diversity_positions=diversity_positions)
        first = self.layers[0]
        frozen = first.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        # A shared codebook's statistics take one update per step, from every level's rows (after the loop).
        deferred = self.shared_codebook and first.keeps_statistics and self.training and not frozen
        how = self._fused_mode(x, frozen, call) if (beam is None or beam == 1) and not return_breakdowns else None
        if return_breakdowns and beam is not None and beam > 1:
            raise ValueError("return_breakdowns describes one code per vector: not with the beam search")
        breakdowns = [] if return_breakdowns else None
        if beam is not None and beam > 1:
            out, indices, all_losses = self._beam_search(x, mask, beam, n_levels, deferred, frozen, call)
        elif how is not None:
            out, indices, all_losses = self._fused_levels(x, mask, n_levels, frozen, how)
        else:
            out, indices, all_losses = self._levels_loop(x, mask, n_levels, deferred, call, breakdowns)
        if self.diveq:
            out = estimators.directional(x, out, DIVEQ_VARIANCE, self.generator)
        result = (out.to(z.dtype), indices, all_losses.sum())
        result = (*result, all_losses) if return_all_losses else result
        return (*result, breakdowns) if return_breakdowns else result

    def _levels_loop(self, x, mask, n_levels, deferred: bool, call: dict, breakdowns: list | None = None):
        """The levels one after another: ``(output, indices [..., Q], per-level losses [Q])`` (and each
        level's breakdown appended to ``breakdowns``)."""
        collect = [] if deferred else None
        # A shared codebook's in-place optimiser steps once, after every level added its gradient.
        one_step = self.shared_codebook and self.layers[0].in_place_optimizer is not None
        out, residual, indices, losses = None, x, [], []
        for l, layer in enumerate(self.layers):
            active = None if n_levels is None or l == 0 else n_levels > l
            q, idx, loss, *parts = layer(residual, mask, _active=active, _update=not deferred, _collect=collect,
                                         _optimizer_step=not one_step,
                                         codebook_transform=self._row_codebooks(l, out),
                                         return_breakdown=breakdowns is not None, **call)
            if breakdowns is not None:
                breakdowns.append(parts[0])
            # "first": level 0's straight-through output carries the gradient to z once, later levels add
            # values only; "every": each level's output carries its own.
            out = q if out is None else out + (q if self.output_gradient == "every" else q.detach())
            # Detached codes (or a fraction of their gradient): every residual keeps dr/dz = I.
            residual = residual - estimators.frac_gradient(q, self.quant_grad_frac)
            indices.append(idx)
            losses.append(loss)
        if deferred:
            self.layers[0]._update_collected(collect, distributed.is_active(self.layers[0].sync))
        first = self.layers[0]
        frozen = first.freeze_codebook if call["freeze_codebook"] is None else bool(call["freeze_codebook"])
        if one_step and self.training and not frozen and not first.manual_in_place_update:
            first.update_in_place_optimizer()
        return out, torch.stack(indices, -1), torch.stack(losses)

    def _fused_mode(self, x: torch.Tensor, frozen: bool, call: dict) -> str | None:
        """Which fused op runs this call: ``"assign"`` (no gradient is needed), ``"quantize"``, or None (the
        level loop: what the ops do not cover, see the module docstring)."""
        first = self.layers[0]
        if not self.fused or self.mlps is not None or self.quant_grad_frac > 0 or self.diveq or first.heads > 1:
            return None
        if first.commitment_cross_entropy or first.orthogonal_reg_weight > 0 or first.sync_update_v > 0 or \
                first.codebook_fn is not None or first.codebook_diversity_weight > 0 or first.affine or \
                first.in_place_optimizer is not None:
            return None
        if self.training and any(layer._kmeans_pending for layer in self.layers):
            return None
        temperature = first.sample_temperature if call["temperature"] is None else call["temperature"]
        if self.training and temperature > 0:
            return None
        route = first.route_gradients_to_input if call["route_gradients_to_input"] is None else call["route_gradients_to_input"]
        learned = not frozen and any(layer.codebook.requires_grad for layer in self.layers)
        if not (torch.is_grad_enabled() and (x.requires_grad or learned)):
            return "assign"
        return "quantize" if first._output_mode(bool(route)) in ("straight_through", "rotation") else None

    def _fused_levels(self, x, mask, n_levels, frozen: bool, how: str):
        """Every level in one launch (``residual_quantize`` or ``residual_assign``): ``(output, indices [..., Q],
        per-level losses [Q])``, each level's loss as its own call would compute it; then the training step's
        codebook updates from one ``residual_stats`` launch."""
        first = self.layers[0]
        rows, lead = first._rows(x)
        keep = first._kept(mask, lead, x)
        sync = self.training and distributed.is_active(first.sync)
        for layer in self.layers:
            if sync and not layer._state_synced:
                layer._broadcast_state()
        books = [layer.codebook.detach() if frozen else layer.codebook for layer in self.layers]
        opts = dict(metric=first.metric, precision=first.precision, mask=keep, levels=n_levels, backend=first.backend)
        with torch.autocast(x.device.type, enabled=False):
            rows = rows.to(torch.promote_types(rows.dtype, first.codebook.dtype))
            if how == "assign":
                r = residual_assign(rows, books, **opts)
                z_q, idx, d_codebook, d_commitment = r.z_q, r.indices, r.distances, r.distances
            else:
                z_q, idx, d_codebook, d_commitment = residual_quantize(
                    rows, books, output_grad=self.output_gradient, rotation_trick=first.rotation_trick,
                    deterministic=first.deterministic, **opts)
            codebook_loss, commitment_loss = d_codebook.sum(0), d_commitment.sum(0)
            if first.reduction == "mean":
                count = rows.shape[0] * rows.shape[1] if keep is None else keep.sum() * rows.shape[1]
                count = max(count, 1) if keep is None else count.clamp_min(1)
                codebook_loss, commitment_loss = codebook_loss / count, commitment_loss / count
            if first.ema_decay is None:
                losses = codebook_loss + first.beta * commitment_loss
            else:
                losses = first.beta * commitment_loss
            if self.training and not frozen and first.keeps_statistics:
                self._fused_updates(rows.detach(), idx, keep, n_levels, sync)
        out = z_q.to(x.dtype).reshape(*lead, first.dim).movedim(-1, first.channel_dim)
        return out, idx.reshape(*lead, self.num_quantizers), losses

    @torch.no_grad()
    def _fused_updates(self, rows, idx, keep, n_levels, sync: bool) -> None:
        """Every level's EMA step and dead-code restart after a fused forward: the statistics of all levels
        from one ``residual_stats`` launch (replaying the residuals from ``rows`` and ``idx``); the levels'
        inputs (for restarts) recomputed in torch only when codes can restart."""
        first = self.layers[0]
        codes = [layer._codes(0, rows.dtype) for layer in self.layers]  # as the levels compare them
        flat, sizes = torch.cat(codes).contiguous(), list(self.codebook_sizes)
        cosine = first.metric == "cosine"
        counts, sums = _op(
            "residual_stats", rows.contiguous(), flat, sizes, idx.contiguous(), cosine,
            deterministic_mode(first.deterministic), choose(rows, flat, backend=first.backend))
        counts, sums = counts.split(sizes), sums.split(sizes)
        inputs = [rows] * self.num_quantizers
        if first.dead_code_threshold > 0:
            inputs, r = [], rows.float()
            for l in range(self.num_quantizers):
                inputs.append(first._to_metric(r))
                r = r - torch_ops.gather(idx[:, l], codes[l]).float()
        actives = [None if n_levels is None or l == 0 else n_levels > l for l in range(self.num_quantizers)]
        n = rows.shape[0]
        kept = [keep if a is None else (a.expand(n) if keep is None else keep & a) for a in actives]
        if self.shared_codebook:
            ones = torch.ones(n, dtype=torch.bool, device=rows.device)
            stats = [(sum(counts), sum(sums))]
            first._update_books(stats, [torch.cat(inputs)], [torch.cat([ones if k is None else k for k in kept])], sync, None)
            return
        for l, layer in enumerate(self.layers):
            layer._update_books([(counts[l], sums[l])], [inputs[l]], [kept[l]], sync, actives[l])

    def _row_codebooks(self, l: int, out: torch.Tensor | None):
        """QINCo's per-row codebooks of level ``l >= 1``, conditioned on the output so far (None otherwise)."""
        if self.mlps is None or l == 0:
            return None
        rows, _ = self.layers[l]._rows(out)
        return QincoCodes(self.mlps[l - 1], rows)

    def _beam_search(self, x, mask, beam: int, n_levels, deferred: bool, frozen: bool, call: dict):
        """The beam search over rows ``[..., D]``: ``(output, indices [..., Q], per-level losses [Q])``."""
        first = self.layers[0]
        if first.heads > 1 or first.channel_dim not in (-1, x.dim() - 1):
            raise ValueError("the beam search quantizes rows [..., D] with one head: channel_dim=-1, heads=1")
        lead, d = x.shape[:-1], x.shape[-1]
        keep = first._kept(mask, lead, x)
        rows = x.reshape(-1, d)
        n = rows.shape[0]
        residual, out = rows.unsqueeze(1), torch.zeros_like(rows).unsqueeze(1)  # [n, B, d]: B paths per row
        scores = rows.new_zeros(n, 1)
        history = {"idx": [], "loss": [], "input": []}  # per level, [n, B] or [n, B, d], along the paths
        last = self.num_quantizers - 1
        for l, layer in enumerate(self.layers):
            paths = residual.shape[1]
            k = min(beam, layer.num_codes)
            active = None if n_levels is None or l == 0 else n_levels > l
            m = None if keep is None else keep.unsqueeze(1).expand(n, paths).reshape(-1)
            q, idx, loss = layer(residual.reshape(n * paths, d), m, topk=k, _active=active,
                                 codebook_transform=self._row_codebooks(l, out.reshape(n * paths, d)), **call)
            q, idx, loss = q.reshape(n, paths, k, d), idx.reshape(n, paths, k), loss.reshape(n, paths, k)
            scores = (scores.unsqueeze(2) - loss.detach() * self._beam_weights[l]).reshape(n, paths * k)
            spread = lambda t: t.unsqueeze(2).expand(n, paths, k, *t.shape[2:]).reshape(n, paths * k, *t.shape[2:])  # noqa: E731
            history = {name: [spread(t) for t in ts] for name, ts in history.items()}
            history["idx"].append(idx.reshape(n, paths * k))
            history["loss"].append(loss.reshape(n, paths * k))
            history["input"].append(spread(residual))
            step = q if self.output_gradient == "every" or l == 0 else q.detach()
            out = (out.unsqueeze(2) + step).reshape(n, paths * k, d)
            residual = (residual.unsqueeze(2) - estimators.frac_gradient(q, self.quant_grad_frac)).reshape(n, paths * k, d)
            width = beam if l < last else 1
            if paths * k > width:
                scores, sel = scores.topk(width, dim=1)
                pick = lambda t: t.gather(1, sel.view(n, width, *[1] * (t.dim() - 2)).expand(n, width, *t.shape[2:]))  # noqa: E731
                history = {name: [pick(t) for t in ts] for name, ts in history.items()}
                out, residual = pick(out), pick(residual)
        indices = torch.stack([t[:, 0] for t in history["idx"]], -1)  # [n, Q]
        losses = torch.stack([t[:, 0] for t in history["loss"]], -1)  # [n, Q]: each vector's loss per level
        inputs = [t[:, 0] for t in history["input"]]
        if keep is not None:
            losses = torch.where(keep.unsqueeze(1), losses, 0)
        count = n if keep is None else keep.sum()
        all_losses = losses.sum(0) if first.reduction == "sum" else losses.sum(0) / (max(count, 1) if keep is None else count.clamp_min(1))
        if self.training and not frozen:
            self._update_from_paths(inputs, indices, keep, n_levels, deferred, lead)
        return out[:, 0].reshape(*lead, d), indices.reshape(*lead, -1), all_losses

    def _update_from_paths(self, inputs: list, indices: torch.Tensor, keep, n_levels, deferred: bool, lead) -> None:
        """Each level's codebook update from the beam search's chosen path (one update of all levels' rows
        for a shared codebook)."""
        n = indices.shape[0]
        actives = [None if n_levels is None or l == 0 else n_levels > l for l in range(self.num_quantizers)]
        if deferred:
            ones = torch.ones(n, dtype=torch.bool, device=indices.device)
            masks = [(ones if keep is None else keep) & (True if a is None else a) for a in actives]
            self.layers[0].update_indices(torch.cat(inputs), indices.T.reshape(-1), torch.cat(masks), check_indices=False)
            return
        for l, layer in enumerate(self.layers):
            layer.update_indices(inputs[l].reshape(*lead, -1), indices[:, l].reshape(lead),
                                 None if keep is None else keep.reshape(lead), check_indices=False, _active=actives[l])

    def cross_entropy(self, z: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None):
        """Teacher forcing on given codes ``indices [..., num_quantizers]``: ``(z_q, losses [Q])``, ``z_q`` the sum of
        the given codes, ``losses[l]`` level ``l``'s :meth:`VectorQuantizer.code_cross_entropy` of the residual
        that the given codes of the levels before it leave (``r_0 = z``, ``r_{l+1} = r_l - sg[c_l]``) against its
        given index (-1: none). A loss evaluation: no codebook changes. (vector-quantize-pytorch's ``indices=``
        path, which crashes in its ResidualVQ.) Not for implicit neural codebooks."""
        if self.mlps is not None:
            raise ValueError("cross_entropy needs explicit codebooks: the implicit neural codebook's logits are per row")
        codes = self.get_codes_from_indices(indices)  # checks indices
        residual = z.to(torch.promote_types(z.dtype, torch.float32))
        losses = []
        for l, layer in enumerate(self.layers):
            losses.append(layer.code_cross_entropy(residual, indices[..., l], mask))
            residual = residual - codes[l].detach()
        return codes.sum(0).to(z.dtype), torch.stack(losses)

    # --- indices back to codes ------------------------------------------------------------------------

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Every level's codes for ``indices [..., num_quantizers]``, stacked: ``[num_quantizers, ...]`` in
        the levels' input layout (-1 gives zeros); the gradient flows to learned codebooks (and QINCo's MLPs)."""
        if not isinstance(indices, torch.Tensor) or indices.shape[-1:] != (self.num_quantizers,):
            shape = tuple(getattr(indices, "shape", ()))
            raise ValueError(
                f"indices must be [..., num_quantizers] with num_quantizers = {self.num_quantizers}, got shape {shape}"
            )
        if self.mlps is None:
            return torch.stack([layer.get_output_from_indices(indices[..., l]) for l, layer in enumerate(self.layers)])
        idx = checks.indices(indices, device=self.layers[0].codebook.device)
        lead = idx.shape[:-1]
        idx = idx.reshape(-1, self.num_quantizers)
        for l, layer in enumerate(self.layers):
            checks.index_range(idx[:, l], layer.num_codes)
        codes, out = [], None
        for l, layer in enumerate(self.layers):
            book = layer._codes(0, layer.codebook.dtype)
            if l == 0:
                c = torch.where((idx[:, 0] >= 0).unsqueeze(1), book[idx[:, 0].clamp_min(0)], 0)
            else:
                c = layer._to_metric(QincoCodes(self.mlps[l - 1], out).chosen(book, idx[:, l]))
                c = torch.where((idx[:, l] >= 0).unsqueeze(1), c, 0)
            out = c if out is None else out + c
            codes.append(c.reshape(*lead, -1).movedim(-1, layer.channel_dim))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The sum of every level's codes for ``indices [..., num_quantizers]``, in the levels' input layout
        (-1 adds nothing); the gradient flows to learned codebooks."""
        return self.get_codes_from_indices(indices).sum(0)

    decode = get_output_from_indices

    # --- quantize dropout --------------------------------------------------------------------------

    def draw_levels(self, device: torch.device) -> torch.Tensor | None:
        """How many leading levels a training call keeps, drawn on ``device`` as a 0-dim int64 tensor (None:
        all of them, no draw): the dropout's draw, broadcast from rank 0 when the levels synchronise.
        (:class:`vqtriton.compat.GroupedResidualVQ` shares one draw between its groups.)"""
        q = self.num_quantizers
        if not (self.training and self.quantize_dropout > 0 and q > 1):
            return None
        if any(layer._kmeans_pending for layer in self.layers):
            return None  # every level sees this batch, so every level can take its k-means step
        levels = dropout_levels(q, self.quantize_dropout, self.quantize_dropout_cutoff_index,
                                self.quantize_dropout_multiple_of, self.generator, device)
        if distributed.is_active(self.layers[0].sync):
            distributed.broadcast_(levels, 0)
        return levels

    def _num_active(self, device: torch.device, num_active) -> torch.Tensor | None:
        """The levels this call runs: given (an int in [1, Q] or a 0-dim integer tensor), or drawn."""
        if num_active is None:
            return self.draw_levels(device)
        n = checked_num_active(num_active, self.num_quantizers, device)
        if isinstance(n, torch.Tensor):
            return n
        return None if n == self.num_quantizers else torch.tensor(n, device=device)
