"""torch.distributed: 2 CPU ranks over gloo (torch.multiprocessing spawn, a FileStore in tmp_path).

Each test spawns the ranks once; a worker runs one scenario (a module-level function) and saves what it
saw; the test compares ranks with each other and with one process on the concatenated batch. The workers
use the torch backend (the Triton interpreter is too slow for several processes on a small machine).
A hung collective fails the test: gloo's own timeout, and a bounded join that kills the workers.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vqtriton import distributed, reference
from vqtriton.layer import VectorQuantizer
from vqtriton.model import VQVAE
from vqtriton.residual import ResidualVQ
import gloo
from helpers import f64

WORLD = 2
JOIN_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT_S = 60


# --- running ranks ---------------------------------------------------------------------------------


def _worker(rank: int, scenario: str, store: str, out_dir: str) -> None:
    with gloo.process_group(rank, WORLD, store, COLLECTIVE_TIMEOUT_S):
        torch.save(globals()[scenario](rank), os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(tmp_path, scenario) -> list:
    """What ``scenario(rank)`` returned on each rank; fails the test if a rank hangs."""
    ctx = mp.spawn(_worker, args=(scenario.__name__, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=False)
    gloo.join(ctx, JOIN_TIMEOUT_S, scenario.__name__)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def batch(step: int, n: int, D: int) -> torch.Tensor:
    """The full batch of a step: the same on every rank and in the test process."""
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1000 + step))


def share(x: torch.Tensor, sizes: tuple[int, int], rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``x`` when the ranks hold ``sizes`` rows, in rank order."""
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def assert_ranks_identical(states: list[dict], what: str) -> None:
    for name, value in states[0].items():
        for r in range(1, len(states)):
            assert torch.equal(states[r][name], value), f"{what}: {name} differs between rank 0 and rank {r}"


# --- 2 ranks of EMA training == one process on the concatenated batch --------------------------------

EMA_CONFIGS = {
    "plain": dict(),
    "heads": dict(heads=2),
    "shared-heads": dict(heads=2, shared_codebook=True),
    "cosine-sum": dict(metric="cosine", reduction="sum"),
}
EMA_STEPS = [(13, 27), (31, 9), (40, 0)]  # rows per rank; rank 1 gets none in the last step
D_EMA, K_EMA = 6, 9


def ema_vq(config: str, **kw) -> VectorQuantizer:
    torch.manual_seed(0)  # the same initial codebook everywhere
    return VectorQuantizer(D_EMA, K_EMA, ema_decay=0.8, backend="torch", **EMA_CONFIGS[config], **kw)


def ema_scenario(rank: int) -> dict:
    out = {}
    for config in EMA_CONFIGS:
        vq, indices = ema_vq(config), []
        if rank == 1:  # another starting state: the first synchronised step takes rank 0's
            with torch.no_grad():
                for name in ("codebook", "cluster_size", "embed_sum"):
                    getattr(vq, name).add_(1.0)
        for step, sizes in enumerate(EMA_STEPS):
            indices.append(vq(share(batch(step, sum(sizes), D_EMA), sizes, rank))[1])
        out[config] = dict(state=vq.state_dict(), indices=indices)
    return out


def test_ema_training_equals_one_process_on_the_full_batch(tmp_path):
    ranks = run_ranks(tmp_path, ema_scenario)
    for config in EMA_CONFIGS:
        single = ema_vq(config, sync=False)
        for step, sizes in enumerate(EMA_STEPS):
            _, idx, _ = single(batch(step, sum(sizes), D_EMA))
            for r in range(WORLD):  # each rank quantized its rows against the one shared codebook
                assert torch.equal(ranks[r][config]["indices"][step], share(idx, sizes, r)), (config, step, r)
        assert_ranks_identical([ranks[r][config]["state"] for r in range(WORLD)], config)
        for name, value in single.state_dict().items():
            mine = ranks[0][config]["state"][name]
            torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-6, msg=f"{config}: {name}")


# --- k-means init: one start, Lloyd statistics summed over ranks -------------------------------------

KMEANS_CASES = {"fewer-on-rank-0": (4, 30), "empty-rank-0-fewer-than-K": (0, 3)}  # rows per rank
D_KM, K_KM, ITERS_KM, SEED_KM = 5, 7, 3, 5


def clustered(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    centres = 6 * torch.randn(3, D_KM, generator=g)
    return centres[torch.arange(n) % 3] + 0.2 * torch.randn(n, D_KM, generator=g)


def kmeans_scenario(rank: int) -> dict:
    out = {}
    for case, sizes in KMEANS_CASES.items():
        torch.manual_seed(rank)  # different initial codebooks: k-means must still agree
        vq = VectorQuantizer(D_KM, K_KM, kmeans_init=True, kmeans_iters=ITERS_KM, backend="torch")
        torch.manual_seed(SEED_KM)
        vq(share(clustered(sum(sizes)), sizes, rank))
        out[case] = vq.state_dict()
    return out


def lloyd(x: np.ndarray, centres: np.ndarray, iters: int) -> np.ndarray:
    for _ in range(iters):
        a = reference.nearest_code(x, centres)
        counts = np.bincount(a, minlength=len(centres))[:, None]
        sums = np.zeros_like(centres)
        np.add.at(sums, a, x)
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    return centres


def test_kmeans_init_is_synchronised(tmp_path):
    ranks = run_ranks(tmp_path, kmeans_scenario)
    for case, sizes in KMEANS_CASES.items():
        assert_ranks_identical([ranks[r][case] for r in range(WORLD)], case)
        assert bool(ranks[0][case]["initted"])
        x = clustered(sum(sizes))
        src = int(np.argmax(sizes))  # the start is sampled on the rank with the most rows
        rows, n = share(x, sizes, src), sizes[src]
        torch.manual_seed(SEED_KM)
        pick = torch.rand(n).argsort()[torch.arange(K_KM) % n]  # rows in the order of random keys, cycling
        expected = lloyd(f64(x), f64(rows[pick]), ITERS_KM)  # Lloyd on the concatenated batch
        np.testing.assert_allclose(f64(ranks[0][case]["codebook"]), expected, rtol=1e-5, atol=1e-5, err_msg=case)


# --- uneven and empty batches: no hang, ranks stay identical ---------------------------------------

UNEVEN_STEPS = [(0, 0), (0, 17), (9, 0), (5, 2), (0, 6)]  # rows per rank
D_UN, K_UN = 4, 6


def uneven_modules() -> dict:
    torch.manual_seed(0)
    kw = dict(backend="torch", kmeans_init=True, kmeans_iters=2)
    return {
        "ema": VectorQuantizer(D_UN, K_UN, ema_decay=0.7, dead_code_threshold=0.5, heads=2, **kw),
        "learned-mean": VectorQuantizer(D_UN, K_UN, **kw),
        "residual": ResidualVQ(D_UN, K_UN, 3, quantize_dropout=0.5, ema_decay=0.7, dead_code_threshold=0.5, **kw),
    }


def uneven_scenario(rank: int) -> dict:
    modules, losses = uneven_modules(), []
    for step, sizes in enumerate(UNEVEN_STEPS):
        torch.manual_seed(100 * rank + step)  # ranks draw different random numbers: nothing may depend on them
        z = share(batch(step, sum(sizes), D_UN), sizes, rank)
        for name, module in modules.items():
            losses.append(module(z)[2].detach())
    return dict(states={name: m.state_dict() for name, m in modules.items()}, losses=torch.stack(losses))


def test_uneven_and_empty_batches_do_not_hang(tmp_path):
    ranks = run_ranks(tmp_path, uneven_scenario)
    for name in uneven_modules():
        assert_ranks_identical([ranks[r]["states"][name] for r in range(WORLD)], name)
    assert all(torch.isfinite(ranks[r]["losses"]).all() for r in range(WORLD))  # an empty batch's mean is 0, not NaN
    assert bool(ranks[0]["states"]["ema"]["initted"])  # k-means waited for a step with rows, then ran


# --- the synchronised step compiled whole: its collectives are in the graph ------------------------

COMPILED_STEPS = [(13, 27), (31, 9), (40, 0), (22, 22)]  # rows per rank; rank 1 gets none in step 2


def compiled_scenario(rank: int) -> dict:
    import copy

    torch.manual_seed(0)
    vq = VectorQuantizer(D_UN, K_UN, ema_decay=0.7, dead_code_threshold=0.5, kmeans_init=True, kmeans_iters=2,
                         heads=2, backend="torch")
    twin = copy.deepcopy(vq)
    explained = torch._dynamo.explain(copy.deepcopy(vq))(torch.randn(5, D_UN))
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    indices = []
    for step, sizes in enumerate(COMPILED_STEPS):
        z = share(batch(step, sum(sizes), D_UN), sizes, rank)
        for module in (vq, compiled):
            torch.manual_seed(100 * rank + step)  # the same draws in both, different ones per rank
            indices.append(module(z)[1])
    return dict(eager=vq.state_dict(), compiled=twin.state_dict(), indices=indices,
                breaks=torch.tensor(explained.graph_break_count))


def test_compiled_synchronised_step_matches_eager(tmp_path):
    ranks = run_ranks(tmp_path, compiled_scenario)
    assert_ranks_identical([ranks[r]["compiled"] for r in range(WORLD)], "compiled")
    for r in range(WORLD):
        assert int(ranks[r]["breaks"]) == 0
        assert bool(ranks[r]["compiled"]["initted"])
        for name, value in ranks[r]["eager"].items():
            torch.testing.assert_close(ranks[r]["compiled"][name], value, rtol=1e-6, atol=1e-6, msg=name)
        eager, compiled = ranks[r]["indices"][0::2], ranks[r]["indices"][1::2]
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# --- DistributedDataParallel over a small VQVAE -----------------------------------------------------

DDP_CONFIGS = {
    "learned-kmeans": (dict(kmeans_init=True, kmeans_iters=2), True),  # (quantizer kwargs, broadcast_buffers)
    "ema-kmeans-dead": (dict(ema_decay=0.8, kmeans_init=True, kmeans_iters=2, dead_code_threshold=0.5), False),
    "unsynchronised-control": (dict(kmeans_init=True, kmeans_iters=2, sync=False), True),
}
OBS, D_DDP, K_DDP, DDP_ROWS = 7, 4, 5, (12, 20)


class Objective(nn.Module):
    """The VQ-VAE objective as a forward, so that DDP sees the codebook's gradient."""

    def __init__(self, model: VQVAE):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.loss(x, reduction="mean").total


def ddp_scenario(rank: int) -> dict:
    out = {}
    for config, (quantizer, broadcast_buffers) in DDP_CONFIGS.items():
        torch.manual_seed(rank)  # different initial weights: DDP and the quantizer must make them one
        vq = VectorQuantizer(D_DDP, K_DDP, backend="torch", **quantizer)
        model = VQVAE(nn.Linear(OBS, D_DDP), vq, nn.Linear(D_DDP, OBS))
        ddp = DistributedDataParallel(Objective(model), broadcast_buffers=broadcast_buffers)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(3):
            x = torch.randn(DDP_ROWS[rank], OBS, generator=torch.Generator().manual_seed(10 * step + rank))
            opt.zero_grad()
            ddp(x).backward()
            opt.step()
        out[config] = model.state_dict()
    return out


def test_ddp_vqvae_ranks_stay_identical(tmp_path):
    ranks = run_ranks(tmp_path, ddp_scenario)
    for config in DDP_CONFIGS:
        states = [ranks[r][config] for r in range(WORLD)]
        if config == "unsynchronised-control":  # the check can see a difference: k-means per rank diverges
            assert not torch.equal(states[0]["quantizer.codebook"], states[1]["quantizer.codebook"])
        else:
            assert_ranks_identical(states, config)


# --- without a process group ---------------------------------------------------------------------------


def test_single_process_needs_no_process_group():
    assert not dist.is_initialized()
    assert distributed.is_active(None) is False and distributed.is_active(False) is False
    with pytest.raises(RuntimeError, match="sync=True needs an initialised torch.distributed process group"):
        VectorQuantizer(3, 4, ema_decay=0.9, sync=True)(torch.randn(5, 3))
    with pytest.raises(TypeError, match="sync must be None, True or False"):
        VectorQuantizer(3, 4, sync=1)


# --- residual VQ: a shared EMA codebook, the fused ops, one dropout draw for all ranks ------------------

RVQ_STEPS = [(13, 27), (31, 9), (40, 0)]
D_RVQ, K_RVQ, Q_RVQ = 5, 8, 3


def rvq_module(**kw) -> ResidualVQ:
    torch.manual_seed(0)
    return ResidualVQ(D_RVQ, K_RVQ, Q_RVQ, shared_codebook=True, ema_decay=0.8, backend="torch", **kw)


def rvq_scenario(rank: int) -> dict:
    out = {}
    for name, kw in (("shared-ema", {}), ("shared-ema-dropout", dict(quantize_dropout=0.9))):
        rvq, indices = rvq_module(**kw), []
        torch.manual_seed(100 + rank)  # each rank's own global generator: the dropout draw must still agree
        for step, sizes in enumerate(RVQ_STEPS):
            indices.append(rvq(share(batch(step, sum(sizes), D_RVQ), sizes, rank))[1])
        out[name] = dict(state=rvq.state_dict(), indices=indices)
    return out


def test_shared_ema_residual_equals_one_process_and_drops_the_same_levels(tmp_path):
    """2 ranks of a ResidualVQ with one shared EMA codebook (the fused ops, one EMA step per training step)
    equal one process on the concatenated batch; with quantize dropout every rank drops the same levels."""
    ranks = run_ranks(tmp_path, rvq_scenario)
    single = rvq_module(sync=False)
    for step, sizes in enumerate(RVQ_STEPS):
        _, idx, _ = single(batch(step, sum(sizes), D_RVQ))
        for r in range(WORLD):
            assert torch.equal(ranks[r]["shared-ema"]["indices"][step], share(idx, sizes, r)), (step, r)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["shared-ema"]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for config in ("shared-ema", "shared-ema-dropout"):
        assert_ranks_identical([ranks[r][config]["state"] for r in range(WORLD)], config)
    for step in range(len(RVQ_STEPS)):
        kept = [(ranks[r]["shared-ema-dropout"]["indices"][step] >= 0).any(0) for r in range(WORLD)
                if ranks[r]["shared-ema-dropout"]["indices"][step].numel()]
        assert all(torch.equal(k, kept[0]) for k in kept), step


# --- the affine map's batch statistics and the in-place optimiser, over ranks --------------------------

AFFINE_STEPS = [(13, 27), (31, 9), (40, 0)]  # rows per rank; rank 1 gets none in the last step
IN_PLACE_STEPS = [(20, 20), (17, 17)]  # equal shares: the averaged gradient is the full batch's
IN_PLACE_UNEVEN = [(0, 17), (9, 30), (5, 0)]
D_AF, K_AF = 6, 9


def affine_vq(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(D_AF, K_AF, ema_decay=0.8, heads=2, affine=True, backend="torch", **kw)


def in_place_vq(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(D_AF, K_AF, in_place_optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.5),
                           backend="torch", **kw)


def affine_batch(step: int, n: int) -> torch.Tensor:
    return 3 * batch(step, n, D_AF) + torch.arange(D_AF)  # offset channels: the statistics matter


def _run(vq, steps, rank, make=affine_batch):
    for step, sizes in enumerate(steps):
        vq(share(make(step, sum(sizes)), sizes, rank))
    return vq.state_dict()


def affine_scenario(rank: int) -> dict:
    from vector_quantize_pytorch import VectorQuantize as VQP

    from vqtriton.compat import VectorQuantize

    out = dict(
        affine=_run(affine_vq(), AFFINE_STEPS, rank),
        unsynced_affine=_run(affine_vq(sync_affine=False), AFFINE_STEPS, rank),
        in_place=_run(in_place_vq(), IN_PLACE_STEPS, rank, lambda s, n: batch(s, n, D_AF)),
        in_place_uneven=_run(in_place_vq(), IN_PLACE_UNEVEN, rank, lambda s, n: batch(s, n, D_AF)),
    )
    # vqp itself on the same rank batches (each non-empty: vqp's empty batch gives NaN statistics).
    for name, kw in (("vqp_affine", dict(affine_param=True, sync_affine_param=True)),
                     ("vqp_in_place", dict(learnable_codebook=True, ema_update=False, affine_param=True,
                                           in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5)))):
        states = []
        for cls in (VQP, VectorQuantize):
            torch.manual_seed(0)
            vq = cls(D_AF, K_AF, **kw)
            states.append(_run(vq, AFFINE_STEPS[:2], rank))
        out[name] = states
    return out


def test_affine_statistics_and_in_place_steps_are_synchronised(tmp_path):
    """The affine map's batch statistics over every rank's vectors (``sync_affine``), and the in-place optimiser's
    gradient averaged over ranks: ranks stay identical and equal one process on the concatenated batch (equal
    shares for the in-place step); uneven and empty batches do not hang; vqp itself on the same ranks agrees."""
    ranks = run_ranks(tmp_path, affine_scenario)
    for name in ("affine", "in_place", "in_place_uneven"):
        assert_ranks_identical([ranks[r][name] for r in range(WORLD)], name)
    whole = lambda steps: [(sum(sizes),) for sizes in steps]  # noqa: E731  (one process, the full batches)
    single = {"affine": _run(affine_vq(sync=False), whole(AFFINE_STEPS), 0),
              "in_place": _run(in_place_vq(sync=False), whole(IN_PLACE_STEPS), 0, lambda s, n: batch(s, n, D_AF))}
    for name, state in single.items():
        for key, value in state.items():
            torch.testing.assert_close(ranks[0][name][key], value, rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")
    unsynced = [ranks[r]["unsynced_affine"]["affine_batch_mean"] for r in range(WORLD)]
    assert not torch.allclose(unsynced[0], unsynced[1])  # the check can see a difference
    for r in range(WORLD):
        for name in ("vqp_affine", "vqp_in_place"):
            theirs, ours = ranks[r][name]
            assert list(ours) == list(theirs)
            for key, value in theirs.items():
                torch.testing.assert_close(ours[key].float(), value.float(), rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")
