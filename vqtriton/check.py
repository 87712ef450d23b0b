"""``vqtriton check``: every public op against the NumPy references, on every backend here.

Each row of the table is one op at one shape on one backend: the largest error against
:mod:`vqtriton.reference` (float64), the fraction of indices equal to the reference's, and the
time the op took. A row fails when an index differs or an error passes its tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vqtriton import reference as R
from vqtriton.bench import sync

# (N, K, D) per device: the interpreter is slow, so CPU shapes stay small.
SHAPES = {
    "cpu": [(1000, 333, 47), (1, 1, 1), (64, 17, 300)],
    "cuda": [(65536, 1024, 64), (1000, 333, 47), (1, 1, 1), (4096, 4096, 300)],
}
# Tolerances in float32: relative to the reference's scale.
RTOL = 1e-5


@dataclass
class Row:
    op: str
    backend: str
    shape: str
    max_error: float
    agreement: float
    ms: float
    ok: bool


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    scale = max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0
    return float(np.max(np.abs(got - want)) / scale) if np.size(want) else 0.0


def _timed(fn: Callable):
    """``fn()`` and its wall time in ms, the device synchronised around it."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - t0) * 1e3


def _check_assign(vqt, z, c, backend, device):
    (idx, dist), ms = _timed(lambda: vqt.assign(z, c, return_distance=True, backend=backend))
    d = R.squared_distances(_f64(z), _f64(c))
    ref = d.argmin(-1)
    agree = float(np.mean(idx.cpu().numpy() == ref)) if len(ref) else 1.0
    err = _rel_err(_f64(dist), d.min(-1) if len(ref) else np.zeros(0))
    return err, agree, ms, agree == 1.0 and err <= RTOL


def _check_lookup(vqt, z, c, backend, device):
    idx = torch.randint(0, c.shape[0], (z.shape[0],), device=device)
    cg = c.clone().requires_grad_()
    out, ms = _timed(lambda: vqt.lookup(idx, cg, backend=backend))
    g = torch.randn_like(out)
    out.backward(g)
    expected = np.zeros(c.shape)
    np.add.at(expected, idx.cpu().numpy(), _f64(g))
    exact = torch.equal(out.detach(), c[idx])
    err = _rel_err(_f64(cg.grad), expected)
    return err, 1.0, ms, exact and err <= RTOL


def _check_squared_error(vqt, z, c, backend, device):
    b = torch.randn_like(z)
    a = z.clone().requires_grad_()
    out, ms = _timed(lambda: vqt.squared_error(a, b, backend=backend))
    out.backward()
    want = np.sum((_f64(z) - _f64(b)) ** 2)
    err = max(_rel_err(_f64(out), np.asarray(want)), _rel_err(_f64(a.grad), 2 * (_f64(z) - _f64(b))))
    return err, 1.0, ms, err <= RTOL


def _check_quantize(vqt, z, c, backend, device):
    beta = 0.25
    zg, cg = z.clone().requires_grad_(), c.clone().requires_grad_()
    r, ms = _timed(lambda: vqt.quantize(zg, cg, beta, backend=backend))
    g = torch.randn_like(zg)
    ((r.z_q * g).sum() + r.loss).backward()
    model = R.Model(lambda x: x, _f64(c), lambda q: q)
    ref_idx = R.nearest_code(_f64(z), _f64(c))
    agree = float(np.mean(r.indices.cpu().numpy() == ref_idx)) if len(ref_idx) else 1.0
    dz, dc = R.loss_grad(model, beta, _f64(z), ref_idx, _f64(g))
    want_loss = R.codebook_loss(model, _f64(z), ref_idx) + beta * R.commitment_loss(model, _f64(z), ref_idx)
    err = max(
        _rel_err(_f64(r.loss), np.asarray(want_loss)),
        _rel_err(_f64(zg.grad), dz),
        _rel_err(_f64(cg.grad), dc),
    )
    return err, agree, ms, agree == 1.0 and err <= RTOL


def _check_verify(vqt, z, c, backend, device):
    idx = vqt.assign(z, c, backend=backend)
    ok, ms = _timed(lambda: vqt.verify_assignment(z, c, idx, backend=backend))
    frac = float(ok.float().mean()) if ok.numel() else 1.0
    return 0.0, frac, ms, frac == 1.0


def _check_topk(vqt, z, c, backend, device):
    """``assign(k=...)``: each position's index and distance against the float64 k nearest."""
    k = min(5, c.shape[0])
    (idx, dist), ms = _timed(lambda: vqt.assign(z, c, k=k, return_distance=True, backend=backend))
    ref = R.nearest_codes(_f64(z), _f64(c), k)
    agree = float(np.mean(idx.cpu().numpy() == ref)) if ref.size else 1.0
    d = R.squared_distances(_f64(z), _f64(c))
    err = _rel_err(_f64(dist), np.take_along_axis(d, ref, -1)) if ref.size else 0.0
    return err, agree, ms, agree == 1.0 and err <= RTOL


def _check_residual_assign(vqt, z, c, backend, device):
    """Three residual levels in one launch against the float64 residual loop (level l's codes: c / 2^l)."""
    books = torch.stack([c * 0.5**l for l in range(3)])
    r, ms = _timed(lambda: vqt.residual_assign(z, books, backend=backend))
    idx, z_q, dist = R.residual_nearest(_f64(z), _f64(books))
    agree = float(np.mean(r.indices.cpu().numpy() == idx)) if idx.size else 1.0
    err = max(_rel_err(_f64(r.z_q), z_q), _rel_err(_f64(r.distances), dist)) if idx.size else 0.0
    return err, agree, ms, agree == 1.0 and err <= RTOL


def _check_lfq_entropy(vqt, z, c, backend, device):
    """LFQ's per-sample and batch entropies over ``2^d`` sign codes (``d = min(D, 10)``), without the N x 2^d
    softmax, against the float64 definitions (which build it)."""
    x = z[:, : min(z.shape[1], 10)]
    r, ms = _timed(lambda: vqt.lfq_entropy(4.0 * x, backend=backend))  # bit logits 4 tau m x, tau = m = 1
    if not x.shape[0]:
        return 0.0, 1.0, ms, bool((r.per_sample == 0) & (r.batch == 0))
    want = (R.lfq_per_sample_entropy(_f64(x), 1.0, 1.0), R.lfq_batch_entropy(_f64(x), 1.0, 1.0))
    err = max(_rel_err(_f64(r.per_sample), np.asarray(want[0])), _rel_err(_f64(r.batch), np.asarray(want[1])))
    return err, 1.0, ms, err <= RTOL


def _check_vqvae_loss(vqt, z, c, backend, device):
    """VQVAE.loss with linear encoder/decoder against reference.loss on the same model."""
    obs = z.shape[1] + 3
    enc = torch.nn.Linear(obs, z.shape[1]).to(device)
    dec = torch.nn.Linear(z.shape[1], obs).to(device)
    vq = vqt.VectorQuantizer(z.shape[1], c.shape[0], backend=backend).to(device)
    with torch.no_grad():
        vq.codebook.copy_(c)
    model = vqt.VQVAE(enc, vq, dec)
    x = torch.randn(z.shape[0], obs, device=device)
    out, ms = _timed(lambda: model.loss(x, beta=0.25))
    w_e, b_e = _f64(enc.weight), _f64(enc.bias)
    w_d, b_d = _f64(dec.weight), _f64(dec.bias)
    ref_model = R.Model(lambda v: v @ w_e.T + b_e, _f64(c), lambda q: q @ w_d.T + b_d)
    idx = R.nearest_code(R.encode(ref_model, _f64(x)), _f64(c))
    want = R.loss(ref_model, 0.25, _f64(x), idx)
    err = _rel_err(_f64(out.total), np.asarray(want))
    return err, 1.0, ms, err <= 10 * RTOL


CHECKS = {
    "assign": _check_assign,
    "assign(offset 100)": _check_assign,
    "lookup": _check_lookup,
    "squared_error": _check_squared_error,
    "quantize": _check_quantize,
    "verify_assignment": _check_verify,
    "VQVAE.loss": _check_vqvae_loss,
    "assign(k=5)": _check_topk,
    "residual_assign(L=3)": _check_residual_assign,
    "lfq_entropy": _check_lfq_entropy,
}


def run_checks(device: str, backends: list[str], seed: int = 0) -> list[Row]:
    import vqtriton as vqt

    rows = []
    for backend in backends:
        for n, k, d in SHAPES[device]:
            for op, fn in CHECKS.items():
                torch.manual_seed(seed)
                offset = 100.0 if "offset" in op else 0.0
                z = torch.randn(n, d, device=device) + offset
                c = torch.randn(k, d, device=device) + offset
                err, agree, ms, ok = fn(vqt, z, c, backend, device)
                rows.append(Row(op, backend, f"{n}x{k}x{d}", err, agree, ms, ok))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("op", "backend", "N x K x D", "max error", "index agreement", "time ms", "")
    body = [
        (r.op, r.backend, r.shape, f"{r.max_error:.2e}", f"{r.agreement:.4f}", f"{r.ms:.2f}", "ok" if r.ok else "FAIL")
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
