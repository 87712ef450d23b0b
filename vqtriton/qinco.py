"""Per-row codebooks: every vector quantized against its own codes, as in QINCo (Huijben et al., "Residual
Quantization with Implicit Neural Codebooks", ICML 2024), whose residual level l quantizes with the codes
``MLP([x_hat, c])`` conditioned on what the levels before it reconstructed (``x_hat``).

- :class:`QincoMLP`: vector-quantize-pytorch's MLP (same layers, names and initialisation, so its
  checkpoints load): ``proj_in`` (``2 d -> d``) on ``[condition, code]``, then ``depth`` residual blocks
  ``Linear(d, h), SiLU, Linear(h, d)``, l2-normalised output for the cosine metric.
- :class:`RowCodebooks`: what a layer needs of per-row codebooks: the codes of a slice of rows
  ``[r, K, d]`` (for the search) and the chosen codes of every row (differentiable).
- :func:`nearest`: the exact nearest code (or the k nearest, or a Gumbel-max sample) of each row among
  its own codes, in row chunks: never more than ``CHUNK_ELEMS`` distances' worth of codes at once.

Cost (the torch path; there is no kernel for it): the search evaluates the MLP on every (row, code) pair,
``N K`` pairs of ``(2 d + 2 depth h) d`` multiply-adds each, in chunks of at most ``CHUNK_ELEMS`` code
elements (float64 distances, 32 MiB); the chosen codes are evaluated again, ``N`` pairs with gradient.
So memory is O(chunk + N d) where vector-quantize-pytorch holds the ``[N, K, d]`` codes and their
activations for the backward; time is about the same ``N K`` MLP evaluations.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqtriton import checks
from vqtriton.codebook_state import draws

__all__ = ["QincoMLP", "RowCodebooks", "QincoCodes", "nearest", "CHUNK_ELEMS"]

# Code elements ([rows, K, d]) held at once by the per-row search: float64, 32 MiB.
CHUNK_ELEMS = 1 << 22


class QincoMLP(nn.Module):
    """vector-quantize-pytorch's implicit-codebook MLP: codes conditioned on a reconstruction so far."""

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim)) for _ in range(depth)
        )
        self.l2norm_output = l2norm_output

    def forward(self, codes: Tensor, condition: Tensor) -> Tensor:
        """``MLP([condition, codes])`` with the two broadcast against each other (``[..., d]`` each)."""
        condition, codes = torch.broadcast_tensors(condition, codes.to(condition.dtype))
        x = self.proj_in(torch.cat((condition, codes), -1))
        for layer in self.layers:
            x = layer(x) + x
        return F.normalize(x, dim=-1) if self.l2norm_output else x

    def table(self, codebook: Tensor, condition: Tensor) -> Tensor:
        """Every row's codes: ``[r, K, d]`` from the codebook ``[K, d]`` and the rows' conditions ``[r, d]``."""
        return self(codebook.unsqueeze(0), condition.unsqueeze(1))


class RowCodebooks(Protocol):
    """Per-row codebooks over a codebook ``[K, d]`` (the layer's, as it compares them)."""

    def codes(self, codebook: Tensor, rows: slice) -> Tensor:
        """The codes of the rows ``rows``: ``[r, K, d]`` (called without gradient, for the search)."""

    def chosen(self, codebook: Tensor, idx: Tensor) -> Tensor:
        """Each row's codes at ``idx`` (``[n]`` or ``[n, k]``; -1: a zero vector): ``[..., d]``, differentiable."""


class QincoCodes:
    """QINCo's per-row codebooks: ``mlp(codebook, condition[row])`` for the rows' conditions ``[n, d]``."""

    def __init__(self, mlp: QincoMLP, condition: Tensor):
        self.mlp, self.condition = mlp, condition

    def codes(self, codebook: Tensor, rows: slice) -> Tensor:
        return self.mlp.table(codebook, self.condition[rows])

    def chosen(self, codebook: Tensor, idx: Tensor) -> Tensor:
        cond = self.condition.view(idx.shape[0], *[1] * (idx.dim() - 1), -1)
        out = self.mlp(codebook[idx.clamp_min(0)], cond)
        return torch.where((idx >= 0).unsqueeze(-1), out, 0)


def nearest(
    z: Tensor,
    codebook: Tensor,
    books: RowCodebooks,
    normalise: Callable[[Tensor], Tensor],
    *,
    k: int | None = None,
    temperature: float = 0.0,
    metric: str = "l2",
    generator: torch.Generator | None = None,
) -> Tensor:
    """For each row of ``z [n, d]``, the index of its nearest code among its own codes ``books.codes``
    (mapped by ``normalise``, the metric's map): int64 ``[n]``; with ``k``, the ``k`` nearest in increasing
    distance ``[n, k]``. Distances are the direct form ``sum (z - c)^2`` in float64 (exact; the lowest index
    wins ties); a row with no finite distance gets -1. ``temperature > 0`` samples instead (Gumbel-max on
    the logits ``-sqrt(max(d, 1e-8))`` for l2, the cosine similarity ``1 - d / 2`` for cosine, over
    ``temperature``; noise from ``generator``). Runs without gradient, in row chunks of bounded memory."""
    if z.dim() != 2:
        raise ValueError(f"z must be [n, d], got shape {tuple(z.shape)}")
    n, d = z.shape
    num_codes = codebook.shape[0]
    if k is not None:
        k = checks.integer("k", k, 1)
        if k > num_codes:
            raise ValueError(f"k must be in [1, K = {num_codes}], got {k}")
    checks.choice("metric", metric, ("l2", "cosine"))
    step = max(1, CHUNK_ELEMS // max(1, num_codes * d))
    out = []
    with torch.no_grad():
        for s in range(0, n, step):
            rows = slice(s, min(n, s + step))
            codes = normalise(books.codes(codebook, rows)).to(torch.float64)
            dist = (z[rows].to(torch.float64).unsqueeze(1) - codes).square().sum(-1)
            dist = dist.nan_to_num(nan=float("inf"))
            if temperature > 0:
                logits = 1 - dist / 2 if metric == "cosine" else -dist.clamp_min(1e-8).sqrt()
                u = torch.rand(dist.shape, dtype=torch.float64, device=dist.device, **draws(generator))
                gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)).clamp_min(1e-20))
                idx = torch.where(torch.isfinite(dist), logits / temperature + gumbel, -float("inf")).argmax(-1)
                best = dist.gather(1, idx.unsqueeze(1)).squeeze(1)
            elif k is not None:
                dist, idx = torch.sort(dist, dim=1, stable=True)
                idx, dist = idx[:, :k], dist[:, :k]
                idx = torch.where(torch.isfinite(dist), idx, -1)
                out.append(idx)
                continue
            else:
                best, idx = dist.min(1)
            out.append(torch.where(torch.isfinite(best), idx, -1))
    if not out:
        return torch.empty((0,) if k is None else (0, k), dtype=torch.int64, device=z.device)
    return torch.cat(out)
