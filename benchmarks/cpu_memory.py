"""Peak host memory of one layer step (forward + backward) per provider, on the CPU.

    python benchmarks/cpu_memory.py [--shape 16384x1024x64] [--providers vqtriton,vqtriton-compat,vqp,eager] [--op layer]

Without CUDA there is no allocator counter like ``torch.cuda.max_memory_allocated``; this measures
the growth of the process's peak resident set (``ru_maxrss``) over one step, each provider in a
fresh process after a step on a tiny problem (which does the imports and first-call set-up) and once
its inputs and module exist: the memory the step needs beyond them, to the allocator's page rounding.
Compiled providers are left out: their first call at a new shape is a compilation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure(provider: str, shape: tuple[int, int, int], op: str = "layer") -> float:
    """MiB the step adds to the peak resident set, measured in this process (call it in a fresh one)."""
    import torch

    from vqtriton import bench

    torch.manual_seed(0)
    bench.timed_callable(bench.PROVIDERS[op][provider], bench.make_inputs((64, 16, shape[2]), "cpu", requires_grad=True),
                         backward=True)()
    x = bench.make_inputs(shape, "cpu", requires_grad=True)
    step = bench.timed_callable(bench.PROVIDERS[op][provider], x, backward=True)
    before = _peak_kib()
    step()
    return (_peak_kib() - before) / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16384x1024x64")
    ap.add_argument("--providers", default="vqtriton,vqtriton-compat,vqp,eager")
    ap.add_argument("--op", default="layer", help="the bench op whose step is measured (layer, rvq, ...)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one provider in this process
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    if args.one:
        print(json.dumps(measure(args.one, shape, args.op)))
        return
    for provider in args.providers.split(","):
        out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--op", args.op, "--one", provider],
                             capture_output=True, text=True, check=True).stdout
        print(f"{provider:>16}  {float(out.strip().splitlines()[-1]):8.1f} MiB  ({args.op} step {args.shape}, CPU)")


if __name__ == "__main__":
    main()
