"""vector-quantize-pytorch's README examples for VectorQuantize, ResidualVQ and GroupedResidualVQ (its
tests/test_readme.py and tests/test_beam.py, 1.31.0), rewritten here with ``vqtriton.compat`` in place of
``vector_quantize_pytorch``: the same constructions and calls, each with the assertions vqp's example makes.

They run on the torch path (``VQTRITON_BACKEND=torch``: the Triton interpreter is too slow for these
shapes on a CPU; the kernels are tested elsewhere). ``test_fvq`` (x-transformers' encoder as the
``vq_bridge``, trained by an ``in_place_codebook_optimizer``) is also compared with vqp itself on the same seed.
"""

import pytest
import torch

from vqtriton.compat import GroupedResidualVQ, ResidualVQ, VectorQuantize


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setenv("VQTRITON_BACKEND", "torch")


# --- VectorQuantize ---------------------------------------------------------------------------------


def _fvq(vector_quantize):
    """vqp's test_fvq construction, with ``vector_quantize`` as the class (ours or vqp's)."""
    from x_transformers import ContinuousTransformerWrapper, Encoder

    vq_bridge = ContinuousTransformerWrapper(
        num_memory_tokens=2, attn_layers=Encoder(dim=256, depth=1, heads=4, pre_norm_has_final_norm=False))
    return vector_quantize(dim=256, codebook_size=512, vq_bridge=vq_bridge, learnable_codebook=True, ema_update=False,
                           in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=1e-3))


def test_fvq():
    from vector_quantize_pytorch import VectorQuantize as VqpVectorQuantize

    results = []
    for cls in (VectorQuantize, VqpVectorQuantize):
        torch.manual_seed(0)  # the same bridge, codebook and input on both sides
        vq = _fvq(cls)
        x = torch.randn(1, 1024, 256)
        quantized, indices, commit_loss = vq(x)
        assert quantized.shape == x.shape
        assert indices.shape == (1, 1024)
        results.append((quantized, indices, commit_loss, vq.state_dict()))
    (q, i, loss, state), (q_v, i_v, loss_v, state_v) = results
    assert torch.equal(i, i_v)
    torch.testing.assert_close(q, q_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_v, rtol=1e-5, atol=1e-6)
    assert list(state) == list(state_v)
    for name, t in state_v.items():  # the codebook and the bridge after the in-place SGD step
        torch.testing.assert_close(state[name], t, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_cosine_sim", [True, False])
@pytest.mark.parametrize("rotation_trick", [True, False])
@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_vector_quantize(use_cosine_sim, rotation_trick, input_requires_grad):
    vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0,
                        use_cosine_sim=use_cosine_sim, rotation_trick=rotation_trick)
    x = torch.randn(1, 1024, 256).requires_grad_(input_requires_grad)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == x.shape and indices.shape == (1, 1024) and commit_loss.dim() == 0


def test_eval_output_is_the_codes_of_the_indices():
    vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0)
    vq.eval()
    quantized, indices, _ = vq(torch.randn(1, 1024, 256))
    assert torch.allclose(quantized, vq.get_output_from_indices(indices))


def test_lens_mask_equals_the_unpadded_call():
    vq = VectorQuantize(dim=256, codebook_size=512, decay=1.0, commitment_weight=1.0)  # decay 1: no codebook change
    x = torch.randn(1, 1024, 256)
    vq.train()
    quantized, indices, commit_loss = vq(x[:, :512])
    q_masked, i_masked, loss_masked = vq(x, lens=torch.full((1,), 512))
    assert torch.allclose(commit_loss, loss_masked)
    assert torch.allclose(quantized, q_masked[:, :512])
    assert torch.allclose(indices, i_masked[:, :512])
    assert (q_masked[:, 512:] == 0).all() and (i_masked[:, 512:] == -1).all()


def test_lower_codebook_dim_cosine_and_dead_codes():
    x = torch.randn(1, 1024, 256)
    for kwargs in (dict(codebook_dim=16), dict(use_cosine_sim=True), dict(threshold_ema_dead_code=2)):
        quantized, indices, loss = VectorQuantize(dim=256, codebook_size=256, **kwargs)(x)
        assert quantized.shape == x.shape and indices.shape == (1, 1024)


def test_multiheaded_image_feature_map():
    vq = VectorQuantize(dim=256, codebook_dim=32, heads=8, separate_codebook_per_head=True, codebook_size=8196,
                        accept_image_fmap=True)
    img_fmap = torch.randn(1, 256, 32, 32)
    quantized, indices, loss = vq(img_fmap)
    assert quantized.shape == img_fmap.shape and indices.shape == (1, 32, 32, 8)


def test_directional_reparam():
    x = torch.randn(1, 1024, 256).requires_grad_()
    vq = VectorQuantize(dim=256, codebook_size=512, directional_reparam=True, threshold_ema_dead_code=2)
    quantized, indices, _ = vq(x)
    assert quantized.shape == x.shape
    rq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=128, directional_reparam=True, threshold_ema_dead_code=2)
    quantized, indices, _ = rq(x)
    assert quantized.shape == x.shape and indices.shape == (1, 1024, 8)


@pytest.mark.parametrize("use_cosine_sim", [False, True])
@pytest.mark.parametrize("use_callable", [False, True])
def test_ema_update_weight(use_cosine_sim, use_callable):
    vq = VectorQuantize(dim=256, use_cosine_sim=use_cosine_sim, codebook_dim=128, codebook_size=8, decay=0.8)
    x = torch.randn(16, 1024, 256)
    before = vq.codebook.clone()
    weights = torch.randint(0, 2, (8,)).float()
    weight = (lambda embed_sum, cluster_size: weights) if use_callable else weights
    vq(x, ema_update_weight=weight)
    after = vq.codebook
    moved = weights.bool()
    assert torch.allclose(before[~moved], after[~moved], atol=1e-6)
    assert (before[moved] != after[moved]).all()


def test_accum_ema_update():
    vq = VectorQuantize(dim=256, use_cosine_sim=True, codebook_dim=128, codebook_size=8, decay=0.8, commitment_weight=1.0)
    x = torch.randn(16, 1024, 256)
    before = vq.codebook.clone()
    vq.train()
    vq(x, accum_ema_update=True)
    vq(x, accum_ema_update=True)
    assert torch.allclose(before, vq.codebook, atol=1e-6)
    vq(x)
    assert not torch.allclose(before, vq.codebook, atol=1e-6)


def test_3d_feature_map():
    quantizer = VectorQuantize(dim=64, codebook_size=512, accept_3d_fmap=True)
    x = torch.randn(1, 64, 16, 16, 16)
    quantizer.eval()
    quantized, indices, _ = quantizer(x)
    assert x.shape == quantized.shape and indices.shape == (1, 16, 16, 16)
    assert torch.allclose(quantized, quantizer.get_output_from_indices(indices))


def test_topk_and_manual_ema_update():
    vq1, vq2 = VectorQuantize(dim=256, codebook_size=512), VectorQuantize(dim=256, codebook_size=512)
    vq2.load_state_dict(vq1.state_dict())
    x = torch.randn(1, 1024, 256)
    mask = torch.randint(0, 2, (1, 1024)).bool()
    vq1.train()
    quantize1, indices1, commit_loss1 = vq1(x, mask=mask)
    vq2.train()
    quantize2, indices2, commit_losses = vq2(x, mask=mask, topk=1, ema_update=False)
    assert quantize2.shape == (1, 1024, 1, 256)
    assert indices2.shape == (1, 1024, 1) and commit_losses.shape == (1, 1024, 1)
    assert torch.allclose(commit_loss1, commit_losses.sum() / mask.sum())
    assert torch.equal(indices1, indices2[..., 0])
    assert torch.allclose(quantize1, quantize2[..., 0, :])
    assert not torch.allclose(vq1._codebook.embed_avg, vq2._codebook.embed_avg)
    vq2.update_ema_indices(x, indices2[..., 0], mask=mask)
    assert torch.allclose(vq1._codebook.cluster_size, vq2._codebook.cluster_size)
    assert torch.allclose(vq1._codebook.embed_avg, vq2._codebook.embed_avg)
    assert torch.allclose(vq1.codebook, vq2.codebook)


# --- ResidualVQ --------------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit_neural_codebook, use_cosine_sim", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shared_codebook", [True, False])
@pytest.mark.parametrize("quant_grad_frac", [0.0, 0.1])
def test_residual_vq(implicit_neural_codebook, use_cosine_sim, train, shared_codebook, quant_grad_frac):
    rvq = ResidualVQ(dim=32, num_quantizers=8, codebook_size=128, implicit_neural_codebook=implicit_neural_codebook,
                     use_cosine_sim=use_cosine_sim, shared_codebook=shared_codebook, quant_grad_frac=quant_grad_frac)
    x = torch.randn(1, 256, 32)
    rvq.train(train)
    quantized, indices, commit_loss = rvq(x, freeze_codebook=train and not implicit_neural_codebook)
    assert torch.allclose(quantized, rvq.get_output_from_indices(indices), atol=1e-5)


def test_residual_vq_sampled_codes_shared_codebook():
    rvq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, stochastic_sample_codes=True,
                     sample_codebook_temp=0.1, shared_codebook=True)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = rvq(x)
    assert quantized.shape == x.shape and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)


def test_grouped_residual_vq():
    rvq = GroupedResidualVQ(dim=256, num_quantizers=8, groups=2, codebook_size=1024)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = rvq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 1, 1024, 8) and commit_loss.shape == (2, 8)


def test_residual_vq_kmeans_init():
    rvq = ResidualVQ(dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True, kmeans_iters=10)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = rvq(x)
    assert quantized.shape == x.shape and all(bool(layer._codebook.initted) for layer in rvq.layers)


def test_tiger_codebook_sizes_per_level():
    rvq = ResidualVQ(dim=2, codebook_size=(5, 128, 256))
    x = torch.randn(2, 2, 2)
    rvq.train()
    quantized, indices, commit_loss = rvq(x, freeze_codebook=True)
    assert torch.allclose(quantized, rvq.get_output_from_indices(indices), atol=1e-5)


def test_diveq():
    rvq = ResidualVQ(dim=256, num_quantizers=4, codebook_size=256, diveq=True)
    x = torch.randn(1, 1024, 256)
    rvq.train()
    quantized, indices, commit_loss = rvq(x)
    assert quantized.shape == x.shape
    rvq.eval()
    quantized, indices, commit_loss = rvq(x)
    assert quantized.shape == x.shape


@pytest.mark.parametrize("codebook_dim", [256, 128])
def test_beam_search(codebook_dim):
    rvq = ResidualVQ(dim=256, codebook_dim=codebook_dim, num_quantizers=8, codebook_size=1024, quantize_dropout=True,
                     beam_size=2, eval_beam_size=3)
    x = torch.randn(1, 1024, 256).requires_grad_()
    for _ in range(5):
        quantized, indices, commit_loss = rvq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)
