"""``LFQ``: lookup-free quantization (MAGVIT-v2) with its entropy regulariser, exact and without the
``N x 2^d`` softmax.

Quantization is elementwise (each channel to its sign; plain torch, which inductor fuses: no kernel
could beat one fused pass). The loss is where the cost is: vector-quantize-pytorch, Open-MAGVIT2 and
Cosmos build the softmax over all ``2^d`` codes for every vector; here the per-sample entropy is a sum
over bits and the batch distribution one GEMM (:mod:`vqtriton.entropy`), exact (``entropy_eps=None``)
or with vector-quantize-pytorch's clamp (``entropy_eps=1e-5``). The definitions are in
:mod:`vqtriton.reference.lfq`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqtriton import checks, distributed
from vqtriton.backend import BACKENDS
from vqtriton.codebook_state import draws
from vqtriton.entropy import MAX_BITS, bit_entropy, code_distribution, distribution_entropy
from vqtriton.scalar import (
    channel_rows, finite_only, head_indices, kept, masked, orthogonal, to_layout,
)

__all__ = ["LFQ", "LFQBreakdown"]


class LFQBreakdown(NamedTuple):
    """The 4th value of ``LFQ(..., return_breakdown=True)``: 0-dim tensors (float32; float64 for float64
    inputs), the means over codebooks; 0 in eval mode, where no loss is computed, and the commitment 0
    when ``commitment_weight`` is 0."""

    per_sample_entropy: torch.Tensor
    batch_entropy: torch.Tensor
    commitment: torch.Tensor


def _subsample(n: int, keep: torch.Tensor | None, fraction: float, generator, device) -> torch.Tensor:
    """A uniformly random ``floor(fraction * kept)`` of the kept rows, as a bool ``[n]``: decided on the
    device (no count is read on the host). Row ``i`` of the kept rows (in order) is chosen when
    ``order[i] < k`` for ``order = argsort(keys)`` of ``kept`` standard normal keys: with no mask this is
    the draw vector-quantize-pytorch makes (``torch.randn(n).argsort() < k``), so one seed picks the same
    rows; with a mask the keys of the rows past the kept count are set to +inf, which leaves the order of
    the first ``kept`` keys as it is."""
    keys = torch.randn(n, **draws(generator), device=device)
    pos = torch.arange(n, device=device)
    if keep is None:
        count = torch.tensor(n, device=device)
        compact = pos
    else:
        count = keep.sum()
        compact = (torch.cumsum(keep, 0) - 1).clamp_min(0)
        keys = torch.where(pos < count, keys, torch.inf)
    k = (count.double() * fraction).floor()
    chosen = keys.argsort() < k
    chosen = chosen[compact]
    return chosen if keep is None else chosen & keep


class _AllReduceSum(torch.autograd.Function):
    """``sum over ranks``, whose backward sums the gradients over ranks too: every rank's loss holds the
    same global term, and under DDP's averaging that gives each rank's rows their full gradient."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        distributed.all_reduce_sum_(t)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        distributed.all_reduce_sum_(g)
        return g


class LFQ(nn.Module):
    """``z_q, indices, loss = lfq(z, mask=None)``: ``dim`` channels quantized to their signs.

    ``z`` holds vectors of ``dim`` channels along ``channel_dim``, split into ``heads`` codebooks of
    ``d = dim / heads`` bits (``2^d`` codes each). ``z_q`` has ``z``'s shape and dtype: each channel
    ``+-m`` by its sign (``x_i = 0`` gives ``-m``; ``m = scale``, or ``scale / sqrt(d)`` for ``spherical``
    codes), with a straight-through gradient. ``indices`` (int64, ``z``'s shape without the channel dim,
    plus a trailing ``heads`` dim when ``heads > 1``) reads the bits as a binary number, **first channel
    most significant**. ``mask`` (bool, ``z``'s shape without the channel dim) marks the vectors to
    quantize: the others get index -1, a zero ``z_q``, and count in no loss term (whatever they hold).
    A kept vector holding a NaN or +-Inf gets index -1 and makes the loss NaN (never hidden); its output
    is NaN.

    The loss (training mode only; 0 in eval mode) is
    ``entropy_weight * (per_sample - diversity_gamma * batch) + commitment_weight * commitment`` over the
    kept vectors, with the entropies of the softmax over ``2 inv_temperature <x, c>`` (means over codebooks):

    - ``entropy_eps``: ``None`` (default) the exact entropies; ``1e-5`` vector-quantize-pytorch's clamp
      ``-sum p log max(p, eps)`` (see :mod:`vqtriton.entropy` for what it changes, and how both stay exact).
    - ``softplus_offset`` (``None``: off): the entropy term becomes ``softplus(term + offset)``.
    - ``entropy_fraction < 1``: both entropies over a random ``floor(fraction * kept)`` of the kept vectors
      (vector-quantize-pytorch's ``frac_per_sample_entropy``; drawn with ``generator``). No vector drawn
      gives entropies of 0.
    - ``commitment``: ``mean (x - sg[c])^2`` over the kept elements (``x`` after the input transforms).
    - ``sync`` (``None``: when ``torch.distributed`` has more than one rank): the batch distribution is
      the mean over every rank's kept vectors; the per-sample term and the commitment stay per rank.

    Input transforms, in order: ``soft_clamp=v`` (``v tanh(x / v)``; ``v >= scale``), ``rotation=True``
    (a fixed random orthogonal ``[d, d]`` rotation, undone on the output: the ``rotation`` buffer), and
    ``spherical`` (``x`` scaled to length ``scale``: binary spherical quantization, Zhao et al. 2024).
    ``activation`` (a module or callable, default none) shapes the straight-through path: the output's
    value is the code, its gradient that of ``activation(x)``. The work runs in float32 (float64 for
    float64 inputs) whatever the input's dtype. ``inv_temperature`` may be overridden per call.
    ``backend`` picks the entropy ops' implementation (:mod:`vqtriton.backend`).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 1,
        scale: float = 1.0,
        spherical: bool = False,
        inv_temperature: float = 100.0,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commitment_weight: float = 0.0,
        soft_clamp: float | None = None,
        softplus_offset: float | None = None,
        entropy_eps: float | None = None,
        entropy_fraction: float = 1.0,
        activation: Callable | None = None,
        rotation: bool = False,
        channel_dim: int = -1,
        sync: bool | None = None,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.dim = checks.integer("dim", dim, 1)
        self.heads = checks.integer("heads", heads, 1)
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim = {self.dim} and heads = {self.heads}")
        self.codebook_dim = self.dim // self.heads
        if self.codebook_dim > MAX_BITS:
            raise ValueError(f"at most {MAX_BITS} bits per codebook (2^d codes), got dim / heads = {self.codebook_dim}")
        self.codebook_size = 2**self.codebook_dim
        self.scale = checks.real("scale", scale, lambda v: v > 0, "> 0")
        self.spherical = bool(spherical)
        self.inv_temperature = checks.real("inv_temperature", inv_temperature, lambda v: v > 0, "> 0")
        self.entropy_weight = checks.real("entropy_weight", entropy_weight, lambda v: True, "finite")
        self.diversity_gamma = checks.real("diversity_gamma", diversity_gamma, lambda v: True, "finite")
        self.commitment_weight = checks.real("commitment_weight", commitment_weight, lambda v: v >= 0, ">= 0")
        self.soft_clamp = None if soft_clamp is None else checks.real(
            "soft_clamp", soft_clamp, lambda v: v >= self.scale, f">= scale = {self.scale}")
        self.softplus_offset = None if softplus_offset is None else checks.real(
            "softplus_offset", softplus_offset, lambda v: True, "finite")
        self.entropy_eps = None if entropy_eps is None else checks.real(
            "entropy_eps", entropy_eps, lambda v: 0 < v < 1, "None (exact) or in (0, 1)")
        self.entropy_fraction = checks.real("entropy_fraction", entropy_fraction, lambda v: 0 < v <= 1, "in (0, 1]")
        if activation is not None and not callable(activation):
            raise TypeError(f"activation must be a module, a callable or None, got {type(activation).__name__}")
        self.activation = activation
        self.channel_dim = checks.integer("channel_dim", channel_dim)
        if not (sync is None or isinstance(sync, bool)):
            raise TypeError(f"sync must be None, True or False, got {sync!r}")
        self.sync = sync
        self.backend = checks.choice("backend", backend, (None, *BACKENDS))
        self.generator = checks.generator(generator)
        d = self.codebook_dim
        # |c_i|: how the logits scale with x (the spherical codes are unit vectors times scale).
        self.magnitude = self.scale / math.sqrt(d) if self.spherical else self.scale
        self.register_buffer("_powers", 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64), persistent=False)
        self.register_buffer("rotation", orthogonal(d, generator) if rotation else None)

    def extra_repr(self) -> str:
        extra = f", heads={self.heads}" if self.heads > 1 else ""
        return (f"{self.dim}{extra}, codebook_size={self.codebook_size}, scale={self.scale}, spherical={self.spherical}, "
                f"entropy_weight={self.entropy_weight}, entropy_eps={self.entropy_eps}")

    # --- the forward pass ---------------------------------------------------------------------------

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                inv_temperature: float | None = None, return_breakdown: bool = False):
        """``(z_q, indices, loss)``, plus an :class:`LFQBreakdown` with ``return_breakdown``."""
        tau = self.inv_temperature if inv_temperature is None else checks.real(
            "inv_temperature", inv_temperature, lambda v: v > 0, "> 0")
        x, lead = channel_rows(z, self.channel_dim, self.heads, self.codebook_dim)
        checks.generator_device(self.generator, z.device)
        keep = kept(mask, lead, z)
        with torch.autocast(z.device.type, enabled=False):
            x = self.transform(x)
            codes, indices = self._quantize(x)
            out, indices = masked(self._straight_through(x, codes), finite_only(indices, x, self.heads), keep, self.heads)
            parts = self._losses(x, codes, keep, tau) if self.training else None
        zero = z.new_zeros((), dtype=x.dtype)
        per_sample, batch, commitment = parts if parts is not None else (zero, zero, zero)
        loss = zero
        if parts is not None:
            term = per_sample - self.diversity_gamma * batch
            if self.softplus_offset is not None:
                term = F.softplus(term + self.softplus_offset)
            loss = self.entropy_weight * term + self.commitment_weight * commitment
        result = (to_layout(out, z.dtype, self.channel_dim), indices, loss)
        return (*result, LFQBreakdown(per_sample, batch, commitment)) if return_breakdown else result

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_q, indices)`` of every vector of ``z`` (straight-through, no mask, no loss): the forward pass
        without its losses."""
        x, _ = channel_rows(z, self.channel_dim, self.heads, self.codebook_dim)
        with torch.autocast(z.device.type, enabled=False):
            x = self.transform(x)
            codes, indices = self._quantize(x)
            out = self._straight_through(x, codes)
            return to_layout(out, z.dtype, self.channel_dim), finite_only(indices, x, self.heads)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """What is quantized: channel-last ``x [..., H, d]`` soft-clamped, rotated, then (spherical)
        scaled to length ``scale``."""
        if self.soft_clamp is not None:
            x = torch.tanh(x / self.soft_clamp) * self.soft_clamp
        if self.rotation is not None:
            x = x @ self.rotation.to(x.dtype)
        if self.spherical:
            x = F.normalize(x, dim=-1) * self.scale
        return x

    def _codes_from_bits(self, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``+-m`` by ``bits [..., d]`` (bool): ``m = scale``, or ``scale / sqrt(d)`` (unit length times
        ``scale``) when spherical. One constant, so the forward's codes and ``indices_to_codes``' agree
        bit for bit in any layout."""
        return (bits.to(dtype) * 2 - 1) * self.magnitude

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bits = x > 0
        idx = (bits.to(torch.int64) * self._powers).sum(-1)
        return self._codes_from_bits(bits, x.dtype), idx if self.heads > 1 else idx.squeeze(-1)

    def _straight_through(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The codes' values, with the gradient of ``activation(x)``; rotated back."""
        a = x if self.activation is None else self.activation(x)
        out = codes + (a - a.detach())
        return out if self.rotation is None else out @ self.rotation.to(out.dtype).T

    def _losses(self, x: torch.Tensor, codes: torch.Tensor, keep: torch.Tensor | None, tau: float):
        """``(per_sample, batch, commitment)``: 0-dim tensors in ``x``'s dtype over the kept vectors (the
        commitment is 0 when its weight is: vector-quantize-pytorch's breakdown, and no work)."""
        rows = x.reshape(-1, self.heads, self.codebook_dim)
        n = rows.shape[0]
        keep = None if keep is None else keep.reshape(-1)
        chosen = keep
        if self.entropy_fraction < 1:
            chosen = _subsample(n, keep, self.entropy_fraction, self.generator, x.device)
        u = (4.0 * tau * self.magnitude) * rows
        if chosen is not None:  # rows left out count in nothing, NaN padding included
            u = torch.where(chosen[:, None, None], u, 0.0)
        rows_in = torch.ones(n, dtype=u.dtype, device=u.device) if chosen is None else chosen.to(u.dtype)
        count = rows_in.sum()
        per_sample = bit_entropy(u, rows_in / count.clamp_min(1), eps=self.entropy_eps, backend=self.backend)
        sync = distributed.is_active(self.sync)
        if sync:  # the batch distribution: the mean over every rank's rows
            count = count.clone()
            distributed.all_reduce_sum_(count)
        dist = code_distribution(u, rows_in / count.clamp_min(1), backend=self.backend)
        if sync:
            dist = _AllReduceSum.apply(dist)
        batch = distribution_entropy(dist, self.entropy_eps, backend=self.backend)
        commitment = torch.zeros((), dtype=u.dtype, device=u.device)
        if self.commitment_weight > 0:
            se = (x - codes.detach()).square().reshape(n, self.dim).sum(-1)
            kept_n = torch.tensor(n, device=u.device) if keep is None else keep.sum()
            se = se if keep is None else torch.where(keep, se, 0.0)
            commitment = se.sum() / (kept_n * self.dim).clamp_min(1)
        return per_sample.mean(), batch.mean(), commitment

    # --- indices back to codes ----------------------------------------------------------------------

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of ``indices`` (``[...]``, or ``[..., H]`` with heads) in the input layout (``channel_dim``
        honoured), float32; -1 gives zeros."""
        idx = head_indices(indices, self.heads, self.codebook_size, self._powers.device)
        codes = self._codes_from_bits((idx[..., None] & self._powers) != 0, torch.float32)
        codes = torch.where(idx[..., None] >= 0, codes, 0.0)
        codes = codes if self.rotation is None else codes @ self.rotation.T
        return to_layout(codes, torch.float32, self.channel_dim)

    get_output_from_indices = indices_to_codes
    decode = indices_to_codes

    @property
    def codebook(self) -> torch.Tensor:
        """All ``2^d`` codes ``[codebook_size, d]`` in index order (before the rotation), float32."""
        idx = torch.arange(self.codebook_size, device=self._powers.device)
        return self._codes_from_bits((idx[:, None] & self._powers) != 0, torch.float32)
