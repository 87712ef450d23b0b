"""Peak host memory of one LFQ training step (forward + backward with the entropy loss) per provider, on the CPU.

    python benchmarks/lfq_memory.py [--shape 2048x262144x18] [--providers vqtriton,vqtriton-compat,vqp]

As ``cpu_memory.py`` does for the VQ layer: the growth of the process's peak resident set (``ru_maxrss``)
over one step, each provider in a fresh process, after a step on a tiny problem (imports and first-call
set-up) and once its inputs and module exist: the memory the step needs beyond them. vqp's step holds
``[N, 2^d]`` softmaxes, linear in N: where that would pass the CPU budget of ``vqtriton.bench`` it is
skipped (measure it at a smaller N, ``--shape 256x262144x18``, and scale).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from cpu_memory import _peak_kib

# The warm-up step's shape: 16 codes of 4 bits.
_WARMUP = (64, 16, 4)


def measure(provider: str, shape: tuple[int, int, int]) -> float | str:
    """MiB the step adds to the peak resident set (call it in a fresh process), or why it was skipped."""
    import torch

    from vqtriton import bench

    torch.manual_seed(0)
    make = bench.PROVIDERS["lfq"][provider]
    bench.timed_callable(make, bench.make_inputs(_WARMUP, "cpu", requires_grad=True), backward=True)()
    x = bench.make_inputs(shape, "cpu", requires_grad=True)
    try:
        step = bench.timed_callable(make, x, backward=True)
    except bench.Unavailable as e:
        return f"skipped: {e}"
    before = _peak_kib()
    step()
    return (_peak_kib() - before) / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2048x262144x18", help="N x K x d, K = 2^d")
    ap.add_argument("--providers", default="vqtriton,vqtriton-compat,vqp")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one provider in this process
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    if args.one:
        print(json.dumps(measure(args.one, shape)))
        return
    for provider in args.providers.split(","):
        out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--one", provider],
                             capture_output=True, text=True, check=True).stdout
        value = json.loads(out.strip().splitlines()[-1])
        shown = f"{value:8.1f} MiB" if isinstance(value, float) else value
        print(f"{provider:>16}  {shown}  (LFQ training step {args.shape}, CPU)")


if __name__ == "__main__":
    main()
