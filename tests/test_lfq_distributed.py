"""LFQ's batch entropy over torch.distributed: 2 CPU ranks over gloo with uneven, masked batches, against
one process on the concatenated batch (the torch backend; spawn, a FileStore in tmp_path)."""

import os

import torch
import torch.multiprocessing as mp

import vqtriton as vqt
import gloo

WORLD, SIZES, D = 2, (7, 12), 6


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(SIZES), D, generator=g) * 0.05
    keep = torch.rand(sum(SIZES), generator=g) > 0.3
    return x, keep


def _lfq():
    return vqt.LFQ(D, entropy_eps=1e-5, diversity_gamma=0.7, backend="torch")


def _worker(rank: int, store: str, out_dir: str) -> None:
    with gloo.process_group(rank, WORLD, store, 60):
        x, keep = _data()
        rows = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
        z = x[rows].clone().requires_grad_()
        _, _, loss, parts = _lfq()(z, keep[rows], return_breakdown=True)
        loss.backward()
        torch.save((parts.per_sample_entropy, parts.batch_entropy, z.grad), os.path.join(out_dir, f"rank{rank}.pt"))


def test_batch_entropy_is_the_global_one(tmp_path):
    gloo.join(mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=False), 120, "lfq")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, keep = _data()
    lfq = _lfq()
    z = x.clone().requires_grad_()
    _, _, _, whole = lfq(z, keep, return_breakdown=True)  # one process, the concatenated batch
    (g_batch,) = torch.autograd.grad(whole.batch_entropy, z)
    start = 0
    for rank, (per_sample, batch, grad) in enumerate(got):
        rows = slice(start, start + SIZES[rank])
        start += SIZES[rank]
        torch.testing.assert_close(batch, whole.batch_entropy, rtol=1e-6, atol=1e-7)  # every rank: the global term
        zr = x[rows].clone().requires_grad_()
        _, _, _, mine = lfq(zr, keep[rows], return_breakdown=True)  # the per-sample term stays per rank
        torch.testing.assert_close(per_sample, mine.per_sample_entropy, rtol=1e-6, atol=1e-7)
        (g_ps,) = torch.autograd.grad(mine.per_sample_entropy, zr)
        # Each rank's gradient of the shared term is summed over ranks: DDP's mean then gives every row its own.
        want = lfq.entropy_weight * (g_ps - lfq.diversity_gamma * WORLD * g_batch[rows])
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
