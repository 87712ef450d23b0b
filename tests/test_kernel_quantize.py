"""kernels/quantize.py: the fused VQ backward, called directly.

Ground truth: the analytic gradients of ``vqtriton.reference`` (float64) scaled by the
coefficients, and ``vqtriton.torch_ops.quantize_backward``. ``dz`` and the deterministic mode's
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


def reference(z, cb, idx, g, coef):
    """``(dz, dcodebook, error scales)`` in float64 from the spec's analytic gradients.

    Identity encoder and decoder with ``x = z``: the commitment term's encoder gradient is
    ``2 (z - z_q)`` and the codebook term's codebook gradient ``scatter 2 (z_q - z)``; the kernel's
    coefficients multiply the halves of those.
    """
    model = R.Model(encoder=lambda x: x, codebook=f64(cb), decoder=lambda x: x)
    x, i = f64(z), idx.cpu().numpy()
    dz_commit, _ = R.commitment_loss_grad(model, x, i)
    _, dc_codebook = R.codebook_loss_grad(model, x, i)
    cz, cc = (float(c) for c in coef.cpu())
    dz = cz * 0.5 * dz_commit + (0.0 if g is None else f64(g))
    dc = cc * 0.5 * dc_codebook
    # Error scales: |terms| of each dz element, and sums of |terms| per code for dcodebook.
    dz_mag = np.abs(cz * 0.5 * dz_commit) + (0.0 if g is None else np.abs(f64(g)))
    dc_mag = np.zeros_like(dc)
    np.add.at(dc_mag, i, np.abs(cc * (model.codebook[i] - x)))
    return dz, dc, dz_mag, dc_mag, np.bincount(i, minlength=model.num_codes)


def assert_close(got, want, tol, what):
    got = f64(got)
    assert np.isfinite(got).all(), f"{what}: a NaN/Inf (an element was not written)"
    bad = np.argwhere(np.abs(got - want) > tol)
    assert bad.size == 0, f"{what}: first mismatches (pos, got, want): " + str(
        [(tuple(p), got[tuple(p)], want[tuple(p)]) for p in bad[:5]]
    )


def check(z, cb, idx, g, coef, dz, dc):
    assert dz.shape == z.shape and dz.dtype == z.dtype
    assert dc.shape == cb.shape and dc.dtype == torch.float32
    want_dz, want_dc, dz_mag, dc_mag, counts = reference(z, cb, idx, g, coef)
    # dz: three fp32 roundings (difference, product, sum) on terms of size dz_mag.
    assert_close(dz, want_dz, 4 * U32 * dz_mag, "dz")
    # dcodebook: one rounding per term, then a sum of `count` terms.
    assert_close(dc, want_dc, np.maximum(1e-6, (counts + 2) * U32)[:, None] * dc_mag, "dcodebook")


@MODES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_quantize_backward_matches_reference(device, poison, shape, deterministic):
    n, k, d = shape
    z, cb, idx, g = problem(n, k, d, device)
    coef = torch.tensor([0.5, 2.0], device=device)
    dz, dc = Q.quantize_backward(z, cb, idx, g, coef, deterministic=deterministic)
    check(z, cb, idx, g, coef, dz, dc)
    t_dz, t_dc = torch_ops.quantize_backward(z, cb, idx, g, coef)
    assert torch.allclose(dz, t_dz, rtol=4 * U32, atol=0)
    _, _, _, dc_mag, counts = reference(z, cb, idx, g, coef)
    assert_close(t_dc, f64(dc), 2 * np.maximum(1e-6, (counts + 2) * U32)[:, None] * dc_mag, "torch_ops dcodebook")


@MODES
def test_quantize_backward_without_grad_out(device, poison, deterministic):
    z, cb, idx, _ = problem(200, 17, 29, device, grad=False)
    coef = torch.tensor([0.25 * 2, 1.7], device=device)
    dz, dc = Q.quantize_backward(z, cb, idx, None, coef, deterministic=deterministic)
    check(z, cb, idx, None, coef, dz, dc)


@MODES
def test_quantize_backward_zero_coefficients(device, poison, deterministic):
    """coef = (0, 0): dz is grad_out exactly and dcodebook is zero (the straight-through part alone)."""
    z, cb, idx, g = problem(150, 11, 20, device)
    dz, dc = Q.quantize_backward(z, cb, idx, g, torch.zeros(2, device=device), deterministic=deterministic)
    assert torch.equal(dz, g)
    assert torch.equal(dc, torch.zeros_like(dc))


@MODES
def test_quantize_backward_all_rows_one_code(device, poison, deterministic):
    z, cb, _, g = problem(500, 4, 13, device)
    z = z + 2.0
    idx = torch.full((500,), 3, device=device)
    coef = torch.tensor([0.5, 2.0], device=device)
    dz, dc = Q.quantize_backward(z, cb, idx, g, coef, deterministic=deterministic)
    check(z, cb, idx, g, coef, dz, dc)
    assert (dc[:3] == 0).all()


def test_quantize_backward_deterministic_repeats_and_agrees(device, poison):
    z, cb, idx, g = problem(800, 23, 37, device)
    coef = torch.tensor([0.5, 2.0], device=device)
    dz1, dc1 = Q.quantize_backward(z, cb, idx, g, coef, deterministic=True)
    dz2, dc2 = Q.quantize_backward(z, cb, idx, g, coef, deterministic=True)
    assert torch.equal(dz1, dz2) and torch.equal(dc1.view(torch.int32), dc2.view(torch.int32))
    dz3, dc3 = Q.quantize_backward(z, cb, idx, g, coef)
    # dz has no reduction: both modes give the same bits; dcodebook sums in two orders.
    assert torch.equal(dz1, dz3)
    _, _, _, dc_mag, counts = reference(z, cb, idx, g, coef)
    assert_close(dc3, f64(dc1), 2 * np.maximum(1e-6, (counts + 2) * U32)[:, None] * dc_mag, "atomic vs deterministic")


def test_quantize_backward_masked_rows_match_torch_ops(device, poison):
    """Outside the contract (idx >= 0), -1 rows read as gather does (a zero code) and add to no code."""
    z, cb, idx, g = problem(120, 9, 15, device)
    idx[::7] = -1
    coef = torch.tensor([0.5, 2.0], device=device)
    t_dz, t_dc = torch_ops.quantize_backward(z, cb, idx, g, coef)
    for det in (False, True):
        dz, dc = Q.quantize_backward(z, cb, idx, g, coef, deterministic=det)
        assert torch.allclose(dz, t_dz, rtol=4 * U32, atol=0)
        assert torch.allclose(dc, t_dc, rtol=1e-5, atol=1e-5)


@MODES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_quantize_backward_low_precision_is_its_fp32_upcast(device, poison, dtype, deterministic):
    z, cb, idx, g = problem(230, 19, 27, device, dtype)
    coef = torch.tensor([0.5, 2.0], device=device)
    dz, dc = Q.quantize_backward(z, cb, idx, g, coef, deterministic=deterministic)
    up_dz, up_dc = Q.quantize_backward(z.float(), cb.float(), idx, g.float(), coef, deterministic=deterministic)
    assert dz.dtype == dtype
    bad = torch.nonzero(dz.view(BITS[dtype]) != stored_bits(up_dz, dtype))[:5].tolist()
    assert not bad, f"dz: first mismatches (row, col): {bad}"
    if deterministic:
        assert torch.equal(dc.view(torch.int32), up_dc.view(torch.int32))
    else:
        check(z.float(), cb.float(), idx, g.float(), coef, up_dz, dc)


def test_quantize_backward_strided_inputs(device, poison):
    n, k, d = 90, 12, 10
    z_w, cb_w, g_w = (torch.randn(m, d + 3, device=device) for m in (n, k, n))
    z, cb, g = z_w[:, 1 : 1 + d], cb_w[:, 2 : 2 + d], g_w[:, :d].t().contiguous().t()
    idx = torch.randint(0, k, (n,), device=device)
    coef = torch.tensor([0.5, 2.0], device=device)
    for det in (False, True):
        check(z, cb, idx, g, coef, *Q.quantize_backward(z, cb, idx, g, coef, deterministic=det))


@pytest.mark.gpu
def test_quantize_backward_atomics_under_contention(device):
    n, k, d = 1 << 20, 5, 32
    z, cb, _, g = problem(n, k, d, device)
    idx = torch.randint(0, k, (n,), device=device)
    coef = torch.tensor([0.5, 2.0], device=device)
    for det in (False, True):
        check(z, cb, idx, g, coef, *Q.quantize_backward(z, cb, idx, g, coef, deterministic=det))


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
    coef = torch.tensor([0.5, 2.0], device=device)
    dz, _ = Q.quantize_backward(z, cb, idx, z, coef)
    tail = slice(n - 3000, n)
    want, _ = Q.quantize_backward(z[tail], cb, idx[tail], z[tail], coef)
    assert torch.equal(dz[tail], want)
