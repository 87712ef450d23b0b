"""What every translator in :mod:`vqtriton.compat` shares: the vqp version it follows, and the refusal
of an argument value it does not implement (by name, never silently ignored), and the translation of vqp's
quantize dropout that its residual quantizers share."""

from __future__ import annotations

import random
from math import ceil

__all__ = ["VQP_VERSION", "is_default", "refuse", "vqp_dropout_probability", "vqp_fixed_seed_levels"]

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
