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
from vqtriton.functional import assign

__all__ = [
    "Book",
    "code_stats",
    "smoothed_sizes",
    "ema_update_",
    "sample_rows",
    "kmeans",
    "reseed_",
    "restart_dead_codes_",
    "broadcast_",
]


class Book(NamedTuple):
    """One codebook ``[K, d]``, for an EMA codebook its float32 statistics ``[K]`` and ``[K, d]``, and the
    metric's map onto its vectors (l2-normalisation for cosine, else the identity): codes computed from
    the statistics are stored mapped, as they are compared."""

    codes: Tensor
    cluster_size: Tensor | None
    embed_sum: Tensor | None
    normalise: Callable[[Tensor], Tensor]


def code_stats(idx: Tensor, x: Tensor | None, num_codes: int, *, backend: str | None, deterministic: bool):
    """Per-code counts (float32 ``[K]``) and, when ``x`` is given, float32 sums ``[K, d]`` of the rows
    with ``idx >= 0`` (indices from ``assign``: in range by construction, so never read on the host)."""
    if x is None:
        return torch.ops.vqtriton.code_counts(idx, num_codes, choose(idx, backend=backend)), None
    x = x.detach().float().contiguous()
    return torch.ops.vqtriton.code_stats(idx, x, num_codes, deterministic, choose(x, backend=backend))


def smoothed_sizes(cluster_size: Tensor, eps: float) -> Tensor:
    """Laplace-smoothed cluster sizes ``(cluster_size + eps) / (N + K eps) * N``, ``N = sum(cluster_size)``."""
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n


def _refresh_(book: Book, eps: float, when: Tensor | None = None) -> None:
    """``codes = embed_sum / smoothed size``, normalised (where the 0-dim ``when`` holds, if given)."""
    codes = book.normalise(book.embed_sum / smoothed_sizes(book.cluster_size, eps).unsqueeze(1))
    book.codes.copy_(codes if when is None else torch.where(when, codes, book.codes))


def ema_update_(book: Book, counts: Tensor, sums: Tensor, decay: float, eps: float, active: Tensor | None = None):
    """One EMA step from a batch's per-code counts ``[K]`` and sums ``[K, d]``:
    ``cluster_size <- g cluster_size + (1 - g) counts``, the same for ``embed_sum``, then the codes
    ``normalise(embed_sum / smoothed size)``.
    ``active`` (0-dim bool): where False, a step that did not run: nothing changes."""
    g = decay if active is None else torch.where(active, decay, 1.0)
    book.cluster_size.mul_(g).add_(counts * (1.0 - g))
    book.embed_sum.mul_(g).add_(sums * (1.0 - g))
    _refresh_(book, eps, active)


def sample_rows(valid: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``m`` random positions of rows where ``valid [n]`` (n >= 1) holds, and how many rows do (0-dim).

    Distinct while ``m`` is at most that number; beyond it they cycle through the valid rows again (each
    used equally often). Random keys put the valid rows first in random order: no host sync, fixed sizes.
    """
    key = torch.rand(valid.shape[0], device=valid.device).masked_fill_(~valid, 2.0)
    n_valid = valid.sum()
    order = key.argsort()
    return order[torch.arange(m, device=valid.device) % n_valid.clamp_min(1)], n_valid


def _candidates(x: Tensor, valid: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``m`` rows sampled from the valid rows of ``x`` (``sample_rows``; zeros when ``x`` has no row)
    and the number of valid rows."""
    if x.shape[0] == 0:
        return x.new_zeros(m, x.shape[1]), valid.sum()
    pos, n_valid = sample_rows(valid, m)
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
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on the rows of ``x [n, d]`` (float32) where ``valid [n]``: ``(centres [K, d],
    found)``, ``found`` a 0-dim bool, False when there was no valid row (then the centres mean nothing).

    Starts from ``sample_rows`` (distinct rows; cycling when there are fewer rows than codes); empty
    clusters keep their centre; ``normalise`` maps means onto the metric's vectors. Synchronised, the
    start is sampled on the rank with the most valid rows and each iteration sums the statistics over
    ranks, every rank joining the same collectives whatever its batch.
    """
    x = torch.where(valid.unsqueeze(1), x, 0.0)
    centres, n_valid = _candidates(x, valid, num_codes)
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
    recomputed from the statistics (if any code was seeded), so they stay ``embed_sum / size``."""
    if book.cluster_size is None:
        book.codes.copy_(torch.where(seed.unsqueeze(1), values.to(book.codes.dtype), book.codes))
        return
    book.cluster_size.copy_(torch.where(seed, max(1.0, threshold), book.cluster_size))
    size = smoothed_sizes(book.cluster_size, eps).unsqueeze(1)
    book.embed_sum.copy_(torch.where(seed.unsqueeze(1), values.float() * size, book.embed_sum))
    _refresh_(book, eps, seed.any())


def restart_dead_codes_(
    book: Book, x: Tensor, valid: Tensor, threshold: float, eps: float, *, sync: bool, active: Tensor | None = None
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
    rows, n_valid = _candidates(torch.where(valid.unsqueeze(1), x.float(), 0.0), valid, k)
    order = torch.rand(k, device=dead.device).masked_fill_(~dead, 2.0).argsort()
    slots = torch.arange(k, device=dead.device) < torch.minimum(dead.sum(), n_valid)
    seed = torch.zeros_like(dead).index_copy_(0, order, slots)
    values = torch.empty_like(rows).index_copy_(0, order, rows)
    if sync:
        src, _ = distributed.largest(n_valid)
        table = distributed.from_rank(torch.cat([values, seed.unsqueeze(1).to(values.dtype)], 1), src)
        values, seed = table[:, :-1], table[:, -1] > 0
    reseed_(book, seed, values, threshold, eps)


def broadcast_(tensors: list[Tensor], initted: Tensor) -> None:
    """Rank 0's codebook tensors and ``initted`` flag on every rank (the first synchronised step)."""
    for t in tensors:
        distributed.broadcast_(t, 0)
    flag = initted.to(torch.int32)  # a bool tensor is not a portable collective dtype
    distributed.broadcast_(flag, 0)
    initted.copy_(flag.bool())
