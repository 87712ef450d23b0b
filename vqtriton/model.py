"""``VQVAE(encoder, quantizer, decoder)``: the spec's model (``Generative.VQVAE``) as an ``nn.Module``.

    encode(x)                           z_e = encoder(x)
    quantized(idx)                      z_q = codebook[idx], in the quantizer's layout
    forward(x, idx=None)                decoder(z_q)
    loss(x, beta, idx, reduction)       LossBreakdown(reconstruction, codebook, commitment, total)

The spec takes the code index as an argument; here ``idx=None`` lets the quantizer assign it (and, in
training mode, update its codebook: EMA, k-means, dead codes), while an explicit ``idx`` evaluates the
spec's terms for that index and changes nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vqtriton import checks
from vqtriton.functional import squared_error
from vqtriton.layer import REDUCTIONS, VectorQuantizer

__all__ = ["VQVAE", "LossBreakdown"]


class LossBreakdown(NamedTuple):
    """The VQ-VAE objective and its terms: ``total = reconstruction + codebook + beta * commitment``."""

    reconstruction: torch.Tensor
    codebook: torch.Tensor
    commitment: torch.Tensor
    total: torch.Tensor


class VQVAE(nn.Module):
    """Encoder, :class:`VectorQuantizer` and decoder, with the spec's functions as methods."""

    def __init__(self, encoder: nn.Module, quantizer: VectorQuantizer, decoder: nn.Module):
        super().__init__()
        if not isinstance(quantizer, VectorQuantizer):
            raise TypeError(f"quantizer must be a vqtriton.VectorQuantizer, got {type(quantizer).__name__}")
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantized latent ``z_e = encoder(x)``."""
        return self.encoder(x)

    def quantized(self, idx: torch.Tensor) -> torch.Tensor:
        """``codebook[idx]`` (exactly the lookup), in the quantizer's layout; gradient to the codebook."""
        return self.quantizer.get_output_from_indices(idx)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``decoder(z_q)``. With ``idx`` given, ``z_q = codebook[idx]`` and ``x`` is unused
        (the spec); else ``z_q`` is the quantizer's output on ``encode(x)`` (straight-through)."""
        if idx is not None:
            return self.decoder(self.quantized(idx))
        z_q, _, _ = self.quantizer(self.encode(x))
        return self.decoder(z_q)

    def loss(
        self, x: torch.Tensor, beta: float | None = None, idx: torch.Tensor | None = None, reduction: str = "sum"
    ) -> LossBreakdown:
        """The objective ``||dec(z_q) - x||^2 + ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2``.

        ``beta`` defaults to the quantizer's; ``reduction`` is ``"sum"`` (the spec's squared norms) or
        ``"mean"`` (each term over its own number of elements). The decoder sees ``z_q`` straight-through:
        the reconstruction gradient reaches the encoder, never the codebook. For a cosine quantizer the
        codebook and commitment terms compare the normalised vectors the quantizer compares.
        """
        checks.choice("reduction", reduction, REDUCTIONS)
        beta = self.quantizer.beta if beta is None else checks.real("beta", beta, lambda v: v >= 0, ">= 0")
        z_q, codebook, commitment = self._quantize(self.encode(x), idx, reduction)
        reconstruction = squared_error(self.decoder(z_q), x, reduction, backend=self.quantizer.backend)
        return LossBreakdown(reconstruction, codebook, commitment, reconstruction + codebook + beta * commitment)

    def _quantize(self, z_e: torch.Tensor, idx: torch.Tensor | None, reduction: str):
        """The decoder's input (value ``codebook[idx]``, gradient to ``z_e``), the codebook and commitment terms."""
        if idx is None:
            z_q, _, _, terms = self.quantizer(z_e, return_breakdown=True, reduction=reduction)
            return z_q, terms.codebook_loss, terms.commitment_loss
        z = self.quantizer.transform_input(z_e)
        z_q = self.quantized(idx).to(z.dtype)
        backend = self.quantizer.backend
        codebook = squared_error(z_q, z.detach(), reduction, backend=backend)
        commitment = squared_error(z, z_q.detach(), reduction, backend=backend)
        # Straight-through with the exact value: z - sg[z] is exactly zero.
        return z_q.detach() + (z - z.detach()), codebook, commitment
