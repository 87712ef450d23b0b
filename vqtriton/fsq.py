"""``FSQ``: finite scalar quantization (Mentzer et al., ICLR 2024), in plain torch.

Every channel is bounded and rounded on its own (see :mod:`vqtriton.reference.fsq` for the
definitions): no codebook, no search, no loss. The work is elementwise, so there is no kernel: eager it
is a handful of elementwise launches, and under ``torch.compile`` inductor fuses them into one, which a
hand-written Triton kernel could not beat (the step reads ``z`` once and writes ``z_q`` and the indices
once either way). Levels are computed in float32 whatever the input's dtype (float64 stays float64):
in bfloat16, ``tanh(z) * h`` rounds onto half the levels' boundaries (vector-quantize-pytorch #114);
here every code is reachable from every input dtype, and indices are exact int64 mixed-radix numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqtriton import checks
from vqtriton.codebook_state import draws
from vqtriton.scalar import (
    channel_rows, finite_only, head_indices, kept, masked, orthogonal, to_layout,
)
from vqtriton.torch_ops import acc_dtype

__all__ = ["FSQ"]

# The bound's slack (the paper's eps): tanh never reaches the outer levels' edges.
_BOUND_EPS = 1e-3


def check_levels(levels, symmetric: bool) -> list[int]:
    """``levels`` as a list of ints ``>= 2`` (``2`` only with ``symmetric``: the standard bound maps two
    levels onto the codes ``{-1, 0}``, which is why vector-quantize-pytorch refuses it too)."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__") or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty list of ints, got {levels!r}")
    out = [checks.integer("levels[i]", lv, 2) for lv in levels]
    if not symmetric and 2 in out:
        raise ValueError(f"levels of 2 need symmetric=True (preserve_symmetry), got levels {out}")
    return out


class FSQ(nn.Module):
    """``z_q, indices = fsq(z, mask=None)``: ``levels`` (one number of levels per channel, each ``>= 2``).

    ``z`` holds vectors of ``dim = len(levels) * heads`` channels along ``channel_dim``; ``z_q`` has ``z``'s
    shape and dtype, each channel's code in ``[-1, 1]``, with the straight-through gradient of the bound
    (rounding held fixed). ``indices`` (int64, ``z``'s shape without the channel dim, plus a trailing
    ``heads`` dim when ``heads > 1``) numbers a vector's levels in mixed radix, **first channel most
    significant**: ``sum_i k_i prod_{j > i} L_j``, in ``[0, codebook_size)``. ``mask`` (bool, the shape of
    ``indices`` without the heads dim) marks the vectors to quantize: the others get index -1 and a zero
    ``z_q``. A vector holding a NaN or +-Inf gets index -1 (its output is NaN for a NaN; the bound takes
    +-Inf to the outermost code).

    - ``symmetric`` (vector-quantize-pytorch's ``preserve_symmetry``): levels ``2 k / (L - 1) - 1``,
      symmetric about 0 for every ``L`` (the standard bound puts even ``L`` off centre).
    - ``hard_clamp``: a clamp to ``[-1, 1]`` in place of tanh (for inputs already in range: residual FSQ).
    - ``noise_dropout=p`` (symmetric only; training mode): each code is replaced, with probability ``p``,
      by ``clamp(code + u, -1, 1)``, ``u`` uniform in ``[-1/2, 1/2)``; the indices stay those of the
      clean codes. Drawn with ``generator`` (``None``: the global generator).
    - ``heads=H``: the channels split into ``H`` groups of ``len(levels)``, each quantized alone.
    - ``rotation=True``: a fixed random orthogonal ``[d, d]`` rotation before quantizing, undone after
      (Lee et al.'s trick for codebook utilisation; the buffer ``rotation``, drawn with ``generator``).
    """

    def __init__(
        self,
        levels,
        *,
        heads: int = 1,
        channel_dim: int = -1,
        symmetric: bool = False,
        hard_clamp: bool = False,
        noise_dropout: float = 0.0,
        rotation: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.symmetric = bool(symmetric)
        self.levels = check_levels(levels, self.symmetric)
        self.heads = checks.integer("heads", heads, 1)
        self.channel_dim = checks.integer("channel_dim", channel_dim)
        self.hard_clamp = bool(hard_clamp)
        self.noise_dropout = checks.real("noise_dropout", noise_dropout, lambda v: 0 <= v <= 1, "in [0, 1]")
        if self.noise_dropout > 0 and not self.symmetric:
            raise ValueError("noise_dropout > 0 needs symmetric=True (noise on the symmetric levels)")
        self.generator = checks.generator(generator)
        self.codebook_dim = len(self.levels)
        self.dim = self.codebook_dim * self.heads
        self.codebook_size = math.prod(self.levels)
        lv = torch.tensor(self.levels, dtype=torch.int64)
        basis = torch.tensor([math.prod(self.levels[i + 1 :]) for i in range(self.codebook_dim)], dtype=torch.int64)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("rotation", orthogonal(self.codebook_dim, generator) if rotation else None)

    def extra_repr(self) -> str:
        extra = "".join(
            f", {k}={v}" for k, v in (("heads", self.heads), ("symmetric", self.symmetric), ("hard_clamp", self.hard_clamp),
                                      ("noise_dropout", self.noise_dropout)) if v
        )
        return f"levels={self.levels}{extra}, rotation={self.rotation is not None}"

    # --- the forward pass ---------------------------------------------------------------------------

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None):
        """``(z_q, indices)``: see the class docstring."""
        x, lead = channel_rows(z, self.channel_dim, self.heads, self.codebook_dim)
        checks.generator_device(self.generator, z.device)
        keep = kept(mask, lead, z)
        with torch.autocast(z.device.type, enabled=False):
            codes, k = self.quantize_rows(x)
            if self.training and self.noise_dropout > 0:
                codes = self._noise(codes)
            indices = finite_only(self.indices_from_levels(k.nan_to_num(0.0)), x, self.heads)
            out, indices = masked(self._unrotate(codes), indices, keep, self.heads)
        return to_layout(out, z.dtype, self.channel_dim), indices

    def quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, levels)`` of channel-last vectors ``x [..., H, d]`` in float32/float64 (rotated first
        when the module rotates): the codes with their straight-through gradient, the levels ``k`` as
        exact integers in the same float dtype (no gradient). No noise, no mask."""
        lv = self._levels
        if self.rotation is not None:
            x = x @ self.rotation.to(x.dtype)
        squash = (lambda t: t.clamp(-1.0, 1.0)) if self.hard_clamp else torch.tanh
        if self.symmetric:
            bracket = (lv - 1) * (squash(x) + 1) / 2.0 + 0.5
            k = bracket.detach().floor()
            # The value is exactly the code of k; the gradient is the bound's.
            return self._codes(k) + (bracket - bracket.detach()) * (2.0 / (lv - 1)), k
        half_l = (lv - 1) * (1 + _BOUND_EPS) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = offset / half_l if self.hard_clamp else torch.atanh(offset / half_l)
        bounded = squash(x + shift) * half_l - offset
        # Clamped: past L = 1000 levels the bound's slack (L - 1) eps / 2 passes half a level, and a saturated
        # input would round one level beyond the last (vqp's FSQ does; below that the clamp changes nothing).
        k = torch.minimum((bounded.detach().round() + lv // 2).clamp(min=0), (lv - 1).to(bounded.dtype))
        return self._codes(k) + (bounded - bounded.detach()) / (lv // 2), k

    def _codes(self, k: torch.Tensor) -> torch.Tensor:
        """The codes in ``[-1, 1]`` of levels ``k [..., d]`` (integers in a float dtype)."""
        lv = self._levels
        return k * (2.0 / (lv - 1)) - 1.0 if self.symmetric else (k - lv // 2) / (lv // 2)

    def _noise(self, codes: torch.Tensor) -> torch.Tensor:
        """Noise dropout: ``clamp(code + u, -1, 1)`` where a Bernoulli(p) draw says so (two draws of the
        codes' logical shape, in that order, from ``self.generator``)."""
        kind = dict(dtype=codes.dtype, device=codes.device)
        drop = torch.empty(codes.shape, **kind).bernoulli_(self.noise_dropout, **draws(self.generator)).bool()
        offset = torch.rand(codes.shape, **draws(self.generator), **kind) - 0.5
        return torch.where(drop, codes + offset, codes).clamp(-1.0, 1.0)

    def _unrotate(self, codes: torch.Tensor) -> torch.Tensor:
        return codes if self.rotation is None else codes @ self.rotation.to(codes.dtype).T

    # --- indices, levels and codes -------------------------------------------------------------------

    def indices_from_levels(self, k: torch.Tensor) -> torch.Tensor:
        """The int64 indices ``[...]`` (``[..., H]`` with heads) of levels ``k [..., H, d]`` (any number type)."""
        idx = (k.to(torch.int64) * self._basis).sum(-1)
        return idx if self.heads > 1 else idx.squeeze(-1)

    def levels_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The levels (int64 ``[..., d]``) of indices ``[...]``: each channel's ``k``, first channel first."""
        idx = checks.indices(indices, device=self._levels.device)
        return (idx[..., None] // self._basis) % self._levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of ``indices`` (``[...]``, or ``[..., H]`` with heads) in the input layout (``channel_dim``
        honoured), float32; -1 gives zeros."""
        idx = head_indices(indices, self.heads, self.codebook_size, self._levels.device)
        codes = self._codes(self.levels_from_indices(idx.clamp_min(0)).to(torch.float32))
        codes = self._unrotate(torch.where(idx[..., None] >= 0, codes, 0.0))
        return to_layout(codes, torch.float32, self.channel_dim)

    get_output_from_indices = indices_to_codes
    decode = indices_to_codes

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """The indices of codes in ``indices_to_codes``'s layout (rotated back first): each channel's nearest level."""
        x, _ = channel_rows(codes, self.channel_dim, self.heads, self.codebook_dim)
        x = x if self.rotation is None else x @ self.rotation.to(x.dtype)
        return self.indices_from_levels(self.levels_from_codes(x))

    def levels_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The levels (int64 ``[..., d]``) of channel-last codes ``[..., d]`` (one codebook's, before any
        rotation): each channel's nearest level, in range."""
        lv = self._levels
        x = codes.to(acc_dtype(codes))
        k = (x + 1) * ((lv - 1) / 2.0) if self.symmetric else x * (lv // 2) + lv // 2
        return torch.minimum(k.round().clamp_min(0), lv - 1).to(torch.int64)

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """Every code ``[codebook_size, d]`` in index order (one codebook's channels; ``codebook_size x d``
        floats: mind large level products)."""
        return self._codes(self.levels_from_indices(torch.arange(self.codebook_size, device=self._levels.device)).float())
