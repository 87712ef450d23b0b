"""The residual VQ ops (``vqtriton.residual_assign``, ``residual_quantize``, ``residual_code_stats``) on both
backends: against the NumPy reference, against the level loop of ``vqtriton.quantize`` they replace
(``output_grad="first"``), against vector-quantize-pytorch 1.32.0's ResidualVQ (``"every"``), and their
input checks. Interpreter-sized shapes (N <= 120, K ~ 37, D ~ 13, L = 3..5).
"""

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import ResidualVQ as VQP_RVQ

import vqtriton as vqt
from vqtriton import reference as R
from vqtriton.functional import unit
from helpers import f64
from test_compile import no_launch  # noqa: F401 (a fixture: every launcher raises)

BACKENDS = ["torch", "triton"]
TOL = dict(rtol=1e-4, atol=2e-5)


def books(sizes, d, device, scale=0.6, requires_grad=False):
    return [torch.randn(k, d, device=device).mul(scale**l).requires_grad_(requires_grad) for l, k in enumerate(sizes)]


def np_books(cbs):
    return [f64(c) for c in cbs]


# --- residual_assign ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_assign_matches_the_reference(device, backend, metric):
    cbs = books((37, 20, 29), 13, device)
    z = torch.randn(4, 30, 13, device=device) * 2
    out = vqt.residual_assign(z, cbs, metric=metric, backend=backend)
    assert isinstance(out, vqt.ResidualAssignResult)
    assert out.indices.shape == (4, 30, 3) and out.z_q.shape == z.shape and out.distances.shape == (4, 30, 3)
    assert out.z_q.dtype == torch.float32 and out.distances.dtype == torch.float32
    ref_i, ref_q, ref_d = R.residual_nearest(f64(z), np_books(cbs), metric)
    assert (out.indices.cpu().numpy() == ref_i).all()
    np.testing.assert_allclose(f64(out.z_q), ref_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(out.distances), ref_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_stacked_and_listed_codebooks_agree(device, backend):
    stacked = torch.randn(4, 21, 13, device=device)
    z = torch.randn(50, 13, device=device)
    a = vqt.residual_assign(z, stacked, backend=backend)
    b = vqt.residual_assign(z, list(stacked.unbind(0)), backend=backend)
    c = vqt.residual_assign(z, tuple(stacked.unbind(0)), backend=backend)
    for x, y, w in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, w)


def test_assign_float64_takes_the_torch_path(device):
    cbs = [c.double() for c in books((37, 20, 29), 13, device)]
    z = torch.randn(60, 13, device=device, dtype=torch.float64)
    out = vqt.residual_assign(z, cbs)
    assert out.z_q.dtype == torch.float64 and out.distances.dtype == torch.float64
    ref_i, ref_q, ref_d = R.residual_nearest(f64(z), np_books(cbs))
    assert (out.indices.cpu().numpy() == ref_i).all()
    np.testing.assert_allclose(f64(out.z_q), ref_q, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f64(out.distances), ref_d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_mask_and_levels(device, backend):
    cbs = books((37, 20, 29, 11), 13, device)
    z = torch.randn(3, 25, 13, device=device)
    mask = torch.rand(3, 25, device=device) > 0.3
    z[~mask] = float("nan")
    for n_run in (0, 2, 4):
        out = vqt.residual_assign(z, cbs, mask=mask, levels=torch.tensor(n_run, device=device), backend=backend)
        ref_i, ref_q, ref_d = R.residual_nearest(f64(z), np_books(cbs), mask=mask.cpu().numpy(), levels=n_run)
        assert (out.indices.cpu().numpy() == ref_i).all(), n_run
        np.testing.assert_allclose(f64(out.z_q), ref_q, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f64(out.distances), ref_d, rtol=1e-4, atol=1e-5)


def test_assign_half_codebooks(device):
    cbs = [c.half() for c in books((37, 20), 13, device)]
    z = torch.randn(40, 13, device=device)
    for backend in BACKENDS:
        out = vqt.residual_assign(z, cbs, backend=backend)
        ref_i, _, _ = R.residual_nearest(f64(z), np_books(cbs))
        assert (out.indices.cpu().numpy() == ref_i).all(), backend


# --- residual_quantize: gradients -------------------------------------------------------------------------------


def _step(z, cbs, backend, *, stacked=False, **kw):
    """One forward + backward with fixed random weights: (out, dz, [dC_l], g, w, v)."""
    zz = z.detach().clone().requires_grad_()
    if stacked:
        cc = torch.stack([c.detach() for c in cbs]).requires_grad_()
        books_in = cc
    else:
        cc = [c.detach().clone().requires_grad_() for c in cbs]
        books_in = cc
    out = vqt.residual_quantize(zz, books_in, backend=backend, **kw)
    gen = torch.Generator(device=z.device).manual_seed(5)
    g = torch.randn(out.z_q.shape, generator=gen, device=z.device)
    w = torch.rand(out.indices.shape, generator=gen, device=z.device)
    v = torch.rand(out.indices.shape, generator=gen, device=z.device)
    ((out.z_q * g).sum() + (out.dist_commitment * w).sum() + (out.dist_codebook * v).sum()).backward()
    dc = list(cc.grad.unbind(0)) if stacked else [c.grad for c in cc]
    return out, zz.grad, dc, g, w, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("rotation_trick", [False, True], ids=["st", "rotation"])
@pytest.mark.parametrize("output_grad", ["first", "every"])
def test_gradients_match_the_reference(device, backend, metric, rotation_trick, output_grad):
    cbs = books((37, 20, 29), 13, device)
    z = torch.randn(2, 45, 13, device=device)
    out, dz, dc, g, w, v = _step(z, cbs, backend, metric=metric, output_grad=output_grad,
                                 rotation_trick=rotation_trick)
    ref_i, ref_q, ref_d = R.residual_nearest(f64(z), np_books(cbs), metric)
    assert (out.indices.cpu().numpy() == ref_i).all()
    np.testing.assert_allclose(f64(out.z_q), ref_q, rtol=1e-5, atol=1e-5)
    for d in (out.dist_codebook, out.dist_commitment):
        np.testing.assert_allclose(f64(d), ref_d, rtol=1e-4, atol=1e-5)
    want_dz, want_dc = R.residual_quantize_grad(f64(z), np_books(cbs), ref_i, f64(g), f64(w), f64(v), metric,
                                                output_grad, rotation_trick)
    np.testing.assert_allclose(f64(dz), want_dz, **TOL)
    for got, want in zip(dc, want_dc):
        np.testing.assert_allclose(f64(got), want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_stacked_codebook_and_masks(device, backend):
    cbs = books((21, 21, 21, 21), 13, device)
    z = torch.randn(70, 13, device=device)
    mask = torch.rand(70, device=device) > 0.3
    z[~mask] = float("nan")
    levels = torch.tensor(3, device=device)
    out, dz, dc, g, w, v = _step(z, cbs, backend, stacked=True, mask=mask, levels=levels, output_grad="every")
    assert (dz[~mask] == 0).all() and torch.isfinite(dz).all()
    assert (out.dist_commitment[~mask] == 0).all() and (out.dist_codebook[:, 3] == 0).all()
    assert (out.z_q[~mask] == 0).all()
    want_dz, want_dc = R.residual_quantize_grad(f64(torch.where(mask[:, None], z, 0)), np_books(cbs),
                                                out.indices.cpu().numpy(), f64(g), f64(w), f64(v), "l2", "every",
                                                mask=mask.cpu().numpy(), levels=3)
    np.testing.assert_allclose(f64(dz), want_dz, **TOL)
    for got, want in zip(dc, want_dc):
        np.testing.assert_allclose(f64(got), want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_gradients_repeat(device, backend):
    cbs = books((37, 20, 29), 13, device)
    z = torch.randn(80, 13, device=device)
    a = _step(z, cbs, backend, deterministic=True)
    b = _step(z, cbs, backend, deterministic=True)
    c = _step(z, cbs, backend, deterministic=False)
    for x, y, w in zip(a[2], b[2], c[2]):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("rotation_trick", [False, True], ids=["st", "rotation"])
def test_first_is_the_level_loop_of_quantize(device, backend, metric, rotation_trick):
    """``output_grad="first"`` is the loop ResidualVQ ran before the fused op: level l's ``quantize`` on the
    residual, the output level 0's straight-through output plus the detached later codes, the residual
    minus the detached codes; each level's losses weighted by its own scalars."""
    sizes = (37, 20, 29)
    cbs = books(sizes, 13, device)
    z = torch.randn(60, 13, device=device) * 2
    w_l, v_l = torch.tensor([0.3, 1.1, 0.7], device=device), torch.tensor([0.5, 0.2, 1.3], device=device)
    g = torch.randn(60, 13, device=device)

    zz, cc = z.clone().requires_grad_(), [c.clone().requires_grad_() for c in cbs]
    residual, out, idx = zz, None, []
    loss = 0
    for l, c in enumerate(cc):
        x, code = (unit(residual), unit(c)) if metric == "cosine" else (residual, c)
        r = vqt.quantize(x, code, reduction="sum", rotation_trick=rotation_trick, backend=backend)
        out = r.z_q if out is None else out + r.z_q.detach()
        residual = residual - r.z_q.detach()
        loss = loss + w_l[l] * r.commitment_loss + v_l[l] * r.codebook_loss
        idx.append(r.indices)
    ((out * g).sum() + loss).backward()

    yy, dd = z.clone().requires_grad_(), [c.clone().requires_grad_() for c in cbs]
    res = vqt.residual_quantize(yy, dd, metric=metric, rotation_trick=rotation_trick, backend=backend)
    ((res.z_q * g).sum() + (res.dist_commitment * w_l).sum() + (res.dist_codebook * v_l).sum()).backward()
    assert torch.equal(res.indices, torch.stack(idx, -1))
    torch.testing.assert_close(res.z_q, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(yy.grad, zz.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(dd, cc):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotation_trick", [False, True], ids=["st", "rotation"])
def test_every_is_vqps_residual_vq(device, backend, rotation_trick):
    """``output_grad="every"`` against vector-quantize-pytorch's ResidualVQ with a learned codebook: vqp's
    per-level loss ``commitment_weight * mse(q_l, x_l)`` trains both z and the codebook, i.e. our two
    distances each weighted ``commitment_weight / numel``."""
    torch.manual_seed(3)
    vqp = VQP_RVQ(dim=13, codebook_size=29, num_quantizers=4, learnable_codebook=True, ema_update=False,
                  rotation_trick=rotation_trick, commitment_weight=0.7).to(device).train()
    x = torch.randn(2, 30, 13, device=device, requires_grad=True)
    quantized, indices, losses = vqp(x)
    g = torch.randn_like(quantized)
    ((quantized * g).sum() + losses.sum()).backward()
    books_vqp = [layer._codebook.embed for layer in vqp.layers]

    cb = torch.stack([b.detach()[0] for b in books_vqp]).clone().requires_grad_()
    z = x.detach().clone().requires_grad_()
    out = vqt.residual_quantize(z, cb, output_grad="every", rotation_trick=rotation_trick, backend=backend)
    weight = 0.7 / x.numel()
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.z_q, quantized, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight * out.dist_commitment.sum((0, 1)), losses.reshape(-1), rtol=1e-4, atol=1e-6)
    ((out.z_q * g).sum() + weight * (out.dist_commitment + out.dist_codebook).sum()).backward()
    torch.testing.assert_close(z.grad, x.grad, rtol=1e-4, atol=1e-5)
    for l, b in enumerate(books_vqp):
        torch.testing.assert_close(cb.grad[l], b.grad[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_cosine_is_vqps_residual_vq(device, backend):
    """Cosine: vqp compares each normalised residual with normalised codes and subtracts the code (a frozen
    codebook there: vqp has no learned cosine codebook); z's gradient, rotation trick on."""
    torch.manual_seed(4)
    vqp = VQP_RVQ(dim=13, codebook_size=29, num_quantizers=3, use_cosine_sim=True, ema_update=False,
                  rotation_trick=True).to(device).train()
    x = torch.randn(2, 25, 13, device=device, requires_grad=True)
    quantized, indices, losses = vqp(x)
    g = torch.randn_like(quantized)
    ((quantized * g).sum() + losses.sum()).backward()
    cb = torch.stack([layer._codebook.embed.detach()[0] for layer in vqp.layers])
    z = x.detach().clone().requires_grad_()
    out = vqt.residual_quantize(z, cb, metric="cosine", output_grad="every", rotation_trick=True, backend=backend)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.z_q, quantized, rtol=1e-5, atol=1e-5)
    ((out.z_q * g).sum() + (out.dist_commitment / x.numel()).sum()).backward()
    torch.testing.assert_close(z.grad, x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_uses_the_steps_codes(device, backend):
    """An EMA step rewrites the codebook in place after the forward: the gradient is the step's own."""
    cb = torch.randn(3, 21, 13, device=device)
    z = torch.randn(40, 13, device=device)
    z1 = z.clone().requires_grad_()
    out = vqt.residual_quantize(z1, cb, backend=backend)
    (out.z_q.sum() + out.dist_commitment.sum()).backward()
    z2 = z.clone().requires_grad_()
    out = vqt.residual_quantize(z2, cb, backend=backend)
    cb.mul_(3.0)  # in place, before the backward
    (out.z_q.sum() + out.dist_commitment.sum()).backward()
    assert torch.equal(z1.grad, z2.grad)


# --- residual_code_stats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_code_stats(device, backend, metric):
    cbs = books((37, 20, 29), 13, device)
    z = torch.randn(3, 30, 13, device=device)
    mask = torch.rand(3, 30, device=device) > 0.2
    idx = vqt.residual_assign(z, cbs, metric=metric, mask=mask, backend=backend).indices
    counts, sums = vqt.residual_code_stats(z, cbs, idx, metric=metric, backend=backend)
    want_n, want_s = R.residual_code_stats(f64(z), np_books(cbs), idx.cpu().numpy(), metric)
    for a, b, c, e in zip(counts, want_n, sums, want_s):
        np.testing.assert_array_equal(f64(a), b)
        np.testing.assert_allclose(f64(c), e, rtol=1e-5, atol=1e-5)
    stacked = torch.stack([c[:20] for c in cbs])
    idx = vqt.residual_assign(z, stacked, backend=backend).indices
    counts, sums = vqt.residual_code_stats(z, stacked, idx, backend=backend)
    assert counts.shape == (3, 20) and sums.shape == (3, 20, 13)
    assert (counts.sum(1) == 90).all()


# --- input checks -------------------------------------------------------------------------------------------------


def _bad(dev):
    z, c = torch.randn(6, 4, device=dev), torch.randn(3, 5, 4, device=dev)
    return z, c


BAD = [
    ("codebooks-2d", lambda z, c: vqt.residual_assign(z, c[0]), ValueError, r"\[L, K, D\].*got shape \(5, 4\)"),
    ("codebooks-empty-K", lambda z, c: vqt.residual_assign(z, c[:, :0]), ValueError, r"got shape \(3, 0, 4\)"),
    ("codebooks-int", lambda z, c: vqt.residual_assign(z, c.long()), TypeError, r"codebooks must be a floating"),
    ("codebooks-kind", lambda z, c: vqt.residual_assign(z, "c"), TypeError, r"got str"),
    ("codebooks-none", lambda z, c: vqt.residual_assign(z, []), ValueError, r"at least one level"),
    ("codebooks-list-1d", lambda z, c: vqt.residual_assign(z, [c[0], c[1, 0]]), ValueError,
     r"codebooks\[1\] must be 2-D \[K_l, D\].*\(4,\)"),
    ("codebooks-list-D", lambda z, c: vqt.residual_assign(z, [c[0], c[1, :, :3]]), ValueError,
     r"same D, dtype and device.*codebooks\[1\] \(5, 3\)"),
    ("codebooks-list-dtype", lambda z, c: vqt.residual_assign(z, [c[0], c[1].half()]), ValueError,
     r"same D, dtype and device.*torch.float16"),
    ("z-D", lambda z, c: vqt.residual_assign(z[:, :3], c), ValueError, r"D = 4 \(the codebooks'\), got z \(6, 3\)"),
    ("z-int", lambda z, c: vqt.residual_assign(z.long(), c), TypeError, r"z must be a floating"),
    ("metric", lambda z, c: vqt.residual_assign(z, c, metric="dot"), ValueError, r"metric must be one of"),
    ("precision", lambda z, c: vqt.residual_assign(z, c, precision="fp8"), ValueError, r"precision must be one of"),
    ("mask-shape", lambda z, c: vqt.residual_assign(z, c, mask=torch.ones(5, dtype=torch.bool, device=z.device)),
     ValueError, r"mask must have z's shape without the last dim, \(6,\), got \(5,\)"),
    ("mask-dtype", lambda z, c: vqt.residual_assign(z, c, mask=torch.ones(6, device=z.device)), TypeError,
     r"mask must be a bool tensor"),
    ("levels-int", lambda z, c: vqt.residual_assign(z, c, levels=2), TypeError,
     r"levels must be None or a 0-dim integer tensor .*got int"),
    ("levels-float", lambda z, c: vqt.residual_assign(z, c, levels=torch.tensor(2.0, device=z.device)), TypeError,
     r"0-dim integer tensor .*got torch.float32"),
    ("levels-1d", lambda z, c: vqt.residual_assign(z, c, levels=torch.tensor([2], device=z.device)), TypeError,
     r"0-dim integer tensor .*of shape \(1,\)"),
    ("output_grad", lambda z, c: vqt.residual_quantize(z, c, output_grad="last"), ValueError,
     r"output_grad must be one of \('first', 'every'\)"),
    ("rotation_trick", lambda z, c: vqt.residual_quantize(z, c, rotation_trick="yes"), ValueError,
     r"rotation_trick must be one of"),
    ("stats-indices-shape", lambda z, c: vqt.residual_code_stats(z, c, torch.zeros(6, 2, dtype=torch.long,
                                                                                    device=z.device)),
     ValueError, r"indices must have shape z.shape\[:-1\] \+ \(L,\) = \(6, 3\), got \(6, 2\)"),
    ("stats-indices-range", lambda z, c: vqt.residual_code_stats(z, c, torch.full((6, 3), 5, device=z.device)),
     IndexError, r"indices must lie in \[0, 5\)"),
    ("stats-indices-range-per-level",  # levels of 5, 3 and 5 codes: index 4 is out of range at level 1 only
     lambda z, c: vqt.residual_code_stats(z, [c[0], c[1, :3], c[2]], torch.full((6, 3), 4, device=z.device)),
     IndexError, r"indices\[\.\.\., 1\] must lie in \[0, 3\)"),
    ("stats-indices-float", lambda z, c: vqt.residual_code_stats(z, c, torch.zeros(6, 3, device=z.device)),
     TypeError, r"indices must be an integer tensor"),
]


@pytest.mark.parametrize("fn, error, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_before_any_launch(no_launch, device, fn, error, match):
    z, c = _bad(device)
    with pytest.raises(error, match=match):
        fn(z, c)
