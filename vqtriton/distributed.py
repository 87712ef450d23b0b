"""The few ``torch.distributed`` collectives the VQ layers use to keep one codebook across ranks.

Every tensor that crosses ranks has a shape fixed by the module (``K`` codes, ``D`` channels, the world
size), never by a rank's batch: ranks with different batch sizes, or an empty batch, call the same
collectives with the same shapes and cannot hang. Nothing here reads a tensor's value on the host:
which rank a table comes from is decided on the device (``largest``) and its table reaches every
rank by a sum in which the others send zeros (``from_rank``). Nothing here touches CUDA or the
process group at import time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_active", "rank", "world_size", "all_reduce_sum_", "broadcast_", "largest", "from_rank"]


def is_active(sync: bool | None) -> bool:
    """Whether to synchronise: ``sync=None`` means "when a process group of more than one rank is
    initialised"; ``True`` demands an initialised group; ``False`` never synchronises."""
    if sync is False:
        return False
    initialised = dist.is_available() and dist.is_initialized()
    if sync is None:
        return initialised and dist.get_world_size() > 1
    if not initialised:
        raise RuntimeError("sync=True needs an initialised torch.distributed process group (init_process_group)")
    return True


def rank() -> int:
    return dist.get_rank()


def world_size() -> int:
    return dist.get_world_size()


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place, with one collective (the tensors share a dtype and device)."""
    if not tensors:
        return
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        raise ValueError(f"all_reduce_sum_ needs tensors of one dtype and device, got {sorted(map(str, kinds))}")
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite ``tensor`` on every rank with its value on rank ``src``, in place (``from_rank``)."""
    tensor.copy_(from_rank(tensor, src))


def largest(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rank, n on that rank)``, 0-dim int64 tensors on ``n``'s device, for the rank with the largest
    ``n`` (the lowest such rank on ties): the source rank for sampling codes from a batch, found by one
    all-reduce of a ``[world size]`` vector, with no host sync."""
    counts = torch.zeros(world_size(), dtype=torch.int64, device=n.device)
    counts[rank()] = n
    all_reduce_sum_(counts)
    return counts.argmax(), counts.max()  # argmax: the first maximum


def from_rank(tensor: torch.Tensor, src: int | torch.Tensor) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank, where ``src`` may be a 0-dim tensor known only on the
    device: a broadcast made of one all-reduce, in which the other ranks send zeros (x + 0 = x, so the
    values arrive bit for bit but for the sign of a zero). An all-reduce rather than ``dist.broadcast``:
    dynamo traces it into the graph (it cannot trace ``dist.broadcast``)."""
    if isinstance(src, torch.Tensor):
        out = torch.where(src == rank(), tensor, torch.zeros_like(tensor))
    else:  # a source known on the host: no tensor to build for the comparison
        out = tensor.clone() if src == rank() else torch.zeros_like(tensor)
    all_reduce_sum_(out)
    return out
