"""LFQ's training step (forward + backward with the entropy loss) per provider, timed in turns.

    python benchmarks/lfq_speed.py [--shape 4096x16384x14] [--reps 7] [--threads 1]

``vqtriton bench --ops lfq`` times one provider after the other; on a shared machine the load then falls
on them unevenly. Here every round runs one step of each provider (``bench.time_ms_interleaved``), so
the medians' ratios are same-run ratios under the same load. ``--threads`` sets torch's intra-op threads
for all of them (default: torch's own).
"""

from __future__ import annotations

import argparse

import torch

from vqtriton import bench


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x16384x14", help="N x K x d, K = 2^d")
    ap.add_argument("--providers", default=",".join(bench.PROVIDERS["lfq"]))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    x = bench.make_inputs(shape, args.device, requires_grad=True)
    runs, skipped = {}, {}
    for name in args.providers.split(","):
        try:
            runs[name] = bench.timed_callable(bench.PROVIDERS["lfq"][name], x, backward=True)
        except bench.Unavailable as e:
            skipped[name] = str(e)
    medians = bench.time_ms_interleaved(runs, warmup=1, reps=args.reps)
    base = medians.get("vqtriton")
    print(f"LFQ training step {args.shape} on {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.reps} rounds in turns:")
    for name, ms in medians.items():
        ratio = f"  ({ms / base:.2f}x vqtriton)" if base else ""
        print(f"{name:>18}  {ms:10.1f} ms{ratio}")
    for name, why in skipped.items():
        print(f"{name:>18}  skipped: {why}")


if __name__ == "__main__":
    main()
