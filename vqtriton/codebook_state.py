"""A codebook's state in training: EMA statistics, k-means initialisation, dead-code restarts and
their ``torch.distributed`` synchronisation, as small functions that ``VectorQuantizer`` calls on one
codebook at a time (a :class:`Book` of views into the module's tensors: writing them updates it).

Nothing here reads a tensor's value on the host. What depends on the data (which rows may seed a
code, which codes are dead, whether k-means found any row, which rank samples) is decided on the
device, with masks and index tensors whose sizes come from shapes alone, so a training step traces
whole under ``torch.compile(fullgraph=True)`` and never waits for the GPU.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from vqtriton import distributed
from vqtriton.backend import choose
from vqtriton.eager import call as _op  # torch.ops.vqtriton.<name>, without its dispatch in eager mode
from vqtriton.functional import assign
from vqtriton.torch_ops import to_dtype

__all__ = [
    "Book",
    "draws",
    "code_stats",
    "smoothed_sizes",
    "ema_update_",
    "refresh_",
    "sample_rows",
    "kmeans",
    "reseed_",
    "restart_dead_codes_",
    "broadcast_",
    "moments",
    "running_",
]


def draws(generator: torch.Generator | None) -> dict:
    """The keyword arguments that make a torch random draw use ``generator``: none for torch's global
    generator (under torch.compile with dynamic shapes, torch 2.13's fake ``torch.rand`` refuses an explicit
    ``generator=None`` next to a symbolic size), ``{"generator": generator}`` otherwise."""
    return {} if generator is None else {"generator": generator}


class Book(NamedTuple):
    """One codebook ``[K, d]``, its float32 statistics ``[K]`` and ``[K, d]`` when it keeps them (an EMA
    codebook, or a learned one that finds dead codes by usage), and the metric's map onto its vectors
    (l2-normalisation for cosine, else the identity): codes computed from the statistics are stored mapped,
    as they are compared. ``derived``: the codes are ``embed_sum / size`` (an EMA codebook); False for a
    learned codebook, whose statistics only track usage."""

    codes: Tensor
    cluster_size: Tensor | None
    embed_sum: Tensor | None
    normalise: Callable[[Tensor], Tensor]
    derived: bool = True


def code_stats(idx: Tensor, x: Tensor | None, num_codes: int, *, backend: str | None, deterministic: bool):
    """Per-code counts (float32 ``[K]``) and, when ``x`` is given, float32 sums ``[K, d]`` of the rows
    with ``idx >= 0`` (indices from ``assign``: in range by construction, so never read on the host)."""
    if x is None:
        return _op("code_counts", idx, num_codes, choose(idx, backend=backend)), None
    x = to_dtype(x.detach(), torch.float32).contiguous()
    return _op("code_stats", idx, x, num_codes, deterministic, choose(x, backend=backend))


def smoothed_sizes(cluster_size: Tensor, eps: float) -> Tensor:
    """Laplace-smoothed cluster sizes ``(cluster_size + eps) / (N + K eps) * N``, ``N = sum(cluster_size)``."""
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n


def refresh_(book: Book, eps: float, when: Tensor | None = None) -> None:
    """``codes = embed_sum / smoothed size``, normalised (where the 0-dim ``when`` holds, if given)."""
    codes = book.normalise(book.embed_sum / smoothed_sizes(book.cluster_size, eps).unsqueeze(1))
    book.codes.copy_(codes if when is None else torch.where(when, codes, book.codes))


def ema_update_(
    book: Book,
    counts: Tensor,
    sums: Tensor,
    decay: float,
    eps: float,
    active: Tensor | None = None,
    *,
    weight: Tensor | None = None,
    refresh: bool = True,
):
    """One EMA step from a batch's per-code counts ``[K]`` and sums ``[K, d]``:
    ``cluster_size <- g cluster_size + (1 - g) counts``, the same for ``embed_sum``, then (``refresh``) the
    codes ``normalise(embed_sum / smoothed size)``.
    ``weight [K]`` (float, per code): the step moves code k by ``(1 - g) weight[k]`` of the way instead
    (0: the statistics stay; vector-quantize-pytorch's ``ema_update_weight``).
    ``active`` (0-dim bool): where False, a step that did not run: nothing changes."""
    if weight is None:  # g s + (1 - g) x as s + (1 - g)(x - s): one pass each
        rate = 1.0 - decay if active is None else torch.where(active, 1.0 - decay, 0.0)
        book.cluster_size.lerp_(counts, rate)
        book.embed_sum.lerp_(sums, rate)
    else:
        rate = (1.0 - decay) * weight.to(torch.float32)
        if active is not None:
            rate = torch.where(active, rate, 0.0)
        book.cluster_size.add_(rate * (counts - book.cluster_size))
        book.embed_sum.add_(rate.unsqueeze(1) * (sums - book.embed_sum))
    if refresh:
        refresh_(book, eps, active)


def sample_rows(valid: Tensor, m: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``m`` random positions of rows where ``valid [n]`` (n >= 1) holds, and how many rows do (0-dim).

    Distinct while ``m`` is at most that number; beyond it they cycle through the valid rows again (each
    used equally often). Random keys put the valid rows first in random order: no host sync, fixed sizes.
    ``generator``: the draws' generator (None: torch's global one), on ``valid``'s device.
    """
    key = torch.rand(valid.shape[0], device=valid.device, **draws(generator)).masked_fill_(~valid, 2.0)
    n_valid = valid.sum()
    order = key.argsort()
    return order[torch.arange(m, device=valid.device) % n_valid.clamp_min(1)], n_valid


def _candidates(x: Tensor, valid: Tensor, m: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``m`` rows sampled from the valid rows of ``x`` (``sample_rows``; zeros when ``x`` has no row)
    and the number of valid rows."""
    if x.shape[0] == 0:
        return x.new_zeros(m, x.shape[1]), valid.sum()
    pos, n_valid = sample_rows(valid, m, generator)
    return x[pos], n_valid


def kmeans(
    x: Tensor,
    valid: Tensor,
    num_codes: int,
    iters: int,
    *,
    normalise: Callable[[Tensor], Tensor],
    backend: str | None,
    deterministic: bool,
    sync: bool,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on the rows of ``x [n, d]`` (float32) where ``valid [n]``: ``(centres [K, d],
    found)``, ``found`` a 0-dim bool, False when there was no valid row (then the centres mean nothing).

    Starts from ``sample_rows`` (distinct rows; cycling when there are fewer rows than codes); empty
    clusters keep their centre; ``normalise`` maps means onto the metric's vectors. Synchronised, the
    start is sampled on the rank with the most valid rows and each iteration sums the statistics over
    ranks, every rank joining the same collectives whatever its batch.
    """
    x = torch.where(valid.unsqueeze(1), x, 0.0)
    centres, n_valid = _candidates(x, valid, num_codes, generator)
    found = n_valid > 0
    if sync:
        src, n_src = distributed.largest(n_valid)
        centres, found = distributed.from_rank(centres, src), n_src > 0
    for _ in range(iters):
        idx = torch.where(valid, assign(x, centres, backend=backend), -1)
        counts, sums = code_stats(idx, x, num_codes, backend=backend, deterministic=deterministic)
        if sync:
            distributed.all_reduce_sum_(counts, sums)
        means = normalise(sums / counts.clamp_min(1).unsqueeze(1))
        centres = torch.where(counts.unsqueeze(1) > 0, means, centres)
    return centres, found


def reseed_(book: Book, seed: Tensor, values: Tensor, threshold: float, eps: float) -> None:
    """Set the codes where ``seed [K]`` holds to ``values [K, d]``. EMA codes restart as fresh ones:
    cluster size 1 (the dead-code threshold if higher) and the matching sum; the codes are then
    recomputed from the statistics (if any code was seeded), so they stay ``embed_sum / size``. A learned
    codebook's usage statistics restart the same way (size ``s = max(1, threshold)``, sum ``s`` values)."""
    if book.cluster_size is None or not book.derived:
        book.codes.copy_(torch.where(seed.unsqueeze(1), values.to(book.codes.dtype), book.codes))
        if book.cluster_size is not None:
            size = max(1.0, threshold)
            book.cluster_size.copy_(torch.where(seed, size, book.cluster_size))
            book.embed_sum.copy_(torch.where(seed.unsqueeze(1), values.float() * size, book.embed_sum))
        return
    book.cluster_size.copy_(torch.where(seed, max(1.0, threshold), book.cluster_size))
    size = smoothed_sizes(book.cluster_size, eps).unsqueeze(1)
    book.embed_sum.copy_(torch.where(seed.unsqueeze(1), values.float() * size, book.embed_sum))
    refresh_(book, eps, seed.any())


def restart_dead_codes_(
    book: Book,
    x: Tensor,
    valid: Tensor,
    threshold: float,
    eps: float,
    *,
    sync: bool,
    active: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Re-seed the EMA codes whose cluster size is below ``threshold`` from distinct random valid rows
    of ``x [n, d]``; with more dead codes than rows, a random subset now and the rest on later batches.

    Slot j of a random order of the codes (dead ones first) takes sampled row j. Synchronised, the
    dead set is the same on every rank (the statistics are) and the (code, row) table comes from the
    rank with the most valid rows. ``active`` False (0-dim): nothing is re-seeded.
    """
    k = book.codes.shape[0]
    dead = book.cluster_size < threshold
    if active is not None:
        dead = dead & active
    rows, n_valid = _candidates(torch.where(valid.unsqueeze(1), x.float(), 0.0), valid, k, generator)
    order = torch.rand(k, device=dead.device, **draws(generator)).masked_fill_(~dead, 2.0).argsort()
    slots = torch.arange(k, device=dead.device) < torch.minimum(dead.sum(), n_valid)
    seed = torch.zeros_like(dead).index_copy_(0, order, slots)
    values = torch.empty_like(rows).index_copy_(0, order, rows)
    if sync:
        src, _ = distributed.largest(n_valid)
        table = distributed.from_rank(torch.cat([values, seed.unsqueeze(1).to(values.dtype)], 1), src)
        values, seed = table[:, :-1], table[:, -1] > 0
    reseed_(book, seed, values, threshold, eps)


def broadcast_(tensors: list[Tensor], *flags: Tensor) -> None:
    """Rank 0's codebook tensors and bool flags (``initted``, ...) on every rank (the first synchronised step)."""
    for t in tensors:
        distributed.broadcast_(t, 0)
    for f in flags:
        flag = f.to(torch.int32)  # a bool tensor is not a portable collective dtype
        distributed.broadcast_(flag, 0)
        f.copy_(flag.bool())


def moments(x: Tensor, valid: Tensor, *, sync: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The mean and the (biased) variance ``[d]`` of the rows of ``x [n, d]`` where ``valid [n]``, and whether
    there was any such row (0-dim bool; without one the mean and variance mean nothing). Two passes (the
    variance from the deviations, not from ``E[x^2] - mean^2``, which loses it on offset data); synchronised,
    over every rank's rows: the count and the sums in one all-reduce, the squared deviations from the global
    mean in a second (shapes fixed by ``d``: ranks without rows join them)."""
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    keep = valid.unsqueeze(1)
    totals = torch.cat([valid.sum().to(x.dtype).view(1), torch.where(keep, x, 0.0).sum(0)])
    if sync:
        distributed.all_reduce_sum_(totals)
    count, mean = totals[0], totals[1:] / totals[0].clamp_min(1)
    deviations = torch.where(keep, (x - mean).square(), 0.0).sum(0)
    if sync:
        distributed.all_reduce_sum_(deviations)
    return mean, deviations / count.clamp_min(1), count > 0


def running_(stat: Tensor, value: Tensor, decay: float, initted: Tensor, when: Tensor | None = None) -> None:
    """A running statistic's step: ``stat <- decay stat + (1 - decay) value``, or ``value`` itself where the
    bool ``initted`` is False (the first value seen); nothing changes where the bool ``when`` is False."""
    new = torch.where(initted, stat * decay + value.to(stat.dtype) * (1 - decay), value.to(stat.dtype))
    stat.copy_(new if when is None else torch.where(when, new, stat))
