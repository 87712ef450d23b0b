"""Which implementation runs an op: the Triton kernels or the portable PyTorch code.

- CUDA tensors run the compiled Triton kernels.
- CPU tensors run the same Triton kernels when Triton's interpreter is on (``TRITON_INTERPRET=1``
  set before triton is imported, as the test suite does on machines without a GPU), else the
  chunked PyTorch code of :mod:`vqtriton.torch_ops`.
- ``float64`` tensors always take the PyTorch path (the kernels accumulate in fp32).
- ``VQTRITON_BACKEND=triton|torch``, or a ``backend=`` argument, forces one; a forced backend that
  cannot run says why.

Nothing here queries CUDA at import time.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

__all__ = ["BACKENDS", "KERNEL_DTYPES", "choose", "ops"]

BACKENDS = ("triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _requested(backend: str | None) -> str | None:
    name = backend if backend is not None else os.environ.get("VQTRITON_BACKEND") or None
    if name is None:
        return None
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or unset), got {name!r}")
    return name


def _triton_blocker(tensors) -> str | None:
    """Why the Triton kernels cannot run on these tensors, or None when they can."""
    try:
        from vqtriton.kernels import interpreting
    except ImportError as e:  # pragma: no cover - triton is a dependency
        return f"triton is not importable: {e}"
    for t in tensors:
        if t.is_floating_point() and t.dtype not in KERNEL_DTYPES:
            return f"the Triton kernels take float32/float16/bfloat16 tensors, got {t.dtype}"
        if t.device.type == "cpu" and not interpreting():
            return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
        if t.device.type not in ("cpu", "cuda"):
            return f"the Triton kernels run on CUDA (or the CPU interpreter), got device {t.device}"
    return None


def choose(*tensors: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for an op on ``tensors`` (see the module docstring)."""
    name = _requested(backend)
    if name == "torch":  # runs anywhere: no need to ask what would stop the kernels (a per-call cost)
        return name
    blocker = _triton_blocker(tensors)
    if name == "triton" and blocker is not None:
        raise RuntimeError(f"backend 'triton' was requested but cannot run: {blocker}")
    if name is not None:
        return name
    return "torch" if blocker is not None else "triton"


@functools.cache
def _triton_ops() -> SimpleNamespace:
    from vqtriton.kernels import assign, gather, lfq, quantize, residual, sample, sqerr, stats, topk

    return SimpleNamespace(
        assign_fwd=assign.assign_fwd,
        topk_fwd=topk.topk_fwd,
        sample_fwd=sample.sample_fwd,
        gather=gather.gather,
        scatter_add=gather.scatter_add,
        sqerr_rows=sqerr.sqerr_rows,
        sqerr_sum=sqerr.sqerr_sum,
        sqerr_backward=sqerr.sqerr_backward,
        code_stats=stats.code_stats,
        quantize_backward=quantize.quantize_backward,
        lfq_halves=lfq.lfq_halves,
        lfq_halves_backward=lfq.lfq_halves_backward,
        distribution_entropy=lfq.distribution_entropy,
        distribution_entropy_grad=lfq.distribution_entropy_grad,
        residual_assign_fwd=residual.residual_assign_fwd,
        residual_backward=residual.residual_backward,
        residual_stats=residual.residual_stats,
    )


@functools.cache
def ops(name: str):
    """The launchers of a backend: ``vqtriton.torch_ops`` or the Triton kernels, same signatures. (Cached:
    every op call asks; an unknown name raises each time, never cached.)"""
    if name == "torch":
        from vqtriton import torch_ops

        return torch_ops
    if name == "triton":
        return _triton_ops()
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
