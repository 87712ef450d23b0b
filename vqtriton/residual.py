"""``ResidualVQ``: residual vector quantization (SoundStream, EnCodec, DAC) over ``VectorQuantizer`` levels.

Level ``l`` quantizes what the levels before it left: ``r_0 = z``, ``r_{l+1} = r_l - sg[q_l]``, with
``q_l`` the code level ``l`` chose for ``r_l``. The output is ``sum_l q_l``. Gradients:

- the output passes its gradient straight through to ``z`` once (it is level 0's straight-through
  output plus the values of the other levels' codes);
- each level's commitment term ``||r_l - sg[q_l]||^2`` reaches ``z`` through ``r_l`` (``dr_l/dz = I``):
  the residual subtracts the *detached* codes. Subtracting the straight-through outputs instead, as
  EnCodec did (facebookresearch/encodec#25), gives ``dr_l/dz = 0`` for ``l >= 1``, and the encoder never
  feels the later levels' commitment.
"""

from __future__ import annotations

import torch
from torch import nn

from vqtriton import checks, distributed
from vqtriton.layer import VectorQuantizer

__all__ = ["ResidualVQ"]


class ResidualVQ(nn.Module):
    """``z_q, indices, loss = rvq(z, mask=None)``: ``num_quantizers`` levels of :class:`VectorQuantizer`.

    ``layer_kwargs`` configure every level (``beta``, ``ema_decay``, ``metric``, ``channel_dim``, ``heads``,
    ``kmeans_init``, ``sync``, ...); ``rvq.layers`` is the ``nn.ModuleList`` of levels. ``z_q`` has ``z``'s
    shape and dtype (the residuals are computed in float32, or float64 for float64 ``z``); ``indices`` is
    each level's indices stacked on a trailing dim: ``[..., num_quantizers]`` (``[..., H, num_quantizers]``
    with heads); ``loss`` is the sum of the levels' losses. ``mask`` goes to every level.

    - ``shared_codebook=True``: every level is the same module (``layers[l] is layers[0]``), so one codebook
      quantizes every residual. Learned codebooks only: an EMA codebook would take one update per level
      per step. (The levels' own ``shared_codebook``, for heads, cannot be set through ``layer_kwargs``.)
    - ``quantize_dropout=p``: in training mode, with probability ``p`` a step keeps only the first
      ``n`` levels, ``n`` uniform in ``1 .. num_quantizers - 1``, for the whole batch (SoundStream's bitrate
      dropout). A dropped level's indices are -1, its loss 0, its codebook unchanged (no EMA step, no
      restart). The draw stays on the device, so there is no host sync and the step compiles whole: a
      dropped level is a level whose every vector is masked, and still costs its assignment work. When
      the levels synchronise over ``torch.distributed``, rank 0's draw is broadcast. Under
      ``DistributedDataParallel`` a dropped level's learned codebook gets a zero gradient. While a level
      still waits for its k-means initialisation, no level is dropped.
    """

    def __init__(
        self,
        dim: int,
        num_codes: int,
        num_quantizers: int,
        *,
        shared_codebook: bool = False,
        quantize_dropout: float = 0.0,
        **layer_kwargs,
    ):
        super().__init__()
        self.num_quantizers = checks.integer("num_quantizers", num_quantizers, 1)
        self.quantize_dropout = checks.real("quantize_dropout", quantize_dropout, lambda v: 0 <= v <= 1, "in [0, 1]")
        self.shared_codebook = bool(shared_codebook)
        if self.shared_codebook and layer_kwargs.get("ema_decay") is not None:
            raise ValueError(
                "shared_codebook=True needs a learned codebook (ema_decay=None): an EMA codebook shared by the "
                "levels would be updated once per level per step"
            )
        if self.shared_codebook:
            layers = [VectorQuantizer(dim, num_codes, **layer_kwargs)] * self.num_quantizers
        else:
            layers = [VectorQuantizer(dim, num_codes, **layer_kwargs) for _ in range(self.num_quantizers)]
        self.layers = nn.ModuleList(layers)

    def extra_repr(self) -> str:
        return (
            f"num_quantizers={self.num_quantizers}, shared_codebook={self.shared_codebook}, "
            f"quantize_dropout={self.quantize_dropout}"
        )

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *, return_all_losses: bool = False):
        """``(z_q, indices, loss)``, plus the per-level losses ``[num_quantizers]`` with ``return_all_losses``."""
        checks.float_tensor("z", z)
        levels = self._levels(z.device)
        residual = z.to(torch.promote_types(z.dtype, torch.float32))
        out, indices, losses = None, [], []
        for l, layer in enumerate(self.layers):
            active = None if levels is None or l == 0 else levels > l
            q, idx, loss = layer(residual, mask, _active=active)
            # Level 0's straight-through output carries the gradient to z once; later levels add values only.
            out = q if out is None else out + q.detach()
            # Detached codes: every residual keeps dr/dz = I, so each level's commitment reaches z.
            residual = residual - q.detach()
            indices.append(idx)
            losses.append(loss)
        all_losses = torch.stack(losses)
        result = (out.to(z.dtype), torch.stack(indices, -1), all_losses.sum())
        return (*result, all_losses) if return_all_losses else result

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The sum of every level's codes for ``indices [..., num_quantizers]``, in the levels' input layout
        (-1 adds nothing); the gradient flows to learned codebooks."""
        if not isinstance(indices, torch.Tensor) or indices.shape[-1:] != (self.num_quantizers,):
            shape = tuple(getattr(indices, "shape", ()))
            raise ValueError(
                f"indices must be [..., num_quantizers] with num_quantizers = {self.num_quantizers}, got shape {shape}"
            )
        return sum(layer.get_output_from_indices(indices[..., l]) for l, layer in enumerate(self.layers))

    decode = get_output_from_indices

    def _levels(self, device: torch.device) -> torch.Tensor | None:
        """How many leading levels run this call, as a 0-dim int64 tensor on ``device`` (None: all of them)."""
        q = self.num_quantizers
        if not (self.training and self.quantize_dropout > 0 and q > 1):
            return None
        if any(layer._kmeans_pending for layer in self.layers):
            return None  # every level sees this batch, so every level can take its k-means step
        drop = torch.rand((), device=device) < self.quantize_dropout
        levels = torch.where(drop, torch.randint(1, q, (), device=device), q)
        if distributed.is_active(self.layers[0].sync):
            distributed.broadcast_(levels, 0)
        return levels
