"""Input checks shared by the public functions and the layer.

Bad input is answered before any kernel launches, with the error PyTorch itself would raise:
TypeError for a wrong kind of object or dtype, ValueError for wrong shapes, values or names,
IndexError for indices out of range. Messages name the shapes and dtypes they saw.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "float_tensor", "codebook", "latents", "indices", "index_range", "mask", "choice", "same_device", "integer", "real",
    "generator",
]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), got {t.dtype}")
    return t


def codebook(c) -> torch.Tensor:
    float_tensor("codebook", c)
    if c.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {tuple(c.shape)}")
    if c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"codebook must have K >= 1 codes of D >= 1 dims, got shape {tuple(c.shape)}")
    return c


def same_device(**tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"tensors must be on one device, got {seen}")


def latents(z, c: torch.Tensor, name: str = "z") -> torch.Tensor:
    """``z [..., D]`` against a checked codebook ``[K, D]``."""
    float_tensor(name, z)
    if z.dim() < 1 or z.shape[-1] != c.shape[1]:
        raise ValueError(
            f"{name} must be [..., D] with D = {c.shape[1]} (the codebook's), got {name} {tuple(z.shape)} "
            f"and codebook {tuple(c.shape)}"
        )
    same_device(**{name: z, "codebook": c})
    return z


def indices(idx, name: str = "indices", device: torch.device | None = None) -> torch.Tensor:
    """An integer tensor of indices (-1: no code), returned as int64. Its kind and ``device`` (the
    codebook's) are checked here, from metadata alone; the values by :func:`index_range`."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in _INT_DTYPES:
        kinds = "/".join(str(t).removeprefix("torch.") for t in _INT_DTYPES)
        raise TypeError(f"{name} must be an integer tensor ({kinds}), got {idx.dtype}")
    if device is not None and idx.device != torch.device(device):
        raise ValueError(f"tensors must be on one device, got {name} on {idx.device}, codebook on {device}")
    return idx.to(torch.int64)


def index_range(idx: torch.Tensor, num_codes: int, name: str = "indices") -> None:
    """Index values in ``[-1, num_codes)``: an index out of range would make a kernel read outside the
    codebook. Reads the values (one device sync on CUDA); while a CUDA graph is being captured, where
    no value can be read, a device-side assert checks them instead."""
    if not idx.numel():
        return
    if idx.is_cuda and torch.cuda.is_current_stream_capturing():
        ok = ((idx >= -1) & (idx < num_codes)).all()
        torch._assert_async(ok, f"{name} must lie in [0, {num_codes}) (or be -1 for no code)")
        return
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one sync
    if lo < -1 or hi >= num_codes:
        raise IndexError(f"{name} must lie in [0, {num_codes}) (or be -1 for no code), got values in [{lo}, {hi}]")


def mask(m, shape: torch.Size, device: torch.device, what: str) -> torch.Tensor:
    """A bool mask of ``shape`` on ``device``; ``what`` says which shape that is, for the error."""
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(m, 'dtype', type(m).__name__)}")
    if m.shape != shape:
        raise ValueError(f"mask must have {what}, got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"tensors must be on one device, got mask on {m.device}, z on {device}")
    return m


def choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def integer(name: str, value, low: int | None = None) -> int:
    """A Python int (not a bool), at least ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def real(name: str, value, ok, requirement: str) -> float:
    """A finite real number (not a bool) for which ``ok(value)`` holds; ``requirement`` says which."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {requirement}, got {value}")
    return float(value)


def generator(g):
    """A ``torch.Generator`` or None (a layer's random draws: None means torch's global generator)."""
    if g is not None and not isinstance(g, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(g).__name__}")
    return g


def generator_device(g: torch.Generator | None, device: torch.device) -> None:
    """A module's generator draws where its tensors are (``.to()`` does not move a generator): say so before
    any draw fails inside a step."""
    if g is not None and g.device.type != device.type:
        raise ValueError(f"the module's generator is on {g.device}, its input on {device}: give the module a "
                         f"torch.Generator(device={device.type!r})")
