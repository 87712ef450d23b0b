"""Robustness of the public API: bad input, edge input, NaN/Inf, huge tensors, determinism, fuzzing, state.

Every public function (``assign``, ``lookup``, ``squared_error``, ``quantize``, ``verify_assignment``), the
layer and the model, on both backends ("triton" runs the kernels through the interpreter on a CPU). The
oracles at the top state the documented behaviour once; the deterministic tests and the hypothesis fuzz
both check against them. GPU-only checks (N·D > 2^31, bitwise reproducibility under real concurrency,
CPU/CUDA mixing) are marked ``gpu``.
"""

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import vqtriton as vqt
from vqtriton import reference as R
from vqtriton import torch_ops
from vqtriton.backend import ops
from helpers import f64

BACKENDS = ["torch", "triton"]
# Every launcher a backend has (torch_ops and the Triton kernels share these names).
LAUNCHERS = torch_ops.__all__
FLT_MAX = float(torch.finfo(torch.float32).max)
CONTRACT = 2.0**-16
# Relative and absolute tolerances of a value computed in fp32 and rounded once to the dtype. The
# absolute part is a few steps of the dtype's subnormal spacing (tiny inputs lose relative precision).
TOL = {
    torch.float32: (2e-5, 2.0**-147),
    torch.float16: (2e-3, 2.0**-22),
    torch.bfloat16: (1.6e-2, 2.0**-131),
    torch.float64: (1e-12, 1e-300),
}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@contextlib.contextmanager
def deterministic_algorithms(mode: bool = True, warn_only: bool = False):
    """``torch.use_deterministic_algorithms(mode)`` for the block, then the previous setting."""
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bits (NaN payloads and signed zeros included) for bitwise comparisons."""
    return t.detach().contiguous().view(BITS[t.dtype])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (floats), or equal values (integers, bools)."""
    if a.dtype != b.dtype:
        return False
    return torch.equal(bits(a), bits(b)) if a.is_floating_point() else torch.equal(a, b)


def stored(x32: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``x32`` (float32) as a kernel stores it in ``dtype``: rounded to nearest even, except bfloat16
    under Triton's interpreter, which truncates (seen with triton 3.9; a GPU rounds)."""
    if backend == "triton" and dtype == torch.bfloat16 and x32.device.type == "cpu":
        return (x32.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    return x32.to(dtype)


def wide(*tensors) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


# --- oracles: the documented behaviour, against float64 ------------------------------------------


def check_assign(z, c, idx, dist, metric="l2"):
    """``assign``'s contract and NaN/Inf policy, row by row, against float64.

    - a vector holding a NaN (after normalising, for cosine) gets -1 and distance NaN; one holding +-Inf
      (no NaN) gets -1 and +Inf; a finite vector whose distances overflow the output dtype gets -1, +Inf;
    - otherwise a finite code within (1 + 2^-16) of the float64 minimum, plus ``D 2^-146`` where float32
      squares underflow (cosine: plus 2e-6, the rounding of the float32 unit vectors), the lowest of
      identical codes, the lowest exact argmin on small-integer data, and ``dist`` its distance.
    """
    d = c.shape[1]
    zz, cc = f64(z).reshape(-1, d), f64(c)
    i, got = idx.cpu().numpy().reshape(-1), f64(dist).reshape(-1)
    assert idx.dtype == torch.int64 and idx.shape == z.shape[:-1] and dist.shape == z.shape[:-1]
    assert dist.dtype == (torch.float64 if wide(z, c) else torch.float32)
    big = float(np.finfo(np.float64 if wide(z, c) else np.float32).max)
    slack = 0.0 if wide(z, c) else d * 2.0**-146
    if metric == "cosine":
        with np.errstate(invalid="ignore"):
            zz, cc = R.normalize(zz), R.normalize(cc)
        slack += 2e-6
    usable = np.isfinite(cc).all(1)
    assert usable.any(), "the oracle covers codebooks with a finite code"
    small_ints = metric == "l2" and all(
        np.all(np.abs(v[np.isfinite(v)]) <= 64) and np.all(v[np.isfinite(v)] == np.round(v[np.isfinite(v)]))
        for v in (zz, cc)
    )
    with np.errstate(invalid="ignore", over="ignore"):
        dd = np.square(zz[:, None, :] - cc[None, :, :]).sum(-1)  # [N, K]
    dd[:, ~usable] = np.inf
    for r in range(i.size):
        row, k = zz[r], i[r]
        if np.isnan(row).any():
            assert k == -1 and np.isnan(got[r]), (r, k, got[r])
            continue
        if np.isinf(row).any():
            assert k == -1 and got[r] == np.inf, (r, k, got[r])
            continue
        m = dd[r].min()
        if k == -1:
            assert m >= big * (1 - 2**-14) and got[r] == np.inf, f"row {r}: -1 for a finite distance {m}"
            continue
        assert m <= big * (1 + 2**-14), f"row {r}: a code for an overflowing distance {m}"
        assert 0 <= k < cc.shape[0] and usable[k], (r, k)
        assert dd[r, k] <= m * (1 + CONTRACT) + slack, f"row {r}: code {k} at {dd[r, k]}, minimum {m}"
        assert abs(got[r] - dd[r, k]) <= 2**-16 * dd[r, k] + slack, (r, got[r], dd[r, k])
        if metric == "l2":
            assert k == np.nonzero((cc == cc[k]).all(1))[0][0], f"row {r}: not the lowest of identical codes"
        if small_ints:
            assert k == np.argmin(dd[r]), f"row {r}: exact tie not broken to the lowest index"


def check_lookup(idx, c, out):
    """``codebook[idx]`` bit for bit in the codebook's dtype; -1 gives zeros."""
    assert out.dtype == c.dtype and out.shape == (*idx.shape, c.shape[1])
    code = c.detach()[idx.clamp_min(0).long()]
    want = torch.where((idx >= 0).unsqueeze(-1), code, torch.zeros((), dtype=c.dtype, device=c.device))
    assert torch.equal(bits(out), bits(want))


def assert_close64(got, want, mag=None, dtype=None, what=""):
    """``got`` against the float64 ``want`` rounded to ``dtype`` (default: ``got``'s): NaN where NaN,
    infinities where they are, else within rtol of ``mag`` (default ``|want|``) plus the dtype's atol."""
    dtype = dtype or got.dtype
    rtol, atol = TOL[dtype]
    want_t = torch.as_tensor(np.asarray(want, dtype=np.float64)).to(dtype).double().numpy()
    g = f64(got)
    assert g.shape == want_t.shape, (what, g.shape, want_t.shape)
    nan_g, nan_w = np.isnan(g), np.isnan(want_t)
    assert np.array_equal(nan_g, nan_w), f"{what}: NaN at {np.argwhere(nan_g != nan_w)[:5].tolist()}"
    inf_w = np.isinf(want_t)
    assert np.array_equal(g[inf_w], want_t[inf_w]), f"{what}: infinities differ"
    ok = ~nan_w & ~inf_w
    m = np.abs(want_t) if mag is None else np.abs(np.asarray(mag, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        err = np.abs(g - want_t)
    bad = ok & (err > rtol * np.broadcast_to(m, err.shape) + atol)
    where = np.argwhere(bad)[:5].tolist()
    assert not bad.any(), f"{what}: first mismatches {where}, got {g[bad][:5]}, want {want_t[bad][:5]}"


def assert_total(got, want, limit, what="", sum_=None):
    """A float32 (float64) sum of nonnegative terms (``sum_``; ``want`` is it, or it scaled): NaN as NaN,
    +Inf when the sum overflows, else close to ``want``."""
    g = float(got.detach()) if isinstance(got, torch.Tensor) else float(got)
    total = want if sum_ is None else sum_
    if math.isnan(want):
        assert math.isnan(g), (what, g)
    elif total > limit * (1 + 2**-14):
        assert g == math.inf, (what, g, total)
    elif g == math.inf:
        assert total >= limit * (1 - 2**-14), (what, total)
    else:
        assert g == pytest.approx(want, rel=2e-5, abs=1e-300), what


def check_squared_error(a, b, reduction, out, g=None, grads=None):
    """Value (float32 accumulation) and gradients ``+-2 (a - b) g`` in each input's dtype."""
    x, y = f64(a), f64(b)
    with np.errstate(invalid="ignore", over="ignore"):
        sq = np.square(x - y)
        assert out.dtype == (torch.float64 if wide(a, b) else torch.float32)
        limit = float(torch.finfo(out.dtype).max)
        if reduction == "none":
            want = sq.sum(-1) if sq.ndim else sq
            assert out.shape == want.shape
            for w, o in zip(np.ravel(want), f64(out).ravel()):
                assert_total(o, w, limit, "rows")
        else:
            total = sq.sum()
            assert out.shape == ()
            mean = total / sq.size if sq.size else math.nan
            assert_total(out, mean if reduction == "mean" else total, limit, "total", total)
        if grads is None:
            return
        gg = f64(g)
        scale = (
            gg[..., None]
            if reduction == "none" and x.ndim
            else gg / ((x.size or math.nan) if reduction == "mean" else 1)
        )
        da = 2 * (x - y) * scale
    assert_close64(grads[0], da, dtype=a.dtype, what="d a")
    assert_close64(grads[1], -da, dtype=b.dtype, what="d b")


def check_quantize(z, c, beta, reduction, r, idx, dist, g=None, grads=None):
    """``quantize`` agrees with ``assign`` (``idx``, ``dist`` from the same backend) and with float64:
    z_q is ``codebook[idx]`` in z's dtype (zeros for -1), both terms are the summed distances (NaN or
    +Inf when a row has no code), and the gradients are the zero-code ones for rows with index -1."""
    assert torch.equal(r.indices, idx)
    assert r.z_q.dtype == z.dtype and r.z_q.shape == z.shape
    want_zq = torch.where(
        (idx >= 0).unsqueeze(-1),
        c.detach()[idx.clamp_min(0)].to(z.dtype),
        torch.zeros((), dtype=z.dtype, device=z.device),
    )
    assert torch.equal(bits(r.z_q), bits(want_zq))
    acc = torch.float64 if wide(z, c) else torch.float32
    for t in (r.codebook_loss, r.commitment_loss, r.loss):
        assert t.dtype == acc and t.shape == ()
    assert torch.equal(bits(r.codebook_loss), bits(r.commitment_loss))
    scale = (1.0 / z.numel() if z.numel() else math.nan) if reduction == "mean" else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        total = float(np.sum(f64(dist)))
    assert_total(r.codebook_loss, total * scale, float(torch.finfo(acc).max), "codebook_loss", total)
    assert torch.equal(bits(r.loss), bits(r.codebook_loss + beta * r.commitment_loss))
    if grads is None:
        return
    d = c.shape[1]
    zz, cc, gg, ii = f64(z).reshape(-1, d), f64(c), f64(g).reshape(-1, d), idx.cpu().numpy().reshape(-1)
    code = np.where((ii >= 0)[:, None], cc[np.maximum(ii, 0)], 0.0)
    # (z_q * g).sum() + loss: coef_z = 2 s beta, coef_codebook = 2 s (s: the reduction's scale).
    coef_z, coef_c = 2 * scale * beta, 2 * scale
    with np.errstate(invalid="ignore", over="ignore"):
        diff = zz - code
        dz = gg + coef_z * diff
        mag_z = np.abs(gg) + np.abs(coef_z * diff)
        dc = np.zeros_like(cc)
        mag = np.zeros_like(cc)
        keep = ii >= 0
        np.add.at(dc, ii[keep], coef_c * (code - zz)[keep])
        np.add.at(mag, ii[keep], np.abs(coef_c * (code - zz))[keep])
    assert_close64(grads[0].reshape(-1, d), dz, mag_z, z.dtype, "dz")
    assert_close64(grads[1], dc, mag, c.dtype, "dcodebook")


def check_verify(z, c, given, best, ok, metric="l2"):
    """True where ``given`` is within the contract of the float64 nearest code (and the row has one);
    False where it is farther than the code ``assign`` picks allows; either in between."""
    d = c.shape[1]
    zz, cc = f64(z).reshape(-1, d), f64(c)
    if metric == "cosine":
        with np.errstate(invalid="ignore"):
            zz, cc = R.normalize(zz), R.normalize(cc)
    gi, bi, v = given.cpu().numpy().reshape(-1), best.cpu().numpy().reshape(-1), ok.cpu().numpy().reshape(-1)
    assert ok.dtype == torch.bool and ok.shape == z.shape[:-1]
    with np.errstate(invalid="ignore", over="ignore"):
        dd = np.square(zz[:, None, :] - cc[None, :, :]).sum(-1)  # [N, K]
    dd[:, ~np.isfinite(cc).all(1)] = np.inf
    for r in range(gi.size):
        m = dd[r].min()
        if gi[r] < 0 or bi[r] < 0 or not np.isfinite(dd[r, gi[r]]):
            assert not v[r], r
        elif dd[r, gi[r]] <= m * (1 + CONTRACT) * (1 - 2**-40):
            assert v[r], (r, dd[r, gi[r]], m)
        elif dd[r, gi[r]] > dd[r, bi[r]] * (1 + CONTRACT) * (1 + 2**-40):
            assert not v[r], (r, dd[r, gi[r]], m)


# --- 1. bad input: a clear error naming what was wrong, before any kernel launches --------------------


@pytest.fixture
def no_launch(monkeypatch):
    """Every launcher of both backends fails loudly: a check must answer first."""

    def launched(*args, **kwargs):
        raise AssertionError("a launcher ran before the input checks answered")

    for o in (torch_ops, ops("triton")):
        for name in LAUNCHERS:
            monkeypatch.setattr(o, name, launched)


def _inputs(dev):
    z = torch.randn(4, 3, device=dev)
    c = torch.randn(5, 3, device=dev)
    i = torch.tensor([0, 4, -1, 2], device=dev)
    return z, c, i


# fmt: off
BAD_INPUT = [
    # assign
    ("assign-z-0dim", lambda z, c, i, be: vqt.assign(z[0, 0], c, backend=be),
     ValueError, r"\[\.\.\., D\] with D = 3.*got z \(\)"),
    ("assign-D-mismatch", lambda z, c, i, be: vqt.assign(z[:, :2], c, backend=be),
     ValueError, r"D = 3.*got z \(4, 2\)"),
    ("assign-codebook-1d", lambda z, c, i, be: vqt.assign(z, c[0], backend=be),
     ValueError, r"2-D \[K, D\], got shape \(3,\)"),
    ("assign-codebook-3d", lambda z, c, i, be: vqt.assign(z, c[None], backend=be),
     ValueError, r"2-D \[K, D\], got shape \(1, 5, 3\)"),
    ("assign-K0", lambda z, c, i, be: vqt.assign(z, c[:0], backend=be),
     ValueError, r"K >= 1 .*\(0, 3\)"),
    ("assign-D0", lambda z, c, i, be: vqt.assign(z[:, :0], c[:, :0], backend=be),
     ValueError, r"D >= 1 .*\(5, 0\)"),
    ("assign-z-int", lambda z, c, i, be: vqt.assign(z.long(), c, backend=be),
     TypeError, r"z must be a floating-point tensor .*int64"),
    ("assign-z-bool", lambda z, c, i, be: vqt.assign(z > 0, c, backend=be),
     TypeError, r"z must be .*torch.bool"),
    ("assign-z-complex", lambda z, c, i, be: vqt.assign(z.cfloat(), c, backend=be),
     TypeError, r"z must be .*complex64"),
    ("assign-codebook-int", lambda z, c, i, be: vqt.assign(z, c.int(), backend=be),
     TypeError, r"codebook must be .*int32"),
    ("assign-z-numpy", lambda z, c, i, be: vqt.assign(z.cpu().numpy(), c, backend=be),
     TypeError, r"z must be a torch.Tensor, got ndarray"),
    ("assign-codebook-list", lambda z, c, i, be: vqt.assign(z, c.tolist(), backend=be),
     TypeError, r"codebook must be a torch.Tensor, got list"),
    ("assign-metric", lambda z, c, i, be: vqt.assign(z, c, metric="dot", backend=be),
     ValueError, r"metric must be one of .*'dot'"),
    ("assign-precision", lambda z, c, i, be: vqt.assign(z, c, precision="fp8", backend=be),
     ValueError, r"precision must be one of .*'fp8'"),
    ("assign-backend", lambda z, c, i, be: vqt.assign(z, c, backend="cuda"),
     ValueError, r"backend must be one of .*'cuda'"),
    ("assign-z-other-device", lambda z, c, i, be: vqt.assign(z.to("meta"), c, backend=be),
     ValueError, r"one device, got z on meta, codebook on"),
    ("assign-codebook-other-device", lambda z, c, i, be: vqt.assign(z, c.to("meta"), backend=be),
     ValueError, r"codebook on meta"),
    # lookup
    ("lookup-float-indices", lambda z, c, i, be: vqt.lookup(i.float(), c, backend=be),
     TypeError, r"indices must be an integer tensor .*float32"),
    ("lookup-bool-indices", lambda z, c, i, be: vqt.lookup(i > 0, c, backend=be),
     TypeError, r"integer tensor .*torch.bool"),
    ("lookup-complex-indices", lambda z, c, i, be: vqt.lookup(i.cfloat(), c, backend=be),
     TypeError, r"integer tensor .*complex64"),
    ("lookup-uint16-indices", lambda z, c, i, be: vqt.lookup(i.clamp_min(0).to(torch.uint16), c, backend=be),
     TypeError, r"\(int64/int32/int16/int8/uint8\), got torch.uint16"),
    ("lookup-index-K", lambda z, c, i, be: vqt.lookup(i + 1, c, backend=be),
     IndexError, r"\[0, 5\) .* got values in \[0, 5\]"),
    ("lookup-index-minus-2", lambda z, c, i, be: vqt.lookup(i - 1, c, backend=be),
     IndexError, r"got values in \[-2, 3\]"),
    ("lookup-index-huge", lambda z, c, i, be: vqt.lookup(i * 2**40, c, backend=be),
     IndexError, r"\[0, 5\)"),
    ("lookup-indices-list", lambda z, c, i, be: vqt.lookup([0, 1], c, backend=be),
     TypeError, r"indices must be a torch.Tensor, got list"),
    ("lookup-codebook-int", lambda z, c, i, be: vqt.lookup(i, c.long(), backend=be),
     TypeError, r"codebook must be .*int64"),
    ("lookup-codebook-1d", lambda z, c, i, be: vqt.lookup(i, c[0], backend=be),
     ValueError, r"2-D"),
    ("lookup-indices-other-device", lambda z, c, i, be: vqt.lookup(i.to("meta"), c, backend=be),
     ValueError, r"one device, got indices on meta"),
    ("lookup-codebook-other-device", lambda z, c, i, be: vqt.lookup(i, c.to("meta"), backend=be),
     ValueError, r"codebook on meta"),
    ("lookup-backend", lambda z, c, i, be: vqt.lookup(i, c, backend="numpy"),
     ValueError, r"backend must be one of"),
    # squared_error
    ("sqerr-shape", lambda z, c, i, be: vqt.squared_error(z, z[:, :2], backend=be),
     ValueError, r"same shape, got \(4, 3\) and \(4, 2\)"),
    ("sqerr-no-broadcast", lambda z, c, i, be: vqt.squared_error(z, z[:1], backend=be),
     ValueError, r"same shape, got \(4, 3\) and \(1, 3\)"),
    ("sqerr-a-int", lambda z, c, i, be: vqt.squared_error(z.int(), z, backend=be),
     TypeError, r"a must be a floating-point tensor .*int32"),
    ("sqerr-b-bool", lambda z, c, i, be: vqt.squared_error(z, z > 0, backend=be),
     TypeError, r"b must be .*torch.bool"),
    ("sqerr-b-complex", lambda z, c, i, be: vqt.squared_error(z, z.cfloat(), backend=be),
     TypeError, r"b must be .*complex64"),
    ("sqerr-reduction", lambda z, c, i, be: vqt.squared_error(z, z, "avg", backend=be),
     ValueError, r"reduction must be one of .*'avg'"),
    ("sqerr-reduction-none-object", lambda z, c, i, be: vqt.squared_error(z, z, None, backend=be),
     ValueError, r"reduction must be one of .*None"),
    ("sqerr-other-device", lambda z, c, i, be: vqt.squared_error(z.to("meta"), z, backend=be),
     ValueError, r"one device, got a on meta, b on"),
    # quantize
    ("quantize-z-0dim", lambda z, c, i, be: vqt.quantize(z[0, 0], c, backend=be),
     ValueError, r"got z \(\)"),
    ("quantize-D-mismatch", lambda z, c, i, be: vqt.quantize(z, c[:, :2], backend=be),
     ValueError, r"D = 2"),
    ("quantize-K0", lambda z, c, i, be: vqt.quantize(z, c[:0], backend=be),
     ValueError, r"K >= 1"),
    ("quantize-z-int", lambda z, c, i, be: vqt.quantize(z.short(), c, backend=be),
     TypeError, r"z must be .*int16"),
    ("quantize-codebook-complex", lambda z, c, i, be: vqt.quantize(z, c.cdouble(), backend=be),
     TypeError, r"codebook must be .*complex128"),
    ("quantize-reduction", lambda z, c, i, be: vqt.quantize(z, c, reduction="none", backend=be),
     ValueError, r"reduction must be one of \('sum', 'mean'\)"),
    ("quantize-precision", lambda z, c, i, be: vqt.quantize(z, c, precision="int8", backend=be),
     ValueError, r"precision must be one of"),
    ("quantize-beta-negative", lambda z, c, i, be: vqt.quantize(z, c, beta=-0.1, backend=be),
     ValueError, r"beta must be >= 0, got -0.1"),
    ("quantize-beta-nan", lambda z, c, i, be: vqt.quantize(z, c, beta=math.nan, backend=be),
     ValueError, r"beta must be >= 0, got nan"),
    ("quantize-beta-inf", lambda z, c, i, be: vqt.quantize(z, c, beta=math.inf, backend=be),
     ValueError, r"beta must be >= 0, got inf"),
    ("quantize-beta-str", lambda z, c, i, be: vqt.quantize(z, c, beta="0.25", backend=be),
     TypeError, r"beta must be a real number, got str"),
    ("quantize-beta-bool", lambda z, c, i, be: vqt.quantize(z, c, beta=True, backend=be),
     TypeError, r"beta must be a real number, got bool"),
    ("quantize-beta-tensor", lambda z, c, i, be: vqt.quantize(z, c, beta=torch.tensor(0.25), backend=be),
     TypeError, r"got Tensor"),
    ("quantize-other-device", lambda z, c, i, be: vqt.quantize(z.to("meta"), c, backend=be),
     ValueError, r"z on meta"),
    # verify_assignment
    ("verify-indices-shape", lambda z, c, i, be: vqt.verify_assignment(z, c, i[:3], backend=be),
     ValueError, r"shape z.shape\[:-1\] = \(4,\), got \(3,\)"),
    ("verify-indices-float", lambda z, c, i, be: vqt.verify_assignment(z, c, i.double(), backend=be),
     TypeError, r"integer tensor .*float64"),
    ("verify-index-range", lambda z, c, i, be: vqt.verify_assignment(z, c, i + 3, backend=be),
     IndexError, r"\[0, 5\)"),
    ("verify-metric", lambda z, c, i, be: vqt.verify_assignment(z, c, i, metric="l1", backend=be),
     ValueError, r"metric must be one of .*'l1'"),
    ("verify-D-mismatch", lambda z, c, i, be: vqt.verify_assignment(z[:, :1], c, i, backend=be),
     ValueError, r"D = 3"),
    ("verify-indices-other-device", lambda z, c, i, be: vqt.verify_assignment(z, c, i.to("meta"), backend=be),
     ValueError, r"indices on meta"),
    ("verify-z-other-device", lambda z, c, i, be: vqt.verify_assignment(z.to("meta"), c, i, backend=be),
     ValueError, r"z on meta"),
]
# fmt: on


@pytest.mark.parametrize("call, error, match", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_named_before_any_launch(backend, device, no_launch, call, error, match):
    z, c, i = _inputs(device)
    with pytest.raises(error, match=match):
        call(z, c, i, backend)


@pytest.mark.parametrize("op", ["assign", "quantize", "squared_error", "lookup"])
def test_forced_triton_backend_says_why_it_cannot_run(device, no_launch, op):
    """float64 runs on the torch path; forcing the kernels on it is a clear RuntimeError, not a wrong answer."""
    z, c, i = (t.double() if t.is_floating_point() else t for t in _inputs(device))
    call = {
        "assign": lambda: vqt.assign(z, c, backend="triton"),
        "quantize": lambda: vqt.quantize(z, c, backend="triton"),
        "squared_error": lambda: vqt.squared_error(z, z, backend="triton"),
        "lookup": lambda: vqt.lookup(i, c, backend="triton"),
    }[op]
    with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run: .*float64"):
        call()


# fmt: off
LAYER_ARGS = [
    (dict(num_codes=-3), ValueError, "num_codes must be >= 1, got -3"),
    (dict(num_codes=True), TypeError, "num_codes must be an int, got bool"),
    (dict(num_codes=8.0), TypeError, "num_codes must be an int, got float"),
    (dict(dim=-1), ValueError, "dim must be >= 1, got -1"),
    (dict(beta=math.nan), ValueError, "beta must be >= 0, got nan"),
    (dict(beta="0.25"), TypeError, "beta must be a real number, got str"),
    (dict(ema_decay=math.nan), ValueError, r"ema_decay must be in \(0, 1\], got nan"),
    (dict(ema_decay=-0.1), ValueError, r"ema_decay must be in \(0, 1\], got -0.1"),
    (dict(ema_decay=1.5), ValueError, r"ema_decay must be in \(0, 1\], got 1.5"),
    (dict(ema_decay=0.9, eps=math.nan), ValueError, "eps must be > 0, got nan"),
    (dict(ema_decay=0.9, eps=-1e-5), ValueError, "eps must be > 0"),
    (dict(kmeans_iters=True), TypeError, "kmeans_iters must be an int, got bool"),
    (dict(ema_decay=0.9, dead_code_threshold=math.inf), ValueError, "dead_code_threshold must be >= 0, got inf"),
    (dict(metric=None), ValueError, "metric must be one of"),
    (dict(precision="exact "), ValueError, "precision must be one of"),
]
# fmt: on


@pytest.mark.parametrize("kwargs, error, match", LAYER_ARGS, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_layer_arguments_are_checked(kwargs, error, match):
    args = dict(dim=4, num_codes=8) | kwargs
    with pytest.raises(error, match=match):
        vqt.VectorQuantizer(args.pop("dim"), args.pop("num_codes"), **args)


def test_layer_and_model_inputs_are_checked(backend, device, no_launch):
    vq = vqt.VectorQuantizer(5, 8, backend=backend).to(device)
    z = torch.randn(2, 3, 5, device=device)
    cases = [
        (lambda: vq(z.long()), TypeError, "z must be a floating-point tensor"),
        (lambda: vq(z.cfloat()), TypeError, "complex64"),
        (lambda: vq(z[..., :4]), ValueError, r"dim = 5 channels in dim -1, got shape \(2, 3, 4\)"),
        (lambda: vq(z[0, 0, 0]), ValueError, r"got shape \(\)"),
        (lambda: vq(z, torch.ones(2, 3, device=device)), TypeError, "mask must be a bool tensor, got torch.float32"),
        (lambda: vq(z, torch.ones(3, 2, dtype=torch.bool, device=device)), ValueError, r"mask must have .*\(2, 3\)"),
        (lambda: vq(z, torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "one device, got mask on meta"),
        (lambda: vq(z, reduction="none"), ValueError, "reduction must be one of"),
        (lambda: vq.get_output_from_indices(torch.tensor([8], device=device)), IndexError, r"\[0, 8\)"),
        (lambda: vq.get_output_from_indices(torch.tensor([-2], device=device)), IndexError, r"\[0, 8\)"),
        (lambda: vq.get_output_from_indices(torch.tensor([1.0], device=device)), TypeError, "integer tensor"),
        (lambda: vq.get_output_from_indices(torch.tensor([1], device="meta")), ValueError, "indices on meta"),
    ]
    model = vqt.VQVAE(nn.Linear(6, 5), vq, nn.Linear(5, 6)).to(device)
    x = torch.randn(4, 6, device=device)
    cases += [
        (
            lambda: vqt.VQVAE(nn.Identity(), nn.Identity(), nn.Identity()),
            TypeError,
            "quantizer must be a vqtriton.VectorQuantizer",
        ),
        (lambda: model.loss(x, reduction="none"), ValueError, "reduction must be one of"),
        (lambda: model.loss(x, beta=-1.0), ValueError, "beta must be >= 0"),
        (lambda: model.loss(x, beta=math.nan), ValueError, "beta must be >= 0"),
        (lambda: model.loss(x, idx=torch.full((4,), 8, device=device)), IndexError, r"\[0, 8\)"),
        (lambda: model.loss(x, idx=torch.zeros(4, device=device)), TypeError, "integer tensor"),
        (lambda: model(x, idx=torch.tensor([[0.5]], device=device)), TypeError, "integer tensor"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_layer_names_a_device_mismatch(device):
    vq = vqt.VectorQuantizer(4, 6).to(device)
    with pytest.raises(ValueError, match="one device"):
        vq(torch.randn(3, 4, device="meta"))


# --- 2. edge input: a correct answer ---------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_inputs(backend, device, lead):
    d = 4
    z = torch.randn(*lead, d, device=device, requires_grad=True)
    c = torch.randn(5, d, device=device, requires_grad=True)
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    assert idx.shape == dist.shape == lead and idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert vqt.verify_assignment(z, c, idx, backend=backend).shape == lead
    out = vqt.lookup(idx, c, backend=backend)
    assert out.shape == (*lead, d)
    (dc,) = torch.autograd.grad(out.sum(), c)
    assert torch.equal(dc, torch.zeros_like(c))
    for reduction, want in (("sum", 0.0), ("mean", math.nan)):
        r = vqt.quantize(z, c, reduction=reduction, backend=backend)
        assert r.z_q.shape == z.shape and r.indices.shape == lead
        # The mean over no elements is NaN, as F.mse_loss's.
        assert math.isnan(r.loss.item()) if math.isnan(want) else r.loss.item() == want
        dz, dc = torch.autograd.grad(r.loss, (z, c))
        assert dz.shape == z.shape and torch.equal(dc, torch.zeros_like(c))
        se = vqt.squared_error(z, z.detach() + 1, reduction, backend=backend)
        assert math.isnan(se.item()) if math.isnan(want) else se.item() == want
    se = vqt.squared_error(z, z.detach(), "none", backend=backend)
    assert se.shape == lead
    assert torch.autograd.grad(se.sum(), z)[0].shape == z.shape


def test_zero_width_and_zero_dim_squared_error(backend, device):
    """D = 0 rows sum to 0 (the kernels used to divide by a zero tile width); 0-dim inputs are one element."""
    a = torch.randn(4, 0, device=device, requires_grad=True)
    b = torch.randn(4, 0, device=device)
    assert torch.equal(vqt.squared_error(a, b, "none", backend=backend), torch.zeros(4, device=device))
    assert vqt.squared_error(a, b, backend=backend).item() == 0.0
    assert math.isnan(vqt.squared_error(a, b, "mean", backend=backend).item())
    assert torch.autograd.grad(vqt.squared_error(a, b, backend=backend), a)[0].shape == (4, 0)
    e = torch.randn(0, device=device)
    assert vqt.squared_error(e, e, "none", backend=backend).shape == ()  # [D = 0]: one empty vector
    x = torch.tensor(1.5, device=device, requires_grad=True)
    y = torch.tensor(-0.5, device=device, requires_grad=True)
    for reduction in ("sum", "mean", "none"):
        out = vqt.squared_error(x, y, reduction, backend=backend)
        assert out.shape == () and out.item() == 4.0
        assert [g.item() for g in torch.autograd.grad(out, (x, y))] == [4.0, -4.0]


def test_zero_dim_indices(backend, device):
    c = torch.randn(5, 3, device=device)
    assert torch.equal(vqt.lookup(torch.tensor(3, device=device), c, backend=backend), c[3])
    assert torch.equal(vqt.lookup(torch.tensor(-1, device=device), c, backend=backend), torch.zeros(3, device=device))
    z = torch.randn(3, device=device)  # one vector: a 0-dim index
    i = vqt.assign(z, c, backend=backend)
    assert i.shape == () and vqt.verify_assignment(z, c, i, backend=backend).item()
    r = vqt.quantize(z, c, backend=backend)
    assert r.indices.shape == () and torch.equal(r.z_q, c[i])


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (1, 9, 1), (6, 1, 1), (1, 1, 7), (5, 1, 4), (1, 6, 5), (7, 3, 1)],
    ids=lambda s: "N{}-K{}-D{}".format(*s),
)
def test_small_shapes_every_op(backend, device, shape):
    n, k, d = shape
    z = torch.randn(n, d, device=device, requires_grad=True)
    c = torch.randn(k, d, device=device, requires_grad=True)
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    check_assign(z, c, idx, dist)
    assert np.array_equal(idx.cpu().numpy(), R.nearest_code(f64(z), f64(c)))
    check_verify(z, c, idx, idx, vqt.verify_assignment(z, c, idx, backend=backend))
    assert vqt.verify_assignment(z, c, idx, backend=backend).all()
    r = vqt.quantize(z, c, 0.3, "mean", backend=backend)
    g = torch.randn_like(z)
    check_quantize(z, c, 0.3, "mean", r, idx, dist, g, torch.autograd.grad((r.z_q * g).sum() + r.loss, (z, c)))
    out = vqt.lookup(idx, c, backend=backend)
    check_lookup(idx, c, out)
    b = torch.randn_like(z, requires_grad=True)
    se = vqt.squared_error(z, b, "none", backend=backend)
    w = torch.randn_like(se)
    check_squared_error(z, b, "none", se, w, torch.autograd.grad((se * w).sum(), (z, b)))


def _views(base: torch.Tensor):
    """Strided views holding the values of the contiguous ``base [N, D]`` (D even), with their names."""
    n, d = base.shape
    wide_t = torch.zeros(n, 2 * d, device=base.device, dtype=base.dtype)
    wide_t[:, ::2] = base
    return {
        "every-other-column": wide_t[:, ::2],
        "column-major": base.t().contiguous().t(),
        "column-slice": torch.cat([base, base], 1)[:, d:],
        "rows-stride0": base[:1].expand(n, d),
        "cols-stride0": base[:, :1].expand(n, d),
        "permuted-3d": base.reshape(n // 2, 2, d).transpose(0, 1).contiguous().transpose(0, 1),
    }


@pytest.mark.parametrize(
    "view", ["every-other-column", "column-major", "column-slice", "rows-stride0", "cols-stride0", "permuted-3d"]
)
def test_strided_views_answer_as_their_contiguous_copies(backend, device, view):
    """Every op on a strided view (row strides, column-major, stride-0 rows or columns) gives the bits of the
    same op on a contiguous copy, gradients included (the views are the tensors differentiated)."""
    z = _views(torch.randn(8, 6, device=device))[view]
    c = _views(torch.randn(6, 6, device=device))[view] if view != "permuted-3d" else torch.randn(6, 6, device=device)
    zc, cc = z.contiguous(), c.contiguous()
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    want_idx, want_dist = vqt.assign(zc, cc, return_distance=True, backend=backend)
    assert same(idx, want_idx) and same(dist, want_dist)
    check_assign(zc, cc, want_idx, want_dist)
    assert same(vqt.verify_assignment(z, c, idx, backend=backend), vqt.verify_assignment(zc, cc, idx, backend=backend))

    def run(zz, cb):
        zv, cv = zz.detach().requires_grad_(), cb.detach().requires_grad_()
        r = vqt.quantize(zv, cv, backend=backend, deterministic=True)
        se = vqt.squared_error(zv, cv[:1].expand_as(zv), "none", backend=backend)
        lk = vqt.lookup(idx, cv, backend=backend, deterministic=True)
        grads = torch.autograd.grad(r.loss + (r.z_q * 0.5).sum() + se.sum() + lk.sum(), (zv, cv))
        return (r.z_q, r.indices, r.loss, se, lk, *grads)

    for a, b in zip(run(z, c), run(zc, cc)):
        assert same(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_equals_its_fp32_upcast(backend, device, dtype):
    """fp16/bf16 inputs are answered as their exact fp32 upcast: same indices and losses bit for bit,
    outputs and gradients that upcast run's rounded once to the input dtype."""
    z = torch.randn(60, 7, device=device).to(dtype)
    c = torch.randn(13, 7, device=device).to(dtype)
    g = torch.randn(60, 7, device=device).to(dtype)
    runs = []
    for zz, cc, gg in ((z, c, g), (z.float(), c.float(), g.float())):
        zl, cl = zz.clone().requires_grad_(), cc.clone().requires_grad_()
        r = vqt.quantize(zl, cl, 0.4, "mean", backend=backend, deterministic=True)
        dz, dc = torch.autograd.grad((r.z_q * gg).sum() + r.loss, (zl, cl))
        b = torch.flip(zl.detach(), (0,))
        se = vqt.squared_error(zl, b, "none", backend=backend)
        (da,) = torch.autograd.grad(se.sum(), zl)
        lk = vqt.lookup(r.indices, cl, backend=backend, deterministic=True)
        (dl,) = torch.autograd.grad((lk * gg).sum(), cl)
        runs.append(
            dict(idx=r.indices, zq=r.z_q, loss=r.loss, cb=r.codebook_loss, dz=dz, dc=dc, se=se, da=da, lk=lk, dl=dl)
        )
    low, up = runs
    for key in ("idx", "se"):
        assert torch.equal(low[key], up[key]), key
    for key in ("loss", "cb"):  # bitwise here; a GPU may tune each dtype to its own tile (summation order)
        assert same(low[key], up[key]) or device == "cuda", key
        torch.testing.assert_close(low[key], up[key], rtol=1e-6, atol=0)
    for key in ("zq", "dc", "lk", "dl"):  # copies, and fp32 results cast by torch
        assert same(low[key], up[key].to(dtype)), key
    for key in ("dz", "da"):  # stored by the kernels
        assert same(low[key], stored(up[key], dtype, backend)), key


MIXED = [
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float16),
    (torch.float32, torch.float16),
]


@pytest.mark.parametrize("zt, ct", MIXED, ids=lambda t: str(t).removeprefix("torch."))
def test_mixed_dtypes(backend, device, zt, ct):
    """z and the codebook in different dtypes: the distances, losses and statistics are those of both
    upcast to fp32 (the codes as stored, not rounded to z's dtype); z_q and dz come back in z's dtype,
    lookup and dcodebook in the codebook's."""
    z = (3 * torch.randn(50, 6, device=device)).to(zt)
    c = (3 * torch.randn(11, 6, device=device)).to(ct)
    zl, cl = z.clone().requires_grad_(), c.clone().requires_grad_()
    zu, cu = z.float().requires_grad_(), c.float().requires_grad_()
    idx, dist = vqt.assign(zl, cl, return_distance=True, backend=backend)
    assert torch.equal(idx, vqt.assign(zu, cu, backend=backend)) and dist.dtype == torch.float32
    check_assign(z, c, idx, dist)
    g = torch.randn(50, 6, device=device).to(zt)
    out = []
    for a, b in ((zl, cl), (zu, cu)):
        r = vqt.quantize(a, b, 0.25, backend=backend, deterministic=True)
        out.append((r, torch.autograd.grad((r.z_q * g.to(a.dtype)).sum() + r.loss, (a, b))))
    (r, (dz, dc)), (ru, (dzu, dcu)) = out
    assert r.z_q.dtype == zt and dz.dtype == zt and dc.dtype == ct and r.loss.dtype == torch.float32
    assert torch.equal(r.indices, ru.indices) and (same(r.loss, ru.loss) or device == "cuda")
    torch.testing.assert_close(r.loss, ru.loss, rtol=1e-6, atol=0)
    assert torch.equal(bits(r.z_q), bits(c[idx].to(zt)))  # the code, rounded to z's dtype
    assert same(dz, stored(dzu, zt, backend)) and same(dc, dcu.to(ct))
    lk = vqt.lookup(idx, cl, backend=backend)
    assert lk.dtype == ct and torch.equal(bits(lk), bits(c[idx]))
    # squared_error of mixed inputs: fp32 value; each gradient rounded once to its input's dtype.
    a, b = z.clone().requires_grad_(), c[idx].clone().requires_grad_()
    se = vqt.squared_error(a, b, backend=backend)
    da, db = torch.autograd.grad(se, (a, b))
    au, bu = z.float().requires_grad_(), c[idx].float().requires_grad_()
    seu = vqt.squared_error(au, bu, backend=backend)
    dau, dbu = torch.autograd.grad(seu, (au, bu))
    assert torch.equal(se, seu) and se.dtype == torch.float32
    assert same(da, stored(dau, zt, backend)) and same(db, stored(dbu, ct, backend))


def test_mixed_dtype_gradient_keeps_the_wider_inputs_range(backend, device):
    """b's gradient is computed for b's dtype, not rounded through a narrower a (float16 would overflow)."""
    a = torch.zeros(3, 2, device=device, dtype=torch.float16, requires_grad=True)
    b = torch.full((3, 2), 1e5, device=device, requires_grad=True)
    da, db = torch.autograd.grad(vqt.squared_error(a, b, backend=backend), (a, b))
    assert torch.equal(db, torch.full_like(b, 2e5))
    assert torch.equal(da, torch.full_like(a, -math.inf))  # -2e5 rounded to float16


def test_float64_takes_the_torch_path_in_float64(device):
    z = torch.randn(9, 4, device=device, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 4, device=device, requires_grad=True)  # float32 codebook
    r = vqt.quantize(z, c)
    assert r.z_q.dtype == torch.float64 and r.loss.dtype == torch.float64
    idx, dist = vqt.assign(z, c, return_distance=True)
    assert dist.dtype == torch.float64
    check_assign(z, c, idx, dist)
    check_quantize(z, c, 0.25, "sum", r, idx, dist)


def test_exact_ties_in_quantize_train_the_lowest_duplicate(backend, device):
    base = torch.randn(4, 5, device=device)
    c = torch.cat([base, base, base]).requires_grad_()  # code j == j + 4 == j + 8
    z = (base[[1, 3, 0, 2, 1]] + 0.01 * torch.randn(5, 5, device=device)).requires_grad_()
    r = vqt.quantize(z, c, backend=backend)
    assert r.indices.tolist() == [1, 3, 0, 2, 1]
    (dc,) = torch.autograd.grad(r.loss, c)
    assert torch.count_nonzero(dc[4:]) == 0 and torch.count_nonzero(dc[:4]).item() == 20
    # Every duplicate of the nearest code is certified; other codes are not.
    for j, ok in ((1, True), (5, True), (9, True), (0, False)):
        assert vqt.verify_assignment(z[:1], c, torch.tensor([j], device=device), backend=backend).item() is ok
    on_code = vqt.quantize(c[[6, 2]].detach(), c, backend=backend)
    assert on_code.indices.tolist() == [2, 2] and on_code.loss.item() == 0.0


@pytest.mark.parametrize("scale", [1e-21, 1e-30, 1e-40, 2.0**-140], ids=lambda s: f"{s:g}")
def test_tiny_magnitudes(backend, device, scale):
    """Below fp32's normal range squares lose relative precision: on the Triton path the contract then
    holds up to an absolute D 2^-146 (codes whose distances all underflow count as tied); scaled by a power
    of two into range, the answer is the exact one. The torch path works in float64 throughout."""
    z = torch.randn(300, 8, device=device, dtype=torch.float64)
    c = torch.randn(40, 8, device=device, dtype=torch.float64)
    zt, ct = (z * scale).float(), (c * scale).float()
    idx, dist = vqt.assign(zt, ct, return_distance=True, backend=backend)
    check_assign(zt, ct, idx, dist)
    assert vqt.verify_assignment(zt, ct, idx, backend=backend).all()
    if backend == "torch":
        assert np.array_equal(idx.cpu().numpy(), R.nearest_code(f64(zt), f64(ct)))
    up = 2.0**100  # exact scaling of every value, nonzero ones stay distinct
    assert np.array_equal(
        vqt.assign(zt * up, ct * up, backend=backend).cpu().numpy(), R.nearest_code(f64(zt) * up, f64(ct) * up)
    )
    r = vqt.quantize(zt, ct, backend=backend)
    check_quantize(zt, ct, 0.25, "sum", r, idx, dist)


def test_huge_magnitudes(backend, device):
    """Large but safe values are exact; distances past fp32's range follow the overflow policy."""
    c = torch.randn(7, 4, device=device) * 1e18
    z = c[[3, 0, 6, 6]] + torch.randn(4, 4, device=device) * 1e17
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    check_assign(z, c, idx, dist)
    assert idx.tolist() == R.nearest_code(f64(z), f64(c)).tolist()
    z2 = torch.cat([z, torch.full((1, 4), 1e30, device=device), torch.full((1, 4), -3e38, device=device)])
    idx, dist = vqt.assign(z2, c, return_distance=True, backend=backend)
    check_assign(z2, c, idx, dist)
    assert idx[-2:].tolist() == [-1, -1] and dist[-2:].tolist() == [math.inf, math.inf]
    # A code whose distance overflows never beats one with a finite distance.
    c2 = torch.cat([torch.full((2, 4), 3e38, device=device), torch.randn(3, 4, device=device)])
    idx, dist = vqt.assign(torch.randn(6, 4, device=device), c2, return_distance=True, backend=backend)
    assert (idx >= 2).all()


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e38], ids=lambda s: f"{s:g}")
def test_cosine_of_huge_and_tiny_vectors(backend, device, scale):
    """A finite vector has a direction whatever its size: normalising in fp32 overflowed (1e30 became the
    zero vector and silently took code 0). Tiny vectors follow F.normalize's eps, as the reference does."""
    z = torch.randn(30, 5, device=device).clamp(-3, 3) * scale
    c = torch.randn(8, 5, device=device)
    idx, dist = vqt.assign(z, c, metric="cosine", return_distance=True, backend=backend)
    check_assign(z, c, idx, dist, metric="cosine")
    if scale > 1:
        assert np.array_equal(idx.cpu().numpy(), R.nearest_code(f64(z), f64(c), metric="cosine"))
        assert vqt.verify_assignment(z, c, idx, metric="cosine", backend=backend).all()


# --- 3. NaN / Inf ------------------------------------------------------------------------------------


BAD = [1, 2, 4, 5, 6]  # the rows of _bad_rows without a code


def _bad_rows(device):
    """Rows: clean, NaN, +Inf, clean, -Inf, NaN and Inf, overflowing finite, clean."""
    z = torch.randn(8, 4, device=device)
    z[1, 2] = math.nan
    z[2, 0] = math.inf
    z[4, 3] = -math.inf
    z[5, 0], z[5, 1] = math.inf, math.nan
    z[6] = 1e30
    good = torch.tensor([0, 3, 7], device=device)
    return z, good


def test_nonfinite_rows_in_assign_and_verify(backend, device):
    z, good = _bad_rows(device)
    c = torch.randn(9, 4, device=device)
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    check_assign(z, c, idx, dist)
    assert idx[BAD].tolist() == [-1] * 5
    assert [math.isnan(v) for v in dist[BAD].tolist()] == [True, False, False, True, False]
    assert dist[[2, 4, 6]].tolist() == [math.inf] * 3
    clean_idx, clean_dist = vqt.assign(z[good], c, return_distance=True, backend=backend)
    assert torch.equal(idx[good], clean_idx) and torch.equal(dist[good], clean_dist)  # no effect on others
    assert vqt.verify_assignment(z, c, idx.clamp_min(0), backend=backend).tolist() == [
        True,
        False,
        False,
        True,
        False,
        False,
        False,
        True,
    ]
    # Cosine: the normalised vector of a row holding +-Inf holds NaN, so its distance is NaN.
    idx, dist = vqt.assign(z, c, metric="cosine", return_distance=True, backend=backend)
    check_assign(z, c, idx, dist, metric="cosine")
    assert idx[[1, 2, 4, 5]].tolist() == [-1] * 4 and torch.isnan(dist[[1, 2, 4, 5]]).all() and idx[6] >= 0


def test_nonfinite_codes(backend, device):
    z = torch.randn(20, 3, device=device)
    c = torch.randn(6, 3, device=device)
    near = vqt.assign(z, c, backend=backend)
    for value in (math.nan, math.inf, -math.inf):
        bad = c.clone()
        bad[near.unique()[:-1], 1] = value  # every used code but one
        idx, dist = vqt.assign(z, bad, return_distance=True, backend=backend)
        check_assign(z, bad, idx, dist)
        assert torch.isfinite(bad[idx]).all() and torch.isfinite(dist).all()
        r = vqt.quantize(z, bad, backend=backend)
        assert torch.equal(r.indices, idx) and torch.isfinite(r.loss)
    idx, dist = vqt.assign(z, torch.full_like(c, math.nan), return_distance=True, backend=backend)
    assert (idx == -1).all() and torch.isnan(dist).all()  # no finite code: -1 and NaN everywhere


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_quantize_nonfinite_rows(backend, device, reduction):
    """The quantize policy: such a row gets index -1 and a zero z_q row (as lookup(-1)); its distance,
    NaN or +Inf, enters both terms (a NaN latent is never hidden in a finite loss); its gradient is
    the one of a zero code, dz = g + coef_z z, and it adds nothing to the codebook gradient; every other
    row's index, z_q and gradients are exactly those of a batch without it."""
    z, good = _bad_rows(device)
    c = torch.randn(9, 4, device=device)
    g = torch.randn_like(z)
    beta = 0.3
    zl, cl = z.clone().requires_grad_(), c.clone().requires_grad_()
    r = vqt.quantize(zl, cl, beta, reduction, backend=backend, deterministic=True)
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    dz, dc = torch.autograd.grad((r.z_q * g).sum() + r.loss, (zl, cl))
    check_quantize(z, c, beta, reduction, r, idx, dist, g, (dz, dc))
    assert torch.equal(r.z_q[BAD], torch.zeros(5, 4, device=device)) and math.isnan(r.loss.item())

    scale = 1.0 / z.numel() if reduction == "mean" else 1.0
    zg, cg = z[good].clone().requires_grad_(), c.clone().requires_grad_()
    rg = vqt.quantize(zg, cg, beta, reduction, backend=backend, deterministic=True)
    dzg, dcg = torch.autograd.grad(
        (rg.z_q * g[good]).sum() + rg.loss * (z[good].numel() * scale if reduction == "mean" else 1.0), (zg, cg)
    )
    assert torch.equal(r.indices[good], rg.indices) and torch.equal(r.z_q[good], rg.z_q)
    torch.testing.assert_close(dz[good], dzg, rtol=1e-6, atol=0)
    torch.testing.assert_close(dc, dcg, rtol=1e-5, atol=1e-7)
    coef_z = torch.tensor(2 * beta * scale, dtype=torch.float32)
    torch.testing.assert_close(dz[BAD], g[BAD] + coef_z * z[BAD], rtol=1e-6, atol=0, equal_nan=True)
    # Only +-Inf or overflow (no NaN): the terms are +Inf.
    r = vqt.quantize(z[[0, 2, 6]], c, beta, reduction, backend=backend)
    assert r.codebook_loss.item() == r.loss.item() == math.inf


def test_minus_one_rows_read_nothing_outside_the_codebook(backend, device):
    """The codebook and z as views into NaN-padded buffers: a read of row -1, of row K or past D would show."""
    k, d = 6, 5
    buf = torch.full((k + 2, d + 2), math.nan, device=device)
    buf[1 : k + 1, 1 : d + 1] = torch.randn(k, d, device=device)
    c = buf[1 : k + 1, 1 : d + 1]
    zbuf = torch.full((9, d + 3), math.nan, device=device)
    zbuf[1:8, 1 : d + 1] = torch.randn(7, d, device=device)
    zbuf[7, 1 : d + 1] = 1e30  # finite, distances overflow: index -1
    z = zbuf[1:8, 1 : d + 1]
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    check_assign(z, c, idx, dist)
    assert idx[-1].item() == -1 and (idx[:-1] >= 0).all() and torch.isfinite(dist[:-1]).all()
    out = vqt.lookup(torch.tensor([-1, 0, k - 1, -1], device=device), c, backend=backend)
    assert torch.isfinite(out).all() and torch.equal(out[[0, 3]], torch.zeros(2, d, device=device))
    for det in (False, True):
        zl, cl = z.detach().requires_grad_(), c.detach().requires_grad_()  # still the padded views
        r = vqt.quantize(zl, cl, backend=backend, deterministic=det)
        assert torch.isfinite(r.z_q).all() and torch.equal(r.z_q[-1], torch.zeros(d, device=device))
        dz, dc = torch.autograd.grad(r.z_q.sum() + r.loss, (zl, cl))
        assert torch.isfinite(dz).all() and torch.isfinite(dc).all()
        torch.testing.assert_close(dz[-1], 1 + 0.5 * z[-1], rtol=1e-6, atol=0)  # the zero code's gradient
        cl = c.detach().requires_grad_()
        (dl,) = torch.autograd.grad(
            vqt.lookup(torch.tensor([-1, 2, -1, k - 1], device=device), cl, backend=backend, deterministic=det).sum(),
            cl,
        )
        assert torch.equal(
            dl, torch.zeros(k, d, device=device).index_fill_(0, torch.tensor([2, k - 1], device=device), 1.0)
        )


def test_layer_nonfinite_rows_leave_the_ema_state_as_without_them(backend, device):
    """A NaN/Inf row gets index -1 and a NaN loss, and changes no statistic: the EMA state after the step
    equals the state after the same step on the finite rows alone."""
    z, good = _bad_rows(device)
    z = z.repeat(5, 1)
    good = torch.isfinite(z).all(1) & (z.abs() < 1e20).all(1)
    a = vqt.VectorQuantizer(4, 7, ema_decay=0.8, backend=backend).to(device)
    b = vqt.VectorQuantizer(4, 7, ema_decay=0.8, backend=backend).to(device)
    b.load_state_dict(a.state_dict())
    _, idx, loss = a(z)
    _, idx_b, _ = b(z[good])
    assert math.isnan(loss.item()) and (idx[~good] == -1).all() and torch.equal(idx[good], idx_b)
    for name, value in a.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
        torch.testing.assert_close(value, b.state_dict()[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "cfg", [dict(kmeans_init=True), dict(ema_decay=0.9, dead_code_threshold=1e9)], ids=["kmeans", "dead-codes"]
)
def test_layer_never_seeds_codes_from_nonfinite_rows(device, cfg):
    vq = vqt.VectorQuantizer(4, 6, **cfg).to(device)
    z = torch.randn(12, 4, device=device)
    z[1:] = math.nan
    vq(z)
    assert torch.isfinite(vq.codebook).all()


def test_layer_cosine_of_huge_vectors(device):
    vq = vqt.VectorQuantizer(4, 6, metric="cosine").to(device)
    z = torch.randn(20, 4, device=device) * 1e30
    _, idx, _ = vq(z)
    assert np.array_equal(idx.cpu().numpy(), R.nearest_code(f64(z), f64(vq.codebook), metric="cosine"))


# --- 4. large tensors (GPU) --------------------------------------------------------------------------


def _gpu_memory_at_least(gib: int) -> None:
    if torch.cuda.get_device_properties(0).total_memory < gib * 2**30:
        pytest.skip(f"needs a GPU with {gib} GiB")


@pytest.mark.gpu
def test_gpu_public_ops_past_int32_offsets():
    """N·D > 2^31 elements through quantize, lookup and squared_error, forward and backward. Small-integer
    data keeps every sum exact, so rows past element 2^31 are checked exactly against int64 arithmetic."""
    _gpu_memory_at_least(40)
    d, k = 64, 128
    n = (1 << 31) // d + 4096
    dev = "cuda"
    z = torch.randint(-3, 4, (n, d), device=dev, dtype=torch.int8).half().requires_grad_()
    # A float32 codebook: its gradient sums ~2^18 small integers per code, exact in fp32, not in fp16.
    c = torch.randint(-3, 4, (k, d), device=dev, dtype=torch.int8).float().requires_grad_()
    tail = slice(n - 4096, n)
    r = vqt.quantize(z, c, 0.25, backend="triton")
    idx = r.indices
    t_idx = vqt.assign(z[tail].detach(), c.detach(), backend="triton")
    assert torch.equal(idx[tail], t_idx)
    assert np.array_equal(t_idx.cpu().numpy(), R.nearest_code(f64(z[tail]), f64(c)))
    assert torch.equal(r.z_q[tail], c.detach()[t_idx].half())
    term = r.codebook_loss.item()
    dz, dc = torch.autograd.grad(r.loss, (z, c))
    del r
    chunks = [slice(s, min(s + (1 << 22), n)) for s in range(0, n, 1 << 22)]
    want_dc = torch.zeros(k, d, dtype=torch.int64, device=dev)
    total = 0
    for s in chunks:
        diff = z.detach()[s].long() - c.detach()[idx[s]].long()  # [rows, D], exact
        total += int(diff.square().sum())
        assert torch.equal(dz[s], (0.5 * diff).half())  # 2 beta (z - z_q), exact in fp16
        want_dc.index_add_(0, idx[s], -2 * diff)
    assert torch.equal(dc, want_dc.float())  # integer sums, exact in fp32 (|partial sums| < 2^24)
    assert term == pytest.approx(total, rel=1e-4)
    del dz, dc
    # lookup: gather and scatter of every row; the gradient of a sum counts the rows of each code.
    out = vqt.lookup(idx, c, backend="triton")
    assert torch.equal(out[tail], c.detach()[t_idx])
    (dl,) = torch.autograd.grad(out.sum(dtype=torch.float32), c)
    counts = torch.bincount(idx, minlength=k)
    assert torch.equal(dl.float(), counts.float()[:, None].expand(k, d))
    # squared_error: per-row sums exact, total within fp32 rounding, gradient exact.
    zq = out.detach()
    del out
    rows = vqt.squared_error(z, zq, "none", backend="triton")
    for s in chunks:
        assert torch.equal(rows[s], (z.detach()[s].float() - zq[s].float()).square().sum(-1))
    se = vqt.squared_error(z, zq, backend="triton")
    assert se.item() == pytest.approx(total, rel=1e-4)
    (da,) = torch.autograd.grad(se, z)
    assert torch.equal(da[tail], (2 * (z.detach()[tail].float() - zq[tail])).half())


@pytest.mark.gpu
def test_gpu_assign_codebook_past_int32_offsets():
    """K·D > 2^31 codebook elements: codes past element 2^31 are found by both exact searches (the
    certified one computed its code offsets in int32)."""
    _gpu_memory_at_least(64)
    from vqtriton.kernels.assign import assign_fwd

    k, d = (1 << 21) + 7, 1024
    c = torch.randn(k, d, device="cuda", dtype=torch.float16)
    t = torch.cat([torch.arange(k - 40, k), torch.randint(0, k, (24,))]).cuda()  # codes at the far end too
    z = c[t].float() + 1e-3 * torch.randn(64, d, device="cuda")
    want = (z - c[t].float()).square().sum(1)
    for idx, dist, _ in (assign_fwd(z, c, split=1), assign_fwd(z, c, split=64)):  # certified; plain, split
        assert torch.equal(idx, t)
        torch.testing.assert_close(dist, want, rtol=1e-4, atol=0)
    assert torch.equal(vqt.assign(z, c), t)


@pytest.mark.gpu
def test_gpu_lookup_of_more_than_2_31_indices():
    """2^31 + 5 indices (D = 1): the gather and its scatter-add backward index past int32."""
    _gpu_memory_at_least(64)
    n, k = (1 << 31) + 5, 1 << 16
    idx = torch.arange(n, device="cuda").remainder_(k)
    idx[::7] = -1
    c = torch.randn(k, 1, device="cuda", requires_grad=True)
    out = vqt.lookup(idx, c, backend="triton")
    tail = slice(n - 1000, n)
    assert torch.equal(out[tail, 0], torch.where(idx[tail] >= 0, c.detach()[idx[tail].clamp_min(0), 0], 0.0))
    (dc,) = torch.autograd.grad(out.sum(), c)
    del out
    counts = torch.zeros(k, dtype=torch.int64, device="cuda")
    for s in range(0, n, 1 << 28):
        part = idx[s : s + (1 << 28)]
        counts += torch.bincount(part[part >= 0], minlength=k)
    assert torch.equal(dc[:, 0], counts.float())


# --- 5. determinism -----------------------------------------------------------------------------------


def _spy(monkeypatch, backend, names):
    """Record the ``deterministic`` argument of each call to the launchers ``names`` of ``backend``."""
    o, calls = ops(backend), []
    for name in names:

        def spy(*args, _orig=getattr(o, name), _name=name, **kwargs):
            calls.append((_name, kwargs.get("deterministic")))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(o, name, spy)
    return calls


@pytest.mark.parametrize(
    "flag, arg, want",
    [(False, None, False), (True, None, True), (False, True, True), (True, False, False)],
    ids=["default", "global-flag", "argument", "argument-wins"],
)
def test_deterministic_mode_reaches_the_launchers(backend, device, monkeypatch, flag, arg, want):
    calls = _spy(monkeypatch, backend, ["quantize_backward", "scatter_add", "code_stats"])
    z = torch.randn(30, 4, device=device, requires_grad=True)
    c = torch.randn(5, 4, device=device, requires_grad=True)
    with deterministic_algorithms(flag):
        r = vqt.quantize(z, c, backend=backend, deterministic=arg)
        out = vqt.lookup(r.indices, c, backend=backend, deterministic=arg)
        (r.loss + out.sum()).backward()
    assert ("quantize_backward", want) in calls and ("scatter_add", want) in calls
    assert all(v == want for _, v in calls), calls
    # The layer's own argument works the same way, for its quantize step and its EMA statistics.
    calls.clear()
    vq = vqt.VectorQuantizer(4, 5, ema_decay=0.9, backend=backend, deterministic=arg).to(device)
    with deterministic_algorithms(flag):
        vq(torch.randn(30, 4, device=device, requires_grad=True))[2].backward()
    names = {name for name, _ in calls}
    assert {"code_stats", "quantize_backward"} <= names and all(v == want for _, v in calls), calls


def test_deterministic_mode_runs_and_changes_no_answer(backend, device):
    """Under torch.use_deterministic_algorithms(True) every public op, the layer and the model run (no op
    without a deterministic implementation; torch.empty hands out NaN-filled memory, so an output a
    kernel forgets to write shows), give the answers of the default mode, and repeat bit for bit. On CUDA
    the model's cuBLAS layers need CUBLAS_WORKSPACE_CONFIG under the strict flag: warn_only there, and
    the bitwise check covers vqtriton's own outputs."""
    torch.manual_seed(0)
    z = torch.randn(40, 6, device=device)
    c = torch.randn(7, 6, device=device)
    model = vqt.VQVAE(nn.Linear(5, 6), vqt.VectorQuantizer(6, 7, ema_decay=0.9, backend=backend), nn.Linear(6, 5)).to(
        device
    )
    x = torch.randn(40, 5, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run():
        model.load_state_dict(state)
        zl, cl = z.clone().requires_grad_(), c.clone().requires_grad_()
        r = vqt.quantize(zl, cl, backend=backend)
        lk = vqt.lookup(r.indices, cl, backend=backend)
        se = vqt.squared_error(zl, lk, "mean", backend=backend)
        dz, dc = torch.autograd.grad(r.loss + lk.sum() + se, (zl, cl))
        ok = vqt.verify_assignment(z, c, r.indices, backend=backend)
        idx = vqt.assign(z, c, metric="cosine", backend=backend)
        ours = [r.indices, r.z_q, r.loss, lk, se, dz, dc, ok, idx]
        out = model.loss(x)
        out.total.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return ours, [*out, *grads, *model.state_dict().values()]

    default = run()
    with deterministic_algorithms(True, warn_only=device == "cuda"):
        first, second = run(), run()
    for a, b, c_ in zip(default[0], first[0], second[0]):
        assert same(b, c_)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b, c_ in zip(default[1], first[1], second[1]):
        assert same(b, c_) or device == "cuda"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gpu_bitwise_reproducible_gradients_and_ema_statistics(backend_name):
    """Many rows into few codes (maximal atomic contention): in deterministic mode the codebook gradients
    and the EMA statistics repeat bit for bit; assignment always does. The torch backend's cuBLAS call
    needs CUBLAS_WORKSPACE_CONFIG under the strict flag, hence warn_only there."""
    n, k, d = 1 << 18, 4, 64
    z = torch.randn(n, d, device="cuda")
    c = torch.randn(k, d, device="cuda")
    g = torch.randn(n, d, device="cuda")

    def grads(**kw):
        zl, cl = z.clone().requires_grad_(), c.clone().requires_grad_()
        r = vqt.quantize(zl, cl, backend=backend_name, **kw)
        lk = vqt.lookup(r.indices, cl, backend=backend_name, **kw)
        dz, dc = torch.autograd.grad((r.z_q * g).sum() + r.loss, (zl, cl))
        (dl,) = torch.autograd.grad((lk * g).sum(), cl)
        return [r.indices, r.loss, dz, dc, dl]

    runs = [grads(deterministic=True) for _ in range(3)]
    assert all(same(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    fast = [grads(deterministic=False) for _ in range(2)]
    assert torch.equal(fast[0][0], fast[1][0]) and torch.equal(fast[0][0], runs[0][0])  # assignment

    with deterministic_algorithms(True, warn_only=backend_name == "torch"):
        flagged = grads()
        states = []
        for _ in range(3):
            torch.manual_seed(0)
            vq = vqt.VectorQuantizer(
                d, k, ema_decay=0.9, kmeans_init=True, dead_code_threshold=0.5, backend=backend_name
            ).cuda()
            for step in range(3):
                vq(z[step * (n // 4) : (step + 1) * (n // 4)])
            states.append(vq.state_dict())
    assert all(same(a, b) for a, b in zip(runs[0], flagged))
    assert all(same(states[0][name], s[name]) for s in states[1:] for name in states[0])


@pytest.mark.gpu
def test_gpu_cpu_and_cuda_tensors_are_not_mixed():
    z, c, i = _inputs("cuda")
    calls = [
        lambda: vqt.assign(z.cpu(), c),
        lambda: vqt.assign(z, c.cpu()),
        lambda: vqt.quantize(z.cpu(), c),
        lambda: vqt.lookup(i.cpu(), c),
        lambda: vqt.lookup(i, c.cpu()),
        lambda: vqt.squared_error(z, z.cpu()),
        lambda: vqt.verify_assignment(z, c, i.cpu()),
        lambda: vqt.VectorQuantizer(3, 5).cuda()(z, torch.ones(4, dtype=torch.bool)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="one device"):
            call()


# --- 6. fuzzing -----------------------------------------------------------------------------------------

FUNCTIONS = ["assign", "assign-cosine", "lookup", "squared_error", "quantize", "verify"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KINDS = ["normal", "small-ints", "offset"]
SCALES = [1.0, 1e-3, 1e3, 1e18, 1e30, 1e-20, 1e-30, 1e-40]
FP16_SCALES = [1.0, 1e-3, 1e3, 1e-20]  # past 65504 a float16 codebook would be all Inf
LAYOUTS = ["contiguous", "column-major", "every-other-column", "rows-stride0", "leading-dims"]
SPECIALS = [math.nan, math.inf, -math.inf]
# One way to provoke each documented error, the functions it applies to, and the error.
CORRUPTIONS = {
    "wrong-D": ({"assign", "assign-cosine", "quantize", "verify"}, ValueError),
    "integer-z": ({"assign", "assign-cosine", "quantize", "verify", "squared_error"}, TypeError),
    "no-codes": ({"assign", "assign-cosine", "quantize", "verify", "lookup"}, ValueError),
    "index-out-of-range": ({"lookup", "verify"}, IndexError),
    "float-indices": ({"lookup", "verify"}, TypeError),
    "shape-mismatch": ({"squared_error"}, ValueError),
    "negative-beta": ({"quantize"}, ValueError),
}


def _fuzz_tensor(data, gen, lead, d, dtype, kind, scale, layout, device, keep_row=None):
    """A ``[*lead, D]`` tensor of the drawn kind, scale, special values and memory layout."""
    n = math.prod(lead)
    if kind == "small-ints":  # exact ties, exactly computed distances
        x = torch.randint(-2, 3, (n, d), generator=gen).double()
    elif kind == "offset":  # a large common offset: cancellation in the expanded form
        x = 100 + torch.randn(n, d, generator=gen, dtype=torch.float64)
    else:
        x = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    for r, col, v in data.draw(
        st.lists(st.tuples(st.integers(0, 99), st.integers(0, 99), st.sampled_from(SPECIALS)), max_size=3)
    ):
        if n and r % n != keep_row:
            x[r % n, col % d] = v
    x = x.to(device=device, dtype=dtype)
    if layout == "column-major":
        return x.t().contiguous().t().reshape(*lead, d)
    if layout == "every-other-column":
        w = torch.zeros(n, 2 * d, device=device, dtype=dtype)
        w[:, ::2] = x
        return w[:, ::2].reshape(*lead, d)
    if layout == "rows-stride0" and n:
        return x[:1].expand(n, d).reshape(*lead, d)
    return x.reshape(*lead, d)


def _fuzz_run(fn, z, c, idx_in, beta, reduction, backend, gen, error):
    """Call ``fn`` on the drawn inputs and check it against its oracle (or expect ``error``)."""
    d, device = z.shape[-1], z.device
    if fn in ("assign", "assign-cosine"):
        metric = "cosine" if fn == "assign-cosine" else "l2"
        idx, dist = vqt.assign(z, c, metric, return_distance=True, backend=backend)
        check_assign(z, c, idx, dist, metric)
    elif fn == "lookup":
        cl = c.detach().requires_grad_()
        out = vqt.lookup(idx_in, cl, backend=backend)
        check_lookup(idx_in, cl, out)
        g = torch.randn(out.shape, generator=gen).to(device, c.dtype)
        (dc,) = torch.autograd.grad((out * g).sum(), cl)
        ii, gg = idx_in.cpu().numpy().reshape(-1), f64(g).reshape(-1, d)
        want, mag = np.zeros((c.shape[0], d)), np.zeros((c.shape[0], d))
        np.add.at(want, ii[ii >= 0], gg[ii >= 0])
        np.add.at(mag, ii[ii >= 0], np.abs(gg[ii >= 0]))
        assert_close64(dc, want, mag, c.dtype, "dcodebook")
    elif fn == "squared_error":
        b = c[torch.arange(math.prod(z.shape[:-1]), device=device) % max(c.shape[0], 1)].reshape(z.shape)
        if error is ValueError:
            b = b[..., :-1] if d > 1 else torch.cat([b, b], -1)
        al = z.detach().requires_grad_() if z.is_floating_point() else z
        bl = b.detach().requires_grad_()
        out = vqt.squared_error(al, bl, reduction, backend=backend)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, out.dtype)
        check_squared_error(z, b, reduction, out, g, torch.autograd.grad((out * g).sum(), (al, bl)))
    elif fn == "quantize":
        zl = z.detach().requires_grad_() if z.is_floating_point() else z
        cl = c.detach().requires_grad_()
        r = vqt.quantize(zl, cl, beta, reduction, backend=backend, deterministic=True)
        idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
        check_assign(z, c, idx, dist)
        g = torch.randn(z.shape, generator=gen).to(device, z.dtype)
        grads = torch.autograd.grad((r.z_q * g).sum() + r.loss, (zl, cl))
        check_quantize(z, c, beta, reduction, r, idx, dist, g, grads)
    else:
        ok = vqt.verify_assignment(z, c, idx_in, backend=backend)
        best = vqt.assign(z, c, backend=backend)
        check_verify(z, c, idx_in, best, ok)
        check_verify(z, c, best, best, vqt.verify_assignment(z, c, best, backend=backend))


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_fuzz_public_functions(backend, device, fn, data):
    """Random shapes, dtypes (mixed too), strides and values (exact ties, a large offset, huge, tiny and
    subnormal magnitudes, NaN, +-Inf), sometimes corrupted: the oracle's answer, or the documented error."""
    zt = data.draw(st.sampled_from(DTYPES), label="z dtype")
    ct = data.draw(st.sampled_from([zt, zt, *DTYPES]), label="codebook dtype")
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    scale = data.draw(st.sampled_from(FP16_SCALES if torch.float16 in (zt, ct) else SCALES), label="scale")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    if layout == "leading-dims":
        lead = (data.draw(st.integers(0, 3), label="B"), data.draw(st.integers(1, 4), label="T"))
    else:
        lead = (data.draw(st.integers(0, 12), label="N"),)
    k, d = data.draw(st.integers(1, 6), label="K"), data.draw(st.integers(1, 9), label="D")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    keep = data.draw(st.integers(0, k - 1), label="finite code")
    z = _fuzz_tensor(data, gen, lead, d, zt, kind, scale, layout, device)
    c_layout = data.draw(st.sampled_from(LAYOUTS[:-1]), label="codebook layout")
    c = _fuzz_tensor(data, gen, (k,), d, ct, kind, scale, c_layout, device, keep)
    assume(bool(torch.isfinite(c).all(1).any()))  # a codebook without a finite code: test_nonfinite_codes
    idx_in = torch.randint(-1, k, lead, generator=gen).to(device)
    beta = data.draw(st.sampled_from([0.0, 0.25, 1.0]), label="beta")
    reduction = data.draw(st.sampled_from(["sum", "mean", "none"] if fn == "squared_error" else ["sum", "mean"]))
    options = [None] * 8 + [name for name, (fns, _) in CORRUPTIONS.items() if fn in fns]
    corruption = data.draw(st.sampled_from(options), label="corruption")

    error = None if corruption is None else CORRUPTIONS[corruption][1]
    if corruption == "wrong-D":
        c = torch.cat([c, c[:, :1]], 1)
    elif corruption == "integer-z":
        z = z.to(torch.int32)
    elif corruption == "no-codes":
        c = c[:0]
    elif corruption == "index-out-of-range":
        if idx_in.numel() == 0:
            idx_in = torch.tensor([0], device=device) if fn == "lookup" else idx_in
        flat = idx_in.reshape(-1).clone()
        if flat.numel():
            flat[0] = data.draw(st.sampled_from([k, k + 5, -2]), label="bad index")
        else:
            error = None  # nothing to corrupt: verify of no vectors
        idx_in = flat.reshape(idx_in.shape)
    elif corruption == "float-indices":
        idx_in = idx_in.float()
    elif corruption == "negative-beta":
        beta = -0.5
    kernel_dtypes_only = (c,) if fn == "lookup" else (z, c)
    if error is None and backend == "triton" and wide(*(t for t in kernel_dtypes_only if t.is_floating_point())):
        error = RuntimeError  # a forced backend that cannot run says why

    event("answer" if error is None else error.__name__)
    if error is None:
        _fuzz_run(fn, z, c, idx_in, beta, reduction, backend, gen, None)
    else:
        with pytest.raises(error):
            _fuzz_run(fn, z, c, idx_in, beta, reduction, backend, gen, error)


# --- 7. state --------------------------------------------------------------------------------------------


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # tensors only: loads without unpickling code


@pytest.mark.parametrize("ema_decay", [None, 0.9], ids=["learned", "ema"])
def test_bf16_layer_state_round_trips_bit_exactly(backend, device, ema_decay):
    """A bf16 layer keeps fp32 EMA statistics; its state_dict loads with weights_only=True into a fresh
    bf16 layer (and into an fp32 one) bit for bit, and training continues identically."""
    cfg = dict(ema_decay=ema_decay, kmeans_init=True, kmeans_iters=2, backend=backend)
    cfg |= dict(dead_code_threshold=0.3) if ema_decay else {}
    a = vqt.VectorQuantizer(5, 9, **cfg).to(device, torch.bfloat16)
    for _ in range(2):
        a(torch.randn(40, 5, device=device, dtype=torch.bfloat16))
    saved = _round_trip(a.state_dict())
    assert saved["codebook"].dtype == torch.bfloat16 and bool(saved["initted"])
    if ema_decay:
        assert saved["cluster_size"].dtype == saved["embed_sum"].dtype == torch.float32
    b = vqt.VectorQuantizer(5, 9, **cfg).to(device, torch.bfloat16)
    b.load_state_dict(saved)
    for name, value in a.state_dict().items():
        assert same(b.state_dict()[name], value), name
    z = torch.randn(40, 5, device=device, dtype=torch.bfloat16)
    torch.manual_seed(5)
    out_a = a(z)
    torch.manual_seed(5)
    out_b = b(z)
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))
    assert all(torch.equal(v, b.state_dict()[n]) for n, v in a.state_dict().items())
    f = vqt.VectorQuantizer(5, 9, **cfg).to(device)
    f.load_state_dict(saved)  # into fp32: the bf16 codes upcast exactly, the statistics unchanged
    assert torch.equal(f.codebook, saved["codebook"].float())
    if ema_decay:
        assert same(f.embed_sum, saved["embed_sum"]) and same(f.cluster_size, saved["cluster_size"])


def test_vqvae_state_round_trips_bit_exactly(device):
    torch.manual_seed(1)
    make = lambda: vqt.VQVAE(nn.Linear(6, 4), vqt.VectorQuantizer(4, 7, ema_decay=0.8), nn.Linear(4, 6)).to(
        device
    )  # noqa: E731
    a = make()
    x = torch.randn(30, 6, device=device)
    a.loss(x).total.backward()
    b = make()
    b.load_state_dict(_round_trip(a.state_dict()))
    assert all(same(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    a.eval(), b.eval()
    assert all(torch.equal(p, q) for p, q in zip(a.loss(x), b.loss(x)))


def test_checkpoints_are_written_atomically(tmp_path):
    """vqtriton.checkpoint.save (the demo's) writes through a temporary file and os.replace: a save that fails
    leaves the previous checkpoint whole, and what is written loads with weights_only=True."""
    from vqtriton.checkpoint import save as save_atomic

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    path = str(tmp_path / "checkpoint.pt")
    vq = vqt.VectorQuantizer(3, 4, ema_decay=0.9)
    first = {"model": vq.state_dict(), "step": 1}
    save_atomic(first, path)
    big = {
        "model": {k: v.repeat(1000, *([1] * (v.dim() - 1))) if v.dim() else v for k, v in vq.state_dict().items()},
        "broken": Unpicklable(),
    }
    with pytest.raises(TypeError, match="Unpicklable"):  # refused before a byte is written
        save_atomic(big, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and all(same(v, loaded["model"][k]) for k, v in first["model"].items())
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "the failed save left its temp file behind"
