"""CPU ranks over gloo for the distributed tests: the process group a spawned worker runs in, and a bounded
join (imported as ``gloo``: tests/ is on sys.path). Workers use the torch backend: the Triton interpreter is
too slow for several processes on a small machine."""

import contextlib
import os
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def process_group(rank: int, world: int, store: str, timeout_s: float):
    """Run the body as ``rank`` of ``world`` (a FileStore at ``store``; a collective that waits longer than
    ``timeout_s`` fails). When the body returns, the ranks meet at a barrier, leave the group, and the
    process exits at once (status 0) without the interpreter's teardown: there gloo's threads have aborted
    a rank now and then ("terminate called without an active exception", SIGABRT) after its work was done.
    When the body raises, the exception goes on to the spawner as usual."""
    os.environ["VQTRITON_BACKEND"] = "torch"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()  # no rank tears its connections down while a peer still uses them
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def join(ctx: mp.ProcessContext, timeout_s: float, what: str) -> list[int]:
    """Wait for the spawned ranks (raises as ``ProcessContext.join`` does when one fails); fails the test
    after ``timeout_s`` (a collective hung?). Whatever happens, no rank outlives this call. The exit codes."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{what}: ranks still running after {timeout_s} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [p.exitcode for p in ctx.processes]
