"""Benchmark machinery shared by the pytest-benchmark suites (``benchmarks/``) and ``vqtriton bench``.

Each op (assign, lookup, sqerr, quantize, layer) has *providers*: vqtriton, what users would run
instead (torch eager, torch.compile, cdist, vector-quantize-pytorch), and GEMM-alone references.
A provider is ``make(x: Inputs) -> forward``; :func:`timed_callable` adds the backward and a device
sync. :func:`run_report` times all of them in one run, with ratios to vqtriton. On the CPU vqtriton
runs its torch backend on tiny shapes: that checks the machinery only. No CUDA query at import.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import importlib
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import vqtriton as vqt
from vqtriton.torch_ops import cuda_fp32_matmul

# (N, K, D): the five shapes of the performance issue, then small N with large K.
GPU_SHAPES = ((32768, 1024, 256), (65536, 1024, 128), (65536, 16384, 8), (65536, 8192, 256), (262144, 4096, 64))
SMALL_N_SHAPE = (512, 65536, 64)
CPU_SHAPES = ((2048, 256, 32), (4096, 512, 16))
REPORT_OPS = ("assign", "quantize", "layer")
BETA = 0.25


class Unavailable(RuntimeError):
    """A provider that cannot run here (an optional package or module that does not import)."""


@dataclass
class Inputs:
    z: torch.Tensor  # [N, D] latents
    codebook: torch.Tensor  # [K, D]
    idx: torch.Tensor  # [N] random codes, for lookup
    other: torch.Tensor  # [N, D] second operand, for squared error
    grad: torch.Tensor  # [N, D] upstream gradient of an [N, D] output

    @property
    def dk(self) -> tuple[int, int]:
        """``(D, K)``: how VQ layers are built, ``Layer(dim, num_codes)``."""
        return self.z.shape[1], self.codebook.shape[0]


def shape_id(shape) -> str:
    return "N{}-K{}-D{}".format(*shape)


def default_shapes(device) -> tuple:
    """The issue's five shapes and small-N on CUDA, the tiny CPU shapes elsewhere."""
    return GPU_SHAPES + (SMALL_N_SHAPE,) if torch.device(device).type == "cuda" else CPU_SHAPES


def make_inputs(shape, device, *, requires_grad: bool = False, seed: int = 0) -> Inputs:
    """N(0, 1) float32 data for one shape; ``requires_grad`` on ``z``, ``codebook`` and ``other``."""
    n, k, d = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, grad=requires_grad):
        return torch.randn(*size, generator=g).to(device).requires_grad_(grad)

    idx = torch.randint(0, k, (n,), generator=g).to(device)
    return Inputs(randn(n, d), randn(k, d), idx, randn(n, d), randn(n, d, grad=False))


# --- baselines, as users write them -------------------------------------------------------------


def eager_assign(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The N x K distance matrix in the addmm form, then argmin (``||z||^2`` dropped: constant per row)."""
    return torch.addmm(codebook.square().sum(1), z, codebook.T, alpha=-2.0).argmin(1)


def cdist_assign(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(1)


# k of the top-k benchmarks (a beam of 8), and the temperature of the sampling ones (vqp's default).
TOPK, TEMPERATURE = 8, 1.0


def eager_topk(z: torch.Tensor, codebook: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """The N x K distance matrix in the addmm form, then topk (vqp's ``topk`` path, as users write it)."""
    return torch.addmm(codebook.square().sum(1), z, codebook.T, alpha=-2.0).topk(k, dim=1, largest=False).indices


def cdist_topk(z: torch.Tensor, codebook: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    return torch.cdist(z, codebook).topk(k, dim=1, largest=False).indices


def eager_gumbel(z: torch.Tensor, codebook: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """vqp's Gumbel-max sampling: logits ``-sqrt(max(d, 1e-8))`` over the N x K matrix, plus N x K noise
    ``-log(-log(u))`` (logs clamped at 1e-20), argmax."""
    d = torch.addmm(codebook.square().sum(1), z, codebook.T, alpha=-2.0).add_(z.square().sum(1, keepdim=True))
    u = torch.rand_like(d)
    noise = -torch.log(-torch.log(u.clamp_min(1e-20)).clamp_min(1e-20))
    return (-d.clamp_min_(1e-8).sqrt_() / temperature + noise).argmax(1)


def eager_sqerr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().sum()


def eager_vq(z: torch.Tensor, codebook: torch.Tensor, beta: float = BETA):
    """A plain eager VQ step: distance matrix + argmin, embedding, the two MSE losses, straight-through."""
    with torch.no_grad():
        idx = eager_assign(z, codebook)
    z_q = F.embedding(idx, codebook)
    loss = F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z, z_q.detach())
    return z + (z_q - z).detach(), idx, loss


class EagerVQ(torch.nn.Module):
    """The plain eager torch VQ layer (learned codebook) of the layer comparisons."""

    def __init__(self, dim: int, num_codes: int, beta: float = BETA):
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.randn(num_codes, dim))
        self.beta = beta

    def forward(self, z):
        return eager_vq(z, self.codebook, self.beta)


# --- providers: make(x) -> forward callable -----------------------------------------------------


@functools.cache
def _compiled(fn):
    # One specialised graph per shape, shared by every caller.
    return torch.compile(fn, dynamic=False)


def _with_tf32(enabled: bool, fn, *args):
    """``fn(*args)`` with cuBLAS TF32 on or off, the flag restored after (no effect on the CPU)."""

    def run():
        with cuda_fp32_matmul(tf32=enabled):
            return fn(*args)

    return run


def _backend(x: Inputs) -> str | None:
    return None if x.z.is_cuda else "torch"


def _import(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"{module}.{name} does not import: {e}") from e


def _gemm(x: Inputs, dtype: torch.dtype):
    z, c = x.z.detach().to(dtype), x.codebook.detach().to(dtype)  # cast outside the timed call
    return _with_tf32(False, torch.mm, z, c.T)


def _vqtriton_quantize(x: Inputs):
    def run():
        r = vqt.quantize(x.z, x.codebook, beta=BETA, reduction="mean", backend=_backend(x))
        return r.z_q, r.indices, r.loss

    return run


def _layer(module, x: Inputs, batched: bool = False):
    """Step of a layer module on ``z``; ``batched`` feeds ``[1, N, D]`` (vector-quantize-pytorch)."""
    module = module.to(x.z.device)

    def run():
        module.zero_grad(set_to_none=True)
        z_q, idx, loss = module(x.z[None] if batched else x.z)
        return (z_q[0], idx[0], loss) if batched else (z_q, idx, loss)

    return _with_tf32(False, run)


# op -> provider -> make. "vqtriton" is each op's reference for the ratios; the order is that of
# the tables and charts. Forward-only ops run under no_grad (see timed_callable).
PROVIDERS: dict[str, dict[str, Callable[[Inputs], Callable[[], Any]]]] = {
    "assign": {
        "vqtriton": lambda x: functools.partial(vqt.assign, x.z, x.codebook, backend=_backend(x)),
        # The opt-in tensor-core modes, and exact assignment of bf16 inputs (cast outside the call).
        "vqtriton-tf32": lambda x: functools.partial(vqt.assign, x.z, x.codebook, precision="tf32", backend=_backend(x)),
        "vqtriton-bf16": lambda x: functools.partial(vqt.assign, x.z, x.codebook, precision="bf16", backend=_backend(x)),
        "vqtriton-bf16-inputs": lambda x: functools.partial(
            vqt.assign, x.z.detach().bfloat16(), x.codebook.detach().bfloat16(), backend=_backend(x)
        ),
        "eager-fp32": lambda x: _with_tf32(False, eager_assign, x.z, x.codebook),
        "eager-tf32": lambda x: _with_tf32(True, eager_assign, x.z, x.codebook),
        "compile-tf32": lambda x: _with_tf32(True, _compiled(eager_assign), x.z, x.codebook),
        "cdist": lambda x: _with_tf32(False, cdist_assign, x.z, x.codebook),
        "gemm-fp32": lambda x: _gemm(x, torch.float32),
        "gemm-bf16": lambda x: _gemm(x, torch.bfloat16),
    },
    # The k nearest codes (forward), and against them the N x K matrix + topk.
    "topk": {
        "vqtriton": lambda x: functools.partial(vqt.assign, x.z, x.codebook, k=TOPK, backend=_backend(x)),
        "vqtriton-bf16": lambda x: functools.partial(vqt.assign, x.z, x.codebook, precision="bf16", k=TOPK,
                                                     backend=_backend(x)),
        "addmm-topk-fp32": lambda x: _with_tf32(False, eager_topk, x.z, x.codebook),
        "addmm-topk-tf32": lambda x: _with_tf32(True, eager_topk, x.z, x.codebook),
        "cdist-topk": lambda x: _with_tf32(False, cdist_topk, x.z, x.codebook),
    },
    # One Gumbel-max draw per vector (forward): fused, against vqp's way over the N x K matrix.
    "sample": {
        "vqtriton": lambda x: functools.partial(vqt.sample_codes, x.z, x.codebook, TEMPERATURE, 0, backend=_backend(x)),
        "eager-gumbel-fp32": lambda x: _with_tf32(False, eager_gumbel, x.z, x.codebook),
        "eager-gumbel-tf32": lambda x: _with_tf32(True, eager_gumbel, x.z, x.codebook),
    },
    "lookup": {
        "vqtriton": lambda x: functools.partial(vqt.lookup, x.idx, x.codebook, backend=_backend(x)),
        "eager": lambda x: functools.partial(F.embedding, x.idx, x.codebook),
        "compile": lambda x: functools.partial(_compiled(F.embedding), x.idx, x.codebook),
    },
    "sqerr": {
        "vqtriton": lambda x: functools.partial(vqt.squared_error, x.z, x.other, backend=_backend(x)),
        "eager": lambda x: functools.partial(eager_sqerr, x.z, x.other),
        "compile": lambda x: functools.partial(_compiled(eager_sqerr), x.z, x.other),
    },
    "quantize": {
        "vqtriton": _vqtriton_quantize,
        "eager": lambda x: _with_tf32(False, eager_vq, x.z, x.codebook),
        "compile": lambda x: _with_tf32(False, _compiled(eager_vq), x.z, x.codebook),
    },
    "layer": {
        "vqtriton": lambda x: _layer(
            _import("vqtriton.layer", "VectorQuantizer")(*x.dk, beta=BETA, backend=_backend(x)), x
        ),
        # The same layer step under torch.compile (fullgraph: the whole step is one graph).
        "vqtriton-compiled": lambda x: _layer(
            torch.compile(
                _import("vqtriton.layer", "VectorQuantizer")(*x.dk, beta=BETA, backend=_backend(x)),
                fullgraph=True,
                dynamic=False,
            ),
            x,
        ),
        "eager": lambda x: _layer(EagerVQ(*x.dk), x),
        # The drop-in, with vector-quantize-pytorch's defaults (EMA codebook, rotation trick): the pair to vqp's.
        "vqtriton-compat": lambda x: _layer(
            _import("vqtriton.compat", "VectorQuantize")(*x.dk, backend=_backend(x)), x, batched=True
        ),
        # vector-quantize-pytorch's defaults (EMA codebook, rotation trick), as users run it
        "vqp": lambda x: _layer(_import("vector_quantize_pytorch", "VectorQuantize")(*x.dk), x, batched=True),
    },
}


# --- per-call overhead: small batches, one thread (issue 19) -------------------------------------------

# K = 256, D = 32 at one vector, a streaming chunk and a batch. Timed on one torch thread (one_thread).
LATENCY_SHAPES = ((1, 256, 32), (64, 256, 32), (1024, 256, 32))
EMA_DECAY = 0.8  # vqp's default decay
# The latency ops' clock on the CPU: the calling thread's CPU time. With one torch thread all of a call's work
# runs on it, so this is the call's cost, and other processes on a shared machine do not inflate it (a
# wall-clock median of a millisecond call there includes the scheduler's slices for them).
# Providers timed in turns share one heap: with glibc's default dynamic mmap / trim thresholds, what one
# provider allocates and frees moves those thresholds for the other, so whether the other's ~1 MiB buffers
# (N = 1024) are page-faulted in afresh each call depends on its neighbour (seen on the 2-core CPU: vqp's
# N = 1024 eval took 1.5 ms next to one version of vqtriton and 3.1 ms next to another). For numbers that do
# not depend on the neighbour, fix them: MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456.
LATENCY_CLOCK = time.thread_time


def _vq_pair(x: Inputs, ema: bool, vqp: bool, train: bool):
    """Our VectorQuantizer or vqp's VectorQuantize with matching settings (learned codebook with
    ``beta = commitment_weight = BETA``, or EMA with vqp's decay and weight 1; no rotation trick, no
    dead codes, no k-means), in training or eval mode."""
    d, k = x.dk
    if vqp:
        vq_cls = _import("vector_quantize_pytorch", "VectorQuantize")
        settings = dict(decay=EMA_DECAY, commitment_weight=1.0) if ema else dict(
            commitment_weight=BETA, learnable_codebook=True, ema_update=False
        )
        module = vq_cls(d, k, rotation_trick=False, **settings)
    else:
        settings = dict(ema_decay=EMA_DECAY, beta=1.0) if ema else dict(beta=BETA)
        module = vqt.VectorQuantizer(d, k, backend=_backend(x), **settings)
    return _layer(module.train(train), x, batched=vqp)


def _host_launch(x: Inputs, launcher: bool):
    """Triton's ``assign`` as launched: ``vqt.assign`` whole, or the launcher alone. Timed without the
    device sync after the call (see HOST_ONLY_OPS), so on CUDA it is the host's time per launch."""
    if not x.z.is_cuda:
        raise Unavailable(
            "the Triton path's host time per launch needs CUDA: under the interpreter the launch runs the kernel "
            "itself, so its time is the kernel's, not the launch's"
        )
    if launcher:
        from vqtriton.kernels.assign import assign_fwd

        return functools.partial(assign_fwd, x.z.detach(), x.codebook.detach())
    return functools.partial(vqt.assign, x.z, x.codebook, backend="triton")


PROVIDERS.update({
    f"latency-{mode}-{kind}": {
        "vqtriton": lambda x, ema=kind == "ema", train=mode == "step": _vq_pair(x, ema, False, train),
        "vqp": lambda x, ema=kind == "ema", train=mode == "step": _vq_pair(x, ema, True, train),
    }
    for mode in ("step", "eval")
    for kind in ("learned", "ema")
})
PROVIDERS["latency-assign"] = {name: PROVIDERS["assign"][name] for name in ("vqtriton", "cdist")}
PROVIDERS["latency-launch"] = {
    "vqtriton": lambda x: _host_launch(x, launcher=False),
    "launcher": lambda x: _host_launch(x, launcher=True),
}
LATENCY_OPS = tuple(op for op in PROVIDERS if op.startswith("latency-"))
# Ops timed as a forward only (under no_grad), and ops timed without the device sync after the call.
FORWARD_ONLY_OPS = ("assign", "topk", "sample", "latency-eval-learned", "latency-eval-ema", "latency-assign",
                    "latency-launch")
HOST_ONLY_OPS = ("latency-launch",)


# --- residual VQ: every level in one launch (issue 19) ----------------------------------------------------

RESIDUAL_LEVELS = 8  # a codec's 8 codebooks; level l's codes are the shape's codebook scaled by 0.5^l


def _residual_books(x: Inputs) -> torch.Tensor:
    """``[L, K, D]`` codebooks of shrinking scale, made outside the timed call."""
    c = x.codebook.detach()
    return torch.stack([c * 0.5**l for l in range(RESIDUAL_LEVELS)])


def _level_loop(x: Inputs, search):
    """The residual loop one level at a time, as ResidualVQ runs it without the fused op: ``search(r, c)``
    per level (an ``assign`` launch, or torch's cdist + argmin), the gather and the residual update."""
    books, z = _residual_books(x), x.z.detach()

    def run():
        r, z_q, idx = z, torch.zeros_like(z), []
        for c in books:
            i = search(r, c)
            q = c[i]
            r, z_q = r - q, z_q + q
            idx.append(i)
        return torch.stack(idx, -1), z_q

    return run


def _residual_fused(x: Inputs):
    books = _residual_books(x)
    return functools.partial(vqt.residual_assign, x.z.detach(), books, backend=_backend(x))


PROVIDERS["residual"] = {
    "vqtriton": _residual_fused,
    "assign-loop": lambda x: _level_loop(x, functools.partial(vqt.assign, backend=_backend(x))),
    "cdist-loop": lambda x: _with_tf32(False, _level_loop(x, cdist_assign)),
}
FORWARD_ONLY_OPS = (*FORWARD_ONLY_OPS, "residual")


# --- LFQ: a training step with its entropy loss (issue 18) ------------------------------------------------

# (N vectors, K = 2^d codes, d): the two shapes; vqp's softmax at the second is [2048, 262144].
LFQ_SHAPES = ((4096, 16384, 14), (2048, 262144, 18))
# vqp's step holds about this many [N, K] float32 tensors at once (measured with benchmarks/lfq_memory.py:
# 1.79 GiB at N = 4096, K = 2^14, and 1.72 GiB at N = 256, K = 2^18).
_VQP_LFQ_TENSORS = 7
# The most host memory a CPU run lets vqp's step take (the machine is shared): past it vqp is skipped.
_VQP_CPU_BUDGET = 4 * 2**30


def _lfq(x: Inputs, make, batched: bool = False):
    """One LFQ training step (output and loss) of the module ``make(d, K)`` on ``z [N, d]``."""
    d, k = x.dk
    if k != 2**d:
        raise Unavailable(f"an LFQ shape has K = 2^D codes, got K = {k} and D = {d}")
    return _layer(make(d, k), x, batched)


def _vqp_lfq(x: Inputs):
    need = _VQP_LFQ_TENSORS * x.z.shape[0] * x.codebook.shape[0] * 4
    if not x.z.is_cuda and need > _VQP_CPU_BUDGET:
        raise Unavailable(f"vqp's step builds [N, K] softmaxes: about {need / 2**30:.0f} GiB here (over this run's "
                          f"{_VQP_CPU_BUDGET / 2**30:.0f} GiB CPU budget)")
    return _lfq(x, lambda d, k: _import("vector_quantize_pytorch", "LFQ")(dim=d, codebook_size=k), batched=True)


PROVIDERS["lfq"] = {
    # The native module's exact entropies.
    "vqtriton": lambda x: _lfq(x, lambda d, k: vqt.LFQ(d, backend=_backend(x))),
    "vqtriton-compiled": lambda x: _lfq(
        x, lambda d, k: torch.compile(vqt.LFQ(d, backend=_backend(x)), fullgraph=True, dynamic=False)),
    # The drop-in with vqp's defaults (its clamped entropies, exact): the pair to vqp's.
    "vqtriton-compat": lambda x: _lfq(
        x, lambda d, k: _import("vqtriton.compat", "LFQ")(dim=d, codebook_size=k, backend=_backend(x)), batched=True),
    "vqp": _vqp_lfq,
}
# Ops with default shapes of their own.
OP_SHAPES = {"lfq": LFQ_SHAPES}


# --- residual VQ: a codec's training step, 8 levels (issue 17) -------------------------------------------

# (N, K, D) of each level: EnCodec / DAC-sized (8 levels of 1024 codes).
RVQ_SHAPES = ((16384, 1024, 128),)


def _rvq(module, x: Inputs, batched: bool = False):
    """One residual VQ training step (forward + backward) of ``module``; its per-level losses summed."""
    step = _layer(module, x, batched)

    def run():
        z_q, idx, loss = step()
        return z_q, idx, loss.sum()

    return run


def _rvq_kwargs(x: Inputs) -> dict:
    return dict(dim=x.dk[0], codebook_size=x.dk[1], num_quantizers=RESIDUAL_LEVELS)


PROVIDERS["rvq"] = {
    # The native module with vqp's defaults' equivalent (EMA decay 0.8, rotation trick, every level's gradient).
    "vqtriton": lambda x: _rvq(vqt.ResidualVQ(*x.dk, RESIDUAL_LEVELS, ema_decay=0.8, rotation_trick=True,
                                              output_gradient="every", backend=_backend(x)), x),
    "vqtriton-compat": lambda x: _rvq(_import("vqtriton.compat", "ResidualVQ")(**_rvq_kwargs(x), backend=_backend(x)), x,
                                      batched=True),
    "vqp": lambda x: _rvq(_import("vector_quantize_pytorch", "ResidualVQ")(**_rvq_kwargs(x)), x, batched=True),
}
OP_SHAPES["rvq"] = RVQ_SHAPES


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread while the block runs (per-call overhead, as issue 19 measured it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _backward(out, grad: torch.Tensor) -> None:
    """Backward from a forward's output: a VQ triple ``(z_q, idx, loss)``, a scalar or an [N, D] tensor."""
    if isinstance(out, tuple):
        torch.autograd.backward([out[0], out[2]], [grad, None])
    else:
        out.backward(None if out.dim() == 0 else grad)


def timed_callable(make, x: Inputs, backward: bool, device_sync: bool = True) -> Callable[[], Any]:
    """What is timed: the forward (+ backward), then a device sync (unless ``device_sync`` is False: the
    host's time only); returns the forward's output. Raises :class:`Unavailable` when the provider
    cannot run here."""
    forward = make(x)
    leaves = [t for t in (x.z, x.codebook, x.other) if t.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        with torch.set_grad_enabled(backward):
            out = forward()
            if backward:
                _backward(out, x.grad)
        if device_sync:
            sync()
        return out

    return run


# --- measuring ----------------------------------------------------------------------------------


def sync() -> None:
    """Waits for the GPU when CUDA is in use (never initialises it)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], warmup: int = 3, reps: int = 20, device_sync: bool = True) -> float:
    """Median wall time of ``fn()`` in ms, the device synchronised before and (with ``device_sync``)
    after each call: without it, the host's time only, the device work left queued outside the timer."""
    return time_ms_interleaved({"fn": fn}, warmup, reps, device_sync)["fn"]


def time_ms_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 3, reps: int = 20, device_sync: bool = True,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """:func:`time_ms` of several callables, timed in turns (one call of each, ``reps`` times over), so that
    the load of a shared machine falls on all of them alike and their ratios hold. ``clock``: wall time, or
    ``time.thread_time`` (the calling thread's CPU time: what a call costs on one thread, without the time
    the scheduler gives other processes)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            if device_sync:
                sync()
            times[name].append((clock() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mib(fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory during ``fn()`` above what was allocated before, in MiB; None off CUDA."""
    if not torch.cuda.is_initialized():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def reference_indices(z: torch.Tensor, codebook: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """float64 argmin of the squared distances (first index on ties), in row chunks of at most
    ``chunk_elems`` distances; both sides centred on the codebook mean so the addmm form stays accurate."""
    c = codebook.detach().to(torch.float64)
    mean = c.mean(0)
    c = c - mean
    c_sq = c.square().sum(1)
    rows = z.detach().reshape(-1, c.shape[1])
    step = max(1, chunk_elems // c.shape[0])
    parts = [
        torch.addmm(c_sq, rows[s : s + step].to(torch.float64) - mean, c.T, alpha=-2.0).argmin(1)
        for s in range(0, rows.shape[0], step)
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=z.device)


def mismatch_rate(indices: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, chunk_elems: int = 1 << 24) -> float:
    """Fraction of vectors whose index differs from the float64 argmin (0.0 for no vectors)."""
    ref = reference_indices(z, codebook, chunk_elems)
    if ref.numel() == 0:
        return 0.0
    return (indices.reshape(-1).to(ref.device) != ref).double().mean().item()


# --- the comparison report ----------------------------------------------------------------------


def _prepare(op: str, name: str, x: Inputs) -> tuple[dict, Callable[[], Any] | None]:
    """A report row and the provider's timed callable (None when it cannot run here: the row says why)."""
    row = {"op": op, "provider": name, "median_ms": None, "peak_mib": None, "mismatch": None, "skipped": None}
    try:
        run = timed_callable(
            PROVIDERS[op][name], x, backward=op not in FORWARD_ONLY_OPS, device_sync=op not in HOST_ONLY_OPS
        )
        row["peak_mib"] = peak_mib(run)  # the first call: compiles, warms up
    except (Unavailable, torch.OutOfMemoryError) as e:
        row["skipped"] = f"{type(e).__name__}: {e}"
        return row, None
    return row, run


def _measure_latency(op: str, names: list[str], x: Inputs, warmup: int, reps: int) -> list[dict]:
    """The rows of a latency op's providers at one shape: on one thread, timed in turns (same-run ratios
    that hold on a shared machine). On the CPU the clock is the thread's CPU time (:data:`LATENCY_CLOCK`)."""
    prepared = [_prepare(op, name, x) for name in names]
    runs = {row["provider"]: run for row, run in prepared if run is not None}
    clock = time.perf_counter if x.z.is_cuda else LATENCY_CLOCK
    with one_thread():
        medians = time_ms_interleaved(runs, warmup, reps, device_sync=op not in HOST_ONLY_OPS, clock=clock)
    return [{**row, "median_ms": medians.get(row["provider"])} for row, _ in prepared]


def _measure(op: str, name: str, x: Inputs, warmup: int, reps: int) -> dict:
    row, run = _prepare(op, name, x)
    if run is None:
        return row
    row["median_ms"] = time_ms(run, warmup, reps)
    out = run()
    if op == "assign" and isinstance(out, torch.Tensor) and out.dtype == torch.int64:
        row["mismatch"] = mismatch_rate(out, *_assign_inputs(PROVIDERS[op][name](x), x))
    return row


def _assign_inputs(forward, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(z, codebook)`` an assign provider really compares: a provider that casts its inputs
    (bf16 inputs) is judged against the float64 argmin of what it was given, not of the fp32 data."""
    if isinstance(forward, functools.partial) and len(forward.args) >= 2:
        return forward.args[0], forward.args[1]
    return x.z, x.codebook


def _add_ratios(rows: list[dict]) -> None:
    """ratio = provider median / vqtriton median at the same op and shape (> 1: vqtriton is faster)."""
    ref = {(r["op"], tuple(r["shape"])): r["median_ms"] for r in rows if r["provider"] == "vqtriton"}
    for r in rows:
        base = ref.get((r["op"], tuple(r["shape"])))
        r["ratio"] = r["median_ms"] / base if r["median_ms"] is not None and base else None


def _meta(device: torch.device, warmup: int, reps: int) -> dict:
    import triton

    cuda = device.type == "cuda"
    note = "GPU run." if cuda else (
        "CPU run (vqtriton on its torch backend, tiny shapes): checks the machinery only, "
        "GPU numbers need a GPU; TF32 flags do nothing on the CPU."
    )
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    versions = dict(torch=torch.__version__, triton=triton.__version__)
    return dict(device=name, **versions, date=date, warmup=warmup, reps=reps, note=note)


def _table(title: str, rows: list[dict], cell: Callable[[dict], str]) -> str:
    names = list(dict.fromkeys(r["provider"] for r in rows))
    shapes = list(dict.fromkeys(shape_id(r["shape"]) for r in rows))
    by_key = {(shape_id(r["shape"]), r["provider"]): r for r in rows}
    grid = [["shape", *names]] + [[s, *(cell(by_key[s, n]) for n in names)] for s in shapes]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    lines = [[line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:])] for line in grid]
    return "\n".join([title, *("  ".join(line) for line in lines)])


def _time_cell(r: dict) -> str:
    if r["median_ms"] is None:
        return "skip"
    return f"{r['median_ms']:.3f}" + ("" if r["ratio"] is None else f" ({r['ratio']:.2f}x)")


def _number_cell(key: str, fmt: str) -> Callable[[dict], str]:
    return lambda r: "-" if r[key] is None else format(r[key], fmt)


# The report's other tables: (row key, title, number format).
_EXTRA_TABLES = (
    ("peak_mib", "peak MiB above the inputs", ".0f"),
    ("mismatch", "index mismatch rate vs float64 argmin", ".2e"),
)


def format_report(report: dict) -> str:
    """The report as aligned text: per op, median ms with ratios, then peak memory and mismatch rates."""
    meta, out = report["meta"], []
    out.append(f"vqtriton bench: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}")
    out.append(meta["note"])
    for op in dict.fromkeys(r["op"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["op"] == op]
        mode = "host time per call" if op in HOST_ONLY_OPS else "forward" if op in FORWARD_ONLY_OPS else "forward + backward"
        out.append(_table(f"\n{op} ({mode}): median ms (ratio to vqtriton; > 1: vqtriton is faster)", rows, _time_cell))
        for key, title, fmt in _EXTRA_TABLES:
            if any(r[key] is not None for r in rows):
                out.append(_table(f"\n{op}: {title}", rows, _number_cell(key, fmt)))
    out.append("")
    for r in (r for r in report["rows"] if r["skipped"]):
        out.append(f"skipped {r['op']}/{r['provider']} {shape_id(r['shape'])}: {r['skipped']}")
    return "\n".join(out)


def _plot(report: dict, path: Path) -> None:
    """Grouped bars of the median ms per shape and provider, one log-scale panel per op."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state; saves through Agg

    ops = list(dict.fromkeys(r["op"] for r in report["rows"] if r["median_ms"]))  # an op with no timed row has no panel
    fig = Figure(figsize=(12, 3.6 * max(1, len(ops))), layout="constrained")
    for ax, op in zip(fig.subplots(max(1, len(ops)), 1, squeeze=False)[:, 0], ops):
        rows = [r for r in report["rows"] if r["op"] == op]
        names = list(dict.fromkeys(r["provider"] for r in rows))
        shapes = list(dict.fromkeys(shape_id(r["shape"]) for r in rows))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ms = {shape_id(r["shape"]): r["median_ms"] for r in rows if r["provider"] == name}
            xs = [i + (j - (len(names) - 1) / 2) * width for i, s in enumerate(shapes) if ms.get(s)]
            ax.bar(xs, [ms[s] for s in shapes if ms.get(s)], width, label=name)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"{op} — {report['meta']['device']}")
        ax.legend(fontsize="small", ncols=min(len(names), 4))
    fig.savefig(path, dpi=100)


def run_report(device, shapes=None, out_dir=".", providers=None, *, warmup=None, reps=None, ops=None) -> dict:
    """Times every provider of the ``ops`` (default :data:`REPORT_OPS`; ``"latency"`` stands for
    :data:`LATENCY_OPS`) at every shape in one run, prints the tables, writes
    ``report.json`` and ``report.png`` into ``out_dir`` and returns the report:
    ``{"meta": {...}, "rows": [{op, provider, shape, median_ms, ratio, peak_mib, mismatch, skipped}]}``.
    ``providers`` (default: all) picks providers by name (``"vqtriton"``) or op and name (``"assign/cdist"``).
    The latency ops run at :data:`LATENCY_SHAPES` unless ``shapes`` are given, on one torch thread.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    ops = [o for op in (ops or REPORT_OPS) for o in (LATENCY_OPS if op == "latency" else (op,))]
    unknown = [op for op in ops if op not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; the ops are {list(PROVIDERS)} and 'latency'")
    warmup = warmup if warmup is not None else (3 if cuda else 2)
    reps = reps if reps is not None else (20 if cuda else 5)
    rows = []
    for op in ops:
        default = LATENCY_SHAPES if op in LATENCY_OPS else OP_SHAPES.get(op) or default_shapes(device)
        for shape in [tuple(s) for s in (shapes or default)]:
            x = make_inputs(shape, device, requires_grad=op not in FORWARD_ONLY_OPS)
            names = [n for n in PROVIDERS[op] if providers is None or n in providers or f"{op}/{n}" in providers]
            if op in LATENCY_OPS:
                rows.extend({**row, "shape": list(shape)} for row in _measure_latency(op, names, x, warmup, reps))
                continue
            for name in names:
                rows.append({**_measure(op, name, x, warmup, reps), "shape": list(shape)})
                if cuda:  # hand the memory back before the next provider
                    gc.collect()
                    torch.cuda.empty_cache()
    _add_ratios(rows)
    report = {"meta": _meta(device, warmup, reps), "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "report.png")
    print(format_report(report))
    return report
