"""``ResidualFSQ`` and ``ResidualLFQ``: residual stacks of scalar quantizers (vector-quantize-pytorch's
"improvised" residual FSQ and LFQ for audio codecs), each level a finer grid than the one before.

Level ``l`` quantizes what the levels before it left, on a grid scaled down by ``s_l``: ``r_0 = x``,
``q_l = s_l Q_l(r_l / s_l)``, ``r_{l+1} = r_l - sg[q_l]``; the output is ``sum_l q_l``.

- ResidualFSQ: ``Q_l`` symmetric FSQ with the same levels, ``s_l = L^-l`` per channel (the grid of a
  level spans one cell of the level before). With ``hard_clamp`` (default) the input is first
  soft-clamped to ``+-(1 + 1 / (L - 1))`` (half a cell beyond the outer codes) and the levels clamp
  instead of ``tanh``.
- ResidualLFQ: ``Q_l`` LFQ with code scale ``s_l = 2^-l`` (and ``soft_clamp`` halved per level); the loss
  is the sum of the levels' losses.

Gradients: the residual subtracts the *detached* codes, so ``dr_l / dx = I`` and every level's own
loss reaches ``x``. The output passes its gradient to ``x`` once, through level 0's straight-through
path (``output_gradient="first"``, as :class:`vqtriton.ResidualVQ`); ``output_gradient="every"`` passes it
through every level's instead (vector-quantize-pytorch's sum of straight-through outputs: for LFQ levels
``active levels x g``).

Quantize dropout (SoundStream's bitrate dropout; training mode): with probability ``quantize_dropout`` a
step keeps only the first ``n`` levels, ``n - 1`` uniform in ``quantize_dropout_cutoff_index ..
num_quantizers - 2``, rounded up to a multiple of ``quantize_dropout_multiple_of`` (EnCodec's structured
dropout; at most ``num_quantizers``): :func:`vqtriton.residual.dropout_levels`, as ResidualVQ; dropped levels give index -1, a zero code and a zero loss. The draw stays on the
device (no host sync; the step compiles whole), made with ``generator``, so dropped levels are computed
and masked. ``num_active`` (an int or a 0-dim tensor) sets ``n`` for one call instead (inference at a
lower bitrate).
"""

from __future__ import annotations

import torch
from torch import nn

from vqtriton import checks
from vqtriton.fsq import FSQ, check_levels
from vqtriton.lfq import LFQ
from vqtriton.residual import OUTPUT_GRADIENTS, checked_num_active, dropout_levels
from vqtriton.scalar import channel_rows, kept

__all__ = ["ResidualFSQ", "ResidualLFQ"]


class _Residual(nn.Module):
    """The loop both stacks share: levels, scales, quantize dropout, the gradient path, the layout."""

    def _setup(self, num_quantizers, channel_dim, quantize_dropout, quantize_dropout_cutoff_index,
               quantize_dropout_multiple_of, output_gradient, generator):
        self.num_quantizers = checks.integer("num_quantizers", num_quantizers, 1)
        self.channel_dim = checks.integer("channel_dim", channel_dim)
        self.quantize_dropout = checks.real("quantize_dropout", quantize_dropout, lambda v: 0 <= v <= 1, "in [0, 1]")
        self.quantize_dropout_cutoff_index = checks.integer("quantize_dropout_cutoff_index", quantize_dropout_cutoff_index, 0)
        self.quantize_dropout_multiple_of = checks.integer("quantize_dropout_multiple_of", quantize_dropout_multiple_of, 1)
        if self.quantize_dropout_cutoff_index >= self.num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index must be < num_quantizers = {self.num_quantizers}, "
                             f"got {self.quantize_dropout_cutoff_index}")
        self.output_gradient = checks.choice("output_gradient", output_gradient, OUTPUT_GRADIENTS)
        self.generator = checks.generator(generator)

    def _num_active(self, num_active, device) -> int | torch.Tensor | None:
        """The levels that run this call: ``num_active`` as given, a dropout draw, or None (all)."""
        checks.generator_device(self.generator, device)
        if num_active is not None:
            return checked_num_active(num_active, self.num_quantizers, device)
        return self.draw_levels(device)

    def draw_levels(self, device) -> torch.Tensor | None:
        """The quantize-dropout draw of one training call (a 0-dim int64 tensor on ``device``), or None when
        every level runs (eval mode, or no dropout). Pass it as ``num_active`` to make two calls agree."""
        if self.training and self.quantize_dropout > 0 and self.num_quantizers > 1:
            return dropout_levels(self.num_quantizers, self.quantize_dropout, self.quantize_dropout_cutoff_index,
                                  self.quantize_dropout_multiple_of, self.generator, device)
        return None

    def _run(self, x: torch.Tensor, active, level):
        """``(out, indices [..., Q], losses)`` of the residual loop over channel-last ``x [..., d]``, with
        ``level(l, residual) -> (q, indices, loss)`` quantizing one level (``loss`` a float32 0-dim tensor)."""
        out, residual, indices, losses = None, x, [], []
        for l in range(self.num_quantizers):
            if isinstance(active, int) and l >= active:  # known on the host: the level does not run
                q, idx = torch.zeros_like(x), torch.full(x.shape[:-1], -1, dtype=torch.int64, device=x.device)
                loss = x.new_zeros((), dtype=torch.float32)
            else:
                q, idx, loss = level(l, residual)
            if isinstance(active, torch.Tensor):  # known on the device: computed, then masked
                on = l < active
                q, idx, loss = torch.where(on, q, 0.0), torch.where(on, idx, -1), torch.where(on, loss, 0.0)
            residual = residual - q.detach()
            path = q if self.output_gradient == "every" or l == 0 else q.detach()
            out = path if out is None else out + path
            indices.append(idx)
            losses.append(loss)
        return out, torch.stack(indices, -1), losses

    def _pad(self, indices) -> torch.Tensor:
        """``indices [..., q]`` (``q <= num_quantizers``: the first levels) padded with -1 to every level."""
        idx = checks.indices(indices, device=self.scales.device)
        q = idx.shape[-1] if idx.dim() else 0
        if not 1 <= q <= self.num_quantizers:
            raise ValueError(f"indices must be [..., q] with 1 <= q <= num_quantizers = {self.num_quantizers}, "
                             f"got shape {tuple(idx.shape)}")
        return torch.nn.functional.pad(idx, (0, self.num_quantizers - q), value=-1)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Each level's scaled codes ``[num_quantizers, ..., d]`` (channel-last) of ``indices [..., q]``;
        -1 (and levels past ``q``) give zeros."""
        idx = self._pad(indices)
        return torch.stack([self._level_codes(l, idx[..., l]) for l in range(self.num_quantizers)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The sum of the levels' codes of ``indices [..., q]``, in the input layout (``channel_dim``): the
        forward's output for the indices it returned, added in the same order."""
        codes = self.get_codes_from_indices(indices)
        out = codes[0]
        for c in codes[1:]:
            out = out + c
        return out.movedim(-1, self.channel_dim)

    decode = get_output_from_indices

    def _layout(self, z: torch.Tensor, mask):
        x, lead = channel_rows(z, self.channel_dim, 1, self.codebook_dim)
        return x.squeeze(-2), lead, kept(mask, lead, z)

    def _finish(self, out, indices, keep, z):
        if keep is not None:
            out, indices = torch.where(keep[..., None], out, 0.0), torch.where(keep[..., None], indices, -1)
        return out.to(z.dtype).movedim(-1, self.channel_dim), indices


class ResidualFSQ(_Residual):
    """``z_q, indices = rfsq(z, mask=None, *, num_active=None)``: ``num_quantizers`` levels of symmetric FSQ.

    ``z`` holds vectors of ``len(levels)`` channels along ``channel_dim``; ``indices`` (int64) is each
    level's FSQ index stacked on a trailing dim ``[..., num_quantizers]``; ``z_q`` has ``z``'s shape and
    dtype. ``mask`` marks the vectors to quantize (the others: index -1, zero output). See the module
    docstring for the levels, ``hard_clamp``, gradients and quantize dropout; ``soft_clamp`` (a number or
    one per channel) clamps the input softly when ``hard_clamp`` is off (with it, the clamp is fixed).
    ``noise_dropout`` and ``rotation`` configure every level's :class:`~vqtriton.FSQ` (each level draws
    its own rotation).
    """

    def __init__(
        self,
        levels,
        num_quantizers: int,
        *,
        channel_dim: int = -1,
        hard_clamp: bool = True,
        soft_clamp=None,
        quantize_dropout: float = 0.0,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        output_gradient: str = "first",
        noise_dropout: float = 0.0,
        rotation: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self._setup(num_quantizers, channel_dim, quantize_dropout, quantize_dropout_cutoff_index,
                    quantize_dropout_multiple_of, output_gradient, generator)
        self.levels = check_levels(levels, True)
        self.codebook_dim = len(self.levels)
        self.hard_clamp = bool(hard_clamp)
        self.layers = nn.ModuleList(
            FSQ(self.levels, symmetric=True, hard_clamp=self.hard_clamp, noise_dropout=noise_dropout,
                rotation=rotation, generator=self.generator)
            for _ in range(self.num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size
        lv = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("scales", torch.stack([lv**-l for l in range(self.num_quantizers)]), persistent=False)
        if self.hard_clamp:
            if soft_clamp is not None:
                raise ValueError("soft_clamp must be None with hard_clamp=True (the clamp is then 1 + 1 / (L - 1))")
            soft_clamp = 1 + 1 / (lv - 1)
        elif soft_clamp is not None:
            soft_clamp = torch.as_tensor(soft_clamp, dtype=torch.float32)
            if soft_clamp.dim() > 1 or soft_clamp.numel() not in (1, self.codebook_dim) or not bool((soft_clamp > 0).all()):
                raise ValueError(f"soft_clamp must be positive, one number or one per channel, got {soft_clamp.tolist()}")
        self.register_buffer("soft_clamp", soft_clamp, persistent=False)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *, num_active=None):
        """``(z_q, indices)``: see the class docstring."""
        x, _, keep = self._layout(z, mask)
        active = self._num_active(num_active, z.device)
        with torch.autocast(z.device.type, enabled=False):
            if self.soft_clamp is not None:
                v = self.soft_clamp.to(x.dtype)
                x = torch.tanh(x / v) * v

            def level(l, residual):
                scale = self.scales[l].to(x.dtype)
                q, idx = self.layers[l](residual / scale)
                return q * scale, idx, zero

            zero = x.new_zeros((), dtype=torch.float32)

            out, indices, _ = self._run(x, active, level)
        return self._finish(out, indices, keep, z)

    def _level_codes(self, l: int, idx: torch.Tensor) -> torch.Tensor:
        return self.layers[l].indices_to_codes(idx) * self.scales[l]

    @property
    def codebooks(self) -> torch.Tensor:
        """Every level's codes ``[num_quantizers, codebook_size, d]`` (unscaled, as vector-quantize-pytorch's)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])


class ResidualLFQ(_Residual):
    """``z_q, indices, loss = rlfq(z, mask=None, *, num_active=None)``: ``num_quantizers`` levels of LFQ.

    ``z`` holds vectors of ``dim`` channels (bits) along ``channel_dim``; ``indices`` is each level's LFQ
    index stacked on a trailing dim ``[..., num_quantizers]``; ``loss`` is the sum of the levels' losses
    (``return_all_losses=True`` adds them, ``[num_quantizers]``). Level ``l`` is an :class:`~vqtriton.LFQ`
    with code scale ``2^-l`` and ``soft_clamp * 2^-l``; ``lfq_kwargs`` (``entropy_weight``,
    ``commitment_weight``, ``entropy_eps``, ``spherical``, ...) configure every level. ``mask`` goes to every
    level; ``inv_temperature`` overrides theirs for this call.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        *,
        channel_dim: int = -1,
        soft_clamp: float | None = None,
        quantize_dropout: float = 0.0,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        output_gradient: str = "first",
        generator: torch.Generator | None = None,
        **lfq_kwargs,
    ):
        super().__init__()
        self._setup(num_quantizers, channel_dim, quantize_dropout, quantize_dropout_cutoff_index,
                    quantize_dropout_multiple_of, output_gradient, generator)
        for name in ("heads", "scale", "channel_dim"):
            if name in lfq_kwargs:
                raise TypeError(f"ResidualLFQ sets every level's {name}; it is not a level argument here")
        self.dim = self.codebook_dim = checks.integer("dim", dim, 1)
        v = None if soft_clamp is None else checks.real("soft_clamp", soft_clamp, lambda t: t > 0, "> 0")
        self.layers = nn.ModuleList(
            LFQ(self.dim, scale=2.0**-l, soft_clamp=None if v is None else v * 0.5**l, generator=self.generator,
                **lfq_kwargs)
            for l in range(self.num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size
        # Each level's code scale (its LFQ's own): the device of index look-ups.
        self.register_buffer("scales", 2.0 ** -torch.arange(self.num_quantizers, dtype=torch.float32), persistent=False)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, *, num_active=None,
                inv_temperature: float | None = None, return_all_losses: bool = False):
        """``(z_q, indices, loss)``, plus the per-level losses with ``return_all_losses``."""
        x, _, keep = self._layout(z, mask)
        active = self._num_active(num_active, z.device)

        def level(l, residual):
            return self.layers[l](residual, keep, inv_temperature=inv_temperature)

        out, indices, losses = self._run(x, active, level)
        losses = torch.stack(losses)
        z_q, indices = self._finish(out, indices, keep, z)
        return (z_q, indices, losses.sum(), losses) if return_all_losses else (z_q, indices, losses.sum())

    def quantize(self, z: torch.Tensor, *, num_active=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_q, indices)`` of every vector (no mask, no loss): the forward pass without its losses."""
        x, _, _ = self._layout(z, None)
        active = self._num_active(num_active, z.device)

        def level(l, residual):
            q, idx = self.layers[l].quantize(residual)
            return q, idx, zero

        zero = x.new_zeros((), dtype=torch.float32)

        out, indices, _ = self._run(x, active, level)
        return self._finish(out, indices, None, z)

    def _level_codes(self, l: int, idx: torch.Tensor) -> torch.Tensor:
        return self.layers[l].indices_to_codes(idx)

    @property
    def codebooks(self) -> torch.Tensor:
        """Every level's codes ``[num_quantizers, codebook_size, d]`` (each scaled, as vector-quantize-pytorch's)."""
        return torch.stack([layer.codebook for layer in self.layers])
