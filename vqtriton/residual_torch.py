"""The residual VQ launchers on the portable PyTorch path (``torch_ops`` re-exports them).

The signatures of ``kernels/residual.py``'s launchers, the same arithmetic in the same order where it
decides an index: the residual ``r_{l+1} = r_l - C_l[i_l]`` in float32 (float64 for float64 inputs),
each level's search by ``torch_ops.assign_fwd`` (exact: float64 candidates re-ranked in the direct
form, lowest index on ties), so both backends give the same indices. A level at a time, each in
row chunks: no ``N x K`` matrix beyond ``assign_fwd``'s chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqtriton import torch_ops

__all__ = ["residual_assign_fwd", "residual_backward", "residual_stats"]

# F.normalize's eps, as functional.unit (the cosine metric's vectors).
UNIT_EPS = 1e-12


def _levels(sizes):
    """(level, first code, past the last code) of the stacked codebooks."""
    k0 = 0
    for l, k in enumerate(sizes):
        yield l, k0, k0 + int(k)
        k0 += int(k)


def _unit(r: Tensor) -> Tensor:
    """``r / max(|r|, eps)`` in float64, returned in ``r``'s dtype (``functional.unit``)."""
    return F.normalize(r.to(torch.float64), dim=-1, eps=UNIT_EPS).to(r.dtype)


def _ran(keep: Tensor | None, levels: Tensor | None, l: int, n: int, device) -> Tensor:
    """Bool ``[N]``: level ``l`` ran for each row (kept, and ``l < levels``), decided on the device."""
    on = torch.ones(n, dtype=torch.bool, device=device) if keep is None else keep
    return on if levels is None else on & (levels > l)


def residual_assign_fwd(z: Tensor, codebooks: Tensor, sizes, *, precision: str = "exact", cosine: bool = False,
                        keep: Tensor | None = None, levels: Tensor | None = None, certified: bool | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(idx int64 [N, L], z_q [N, D], dist [N, L])``: see ``kernels.residual.residual_assign_fwd``.

    Every ``precision`` gives the exact answer here; ``certified`` is a kernel detail and is ignored.
    ``z_q`` and ``dist`` are float32, or float64 when an input is float64."""
    n, d = z.shape
    dt = torch_ops.acc_dtype(z, codebooks)
    r = z.to(dt) if keep is None else torch.where(keep[:, None], z.to(dt), 0)
    z_q = torch.zeros(n, d, dtype=dt, device=z.device)
    alive = torch.ones(n, dtype=torch.bool, device=z.device) if keep is None else keep.clone()
    fail = torch.zeros(n, dtype=dt, device=z.device)
    idx, dist = [], []
    for l, k0, k1 in _levels(sizes):
        c = codebooks[k0:k1]
        i, dd, _ = torch_ops.assign_fwd(_unit(r) if cosine else r, c)
        on = alive & _ran(None, levels, l, n, z.device)
        ok = on & (i >= 0)
        fail = torch.where(on & ~ok, dd.to(dt), fail)
        alive = alive & (ok | ~on)
        ran = _ran(keep, levels, l, n, z.device)
        idx.append(torch.where(ok, i, -1))
        dist.append(torch.where(ok, dd.to(dt), torch.where(ran, fail, 0)))
        q = torch_ops.gather(torch.where(ok, i, -1), c).to(dt)
        r, z_q = r - q, z_q + q
    return torch.stack(idx, 1), z_q, torch.stack(dist, 1)


def _normalise_vjp(r: Tensor, h: Tensor) -> Tensor:
    """``J^T h`` for ``x = r / max(|r|, eps)``: ``(h - x (x.h)) / |r|``, or ``h / eps`` below eps."""
    norm = r.to(torch.float64).norm(dim=1, keepdim=True).to(r.dtype)
    x = _unit(r)
    jt = torch.where(norm > UNIT_EPS, (x * h).sum(1, keepdim=True), 0)
    return (h - x * jt) / norm.clamp_min(UNIT_EPS)


def residual_backward(z: Tensor, codes: Tensor, sizes, idx: Tensor, grad_zq: Tensor | None, w: Tensor,
                      v: Tensor | None, *, cosine: bool = False, output_grad: str = "first", rotate: bool = False,
                      keep: Tensor | None = None, levels: Tensor | None = None, deterministic: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """``(dz, dcodebooks or None)``: see ``kernels.residual.residual_backward`` (same formulas)."""
    n, d = z.shape
    dt = torch_ops.acc_dtype(z, codes)
    r = z.to(dt) if keep is None else torch.where(keep[:, None], z.to(dt), 0)
    g = None if grad_zq is None else grad_zq.to(dt)
    dz = torch.zeros(n, d, dtype=dt, device=z.device)
    dcb = None if v is None else torch.zeros(codes.shape[0], d, dtype=dt, device=z.device)
    for l, k0, k1 in _levels(sizes):
        act = _ran(keep, levels, l, n, z.device)
        i = torch.where(act, idx[:, l], -1)
        q = torch_ops.gather(i, codes[k0:k1]).to(dt)
        x = _unit(r) if cosine else r
        h = (2.0 * torch.where(act, w[:, l].to(dt), 0)).unsqueeze(1) * (x - q)
        if g is not None and (output_grad == "every" or l == 0):
            h = h + torch.where(act.unsqueeze(1), torch_ops.rotation(x, q, g) if rotate else g, 0)
        dz = dz + (_normalise_vjp(r, h) if cosine else h)
        if dcb is not None:
            rows = (2.0 * torch.where(i >= 0, v[:, l].to(dt), 0)).unsqueeze(1) * (q - x)
            dcb[k0:k1] += torch_ops.scatter_add(i, rows, k1 - k0, deterministic=deterministic).to(dt)
        r = r - q
    return dz.to(z.dtype), dcb


def residual_stats(z: Tensor, codes: Tensor, sizes, idx: Tensor, *, cosine: bool = False,
                   deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """``(counts float32 [sum K_l], sums [sum K_l, D])``: see ``kernels.residual.residual_stats``."""
    dt = torch_ops.acc_dtype(z, codes)
    r = z.to(dt)
    counts, sums = [], []
    for l, k0, k1 in _levels(sizes):
        c, s = torch_ops.code_stats(idx[:, l], _unit(r) if cosine else r, k1 - k0, deterministic=deterministic)
        counts.append(c)
        sums.append(s)
        r = r - torch_ops.gather(idx[:, l], codes[k0:k1]).to(dt)
    return torch.cat(counts), torch.cat(sums)
