"""The public ops against the NumPy spec reference, on both backends (same tests, same tolerances).

On a machine without CUDA the "triton" rows run the kernels through Triton's interpreter.
"""

import numpy as np
import pytest
import torch

import vqtriton as vqt
from vqtriton import reference as R
from helpers import f64, shape_id

BACKENDS = ["torch", "triton"]
SHAPES = [(1000, 333, 47), (1, 1, 1), (7, 1, 5), (1, 50, 3), (37, 19, 1), (0, 5, 4), (13, 6, 300)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def contract_violations(z, codebook, idx, metric="l2"):
    """Rows whose chosen code is not within (1 + 2^-16) of the float64 minimum distance."""
    d = R.squared_distances(f64(z), f64(codebook), metric).reshape(-1, codebook.shape[0])
    i = idx.cpu().numpy().reshape(-1)
    chosen = d[np.arange(len(i)), i]
    bad = np.nonzero(chosen > d.min(1) * (1 + 2**-16))[0]
    return [(int(r), int(i[r]), int(d[r].argmin())) for r in bad[:5]]


# --- assign ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_assign_matches_reference(backend, device, shape):
    n, k, d = shape
    z = torch.randn(n, d, device=device)
    c = torch.randn(k, d, device=device)
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == (n,) and dist.shape == (n,)
    assert dist.dtype == torch.float32
    ref = R.nearest_code(f64(z), f64(c))
    mism = np.nonzero(idx.cpu().numpy() != ref)[0]
    assert mism.size == 0, f"first mismatches (row, got, want): {[(r, int(idx[r]), ref[r]) for r in mism[:5]]}"
    d_ref = R.squared_distances(f64(z), f64(c)).min(-1) if n else np.zeros(0)
    np.testing.assert_allclose(f64(dist), d_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5), ()], ids=str)
def test_assign_leading_dims(backend, device, lead):
    z = torch.randn(*lead, 6, device=device)
    c = torch.randn(11, 6, device=device)
    idx = vqt.assign(z, c, backend=backend)
    assert idx.shape == lead
    assert np.array_equal(idx.cpu().numpy(), R.nearest_code(f64(z), f64(c)))


@pytest.mark.parametrize("offset", [100.0, -3e3], ids=lambda o: f"offset{o:g}")
def test_assign_exact_with_large_common_offset(backend, device, offset):
    """Where the fp32 expanded form |z|^2 + |c|^2 - 2 z.c loses the answer, exact assign does not."""
    z = torch.randn(300, 24, device=device) + offset
    c = torch.randn(97, 24, device=device) + offset
    idx = vqt.assign(z, c, backend=backend)
    assert contract_violations(z, c, idx) == []


def test_assign_planted_near_ties(backend, device):
    """Each vector sits at the midpoint of two codes, nudged by far less than fp32's spacing of d."""
    k, d = 40, 16
    c = torch.randn(k, d, device=device, dtype=torch.float64)
    a, b = torch.randint(0, k, (200,)), torch.randint(0, k, (200,))
    nudge = 1e-6 * torch.randn(200, d, device=device, dtype=torch.float64)
    z = ((c[a] + c[b]) / 2 + nudge).float()
    c = c.float()
    idx = vqt.assign(z, c, backend=backend)
    assert contract_violations(z, c, idx) == []


def test_assign_exact_ties_pick_lowest_index(backend, device):
    base = torch.randn(5, 7, device=device)
    c = torch.cat([base, base, base])  # code j, j+5, j+10 identical
    z = c[[12, 7, 2, 14, 5]].clone()  # each equals a duplicated code
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    assert idx.tolist() == [2, 2, 2, 4, 0]
    assert dist.abs().max().item() == 0.0
    # Equidistant from two distinct codes.
    c2 = torch.tensor([[0.0, 5.0], [1.0, 0.0], [-1.0, 0.0]], device=device)
    assert vqt.assign(torch.zeros(3, 2, device=device), c2, backend=backend).tolist() == [1, 1, 1]


def test_assign_cosine(backend, device):
    z = torch.randn(50, 9, device=device)
    c = torch.randn(13, 9, device=device) * torch.rand(13, 1, device=device) * 10
    idx, dist = vqt.assign(z, c, metric="cosine", return_distance=True, backend=backend)
    assert np.array_equal(idx.cpu().numpy(), R.nearest_code(f64(z), f64(c), metric="cosine"))
    d_ref = R.squared_distances(f64(z), f64(c), "cosine").min(-1)
    np.testing.assert_allclose(f64(dist), d_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_assign_low_precision_inputs_equal_their_fp32_upcast(backend, device, dtype):
    z = torch.randn(120, 10, device=device).to(dtype)
    c = torch.randn(30, 10, device=device).to(dtype)
    got = vqt.assign(z, c, backend=backend)
    want = vqt.assign(z.float(), c.float(), backend=backend)
    assert torch.equal(got, want)
    assert np.array_equal(got.cpu().numpy(), R.nearest_code(f64(z), f64(c)))


def test_assign_nan_and_inf_rows(backend, device):
    z = torch.randn(6, 4, device=device)
    c = torch.randn(9, 4, device=device)
    clean = vqt.assign(z, c, backend=backend)
    z[1, 2] = float("nan")
    z[4, 0] = float("inf")
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    assert idx[1].item() == -1 and torch.isnan(dist[1])
    assert idx[4].item() == -1 and dist[4].item() == float("inf")
    keep = [0, 2, 3, 5]
    assert torch.equal(idx[keep], clean[keep])
    # A code holding a NaN is never chosen while finite codes exist.
    c[clean[0]] = float("nan")
    idx = vqt.assign(z[:1], c, backend=backend)
    assert idx.item() not in (-1, clean[0].item())


def test_assign_has_no_grad(backend, device):
    z = torch.randn(5, 3, device=device, requires_grad=True)
    c = torch.randn(4, 3, device=device, requires_grad=True)
    idx, dist = vqt.assign(z, c, return_distance=True, backend=backend)
    assert not idx.requires_grad and not dist.requires_grad


# --- lookup ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lookup_bit_exact_and_grad(backend, device, dtype):
    c = torch.randn(17, 23, device=device).to(dtype).requires_grad_()
    idx = torch.randint(-1, 17, (4, 9), device=device)
    out = vqt.lookup(idx, c, backend=backend)
    assert out.shape == (4, 9, 23) and out.dtype == dtype
    safe = idx.clamp_min(0)
    want = torch.where((idx >= 0).unsqueeze(-1), c.detach()[safe], 0)
    assert torch.equal(out, want)
    g = torch.randn(4, 9, 23, device=device)
    out.backward(g.to(dtype))
    expected = np.zeros((17, 23))
    keep = idx.cpu().numpy().reshape(-1) >= 0
    np.add.at(expected, idx.cpu().numpy().reshape(-1)[keep], f64(g.to(dtype)).reshape(-1, 23)[keep])
    np.testing.assert_allclose(f64(c.grad), expected, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-5)


def test_lookup_empty_and_deterministic(backend, device):
    c = torch.randn(5, 4, device=device, requires_grad=True)
    assert vqt.lookup(torch.zeros(0, dtype=torch.int64, device=device), c, backend=backend).shape == (0, 4)
    idx = torch.randint(0, 5, (300,), device=device)
    grads = []
    for _ in range(2):
        c.grad = None
        vqt.lookup(idx, c, backend=backend, deterministic=True).sum().backward()
        grads.append(c.grad.clone())
    assert torch.equal(grads[0], grads[1])
    np.testing.assert_array_equal(f64(grads[0])[:, 0], np.bincount(idx.cpu().numpy(), minlength=5))


# --- squared_error ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1000, 47), (1, 1), (3, 4, 300), (0, 5), (7,)], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_squared_error_matches_reference(backend, device, shape, reduction):
    a = torch.randn(*shape, device=device, requires_grad=True)
    b = torch.randn(*shape, device=device, requires_grad=True)
    out = vqt.squared_error(a, b, reduction, backend=backend)
    diff2 = (f64(a) - f64(b)) ** 2
    want = {"sum": diff2.sum(), "mean": diff2.mean() if diff2.size else np.nan, "none": diff2.sum(-1)}[reduction]
    assert out.dtype == torch.float32
    np.testing.assert_allclose(f64(out), want, rtol=1e-6, atol=1e-7)
    g = torch.randn(out.shape, device=device)
    out.backward(g)
    scale = f64(g)[..., None] if reduction == "none" else float(g) / (max(diff2.size, 1) if reduction == "mean" else 1)
    np.testing.assert_allclose(f64(a.grad), 2 * (f64(a) - f64(b)) * scale, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f64(b.grad), -2 * (f64(a) - f64(b)) * scale, rtol=1e-6, atol=1e-7)


def test_squared_error_spec_reconstruction_term(backend, device):
    """squared_error(dec(z_q), x) is the spec's reconstruction loss."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 8))
    model = R.Model(lambda x: x[..., :5], rng.normal(size=(9, 5)), lambda z: z @ w)
    x = rng.normal(size=(31, 8))
    idx = rng.integers(0, 9, size=31)
    out = torch.tensor(R.forward(model, x, idx), dtype=torch.float32, device=device)
    xt = torch.tensor(x, dtype=torch.float32, device=device)
    got = vqt.squared_error(out, xt, backend=backend)
    ref = R.reconstruction_loss(model, f64(xt), idx)
    assert got.item() == pytest.approx(ref, rel=1e-5)


# --- quantize --------------------------------------------------------------------------------


def identity_model(codebook):
    return R.Model(lambda x: x, f64(codebook), lambda z: z)


@pytest.mark.parametrize("shape", [(300, 37, 13), (1, 1, 1), (5, 1, 2), (64, 9, 130)], ids=shape_id)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_quantize_matches_reference(backend, device, shape, reduction):
    n, k, d = shape
    beta = 0.3
    z = torch.randn(n, d, device=device, requires_grad=True)
    c = torch.randn(k, d, device=device, requires_grad=True)
    r = vqt.quantize(z, c, beta, reduction, backend=backend)
    idx = R.nearest_code(f64(z), f64(c))
    assert np.array_equal(r.indices.cpu().numpy(), idx)
    assert torch.equal(r.z_q.detach(), c.detach()[r.indices])  # the value is exactly the code
    model = identity_model(c)
    x = f64(z)
    scale = 1.0 / z.numel() if reduction == "mean" else 1.0
    cb, cm = R.codebook_loss(model, x, idx) * scale, R.commitment_loss(model, x, idx) * scale
    assert r.codebook_loss.item() == pytest.approx(cb, rel=1e-5, abs=1e-7)
    assert r.commitment_loss.item() == pytest.approx(cm, rel=1e-5, abs=1e-7)
    assert r.loss.item() == pytest.approx(cb + beta * cm, rel=1e-5, abs=1e-7)
    # Gradients of a downstream objective through z_q, plus the VQ loss, against the reference.
    g = torch.randn(n, d, device=device)
    ((r.z_q * g).sum() + r.loss).backward()
    dz, dc = R.loss_grad(model, beta, x, idx, f64(g))
    np.testing.assert_allclose(f64(z.grad), _scaled_dz(f64(g), dz, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(c.grad), dc * scale, rtol=1e-5, atol=1e-6)


def _scaled_dz(g, dz, scale):
    """The loss part of dz scales with the reduction; the straight-through part does not."""
    return g + (dz - g) * scale


def test_quantize_stop_gradients(backend, device):
    """Each term trains only what the spec's stop-gradients allow."""
    z = torch.randn(40, 6, device=device, requires_grad=True)
    c = torch.randn(7, 6, device=device, requires_grad=True)
    model = identity_model(c)
    for term, zero in (("codebook_loss", "z"), ("commitment_loss", "c")):
        z.grad = c.grad = None
        r = vqt.quantize(z, c, backend=backend)
        getattr(r, term).backward()
        idx = r.indices.cpu().numpy()
        if zero == "z":
            assert z.grad is None or torch.count_nonzero(z.grad) == 0
            np.testing.assert_allclose(f64(c.grad), R.codebook_loss_grad(model, f64(z), idx)[1], rtol=1e-5, atol=1e-6)
        else:
            assert c.grad is None or torch.count_nonzero(c.grad) == 0
            np.testing.assert_allclose(f64(z.grad), R.commitment_loss_grad(model, f64(z), idx)[0], rtol=1e-5, atol=1e-6)
    # The straight-through output gives its gradient to z unchanged and none to the codebook.
    z.grad = c.grad = None
    r = vqt.quantize(z, c, backend=backend)
    g = torch.randn_like(z)
    (r.z_q * g).sum().backward()
    assert torch.equal(z.grad, g)
    assert c.grad is None or torch.count_nonzero(c.grad) == 0


def test_quantize_leading_dims_and_empty(backend, device):
    z = torch.randn(2, 3, 4, 5, device=device)
    c = torch.randn(6, 5, device=device)
    r = vqt.quantize(z, c, backend=backend)
    assert r.z_q.shape == z.shape and r.indices.shape == (2, 3, 4)
    assert np.array_equal(r.indices.cpu().numpy(), R.nearest_code(f64(z), f64(c)))
    e = vqt.quantize(torch.zeros(0, 5, device=device), c, backend=backend)
    assert e.z_q.shape == (0, 5) and e.loss.item() == 0.0


@pytest.mark.parametrize("shape", [(300, 37, 13), (1, 1, 2), (64, 9, 130)], ids=shape_id)
def test_quantize_rotation_trick(backend, device, shape):
    """The value is the code; z_q's gradient reaches z as reference.rotation_trick_grad (explicit float64
    matrices), the losses' gradients as without rotation; the codebook gradient does not change."""
    n, k, d = shape
    z = torch.randn(n, d, device=device, requires_grad=True)
    c = torch.randn(k, d, device=device, requires_grad=True)
    g = torch.randn(n, d, device=device)
    grads = []
    for rotation in (True, False):
        r = vqt.quantize(z, c, 0.3, "mean", rotation_trick=rotation, backend=backend)
        assert torch.equal(r.z_q.detach(), c.detach()[r.indices])
        grads.append(torch.autograd.grad((r.z_q * g).sum() + r.loss, (z, c)))
    (dz, dc), (_, plain_dc) = grads
    idx = r.indices.cpu().numpy()
    zq = f64(c)[idx]
    want = R.rotation_trick_grad(f64(z), zq, f64(g)) + 0.3 * 2 * (f64(z) - zq) / z.numel()
    err = np.linalg.norm(f64(dz) - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() <= 1e-6, err.max()
    np.testing.assert_allclose(f64(dc), f64(plain_dc), rtol=1e-6, atol=1e-7)


def test_quantize_mask(backend, device):
    """Masked vectors: index -1, a zero z_q and no gradient, whatever they hold; "mean" over the kept ones."""
    z = torch.randn(5, 9, 4, device=device)
    mask = torch.rand(5, 9, device=device) > 0.4
    z[~mask] = float("nan")
    z.requires_grad_()
    c = torch.randn(6, 4, device=device, requires_grad=True)
    r = vqt.quantize(z, c, 0.3, "mean", mask=mask, backend=backend)
    kept = f64(z)[f64(mask).astype(bool)]
    idx = R.nearest_code(kept, f64(c))
    assert np.array_equal(r.indices[mask].cpu().numpy(), idx) and bool((r.indices[~mask] == -1).all())
    assert torch.equal(r.z_q[~mask], torch.zeros_like(r.z_q[~mask]))
    mse = np.mean((kept - f64(c)[idx]) ** 2)
    assert r.codebook_loss.item() == pytest.approx(mse, rel=1e-5) and r.loss.item() == pytest.approx(1.3 * mse, rel=1e-5)
    g = torch.randn_like(z)
    ((r.z_q * g).sum() + r.loss).backward()
    assert torch.equal(z.grad[~mask], torch.zeros_like(z.grad[~mask]))
    assert torch.isfinite(z.grad).all() and torch.isfinite(c.grad).all()
    empty = vqt.quantize(z.detach(), c, mask=torch.zeros_like(mask), reduction="mean", backend=backend)
    assert torch.isnan(empty.loss)  # the mean over no elements, as F.mse_loss


def test_quantize_gradcheck_float64(device):
    """torch.autograd.gradcheck on the terms whose stop-gradient leaves the true derivative."""
    z = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: vqt.quantize(z, c.detach(), 0.5).commitment_loss, (z,))
    assert torch.autograd.gradcheck(lambda c: vqt.quantize(z.detach(), c, 0.5, "mean").codebook_loss, (c,))
    idx = vqt.assign(z, c)
    assert torch.autograd.gradcheck(lambda c: vqt.lookup(idx, c), (c,))
    b = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: vqt.squared_error(a, b, "none"), (z, b))


# --- verify_assignment -----------------------------------------------------------------------


def test_verify_assignment(backend, device):
    z = torch.randn(4, 50, 8, device=device)
    c = torch.randn(21, 8, device=device)
    idx = vqt.assign(z, c, backend=backend)
    assert vqt.verify_assignment(z, c, idx, backend=backend).all()
    ref = R.squared_distances(f64(z), f64(c))
    other = (idx + 1) % 21
    worse = np.take_along_axis(ref, other.cpu().numpy()[..., None], -1)[..., 0] > ref.min(-1) * (1 + 2**-16)
    got = vqt.verify_assignment(z, c, other, backend=backend)
    assert np.array_equal(got.cpu().numpy(), ~worse)
    idx[0, 0] = -1
    assert not vqt.verify_assignment(z, c, idx, backend=backend)[0, 0]


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_rejected_with_clear_errors(backend, device):
    z = torch.randn(4, 3, device=device)
    c = torch.randn(5, 3, device=device)
    with pytest.raises(ValueError, match=r"D = 3"):
        vqt.assign(torch.randn(4, 2, device=device), c, backend=backend)
    with pytest.raises(ValueError, match=r"2-D"):
        vqt.assign(z, c[0], backend=backend)
    with pytest.raises(ValueError, match="K >= 1"):
        vqt.assign(z, c[:0], backend=backend)
    with pytest.raises(TypeError, match="int64"):
        vqt.assign(z.long(), c, backend=backend)
    with pytest.raises(ValueError, match="metric"):
        vqt.assign(z, c, metric="dot", backend=backend)
    with pytest.raises(ValueError, match="precision"):
        vqt.assign(z, c, precision="fp8", backend=backend)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        vqt.lookup(torch.tensor([0, 5], device=device), c, backend=backend)
    with pytest.raises(IndexError):
        vqt.lookup(torch.tensor([-2], device=device), c, backend=backend)
    with pytest.raises(TypeError, match="integer"):
        vqt.lookup(torch.tensor([0.0], device=device), c, backend=backend)
    with pytest.raises(TypeError, match="integer"):
        vqt.lookup(torch.tensor([True], device=device), c, backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        vqt.squared_error(z, c, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        vqt.squared_error(z, z, "avg", backend=backend)
    with pytest.raises(ValueError, match="beta"):
        vqt.quantize(z, c, beta=-1.0, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        vqt.quantize(z, c, reduction="none", backend=backend)
    with pytest.raises(TypeError, match="complex"):
        vqt.assign(z, torch.randn(5, 3, dtype=torch.complex64, device=device), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        vqt.assign(z, c, backend="cuda")


def test_backend_forcing(device, monkeypatch):
    z = torch.randn(4, 3, dtype=torch.float64, device=device)
    c = torch.randn(5, 3, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="float64"):
        vqt.assign(z, c, backend="triton")
    monkeypatch.setenv("VQTRITON_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="float64"):
        vqt.assign(z, c)
    monkeypatch.setenv("VQTRITON_BACKEND", "torch")
    assert vqt.assign(z, c).tolist() == R.nearest_code(f64(z), f64(c)).tolist()
    monkeypatch.setenv("VQTRITON_BACKEND", "nope")
    with pytest.raises(ValueError, match="VQTRITON|backend"):
        vqt.assign(z, c)
