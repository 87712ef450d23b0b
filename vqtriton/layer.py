"""``VectorQuantizer``: the VQ layer over the fused ``quantize`` op.

The codebook is either learned (an ``nn.Parameter`` trained by the codebook loss) or moved by
exponential moving averages of per-code counts and sums (``ema_decay``, Sonnet / VQ-VAE-2), with the
L2 or cosine metric, k-means initialisation on the first training batch, dead-code restart,
channel-first inputs and padding masks. Per-code statistics come from the ``code_stats`` launcher (one
pass over the indices, no one-hot, no N x K) and stay float32 whatever the module's dtype.

One training step, in order: k-means (first batch only), ``quantize`` with the current codebook (this
step's output, indices and loss), the EMA update, dead-code restart.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqtriton import checks
from vqtriton.backend import BACKENDS, choose, ops
from vqtriton.functional import METRICS, PRECISIONS, assign, lookup, quantize

__all__ = ["VectorQuantizer", "QuantizerBreakdown"]

REDUCTIONS = ("mean", "sum")
# Buffers that stay float32 when the module is cast to another dtype (see VectorQuantizer._apply).
_FP32_STATS = ("cluster_size", "embed_sum")


class QuantizerBreakdown(NamedTuple):
    """The 4th value of ``VectorQuantizer(..., return_breakdown=True)``, over the batch's kept vectors.

    ``perplexity = exp(-sum p log p)`` of the code usage ``p``; ``usage`` is the fraction of codes used.
    """

    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def _usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity and fraction of codes used, from per-code counts (1 and 0 when nothing was counted)."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum()), (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of ``z``: ``z_q, indices, loss = vq(z, mask=None)``.

    ``z`` holds vectors of ``dim`` channels along ``channel_dim`` (``-1``: ``[..., D]``; ``1``:
    ``[B, C, H, W]`` or ``[B, C, T]``); ``z_q`` has ``z``'s shape and dtype, value the nearest code,
    gradient straight through to ``z``; ``indices`` is int64, ``z``'s shape without the channel dim.
    ``mask`` (bool, that same shape) marks the vectors to quantize: the others get index -1, a zero
    ``z_q``, and count in no loss, statistic, k-means or metric.

    - Learned codebook (``ema_decay=None``): ``vq.codebook`` is an ``nn.Parameter``,
      ``loss = codebook_loss + beta * commitment_loss``.
    - EMA codebook: ``vq.codebook`` is a buffer, ``loss = beta * commitment_loss``; each training step
      updates the float32 buffers ``cluster_size`` ``[K]`` and ``embed_sum`` ``[K, D]`` with the batch's
      counts ``n`` and sums ``s``: ``cluster_size <- g cluster_size + (1 - g) n``, ``embed_sum <- g
      embed_sum + (1 - g) s``, then ``codebook = embed_sum / size`` with the Laplace-smoothed
      ``size = (cluster_size + eps) / (N + K eps) N``, ``N = sum(cluster_size)``. The step's output
      uses the codebook from before the update.
    - ``metric="cosine"``: inputs and codes are l2-normalised; ``z_q`` is the normalised code.
    - ``kmeans_init``: ``kmeans_iters`` Lloyd iterations on the first training batch seed the codebook
      (the ``initted`` buffer records it).
    - ``dead_code_threshold`` (EMA only): codes whose ``cluster_size`` falls below it are re-seeded
      from random vectors of the batch.
    - ``reduction``: ``"mean"`` over the kept elements, or ``"sum"`` (the spec's squared norms).
    - ``precision``, ``backend``: passed to :func:`vqtriton.functional.quantize`.

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
        reduction: str = "mean",
        precision: str = "exact",
        backend: str | None = None,
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
        self.reduction = checks.choice("reduction", reduction, REDUCTIONS)
        self.precision = checks.choice("precision", precision, PRECISIONS)
        self.backend = checks.choice("backend", backend, (None, *BACKENDS))

        codebook = self._to_metric(torch.randn(self.num_codes, self.dim))
        if self.ema_decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(self.num_codes, dtype=torch.float32))
            self.register_buffer("embed_sum", codebook.to(torch.float32, copy=True))
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))

    def extra_repr(self) -> str:
        mode = "learned" if self.ema_decay is None else f"ema_decay={self.ema_decay}"
        return f"{self.dim}, {self.num_codes}, {mode}, metric={self.metric!r}, beta={self.beta}"

    # --- the forward pass ---------------------------------------------------------------------------

    def forward(
        self,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        return_breakdown: bool = False,
        reduction: str | None = None,
    ):
        """``(z_q, indices, loss)``, plus a :class:`QuantizerBreakdown` with ``return_breakdown``.

        ``reduction`` overrides the layer's own for this call (``VQVAE.loss`` uses it).
        """
        reduction = self.reduction if reduction is None else checks.choice("reduction", reduction, REDUCTIONS)
        rows, lead = self._rows(z)
        keep = self._kept(mask, lead, z)
        # No autocast inside: assignment stays exact and statistics fp32 on every backend, torch included.
        with torch.autocast(z.device.type, enabled=False):
            # The kept rows, in the wider of z's and the codebook's dtype, as the metric compares them.
            x = rows if keep is None else rows.index_select(0, keep)
            x = self._to_metric(x.to(torch.promote_types(z.dtype, self.codebook.dtype)))
            if self.training and self.kmeans_init and not self.initted:
                self._kmeans(x.detach())
            r = quantize(x, self._codes(x.dtype), self.beta, reduction, precision=self.precision, backend=self.backend)
            loss = r.loss if self.ema_decay is None else self.beta * r.commitment_loss
            ema_step = self.training and self.ema_decay is not None
            if ema_step or return_breakdown:
                counts, sums = self._code_stats(r.indices, x, sums=ema_step)
            if ema_step:
                self._ema_update(counts, sums)
                self._restart_dead_codes(x.detach())
        z_q, indices = self._unrows(r.z_q, r.indices, keep, lead, z)
        if not return_breakdown:
            return z_q, indices, loss
        return z_q, indices, loss, QuantizerBreakdown(r.codebook_loss, r.commitment_loss, *_usage(counts))

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of ``indices`` in the layer's input layout (``channel_dim`` honoured), -1 giving zeros.

        Normalised codes for the cosine metric; the gradient flows to a learned codebook.
        """
        codes = lookup(indices, self._codes(self.codebook.dtype), backend=self.backend)
        return codes.movedim(-1, self.channel_dim)

    decode = get_output_from_indices

    def transform_input(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` as the quantizer compares it: l2-normalised along ``channel_dim`` for cosine, else as is."""
        return self._to_metric(z, self.channel_dim)

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
        """Row indices of the vectors to quantize, or None for all of them."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != lead:
            raise ValueError(
                f"mask must have z's shape without the channel dim, {tuple(lead)} for z {tuple(z.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        checks.same_device(mask=mask, z=z)
        return mask.reshape(-1).nonzero().squeeze(1)

    def _unrows(self, z_q, indices, keep, lead: torch.Size, z: torch.Tensor):
        """Rows of kept vectors back to ``z``'s layout and dtype: zeros and index -1 where masked."""
        if keep is not None:
            n = math.prod(lead)
            z_q = z_q.new_zeros(n, self.dim).index_copy(0, keep, z_q)
            indices = indices.new_full((n,), -1).index_copy(0, keep, indices)
        z_q = z_q.to(z.dtype).reshape(*lead, self.dim).movedim(-1, self.channel_dim)
        return z_q, indices.reshape(lead)

    def _to_metric(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return F.normalize(t, dim=dim, eps=1e-12) if self.metric == "cosine" else t

    def _codes(self, dtype: torch.dtype) -> torch.Tensor:
        """The codes as the quantizer compares them, in ``dtype``. An EMA codebook is copied: the EMA step
        rewrites the buffer in place while autograd still holds this step's codes."""
        codes = self.codebook if self.ema_decay is None else self.codebook.detach().clone()
        return self._to_metric(codes.to(dtype))

    # --- codebook updates (training mode) --------------------------------------------------------

    def _code_stats(self, indices: torch.Tensor, x: torch.Tensor, sums: bool = True):
        """Per-code counts (float32 ``[K]``) and, with ``sums``, float32 sums ``[K, D]`` of the rows ``x``."""
        x = x.detach().float().contiguous()
        launch = ops(choose(x, backend=self.backend)).code_stats
        deterministic = torch.are_deterministic_algorithms_enabled()
        return launch(indices, x if sums else None, self.num_codes, deterministic=deterministic)

    @torch.no_grad()
    def _kmeans(self, x: torch.Tensor) -> None:
        """Seed every code by Lloyd's k-means on the rows ``x`` (assign + code_stats); empty clusters keep
        their centre. Starts from distinct rows (with replacement when there are fewer rows than codes)."""
        n, k = x.shape[0], self.num_codes
        if n == 0:
            return
        x = x.float()
        pick = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(n, (k,), device=x.device)
        centres = x[pick]
        for _ in range(self.kmeans_iters):
            counts, sums = self._code_stats(assign(x, centres, backend=self.backend), x)
            means = self._to_metric(sums / counts.clamp_min(1).unsqueeze(1))
            centres = torch.where(counts.unsqueeze(1) > 0, means, centres)
        self._reseed(torch.arange(k, device=x.device), centres)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """One EMA step from the batch's per-code counts ``[K]`` and sums ``[K, D]`` (float32).

        A ``torch.distributed`` all-reduce of ``counts`` and ``sums`` belongs right before this.
        """
        g = self.ema_decay
        self.cluster_size.mul_(g).add_(counts, alpha=1.0 - g)
        self.embed_sum.mul_(g).add_(sums, alpha=1.0 - g)
        self._refresh_codebook()

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor) -> None:
        """Re-seed the codes whose EMA cluster size is below the threshold from distinct random rows of
        ``x``; with more dead codes than rows, a random subset now and the rest on later batches."""
        if self.dead_code_threshold <= 0:
            return
        dead = torch.nonzero(self.cluster_size < self.dead_code_threshold).squeeze(1)
        n = min(dead.numel(), x.shape[0])
        if n == 0:
            return
        dead = dead[torch.randperm(dead.numel(), device=dead.device)[:n]]
        self._reseed(dead, x[torch.randperm(x.shape[0], device=x.device)[:n]])

    @torch.no_grad()
    def _reseed(self, which: torch.Tensor, values: torch.Tensor) -> None:
        """Set the codes ``which`` to ``values``. EMA codes restart as fresh ones, cluster size 1 (the
        dead-code threshold if higher) and the matching sum; the codebook is then recomputed from the
        statistics, so it stays ``embed_sum / size`` for every code."""
        if self.ema_decay is None:
            self.codebook.index_copy_(0, which, values.to(self.codebook.dtype))
            return
        self.cluster_size.index_fill_(0, which, max(1.0, self.dead_code_threshold))
        size = self._smoothed_sizes().index_select(0, which)
        self.embed_sum.index_copy_(0, which, values.float() * size.unsqueeze(1))
        self._refresh_codebook()

    def _smoothed_sizes(self) -> torch.Tensor:
        """Laplace-smoothed cluster sizes ``(cluster_size + eps) / (N + K eps) * N``, ``N = sum(cluster_size)``."""
        n = self.cluster_size.sum()
        return (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n

    def _refresh_codebook(self) -> None:
        self.codebook.copy_(self.embed_sum / self._smoothed_sizes().unsqueeze(1))

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
