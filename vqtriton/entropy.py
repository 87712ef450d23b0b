"""LFQ's entropy terms, exact and without the ``N x 2^d`` softmax: custom ops and the functions over them.

Lookup-free quantization scores a vector ``x`` against its ``2^d`` sign codes with a softmax over
``2 tau <x, c>``; the regulariser is ``per-sample entropy - gamma batch entropy`` (MAGVIT-v2). With the
bit logits ``u = 4 tau m x`` (``m`` the codes' magnitude) that softmax is a product of independent bits,
``p(c | x) = prod_i sigma(+-u_i)`` (see :mod:`vqtriton.reference.lfq`), so:

- ``bit_entropy``: the per-sample entropy is a sum of binary entropies, ``sum_i h(sigma(u_i))``: O(N d),
  plain torch (elementwise; inductor fuses it).
- ``code_distribution``: the batch's mean distribution over all ``2^d`` codes is ``A^T B`` with ``A, B``
  the distributions of the two halves of the bits (``[N, 2^(d/2)]`` each): the ``vqtriton::lfq_code_
  distribution`` op, one GEMM (cuBLAS on a GPU, forced to full fp32: no TF32) between two Triton launches
  (:mod:`vqtriton.kernels.lfq`); its backward is two more GEMMs and one launch per half. Memory
  O(N 2^(d/2) + 2^d): at d = 18, N = 2048 about 18 MiB, where the softmax would take 2 GiB per tensor.
- ``distribution_entropy``: ``-sum p log p`` of a distribution (the ``vqtriton::distribution_entropy``
  op: one deterministic reduction, and its gradient).

vector-quantize-pytorch clamps probabilities inside its logs, ``-sum p log max(p, eps)`` with
``eps = 1e-5``; every function here takes ``eps`` (``None``: the exact entropy). For the batch entropy
the clamp is applied to the ``2^d`` entries of the mean distribution, which is held explicitly: exact.
For the per-sample entropy the clamp breaks the sum over bits: ``-sum_c p_c log max(p_c, eps)`` is
``E_p[min(L, lambda)]`` with ``L = -log p(c | x)`` and ``lambda = -log eps``, and it differs from the
per-bit sum by ``E_p[(L - lambda)^+]`` (nonzero exactly when some code of the vector has
``p < eps``: uncertain vectors, with ``d log 2 > lambda``, i.e. ``d >= 17`` for a vector with every bit
at 1/2). It is still computed exactly without ``N x 2^d``: ``L = L_A + L_B`` over the two halves, so
``E[min(L, lambda)] = sum_a A_a (L_A,a + E_B[min(L_B, lambda - L_A,a)])``, and ``E_B[min(L_B, t)]`` for
all ``2^(d/2)`` thresholds comes from one sort of ``L_B`` with prefix sums and a ``searchsorted``:
O(N 2^(d/2) d) time, O(N 2^(d/2)) memory (the ``vqtriton::lfq_clamped_entropy`` op: torch ops in row
chunks on every backend; its gradient is analytic, ``E_p[(b_i - sigma(u_i)) g(L)]`` with
``g(L) = min(L, lambda) - [L < lambda]``, the same sort read the other way, then the halves' backward).

Every function takes one codebook's logits ``[N, d]``, or several codebooks' ``[N, H, d]`` (one
distribution and one entropy per codebook). Results are float32 (float64 for float64 logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vqtriton import checks
from vqtriton.backend import choose, ops
from vqtriton.eager import call as _op  # torch.ops.vqtriton.<name>, without its dispatch in eager mode
from vqtriton.entropy_torch import clamped_entropy_terms
from vqtriton.torch_ops import cuda_fp32_matmul

__all__ = ["code_distribution", "distribution_entropy", "bit_entropy", "lfq_entropy", "LFQEntropy", "MAX_BITS"]

# The most bits per codebook: a half of at most 16 bits fits one tile of the backward kernel (and
# 2^32 codes already take 16 GiB).
MAX_BITS = 32


class LFQEntropy(NamedTuple):
    """``lfq_entropy``'s terms: 0-dim for ``[N, d]`` logits, ``[H]`` for ``[N, H, d]``."""

    per_sample: Tensor
    batch: Tensor


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in full fp32 on CUDA whatever the TF32 setting says (TF32 would cost the 1e-6 accuracy)."""
    if not a.is_cuda:
        return torch.bmm(a, b)
    with cuda_fp32_matmul(tf32=False):
        return torch.bmm(a, b)


# --- the batch code distribution: vqtriton::lfq_code_distribution --------------------------------


@torch.library.custom_op("vqtriton::lfq_code_distribution", mutates_args=())
def _code_distribution(u: Tensor, w: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(m [H, 2^d], A [H, N, 2^s], B [H, N, 2^(d-s)])`` for bit logits ``u [H, N, d]`` and row weights
    ``w [N]``: ``m = sum_n w_n p(. | x_n) = A^T B`` (``A`` carries the weights; ``s = d // 2``, the first
    ``s`` bits the high bits of the index). ``A`` and ``B`` are returned for the backward."""
    o = ops(backend)
    h, _, d = u.shape
    s = d // 2
    a = o.lfq_halves(u, w, 0, s)
    b = o.lfq_halves(u, None, s, d - s)
    return _bmm(a.transpose(1, 2), b).reshape(h, -1), a, b


@_code_distribution.register_fake
def _(u, w, backend):
    h, n, d = u.shape
    s = d // 2
    return u.new_empty(h, 2**d), u.new_empty(h, n, 2**s), u.new_empty(h, n, 2 ** (d - s))


def _code_distribution_setup(ctx, inputs, output):
    u, _, backend = inputs
    ctx.save_for_backward(u, *output)
    ctx.backend = backend


def _code_distribution_grad(ctx, g_m, _g_a, _g_b):
    u, m, a, b = ctx.saved_tensors
    return _op("lfq_code_distribution_backward", u, m, a, b, g_m, ctx.backend), None, None


torch.library.register_autograd(
    "vqtriton::lfq_code_distribution", _code_distribution_grad, setup_context=_code_distribution_setup
)


@torch.library.custom_op("vqtriton::lfq_code_distribution_backward", mutates_args=())
def _code_distribution_backward(u: Tensor, m: Tensor, a: Tensor, b: Tensor, g: Tensor, backend: str) -> Tensor:
    """``du [H, N, d]`` from the gradient ``g [H, 2^d]`` of ``m``: ``dA = B G^T``, ``dB = A G`` (two GEMMs),
    then each half's bits (:func:`vqtriton.kernels.lfq.lfq_halves_backward`).

    ``G`` is ``g`` less its ``m``-weighted mean: every ``p(. | x)`` sums to 1, so a constant added to ``g``
    changes no gradient, and centring it keeps the per-bit sums from cancelling (an entropy's gradient
    ``-log m - 1`` is large and nearly constant where ``m`` is)."""
    o = ops(backend)
    h, _, d = u.shape
    s = d // 2
    g = g.to(a.dtype)
    g = g - (m * g).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    gm = g.reshape(h, a.shape[2], b.shape[2])
    da, db = _bmm(b, gm.transpose(1, 2)), _bmm(a, gm)
    return torch.cat([o.lfq_halves_backward(u, a, da, 0, s), o.lfq_halves_backward(u, b, db, s, d - s)], -1)


@_code_distribution_backward.register_fake
def _(u, m, a, b, g, backend):
    return u.new_empty(u.shape)


# --- the entropy of a distribution: vqtriton::distribution_entropy -------------------------------


@torch.library.custom_op("vqtriton::distribution_entropy", mutates_args=())
def _distribution_entropy(m: Tensor, eps: float, backend: str) -> Tensor:
    """``-sum m log max(m, eps)`` per row of ``m [R, M]`` (``eps = 0``: exact): ``[R]``."""
    return ops(backend).distribution_entropy(m, eps)


@_distribution_entropy.register_fake
def _(m, eps, backend):
    return m.new_empty(m.shape[0])


def _distribution_entropy_setup(ctx, inputs, output):
    m, eps, backend = inputs
    ctx.save_for_backward(m)
    ctx.meta = (eps, backend)


def _distribution_entropy_grad(ctx, g):
    (m,) = ctx.saved_tensors
    eps, backend = ctx.meta
    return _op("distribution_entropy_backward", m, g, eps, backend), None, None


torch.library.register_autograd(
    "vqtriton::distribution_entropy", _distribution_entropy_grad, setup_context=_distribution_entropy_setup
)


@torch.library.custom_op("vqtriton::distribution_entropy_backward", mutates_args=())
def _distribution_entropy_backward(m: Tensor, g: Tensor, eps: float, backend: str) -> Tensor:
    """``g[r] (-log max(m, eps) - [m >= eps])`` (exact: ``-log m - 1``): ``[R, M]``."""
    return ops(backend).distribution_entropy_grad(m, g, eps)


@_distribution_entropy_backward.register_fake
def _(m, g, eps, backend):
    return torch.empty_like(m)


# --- the clamped per-sample entropy: vqtriton::lfq_clamped_entropy -------------------------------


@torch.library.custom_op("vqtriton::lfq_clamped_entropy", mutates_args=())
def _clamped_entropy(u: Tensor, w: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_n w_n E_p[min(L, -log eps)] [H], g_a, g_b)`` for bit logits ``u [H, N, d]`` (see
    :func:`vqtriton.entropy_torch.clamped_entropy_terms`: torch on every backend, in row chunks); ``g_a``,
    ``g_b`` are returned for the backward."""
    rows, g_a, g_b = clamped_entropy_terms(u, eps)
    return (rows * w).sum(1), g_a, g_b


@_clamped_entropy.register_fake
def _(u, w, eps, backend):
    h, n, d = u.shape
    s = d // 2
    return u.new_empty(h), u.new_empty(h, n, 2**s), u.new_empty(h, n, 2 ** (d - s))


def _clamped_entropy_setup(ctx, inputs, output):
    u, w, _, backend = inputs
    ctx.save_for_backward(u, w, *output[1:])
    ctx.backend = backend


def _clamped_entropy_grad(ctx, g, _g_a, _g_b):
    u, w, g_a, g_b = ctx.saved_tensors
    return _op("lfq_clamped_entropy_backward", u, w, g_a, g_b, g, ctx.backend), None, None, None


torch.library.register_autograd("vqtriton::lfq_clamped_entropy", _clamped_entropy_grad, setup_context=_clamped_entropy_setup)


@torch.library.custom_op("vqtriton::lfq_clamped_entropy_backward", mutates_args=())
def _clamped_entropy_backward(u: Tensor, w: Tensor, g_a: Tensor, g_b: Tensor, g: Tensor, backend: str) -> Tensor:
    """``du [H, N, d]``: each half's bits through the halves' backward, with the weighted half distributions
    (recomputed: one launch each) and ``dp = g[h] g_a`` (``g[h] g_b``)."""
    o = ops(backend)
    _, _, d = u.shape
    s = d // 2
    gh = g.to(g_a.dtype)[:, None, None]
    du_a = o.lfq_halves_backward(u, o.lfq_halves(u, w, 0, s), g_a * gh, 0, s)
    du_b = o.lfq_halves_backward(u, o.lfq_halves(u, w, s, d - s), g_b * gh, s, d - s)
    return torch.cat([du_a, du_b], -1)


@_clamped_entropy_backward.register_fake
def _(u, w, g_a, g_b, g, backend):
    return u.new_empty(u.shape)


# --- the functions -------------------------------------------------------------------------------


def _eps(eps) -> float:
    """``eps`` as the ops take it: 0.0 for the exact entropy (``None``), else a number in (0, 1)."""
    if eps is None:
        return 0.0
    return checks.real("eps", eps, lambda v: 0 < v < 1, "None (exact) or in (0, 1)")


def _logits(logits) -> tuple[Tensor, bool]:
    """Bit logits as ``[N, H, d]`` in float32 (float64 stays), and whether they came as ``[N, d]``."""
    checks.float_tensor("logits", logits)
    if logits.dim() not in (2, 3) or not 1 <= logits.shape[-1] <= MAX_BITS:
        raise ValueError(
            f"logits must be [N, d] or [N, H, d] with 1 <= d <= {MAX_BITS} bits, got shape {tuple(logits.shape)}"
        )
    u = logits if logits.dtype == torch.float64 else logits.float()
    return (u.unsqueeze(1), True) if logits.dim() == 2 else (u, False)


def _weight(weight, u: Tensor) -> Tensor:
    """Row weights ``[N]`` in ``u``'s dtype: as given, or ``1 / N`` each."""
    n = u.shape[0]
    if weight is None:
        return torch.full((n,), 1.0 / max(n, 1), dtype=u.dtype, device=u.device)
    checks.float_tensor("weight", weight)
    if weight.shape != (n,):
        raise ValueError(f"weight must be [N] = [{n}] (one per row of logits), got {tuple(weight.shape)}")
    checks.same_device(logits=u, weight=weight)
    return weight.to(u.dtype)


def code_distribution(logits: Tensor, weight: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """``sum_n w_n p(. | x_n)``: the weighted batch distribution over the ``2^d`` sign codes (index order:
    first bit most significant), ``[2^d]`` for ``logits [N, d]``, ``[H, 2^d]`` for ``[N, H, d]``.

    ``weight [N]`` (default ``1 / N`` each: the mean) is used as given; it gets no gradient. One GEMM of
    the two half-code distributions; differentiable with respect to ``logits``.
    """
    u, single = _logits(logits)
    w = _weight(weight, u).detach().contiguous()
    ut = u.transpose(0, 1)  # [H, N, d]
    m, _, _ = _op("lfq_code_distribution", ut, w, choose(ut, w, backend=backend))
    return m[0] if single else m


def distribution_entropy(p: Tensor, eps: float | None = None, *, backend: str | None = None) -> Tensor:
    """``-sum p log p`` over the last dim of ``p [..., M]`` (``0 log 0 = 0``), or ``-sum p log max(p, eps)``:
    ``[...]``, float32 (float64 for float64 ``p``). Differentiable."""
    checks.float_tensor("p", p)
    if p.dim() < 1:
        raise ValueError(f"p must have at least one dim (the codes), got shape {tuple(p.shape)}")
    e = _eps(eps)
    rows = (p if p.dtype == torch.float64 else p.float()).reshape(-1, p.shape[-1])
    return _op("distribution_entropy", rows, e, choose(rows, backend=backend)).reshape(p.shape[:-1])


def bit_entropy(logits: Tensor, weight: Tensor | None = None, *, eps: float | None = None,
                backend: str | None = None) -> Tensor:
    """``sum_n w_n H(p(. | x_n))``, the per-sample entropy: 0-dim for ``logits [N, d]``, ``[H]`` for ``[N, H, d]``.

    Exact (``eps=None``): ``sum_i h(sigma(u_i))`` per row, plain torch. With ``eps``:
    ``-sum_c p_c log max(p_c, eps)`` per row, exactly, by the half-split sort described in the module
    docstring (the ``vqtriton::lfq_clamped_entropy`` op; ``weight`` gets no gradient there). Differentiable.
    """
    u, single = _logits(logits)
    w = _weight(weight, u)
    e = _eps(eps)
    if e > 0:
        ut = u.transpose(0, 1)  # [H, N, d]
        w = w.detach().contiguous()
        out, _, _ = _op("lfq_clamped_entropy", ut, w, e, choose(ut, w, backend=backend))
    else:
        rows = (torch.sigmoid(u) * F.softplus(-u) + torch.sigmoid(-u) * F.softplus(u)).sum(-1)  # [N, H]
        out = (w[:, None] * rows).sum(0)  # [H]
    return out[0] if single else out


def lfq_entropy(logits: Tensor, mask: Tensor | None = None, *, eps: float | None = None,
                backend: str | None = None) -> LFQEntropy:
    """The per-sample and batch entropies of LFQ over the rows of ``logits [N, d]`` (or ``[N, H, d]``)
    that ``mask [N]`` keeps (all by default): ``LFQEntropy(per_sample, batch)``. No kept row gives zeros."""
    u, _ = _logits(logits)
    if mask is None:
        w = None
    else:
        keep = checks.mask(mask, u.shape[:1], u.device, "logits' rows, [N]")
        w = keep.to(u.dtype) / keep.sum().clamp_min(1).to(u.dtype)
    per_sample = bit_entropy(logits, w, eps=eps, backend=backend)
    batch = distribution_entropy(code_distribution(logits, w, backend=backend), eps, backend=backend)
    return LFQEntropy(per_sample, batch)
