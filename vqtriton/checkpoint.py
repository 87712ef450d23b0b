"""Checkpoints a killed training run can resume from exactly: atomic writes, verified loads, RNG state.

A run resumed from a checkpoint takes the same steps as the run that never stopped only if the file
holds *everything the next step depends on*: the model's parameters and buffers (a VQ layer's EMA
statistics and ``initted`` flag are buffers), the optimizer's state, the step counter, and the state
of every random number generator the loop draws from: torch's CPU and CUDA generators (a layer's
k-means seeds, dead-code restarts and quantize dropout draw from them unless it was given a
``generator``), Python's and NumPy's (if the loop uses them), and the loop's own ``torch.Generator``
objects (a batch sampler's, a layer's). :func:`rng_state` captures those and :func:`set_rng_state`
puts them back.

:func:`save` writes the whole file or nothing: the bytes go to a temp file in the target's folder,
are flushed and ``fsync``-ed, and only then does ``os.replace`` put the temp file in the target's
place (then the folder is ``fsync``-ed, so the rename survives a power cut too). A process killed
at any moment leaves the previous checkpoint whole; a kill before the rename also leaves the temp
file behind (``.NAME.*.tmp``: see :func:`stale_temp_files`), which is never read.

:func:`load` verifies what it read: a SHA-256 digest of the state's contents is written inside the
file, and a truncated, damaged or foreign file raises :class:`CheckpointError` naming the file. (A
``torch.save`` file has no checksum that ``torch.load`` checks: measured with torch 2.13, 201 of 300
single-byte flips of a small checkpoint loaded without an error and with changed values.) The file
is an ordinary ``torch.save`` file of the state's own keys plus one, ``"vqtriton_checkpoint"`` (the
format and the digest): ``torch.load(path, weights_only=True)`` reads it too, unverified.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
from collections.abc import Callable, Mapping

import torch

__all__ = [
    "CheckpointError", "save", "load", "stale_temp_files", "remove_stale_temp_files", "rng_state", "set_rng_state",
]

FORMAT = "vqtriton.checkpoint/1"
HEADER = "vqtriton_checkpoint"  # the one key save() adds to the state: {"format": FORMAT, "sha256": digest}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be trusted: truncated, damaged, or not written by :func:`save`."""


# --- the digest: every value of the state, in the order it is stored --------------------------------


def _digest(state) -> str:
    h = hashlib.sha256()
    _feed(h, state, "state")
    return h.hexdigest()


def _feed(h, value, where: str) -> None:
    """Hash ``value`` with a type tag, so that e.g. ``1``, ``1.0``, ``True`` and ``"1"`` differ."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            raise TypeError(f"{where}: a checkpoint holds strided tensors with values, got a {value.layout} "
                            f"{'meta ' if value.is_meta else ''}tensor of dtype {value.dtype}")
        t = value.detach().resolve_conj().resolve_neg().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _feed(h, key, f"{where} (a key)")
            _feed(h, item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}|".encode())
        for i, item in enumerate(value):
            _feed(h, item, f"{where}[{i}]")
    elif value is None or isinstance(value, (bool, str, torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}:{value}|".encode())
    elif isinstance(value, int):
        h.update(f"i{value}|".encode())
    elif isinstance(value, float):
        h.update(f"f{value.hex()}|".encode())
    elif isinstance(value, bytes):
        h.update(f"B{len(value)}|".encode() + value)
    else:
        raise TypeError(
            f"{where}: a checkpoint holds tensors, dicts, lists, tuples, str, int, float, bool, bytes and None, "
            f"got {type(value).__name__}"
        )


# --- atomic save, verified load -----------------------------------------------------------------------


class _Tap:
    """The temp file as ``torch.save`` writes it, calling ``hook("partial")`` once after the first bytes
    (a test hook: see :func:`save`)."""

    def __init__(self, f, hook):
        self.f, self.hook = f, hook

    def write(self, data) -> int:
        n = self.f.write(data)
        if self.hook is not None and n:
            self.f.flush()
            hook, self.hook = self.hook, None
            hook("partial")
        return n

    def flush(self) -> None:
        self.f.flush()


def _temp_pattern(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")


def stale_temp_files(path) -> list[str]:
    """The temp files that :func:`save` calls to ``path`` left behind when their process was killed
    before the rename (never read: the checkpoint at ``path`` is the one that counts)."""
    return sorted(glob.glob(_temp_pattern(os.fspath(path))))


def remove_stale_temp_files(path) -> list[str]:
    """Delete :func:`stale_temp_files` of ``path`` (call it where no other process is saving to ``path``)
    and return their names."""
    removed = stale_temp_files(path)
    for tmp in removed:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
    return removed


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is all there is
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that refuses fsync on folders
        pass
    finally:
        os.close(fd)


def save(state: dict, path, *, _hook: Callable[[str], None] | None = None) -> None:
    """Write ``state`` (a dict of tensors, dicts, lists, tuples and Python scalars) to ``path`` atomically,
    with a digest of its contents that :func:`load` checks.

    After the call returns, ``path`` holds ``state``; if the process dies during the call, ``path`` holds
    what it held before (or nothing, if nothing was there) and a temp file may be left beside it. Every
    value is checked before a byte is written (``TypeError`` names an unsupported one). Saving draws no
    random number from any generator.

    ``_hook`` (for fault-injection tests only) is called with ``"partial"`` once the temp file holds
    some of the bytes, ``"written"`` once it holds all of them, fsync-ed, and ``"renamed"`` after the
    rename, before the folder's fsync: a test kills the process there.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    if HEADER in state:
        raise ValueError(f"state must not have the key {HEADER!r}: save() writes its digest there")
    path = os.fspath(path)
    payload = {**state, HEADER: {"format": FORMAT, "sha256": _digest(state)}}
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # os.urandom: no RNG state
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, _Tap(f, _hook))
            f.flush()
            os.fsync(f.fileno())
        if _hook is not None:
            _hook("written")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    if _hook is not None:
        _hook("renamed")
    _fsync_folder(folder)


def load(path, map_location=None) -> dict:
    """The state that :func:`save` wrote to ``path``, its digest checked (``weights_only`` unpickling).

    Raises ``FileNotFoundError`` when there is no file, and :class:`CheckpointError` naming the file when
    it cannot be unpickled (truncated, damaged), was not written by :func:`save`, or its contents do not
    match the digest written with them.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file fails in many ways: zip, pickle, unicode, seek, sizes
        raise CheckpointError(
            f"checkpoint {path} cannot be read: the file is truncated, damaged or not a torch checkpoint "
            f"({type(e).__name__}: {e})"
        ) from e
    header = payload.pop(HEADER, None) if isinstance(payload, dict) else None
    if not (isinstance(header, dict) and header.get("format") == FORMAT and isinstance(header.get("sha256"), str)):
        raise CheckpointError(
            f"checkpoint {path} was not written by vqtriton.checkpoint.save (no {HEADER!r} entry with the format "
            f"{FORMAT!r} and a digest), or that entry is damaged"
        )
    if _digest(payload) != header["sha256"]:
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the digest written with them")
    return payload


# --- random number generators ------------------------------------------------------------------------


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The state of every random number generator a training step may draw from, as tensors and Python
    values (``weights_only``-loadable): torch's CPU generator, each CUDA device's (when this process has
    initialised CUDA; a process that never did has drawn nothing there), Python's ``random``, NumPy's
    global generator, and the named ``generators`` the loop owns (a batch sampler's, a layer's)."""
    import numpy as np

    generators = _named_generators(generators)
    np_state = np.random.get_state(legacy=False)
    if np_state["bit_generator"] != "MT19937":
        raise ValueError(f"numpy's global generator is {np_state['bit_generator']}, expected MT19937")
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what :func:`rng_state` captured. ``generators`` must name the same generators as then
    (``ValueError`` otherwise); CUDA states need as many CUDA devices as there were. The states may lie on
    any device (a checkpoint loaded with ``map_location="cuda"``): they are read back to the CPU first."""
    import numpy as np

    generators = _named_generators(generators)
    if not isinstance(state, Mapping) or not {"torch", "python", "numpy", "generators"} <= set(state):
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"state must be what rng_state() returned (torch, python, numpy, generators), got {keys}")
    if set(state["generators"]) != set(generators):
        raise ValueError(
            f"the RNG state holds the generators {sorted(state['generators'])}, got {sorted(generators)} to restore"
        )
    cuda = state.get("cuda")
    if cuda is not None and (not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda)):
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(
            f"the RNG state holds {len(cuda)} CUDA generator states, this process sees {seen} CUDA devices"
        )
    torch.set_rng_state(state["torch"].cpu())
    if cuda is not None:
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    for name, g in generators.items():
        g.set_state(state["generators"][name].cpu())


def _named_generators(generators) -> dict:
    if generators is None:
        return {}
    if not isinstance(generators, Mapping):
        raise TypeError(f"generators must be a dict of name -> torch.Generator, got {type(generators).__name__}")
    for name, g in generators.items():
        if not isinstance(name, str) or not isinstance(g, torch.Generator):
            raise TypeError(f"generators must map names (str) to torch.Generator, got {name!r}: {type(g).__name__}")
    return dict(generators)
