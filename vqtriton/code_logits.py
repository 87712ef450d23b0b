"""Losses on the softmax over a codebook's logits, in row chunks: the cross entropy against target codes,
and the codebook-diversity loss (minus the entropy of the mean code distribution).

vector-quantize-pytorch trains a codebook with ``F.cross_entropy(logits, target)`` over its distance
"logits" (``forward(x, indices=...)``, NaturalSpeech 2): ``-sqrt(max(d, 1e-8))`` for l2, with vqp's
expanded form ``d = |z|^2 + |c|^2 - 2 z.c``, and the dot product of l2-normalised vectors for cosine.
That is an ``N x K`` softmax. Here the forward and the backward each walk the rows in chunks of at most
``CHUNK_ELEMS`` logits, recomputing them in the backward (nothing ``N x K`` is saved or held): the loss
``sum_n (logsumexp_k l[n, k] - l[n, t_n])`` over the rows with a target (``t_n >= 0``) and its gradients to
``z`` and the codebook, ``(softmax - onehot)`` through the logits.

vqp's codebook-diversity loss is ``-mean_g H(mean_{n in g} softmax(tau l[n]))`` over groups g of rows (vqp:
the sequence positions, averaged over the batch), ``H(p) = -sum p log max(p, 1e-5)``; its forward keeps only
the ``[G, K]`` group means, its backward recomputes each chunk's softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cross_entropy_sum", "diversity_loss", "CHUNK_ELEMS"]

# Logits ([rows, K]) held at once: float32, 16 MiB.
CHUNK_ELEMS = 1 << 22
_EPS = 1e-8  # vqp's clamp of the squared distance before the square root
_ENTROPY_EPS = 1e-5  # vqp's clamp inside the entropy's log


def _check_rows(z: Tensor, codebook: Tensor, per_row: Tensor, name: str) -> None:
    """The shapes and dtypes (never the values: no host sync) of the two losses' arguments."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z must be [n, d] and codebook [K, d], got z {tuple(z.shape)} and codebook "
                         f"{tuple(codebook.shape)}")
    if per_row.shape != z.shape[:1] or per_row.is_floating_point() or per_row.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({z.shape[0]},), got {per_row.dtype} of shape "
                         f"{tuple(per_row.shape)}")


def _logits(z: Tensor, codebook: Tensor, cosine: bool) -> tuple[Tensor, Tensor | None]:
    """The logits ``[r, K]`` of rows ``z [r, d]``, and for l2 the clamped squared distances."""
    dot = z @ codebook.T
    if cosine:
        return dot, None
    d = (z.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * dot).clamp_min(_EPS)
    return -d.sqrt(), d


def _chunks(n: int, k: int):
    step = max(1, CHUNK_ELEMS // max(1, k))
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, codebook: Tensor, target: Tensor, cosine: bool) -> Tensor:
        ctx.save_for_backward(z, codebook, target)
        ctx.cosine = cosine
        total = z.new_zeros((), dtype=torch.float32 if z.dtype != torch.float64 else torch.float64)
        for rows in _chunks(z.shape[0], codebook.shape[0]):
            logits, _ = _logits(z[rows], codebook, cosine)
            t = target[rows]
            picked = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
            total = total + torch.where(t >= 0, logits.logsumexp(1) - picked, 0).sum()
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        z, codebook, target = ctx.saved_tensors
        dz = torch.zeros_like(z)
        dc = torch.zeros_like(codebook)
        for rows in _chunks(z.shape[0], codebook.shape[0]):
            zr, t = z[rows], target[rows]
            logits, d = _logits(zr, codebook, ctx.cosine)
            dl = logits.softmax(1)
            dl = dl - torch.zeros_like(dl).scatter_(1, t.clamp_min(0).unsqueeze(1), 1.0)
            dl = torch.where((t >= 0).unsqueeze(1), dl, 0) * g
            dz[rows] = _logits_backward(zr, codebook, dl, d, ctx.cosine, dc)
        return dz, dc, None, None


def _logits_backward(zr: Tensor, codebook: Tensor, dl: Tensor, d: Tensor | None, cosine: bool, dc: Tensor) -> Tensor:
    """The gradient to the rows ``zr`` from ``dl [r, K]`` at their logits; adds the codebook's into ``dc``."""
    if cosine:
        dc += dl.T @ zr
        return dl @ codebook
    s = torch.where(d > _EPS, -0.5 * dl / d.sqrt(), 0)  # l = -sqrt(d): dl/dd = -1 / (2 sqrt d), unclamped d
    dc += 2 * (s.sum(0).unsqueeze(1) * codebook - s.T @ zr)
    return 2 * (s.sum(1, keepdim=True) * zr - s @ codebook)


class _Diversity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, codebook: Tensor, group: Tensor, num_groups: int, temperature: float, cosine: bool):
        k = codebook.shape[0]
        sums = z.new_zeros(num_groups, k, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)
        valid = group >= 0
        for rows in _chunks(z.shape[0], k):
            logits, _ = _logits(z[rows], codebook, cosine)
            p = (temperature * logits).softmax(1)
            sums.index_add_(0, group[rows].clamp_min(0), torch.where(valid[rows].unsqueeze(1), p, 0).to(sums.dtype))
        counts = torch.zeros(num_groups, dtype=sums.dtype, device=z.device).index_add_(0, group.clamp_min(0), valid.to(sums.dtype))
        mean = sums / counts.clamp_min(1).unsqueeze(1)
        entropy = -(mean * mean.clamp_min(_ENTROPY_EPS).log()).sum(1)
        present = counts > 0
        n_groups = present.sum().clamp_min(1)
        ctx.save_for_backward(z, codebook, group, mean, counts, present, n_groups)
        ctx.meta = (temperature, cosine)
        return -torch.where(present, entropy, 0).sum() / n_groups

    @staticmethod
    def backward(ctx, g: Tensor):
        z, codebook, group, mean, counts, present, n_groups = ctx.saved_tensors
        temperature, cosine = ctx.meta
        # dL/dmean = (log max(mean, eps) + [mean > eps]) / G; each row's share: / its group's count
        dmean = (mean.clamp_min(_ENTROPY_EPS).log() + (mean > _ENTROPY_EPS).to(mean.dtype)) * g / n_groups
        dmean = torch.where(present.unsqueeze(1), dmean / counts.clamp_min(1).unsqueeze(1), 0)
        dz, dc = torch.zeros_like(z), torch.zeros_like(codebook)
        for rows in _chunks(z.shape[0], codebook.shape[0]):
            zr, grp = z[rows], group[rows]
            logits, d = _logits(zr, codebook, cosine)
            p = (temperature * logits).softmax(1)
            a = torch.where((grp >= 0).unsqueeze(1), dmean[grp.clamp_min(0)].to(p.dtype), 0)
            dl = temperature * p * (a - (p * a).sum(1, keepdim=True))
            dz[rows] = _logits_backward(zr, codebook, dl, d, cosine, dc)
        return dz, dc, None, None, None, None


def diversity_loss(z: Tensor, codebook: Tensor, group: Tensor, num_groups: int, *, temperature: float,
                   cosine: bool) -> Tensor:
    """vqp's codebook-diversity loss (module docstring) of rows ``z [n, d]``, ``group [n]`` each row's group in
    ``[0, num_groups)`` (-1: not counted); the mean is over the groups that have rows. Differentiable to ``z``
    and ``codebook``; memory O(chunk + num_groups K). (Group values are not read on the host: the caller's.)"""
    _check_rows(z, codebook, group, "group")
    return _Diversity.apply(z, codebook, group.to(torch.int64), int(num_groups), float(temperature), bool(cosine))


def cross_entropy_sum(z: Tensor, codebook: Tensor, target: Tensor, *, cosine: bool) -> Tensor:
    """``sum`` over the rows of ``z [n, d]`` with ``target [n] >= 0`` of ``-log softmax(logits)[target]``
    (logits as the module docstring says; ``cosine``: ``z`` and the codebook are l2-normalised already).
    Differentiable to ``z`` and ``codebook``; float32 (float64 for float64 inputs). (Target values are not
    read on the host, so a training step compiles whole: the caller keeps them in ``[-1, K)``.)"""
    _check_rows(z, codebook, target, "target")
    return _CrossEntropySum.apply(z, codebook, target.to(torch.int64), bool(cosine))
