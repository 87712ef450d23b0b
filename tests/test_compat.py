"""vqtriton.compat.VectorQuantize against vector-quantize-pytorch 1.32.0 itself (a dev dependency).

For each supported combination: vqp trains a few steps, its state_dict loads into ours, and then, in
eval mode, indices are equal and the quantized outputs close (both losses 0, as vqp returns); in
training mode, one step's outputs, loss and gradients (input, codebook, projections; rotation trick on
and off) are close, and with an EMA codebook so is the state after the step. State dicts move both
ways; every vqp argument is honoured or refused by name.
"""

import inspect

import pytest
import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize as VQP

from vqtriton import compat
from vqtriton.compat import VectorQuantize

BACKENDS = ["torch", "triton"]
DIM, K = 8, 23
# The vqp arguments honoured (every other one is in compat.UNSUPPORTED).
SUPPORTED = {
    "dim", "codebook_size", "codebook_dim", "heads", "separate_codebook_per_head", "decay", "eps", "kmeans_init",
    "kmeans_iters", "use_cosine_sim", "layernorm_after_project_in", "threshold_ema_dead_code", "channel_last",
    "accept_image_fmap", "accept_3d_fmap", "commitment_weight", "sample_codebook_temp", "rotation_trick",
    "sync_codebook", "ema_update", "learnable_codebook", "return_zeros_for_masked_padding",
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
        close(ours.get_codes_from_indices(got[1]), vqp.get_codes_from_indices(want[1]), "get_codes_from_indices")

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
            if not kwargs.get("kmeans_init"):  # the same seed draws the same initial codes and projections
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
    assert set(theirs) == SUPPORTED | set(compat.UNSUPPORTED)  # every argument honoured or refused
    assert all(theirs[n] == d for n, d in compat.UNSUPPORTED.items())
    forward_theirs, forward_ours = _params(VQP.forward), _params(VectorQuantize.forward)
    assert forward_theirs == forward_ours


def _other(value):
    """A value other than vqp's default for an unsupported argument."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value + 0.5
    return nn.Identity() if value is None else 1


@pytest.mark.parametrize("name", sorted(compat.UNSUPPORTED))
def test_unsupported_arguments_are_refused_by_name(name):
    with pytest.raises(NotImplementedError, match=rf"{name}="):
        VectorQuantize(DIM, K, **{name: _other(compat.UNSUPPORTED[name])})


@pytest.mark.parametrize("name", sorted(compat.UNSUPPORTED_FORWARD))
def test_unsupported_forward_arguments_are_refused_by_name(name):
    vq = VectorQuantize(DIM, K)
    with pytest.raises(NotImplementedError, match=rf"{name}="):
        vq(torch.randn(2, 5, DIM), **{name: _other(compat.UNSUPPORTED_FORWARD[name])})
    with pytest.raises(NotImplementedError, match=rf"{name}="):  # a tensor is never taken for the default
        vq(torch.randn(2, 5, DIM), **{name: torch.ones(2, 5)})


def test_invalid_combinations_as_vqp():
    with pytest.raises(ValueError, match="use_cosine_sim=True is not compatible with learnable_codebook"):
        VectorQuantize(DIM, K, use_cosine_sim=True, learnable_codebook=True, ema_update=False)
    with pytest.raises(ValueError, match="learnable_codebook=True needs ema_update=False"):
        VectorQuantize(DIM, K, learnable_codebook=True)
    with pytest.raises(NotImplementedError, match="threshold_ema_dead_code > 0 only with ema_update=True"):
        VectorQuantize(DIM, K, ema_update=False, threshold_ema_dead_code=1.0)
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
