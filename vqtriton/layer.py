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

from typing import NamedTuple

import torch
from torch import nn

from vqtriton import checks, distributed
from vqtriton import codebook_state as state
from vqtriton.backend import BACKENDS
from vqtriton.functional import METRICS, PRECISIONS, deterministic_mode, lookup, quantize, unit

__all__ = ["VectorQuantizer", "QuantizerBreakdown"]

REDUCTIONS = ("mean", "sum")
# Buffers that stay float32 when the module is cast to another dtype (see VectorQuantizer._apply).
_FP32_STATS = ("cluster_size", "embed_sum")


class QuantizerBreakdown(NamedTuple):
    """The 4th value of ``VectorQuantizer(..., return_breakdown=True)``, over the batch's kept vectors
    (this rank's batch: nothing here is synchronised).

    ``perplexity = exp(-sum p log p)`` of the code usage ``p``; ``usage`` is the fraction of codes used.
    With separate codebooks per head, each is the mean over heads; the losses combine as the layer's loss.
    """

    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


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
      cosine metric). The step's output uses the codebook from before the update.
    - ``metric="cosine"``: inputs and codes are l2-normalised (per head); ``z_q`` is the normalised code.
    - ``kmeans_init``: ``kmeans_iters`` Lloyd iterations on the first training batch seed the codebook
      (the ``initted`` buffer records it; a batch with no usable vector leaves it False, and eager mode
      tries again on the next batch).
    - ``dead_code_threshold`` (EMA only): codes whose ``cluster_size`` falls below it are re-seeded
      from random vectors of the batch.
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
    - ``rotation_trick``: ``z_q``'s gradient reaches ``z`` rotated and scaled (Fifty et al., ICLR 2025)
      rather than unchanged; see :func:`vqtriton.functional.quantize`.
    - ``reduction``: ``"mean"`` over the kept elements, or ``"sum"`` (the spec's squared norms).
    - ``precision``, ``backend``: passed to :func:`vqtriton.functional.quantize`.
    - ``deterministic`` (``None``: follow ``torch.use_deterministic_algorithms``): bitwise reproducible
      codebook gradients and EMA statistics.
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
        heads: int = 1,
        shared_codebook: bool = False,
        sync: bool | None = None,
        rotation_trick: bool = False,
        reduction: str = "mean",
        precision: str = "exact",
        backend: str | None = None,
        deterministic: bool | None = None,
    ):
        super().__init__()
        self.dim = checks.integer("dim", dim, 1)
        self.num_codes = checks.integer("num_codes", num_codes, 1)
        self.beta = checks.real("beta", beta, lambda v: v >= 0, ">= 0")
        self.ema_decay = None if ema_decay is None else checks.real("ema_decay", ema_decay, lambda v: 0 < v < 1, "in (0, 1)")
        self.eps = checks.real("eps", eps, lambda v: v > 0, "> 0")
        self.metric = checks.choice("metric", metric, METRICS)
        self.channel_dim = checks.integer("channel_dim", channel_dim)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = checks.integer("kmeans_iters", kmeans_iters, 0)
        self.dead_code_threshold = checks.real("dead_code_threshold", dead_code_threshold, lambda v: v >= 0, ">= 0")
        if self.dead_code_threshold > 0 and self.ema_decay is None:
            raise ValueError("dead_code_threshold > 0 needs ema_decay: dead codes are found by their EMA cluster_size")
        self.heads = checks.integer("heads", heads, 1)
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim = {self.dim} and heads = {self.heads}")
        self.head_dim = self.dim // self.heads
        self.shared_codebook = bool(shared_codebook)
        if not (sync is None or isinstance(sync, bool)):
            raise TypeError(f"sync must be None, True or False, got {sync!r}")
        self.sync = sync
        self.rotation_trick = checks.choice("rotation_trick", rotation_trick, (False, True))
        self.reduction = checks.choice("reduction", reduction, REDUCTIONS)
        self.precision = checks.choice("precision", precision, PRECISIONS)
        self.backend = checks.choice("backend", backend, (None, *BACKENDS))
        self.deterministic = checks.choice("deterministic", deterministic, (None, True, False))

        # One codebook per head, stacked, unless there is one head or one shared codebook.
        self.num_books = 1 if self.shared_codebook else self.heads
        book_shape = (self.num_codes, self.head_dim)
        if self.num_books > 1:
            book_shape = (self.heads, *book_shape)
        codebook = self._to_metric(torch.randn(book_shape))
        if self.ema_decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(book_shape[:-1], dtype=torch.float32))
            self.register_buffer("embed_sum", codebook.to(torch.float32, copy=True))
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        # Host-side mirrors of state, so that a step branches on Python values only (no sync). Loading a
        # state_dict re-reads the first from ``initted`` (see _load_from_state_dict).
        self._kmeans_pending = self.kmeans_init
        self._state_synced = False

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
        _active: torch.Tensor | None = None,
    ):
        """``(z_q, indices, loss)``, plus a :class:`QuantizerBreakdown` with ``return_breakdown``.

        ``reduction`` overrides the layer's own for this call (``VQVAE.loss`` uses it). ``_active`` (a
        0-dim bool tensor, for ``ResidualVQ``'s quantize dropout): where False the call is a level that
        did not run: every vector is masked and the codebook does not change.
        """
        reduction = self.reduction if reduction is None else checks.choice("reduction", reduction, REDUCTIONS)
        rows, lead = self._rows(z)
        checks.same_device(z=z, codebook=self.codebook)
        keep = self._kept(mask, lead, z)
        if _active is not None:
            keep = _active.expand(rows.shape[0]) if keep is None else keep & _active
        # No autocast inside: assignment stays exact and statistics fp32 on every backend, torch included.
        with torch.autocast(z.device.type, enabled=False):
            # The rows, in the wider of z's and the codebook's dtype, as the metric compares them.
            x = rows.to(torch.promote_types(z.dtype, self.codebook.dtype))
            parts = [self._to_metric(p) for p in self._split(x)]  # one [n, dim / H] per codebook
            kept = self._split_keep(keep, x.shape[0])  # one [n] bool (or None) per codebook
            sync = self.training and distributed.is_active(self.sync)
            if sync and not self._state_synced:
                self._broadcast_state()
            if self.training and self._kmeans_pending:
                self._kmeans(parts, kept, sync)
            results = [
                self._scaled(
                    quantize(
                        p, self._codes(b, p.dtype), self.beta, "sum", mask=m, rotation_trick=self.rotation_trick,
                        precision=self.precision, backend=self.backend, deterministic=self.deterministic,
                    ),
                    m, p, reduction,
                )
                for b, (p, m) in enumerate(zip(parts, kept))
            ]
            losses = [r.loss if self.ema_decay is None else self.beta * r.commitment_loss for r in results]
            ema_step = self.training and self.ema_decay is not None
            if ema_step or return_breakdown:
                stats = [
                    state.code_stats(r.indices, p if ema_step else None, self.num_codes, backend=self.backend,
                                     deterministic=deterministic_mode(self.deterministic))
                    for r, p in zip(results, parts)
                ]
            if return_breakdown:  # this rank's counts, before the EMA step sums them over ranks
                breakdown = _breakdown(results, [counts for counts, _ in stats], reduction)
            if ema_step:
                self._ema_step(stats, parts, kept, sync, _active)
        z_q, indices = self._join([r.z_q for r in results], [r.indices for r in results], x.shape[0])
        z_q = z_q.to(z.dtype).reshape(*lead, self.dim).movedim(-1, self.channel_dim)
        indices = indices.reshape(*lead, *indices.shape[1:])
        loss = _combine(losses, reduction)
        return (z_q, indices, loss, breakdown) if return_breakdown else (z_q, indices, loss)

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

    # --- layout: [..., D] or channel-first, with a mask, to and from rows -----------------------

    def _rows(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """``z`` as rows ``[N, D]`` (channel dim last) and the shape of its leading dims."""
        checks.float_tensor("z", z)
        if not -z.dim() <= self.channel_dim < z.dim() or z.shape[self.channel_dim] != self.dim:
            raise ValueError(
                f"z must have dim = {self.dim} channels in dim {self.channel_dim}, got shape {tuple(z.shape)}"
            )
        z = z.movedim(self.channel_dim, -1)
        return z.reshape(-1, self.dim), z.shape[:-1]

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

    def _scaled(self, r, keep: torch.Tensor | None, x: torch.Tensor, reduction: str):
        """A ``quantize`` result of sums as the layer reports it: ``"mean"`` divides by the number of
        kept elements, at least 1 (a batch with no kept vector has loss 0, not NaN)."""
        if reduction == "sum":
            return r
        count = (x.shape[0] if keep is None else keep.sum()) * x.shape[1]
        count = max(count, 1) if keep is None else count.clamp_min(1)
        cb, cm = r.codebook_loss / count, r.commitment_loss / count
        return r._replace(codebook_loss=cb, commitment_loss=cm, loss=cb + self.beta * cm)

    def _to_metric(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return unit(t, dim, t.dtype) if self.metric == "cosine" else t

    # --- one codebook: the b-th of num_books ---------------------------------------------------

    def _book(self, b: int) -> state.Book:
        """Codebook ``b`` and its statistics, as views: writing to them updates the module's tensors."""
        tensors = (self.codebook, None, None) if self.ema_decay is None else (self.codebook, self.cluster_size, self.embed_sum)
        if self.num_books > 1:
            tensors = tuple(None if t is None else t[b] for t in tensors)
        return state.Book(*tensors, self._to_metric)

    def _codes(self, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Codebook ``b`` as the quantizer compares it, in ``dtype``. (No copy for an EMA codebook, which
        the EMA step rewrites in place: the backward reads the codes from the step's own z_q.)"""
        return self._to_metric(self._book(b).codes.to(dtype))

    # --- codebook updates (training mode): the functions of codebook_state ------------------------

    def _valid(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The rows a code may be seeded from: kept, and all finite."""
        finite = torch.isfinite(x).all(1)
        return finite if keep is None else finite & keep

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Rank 0's codebook, statistics and ``initted`` on every rank (the first synchronised step)."""
        names = [n for n in ("codebook", *_FP32_STATS) if hasattr(self, n)]
        state.broadcast_([getattr(self, n).data for n in names], self.initted)
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

    @torch.no_grad()
    def _ema_step(self, stats: list, parts: list[torch.Tensor], kept: list, sync: bool, active) -> None:
        """EMA update and dead-code restart of every codebook; synchronised, the per-code counts and sums
        of all codebooks are first summed over ranks (one collective)."""
        if sync:
            distributed.all_reduce_sum_(*(counts for counts, _ in stats), *(sums for _, sums in stats))
        for b, ((counts, sums), x, keep) in enumerate(zip(stats, parts, kept)):
            book = self._book(b)
            state.ema_update_(book, counts, sums, self.ema_decay, self.eps, active)
            if self.dead_code_threshold > 0:
                x = x.detach()
                state.restart_dead_codes_(
                    book, x, self._valid(x, keep), self.dead_code_threshold, self.eps, sync=sync, active=active
                )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._read_kmeans_pending()

    # --- dtype casts ------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Moves and casts like any module, except that the EMA statistics stay float32: a cast such as
        ``.to(torch.bfloat16)`` only moves them (from their full-precision values) to the new device."""
        stats = {name: self._buffers[name] for name in _FP32_STATS if name in self._buffers}
        super()._apply(fn, recurse)
        for name, old in stats.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
