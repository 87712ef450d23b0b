"""vqtriton.compat.VectorQuantize against vector-quantize-pytorch 1.32.0 itself (a dev dependency).

For each supported combination: vqp trains a few steps, its state_dict loads into ours, and then, in
eval mode, indices are equal and the quantized outputs close (both losses 0, as vqp returns); in
training mode, one step's outputs, loss and gradients (input, codebook, projections; rotation trick on
and off) are close, and with an EMA codebook so is the state after the step. State dicts move both
ways; every vqp argument is honoured (none is refused today; the refusal machinery is tested on a dummy).
The affine map (``affine_param``) and the in-place codebook optimiser are compared with vqp step by step.
"""

import copy
import inspect

import pytest
import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize as VQP

from vqtriton import compat
from vqtriton.compat import _common
from vqtriton.compat import VectorQuantize

BACKENDS = ["torch", "triton"]
DIM, K = 8, 23
# The vqp arguments honoured (every other one is in compat.UNSUPPORTED).
SUPPORTED = {
    "dim", "codebook_size", "codebook_dim", "heads", "separate_codebook_per_head", "decay", "eps", "kmeans_init",
    "kmeans_iters", "use_cosine_sim", "layernorm_after_project_in", "threshold_ema_dead_code", "channel_last",
    "accept_image_fmap", "accept_3d_fmap", "commitment_weight", "sample_codebook_temp", "rotation_trick",
    "sync_codebook", "ema_update", "learnable_codebook", "return_zeros_for_masked_padding", "freeze_codebook",
    "sync_kmeans", "stochastic_sample_codes", "straight_through", "directional_reparam",
    "directional_reparam_variance", "manual_ema_update", "route_gradients_to_input", "commitment_use_cross_entropy_loss",
    "orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes", "sync_update_v",
    "vq_bridge", "codebook_diversity_loss_weight", "codebook_diversity_temperature", "affine_param",
    "affine_param_batch_decay", "affine_param_codebook_decay", "sync_affine_param", "in_place_codebook_optimizer",
    "manual_in_place_optimizer_update",
}

# name -> (vqp kwargs, input layout, masked)
CONFIGS = {
    "ema": (dict(), "bnd", True),
    "ema-no-rotation": (dict(rotation_trick=False), "bnd", True),
    "ema-cosine": (dict(use_cosine_sim=True), "bnd", False),
    "ema-kmeans-dead-codes": (dict(kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=0.5), "bnd", False),
    "ema-heads-shared": (dict(heads=2), "bnd", False),
    "ema-heads-separate": (dict(heads=2, separate_codebook_per_head=True, codebook_dim=4), "bnd", False),
    "ema-projection-layernorm": (dict(codebook_dim=5, layernorm_after_project_in=True), "bnd", False),
    "ema-commitment-weight": (dict(commitment_weight=0.3, decay=0.9), "bnd", True),
    "learnable": (dict(learnable_codebook=True, ema_update=False), "bnd", True),
    "learnable-no-rotation": (dict(learnable_codebook=True, ema_update=False, rotation_trick=False), "bnd", True),
    "learnable-heads-separate": (
        dict(learnable_codebook=True, ema_update=False, heads=2, separate_codebook_per_head=True, codebook_dim=3),
        "bnd", False),
    "learnable-projection": (dict(learnable_codebook=True, ema_update=False, codebook_dim=5, commitment_weight=0.5),
                             "bnd", False),
    "frozen": (dict(ema_update=False), "bnd", True),
    "channel-first": (dict(channel_last=False), "bdn", False),
    "image-fmap": (dict(accept_image_fmap=True), "image", False),
    "3d-fmap": (dict(accept_3d_fmap=True, learnable_codebook=True, ema_update=False), "video", False),
    "one-vector": (dict(learnable_codebook=True, ema_update=False), "bd", False),
    "padding-passes-through": (dict(return_zeros_for_masked_padding=False), "bnd", True),
    "learnable-frozen": (dict(learnable_codebook=True, ema_update=False, freeze_codebook=True), "bnd", True),
    "learnable-dead-codes": (dict(learnable_codebook=True, ema_update=False, threshold_ema_dead_code=0.3), "bnd", False),
    "manual-ema": (dict(manual_ema_update=True), "bnd", False),
    "kmeans-unsynced": (dict(kmeans_init=True, kmeans_iters=2, sync_kmeans=False), "bnd", False),
    "sampling-cold-straight-through": (dict(stochastic_sample_codes=True, sample_codebook_temp=1e-7,
                                            straight_through=True, rotation_trick=False), "bnd", True),
    "directional-no-noise": (dict(directional_reparam=True, directional_reparam_variance=0.0,
                                  threshold_ema_dead_code=1e-9), "bnd", False),
    "no-route-to-input": (dict(learnable_codebook=True, ema_update=False, route_gradients_to_input=False), "bnd", False),
    "ema-orthogonal": (dict(orthogonal_reg_weight=0.7), "bnd", True),
    "ema-orthogonal-active-codes": (dict(orthogonal_reg_weight=0.7, orthogonal_reg_active_codes_only=True), "bnd", False),
    "learnable-orthogonal-heads": (dict(learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.3, heads=2,
                                        separate_codebook_per_head=True, codebook_dim=4), "bnd", False),
    "learnable-cross-entropy-commitment": (dict(learnable_codebook=True, ema_update=False,
                                                commitment_use_cross_entropy_loss=True), "bnd", True),
    "learnable-sync-update-v": (dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5), "bnd", True),
    "learnable-diversity": (dict(learnable_codebook=True, ema_update=False, codebook_diversity_loss_weight=0.3,
                                 codebook_diversity_temperature=5.0), "bnd", False),
    # decay 1: vqp's backward of an EMA codebook's logits reads the codebook after its in-place update (see
    # test_cross_entropy_with_an_ema_codebook); with codes that do not move, its gradients are comparable.
    "ema-cosine-heads-diversity": (dict(use_cosine_sim=True, heads=2, decay=1.0, codebook_diversity_loss_weight=0.3),
                                   "bnd", False),
    "image-fmap-diversity": (dict(accept_image_fmap=True, learnable_codebook=True, ema_update=False,
                                  codebook_diversity_loss_weight=0.2), "image", False),
    "ema-affine": (dict(affine_param=True), "bnd", True),
    "ema-affine-heads-shared-decays": (dict(affine_param=True, heads=2, affine_param_batch_decay=0.7,
                                            affine_param_codebook_decay=0.4), "bnd", False),
    "learnable-affine-heads-separate": (dict(affine_param=True, learnable_codebook=True, ema_update=False, heads=2,
                                             separate_codebook_per_head=True, codebook_dim=4), "bnd", False),
    "learnable-affine-one-vector": (dict(affine_param=True, learnable_codebook=True, ema_update=False), "bd", False),
}
SHAPES = {"bnd": (3, 17, DIM), "bdn": (3, DIM, 17), "image": (2, DIM, 5, 4), "video": (2, DIM, 3, 2, 4), "bd": (29, DIM)}


def inputs(layout, masked, device, requires_grad=False):
    x = torch.randn(SHAPES[layout], device=device).requires_grad_(requires_grad)
    mask = torch.rand(x.shape[0], x.shape[1], device=device) > 0.3 if masked else None
    return x, mask


def call(module, x, mask):
    return module(x) if mask is None else module(x, mask=mask)


def trained_vqp(kwargs, layout, masked, device, steps=3):
    """vqp after a few training steps: EMA updates, or SGD on a learnable codebook and projections."""
    vqp = VQP(DIM, K, **kwargs).to(device).train()
    opt = torch.optim.SGD([p for p in vqp.parameters() if p.requires_grad], lr=0.5) if list(vqp.parameters()) else None
    for _ in range(steps):
        x, mask = inputs(layout, masked, device, requires_grad=True)
        out, _, loss = call(vqp, x, mask)
        if opt is not None:
            opt.zero_grad()
            ((out * 0.1).sum() + loss).backward()
            opt.step()
    return vqp


def ours_from(vqp, kwargs, backend, device):
    ours = VectorQuantize(DIM, K, **kwargs, backend=backend).to(device)
    ours.load_state_dict(vqp.state_dict())
    return ours


def close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def through_vqp_affine(vqp, codes):
    """vqp's channel-last codes ``[..., (C) d]`` through vqp's own affine map of its current statistics."""
    cb = vqp._codebook
    m_b, v_b, m_c, v_c = (t.squeeze(1) for t in (cb.batch_mean, cb.batch_variance, cb.codebook_mean, cb.codebook_variance))
    std = lambda v: v.clamp(min=1e-5).sqrt()  # noqa: E731
    split = codes.unflatten(-1, (-1, m_b.shape[-1]))  # [..., C, d] against the statistics [C, d]
    return ((split - m_c) * (std(v_b) / std(v_c)) + m_b).reshape(codes.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_parity_with_vqp_after_loading_its_checkpoint(config, backend, device):
    kwargs, layout, masked = CONFIGS[config]
    vqp = trained_vqp(kwargs, layout, masked, device)
    ours = ours_from(vqp, kwargs, backend, device)
    assert bool(ours.quantizer.initted) == bool(vqp._codebook.initted)

    # Eval mode: the same indices, the same quantized values, a zero loss.
    vqp.eval(), ours.eval()
    x, mask = inputs(layout, masked, device)
    with torch.no_grad():
        want, got = call(vqp, x, mask), call(ours, x, mask)
    assert torch.equal(got[1], want[1]), config
    close(got[0], want[0], "eval output")
    assert got[2].item() == want[2].item() == 0.0
    if not masked:  # vqp's get_output_from_indices maps -1 to the last code
        close(ours.get_output_from_indices(got[1]), got[0], "codes from indices")
        theirs = vqp.get_codes_from_indices(want[1])
        if kwargs.get("affine_param"):  # ours decode through the affine map, as the forward outputs them
            theirs = through_vqp_affine(vqp, theirs)
        close(ours.get_codes_from_indices(got[1]), theirs, "get_codes_from_indices")

    # Training mode, one step: outputs, loss and every gradient.
    vqp.train(), ours.train()
    x, mask = inputs(layout, masked, device, requires_grad=True)
    w = torch.randn(x.shape, device=device)
    results = []
    for module in (vqp, ours):
        module.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        out, idx, loss = call(module, xi, mask)
        ((out * w).sum() + loss).backward()
        results.append((out, idx, loss, xi.grad))
    (out_v, idx_v, loss_v, dx_v), (out_o, idx_o, loss_o, dx_o) = results
    assert torch.equal(idx_o, idx_v)
    close(out_o, out_v, "training output")
    close(loss_o, loss_v, "training loss")
    close(dx_o, dx_v, "input gradient", rtol=1e-4, atol=1e-5)
    vqp_params, our_params = dict(vqp.named_parameters()), dict(ours.named_parameters())
    for name, p in vqp_params.items():
        ours_name = "quantizer.codebook" if name == "_codebook.embed" else name
        q = our_params[ours_name]
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
        else:
            close(q.grad.reshape(p.grad.shape), p.grad, f"gradient of {name}", rtol=1e-4, atol=1e-5)
    if kwargs.get("threshold_ema_dead_code", 0) == 0:  # restarts draw random rows: only the EMA step compares
        state_v, state_o = vqp.state_dict(), ours.state_dict()
        for name, t in state_v.items():
            close(state_o[name], t, f"state {name} after a training step")


@pytest.mark.parametrize("config", ["ema", "learnable-heads-separate", "ema-projection-layernorm", "frozen"])
def test_our_checkpoint_loads_into_vqp(config, device):
    """ours -> vqp: the same indices and outputs; also nested in a model (prefixed keys)."""
    kwargs, layout, masked = CONFIGS[config]
    ours = VectorQuantize(DIM, K, **kwargs).to(device).train()
    for _ in range(3):  # train ours: EMA steps (or nothing to learn without an optimiser)
        call(ours, *inputs(layout, masked, device))
    parent_ours, parent_vqp = nn.ModuleDict({"vq": ours}), nn.ModuleDict({"vq": VQP(DIM, K, **kwargs)}).to(device)
    parent_vqp.load_state_dict(parent_ours.state_dict())
    twin = nn.ModuleDict({"vq": VectorQuantize(DIM, K, **kwargs)}).to(device)
    twin.load_state_dict(parent_vqp.state_dict())  # and back
    x, mask = inputs(layout, masked, device)
    for m in (ours, parent_vqp["vq"], twin["vq"]):
        m.eval()
    with torch.no_grad():
        got, want, back = call(ours, x, mask), call(parent_vqp["vq"], x, mask), call(twin["vq"], x, mask)
    assert torch.equal(got[1], want[1]) and torch.equal(back[1], got[1])
    close(got[0], want[0], "output in vqp")
    assert torch.equal(back[0], got[0])
    for name, t in ours.state_dict().items():
        assert torch.equal(twin["vq"].state_dict()[name], t), name


def test_state_dict_keys_and_shapes_are_vqps():
    for kwargs, _, _ in CONFIGS.values():
        torch.manual_seed(0)
        theirs = VQP(DIM, K, **kwargs).state_dict()
        torch.manual_seed(0)
        ours = VectorQuantize(DIM, K, **kwargs).state_dict()
        assert list(ours) == list(theirs), kwargs
        for name, t in theirs.items():
            assert ours[name].shape == t.shape and ours[name].dtype == t.dtype, (kwargs, name)
            # vqp's codebook mean and variance start as torch.empty (whatever memory held) until its first call
            uninitialised = name.endswith(("codebook_mean", "codebook_variance")) and bool(theirs[name + "_needs_init"])
            if not kwargs.get("kmeans_init") and not uninitialised:  # one seed: vqp's initial codes and projections
                assert torch.equal(ours[name], t), (kwargs, name)


def test_checkpoint_shape_mismatch_is_a_clear_error():
    vqp = VQP(DIM, K, heads=2, separate_codebook_per_head=True, codebook_dim=4)
    with pytest.raises(ValueError, match=r"_codebook.embed has shape \(2, 23, 4\) .*expects \(1, 23, 4\)"):
        VectorQuantize(DIM, K, heads=2, codebook_dim=4).load_state_dict(vqp.state_dict())


def test_ours_own_layout_loads_too():
    """A state_dict in vqtriton's layout (the quantizer's own keys) loads as well."""
    a, b = VectorQuantize(DIM, K, codebook_dim=5), VectorQuantize(DIM, K, codebook_dim=5)
    state = {"quantizer." + k: v for k, v in a.quantizer.state_dict().items()}
    state.update({k: v for k, v in a.state_dict().items() if k.startswith("project_")})
    b.load_state_dict(state)
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


# --- the arguments ------------------------------------------------------------------------------------


def _params(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def test_same_constructor_and_forward_arguments_and_defaults_as_vqp():
    theirs, ours = _params(VQP.__init__), _params(VectorQuantize.__init__)
    vqtriton_own = {"precision", "backend", "deterministic"}
    assert list(theirs) == [n for n in ours if n not in vqtriton_own]
    assert all(ours[n] == d for n, d in theirs.items()), {n: (ours[n], d) for n, d in theirs.items() if ours[n] != d}
    assert set(theirs) == SUPPORTED  # every argument honoured
    assert compat.UNSUPPORTED == {} and compat.UNSUPPORTED_FORWARD == {}
    forward_theirs, forward_ours = _params(VQP.forward), _params(VectorQuantize.forward)
    assert forward_theirs == forward_ours


@pytest.mark.parametrize("value", [True, 0.5, nn.Identity(), lambda p: p, torch.zeros(())])
def test_the_refusal_machinery_names_an_argument(value):
    """``refuse`` (kept for arguments a later vqp adds): a value other than the default is refused by name,
    a tensor, module or callable included; the default passes."""
    defaults = {"new_vqp_argument": None if not isinstance(value, (bool, float)) else type(value)(0)}
    with pytest.raises(NotImplementedError, match=r"VectorQuantize does not implement .* new_vqp_argument="):
        _common.refuse("VectorQuantize", {"new_vqp_argument": value}, defaults, "constructor")
    _common.refuse("VectorQuantize", dict(defaults), defaults, "constructor")


def test_an_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="not_a_vqp_argument"):
        VectorQuantize(DIM, K, not_a_vqp_argument=1)
    with pytest.raises(TypeError, match="not_a_vqp_argument"):
        VectorQuantize(DIM, K)(torch.randn(2, 3, DIM), not_a_vqp_argument=1)


def test_invalid_combinations_as_vqp():
    with pytest.raises(ValueError, match="use_cosine_sim=True is not compatible with learnable_codebook"):
        VectorQuantize(DIM, K, use_cosine_sim=True, learnable_codebook=True, ema_update=False)
    with pytest.raises(ValueError, match="learnable_codebook=True needs ema_update=False"):
        VectorQuantize(DIM, K, learnable_codebook=True)
    with pytest.raises(ValueError, match="at most one of straight_through, rotation_trick"):
        VectorQuantize(DIM, K, straight_through=True)
    with pytest.raises(ValueError, match="directional_reparam=True needs threshold_ema_dead_code > 0"):
        VectorQuantize(DIM, K, directional_reparam=True)
    vq = VectorQuantize(DIM, K, accept_image_fmap=True)
    with pytest.raises(ValueError, match=r"needs a 4-D x, got x \(2, 5, 8\)"):
        vq(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="mask \\(or lens\\) needs x"):
        VectorQuantize(DIM, K)(torch.randn(4, DIM), mask=torch.ones(4, dtype=torch.bool))


def test_lens_is_a_mask(device):
    vq = VectorQuantize(DIM, K).to(device).eval()
    x = torch.randn(3, 7, DIM, device=device)
    lens = torch.tensor([7, 2, 0], device=device)
    a, b = vq(x, lens=lens), vq(x, mask=torch.arange(7, device=device) < lens[:, None])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and bool((a[1][2] == -1).all())


def test_loss_breakdown(device):
    vq = VectorQuantize(DIM, K, commitment_weight=0.4).to(device)
    out, idx, loss, parts = vq(torch.randn(2, 9, DIM, device=device), return_loss_breakdown=True)
    assert isinstance(parts, compat.LossBreakdown)
    close(loss, 0.4 * parts.commitment, "loss = commitment_weight * commitment")
    assert parts.codebook_diversity == parts.orthogonal_reg == parts.inplace_optimize == 0


# --- forward arguments, against vqp ------------------------------------------------------------------


def _transform(embed):
    """A codebook_transform_fn as vqp calls it: codes [1, K, d] -> per-token codes [1, b, n, K, d]."""
    shift = torch.linspace(-0.2, 0.2, 3 * 17, device=embed.device).view(1, 3, 17, 1, 1)
    return embed[:, None, None] * 1.1 + shift


FORWARD_CASES = {
    "topk-train": (dict(), dict(topk=3), True),
    "topk-eval": (dict(), dict(topk=3), False),
    "topk-learnable-train": (dict(learnable_codebook=True, ema_update=False), dict(topk=2), True),
    "ema-weight-tensor": (dict(), dict(ema_update_weight=torch.tensor([0.0, 1.0] * 11 + [0.5])), True),
    "ema-weight-callable": (dict(decay=0.7), dict(ema_update_weight=lambda s, c: (c > 0).float()), True),
    "accumulate": (dict(), dict(accum_ema_update=True), True),
    "no-ema-update": (dict(threshold_ema_dead_code=0.0), dict(ema_update=False), True),
    "freeze": (dict(learnable_codebook=True, ema_update=False), dict(freeze_codebook=True), True),
    "codebook-transform": (dict(learnable_codebook=True, ema_update=False), dict(codebook_transform_fn=_transform), True),
    "cross-entropy-learnable": (dict(learnable_codebook=True, ema_update=False), dict(indices=True), True),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_arguments_match_vqp(case, device):
    """One call with each forward argument: vqp's and ours give the same indices, outputs, losses, input
    and codebook gradients and state (the EMA state twice over for accumulation)."""
    kwargs, fkw, train = FORWARD_CASES[case]
    torch.manual_seed(0)
    vqp = VQP(DIM, K, **kwargs).to(device).train(train)
    ours = VectorQuantize(DIM, K, **kwargs).to(device).train(train)
    ours.load_state_dict(vqp.state_dict())
    x = torch.randn(3, 17, DIM, device=device)
    mask = torch.rand(3, 17, device=device) > 0.3 if "topk" in case else None
    if fkw.get("indices") is True:
        fkw = dict(indices=torch.randint(-1, K, (3, 17), device=device))
    outs = []
    for module in (vqp, ours):
        xi = x.clone().requires_grad_()
        calls = 2 if case == "accumulate" else 1
        for _ in range(calls):
            out = module(xi, mask=mask, **fkw) if mask is not None else module(xi, **fkw)
        if case == "accumulate":
            out = module(xi)  # the accumulated statistics enter this step
        got = out[0]
        loss = out[-1]
        w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(device)
        ((got * w).sum() + loss.sum()).backward()
        outs.append((out, xi.grad))
    (want, dx_v), (got, dx_o) = outs
    if "indices" not in fkw:
        assert torch.equal(got[1], want[1]), case
    close(got[0], want[0], "output")
    close(got[-1], want[-1], "loss")
    close(dx_o, dx_v, "input gradient", rtol=1e-4, atol=1e-5)
    if vqp._codebook.embed.grad is not None:
        close(ours.quantizer.codebook.grad.reshape(vqp._codebook.embed.shape), vqp._codebook.embed.grad,
              "codebook gradient", rtol=1e-4, atol=1e-5)
    for name, t in vqp.state_dict().items():
        close(ours.state_dict()[name], t, f"state {name}")


def test_cross_entropy_with_an_ema_codebook(device):
    """indices= with an EMA codebook: vqp's value; the gradient is that of F.cross_entropy on the codes the
    logits used (vqp's backward reads the codebook after its in-place EMA update)."""
    vqp = VQP(DIM, K).to(device)
    ours = VectorQuantize(DIM, K).to(device)
    ours.load_state_dict(vqp.state_dict())
    codes = ours.codebook.detach().clone()
    x = torch.randn(3, 17, DIM, device=device, requires_grad=True)
    target = torch.randint(0, K, (3, 17), device=device)
    _, ce = ours(x, indices=target)
    _, ce_vqp = vqp(x.detach(), indices=target)
    close(ce, ce_vqp, "cross entropy")
    want = nn.functional.cross_entropy(-torch.cdist(x.reshape(-1, DIM), codes), target.reshape(-1))
    close(torch.autograd.grad(ce, x)[0], torch.autograd.grad(want, x)[0], "gradient", rtol=1e-4, atol=1e-6)
    close(ours.codebook, vqp.codebook, "the EMA step of the same call")


def test_input_without_gradient_gets_the_codes(device):
    """vqp routes no straight-through gradient when the input does not require one: the output is the codes
    and project_in gets only the commitment loss's gradient."""
    kwargs = dict(codebook_dim=5, learnable_codebook=True, ema_update=False)
    torch.manual_seed(0)
    vqp = VQP(DIM, K, **kwargs).to(device)
    ours = VectorQuantize(DIM, K, **kwargs).to(device)
    ours.load_state_dict(vqp.state_dict())
    x = torch.randn(3, 17, DIM, device=device)
    for m in (vqp, ours):
        out, _, loss = m(x)
        ((out * x).sum() + loss).backward()
    for name, p in vqp.named_parameters():
        q = dict(ours.named_parameters())["quantizer.codebook" if name == "_codebook.embed" else name]
        close(q.grad.reshape(p.grad.shape), p.grad, name, rtol=1e-4, atol=1e-5)


def test_codebook_view_and_update_indices(device):
    """vqp's _codebook attributes and update_ema_indices (vqp's test_beam example, in small)."""
    vq = VectorQuantize(DIM, K).to(device)
    view = vq._codebook
    assert view.embed.shape == (1, K, DIM) and view.cluster_size.shape == (1, K) and view.embed_avg.shape == (1, K, DIM)
    assert view.embed.data_ptr() == vq.quantizer.codebook.data_ptr()
    twin = copy.deepcopy(vq)
    x = torch.randn(2, 9, DIM, device=device)
    _, idx, _ = vq(x)
    _, top, _ = twin(x, topk=1, ema_update=False)
    twin.update_ema_indices(x, top[..., 0])
    close(twin._codebook.embed_avg, vq._codebook.embed_avg, "embed_avg")
    close(twin.codebook, vq.codebook, "codes")
    learned = VectorQuantize(DIM, K, learnable_codebook=True, ema_update=False)
    assert learned._codebook.cluster_size.shape == (1, K)  # vqp's unused statistics, kept for checkpoints


def test_cross_entropy_commitment_with_an_ema_codebook(device):
    """commitment_use_cross_entropy_loss with an EMA codebook: vqp's loss value; the input gradient is that of
    F.cross_entropy on the codes the logits used (vqp's reads the codebook after its in-place EMA update)."""
    vqp = VQP(DIM, K, commitment_use_cross_entropy_loss=True, commitment_weight=0.6).to(device)
    ours = VectorQuantize(DIM, K, commitment_use_cross_entropy_loss=True, commitment_weight=0.6).to(device)
    ours.load_state_dict(vqp.state_dict())
    codes = ours.codebook.detach().clone()
    x = torch.randn(3, 17, DIM, device=device, requires_grad=True)
    _, idx, loss = ours(x)
    _, idx_v, loss_v = vqp(x.detach())
    assert torch.equal(idx, idx_v)
    close(loss, loss_v, "loss")
    want = 0.6 * nn.functional.cross_entropy(-torch.cdist(x.reshape(-1, DIM), codes), idx.reshape(-1))
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0], "gradient", rtol=1e-4, atol=1e-6)


def test_orthogonal_max_codes_counts_that_many():
    """orthogonal_reg_max_codes=m: the regulariser over m codes: with every code the same direction each
    cosine is 1 and the loss 1 - 1/m, whichever m are drawn."""
    vq = VectorQuantize(DIM, K, learnable_codebook=True, ema_update=False, orthogonal_reg_weight=1.0,
                        orthogonal_reg_max_codes=5, commitment_weight=0.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.rand(K, 1) + 0.5 * torch.ones(K, DIM))
    _, _, loss, parts = vq(torch.randn(2, 9, DIM), return_loss_breakdown=True)
    close(parts.orthogonal_reg, torch.tensor(1 - 1 / 5), "orthogonal loss")
    close(loss, parts.orthogonal_reg, "loss")


class _Bridge(nn.Module):
    """A small vq_bridge (vqp's test uses an x-transformers encoder over the codes [1, K, d])."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, codes):
        return codes + self.lin(self.norm(codes))


@pytest.mark.parametrize("residual", [False, True], ids=["vq", "rvq"])
def test_vq_bridge_matches_vqp(residual, device):
    """vq_bridge: the same keys (``_codebook.vq_bridge.*``) and initial values, outputs and every gradient
    (codebook and bridge) in training and eval; decoding indices applies the bridge (vqp's does not)."""
    from vector_quantize_pytorch import ResidualVQ as VqpResidual

    from vqtriton.compat import ResidualVQ

    def make(cls, seed):
        torch.manual_seed(seed)
        bridge = _Bridge(DIM)
        if residual:
            return cls(dim=DIM, num_quantizers=3, codebook_size=K, vq_bridge=bridge).to(device)
        return cls(DIM, K, vq_bridge=bridge).to(device)

    vqp = make(VqpResidual if residual else VQP, 0)
    ours = make(ResidualVQ if residual else VectorQuantize, 0)
    assert list(ours.state_dict()) == list(vqp.state_dict())
    assert all(torch.equal(ours.state_dict()[k], t) for k, t in vqp.state_dict().items())
    for train in (True, False):
        vqp.train(train), ours.train(train)
        x = torch.randn(3, 17, DIM, device=device)
        got = []
        for m in (vqp, ours):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            out, idx, loss = m(xi)
            ((out * x).sum() + loss.sum()).backward()
            got.append((out, idx, xi.grad, [p.grad for p in m.parameters()]))
        (out_v, idx_v, dx_v, g_v), (out_o, idx_o, dx_o, g_o) = got
        assert torch.equal(idx_o, idx_v)
        close(out_o, out_v, "output")
        if dx_v is not None:
            close(dx_o, dx_v, "input gradient", rtol=1e-4, atol=1e-5)
        for a, b in zip(g_o, g_v):
            assert (a is None) == (b is None)
            if a is not None:
                close(a.reshape(b.shape), b, "parameter gradient", rtol=1e-4, atol=1e-5)
    close(ours.get_output_from_indices(idx_o), out_o, "decoded through the bridge")


# --- affine_param: checkpoints from before and after vqp's first call ----------------------------------


def _affine_step(module, x, train=True):
    module.train(train)
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("kwargs", [dict(affine_param=True),
                                    dict(affine_param=True, heads=2, separate_codebook_per_head=True, codebook_dim=4,
                                         learnable_codebook=True, ema_update=False)], ids=["ema", "separate-heads"])
def test_affine_checkpoints_both_ways_before_and_after_the_first_step(kwargs, device):
    """vqp registers its batch statistics as None until its first call (absent from its state_dict) and its
    codebook statistics as torch.empty with needs_init flags: both kinds of checkpoint load into ours and ours
    into vqp, and the next calls agree (indices equal, outputs and the affine buffers close)."""
    torch.manual_seed(0)
    vqp = VQP(DIM, K, **kwargs).to(device)
    fresh = vqp.state_dict()
    assert "_codebook.batch_mean" not in fresh and bool(fresh["_codebook.codebook_mean_needs_init"])
    ours = VectorQuantize(DIM, K, **kwargs).to(device)
    ours.load_state_dict(fresh)
    assert not ours.quantizer.affine_batch_initted.any() and not ours.quantizer.affine_codebook_initted.any()
    assert "_codebook.batch_mean" not in ours.state_dict()
    vqp.load_state_dict(ours.state_dict())  # ours before its first call -> a fresh vqp
    x = 2 * torch.randn(3, 17, DIM, device=device) + 1
    want, got = _affine_step(vqp, x), _affine_step(ours, x)  # the first (training) call: every statistic set
    assert torch.equal(got[1], want[1])
    close(got[0], want[0], "first training call")
    after = vqp.state_dict()
    for name, t in after.items():
        close(ours.state_dict()[name], t, f"{name} after the first call")
    twin = VectorQuantize(DIM, K, **kwargs).to(device)
    twin.load_state_dict(after)  # vqp after its first call -> a fresh one of ours
    assert twin.quantizer.affine_batch_initted.all() and twin.quantizer.affine_codebook_initted.all()
    back = VQP(DIM, K, **kwargs).to(device)
    _affine_step(back, x, train=False)  # vqp accepts batch statistics only once it has registered its own
    back.load_state_dict(ours.state_dict())
    x = torch.randn(3, 17, DIM, device=device)
    for train in (False, True):
        outs = [_affine_step(m, x, train) for m in (vqp, twin, back)]
        assert all(torch.equal(o[1], outs[0][1]) for o in outs), train
        for o in outs[1:]:
            close(o[0], outs[0][0], f"output, train={train}")
    for m in (twin, back):
        for name, t in vqp.state_dict().items():
            close(m.state_dict()[name], t, f"{name} after eval and training calls")


def test_affine_eval_before_any_training_uses_the_codes_statistics(device):
    """Before a first training call vqp's codebook mean and variance are uninitialised memory; ours take the
    codes' own: an eval call with the batch statistics set from this batch maps the codes onto its mean and
    variance."""
    vq = VectorQuantize(DIM, K, affine_param=True).to(device).eval()
    x = 3 * torch.randn(2, 40, DIM, device=device) - 2
    out, idx, _ = vq(x)
    rows, codes = x.reshape(-1, DIM).double(), vq.quantizer.codebook.detach().double()
    std = lambda v: v.clamp_min(1e-5).sqrt()  # noqa: E731
    mapped = (codes - codes.mean(0)) * (std(rows.var(0, unbiased=False)) / std(codes.var(0, unbiased=False))) + rows.mean(0)
    close(out.double(), mapped[idx], "eval output", rtol=1e-5, atol=1e-5)
    assert vq.quantizer.affine_batch_initted and not vq.quantizer.affine_codebook_initted
    close(vq._codebook.batch_mean.reshape(DIM).double(), rows.mean(0), "batch mean set from the eval batch")


def test_affine_and_in_place_arguments_checked_as_vqp():
    with pytest.raises(ValueError, match="affine_param=True is only compatible with the euclidean codebook"):
        VectorQuantize(DIM, K, affine_param=True, use_cosine_sim=True)
    with pytest.raises(ValueError, match="in_place_codebook_optimizer needs a codebook parameter"):
        VectorQuantize(DIM, K, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    vq = VectorQuantize(DIM, K, learnable_codebook=True, ema_update=False,
                        in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match="topk codes in training are not supported with an in_place_codebook_optimizer"):
        vq(torch.randn(2, 5, DIM), topk=2)
    vq.eval()
    assert vq(torch.randn(2, 5, DIM), topk=2)[1].shape == (2, 5, 2)  # eval top-k: no in-place step, as vqp


# --- in_place_codebook_optimizer against vqp ------------------------------------------------------------

IN_PLACE = {  # name -> (vqp kwargs, optimiser, masked, bridged)
    "learnable-sgd": (dict(learnable_codebook=True, ema_update=False), lambda p: torch.optim.SGD(p, lr=0.3), False, False),
    "learnable-adam-masked-manual": (dict(learnable_codebook=True, ema_update=False, manual_in_place_optimizer_update=True),
                                     lambda p: torch.optim.Adam(p, lr=0.05), True, False),
    "bridge-adam": (dict(), lambda p: torch.optim.Adam(p, lr=0.02), True, True),
    "ema-orthogonal-sgd": (dict(orthogonal_reg_weight=0.3), lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5), True, False),
    "affine-heads-separate-adam": (dict(learnable_codebook=True, ema_update=False, affine_param=True, heads=2,
                                        separate_codebook_per_head=True, codebook_dim=4),
                                   lambda p: torch.optim.Adam(p, lr=0.05), False, False),
}


@pytest.mark.parametrize("case", list(IN_PLACE))
def test_in_place_optimizer_matches_vqp(case, device):
    """vqp's in-place codebook step inside the training forward (the same optimiser on the same codes): over
    three steps the same indices, outputs, losses (the in-place loss of the breakdown too), input and parameter
    gradients of the outer backward, and the same codebook (and bridge) after each step."""
    kwargs, make_opt, masked, bridged = IN_PLACE[case]
    modules = []
    for cls in (VQP, VectorQuantize):
        torch.manual_seed(0)
        extra = dict(vq_bridge=_Bridge(DIM)) if bridged else {}
        modules.append(cls(DIM, K, in_place_codebook_optimizer=make_opt, **kwargs, **extra).to(device).train())
    vqp, ours = modules
    ours.load_state_dict(vqp.state_dict())
    manual = kwargs.get("manual_in_place_optimizer_update", False)
    for step in range(3):
        x = torch.randn(3, 17, DIM, device=device)
        mask = torch.rand(3, 17, device=device) > 0.3 if masked else None
        got = []
        for m in (vqp, ours):
            xi = x.clone().requires_grad_()
            out, idx, loss, parts = m(xi, mask=mask, return_loss_breakdown=True)
            ((out * x).sum() + loss).backward()
            grads = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
            if manual:
                m.update_in_place_optimizer()
            got.append((out, idx, loss, parts.inplace_optimize, xi.grad, grads))
        (out_v, idx_v, loss_v, ip_v, dx_v, g_v), (out_o, idx_o, loss_o, ip_o, dx_o, g_o) = got
        what = f"{case} step {step}"
        assert torch.equal(idx_o, idx_v), what
        close(out_o, out_v, f"{what}: output")
        close(loss_o, loss_v, f"{what}: loss")
        close(ip_o, ip_v, f"{what}: in-place loss")
        assert ip_o > 0
        close(dx_o, dx_v, f"{what}: input gradient", rtol=1e-4, atol=1e-5)
        for a, b in zip(g_o, g_v):
            assert (a is None) == (b is None), what
            if a is not None:
                close(a.reshape(b.shape), b, f"{what}: parameter gradient", rtol=1e-4, atol=1e-5)
        for name, t in vqp.state_dict().items():
            close(ours.state_dict()[name], t, f"{what}: {name}", rtol=1e-4, atol=1e-5)


def test_manual_in_place_update_waits_for_the_call(device):
    """manual_in_place_optimizer_update: the forward leaves the codes as they are (the gradient waits in .grad)
    until update_in_place_optimizer() takes the step and clears it."""
    vq = VectorQuantize(DIM, K, learnable_codebook=True, ema_update=False, manual_in_place_optimizer_update=True,
                        in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5)).to(device)
    before = vq.codebook.detach().clone()
    with torch.no_grad():  # the in-place pass makes its own graph: it runs under no_grad too
        vq(torch.randn(2, 9, DIM, device=device))
    assert torch.equal(vq.codebook, before) and vq.codebook.grad is not None and vq.codebook.grad.any()
    grad = vq.codebook.grad.clone()
    vq.update_in_place_optimizer()
    close(vq.codebook, before - 0.5 * grad, "one SGD step")
    assert vq.codebook.grad is None
    assert vq.in_place_codebook_optimizer is vq.quantizer.in_place_optimizer
