"""Small helpers shared by the test files (imported as ``helpers``: tests/ is on sys.path)."""

import numpy as np
import torch


def shape_id(s) -> str:
    """Test id of an ``(N, K, D)`` shape."""
    return "N{}-K{}-D{}".format(*s)


def f64(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy (never a view of a live buffer)."""
    return t.detach().to("cpu", torch.float64).numpy().copy()


def random_idx(n: int, k: int, device, *, masked: float = 0.1) -> torch.Tensor:
    """Indices in [0, k) with duplicates, about ``masked`` of them -1 ("no code")."""
    idx = torch.randint(0, k, (n,), device=device)
    return torch.where(torch.rand(n, device=device) < masked, -1, idx)


class PoisonedTorch:
    """Stands in for ``torch`` inside a kernel module: ``empty`` hands out poisoned buffers (NaN, or
    -7 for integers), so an output element a kernel forgets to write shows up."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, **kw):
        t = torch.empty(*size, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)


def poison(monkeypatch, *modules) -> None:
    """Make ``torch.empty`` inside each of ``modules`` hand out poisoned buffers."""
    for m in modules:
        monkeypatch.setattr(m, "torch", PoisonedTorch())
