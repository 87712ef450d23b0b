"""A 2-rank gloo run of a synchronised EMA layer, one rank SIGKILLed, both resumed: the run that never stopped.

The loop is a small VQ-VAE under DistributedDataParallel whose VectorQuantizer keeps one EMA codebook across
the ranks (k-means init, dead-code restarts: both draw random numbers on every rank). Each rank saves its own
checkpoint every few steps (``vqtriton.checkpoint``: weights and buffers, Adam's state, its data generator's
and torch's RNG states); a resumed job starts from the last step that *every* rank saved, agreed on with an
all-reduce. Ranks are spawned as in tests/test_distributed.py (torch backend, a FileStore, a bounded join that
kills what still runs); a rank dies by SIGKILL at a point the test names, inside a step or inside its
checkpoint write (the same phases as the demo's ``VQTRITON_DEMO_FAULT``).
"""

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vqtriton import checkpoint
from vqtriton.layer import VectorQuantizer
from vqtriton.model import VQVAE
import gloo
from test_distributed import Objective  # the VQ-VAE objective as a forward, for DDP

WORLD = 2
JOIN_TIMEOUT_S = 180
COLLECTIVE_TIMEOUT_S = 60
STEPS, SAVE_EVERY = 12, 3
OBS, D, K, ROWS = 5, 4, 9, (9, 4)  # rows per rank and step: uneven
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


def ckpt_path(folder: str, step: int, rank: int) -> str:
    return os.path.join(folder, f"step{step:04d}-rank{rank}.pt")


def last_complete_step(folder: str) -> int:
    """The last step for which every rank's checkpoint is on disk (0: none)."""
    saved = range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)
    complete = [s for s in saved if all(os.path.exists(ckpt_path(folder, s, r)) for r in range(WORLD))]
    return complete[-1] if complete else 0


def die_at(fault, rank: int, kind: str, step: int, phase: str) -> None:
    if fault == (rank, kind, step, phase):
        os.kill(os.getpid(), signal.SIGKILL)


def train(rank: int, folder: str, fault) -> dict:
    torch.manual_seed(0)  # the same initial weights and codebook on every rank
    vq = VectorQuantizer(D, K, ema_decay=0.8, kmeans_init=True, kmeans_iters=2, dead_code_threshold=0.8,
                         backend="torch")
    model = VQVAE(nn.Linear(OBS, D), vq, nn.Linear(D, OBS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)
    torch.manual_seed(1000 + rank)  # each rank's own draws (k-means starts, restarts) from here on
    for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):  # what this rank's killed writes left
        checkpoint.remove_stale_temp_files(ckpt_path(folder, s, rank))
    start = torch.tensor(last_complete_step(folder))
    dist.all_reduce(start, op=dist.ReduceOp.MIN)  # every rank resumes from the same step
    start = int(start)
    if start:
        state = checkpoint.load(ckpt_path(folder, start, rank))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"], {"data": data})
    ddp = DistributedDataParallel(Objective(model), broadcast_buffers=False)  # the layer syncs its own buffers
    for step in range(start, STEPS):
        x = torch.randn(ROWS[rank], OBS, generator=data)
        loss = ddp(x)
        die_at(fault, rank, "step", step, "forward")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % SAVE_EVERY == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "rng": checkpoint.rng_state({"data": data}), "step": step + 1}
            checkpoint.save(state, ckpt_path(folder, step + 1, rank),
                            _hook=lambda phase, n=step + 1: die_at(fault, rank, "save", n, phase))
            old = ckpt_path(folder, step + 1 - 2 * SAVE_EVERY, rank)  # keep this rank's last two
            if os.path.exists(old):
                os.remove(old)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "resumed_from": start}


def _worker(rank: int, folder: str, store: str, fault) -> None:
    with gloo.process_group(rank, WORLD, store, COLLECTIVE_TIMEOUT_S):
        checkpoint.save(train(rank, folder, fault), os.path.join(folder, f"final-rank{rank}.pt"))


def run_job(folder, store, fault=None) -> list[int]:
    """Spawn the ranks once; their exit codes. With a fault, the job fails (the spawner stops every rank
    once one has died), and this returns what each rank's exit code was."""
    ctx = mp.spawn(_worker, args=(str(folder), str(store), fault), nprocs=WORLD, join=False)
    try:
        gloo.join(ctx, JOIN_TIMEOUT_S, f"fault {fault}")
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        if fault is None:
            raise
    return [p.exitcode for p in ctx.processes]


def finals(folder) -> list[dict]:
    return [checkpoint.load(os.path.join(folder, f"final-rank{r}.pt")) for r in range(WORLD)]


def assert_equal_states(a: dict, b: dict, what: str) -> None:
    for name, value in a.items():
        assert torch.equal(b[name], value), f"{what}: {name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    assert run_job(folder, folder / "store") == [0] * WORLD
    return finals(folder)


# (rank, "step", step, phase): SIGKILL in that step; (rank, "save", step, phase): in the checkpoint write of
# that step ("written": the temp file whole, not yet renamed). Both resume from step 6, the last one that
# every rank saved: in the second, rank 1 may have saved step 9 and rank 0 has not.
FAULTS = {
    "rank-1-killed-in-step-7": ((1, "step", 7, "forward"), 6),
    "rank-0-killed-writing-step-9": ((0, "save", 9, "written"), 6),
}


@pytest.mark.parametrize("case", FAULTS)
def test_a_killed_rank_and_its_peer_resume_to_the_uninterrupted_codebooks(tmp_path, uninterrupted, case):
    fault, resume_step = FAULTS[case]
    killed = fault[0]
    codes = run_job(tmp_path, tmp_path / "store-1", fault)
    assert codes[killed] == -signal.SIGKILL, f"{case}: exit codes {codes}"
    assert last_complete_step(tmp_path) == resume_step, sorted(os.listdir(tmp_path))
    if fault[1] == "save":  # the killed write left its complete temp file, never renamed
        (stale,) = checkpoint.stale_temp_files(ckpt_path(tmp_path, fault[2], killed))
        assert checkpoint.load(stale)["step"] == fault[2]
        assert not os.path.exists(ckpt_path(tmp_path, fault[2], killed))

    assert run_job(tmp_path, tmp_path / "store-2") == [0] * WORLD  # both resumed
    resumed = finals(tmp_path)
    assert not checkpoint.stale_temp_files(ckpt_path(tmp_path, fault[2], killed))
    for r in range(WORLD):
        assert resumed[r]["resumed_from"] == resume_step
        assert_equal_states(uninterrupted[r]["model"], resumed[r]["model"], f"{case}: rank {r}'s model")
        for p, moments in uninterrupted[r]["optimizer"]["state"].items():
            assert_equal_states(moments, resumed[r]["optimizer"]["state"][p], f"{case}: rank {r}'s Adam state")
    for name in ("codebook", "cluster_size", "embed_sum", "initted"):  # one codebook across the ranks
        assert torch.equal(resumed[0]["model"][f"quantizer.{name}"], resumed[1]["model"][f"quantizer.{name}"]), name
