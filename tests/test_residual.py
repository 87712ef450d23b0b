"""ResidualVQ against greedy residual quantization by hand, its gradients, quantize dropout, shared codebooks."""

import numpy as np
import pytest
import torch

from vqtriton import reference
from vqtriton.layer import VectorQuantizer
from vqtriton.residual import ResidualVQ
from helpers import f64

BACKENDS = ["torch", "triton"]


def greedy(z: torch.Tensor, codebooks: list[torch.Tensor], mask: torch.Tensor | None = None):
    """Residual quantization by hand on ``[..., D]``: per-level indices, residuals and codes; the output."""
    residual, out, indices, residuals = z.detach().float(), 0, [], []
    for c in codebooks:
        idx = torch.from_numpy(reference.nearest_code(f64(residual), f64(c)))
        q = c.detach()[idx]
        if mask is not None:
            idx, q = idx.masked_fill(~mask, -1), q * mask.unsqueeze(-1)
        residuals.append(residual)
        indices.append(idx)
        out = out + q  # the levels' order, as the module adds them
        residual = residual - q
    return torch.stack(indices, -1), residuals, out


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_greedy_residual_quantization(backend, masked):
    B, T, D, K, Q, beta = 3, 11, 7, 13, 3, 0.3
    rvq = ResidualVQ(D, K, Q, beta=beta, backend=backend)
    assert len(rvq.layers) == Q and all(isinstance(layer, VectorQuantizer) for layer in rvq.layers)
    z = torch.randn(B, T, D)
    mask = torch.rand(B, T) > 0.3 if masked else None
    z_q, idx, loss, all_losses = rvq(z, mask, return_all_losses=True)

    ref_idx, residuals, ref_out = greedy(z, [layer.codebook for layer in rvq.layers], mask)
    assert idx.shape == (B, T, Q) and torch.equal(idx, ref_idx)
    assert torch.equal(z_q, ref_out)  # the sum of the chosen codes, zeros where masked
    m = np.ones((B, T), bool) if mask is None else f64(mask).astype(bool)
    for l in range(Q):  # each level: (1 + beta) times the mse of its residual to its code
        r, c = f64(residuals[l])[m], f64(rvq.layers[l].codebook)[ref_idx[..., l].numpy()[m]]
        np.testing.assert_allclose(all_losses[l].item(), (1 + beta) * np.mean((r - c) ** 2), rtol=1e-5)
    torch.testing.assert_close(loss, all_losses.sum())
    assert torch.equal(rvq.get_output_from_indices(idx), z_q)
    assert rvq.decode == rvq.get_output_from_indices


@pytest.mark.parametrize("ema_decay", [None, 0.8], ids=["learned", "ema"])
def test_every_level_commitment_reaches_the_input(ema_decay):
    N, D, K, Q, beta = 40, 6, 9, 4, 0.25
    rvq = ResidualVQ(D, K, Q, beta=beta, ema_decay=ema_decay, backend="torch")
    codebooks = [layer.codebook.detach().clone() for layer in rvq.layers]  # before any EMA step
    z = torch.randn(N, D, requires_grad=True)
    mask = torch.arange(N) >= 5
    z_q, idx, _, all_losses = rvq(z, mask, return_all_losses=True)

    ref_idx, residuals, _ = greedy(z, codebooks, mask)
    assert torch.equal(idx, ref_idx)
    m = mask.unsqueeze(-1)
    for l in range(Q):  # d loss_l / dz = beta * 2 (r_l - c_l) / numel, through r_l = z - sum sg[q_j]
        (dz,) = torch.autograd.grad(all_losses[l], z, retain_graph=True)
        c = codebooks[l][ref_idx[..., l].clamp_min(0)]
        expected = beta * 2 * (residuals[l] - c) / (mask.sum() * D) * m
        assert dz.abs().sum() > 0, f"level {l}'s commitment gives the input no gradient"
        torch.testing.assert_close(dz, expected, rtol=1e-5, atol=1e-8, msg=f"level {l}")
    # The output is straight-through once: d <z_q, w> / dz = w at the kept vectors (not Q w).
    w = torch.randn_like(z_q)
    (dz,) = torch.autograd.grad((z_q * w).sum(), z)
    torch.testing.assert_close(dz, w * m)


def test_quantize_dropout():
    N, D, K, Q = 30, 5, 6, 4
    rvq = ResidualVQ(D, K, Q, quantize_dropout=1.0, ema_decay=0.9, backend="torch")
    seen = set()
    for _ in range(25):
        before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in rvq.layers]
        codebooks = [b["codebook"] for b in before]
        z = torch.randn(N, D)
        z_q, idx, loss, all_losses = rvq(z, return_all_losses=True)
        kept = (idx >= 0).all(0)  # [Q]: the levels that ran, for the whole batch
        n = int(kept.sum())
        assert 1 <= n < Q and kept[:n].all() and (idx[:, n:] == -1).all()
        assert (all_losses[n:] == 0).all() and (all_losses[:n] > 0).all()
        ref_idx, _, ref_out = greedy(z, codebooks[:n])
        assert torch.equal(idx[:, :n], ref_idx) and torch.equal(z_q, ref_out)
        for l in range(n, Q):  # a dropped level does not run: no EMA step
            assert all(torch.equal(v, rvq.layers[l].state_dict()[k]) for k, v in before[l].items())
        seen.add(n)
    assert seen == set(range(1, Q))

    rvq.eval()  # no dropout at evaluation
    assert (rvq(torch.randn(N, D))[1] >= 0).all()
    rvq.train().quantize_dropout = 0.0
    assert (rvq(torch.randn(N, D))[1] >= 0).all()


def test_shared_codebook():
    N, D, K, Q = 25, 4, 7, 3
    rvq = ResidualVQ(D, K, Q, shared_codebook=True, kmeans_init=True, kmeans_iters=2, backend="torch")
    assert all(layer is rvq.layers[0] for layer in rvq.layers) and len(list(rvq.parameters())) == 1
    z = torch.randn(N, D, requires_grad=True)
    z_q, idx, loss = rvq(z)
    assert rvq.layers[0].initted  # k-means ran once, on the first level's input
    ref_idx, _, ref_out = greedy(z, [rvq.layers[0].codebook] * Q)
    assert torch.equal(idx, ref_idx) and torch.equal(z_q, ref_out)
    loss.backward()
    assert rvq.layers[0].codebook.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shared_codebook=True needs a learned codebook"):
        ResidualVQ(D, K, Q, shared_codebook=True, ema_decay=0.9)


def test_heads_channel_first_and_dtype():
    B, D, T, K, Q, H = 2, 6, 5, 8, 2, 3
    rvq = ResidualVQ(D, K, Q, heads=H, channel_dim=1, backend="torch")
    z = torch.randn(B, D, T, dtype=torch.bfloat16)
    z_q, idx, loss = rvq(z)
    assert z_q.shape == z.shape and z_q.dtype == torch.bfloat16 and idx.shape == (B, T, H, Q)
    assert torch.equal(rvq.decode(idx).to(torch.bfloat16), z_q)  # the levels sum in float32, then round


def test_checks():
    with pytest.raises(ValueError, match="num_quantizers must be >= 1"):
        ResidualVQ(4, 8, 0)
    with pytest.raises(ValueError, match=r"quantize_dropout must be in \[0, 1\]"):
        ResidualVQ(4, 8, 2, quantize_dropout=1.5)
    rvq = ResidualVQ(4, 8, 2)
    with pytest.raises(ValueError, match=r"indices must be \[\.\.\., num_quantizers\] with num_quantizers = 2"):
        rvq.get_output_from_indices(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        rvq(torch.ones(3, 4, dtype=torch.int64))
