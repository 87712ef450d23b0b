"""ResidualVQ against greedy residual quantization by hand, its gradients, quantize dropout, shared codebooks,
the fused residual ops against the level loop, the beam search, QINCo, DiVeQ and the generator."""

import copy

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
    with pytest.raises(ValueError, match="shared_codebook=True needs one codebook size"):
        ResidualVQ(D, (K, K + 1), shared_codebook=True)


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


# --- the fused residual ops against the level loop ------------------------------------------------

FUSED_CASES = {
    "learned": (dict(), 13),
    "ema-dead-codes": (dict(ema_decay=0.8, dead_code_threshold=0.7), 13),
    "cosine-every-rotation": (dict(metric="cosine", output_gradient="every", rotation_trick=True, ema_decay=0.9), 13),
    "sizes-sum": (dict(reduction="sum"), (13, 7, 19)),
    "shared-ema": (dict(shared_codebook=True, ema_decay=0.8, dead_code_threshold=0.5), 13),
    "channel-first": (dict(channel_dim=1), 13),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_ops_match_the_level_loop(case, backend):
    """The fused forward/backward (residual_quantize, residual_stats) gives the level loop's indices, and its
    outputs, losses, gradients and codebook state, step after step (with dropout and masks)."""
    kwargs, sizes = FUSED_CASES[case]
    fused = ResidualVQ(6, sizes, None if isinstance(sizes, tuple) else 3, quantize_dropout=0.5, backend=backend, **kwargs)
    loop = copy.deepcopy(fused)
    loop.fused = False
    for step in range(3):
        z = torch.randn(3, 6, 11) if case == "channel-first" else torch.randn(3, 11, 6)
        mask = torch.rand(3, 11) > 0.3 if step == 1 else None
        w = torch.randn(z.shape)
        got = []
        for m in (fused, loop):
            zz = z.clone().requires_grad_()
            torch.manual_seed(step)  # the same dropout draw and restarts
            q, idx, loss, losses = m(zz, mask, return_all_losses=True)
            ((q * w).sum() + loss).backward()
            got.append((q, idx, losses, zz.grad, [p.grad for p in m.parameters()]))
        (q1, i1, l1, g1, p1), (q2, i2, l2, g2, p2) = got
        assert torch.equal(i1, i2), f"{case} step {step}: indices"
        torch.testing.assert_close(q1, q2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
        for a, b in zip(p1, p2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(fused.state_dict().items(), loop.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{case} step {step}: {name}")
    fused.eval(), loop.eval()
    with torch.no_grad():  # eval without gradient: residual_assign
        z = torch.randn(3, 6, 11) if case == "channel-first" else torch.randn(3, 11, 6)
        assert torch.equal(fused(z)[1], loop(z)[1])


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["first", "every"])
def test_output_gradient(mode):
    """"first": z gets the output's gradient once; "every": once per level that ran (plain straight-through)."""
    rvq = ResidualVQ(5, 9, 4, output_gradient=mode, backend="torch")
    z = torch.randn(20, 5, requires_grad=True)
    z_q, _, _ = rvq(z)
    w = torch.randn_like(z_q)
    (dz,) = torch.autograd.grad((z_q * w).sum(), z)
    torch.testing.assert_close(dz, w * (1 if mode == "first" else 4))


def test_quant_grad_frac_as_autograd_of_the_definition():
    """r_{l+1} = r_l - (f q_l + (1 - f) sg[q_l]), q_l level l's straight-through output: checked against
    the same chain written out with the module's indices."""
    f = 0.3
    rvq = ResidualVQ(5, 9, 3, quant_grad_frac=f, output_gradient="every", backend="torch")
    z = torch.randn(17, 5, requires_grad=True)
    z_q, idx, loss = rvq(z)
    w = torch.randn_like(z_q)
    (dz,) = torch.autograd.grad((z_q * w).sum() + loss, z)
    r, out, total = z, 0, 0
    for l, layer in enumerate(rvq.layers):
        code = layer.codebook[idx[:, l]]
        q = code.detach() + (r - r.detach())
        total = total + (code - r.detach()).square().mean() + 0.25 * (r - code.detach()).square().mean()
        out = out + q
        r = r - (f * q + (1 - f) * q.detach())
    (want,) = torch.autograd.grad((out * w).sum() + total, z)
    torch.testing.assert_close(dz, want)
    assert rvq._fused_mode(z, False, dict(temperature=None, route_gradients_to_input=None)) is None  # the loop


def test_dropout_cutoff_multiple_and_levels():
    q = 6
    rvq = ResidualVQ(4, 5, q, quantize_dropout=1.0, quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2,
                     backend="torch")
    seen = set()
    for _ in range(40):
        _, idx, _, losses = rvq(torch.randn(9, 4), return_all_losses=True)
        n = int((idx >= 0).all(0).sum())
        assert (idx[:, n:] == -1).all() and (losses[n:] == 0).all() and (losses[:n] > 0).all()
        seen.add(n)
    assert seen == {2, 4, 6}  # kept levels drawn from [cutoff + 1, Q - 1], rounded up to a multiple of 2
    _, idx, _ = rvq(torch.randn(9, 4), num_active=3)  # a fixed number of levels for one call (also in eval)
    assert (idx[:, :3] >= 0).all() and (idx[:, 3:] == -1).all()
    rvq.eval()
    _, idx, _ = rvq(torch.randn(9, 4), num_active=torch.tensor(2))
    assert (idx[:, :2] >= 0).all() and (idx[:, 2:] == -1).all()
    with pytest.raises(ValueError, match=r"num_active must be in \[1, 6\]"):
        rvq(torch.randn(9, 4), num_active=7)
    with pytest.raises(ValueError, match="cutoff_index must be < num_quantizers"):
        ResidualVQ(4, 5, 3, quantize_dropout_cutoff_index=3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
def test_shared_ema_codebook_takes_one_update_per_step(fused):
    """One EMA step per training step from the counts and sums of every level's inputs (float64 check)."""
    n, d, k, q, g = 30, 4, 6, 3, 0.8
    rvq = ResidualVQ(d, k, q, shared_codebook=True, ema_decay=g, backend="torch")
    rvq.fused = fused
    layer = rvq.layers[0]
    size0, sum0, codes0 = f64(layer.cluster_size), f64(layer.embed_sum), layer.codebook.clone()
    z = torch.randn(n, d)
    _, idx, _ = rvq(z)
    ref_idx, residuals, _ = greedy(z, [codes0] * q)
    assert torch.equal(idx, ref_idx)
    counts, sums = np.zeros(k), np.zeros((k, d))
    for l in range(q):
        np.add.at(counts, ref_idx[:, l].numpy(), 1)
        np.add.at(sums, ref_idx[:, l].numpy(), f64(residuals[l]))
    size = g * size0 + (1 - g) * counts
    embed_sum = g * sum0 + (1 - g) * sums
    np.testing.assert_allclose(f64(layer.cluster_size), size, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(layer.embed_sum), embed_sum, rtol=1e-5, atol=1e-6)
    total = size.sum()
    smoothed = (size + 1e-5) / (total + k * 1e-5) * total
    np.testing.assert_allclose(f64(layer.codebook), embed_sum / smoothed[:, None], rtol=1e-5, atol=1e-6)


def test_beam_search_keeping_every_path_finds_the_best_path():
    """With a beam as wide as every prefix (K^(Q-1) paths), the search returns the path of least total loss
    over all K^Q (brute force here); a beam of 1 is the greedy search."""
    n, d, k, q = 7, 3, 4, 3
    rvq = ResidualVQ(d, k, q, beam_size=k ** (q - 1), ema_decay=0.9, backend="torch").eval()
    z = torch.randn(n, d)
    _, idx, _ = rvq(z)
    books = [f64(layer.codebook) for layer in rvq.layers]
    zz = f64(z)
    best = []
    for row in zz:
        scores = {}
        for path in np.ndindex(*(k,) * q):
            r, total = row, 0.0
            for l, i in enumerate(path):
                total += ((r - books[l][i]) ** 2).mean()
                r = r - books[l][i]
            scores[path] = total
        best.append(min(scores, key=scores.get))
    assert idx.tolist() == [list(p) for p in best]
    greedy_idx, _, _ = greedy(z, [layer.codebook for layer in rvq.layers])
    assert torch.equal(rvq(z, beam_size=1)[1], greedy_idx)


def test_implicit_neural_codebook_against_brute_force():
    """QINCo: level l >= 1 picks, per row, the nearest of mlp(codebook, output so far) (all codes computed
    here at once, in float64); decoding the indices gives the output."""
    n, d, k, q = 11, 4, 7, 3
    rvq = ResidualVQ(d, k, q, implicit_neural_codebook=True, mlp_kwargs=dict(depth=2), backend="torch")
    z = torch.randn(n, d)
    z_q, idx, _ = rvq(z)
    r, out = z.double(), torch.zeros(n, d, dtype=torch.float64)
    for l, layer in enumerate(rvq.layers):
        c = layer.codebook.detach().double()
        codes = c.expand(n, k, d) if l == 0 else rvq.mlps[l - 1].double()(c.unsqueeze(0), out.unsqueeze(1))
        want = (r.unsqueeze(1) - codes).square().sum(-1).argmin(1)
        assert torch.equal(idx[:, l], want), l
        chosen = codes[torch.arange(n), want]
        out, r = out + chosen, r - chosen
        rvq.mlps.float()
    torch.testing.assert_close(z_q, out.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), z_q, rtol=1e-5, atol=1e-6)


def test_generator_drives_every_draw():
    """The same generator seed gives the same dropout draws, restarts and k-means; torch's global generator
    is not touched."""
    def run():
        gen = torch.Generator().manual_seed(7)
        rvq = ResidualVQ(4, 6, 3, quantize_dropout=0.7, ema_decay=0.8, dead_code_threshold=2.0, kmeans_init=True,
                         backend="torch", generator=gen)
        assert all(layer.generator is gen for layer in rvq.layers)
        data = torch.Generator().manual_seed(1)
        out = [rvq(torch.randn(10, 4, generator=data))[1] for _ in range(4)]
        return out, rvq.state_dict()
    state = torch.get_rng_state()
    (a, sa), (b, sb) = run(), run()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diveq_trains_every_codebook_through_the_output():
    rvq = ResidualVQ(5, 9, 3, diveq=True, backend="torch")
    assert rvq.quant_grad_frac == 1.0 and rvq.output_gradient == "every"
    z = torch.randn(20, 5, requires_grad=True)
    z_q, idx, _ = rvq(z)
    (z_q * torch.randn_like(z_q)).sum().backward()
    assert z.grad.abs().sum() > 0 and all(layer.codebook.grad.abs().sum() > 0 for layer in rvq.layers)
    with pytest.raises(ValueError, match="needs learned codebooks"):
        ResidualVQ(5, 9, 3, diveq=True, ema_decay=0.9)
