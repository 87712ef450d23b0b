"""What every translator in :mod:`vqtriton.compat` shares: the vqp version it follows, and the refusal
of an argument value it does not implement (by name, never silently ignored)."""

from __future__ import annotations

__all__ = ["VQP_VERSION", "is_default", "refuse"]

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
