"""vqtriton.ResidualFSQ and vqtriton.ResidualLFQ against the residual loop written out with the NumPy
references: outputs, indices, losses, gradients, decoding, and quantize dropout."""

import math

import numpy as np
import pytest
import torch
from helpers import f64

import vqtriton as vqt
from vqtriton import reference as R
from vqtriton.residual import dropout_levels

BACKENDS = ["torch", "triton"]


def _reference_rfsq(x, levels, q, hard_clamp=True):
    lv = np.array(levels, dtype=np.float64)
    if hard_clamp:
        v = 1 + 1 / (lv - 1)
        x = np.tanh(x / v) * v
    out, residual, idx = 0.0, x, []
    for l in range(q):
        s = lv ** -l
        codes, i = R.fsq_quantize(residual / s, levels, symmetric=True, hard_clamp=hard_clamp)
        out = out + codes * s
        residual = residual - codes * s
        idx.append(i)
    return out, np.stack(idx, -1)


@pytest.mark.parametrize("hard_clamp", [True, False])
def test_residual_fsq_matches_the_loop(hard_clamp, device):
    levels, q = [8, 5, 5, 3], 4
    rfsq = vqt.ResidualFSQ(levels, q, hard_clamp=hard_clamp).to(device)
    z = torch.randn(3, 41, 4, device=device).requires_grad_()
    out, idx = rfsq(z)
    want, want_idx = _reference_rfsq(f64(z), levels, q, hard_clamp)
    assert idx.shape == (3, 41, q) and np.array_equal(f64(idx), want_idx)
    np.testing.assert_allclose(f64(out), want, atol=1e-6)
    assert torch.equal(rfsq.get_output_from_indices(idx), out.detach())
    codes = rfsq.get_codes_from_indices(idx)
    assert codes.shape == (q, 3, 41, 4)
    torch.testing.assert_close(codes.sum(0), out.detach())
    assert rfsq.codebooks.shape == (q, 600, 4)


def test_gradient_paths(device):
    """Once through level 0 (the default), or through every level (output_gradient="every", vqp's)."""
    levels = [5, 5]
    z = (torch.randn(64, 2, device=device) * 0.3).requires_grad_()
    once = vqt.ResidualFSQ(levels, 3, hard_clamp=True).to(device)
    every = vqt.ResidualFSQ(levels, 3, hard_clamp=True, output_gradient="every").to(device)
    (g1,) = torch.autograd.grad(once(z)[0].sum(), z)
    (g3,) = torch.autograd.grad(every(z)[0].sum(), z)
    lv = np.array(levels, dtype=np.float64)
    v = 1 + 1 / (lv - 1)
    clamp_grad = 1 - np.tanh(f64(z) / v) ** 2  # the input's soft clamp
    x = np.tanh(f64(z) / v) * v
    np.testing.assert_allclose(f64(g1), clamp_grad * R.fsq_quantize_grad(x, levels, symmetric=True, hard_clamp=True),
                               atol=1e-6)
    assert (f64(g3) >= f64(g1) - 1e-6).all() and (f64(g3) > f64(g1) + 0.5).any()


def test_num_active_and_dropout(device):
    rfsq = vqt.ResidualFSQ([5, 5], 4).to(device)
    z = torch.randn(30, 2, device=device)
    full, idx = rfsq(z)
    for n in (1, 3, 4):
        for active in (n, torch.tensor(n, device=device)):
            out, i = rfsq(z, num_active=active)
            assert (i[:, n:] == -1).all() and torch.equal(i[:, :n], idx[:, :n])
            torch.testing.assert_close(out, rfsq.get_output_from_indices(idx[:, :n]))
    with pytest.raises(ValueError, match="num_active"):
        rfsq(z, num_active=torch.tensor(1.5))
    for bad in (0, 5):  # as ResidualVQ: an int in [1, Q]
        with pytest.raises(ValueError, match=r"num_active must be in \[1, 4\]|num_active must be >= 1"):
            rfsq(z, num_active=bad)


@pytest.mark.parametrize("p, cutoff, multiple", [(0.5, 0, 1), (1.0, 1, 1), (0.8, 0, 3)])
def test_dropout_draw_distribution(p, cutoff, multiple):
    q = 8
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([dropout_levels(q, p, cutoff, multiple, g, "cpu") for _ in range(4000)])
    kept = [min(math.ceil(n / multiple) * multiple, q) for n in range(cutoff + 1, q)]  # n uniform, rounded up
    want = p * np.mean([k < q for k in kept])  # P(a step runs fewer than q levels)
    assert abs((draws < q).float().mean().item() - want) < 0.04
    assert set(draws.tolist()) <= set(kept) | {q}


def test_quantize_dropout_in_training_only(device):
    rfsq = vqt.ResidualFSQ([5, 5], 4, quantize_dropout=1.0, generator=torch.Generator(device=device).manual_seed(2))
    rfsq = rfsq.to(device)
    z = torch.randn(10, 2, device=device)
    counts = {int((rfsq(z)[1][0] >= 0).sum()) for _ in range(40)}
    assert counts <= {1, 2, 3} and len(counts) > 1
    rfsq.eval()
    assert (rfsq(z)[1] >= 0).all()
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index"):
        vqt.ResidualFSQ([5], 2, quantize_dropout=0.5, quantize_dropout_cutoff_index=2)


def _reference_rlfq_terms(z, q, eps=None):
    out, residual, idx, terms = 0.0, z, [], []
    for l in range(q):
        scale = 2.0**-l
        codes, i = R.lfq_quantize(residual, scale=scale)
        ps = R.lfq_per_sample_entropy(residual, 100.0, scale, eps)
        be = R.lfq_batch_entropy(residual, 100.0, scale, eps)
        terms.append(R.lfq_loss(ps, be, 0.0))
        out = out + codes
        residual = residual - codes
        idx.append(i)
    return out, np.stack(idx, -1), np.array(terms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_lfq_matches_the_loop(backend, device):
    q, d = 3, 5
    rlfq = vqt.ResidualLFQ(d, q, entropy_eps=1e-5, backend=backend).to(device)
    z = (torch.randn(37, d, device=device) * 0.3).requires_grad_()
    out, idx, loss, losses = rlfq(z, return_all_losses=True)
    want, want_idx, terms = _reference_rlfq_terms(f64(z), q, 1e-5)
    assert np.array_equal(f64(idx), want_idx)
    np.testing.assert_allclose(f64(out), want, atol=1e-6)
    np.testing.assert_allclose(f64(losses), terms, rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(terms.sum(), rel=1e-5, abs=1e-6)
    rlfq.eval()
    out, idx, loss = rlfq(z)
    assert loss.item() == 0.0 and torch.equal(rlfq.get_output_from_indices(idx), out.detach())
    assert rlfq.codebooks.shape == (q, 32, d)


def test_residual_lfq_masks_and_quantize(device):
    rlfq = vqt.ResidualLFQ(4, 2, soft_clamp=1.5).to(device)
    z = torch.randn(6, 5, 4, device=device)
    keep = torch.rand(6, 5, device=device) > 0.4
    out, idx, loss = rlfq(z, keep)
    full, full_idx = rlfq.quantize(z)
    assert (idx[~keep] == -1).all() and torch.equal(idx[keep], full_idx[keep])
    assert (out[~keep] == 0).all() and torch.equal(out[keep], full[keep])
    assert rlfq.layers[1].soft_clamp == 0.75 and rlfq.layers[1].scale == 0.5
    _, _, loss_kept = rlfq(z[keep])
    torch.testing.assert_close(loss, loss_kept)


def test_residual_lfq_arguments():
    with pytest.raises(TypeError, match="scale"):
        vqt.ResidualLFQ(4, 2, scale=2.0)
    with pytest.raises(ValueError, match="indices must be"):
        vqt.ResidualLFQ(4, 2).get_output_from_indices(torch.zeros(3, 3, dtype=torch.long))
