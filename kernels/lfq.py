"""LFQ's entropy terms without the ``N x 2^d`` softmax: the half-code distributions, their backward, and
the entropy of a distribution over ``2^d`` codes.

The softmax over LFQ's sign codes is a product of independent bits, ``p(c | x) = prod_i sigma(+-u_i)``
(``u`` the bit logits), so with the bits split in two halves a vector's distribution is the outer
product ``A[a] B[b]`` of two half-code distributions of ``2^(d/2)`` entries each, and the batch mean is
one GEMM, ``A^T B`` (done by ``torch.bmm`` between these launches; cuBLAS on a GPU). The kernels are
what the GEMM leaves:

- ``lfq_halves``: ``A[h, n, a] = w[n] prod_i sigma(+-u[h, n, bit0 + i])`` for every half-code ``a``,
  the sign of bit ``i`` given by bit ``k - 1 - i`` of ``a`` (first channel most significant). A product
  of sigmoids, no log: each factor is exact to a few ulps, so is the product. Factors, partial products
  and the weighted result below ``2^-62`` are set to 0, as on the torch path (:mod:`vqtriton.entropy_torch`:
  no subnormal operand reaches the GEMM).
- ``lfq_halves_backward``: ``du_i = sigma(-u_i) S1_i - sigma(u_i) S0_i`` with ``S1_i = sum_{a: b_i = 1}
  A dA`` and ``S0_i = sum_{a: b_i = 0} A dA`` (two ``tl.dot`` with the 0/1 bit matrix; the difference
  form ``sum A dA b_i - sigma(u_i) sum A dA`` would cancel for confident bits).
- ``distribution_entropy`` / ``_grad``: ``-sum p log max(p, eps)`` per row of ``[H, M]`` (``eps = 0``:
  the exact ``-sum p log p``, ``0 log 0 = 0``), a deterministic two-stage sum (pinned tiles, then
  ``torch.sum`` of the partials), and its gradient ``-log max(p, eps) - [p >= eps]`` (exact:
  ``-log p - 1``, with ``p`` floored at float32's smallest normal so that an underflowed ``p`` gives a
  finite value: it is multiplied by ``A``, ``B`` entries at most as small).

All arithmetic is fp32 (inputs are fp32). ``u`` is ``[H, N, d]`` with any head and row strides and a
unit-stride last dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqtriton.kernels import interpreting, tune_configs

__all__ = ["lfq_halves", "lfq_halves_backward", "distribution_entropy", "distribution_entropy_grad"]

# The backward's half-code tile: pinned, so each row's sums are added in one order whatever the config.
# 16 on a GPU: its fp32 "ieee" dots run on CUDA cores, and with 32 or 64 codes a tile some configs spilled
# on sm_90 (8-312 B, benchmarks/resources.py; none with 16, at 87-143 registers). The interpreter pays per
# block operation: there a wider tile (its sums' order is numpy's anyway).
_BWD_BLOCK_A = 16
_BWD_BLOCK_A_INTERPRETER = 64
# tl.dot needs every block dim >= 16: the bits of one half (k <= 16, so d <= 32) fit one tile.
_BLOCK_K = 16
# The entropy's first stage: pinned tile and warps, so its partials (hence the bits of the sum) depend
# on M alone.
_ENTROPY_BLOCK = 4096
_ENTROPY_WARPS = 4


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for x < -88: 1 / inf = 0, the underflowed true value.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _flush(p):
    # 2^-62: the torch path's FLUSH.
    return tl.where(p < 2.168404344971009e-19, 0.0, p)


@triton.autotune(
    configs=tune_configs(
        [triton.Config({"BLOCK_N": bn, "BLOCK_A": ba}, num_warps=w) for bn, ba, w in
         ((32, 64, 4), (16, 128, 4), (32, 128, 8), (64, 64, 8))],
        triton.Config({"BLOCK_N": 64, "BLOCK_A": 256}, num_warps=4),
    ),
    key=["K", "HAS_W"],
)
@triton.jit
def _lfq_halves_kernel(
    p_u,
    p_w,
    p_out,
    N,
    bit0,
    K,
    stride_uh,
    stride_un,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    i_n, i_a, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    M = 1 << K
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    o_a = i_a * BLOCK_A + tl.arange(0, BLOCK_A)  # [BA]
    m_n, m_a = o_n < N, o_a < M
    p_row = p_u + i_h * stride_uh + o_n * stride_un + bit0  # [BN]
    b_p = tl.full([BLOCK_N, BLOCK_A], 1.0, dtype=tl.float32)  # [BN, BA]
    for i in range(K):
        b_u = tl.load(p_row + i, mask=m_n, other=0.0).to(tl.float32)  # [BN]
        b_bit = ((o_a >> (K - 1 - i)) & 1) == 1  # [BA]
        b_p = _flush(b_p * tl.where(b_bit[None, :], _flush(_sigmoid(b_u))[:, None], _flush(_sigmoid(-b_u))[:, None]))
    if HAS_W:
        b_p = _flush(b_p * tl.load(p_w + o_n, mask=m_n, other=0.0)[:, None])
    p_o = p_out + (i_h * N + o_n[:, None]) * M + o_a[None, :]
    tl.store(p_o, b_p, mask=m_n[:, None] & m_a[None, :])


@triton.autotune(
    configs=tune_configs(
        [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((32, 4), (16, 4), (32, 8), (64, 8), (16, 2))],
        triton.Config({"BLOCK_N": 64}, num_warps=4),
    ),
    key=["K"],
)
@triton.jit
def _lfq_halves_bwd_kernel(
    p_u,
    p_p,
    p_dp,
    p_du,
    N,
    bit0,
    K,
    stride_uh,
    stride_un,
    BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_n, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    M = 1 << K
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    o_k = tl.arange(0, BLOCK_K)  # [BK]
    m_n, m_k = o_n < N, o_k < K
    shift = tl.maximum(K - 1 - o_k, 0)  # [BK]; padded bits are masked below
    b_s1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # [BN, BK]
    b_s0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # [BN, BK]
    p_rows = (i_h * N + o_n) * M  # [BN]
    for a0 in range(0, M, BLOCK_A):
        o_a = a0 + tl.arange(0, BLOCK_A)  # [BA]
        m = m_n[:, None] & (o_a < M)[None, :]  # [BN, BA]
        b_p = tl.load(p_p + p_rows[:, None] + o_a[None, :], mask=m, other=0.0)  # [BN, BA]
        b_dp = tl.load(p_dp + p_rows[:, None] + o_a[None, :], mask=m, other=0.0)  # [BN, BA]
        b_w = b_p * b_dp  # [BN, BA]
        b_one = (((o_a[:, None] >> shift[None, :]) & 1) == 1) & m_k[None, :]  # [BA, BK]
        b_zero = (((o_a[:, None] >> shift[None, :]) & 1) == 0) & m_k[None, :]  # [BA, BK]
        b_s1 = tl.dot(b_w, b_one.to(tl.float32), b_s1, input_precision="ieee")
        b_s0 = tl.dot(b_w, b_zero.to(tl.float32), b_s0, input_precision="ieee")
    m = m_n[:, None] & m_k[None, :]  # [BN, BK]
    p_row = p_u + i_h * stride_uh + o_n * stride_un + bit0  # [BN]
    b_u = tl.load(p_row[:, None] + o_k[None, :], mask=m, other=0.0).to(tl.float32)  # [BN, BK]
    b_du = _sigmoid(-b_u) * b_s1 - _sigmoid(b_u) * b_s0
    tl.store(p_du + (i_h * N + o_n[:, None]) * K + o_k[None, :], b_du, mask=m)


@triton.jit
def _entropy_kernel(p_m, p_g, p_out, M, eps, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # One flat grid axis (row-major over [H, blocks]): axis 1's 65535 would cap the rows a caller may pass.
    n_blocks = tl.cdiv(M, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    i_h, i_b = pid // n_blocks, pid % n_blocks
    o = i_b * BLOCK + tl.arange(0, BLOCK)  # [B]
    m_o = o < M
    b_m = tl.load(p_m + i_h * M + o, mask=m_o, other=0.0)  # [B]
    # The log's floor: eps, or float32's smallest normal for the exact form.
    b_log = tl.log(tl.maximum(b_m, tl.maximum(eps, 1.1754943508222875e-38)))  # [B]
    if GRAD:
        b_in = tl.where(eps > 0, (b_m >= eps).to(tl.float32), 1.0)  # [B]
        tl.store(p_out + i_h * M + o, -(b_log + b_in) * tl.load(p_g + i_h), mask=m_o)
    else:
        # p = 0 gives 0 * log(floor) = 0: the exact form's 0 log 0.
        tl.store(p_out + pid, -tl.sum(b_m * b_log, axis=0))  # partials [H, blocks]


def _u_strides(u: Tensor) -> Tensor:
    return u if u.stride(-1) == 1 else u.contiguous()


def lfq_halves(u: Tensor, w: Tensor | None, bit0: int, k: int) -> Tensor:
    """``[H, N, 2^k]`` float32: the distribution of bits ``bit0 .. bit0 + k - 1`` of bit logits ``u [H, N, d]``
    (float32), times ``w [N]`` when given (float32 row weights). ``k = 0`` gives ``w`` (or ones)."""
    u = _u_strides(u)
    h, n, _ = u.shape
    m = 1 << k
    out = torch.empty(h, n, m, dtype=torch.float32, device=u.device)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_A"]), h)

    _lfq_halves_kernel[grid](u, u if w is None else w, out, n, bit0, k, u.stride(0), u.stride(1), HAS_W=w is not None)
    return out


def lfq_halves_backward(u: Tensor, p: Tensor, dp: Tensor, bit0: int, k: int) -> Tensor:
    """``[H, N, k]`` float32: the gradient reaching bits ``bit0 .. bit0 + k - 1`` of ``u [H, N, d]`` from the
    gradient ``dp [H, N, 2^k]`` of the half distribution ``p = lfq_halves(u, w, bit0, k)`` (``w`` included)."""
    if k > _BLOCK_K:
        raise ValueError(f"a half of at most {_BLOCK_K} bits (d <= {2 * _BLOCK_K}), got {k}")
    u = _u_strides(u)
    h, n, _ = u.shape
    out = torch.empty(h, n, k, dtype=torch.float32, device=u.device)
    if out.numel() == 0:
        return out
    p, dp = p.contiguous(), dp.contiguous()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), h)

    _lfq_halves_bwd_kernel[grid](
        u, p, dp, out, n, bit0, k, u.stride(0), u.stride(1),
        BLOCK_A=_BWD_BLOCK_A_INTERPRETER if interpreting() else _BWD_BLOCK_A, BLOCK_K=_BLOCK_K
    )
    return out


def distribution_entropy(m: Tensor, eps: float) -> Tensor:
    """``-sum_c m log max(m, eps)`` of each row of ``m [H, M]`` (float32; ``eps = 0``: exact): float32 ``[H]``."""
    h, size = m.shape
    m = m.contiguous()
    blocks = triton.cdiv(size, _ENTROPY_BLOCK)
    partials = torch.empty(h, blocks, dtype=torch.float32, device=m.device)
    if partials.numel():
        _entropy_kernel[(h * blocks,)](m, m, partials, size, eps, GRAD=False, BLOCK=_ENTROPY_BLOCK,
                                     num_warps=_ENTROPY_WARPS)
    return partials.sum(1)


def distribution_entropy_grad(m: Tensor, g: Tensor, eps: float) -> Tensor:
    """``g[h] d/dm`` of :func:`distribution_entropy`: float32 ``[H, M]`` (``g [H]`` float32)."""
    h, size = m.shape
    m, g = m.contiguous(), g.to(torch.float32).contiguous()
    out = torch.empty(h, size, dtype=torch.float32, device=m.device)
    if out.numel():
        _entropy_kernel[(h * triton.cdiv(size, _ENTROPY_BLOCK),)](m, g, out, size, eps, GRAD=True,
                                                                 BLOCK=_ENTROPY_BLOCK, num_warps=_ENTROPY_WARPS)
    return out
