"""VectorQuantizer(heads=H): equal to H independent quantizers on the channel groups, or one shared codebook."""

import pytest
import torch

from torch import nn

from vqtriton.layer import VectorQuantizer
from vqtriton.model import VQVAE

BACKENDS = ["torch", "triton"]

CONFIGS = {
    "learned": dict(beta=0.3),
    "ema": dict(ema_decay=0.8),
    "ema-kmeans": dict(ema_decay=0.8, kmeans_init=True, kmeans_iters=2),
    "ema-dead": dict(ema_decay=0.8, dead_code_threshold=0.9),
    "learned-kmeans-cosine": dict(kmeans_init=True, kmeans_iters=2, metric="cosine"),
}


def singles_like(vq: VectorQuantizer, **cfg) -> list[VectorQuantizer]:
    """One single-head quantizer per head of ``vq``, holding that head's codebook and statistics."""
    out = []
    for h in range(vq.heads):
        single = VectorQuantizer(vq.head_dim, vq.num_codes, **cfg)
        state = {k: (v if k == "initted" else v[h]).clone() for k, v in vq.state_dict().items()}
        single.load_state_dict(state)
        out.append(single)
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_equal_independent_quantizers(backend, config):
    B, T, H, Dh, K = 2, 9, 3, 4, 7
    cfg = dict(CONFIGS[config], backend=backend, channel_dim=1)
    vq = VectorQuantizer(H * Dh, K, heads=H, **cfg)
    assert vq.codebook.shape == (H, K, Dh)
    singles = singles_like(vq, **cfg)
    for step in range(2):
        z = torch.randn(B, H * Dh, T).requires_grad_()  # channel-first [B, C, T]
        mask = torch.rand(B, T) > 0.2
        torch.manual_seed(step)
        z_q, idx, loss, parts = vq(z, mask, return_breakdown=True)

        zs = z.detach().clone().requires_grad_()
        torch.manual_seed(step)  # the heads draw their random numbers in head order, as the singles here
        outs = [s(g, mask, return_breakdown=True) for s, g in zip(singles, zs.split(Dh, dim=1))]
        assert idx.shape == (B, T, H)
        assert torch.equal(idx, torch.stack([o[1] for o in outs], -1))
        assert torch.equal(z_q, torch.cat([o[0] for o in outs], 1))
        torch.testing.assert_close(loss, torch.stack([o[2] for o in outs]).mean(), rtol=1e-6, atol=0)
        for i, name in enumerate(parts._fields):  # losses, perplexity and usage: the mean over heads
            expected = torch.stack([o[3][i] for o in outs]).mean()
            torch.testing.assert_close(parts[i], expected, rtol=1e-6, atol=0, msg=name)
        for h, s in enumerate(singles):  # codebooks and EMA statistics after the step, head by head
            for name, value in s.state_dict().items():
                mine = getattr(vq, name) if name == "initted" else getattr(vq, name)[h]
                torch.testing.assert_close(mine, value, rtol=1e-6, atol=1e-7, msg=f"{name}[{h}]")

        w = torch.randn_like(z_q)
        grads = torch.autograd.grad((z_q * w).sum() + loss, [z, *([vq.codebook] if vq.ema_decay is None else [])])
        single_loss = torch.stack([o[2] for o in outs]).mean()
        single_zq = torch.cat([o[0] for o in outs], 1)
        params = [zs, *([s.codebook for s in singles] if vq.ema_decay is None else [])]
        expected = torch.autograd.grad((single_zq * w).sum() + single_loss, params)
        torch.testing.assert_close(grads[0], expected[0], rtol=1e-6, atol=1e-8)
        if vq.ema_decay is None:
            torch.testing.assert_close(grads[1], torch.stack(expected[1:]), rtol=1e-6, atol=1e-8)
        if vq.ema_decay is None:  # (an EMA step has moved the codes since)
            assert torch.equal(vq.get_output_from_indices(idx), z_q)
    if "kmeans" in config:
        assert vq.initted


@pytest.mark.parametrize("ema_decay", [None, 0.8], ids=["learned", "ema"])
def test_shared_codebook_is_one_quantizer_over_the_groups(ema_decay):
    N, H, Dh, K = 23, 3, 5, 6
    vq = VectorQuantizer(H * Dh, K, heads=H, shared_codebook=True, ema_decay=ema_decay, reduction="sum")
    one = VectorQuantizer(Dh, K, ema_decay=ema_decay, reduction="sum")
    one.load_state_dict(vq.state_dict())
    assert vq.codebook.shape == (K, Dh)
    for _ in range(2):
        z = torch.randn(N, H * Dh)
        z_q, idx, loss = vq(z)
        z1, idx1, loss1 = one(z.reshape(N, H, Dh))
        assert idx.shape == (N, H) and torch.equal(idx, idx1)
        assert torch.equal(z_q, z1.reshape(N, H * Dh))
        torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=0)
        for name, value in one.state_dict().items():  # EMA statistics count every group's vectors
            torch.testing.assert_close(getattr(vq, name), value, rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(vq.get_output_from_indices(idx), one.get_output_from_indices(idx).reshape(N, H * Dh))


def test_indices_layout_and_decode():
    vq = VectorQuantizer(6, 5, heads=2, channel_dim=1)
    z = torch.randn(2, 6, 3, 4)
    mask = torch.rand(2, 3, 4) > 0.3
    z_q, idx, _ = vq(z, mask)
    assert idx.shape == (2, 3, 4, 2)
    assert (idx[~mask] == -1).all() and (idx[mask] >= 0).all()
    assert torch.equal(vq.decode(idx), z_q)  # -1 decodes to zeros, channel-first layout
    with pytest.raises(ValueError, match=r"indices must be \[\.\.\., heads\] with heads = 2"):
        vq.get_output_from_indices(idx[..., 0])


def test_cosine_heads_normalise_each_group():
    vq = VectorQuantizer(6, 5, heads=3, metric="cosine")
    z = torch.randn(7, 6) * 4
    t = vq.transform_input(z).reshape(7, 3, 2)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(7, 3))
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(3, 5))


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_vqvae_with_given_head_indices(shared):
    # VQVAE.loss with the indices the quantizer picked equals its loss when the quantizer assigns them.
    obs, D, K = 5, 6, 4
    vq = VectorQuantizer(D, K, heads=3, shared_codebook=shared, metric="cosine", channel_dim=1).eval()
    model = VQVAE(nn.Conv1d(obs, D, 1), vq, nn.Conv1d(D, obs, 1))
    x = torch.randn(2, obs, 7)
    idx = vq(model.encode(x))[1]
    assigned, given = model.loss(x, reduction="mean"), model.loss(x, idx=idx, reduction="mean")
    for a, g in zip(assigned, given):
        torch.testing.assert_close(a, g, rtol=1e-6, atol=1e-7)


def test_heads_checks():
    with pytest.raises(ValueError, match="dim must be divisible by heads, got dim = 10 and heads = 3"):
        VectorQuantizer(10, 4, heads=3)
    with pytest.raises(ValueError, match="heads must be >= 1"):
        VectorQuantizer(10, 4, heads=0)
    with pytest.raises(TypeError, match="heads must be an int"):
        VectorQuantizer(10, 4, heads=2.0)
