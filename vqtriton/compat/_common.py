"""What every translator in :mod:`vqtriton.compat` shares: the vqp version it follows, and the refusal
of an argument value it does not implement (by name, never silently ignored), and the translation of vqp's
quantize dropout that its residual quantizers share."""

from __future__ import annotations

import random
from math import ceil

import torch
from torch import nn

from vqtriton import checks

__all__ = ["VQP_VERSION", "is_default", "refuse", "vqp_dropout_probability", "vqp_fixed_seed_levels", "set_vqp_dropout",
           "dropout_translation", "dropout_count"]

VQP_VERSION = "1.32.0"


def is_default(value, default) -> bool:
    """``value`` is vqp's default (by identity, or equal as a plain number or string; a tensor, module or
    callable given for it never is)."""
    plain = (bool, int, float, str)
    return value is default or (isinstance(value, plain) and isinstance(default, plain) and value == default)


def refuse(cls: str, given: dict, defaults: dict, where: str) -> None:
    """Raise NotImplementedError naming the first argument of ``given`` that differs from its vqp default
    in ``defaults`` (``cls`` and ``where`` say whose argument it is)."""
    for name, default in defaults.items():
        value = given[name]
        if not is_default(value, default):
            raise NotImplementedError(
                f"vqtriton.compat.{cls} does not implement vector-quantize-pytorch's {name}={value!r} "
                f"({where}; only the default {default!r} is supported)"
            )


def vqp_dropout_probability(num_quantizers: int, enabled: bool, cutoff: int) -> float:
    """The native modules' ``quantize_dropout`` for vqp's: vqp keeps ``n`` levels on every training step, ``n``
    uniform in ``cutoff + 1 .. Q`` (then rounded up to ``quantize_dropout_multiple_of``); the native draw keeps
    all ``Q`` or, with this probability, ``n`` uniform in ``cutoff + 1 .. Q - 1`` (the same rounding): the same
    distribution."""
    q = num_quantizers
    return (q - cutoff - 1) / (q - cutoff) if enabled and cutoff + 1 < q else 0.0


def vqp_fixed_seed_levels(seed, num_quantizers: int, cutoff: int, multiple_of: int) -> int:
    """The levels vqp keeps for ``rand_quantize_dropout_fixed_seed``: Python's ``random.Random(seed)`` draws
    the last kept level in ``[cutoff, Q)``, rounded up to the multiple (host data from the user, so no device
    value is read)."""
    last = random.Random(seed).randrange(cutoff, num_quantizers)
    return min(ceil((last + 1) / multiple_of) * multiple_of, num_quantizers)


def set_vqp_dropout(module: nn.Module, num_quantizers, quantize_dropout, cutoff, multiple_of) -> None:
    """vqp's residual quantizers' attributes ``num_quantizers``, ``quantize_dropout`` (on only with more than
    one level), ``quantize_dropout_cutoff_index`` and ``quantize_dropout_multiple_of``, checked."""
    module.num_quantizers = checks.integer("num_quantizers", num_quantizers, 1)
    module.quantize_dropout = bool(quantize_dropout) and module.num_quantizers > 1
    module.quantize_dropout_cutoff_index = checks.integer("quantize_dropout_cutoff_index", cutoff, 0)
    module.quantize_dropout_multiple_of = checks.integer("quantize_dropout_multiple_of", multiple_of, 1)
    if module.quantize_dropout and module.quantize_dropout_cutoff_index >= module.num_quantizers:
        raise ValueError(f"quantize_dropout_cutoff_index must be < num_quantizers = {module.num_quantizers}, "
                         f"got {module.quantize_dropout_cutoff_index}")


def dropout_translation(module: nn.Module) -> dict:
    """vqp's quantize dropout (``set_vqp_dropout``'s attributes) as the native modules' arguments
    (:func:`vqtriton.compat._common.vqp_dropout_probability`: the same distribution)."""
    q, cutoff = module.num_quantizers, module.quantize_dropout_cutoff_index
    return dict(quantize_dropout=vqp_dropout_probability(q, module.quantize_dropout, cutoff),
                quantize_dropout_cutoff_index=min(cutoff, q - 1),
                quantize_dropout_multiple_of=module.quantize_dropout_multiple_of)


def dropout_count(module: nn.Module, seed, *, needs_grad: bool = True) -> int | None:
    """The levels a vqp residual quantizer keeps this call, where it is known on the host: all of them
    when vqp would not drop (eval mode, no dropout, or, with ``needs_grad`` (vqp's ResidualFSQ / LFQ; not
    its ResidualVQ), no gradient recorded), vqp's own ``random.Random(seed)`` draw for a fixed seed; None
    (the native module draws on the device) otherwise."""
    q = module.num_quantizers
    if not (module.training and module.quantize_dropout and q > 1 and (torch.is_grad_enabled() or not needs_grad)):
        return q
    if seed is None:
        return None
    return vqp_fixed_seed_levels(seed, q, module.quantize_dropout_cutoff_index, module.quantize_dropout_multiple_of)
