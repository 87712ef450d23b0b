"""EnCodec's and Mimi's quantizers as vqtriton modules: :func:`from_encodec`, :func:`from_mimi`.

Both codecs quantize ``[B, C, T]`` frames with a residual VQ whose levels are EMA codebooks; they
assign in float32 (EnCodec: the expanded form ``|x|^2 - 2 x.e + |e|^2``; Mimi: ``torch.cdist``, which
takes that same form past 25 rows), while ours is the exact nearest code (DESIGN.md section 4). So the
codes are equal wherever a vector's nearest code is separated from the next by more than float32's
rounding of the expanded form; on near-ties their code may be a slightly farther one.

What is theirs and what is ours:

- EnCodec (``encodec.quantization.ResidualVectorQuantizer`` 0.1.1): its levels' ``embed`` become our
  levels' ``codebook``, ``cluster_size`` and ``embed_avg`` our ``cluster_size`` and ``embed_sum`` (its
  update is ours: EMA of counts and sums, Laplace-smoothed sizes). The result is one
  :class:`~vqtriton.ResidualVQ`.
- Mimi (``moshi.quantization.SplitResidualVectorQuantizer`` 0.2.13): a semantic residual VQ (the first
  level) and an acoustic one (the rest), each between its own input and output projections (1x1
  convolutions without bias), both fed the same input, their outputs summed. The result is a
  :class:`SplitResidualVQ`: our ``ResidualVQ`` for each part and the codec's projection weights in
  ``torch.nn.Conv1d`` layers (the same op as Mimi's, so the projected vectors are bitwise Mimi's).
  Mimi's codes are ``embedding_sum / max(cluster_usage, epsilon)`` (no Laplace smoothing); they are
  loaded as computed, and ``cluster_usage``, ``embedding_sum`` become our statistics, so eval codes are
  Mimi's and a further training step follows our EMA rule (Laplace-smoothed sizes, which differ from
  Mimi's clamp by about ``epsilon`` relative for codes in use).

Training behaviour that is the codec's own and not carried over (say what you need with keyword
arguments of :class:`~vqtriton.VectorQuantizer` / :class:`~vqtriton.ResidualVQ`): EnCodec replaces a
dead code's vector for one step and keeps its statistics (ours restarts the code with fresh statistics);
Mimi's dead-code threshold is relative to the mean usage and checked every 5 steps (not mapped:
``dead_code_threshold`` is 0 unless given); Mimi's quantizer dropout and "no quantization" rate; the
codecs' loss (EnCodec and Mimi average their levels' commitment terms, ours sums them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vqtriton import checks
from vqtriton.residual import ResidualVQ

__all__ = ["from_encodec", "from_mimi", "SplitResidualVQ"]

# Keyword arguments that would change what the levels compute, so the codec's codes would not come out.
_REFUSED = ("heads", "shared_codebook", "metric", "kmeans_init", "kmeans_iters")


class SplitResidualVQ(nn.Module):
    """Mimi's split quantizer from vqtriton parts: ``z_q, indices, loss = split(x, mask=None)``.

    Part ``p`` is ``project_out[p](rvqs[p](project_in[p](x)))``: a 1x1 convolution without bias, a
    channel-first :class:`~vqtriton.ResidualVQ`, another convolution. Every part quantizes the same ``x``
    ``[B, C_in, T]``; ``z_q`` ``[B, C_out, T]`` is the sum of the parts' outputs, ``indices`` ``[B, T, L]``
    the parts' levels in order (Mimi's codes are ``indices.transpose(1, 2)``), ``loss`` the sum of the
    parts' losses. ``mask`` (bool ``[B, T]``) goes to every part.
    """

    def __init__(self, rvqs: list[ResidualVQ], project_in: list[nn.Conv1d], project_out: list[nn.Conv1d]):
        super().__init__()
        if not (len(rvqs) == len(project_in) == len(project_out) >= 1):
            raise ValueError(
                f"need as many projections as residual VQs (at least one), got {len(rvqs)} residual VQs, "
                f"{len(project_in)} input and {len(project_out)} output projections"
            )
        for p, (rvq, pin, pout) in enumerate(zip(rvqs, project_in, project_out)):
            if not isinstance(rvq, ResidualVQ) or not isinstance(pin, nn.Conv1d) or not isinstance(pout, nn.Conv1d):
                kinds = ", ".join(type(m).__name__ for m in (rvq, pin, pout))
                raise TypeError(f"part {p} must be a ResidualVQ between two nn.Conv1d, got {kinds}")
            dim = rvq.layers[0].dim
            if rvq.layers[0].channel_dim != 1 or pin.out_channels != dim or pout.in_channels != dim:
                raise ValueError(
                    f"part {p}: the ResidualVQ must be channel-first (channel_dim=1) with the projections' "
                    f"{dim} channels, got channel_dim={rvq.layers[0].channel_dim}, project_in {pin}, project_out {pout}"
                )
        if len({m.in_channels for m in project_in}) > 1 or len({m.out_channels for m in project_out}) > 1:
            raise ValueError("every part must take and give the same number of channels")
        self.rvqs = nn.ModuleList(rvqs)
        self.project_in = nn.ModuleList(project_in)
        self.project_out = nn.ModuleList(project_out)

    @property
    def num_quantizers(self) -> int:
        return sum(rvq.num_quantizers for rvq in self.rvqs)

    def forward(self, x: Tensor, mask: Tensor | None = None):
        """``(z_q [B, C_out, T], indices [B, T, L], loss)`` for ``x [B, C_in, T]``."""
        checks.float_tensor("x", x)
        if x.dim() != 3 or x.shape[1] != self.project_in[0].in_channels:
            raise ValueError(f"x must be [B, {self.project_in[0].in_channels}, T], got shape {tuple(x.shape)}")
        out, indices, loss = None, [], None
        for rvq, pin, pout in zip(self.rvqs, self.project_in, self.project_out):
            q, idx, part_loss = rvq(pin(x), mask)
            q = pout(q)
            out = q if out is None else out + q
            loss = part_loss if loss is None else loss + part_loss
            indices.append(idx)
        return out, torch.cat(indices, -1), loss

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """``z_q [B, C_out, T]`` from ``indices [B, T, L]`` (-1 adds nothing)."""
        if not isinstance(indices, Tensor) or indices.dim() != 3 or indices.shape[-1] != self.num_quantizers:
            shape = tuple(getattr(indices, "shape", ()))
            raise ValueError(f"indices must be [B, T, {self.num_quantizers}], got shape {shape}")
        parts = indices.split([rvq.num_quantizers for rvq in self.rvqs], -1)
        return sum(pout(rvq.get_output_from_indices(i)) for rvq, pout, i in zip(self.rvqs, self.project_out, parts))

    decode = get_output_from_indices


# --- EnCodec -------------------------------------------------------------------------------------------


def from_encodec(source, *, prefix: str | None = None, num_quantizers: int | None = None, **layer_kwargs) -> ResidualVQ:
    """EnCodec's residual quantizer as a channel-first :class:`~vqtriton.ResidualVQ` with its codebooks.

    ``source`` is EnCodec's ``ResidualVectorQuantizer`` (or its ``.vq``, a ``ResidualVectorQuantization``),
    or a state_dict holding one (a quantizer's, or a whole ``EncodecModel``'s: its keys end in
    ``layers.<l>._codebook.embed``). ``prefix`` picks the quantizer in a state_dict holding several (the
    keys' part before ``vq.layers.`` or ``layers.``). ``num_quantizers`` keeps the first levels (EnCodec's
    bandwidth choice; default all).

    The levels are EMA codebooks with EnCodec's ``decay``, ``epsilon`` (our ``eps``), commitment weight
    (``beta``) and ``threshold_ema_dead_code`` (``dead_code_threshold``): read from a module, EnCodec's
    defaults (0.99, 1e-5, 1, 2) for a state_dict. ``layer_kwargs`` override them or add others
    (``backend``, ``precision``, ``quantize_dropout``, ``ema_decay=None`` for a learned codebook, ...).
    ``rvq(x)`` takes EnCodec's ``[B, D, T]``; its ``indices [B, T, L]`` are EnCodec's codes
    ``codes [L, B, T]`` as ``indices.permute(2, 0, 1)``.
    """
    state = _state_dict(source)
    found = _roots(state, r"(?P<root>.*?)(?:vq\.)?layers\.(?P<level>\d+)\._codebook\.embed")
    root = _pick(found, prefix, "EnCodec quantizer", "layers.<l>._codebook.embed")
    levels = _levels(found[root], num_quantizers, root)
    derived = dict(beta=1.0, ema_decay=0.99, eps=1e-5, dead_code_threshold=2.0)
    if isinstance(source, nn.Module):
        level = _first_level(source, ("vq",), "EnCodec's ResidualVectorQuantizer or ResidualVectorQuantization")
        book = level._codebook
        derived.update(
            beta=float(level.commitment_weight), ema_decay=float(book.decay), eps=float(book.epsilon),
            dead_code_threshold=float(book.threshold_ema_dead_code),
        )
    codebooks, sizes, sums = [], [], []
    for l, key in levels:
        base = key[: -len("embed")]
        if any(k.startswith(key[: -len("_codebook.embed")] + "project_in.") for k in state):
            raise ValueError(f"EnCodec level {l} projects its input ({key}): levels with a codebook_dim are not supported")
        _check_initialised(state, base + "inited", l, "EnCodec")
        codebooks.append(state[key])
        sizes.append(state[base + "cluster_size"])
        sums.append(state[base + "embed_avg"])
    return _build(codebooks, sizes, sums, derived, layer_kwargs)


# --- Mimi ----------------------------------------------------------------------------------------------


def from_mimi(
    source, *, prefix: str | None = None, num_quantizers: int | None = None, **layer_kwargs
) -> SplitResidualVQ:
    """Mimi's quantizer as a :class:`SplitResidualVQ` with its codebooks and projections.

    ``source`` is moshi's ``SplitResidualVectorQuantizer`` (a ``ResidualVectorQuantizer`` gives a single
    part), or a state_dict holding one (a quantizer's or a whole ``MimiModel``'s: keys
    ``rvq_first.vq.layers.<l>._codebook.embedding_sum`` and so on). ``prefix`` picks the quantizer in a
    state_dict holding several (the keys' part before ``rvq_first.``, or before ``vq.layers.`` for a single
    part). ``num_quantizers``: how many levels in all (Mimi's ``set_num_codebooks``; default the module's
    active ``n_q``, or every level of a state_dict); the semantic levels are always kept.

    The levels are EMA codebooks with Mimi's ``decay`` (read from a module; 0.99 for a state_dict),
    ``eps`` = its ``epsilon`` (1e-5), ``beta=1`` and no dead-code restarts; ``layer_kwargs`` override them
    or add others (``backend``, ``precision``, ...). ``split(x)`` takes Mimi's ``[B, C, T]``; Mimi's
    codes ``[B, L, T]`` are ``indices.transpose(1, 2)``.
    """
    state = _state_dict(source)
    found = _roots(state, r"(?P<root>.*?)vq\.layers\.(?P<level>\d+)\._codebook\.embedding_sum")
    first, rest = "rvq_first.", "rvq_rest."
    splits = {r[: -len(first)] for r in found if r.endswith(first) and r[: -len(first)] + rest in found}
    plain = {r for r in found if not r.endswith((first, rest))}
    root = _pick(dict.fromkeys(splits | plain), prefix, "Mimi quantizer", "[rvq_first.]vq.layers.<l>._codebook.embedding_sum")
    parts = [root + first, root + rest] if root in splits else [root]
    counts = [len(found[p]) for p in parts]
    derived = dict(beta=1.0, ema_decay=0.99, eps=1e-5, dead_code_threshold=0.0)
    if isinstance(source, nn.Module):
        what = "moshi's SplitResidualVectorQuantizer or ResidualVectorQuantizer"
        rvqs = [source.rvq_first, source.rvq_rest] if hasattr(source, "rvq_first") else [source]
        counts = [getattr(rvq, "n_q", None) for rvq in rvqs]
        book = _first_level(rvqs[0], ("vq",), what)._codebook
        derived.update(ema_decay=float(book.decay), eps=float(book.epsilon))
    if num_quantizers is not None:  # the semantic levels, then as many acoustic ones as asked for
        total, kept = sum(len(found[p]) for p in parts), len(found[parts[0]]) if len(parts) == 2 else 1
        num_quantizers = checks.integer("num_quantizers", num_quantizers, kept)
        if num_quantizers > total:
            raise ValueError(f"num_quantizers must be at most the {total} levels of the Mimi quantizer, got {num_quantizers}")
        counts = [kept, num_quantizers - kept] if len(parts) == 2 else [num_quantizers]
    eps = derived["eps"]  # the codec's own, whatever eps our levels get
    rvqs, project_in, project_out = [], [], []
    for part, count in zip(parts, counts):
        if count == 0:  # Mimi with only its semantic levels
            continue
        codebooks, sizes, sums = [], [], []
        for l, key in _levels(found[part], count, part):
            base = key[: -len("embedding_sum")]
            _check_initialised(state, base + "_initialized", l, "Mimi")
            usage = state[base + "cluster_usage"]
            # Mimi's codes, as its EuclideanCodebook.embedding computes them.
            codebooks.append(state[key] / usage.clamp(min=eps)[:, None])
            sizes.append(usage)
            sums.append(state[key])
        rvqs.append(_build(codebooks, sizes, sums, derived, layer_kwargs))
        project_in.append(_projection(state, part + "input_proj.weight", codebooks[0].shape[1], "in"))
        project_out.append(_projection(state, part + "output_proj.weight", codebooks[0].shape[1], "out"))
    return SplitResidualVQ(rvqs, project_in, project_out)


def _projection(state: dict, key: str, dim: int, side: str) -> nn.Conv1d:
    """A 1x1 convolution without bias holding ``state[key]`` (``[out, in, 1]``); the identity when the key
    is absent (a part without projection), as a convolution too so every part has the same form."""
    if key not in state:
        weight = torch.eye(dim).unsqueeze(-1)
    else:
        weight = state[key]
        if weight.dim() != 3 or weight.shape[2] != 1 or weight.shape[0 if side == "in" else 1] != dim:
            raise ValueError(f"{key} must be a [out, in, 1] 1x1 convolution to or from {dim} channels, got {tuple(weight.shape)}")
    conv = nn.Conv1d(weight.shape[1], weight.shape[0], 1, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


# --- shared: reading a state_dict, building the ResidualVQ -----------------------------------------------


def _first_level(module: nn.Module, wrappers: tuple[str, ...], what: str) -> nn.Module:
    """Level 0 of a codec's residual quantizer (``module.layers[0]``, or through its ``wrappers`` attributes)."""
    for name in wrappers:
        module = getattr(module, name, module)
    layers = getattr(module, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or not hasattr(layers[0], "_codebook"):
        raise TypeError(f"source must be {what} (or a state_dict holding one), got {type(module).__name__}")
    return layers[0]


def _state_dict(source) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"source must be the codec's quantizer module or a state_dict, got {type(source).__name__}")


def _roots(state: dict, pattern: str) -> dict[str, dict[int, str]]:
    """``{root: {level: key}}`` of the keys matching ``pattern`` (groups ``root`` and ``level``)."""
    found: dict[str, dict[int, str]] = {}
    regex = re.compile(pattern)
    for key in state:
        m = regex.fullmatch(key)
        if m:
            found.setdefault(m["root"], {})[int(m["level"])] = key
    return found


def _pick(found: dict, prefix: str | None, what: str, pattern: str) -> str:
    """The one root among ``found`` (or the one ``prefix`` names)."""
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if prefix not in found:
            raise ValueError(f"no {what} under prefix {prefix!r}; the state_dict holds one under {sorted(found)}")
        return prefix
    if len(found) != 1:
        if not found:
            raise ValueError(f"the state_dict holds no {what}: no key of the form {pattern}")
        raise ValueError(f"the state_dict holds several {what}s, under prefixes {sorted(found)}: pass prefix=")
    return next(iter(found))


def _levels(levels: dict[int, str], count: int | None, root: str) -> list[tuple[int, str]]:
    """The first ``count`` levels (all by default), which must be numbered 0, 1, ... without gaps."""
    if sorted(levels) != list(range(len(levels))):
        raise ValueError(f"the levels under {root!r} must be numbered 0 .. L-1, got {sorted(levels)}")
    count = len(levels) if count is None else checks.integer("num_quantizers", count, 1)
    if count > len(levels):
        raise ValueError(f"num_quantizers must be at most the {len(levels)} levels under {root!r}, got {count}")
    return [(l, levels[l]) for l in range(count)]


def _check_initialised(state: dict, key: str, level: int, codec: str) -> None:
    if key in state and not bool(state[key].all()):
        raise ValueError(
            f"{codec} level {level} was never initialised ({key} is False): its codebook waits for k-means on a "
            "first training batch, so there is nothing to load yet"
        )


def _build(codebooks: list[Tensor], sizes: list[Tensor], sums: list[Tensor], derived: dict, layer_kwargs: dict) -> ResidualVQ:
    """A channel-first ResidualVQ with one level per codebook ``[K, D]``, holding those codes and statistics."""
    refused = sorted(set(layer_kwargs) & set(_REFUSED))
    if refused:
        raise ValueError(f"{refused} would change how the codec's codebooks quantize; they cannot be set here")
    shapes = {tuple(c.shape) for c in codebooks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every level's codebook must be [K, D] of one shape, got {sorted(shapes)}")
    num_codes, dim = next(iter(shapes))
    kwargs = {"channel_dim": 1, **derived, **layer_kwargs}
    if kwargs.get("ema_decay") is None and "dead_code_threshold" not in layer_kwargs:
        kwargs.pop("dead_code_threshold")  # a learned codebook has no EMA sizes to find dead codes by
    rvq = ResidualVQ(dim, num_codes, len(codebooks), **kwargs)
    with torch.no_grad():
        for layer, codes, size, total in zip(rvq.layers, codebooks, sizes, sums):
            layer.codebook.copy_(codes)
            if layer.ema_decay is not None:
                layer.cluster_size.copy_(size)
                layer.embed_sum.copy_(total)
    return rvq
