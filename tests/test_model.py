"""VQVAE against vqtriton.reference: the same linear encoder and decoder, in float64."""

import numpy as np
import pytest
import torch
from torch import nn

from vqtriton import reference
from vqtriton.layer import VectorQuantizer
from vqtriton.model import VQVAE, LossBreakdown
from helpers import f64

BACKENDS = ["torch", "triton"]


class ChannelFirst(nn.Module):
    """``[B, T, C] <-> [B, C, T]`` around a module that works channel-last."""

    def __init__(self, inner: nn.Module, to_first: bool):
        super().__init__()
        self.inner, self.to_first = inner, to_first

    def forward(self, t):
        return self.inner(t).transpose(1, 2) if self.to_first else self.inner(t.transpose(1, 2))


def linear_vqvae(obs: int, D: int, K: int, device, channel_dim: int = -1, **quantizer) -> tuple[VQVAE, reference.Model]:
    """A float64 VQVAE with linear encoder and decoder, and the reference model with the same weights."""
    enc = nn.Linear(obs, D, dtype=torch.float64, device=device)
    dec = nn.Linear(D, obs, dtype=torch.float64, device=device)
    vq = VectorQuantizer(D, K, channel_dim=channel_dim, **quantizer).to(device, torch.float64)
    if channel_dim == 1:
        model = VQVAE(ChannelFirst(enc, to_first=True), vq, ChannelFirst(dec, to_first=False))
    else:
        model = VQVAE(enc, vq, dec)
    we, be, wd, bd = (f64(p) for p in (enc.weight, enc.bias, dec.weight, dec.bias))
    ref = reference.Model(lambda x: x @ we.T + be, f64(vq.codebook), lambda z: z @ wd.T + bd)
    return model, ref


@pytest.mark.parametrize("channel_dim", [-1, 1], ids=["last", "first"])
@pytest.mark.parametrize("given", [False, True], ids=["assigned", "given"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_and_gradients_match_reference(reduction, given, channel_dim, device):
    B, T, obs, D, K, beta = 3, 10, 9, 5, 11, 0.7
    model, ref = linear_vqvae(obs, D, K, device, channel_dim)
    x = torch.randn(B, T, obs, dtype=torch.float64, device=device)
    xs = f64(x)
    z_e = reference.encode(ref, xs)
    idx = reference.nearest_code(z_e, ref.codebook)  # [B, T]

    out = model.loss(x, beta, idx=torch.from_numpy(idx).to(device) if given else None, reduction=reduction)
    assert isinstance(out, LossBreakdown)
    s_x, s_z = (xs.size, z_e.size) if reduction == "mean" else (1, 1)
    expected = (
        reference.reconstruction_loss(ref, xs, idx) / s_x,
        reference.codebook_loss(ref, xs, idx) / s_z,
        reference.commitment_loss(ref, xs, idx) / s_z,
    )
    for got, want in zip(out, (*expected, expected[0] + expected[1] + beta * expected[2])):
        np.testing.assert_allclose(got.item(), want, rtol=1e-12)
    if reduction == "sum":
        np.testing.assert_allclose(out.total.item(), reference.loss(ref, beta, xs, idx), rtol=1e-12)

    out.total.backward()
    enc, dec = (m.inner if channel_dim == 1 else m for m in (model.encoder, model.decoder))
    rec_grad = reference.reconstruction_loss_grad(ref, xs, idx) / s_x  # d/d decoder output
    grad_dec_in = rec_grad @ f64(dec.weight)  # through the linear decoder, to its input
    dz = reference.straight_through_grad(grad_dec_in) + beta * reference.commitment_loss_grad(ref, xs, idx)[0] / s_z
    dcodebook = reference.codebook_loss_grad(ref, xs, idx)[1] / s_z  # the reconstruction never reaches it
    d_dec = np.einsum("bto,btd->od", rec_grad, reference.quantized(ref, idx))
    for got, want in ((model.quantizer.codebook, dcodebook), (enc.weight, np.einsum("btd,bto->do", dz, xs)), (dec.weight, d_dec)):
        np.testing.assert_allclose(f64(got.grad), want, rtol=1e-10, atol=1e-12)


def loss_and_grads(model: VQVAE, x: torch.Tensor, **kwargs):
    model.zero_grad()
    out = model.loss(x, 0.3, **kwargs)
    out.total.backward()
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_assigned_and_given_indices_agree(metric, device):
    model, _ = linear_vqvae(7, 4, 9, device, metric=metric)
    x = torch.randn(20, 7, dtype=torch.float64, device=device)
    _, idx, _ = model.quantizer(model.encode(x))
    assigned, assigned_grads = loss_and_grads(model, x)
    given, given_grads = loss_and_grads(model, x, idx=idx)
    torch.testing.assert_close(tuple(assigned), tuple(given), rtol=1e-12, atol=0)
    torch.testing.assert_close(assigned_grads, given_grads, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_quantized_encode(backend, device):
    obs, D, K = 6, 5, 13
    enc, dec = nn.Linear(obs, D).to(device), nn.Linear(D, obs).to(device)
    model = VQVAE(enc, VectorQuantizer(D, K, backend=backend).to(device), dec)
    x = torch.randn(4, 7, obs, device=device)
    codebook = model.quantizer.codebook.detach()
    idx = torch.randint(-1, K, (4, 7), device=device)

    assert torch.equal(model.encode(x), enc(x))
    q = model.quantized(idx)  # exactly the lookup; -1 gives zeros
    assert torch.equal(q[idx >= 0], codebook[idx[idx >= 0]]) and not q[idx < 0].any()
    assert torch.equal(model(x, idx), dec(q))
    nearest = torch.from_numpy(reference.nearest_code(f64(enc(x)), f64(codebook))).to(device)
    torch.testing.assert_close(model(x), dec(codebook[nearest]), rtol=0, atol=0)


def test_loss_with_an_ema_quantizer(device):
    model, ref = linear_vqvae(8, 6, 10, device, ema_decay=0.8, beta=0.4)
    x = torch.randn(30, 8, dtype=torch.float64, device=device)
    xs = f64(x)
    idx = reference.nearest_code(reference.encode(ref, xs), ref.codebook)

    for m in (model.eval(), model.train()):  # an explicit index changes nothing, in either mode
        m.loss(x, idx=torch.from_numpy(idx).to(device))
        assert torch.equal(model.quantizer.cluster_size, torch.ones_like(model.quantizer.cluster_size))
    out = model.loss(x)  # training, assigned: the terms use the codes from before the EMA step
    np.testing.assert_allclose(out.total.item(), reference.loss(ref, 0.4, xs, idx), rtol=1e-6)  # beta: the quantizer's
    np.testing.assert_allclose(
        f64(model.quantizer.cluster_size), 0.8 + 0.2 * np.bincount(idx, minlength=10), rtol=1e-6
    )


def test_argument_checks(device):
    model, _ = linear_vqvae(4, 3, 5, device)
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="reduction must be one of"):
        model.loss(x, reduction="none")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        model.loss(x, beta=-1.0)
    with pytest.raises(TypeError, match="quantizer must be a vqtriton.VectorQuantizer"):
        VQVAE(nn.Identity(), nn.Identity(), nn.Identity())
