"""Squared error ``sum_j (a - b)^2``: per row, as a total, and the backward ``2 (a - b) g``.

All arithmetic is fp32 whatever the input dtype. The total is a deterministic two-stage
reduction: each program of a pinned tile shape writes the sum of its rows, then one program adds
those partials in a fixed order. The stop-gradients of the VQ losses (which side gets ``-g``, or
nothing) are decided by the caller; ``sqerr_backward`` returns the gradient for ``a``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqtriton.kernels import block_d, row_major, row_tile, tile_configs, tile_rows

__all__ = ["sqerr_rows", "sqerr_sum", "sqerr_backward"]

# The total's first stage runs one pinned tile size (elements) and warp count, so its partials
# (hence the total's bits) depend on D alone, never on which config an autotuner picked.
_SUM_TILE = 4096
_SUM_WARPS = 4
# The second stage reads partials in chunks of this many, in one program.
_PARTIALS_BLOCK = 1024


@triton.jit
def _sqerr_fwd_kernel(
    p_a,
    p_b,
    p_out,
    N,
    D,
    stride_a,
    stride_b,
    REDUCE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < N
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # [BN, BD]
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)  # [BD]
        m = m_n[:, None] & (o_d < D)[None, :]  # [BN, BD]
        b_a = tl.load(p_a + o_n[:, None] * stride_a + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_b = tl.load(p_b + o_n[:, None] * stride_b + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_diff = b_a - b_b  # [BN, BD]
        b_acc += b_diff * b_diff
    b_rows = tl.sum(b_acc, axis=1)  # [BN]
    if REDUCE:
        tl.store(p_out + i_n, tl.sum(b_rows, axis=0))
    else:
        tl.store(p_out + o_n, b_rows, mask=m_n)


_sqerr_rows_kernel = triton.autotune(configs=tile_configs([(4096, 4), (8192, 8), (2048, 4)]), key=["D"])(
    tile_rows(_sqerr_fwd_kernel)
)


@triton.jit
def _sum_partials_kernel(p_x, p_out, P, BLOCK: tl.constexpr):
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)  # [B]
    for s in range(0, P, BLOCK):
        o = s + tl.arange(0, BLOCK)  # [B]
        b_acc += tl.load(p_x + o, mask=o < P, other=0.0)
    tl.store(p_out, tl.sum(b_acc, axis=0))


@triton.autotune(configs=tile_configs([(4096, 4), (8192, 8), (2048, 4)]), key=["D", "PER_ROW"])
@tile_rows
@triton.jit
def _sqerr_bwd_kernel(
    p_a,
    p_b,
    p_g,
    p_out,
    N,
    D,
    stride_a,
    stride_b,
    stride_g,
    stride_out,
    PER_ROW: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_n, o_d, m_n, m_d = row_tile(N, D, BLOCK_N, BLOCK_D)
    m = m_n[:, None] & m_d[None, :]  # [BN, BD]
    b_a = tl.load(p_a + o_n[:, None] * stride_a + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_b = tl.load(p_b + o_n[:, None] * stride_b + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    if PER_ROW:
        b_g = tl.load(p_g + o_n * stride_g, mask=m_n, other=0.0)[:, None]  # [BN, 1]
    else:
        # The total's gradient stays on the device: no host sync to read it.
        b_g = tl.load(p_g)
    b_out = 2.0 * (b_a - b_b) * b_g  # [BN, BD]
    tl.store(p_out + o_n[:, None] * stride_out + o_d[None, :], b_out.to(p_out.dtype.element_ty), mask=m)


def sqerr_rows(a: Tensor, b: Tensor) -> Tensor:
    """``sum_j (a - b)^2`` for each row of ``a, b [N, D]``: float32 ``[N]``, fp32 accumulation."""
    n, d = a.shape
    if n == 0 or d == 0:
        # No launch: a zero-width tile would divide by zero; the sum over no elements is 0.
        return torch.zeros(n, dtype=torch.float32, device=a.device)
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    a, b = row_major(a), row_major(b)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _sqerr_rows_kernel[grid](a, b, out, n, d, a.stride(0), b.stride(0), REDUCE=False, BLOCK_D=block_d(d))
    return out


def sqerr_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum (a - b)^2`` over all of ``a, b [N, D]``: a float32 0-dim tensor.

    Deterministic: per-program partials of a pinned tile shape, then one program sums them in a
    fixed order; the same inputs give the same bits on every run.
    """
    n, d = a.shape
    if n == 0 or d == 0:
        return torch.zeros((), dtype=torch.float32, device=a.device)
    a, b = row_major(a), row_major(b)
    bd = block_d(d)
    rows = max(1, _SUM_TILE // bd)
    num_partials = triton.cdiv(n, rows)
    partials = torch.empty(num_partials, dtype=torch.float32, device=a.device)
    _sqerr_fwd_kernel[(num_partials,)](
        a,
        b,
        partials,
        n,
        d,
        a.stride(0),
        b.stride(0),
        REDUCE=True,
        TILE=_SUM_TILE,
        BLOCK_N=rows,
        BLOCK_D=bd,
        num_warps=_SUM_WARPS,
    )
    out = torch.empty((), dtype=torch.float32, device=a.device)
    _sum_partials_kernel[(1,)](partials, out, num_partials, BLOCK=_PARTIALS_BLOCK)
    return out


def sqerr_backward(a: Tensor, b: Tensor, grad: Tensor) -> Tensor:
    """``2 (a - b) * grad`` in ``a.dtype``, fp32 math: the gradient of the squared error for ``a``.

    ``grad`` is float32 on the device: 0-dim (gradient of the total) or ``[N]`` (one per row, any
    stride, e.g. an expanded tensor). The gradient for ``b`` is its negation (the caller's job).
    """
    n, d = a.shape
    out = torch.empty(n, d, dtype=a.dtype, device=a.device)
    if n == 0 or d == 0:
        return out
    a, b = row_major(a), row_major(b)
    per_row = grad.dim() == 1
    assert per_row or grad.dim() == 0, f"grad must be 0-dim or [N], got {tuple(grad.shape)}"
    grad = grad.to(torch.float32)
    stride_g = grad.stride(0) if per_row else 0
    bd = block_d(d)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, bd))

    _sqerr_bwd_kernel[grid](
        a, b, grad, out, n, d, a.stride(0), b.stride(0), stride_g, out.stride(0), PER_ROW=per_row, BLOCK_D=bd
    )
    return out
