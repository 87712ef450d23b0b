"""The PyTorch path of LFQ's entropy launchers (:mod:`vqtriton.kernels.lfq`): same signatures, same
results, for CPU tensors without Triton's interpreter and for float64.

A half-code distribution is built as a Kronecker product, one bit at a time (``[.., 2^i] x [2]``,
the new bit the least significant): ``2^(k+1)`` multiplies of exact sigmoids, each entry exact to a few
ulps (as the kernel's product; ``exp`` of a summed surprisal would be off by about ``L`` ulps), no
``[N, 2^d]``. Float32 inputs compute in float32, float64 in float64.

Probabilities below ``FLUSH = 2^-62`` (factors, partial products and weighted entries alike) are set to
0, on both backends: then every product of two of them, in the Kronecker steps and in the GEMM ``A^T B``,
is a normal float32 (at least ``2^-124``). Subnormal
operands make a CPU's multiplies about a hundred times slower; the values dropped change an entry of
the batch distribution by at most ``2^-62`` times the rows' weights (``2e-19``) and an entropy by less
than that times ``2^d * 43``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lfq_halves", "lfq_halves_backward", "distribution_entropy", "distribution_entropy_grad",
           "half_bits", "surprisals", "flush", "flushed_exp", "FLUSH", "clamped_entropy_terms"]

FLUSH = 2.0**-62
_FLUSH_SURPRISAL = -math.log(FLUSH)


def flush(p: Tensor) -> Tensor:
    """``p`` with its entries below ``FLUSH`` set to 0 (see the module docstring)."""
    return torch.where(p < FLUSH, 0.0, p)


def flushed_exp(surprisal: Tensor) -> Tensor:
    """``exp(-L)``, 0 where it is below ``FLUSH`` (``L > 62 log 2``)."""
    return torch.where(surprisal < _FLUSH_SURPRISAL, torch.exp(-surprisal), 0.0)


def half_bits(k: int, device, dtype) -> Tensor:
    """``[2^k, k]`` 0/1 in ``dtype``: the bits of each half-code, its first bit most significant."""
    a = torch.arange(1 << k, device=device)
    return ((a[:, None] >> torch.arange(k - 1, -1, -1, device=device)) & 1).to(dtype)


def surprisals(v: Tensor) -> Tensor:
    """``-log p`` ``[..., 2^k]`` of every half-code of bit logits ``v [..., k]``: bit 0 costs ``softplus(v_i)``,
    bit 1 ``softplus(-v_i)`` (exact to a few ulps, also for ``p`` near 1). ``k = 0`` gives ``[..., 1]`` zeros."""
    bits = half_bits(v.shape[-1], v.device, v.dtype)
    return F.softplus(v) @ (1 - bits).T + F.softplus(-v) @ bits.T


def lfq_halves(u: Tensor, w: Tensor | None, bit0: int, k: int) -> Tensor:
    """``[H, N, 2^k]``: ``w[n] prod_i sigma(+-u[h, n, bit0 + i])`` (see :func:`vqtriton.kernels.lfq.lfq_halves`)."""
    v = u[..., bit0 : bit0 + k]
    p = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    for i in range(k):
        pair = flush(torch.stack([torch.sigmoid(-v[..., i]), torch.sigmoid(v[..., i])], -1))  # [..., 2]: bit 0, 1
        p = flush((p[..., :, None] * pair[..., None, :]).flatten(-2))
    return p if w is None else flush(p * w.to(p.dtype)[:, None])


def lfq_halves_backward(u: Tensor, p: Tensor, dp: Tensor, bit0: int, k: int) -> Tensor:
    """``[H, N, k]``: ``sigma(-u_i) S1_i - sigma(u_i) S0_i``, ``S1 = (p dp) @ bits``, ``S0 = (p dp) @ (1 - bits)``."""
    v = u[..., bit0 : bit0 + k]
    bits = half_bits(k, u.device, p.dtype)
    w = p * dp
    return torch.sigmoid(-v) * (w @ bits) - torch.sigmoid(v) * (w @ (1 - bits))


def _floor(m: Tensor, eps: float) -> float:
    return eps if eps > 0 else torch.finfo(m.dtype).tiny


def distribution_entropy(m: Tensor, eps: float) -> Tensor:
    """``-sum m log max(m, eps)`` per row of ``m [H, M]`` (``eps = 0``: exact, ``0 log 0 = 0``): ``[H]``."""
    return -(m * m.clamp_min(_floor(m, eps)).log()).sum(-1)


def distribution_entropy_grad(m: Tensor, g: Tensor, eps: float) -> Tensor:
    """``g[h] (-log max(m, eps) - [m >= eps])`` (exact: ``-log m - 1``, ``m`` floored at the smallest normal)."""
    inside = (m >= eps).to(m.dtype) if eps > 0 else 1.0
    return -(m.clamp_min(_floor(m, eps)).log() + inside) * g.to(m.dtype)[:, None]


# Rows of a chunk of the clamped entropy times 2^(d/2): each of its ~15 temporaries holds this many floats.
_CLAMP_CHUNK_ELEMS = 1 << 18


def _clamped_side(la: Tensor, a: Tensor, lb: Tensor, b: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """For every half-code ``a`` of one side: ``E_B[min(L_A + L_B, lam)]`` and ``E_B[g(L_A + L_B)]`` with
    ``g(L) = min(L, lam) - [L < lam]``, from one sort of the other side's surprisals ``lb`` (masses ``b``)
    and prefix sums, for all thresholds ``lam - L_A`` by a ``searchsorted``. Shapes ``[R, M_A]``."""
    lb_sorted, order = lb.sort(-1)
    b_sorted = b.gather(-1, order)
    zero = torch.zeros_like(lb_sorted[..., :1])
    below = torch.cat([zero, b_sorted.cumsum(-1)], -1)  # mass of the k smallest L_B
    below_l = torch.cat([zero, torch.where(b_sorted > 0, b_sorted * lb_sorted, 0.0).cumsum(-1)], -1)
    tail = torch.cat([b_sorted.flip(-1).cumsum(-1).flip(-1), zero], -1)  # mass of the rest
    k = torch.searchsorted(lb_sorted.contiguous(), (lam - la).contiguous())  # #{b: L_A + L_B < lam}
    p_k, s_k, t_k = below.gather(-1, k), below_l.gather(-1, k), tail.gather(-1, k)
    value = torch.where(a > 0, la * p_k + s_k + lam * t_k, 0.0)  # min(L, lam): L below lam, lam above
    return value, torch.where(a > 0, value - p_k, 0.0)


def clamped_entropy_terms(u: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """vqp's clamped per-sample entropy ``E_p[min(L, -log eps)]`` of each row of bit logits ``u [H, N, d]``:
    ``(rows [H, N], g_a [H, N, 2^s], g_b [H, N, 2^(d-s)])`` (``s = d // 2``) with ``g_a = E_B[g(L)]`` per
    half-code of A (``g_b`` per half-code of B), ``g(L) = min(L, lam) - [L < lam]``: the gradient is
    ``du_i = sum_a A_a (b_i(a) - sigma(u_i)) g_a(a)`` for A's bits (the halves' backward with ``dp = g_a``),
    likewise for B's. A row costs two sorts and two searchsorted of ``2^(d/2)`` entries; rows go in chunks,
    so the temporaries hold at most ``_CLAMP_CHUNK_ELEMS`` floats each."""
    lam = -math.log(eps)
    h, n, d = u.shape
    s = d // 2
    ma, mb = 1 << s, 1 << (d - s)
    rows = u.new_empty(h, n)
    g_a, g_b = u.new_empty(h, n, ma), u.new_empty(h, n, mb)
    step = max(1, _CLAMP_CHUNK_ELEMS // max(ma, mb))
    for r in range(0, n, step):
        v = u[:, r : r + step]
        la, lb = surprisals(v[..., :s]), surprisals(v[..., s:])
        a, b = flushed_exp(la), flushed_exp(lb)
        value, g_a[:, r : r + step] = _clamped_side(la, a, lb, b, lam)
        rows[:, r : r + step] = (a * value).sum(-1)
        g_b[:, r : r + step] = _clamped_side(lb, b, la, a, lam)[1]
    return rows, g_a, g_b
