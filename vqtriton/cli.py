"""The ``vqtriton`` command: ``check``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import os
import sys


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vqtriton: --device cuda asked for, but torch sees no CUDA device")
    return name


def _use_interpreter_on_cpu(device: str, backends: list[str]) -> None:
    """Triton kernels run on the CPU only through the interpreter, which must be on before triton loads."""
    if device == "cpu" and "triton" in backends:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SystemExit("vqtriton: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"


def cmd_check(args) -> int:
    device = _device(args.device)
    backends = ["torch", "triton"] if args.backend == "all" else [args.backend]
    _use_interpreter_on_cpu(device, backends)
    from vqtriton.check import format_table, run_checks

    rows = run_checks(device, backends)
    print(f"vqtriton check on {device}: every op against vqtriton.reference (float64)")
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    device = _device(args.device)
    from vqtriton.bench import run_report

    shapes = None
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    providers = args.providers.split(",") if args.providers else None
    ops = args.ops.split(",") if args.ops else None
    run_report(device, shapes, args.out, providers, reps=args.reps, ops=ops)
    return 0


def cmd_demo(args) -> int:
    from vqtriton.checkpoint import CheckpointError
    from vqtriton.demo import DemoConfig, train

    cfg = DemoConfig(
        steps=args.steps,
        codes=args.codes,
        batch=args.batch,
        ema=args.ema,
        device=_device(args.device),
        backend=args.backend,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        save_every=args.save_every,
        deterministic=args.deterministic,
    )
    try:
        m = train(cfg)
    except CheckpointError as e:  # never a silent restart from step 0
        raise SystemExit(f"vqtriton demo: {e}") from e
    for tmp in m["removed_temp_files"]:
        print(f"removed {tmp}, left by a checkpoint write that was interrupted")
    if m["resumed_from"] is not None:
        print(f"resumed from step {m['resumed_from']} of {m['checkpoint']}")
    elif cfg.resume:
        print(f"no checkpoint at {m['checkpoint']}: started at step 0")
    print(
        f"held-out digits: reconstruction error {m['reconstruction']:.4f} per pixel "
        f"(training batches: {m['first_reconstruction']:.4f} at the first step, {m['last_reconstruction']:.4f} at the last), "
        f"perplexity {m['perplexity']:.1f} of {cfg.codes} codes, codebook usage {m['usage']:.0%}"
    )
    print(f"wrote {m['reconstructions']}, {m['training']} and {m['checkpoint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqtriton", description="Triton kernels for vector quantization.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="cross-check every op against the NumPy spec reference")
    c.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    c.add_argument("--backend", choices=["all", "torch", "triton"], default="all")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="time vqtriton against torch eager, torch.compile and vector-quantize-pytorch")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None)
    b.add_argument("--shapes", default=None, help="comma-separated NxKxD, e.g. 65536x1024x128,4096x512x16")
    b.add_argument("--out", default="vqtriton-bench", help="folder for report.json and report.png")
    b.add_argument("--providers", default=None,
                   help="comma-separated providers, by name or op/name, e.g. layer/vqtriton-compat,layer/vqp (default: all)")
    b.add_argument("--reps", type=int, default=None, help="timed calls per provider (default: 20 on CUDA, 5 on the CPU)")
    b.add_argument("--ops", default=None,
                   help="comma-separated ops (default: assign,quantize,layer); 'latency': the per-call overhead "
                        "ops at N = 1, 64, 1024 (K = 256, D = 32) on one thread")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="train a small VQ-VAE on scikit-learn's digits")
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--codes", type=int, default=64)
    d.add_argument("--batch", type=int, default=128, help="images per training step")
    d.add_argument("--ema", action="store_true", help="EMA codebook updates instead of a learned codebook")
    d.add_argument("--device", choices=["cpu", "cuda"], default=None)
    d.add_argument("--backend", choices=["torch", "triton"], default=None)
    d.add_argument("--out", default="vqtriton-demo")
    d.add_argument("--resume", action="store_true",
                   help="continue exactly from --out/checkpoint.pt (same settings; --steps, --save-every may change)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--save-every", type=int, default=250, help="steps between checkpoints (and one at the end)")
    d.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): bitwise reproducible on CUDA too")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
