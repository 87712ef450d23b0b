"""kernels/quantize.py: the fused VQ backward, called directly.

Called on the codes ``codebook[idx]`` that the forward saves. Ground truth: the analytic gradients of ``vqtriton.reference`` (float64), each row's weighted by
the gradients reaching its two distances, and ``vqtriton.torch_ops.quantize_backward``. ``dz`` and the deterministic mode's
per-row buffer come from ``torch.empty`` and are poisoned with NaN.
"""

import numpy as np
import pytest
import torch

from vqtriton import reference as R
from vqtriton import torch_ops
from vqtriton.kernels import gather as G
from vqtriton.kernels import quantize as Q
from helpers import f64, poison as poison_modules, shape_id

SHAPES = [(1000, 333, 47), (1, 1, 1), (0, 4, 3), (75, 1, 300), (17, 9, 2048), (37, 19, 1), (300, 7, 33)]
U32 = 2.0**-24
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
MODES = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])


@pytest.fixture
def poison(monkeypatch):
    poison_modules(monkeypatch, Q, G)


def stored_bits(x32, dtype):
    """The bits of float32 ``x32`` stored as ``dtype``: nearest even, but bf16 truncates under the interpreter."""
    if dtype == torch.bfloat16 and x32.device.type == "cpu":
        return (x32.view(torch.int32) >> 16).to(torch.int16)
    return x32.to(dtype).view(BITS[dtype])


def problem(n, k, d, device, dtype=torch.float32, grad=True):
    z = torch.randn(n, d, device=device).to(dtype)
    cb = torch.randn(k, d, device=device).to(dtype)
    idx = torch.randint(0, k, (n,), device=device)
    g = torch.randn(n, d, device=device).to(dtype) if grad else None
    return z, cb, idx, g


def backward(impl, z, cb, idx, g, w, v, **kw):
    """``impl.quantize_backward`` of the problem ``(z, cb, idx)``: on its codes ``cb[idx]`` (zeros at -1)."""
    return impl.quantize_backward(z, torch_ops.gather(idx, cb), idx, g, w, v, cb.shape[0], **kw)


def weights(n, device, zeros=0.2):
    """Per-row weights ``(w, v)`` of the commitment and codebook distances: positive, some rows 0 (masked)."""
    w, v = (0.1 + 2 * torch.rand(n, device=device) for _ in range(2))
    off = torch.rand(n, device=device) < zeros
    return w.masked_fill(off, 0), v.masked_fill(off, 0)


def reference(z, cb, idx, g, w, v):
    """``(dz, dcodebook, error scales)`` in float64 from the spec's analytic gradients.

    Identity encoder and decoder with ``x = z``: row r's commitment term has the encoder gradient
    ``2 (z_r - z_q,r)`` and its codebook term the codebook gradient ``2 (z_q,r - z_r)`` at code
    ``idx_r``; the kernel weighs them by ``w_r`` and ``v_r``.
    """
    model = R.Model(encoder=lambda x: x, codebook=f64(cb), decoder=lambda x: x)
    x, i = f64(z), idx.cpu().numpy()
    w, v = f64(w), f64(v)
    dz_commit, _ = R.commitment_loss_grad(model, x, i)
    dz = w[:, None] * dz_commit + (0.0 if g is None else f64(g))
    dc = np.zeros_like(model.codebook)
    for r in range(len(i)):
        dc += v[r] * R.codebook_loss_grad(model, x[r : r + 1], i[r : r + 1])[1]
    # Error scales: |terms| of each dz element, and sums of |terms| per code for dcodebook.
    dz_mag = np.abs(w[:, None] * dz_commit) + (0.0 if g is None else np.abs(f64(g)))
    dc_mag = np.zeros_like(dc)
    np.add.at(dc_mag, i, np.abs(2 * v[:, None] * (model.codebook[i] - x)))
    return dz, dc, dz_mag, dc_mag, np.bincount(i, minlength=model.num_codes)


def assert_close(got, want, tol, what):
    got = f64(got)
    assert np.isfinite(got).all(), f"{what}: a NaN/Inf (an element was not written)"
    bad = np.argwhere(np.abs(got - want) > tol)
    assert bad.size == 0, f"{what}: first mismatches (pos, got, want): " + str(
        [(tuple(p), got[tuple(p)], want[tuple(p)]) for p in bad[:5]]
    )


def check(z, cb, idx, g, w, v, dz, dc):
    assert dz.shape == z.shape and dz.dtype == z.dtype
    assert dc.shape == cb.shape and dc.dtype == torch.float32
    want_dz, want_dc, dz_mag, dc_mag, counts = reference(z, cb, idx, g, w, v)
    # dz: four fp32 roundings (difference, weight, product, sum) on terms of size dz_mag.
    assert_close(dz, want_dz, 5 * U32 * dz_mag, "dz")
    # dcodebook: one rounding per term, then a sum of `count` terms.
    assert_close(dc, want_dc, np.maximum(1e-6, (counts + 2) * U32)[:, None] * dc_mag, "dcodebook")


@MODES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_quantize_backward_matches_reference(device, poison, shape, deterministic):
    n, k, d = shape
    z, cb, idx, g = problem(n, k, d, device)
    w, v = weights(z.shape[0], device)
    dz, dc = backward(Q, z, cb, idx, g, w, v, deterministic=deterministic)
    check(z, cb, idx, g, w, v, dz, dc)
    t_dz, t_dc = backward(torch_ops, z, cb, idx, g, w, v)
    assert torch.allclose(dz, t_dz, rtol=5 * U32, atol=0)
    _, _, _, dc_mag, counts = reference(z, cb, idx, g, w, v)
    assert_close(t_dc, f64(dc), 2 * np.maximum(1e-6, (counts + 2) * U32)[:, None] * dc_mag, "torch_ops dcodebook")


@MODES
def test_quantize_backward_without_grad_out(device, poison, deterministic):
    z, cb, idx, _ = problem(200, 17, 29, device, grad=False)
    w, v = weights(z.shape[0], device)
    dz, dc = backward(Q, z, cb, idx, None, w, v, deterministic=deterministic)
    check(z, cb, idx, None, w, v, dz, dc)


@MODES
def test_quantize_backward_zero_weights(device, poison, deterministic):
    """w = v = 0: dz is grad_out exactly and dcodebook is zero (the straight-through part alone)."""
    z, cb, idx, g = problem(150, 11, 20, device)
    zero = torch.zeros(150, device=device)
    dz, dc = backward(Q, z, cb, idx, g, zero, zero, deterministic=deterministic)
    assert torch.equal(dz, g)
    assert torch.equal(dc, torch.zeros_like(dc))


@MODES
def test_quantize_backward_expanded_weights(device, poison, deterministic):
    """A 0-dim gradient expanded to [N] (stride 0, as a sum's backward hands it) reads as the same value
    in every row: the bits of the materialised weights."""
    z, cb, idx, g = problem(210, 13, 19, device)
    w, v = torch.tensor(0.37, device=device), torch.tensor(1.9, device=device)
    got = backward(Q, z, cb, idx, g, w.expand(210), v.expand(210), deterministic=deterministic)
    want = backward(Q, z, cb, idx, g, w.repeat(210), v.repeat(210), deterministic=deterministic)
    assert torch.equal(got[0], want[0])
    if deterministic:
        assert torch.equal(got[1], want[1])
    check(z, cb, idx, g, w.repeat(210), v.repeat(210), *got)


@MODES
def test_quantize_backward_without_codebook_gradient(device, poison, deterministic):
    """v = None (an EMA codebook): the same dz, no dcodebook and no scatter."""
    z, cb, idx, g = problem(140, 10, 23, device)
    w, v = weights(140, device)
    dz, dc = backward(Q, z, cb, idx, g, w, None, deterministic=deterministic)
    assert dc is None
    assert torch.equal(dz, backward(Q, z, cb, idx, g, w, v, deterministic=deterministic)[0])
    t_dz, t_dc = backward(torch_ops, z, cb, idx, g, w, None)
    assert t_dc is None and torch.allclose(dz, t_dz, rtol=5 * U32, atol=0)


@MODES
def test_quantize_backward_all_rows_one_code(device, poison, deterministic):
    z, cb, _, g = problem(500, 4, 13, device)
    z = z + 2.0
    idx = torch.full((500,), 3, device=device)
    w, v = weights(z.shape[0], device)
    dz, dc = backward(Q, z, cb, idx, g, w, v, deterministic=deterministic)
    check(z, cb, idx, g, w, v, dz, dc)
    assert (dc[:3] == 0).all()


def test_quantize_backward_deterministic_repeats_and_agrees(device, poison):
    z, cb, idx, g = problem(800, 23, 37, device)
    w, v = weights(z.shape[0], device)
    dz1, dc1 = backward(Q, z, cb, idx, g, w, v, deterministic=True)
    dz2, dc2 = backward(Q, z, cb, idx, g, w, v, deterministic=True)
    assert torch.equal(dz1, dz2) and torch.equal(dc1.view(torch.int32), dc2.view(torch.int32))
    dz3, dc3 = backward(Q, z, cb, idx, g, w, v)
    # dz has no reduction: both modes give the same bits; dcodebook sums in two orders.
    assert torch.equal(dz1, dz3)
    _, _, _, dc_mag, counts = reference(z, cb, idx, g, w, v)
    assert_close(dc3, f64(dc1), 2 * np.maximum(1e-6, (counts + 2) * U32)[:, None] * dc_mag, "atomic vs deterministic")


def test_quantize_backward_masked_rows_match_torch_ops(device, poison):
    """Outside the contract (idx >= 0), -1 rows read as gather does (a zero code) and add to no code."""
    z, cb, idx, g = problem(120, 9, 15, device)
    idx[::7] = -1
    w, v = weights(z.shape[0], device)
    t_dz, t_dc = backward(torch_ops, z, cb, idx, g, w, v)
    for det in (False, True):
        dz, dc = backward(Q, z, cb, idx, g, w, v, deterministic=det)
        assert torch.allclose(dz, t_dz, rtol=5 * U32, atol=0)
        assert torch.allclose(dc, t_dc, rtol=1e-5, atol=1e-5)


@MODES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_quantize_backward_low_precision_is_its_fp32_upcast(device, poison, dtype, deterministic):
    z, cb, idx, g = problem(230, 19, 27, device, dtype)
    w, v = weights(z.shape[0], device)
    dz, dc = backward(Q, z, cb, idx, g, w, v, deterministic=deterministic)
    up_dz, up_dc = backward(Q, z.float(), cb.float(), idx, g.float(), w, v, deterministic=deterministic)
    assert dz.dtype == dtype
    bad = torch.nonzero(dz.view(BITS[dtype]) != stored_bits(up_dz, dtype))[:5].tolist()
    assert not bad, f"dz: first mismatches (row, col): {bad}"
    if deterministic:
        assert torch.equal(dc.view(torch.int32), up_dc.view(torch.int32))
    else:
        check(z.float(), cb.float(), idx, g.float(), w, v, up_dz, dc)


def test_quantize_backward_strided_inputs(device, poison):
    n, k, d = 90, 12, 10
    z_w, cb_w, g_w = (torch.randn(m, d + 3, device=device) for m in (n, k, n))
    z, cb, g = z_w[:, 1 : 1 + d], cb_w[:, 2 : 2 + d], g_w[:, :d].t().contiguous().t()
    idx = torch.randint(0, k, (n,), device=device)
    w, v = weights(z.shape[0], device)
    for det in (False, True):
        check(z, cb, idx, g, w, v, *backward(Q, z, cb, idx, g, w, v, deterministic=det))


ROTATION_SHAPES = [(1000, 333, 47), (75, 1, 300), (37, 19, 1), (17, 9, 2048), (300, 7, 33), (1, 1, 1), (0, 4, 3)]


def row_rel_err(got: torch.Tensor, want: np.ndarray) -> float:
    """The largest per-row error relative to the row's norm (elements near 0 have no relative error)."""
    if want.size == 0:
        return 0.0
    err = np.linalg.norm(f64(got) - want, axis=1)
    return float(np.max(err / np.maximum(np.linalg.norm(want, axis=1), 1e-30)))


@MODES
@pytest.mark.parametrize("shape", ROTATION_SHAPES, ids=shape_id)
def test_rotation_trick_matches_the_papers_formula(device, poison, shape, deterministic):
    """dz = lam R^T g + 2 w (z - z_q) against the explicit float64 matrices of reference.rotation_matrix
    (to 1e-6 of each row's norm); the codebook gradient is the one without rotation, bit for bit."""
    n, k, d = shape
    z, cb, idx, g = problem(n, k, d, device)
    w, v = weights(n, device)
    zq = f64(torch_ops.gather(idx, cb))
    want = R.rotation_trick_grad(f64(z), zq, f64(g)) + 2 * f64(w)[:, None] * (f64(z) - zq)
    for impl in (Q, torch_ops):
        dz, dc = backward(impl, z, cb, idx, g, w, v, deterministic=deterministic, rotate=True)
        assert dz.shape == z.shape and np.isfinite(f64(dz)).all()
        assert row_rel_err(dz, want) <= 1e-6, (impl.__name__, row_rel_err(dz, want))
        _, plain_dc = backward(impl, z, cb, idx, g, w, v, deterministic=True, rotate=False)
        if deterministic:
            assert torch.equal(dc, plain_dc), impl.__name__
    z64, cb64, g64 = (t.double() for t in (z, cb, g))
    dz64, _ = backward(torch_ops, z64, cb64, idx, g64, w.double(), v.double(), rotate=True)
    assert row_rel_err(dz64, want) <= 1e-12


def test_rotation_trick_degenerate_rows(device, poison):
    """z = z_q (R = I), z = -z_q (u + q = 0: w = 0, R = -I in their plane... and I elsewhere), z = 0 and
    D = 1, against the float64 formula with the same clamps."""
    d = 5
    cb = torch.randn(4, d, device=device)
    idx = torch.tensor([0, 1, 2, 3, 0], device=device)
    zq = torch_ops.gather(idx, cb)
    z = torch.stack([zq[0], -2.0 * zq[1], torch.zeros(d, device=device), 3.0 * zq[3], 1e-9 * zq[4]])
    g = torch.randn(5, d, device=device)
    w = torch.zeros(5, device=device)
    want = R.rotation_trick_grad(f64(z), f64(zq), f64(g))
    for impl in (Q, torch_ops):
        dz, _ = impl.quantize_backward(z, zq, idx, g, w, None, 4, rotate=True)
        np.testing.assert_allclose(f64(dz), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=impl.__name__)
    np.testing.assert_allclose(want[0], f64(g)[0], rtol=1e-12)  # R = I, lam = 1 when z = z_q


@pytest.mark.gpu
def test_quantize_backward_atomics_under_contention(device):
    n, k, d = 1 << 20, 5, 32
    z, cb, _, g = problem(n, k, d, device)
    idx = torch.randint(0, k, (n,), device=device)
    w, v = weights(z.shape[0], device)
    for det in (False, True):
        check(z, cb, idx, g, w, v, *backward(Q, z, cb, idx, g, w, v, deterministic=det))


@pytest.mark.gpu
def test_quantize_backward_past_int32_offsets(device):
    """Row offsets past 2^31 elements: int64 addressing (about 9 GiB of GPU memory)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB")
    d = 32
    n = (1 << 31) // d + 3000
    z = torch.randn(n, d, device=device, dtype=torch.float16)
    cb = torch.randn(5, d, device=device, dtype=torch.float16)
    idx = torch.randint(0, 5, (n,), device=device)
    w, v = weights(z.shape[0], device)
    dz, _ = backward(Q, z, cb, idx, z, w, v)
    tail = slice(n - 3000, n)
    want, _ = backward(Q, z[tail], cb, idx[tail], z[tail], w[tail], v[tail])
    assert torch.equal(dz[tail], want)
