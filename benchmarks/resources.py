"""Compile every kernel variant for a GPU that is not here, and read what each one costs.

Triton's CPU interpreter runs the kernels' arithmetic but never compiles them: a kernel that does
not lower for the real target (a ``tl.dot`` tile the backend rejects, a dtype mix, too much shared
memory) passes every interpreter test and fails at its first launch on a GPU. This script needs no
GPU. It drives each launcher of ``vqtriton.kernels`` through its code paths (precision modes,
splits, dtypes, deterministic or atomic, aligned and odd D) on small CPU tensors while Triton
believes the current device is a CUDA GPU of compute capability ``--arch``; every launch compiles,
for every autotune config, instead of running (``warmup``). Triton's bundled ptxas makes the cubin,
its bundled cuobjdump reads the registers and local memory (spills) per thread, and the compiled
metadata gives the shared memory per program.

    python benchmarks/resources.py                 # sm_90 (H100): one line per variant
    python benchmarks/resources.py --arch 80 --json out.json --sass --workers 4

``--sass`` adds each variant's static SASS instruction count (a code-size proxy for comparing
versions of a kernel, not a timing). Exit status 1 when a variant fails to compile or needs more
shared memory than the architecture gives one program; spills to local memory are counted and
listed (a performance defect, not a failure). Run it without ``TRITON_INTERPRET`` (kernels must
compile, not interpret); tests/test_compile_targets.py runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, KernelInterface

# Constexprs that name the variant (the rest are implied by the code path or set by a heuristic).
_SHOWN = ("MODE", "SEARCH", "FINISH", "RETURN_ZQ", "ROWS", "REDUCE", "PER_ROW", "HAS_ROWS", "COUNT",
          "HAS_GRAD", "CODEBOOK_GRAD", "ATOMIC", "ROTATE", "PARTS", "BN", "BK", "BD", "TILE", "BLOCK_N", "BLOCK_D",
          "BLOCK", "COSINE", "EVERY", "STATS", "HAS_MASK", "HAS_LEVELS", "WHOLE_ROWS", "LP", "KP", "HAS_W", "GRAD",
          "BLOCK_A", "BLOCK_K")


@dataclass
class Variant:
    kernel: str
    call: str  # the launcher call that requested it
    signature: str  # pointer dtypes and the constexprs of _SHOWN
    num_warps: int
    num_stages: int
    registers: int | None = None
    local_bytes: int | None = None  # per thread; > 0 means spills
    shared_bytes: int | None = None
    instructions: int | None = None  # static SASS count (--sass)
    tensor_core_ops: int | None = None  # of which HGMMA / HMMA (--sass)
    error: str | None = None


# Shared memory one program (thread block) may use, by compute capability x10 (CUDA's
# sharedMemPerBlockOptin): sm_80 (A100) 163 KiB, sm_86 / sm_89 99 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _TargetDriver:
    """Just enough of a Triton driver for compile-only launches: a fixed target, no device."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextmanager
def compile_only(arch: int, found: list[Variant], sass: bool = False):
    """Within: ``kernel[grid](...)`` compiles for ``sm_<arch>`` (every autotune config) and returns.

    Each compiled variant is appended to ``found`` (``found[-1].call`` is filled by the caller's
    ``_label``)."""
    saved_getitem, saved_compile = KernelInterface.__getitem__, JITFunction._do_compile

    def getitem(self, grid):
        return lambda *args, **kwargs: self.warmup(*args, grid=grid, **kwargs)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        names = {path[0]: value for path, value in constexprs.items() if len(path) == 1}
        consts = {self.arg_names[i]: v for i, v in names.items() if self.arg_names[i] in _SHOWN}
        ptrs = [t for t in signature.values() if isinstance(t, str) and t.startswith("*")]
        sig = " ".join([",".join(ptrs)] + [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items()])
        variant = Variant(self._fn_name, "", sig, options.num_warps, options.num_stages)
        found.append(variant)
        try:
            kernel = saved_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        except Exception as exc:  # a compile error is the finding: record it and go on
            variant.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            return None
        variant.shared_bytes = int(kernel.metadata.shared)
        variant.registers, variant.local_bytes, variant.instructions, variant.tensor_core_ops = _usage(
            kernel.asm["cubin"], sass)
        return kernel

    driver.set_active(_TargetDriver(arch))
    KernelInterface.__getitem__, JITFunction._do_compile = getitem, do_compile
    try:
        yield
    finally:
        KernelInterface.__getitem__, JITFunction._do_compile = saved_getitem, saved_compile
        driver._active = None


def _usage(cubin: bytes, sass: bool) -> tuple[int, int, int | None, int | None]:
    """(registers per thread, stack + local bytes per thread, SASS instructions, of which tensor-core
    ones) of a cubin, by the cuobjdump that ships with Triton (the last two None without ``sass``)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()

        def dump(flag):
            return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout

        out = dump("--dump-resource-usage")
        # An instruction line: "/*0a30*/  [@P0] OPCODE.MODIFIERS operands ;" -> OPCODE.
        ops = re.findall(_SASS_OP, dump("-sass"), re.M) if sass else None
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    regs, local = int(m.group(1)), int(m.group(2)) + int(m.group(3))
    if ops is None:
        return regs, local, None, None
    return regs, local, len(ops), sum(op in ("HGMMA", "HMMA") for op in ops)


_SASS_OP = r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)"


def _calls():
    """(label, thunk) for every code path of every launcher, on small CPU tensors."""
    from vqtriton.kernels import assign, gather, quantize, sqerr, stats

    def t(n, d, dtype=torch.float32):
        return torch.randn(n, d).to(dtype)

    idx = torch.randint(0, 50, (300,))
    for d in (64, 37):  # aligned rows, and rows no vector load can assume aligned
        for zd, cd in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                       (torch.float16, torch.float32)):
            z, c = t(300, d, zd), t(50, d, cd)
            tag = f"D={d} z={str(zd)[6:]} codebook={str(cd)[6:]}"
            for precision in assign.PRECISIONS:
                for split in (1, 3):
                    for zq in (False, True):
                        yield (f"assign_fwd {tag} {precision} split={split} return_zq={zq}",
                               lambda z=z, c=c, p=precision, s=split, q=zq:
                               assign.assign_fwd(z, c, precision=p, split=s, return_zq=q))
            yield f"gather {tag}", lambda c=c: gather.gather(idx, c)
            for det in (False, True):
                yield (f"scatter_add {tag} deterministic={det}",
                       lambda z=z, det=det: gather.scatter_add(idx, z, 50, deterministic=det))
                yield (f"code_stats {tag} deterministic={det}",
                       lambda z=z, det=det: stats.code_stats(idx, z, 50, deterministic=det))
                zq = t(300, d, torch.promote_types(zd, cd))  # the forward's codes, in the wider dtype
                for grad, rotate in ((None, False), (t(300, d, zq.dtype), False), (t(300, d, zq.dtype), True)):
                    for v in (None, torch.ones(300)):
                        yield (f"quantize_backward {tag} grad_out={grad is not None} rotate={rotate} "
                               f"codebook_grad={v is not None} deterministic={det}",
                               lambda z=z, zq=zq, g=grad, v=v, det=det, r=rotate: quantize.quantize_backward(
                                   z, zq, idx, g, torch.ones(300), v, 50, deterministic=det, rotate=r))
            zc = z.to(c.dtype)
            yield f"sqerr_rows {tag}", lambda z=z, c=zc: sqerr.sqerr_rows(z, c)
            yield f"sqerr_sum {tag}", lambda z=z, c=zc: sqerr.sqerr_sum(z, c)
            for g in (torch.tensor(1.0), torch.ones(300)):
                yield (f"sqerr_backward {tag} grad={tuple(g.shape)}",
                       lambda z=z, c=zc, g=g: sqerr.sqerr_backward(z, c, g))
    # D = 8: the tensor-core tiles shrink to BD = 16 (assign._fit_bd).
    for precision in assign.PRECISIONS:
        yield (f"assign_fwd D=8 {precision} split=1",
               lambda p=precision: assign.assign_fwd(t(300, 8), t(50, 8), precision=p, split=1))
    # The plain direct-form search on every row (N >= 2^31).
    yield "assign_fwd D=37 exact plain search", _plain_search
    yield from _residual_calls(t)
    yield from _topk_sample_calls(t)
    yield from _lfq_calls()


def _residual_calls(t):
    """kernels/residual.py: the fused forward (precision modes, dtypes, cosine with a mask and quantize
    dropout, the plain direct-form search, D = 8) and the replay (backward flags, the rotation trick,
    cosine, both output modes, deterministic, the EMA statistics), three levels of sizes 50, 30, 41."""
    from vqtriton.kernels import residual

    sizes = [50, 30, 41]
    n = 300
    keep, levels = torch.rand(n) > 0.2, torch.tensor(2)
    idx = torch.stack([torch.randint(0, k, (n,)) for k in sizes], 1)
    for d in (64, 37):
        for zd, cd in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                       (torch.float16, torch.float32)):
            z, c = t(n, d, zd), t(sum(sizes), d, cd)
            tag = f"D={d} z={str(zd)[6:]} codebook={str(cd)[6:]}"
            for precision in ("exact",) if zd != torch.float32 else residual.PRECISIONS:
                yield (f"residual_assign_fwd {tag} {precision}",
                       lambda z=z, c=c, p=precision: residual.residual_assign_fwd(z, c, sizes, precision=p))
            yield (f"residual_backward {tag} grad codebook_grad",
                   lambda z=z, c=c: residual.residual_backward(z, c, sizes, idx, t(n, d), torch.ones(n, 3),
                                                               torch.ones(n, 3)))
            yield (f"residual_backward {tag} deterministic",
                   lambda z=z, c=c: residual.residual_backward(z, c, sizes, idx, t(n, d), torch.ones(n, 3),
                                                               torch.ones(n, 3), deterministic=True))
            yield (f"residual_backward {tag} no codebook_grad",
                   lambda z=z, c=c: residual.residual_backward(z, c, sizes, idx, t(n, d), torch.ones(n, 3), None))
        z, c = t(n, d), t(sum(sizes), d)
        for precision in residual.PRECISIONS:
            yield (f"residual_assign_fwd D={d} {precision} cosine mask levels",
                   lambda z=z, c=c, p=precision: residual.residual_assign_fwd(z, c, sizes, precision=p, cosine=True,
                                                                            keep=keep, levels=levels))
        yield (f"residual_assign_fwd D={d} exact plain search",
               lambda z=z, c=c: residual.residual_assign_fwd(z, c, sizes, certified=False))
        for grad, rotate, cosine, mode in ((True, False, False, "every"), (True, True, False, "first"),
                                           (True, True, False, "every"), (True, False, True, "first"),
                                           (True, True, True, "every"), (False, False, True, "first")):
            yield (f"residual_backward D={d} grad={grad} rotate={rotate} cosine={cosine} {mode}",
                   lambda z=z, c=c, g=grad, r=rotate, cs=cosine, m=mode: residual.residual_backward(
                       z, c, sizes, idx, t(n, d) if g else None, torch.ones(n, 3), torch.ones(n, 3), cosine=cs,
                       output_grad=m, rotate=r))
        yield (f"residual_backward D={d} mask levels",
               lambda z=z, c=c: residual.residual_backward(z, c, sizes, idx, t(n, d), torch.ones(n, 3),
                                                           torch.ones(n, 3), keep=keep, levels=levels))
        for cosine in (False, True):
            for det in (False, True):
                yield (f"residual_stats D={d} cosine={cosine} deterministic={det}",
                       lambda z=z, c=c, cs=cosine, det=det: residual.residual_stats(z, c, sizes, idx, cosine=cs,
                                                                                    deterministic=det))
    for precision in residual.PRECISIONS:
        yield (f"residual_assign_fwd D=8 {precision}",
               lambda p=precision: residual.residual_assign_fwd(t(n, 8), t(sum(sizes), 8), sizes, precision=p))


def _topk_sample_calls(t):
    """kernels/topk.py: every state size (k = 3, 9, 40: KP 4, 16, 64) in every precision mode, split 1
    (search + finish) and 3 (search runs + the merging finish), the listed rows' direct-form search (exact
    mode), half inputs and rows no vector load can assume aligned (D = 37), the plain direct-form search
    alone (N >= 2^31). kernels/sample.py: both logits, with and without z_q, split 1 and 3, dtypes, D."""
    from vqtriton.kernels import assign, sample, topk

    z, c = t(300, 64), t(200, 64)
    for precision in assign.PRECISIONS:
        for k in (3, 9, 40):
            for split in (1, 3):
                yield (f"topk_fwd D=64 {precision} k={k} split={split}",
                       lambda p=precision, k=k, s=split: topk.topk_fwd(z, c, k, precision=p, split=s))
    for split in (1, 3):
        yield (f"topk_fwd D=37 exact k=9 split={split}",
               lambda s=split: topk.topk_fwd(t(300, 37), t(200, 37), 9, split=s))
    yield ("topk_fwd D=64 z=bfloat16 codebook=bfloat16 exact k=9",
           lambda: topk.topk_fwd(t(300, 64, torch.bfloat16), t(200, 64, torch.bfloat16), 9, split=1))
    yield "topk_fwd D=37 exact plain search", _plain_topk
    seed = torch.tensor(7)
    for d in (64, 37):
        for dtype in (torch.float32, torch.bfloat16):
            zs, cs = t(300, d, dtype), t(200, d, dtype)
            for zq in (False, True):
                for split in (1, 3):
                    yield (f"sample_fwd D={d} {str(dtype)[6:]} return_zq={zq} split={split}",
                           lambda zs=zs, cs=cs, q=zq, s=split: sample.sample_fwd(zs, cs, 0.7, seed, return_zq=q,
                                                                                  split=s))
    for zq in (False, True):
        yield (f"sample_fwd D=64 cosine return_zq={zq}",
               lambda q=zq: sample.sample_fwd(z, c, 0.7, seed, cosine=True, return_zq=q, split=1))


def _plain_topk():
    from vqtriton.kernels import assign, topk

    saved, assign._CERTIFIED_SEARCH = assign._CERTIFIED_SEARCH, False
    try:
        for split in (1, 3):
            topk.topk_fwd(torch.randn(300, 37), torch.randn(200, 37), 9, split=split)
    finally:
        assign._CERTIFIED_SEARCH = saved


def _lfq_calls():
    """kernels/lfq.py: the half distributions (weighted or not; halves of 0, 1, 9 and 12 bits: d up to 24),
    their backward (the same halves, and the widest, 16 bits), the entropy and its gradient (exact and
    clamped), on a head-strided view of the logits as the entropy ops pass it."""
    from vqtriton.kernels import lfq

    u = torch.randn(300, 2, 24).transpose(0, 1)  # [H, N, d], rows 48 apart
    w = torch.rand(300)
    for k in (0, 1, 9, 12):
        for weighted in (False, True):
            yield (f"lfq_halves k={k} weighted={weighted}",
                   lambda k=k, ww=w if weighted else None: lfq.lfq_halves(u, ww, 24 - k, k))
    for k in (1, 9, 12, 16):
        yield (f"lfq_halves_backward k={k}",
               lambda k=k: lfq.lfq_halves_backward(u, torch.rand(2, 300, 2**k), torch.randn(2, 300, 2**k), 0, k))
    m = torch.rand(2, 5000)
    for eps in (0.0, 1e-5):
        yield f"distribution_entropy eps={eps}", lambda e=eps: lfq.distribution_entropy(m, e)
        yield f"distribution_entropy_grad eps={eps}", lambda e=eps: lfq.distribution_entropy_grad(m, torch.ones(2), e)


def _plain_search():
    from vqtriton.kernels import assign

    saved, assign._CERTIFIED_SEARCH = assign._CERTIFIED_SEARCH, False
    try:
        for split in (1, 3):
            assign.assign_fwd(torch.randn(300, 37), torch.randn(50, 37), split=split, return_zq=True)
    finally:
        assign._CERTIFIED_SEARCH = saved


def _compile_share(arch: int, sass: bool, worker: int, workers: int) -> list[Variant]:
    """The variants of every ``workers``-th launcher call, starting at ``worker``."""
    found: list[Variant] = []
    with compile_only(arch, found, sass):
        for i, (label, thunk) in enumerate(_calls()):
            if i % workers == worker:
                start = len(found)
                thunk()
                for v in found[start:]:
                    v.call = label
    return found


def compile_all(arch: int, sass: bool = False, workers: int = 1) -> list[Variant]:
    """Every distinct kernel variant the launchers request, compiled for ``sm_<arch>``, in
    ``workers`` processes (each compiles the variants of its share of the launcher calls)."""
    if workers == 1:
        shares = [_compile_share(arch, sass, 0, 1)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            shares = list(pool.map(_compile_share, [arch] * workers, [sass] * workers, range(workers),
                                   [workers] * workers))
    seen, variants = set(), []
    for v in (v for share in shares for v in share):
        key = (v.kernel, v.signature, v.num_warps, v.num_stages)
        if key not in seen:
            seen.add(key)
            variants.append(v)
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    parser.add_argument("--json", type=Path, help="also write the variants as JSON here")
    parser.add_argument("--sass", action="store_true", help="count each variant's SASS instructions")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: this compiles the kernels, the interpreter never does")
    start = time.perf_counter()
    variants = compile_all(args.arch, args.sass, max(1, args.workers))
    took = time.perf_counter() - start
    print(f"sm_{args.arch}, triton {triton.__version__}, torch {torch.__version__}: {len(variants)} variants "
          f"compiled in {took:.0f} s")
    limit = SMEM_LIMIT.get(args.arch)
    print(f"{'kernel':<22} {'warps':>5} {'stages':>6} {'regs':>4} {'local':>5} {'smem KiB':>8} {'instr':>5}"
          "  variant  [first call]")
    for v in variants:
        name = v.kernel.rsplit(".", 1)[-1]
        if v.error:
            print(f"{name:<22} {v.num_warps:>5} {v.num_stages:>6}  FAILED  {v.signature}  [{v.call}]\n    {v.error}")
        else:
            print(f"{name:<22} {v.num_warps:>5} {v.num_stages:>6} {v.registers:>4} {v.local_bytes:>5} "
                  f"{v.shared_bytes / 1024:>8.1f} {v.instructions or '-':>5}  {v.signature}  [{v.call}]")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                                         "smem_limit": limit, "variants": [asdict(v) for v in variants]}, indent=1))
    failed = [v for v in variants if v.error]
    too_big = [v for v in variants if not v.error and limit is not None and v.shared_bytes > limit]
    spilled = [v for v in variants if not v.error and v.local_bytes]
    print(f"{len(failed)} failed to compile, {len(too_big)} over the {limit} B shared-memory limit, "
          f"{len(spilled)} spill registers to local memory")
    return 1 if failed or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
