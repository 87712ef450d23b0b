"""vqtriton.compat.ResidualVQ and GroupedResidualVQ against vector-quantize-pytorch 1.32.0 itself.

For each configuration: vqp trains a few steps, its state_dict loads into ours; then in eval mode the
indices are equal and the outputs close (losses as vqp's), and one training step gives close outputs,
per-level losses and gradients (input, codebooks, projections, QINCo's MLPs) and the same state after it.
Random options are compared on the same draws where both sides draw the same numbers from torch's global
generator (DiVeQ's noise), by vqp's own fixed seed (quantize dropout), or statistically (sampled codes,
the device-side dropout draw). Where vqp crashes or differs by design, the intended result is checked
against a reference computed here.
"""

import copy
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import GroupedResidualVQ as VqpGrouped
from vector_quantize_pytorch import ResidualVQ as VqpResidual

from vqtriton.compat import GroupedResidualVQ, ResidualVQ

BACKENDS = ["torch", "triton"]
DIM, K, Q = 8, 23, 3

# name -> (vqp kwargs, input layout, masked)
CONFIGS = {
    "ema": (dict(), "bnd", True),
    "ema-cosine": (dict(use_cosine_sim=True), "bnd", False),
    "ema-no-rotation": (dict(rotation_trick=False), "bnd", True),
    "ema-kmeans-dead-codes": (dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=0.5), "bnd", False),
    "learnable": (dict(learnable_codebook=True, ema_update=False), "bnd", True),
    "learnable-projection": (dict(learnable_codebook=True, ema_update=False, codebook_dim=5, commitment_weight=0.4),
                             "bnd", False),
    "learnable-dead-codes": (dict(learnable_codebook=True, ema_update=False, threshold_ema_dead_code=0.3), "bnd", False),
    "sizes-per-level": (dict(codebook_size=(7, 13, 19), num_quantizers=None), "bnd", False),
    "quant-grad-frac": (dict(learnable_codebook=True, ema_update=False, quant_grad_frac=0.3), "bnd", False),
    "shared-learnable": (dict(shared_codebook=True, learnable_codebook=True, ema_update=False), "bnd", False),
    "frozen": (dict(ema_update=False), "bnd", True),
    "one-vector": (dict(learnable_codebook=True, ema_update=False), "bd", False),
    "qinco": (dict(implicit_neural_codebook=True, mlp_kwargs=dict(depth=2, dim_hidden=6)), "bnd", False),
    "beam": (dict(beam_size=2, eval_beam_size=3), "bnd", False),
    "beam-learnable-weights": (dict(beam_size=3, learnable_codebook=True, ema_update=False,
                                    beam_score_quantizer_weights=[1.0, 0.5, 0.25]), "bnd", True),
    "padding-passes-through": (dict(return_zeros_for_masked_padding=False), "bnd", True),
    "manual-ema": (dict(manual_ema_update=True), "bnd", False),
    "ema-orthogonal": (dict(orthogonal_reg_weight=0.5), "bnd", True),
    "learnable-cross-entropy-commitment": (dict(learnable_codebook=True, ema_update=False,
                                                commitment_use_cross_entropy_loss=True), "bnd", True),
    "learnable-diversity": (dict(learnable_codebook=True, ema_update=False, codebook_diversity_loss_weight=0.2,
                                 codebook_diversity_temperature=3.0), "bnd", False),
    "sampling-cold": (dict(stochastic_sample_codes=True, sample_codebook_temp=1e-7, straight_through=True,
                           rotation_trick=False), "bnd", False),
    "ema-affine": (dict(affine_param=True), "bnd", True),
    "learnable-affine-decays": (dict(affine_param=True, learnable_codebook=True, ema_update=False,
                                     affine_param_batch_decay=0.6, affine_param_codebook_decay=0.3), "bnd", False),
    "shared-learnable-affine": (dict(affine_param=True, shared_codebook=True, learnable_codebook=True, ema_update=False),
                                "bnd", False),
}
SHAPES = {"bnd": (3, 11, DIM), "image": (2, DIM, 4, 3), "bd": (13, DIM)}
# Configurations whose state after a training step is random on both sides (dead-code restarts draw rows).
RANDOM_STATE = {"ema-kmeans-dead-codes", "learnable-dead-codes"}
# vqp's beam search updates only level 0's codebook (it indexes its stacked residuals [..., 0, :] on the
# wrong axis); ours updates every level from the chosen path: level 0 compares with vqp, the others below.
BEAM = {"beam", "beam-learnable-weights"}


def make(cls, kwargs):
    kwargs = dict(kwargs)
    sizes = kwargs.pop("codebook_size", K)
    q = kwargs.pop("num_quantizers", Q)
    return cls(dim=DIM, codebook_size=sizes, **({} if q is None else {"num_quantizers": q}), **kwargs)


def inputs(layout, masked, device, requires_grad=False):
    x = torch.randn(SHAPES[layout], device=device).requires_grad_(requires_grad)
    mask = torch.rand(x.shape[0], x.shape[1], device=device) > 0.3 if masked else None
    return x, mask


def call(module, x, mask, **kw):
    return module(x, **kw) if mask is None else module(x, mask=mask, **kw)


def trained_vqp(kwargs, layout, masked, device, steps=3):
    vqp = make(VqpResidual, kwargs).to(device).train()
    params = [p for p in vqp.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.3) if params else None
    for _ in range(steps):
        x, mask = inputs(layout, masked, device, requires_grad=True)
        out, _, losses = call(vqp, x, mask)
        if opt is not None:
            opt.zero_grad()
            ((out * 0.1).sum() + losses.sum()).backward()
            opt.step()
    return vqp


def ours_from(vqp, kwargs, backend, device):
    ours = make(ResidualVQ, {**kwargs, "backend": backend}).to(device)
    ours.load_state_dict(vqp.state_dict())
    return ours


def close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _ours_name(name: str) -> str:
    """Our parameter name for vqp's ``name`` (``layers.{i}._codebook.embed`` -> ``residual.layers.{i}.codebook``)."""
    if name.startswith("layers."):
        i = name.split(".")[1]
        return f"residual.layers.{i}.codebook"
    return "residual." + name if name.startswith("mlps.") else name


def step_both(vqp, ours, layout, masked, device, **kw):
    """One training step of each on the same input; (out, idx, losses, input grad) of each."""
    x, mask = inputs(layout, masked, device, requires_grad=True)
    step_both.last_input = (x.detach(), mask)
    w = torch.randn(x.shape, device=device)
    results = []
    for module in (vqp, ours):
        module.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        torch.manual_seed(1234)  # the same draws where both draw from torch's generator (DiVeQ's noise)
        out, idx, losses = call(module, xi, mask, **kw)
        ((out * w).sum() + losses.sum()).backward()
        results.append((out, idx, losses, xi.grad))
    return results


def compare_gradients(vqp, ours):
    ours_params = dict(ours.named_parameters(remove_duplicate=False))
    for name, p in vqp.named_parameters(remove_duplicate=False):
        q = ours_params[_ours_name(name)]
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
        else:
            close(q.grad.reshape(p.grad.shape), p.grad, f"gradient of {name}", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_parity_with_vqp_after_loading_its_checkpoint(config, backend, device):
    if backend == "triton" and config.startswith(("qinco", "beam")):
        pytest.skip("QINCo's search and the beam search's top-k run the same code on both backends (torch path)")
    kwargs, layout, masked = CONFIGS[config]
    vqp = trained_vqp(kwargs, layout, masked, device)
    ours = ours_from(vqp, kwargs, backend, device)

    vqp.eval(), ours.eval()
    x, mask = inputs(layout, masked, device)
    with torch.no_grad():
        want, got = call(vqp, x, mask), call(ours, x, mask)
    assert torch.equal(got[1], want[1]), config
    close(got[0], want[0], "eval output")
    close(got[2], want[2], "eval losses")
    if not masked and kwargs.get("affine_param"):  # ours decode through each level's affine map (vqp's: raw codes)
        if not kwargs.get("shared_codebook"):  # (a shared codebook's map moves from level to level within a call)
            close(ours.get_output_from_indices(got[1]), got[0], "get_output_from_indices: the eval output")
    elif not masked:
        close(ours.get_output_from_indices(got[1]), vqp.get_output_from_indices(want[1]), "get_output_from_indices")
        close(ours.get_codes_from_indices(got[1]), vqp.get_codes_from_indices(want[1]), "get_codes_from_indices")

    vqp.train(), ours.train()
    before = copy.deepcopy(ours)
    (out_v, idx_v, loss_v, dx_v), (out_o, idx_o, loss_o, dx_o) = step_both(vqp, ours, layout, masked, device)
    assert torch.equal(idx_o, idx_v)
    close(out_o, out_v, "training output")
    close(loss_o, loss_v, "training losses")
    close(dx_o, dx_v, "input gradient", rtol=1e-4, atol=1e-5)
    compare_gradients(vqp, ours)
    if config not in RANDOM_STATE:
        state_v, state_o = vqp.state_dict(), ours.state_dict()
        assert list(state_o) == list(state_v)
        for name, t in state_v.items():
            if config in BEAM and name.startswith("layers.") and not name.startswith("layers.0."):
                continue
            close(state_o[name], t, f"state {name} after a training step")
    if config in BEAM:  # every level's update from the chosen path: its residuals and indices
        x, mask = step_both.last_input
        codes = before.get_codes_from_indices(idx_o)
        residual = before.project_in(x)
        for l, layer in enumerate(before.residual.layers):
            layer.update_indices(residual, idx_o[..., l], mask)
            residual = residual - codes[l]
        for name, t in before.state_dict().items():
            close(ours.state_dict()[name], t, f"beam search: state {name} after the step")


@pytest.mark.parametrize("layout", [dict(channel_last=False), dict(accept_image_fmap=True), dict(accept_3d_fmap=True)],
                         ids=["channel-first", "image-fmap", "3d-fmap"])
def test_channel_first_works_as_vqp_on_channel_last(layout, device):
    """vqp's residual loop crashes on channel-first input and feature maps (its indices stack on the wrong
    axis); ours gives what vqp gives for the same vectors laid out channel-last, in training and eval."""
    shape = {"channel_last": (3, DIM, 11), "accept_image_fmap": (2, DIM, 4, 3), "accept_3d_fmap": (2, DIM, 2, 3, 4)}
    x = torch.randn(shape[next(iter(layout))], device=device)
    with pytest.raises(Exception):
        make(VqpResidual, layout).eval()(x)
    kwargs = dict(learnable_codebook=True, ema_update=False)
    vqp = make(VqpResidual, kwargs).to(device)
    ours = make(ResidualVQ, {**kwargs, **layout}).to(device)
    ours.load_state_dict(vqp.state_dict())
    for train in (False, True):
        vqp.train(train), ours.train(train)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        out, idx, losses = ours(xs[0])
        last = xs[1].movedim(1, -1)  # the same vectors as vqp takes them: [B, N, D]
        want_out, want_idx, want_losses = vqp(last.reshape(x.shape[0], -1, DIM))
        want_out, want_idx = want_out.reshape(last.shape).movedim(-1, 1), want_idx.reshape(*last.shape[:-1], Q)
        assert torch.equal(idx, want_idx) and out.shape == x.shape
        close(out, want_out, "output"), close(losses, want_losses, "losses")
        if train:
            w = torch.randn_like(x)
            ((out * w).sum() + losses.sum()).backward()
            ((want_out * w).sum() + want_losses.sum()).backward()
            close(xs[0].grad, xs[1].grad, "input gradient", 1e-4, 1e-5)


def test_dropout_with_vqp_fixed_seed(device):
    """rand_quantize_dropout_fixed_seed gives vqp's own cutoff: the same kept levels, -1 indices and zero
    losses after it, the same outputs and gradients."""
    kwargs = dict(quantize_dropout=True, quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2,
                  num_quantizers=5, learnable_codebook=True, ema_update=False)
    vqp = trained_vqp(kwargs, "bnd", False, device, steps=0)
    ours = ours_from(vqp, kwargs, None, device)
    for seed in range(6):
        (out_v, idx_v, loss_v, dx_v), (out_o, idx_o, loss_o, dx_o) = step_both(
            vqp, ours, "bnd", False, device, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(idx_o, idx_v), seed
        close(out_o, out_v, "output"), close(loss_o, loss_v, "losses"), close(dx_o, dx_v, "input gradient", 1e-4, 1e-5)
        compare_gradients(vqp, ours)


def test_device_dropout_draw_has_vqps_distribution(device):
    """The device-side draw (no seed given): the last kept level is uniform over [cutoff, Q) and rounded up
    to the multiple, as vqp's draw; chi-square test at a fixed seed."""
    q, cutoff, mult = 6, 1, 2
    ours = ResidualVQ(dim=DIM, num_quantizers=q, codebook_size=K, quantize_dropout=True,
                      quantize_dropout_cutoff_index=cutoff, quantize_dropout_multiple_of=mult).to(device).train()
    draws = 3000
    kept = torch.stack([ours.residual.draw_levels(torch.device(device)) for _ in range(draws)]).cpu()
    want = np.zeros(q + 1)
    for last in range(cutoff, q):  # vqp's rule
        n = min(math.ceil((last + 1) / mult) * mult, q)
        want[n] += draws / (q - cutoff)
    got = np.bincount(kept.numpy(), minlength=q + 1)
    assert set(np.nonzero(got)[0]) == set(np.nonzero(want)[0])
    chi2 = ((got - want) ** 2 / np.where(want > 0, want, 1)).sum()
    assert chi2 < 16.3, (got, want)  # 3 degrees of freedom: p = 0.001


def test_sampled_codes_follow_vqps_softmax(device):
    """stochastic_sample_codes: the codes of one vector drawn many times are distributed as softmax of vqp's
    logits (-cdist) over sample_codebook_temp; chi-square test at a fixed seed (the draws are not vqp's)."""
    temp, n = 0.5, 4000
    vqp = VqpResidual(dim=DIM, num_quantizers=1, codebook_size=7, stochastic_sample_codes=True,
                      sample_codebook_temp=temp).to(device)
    ours = ResidualVQ(dim=DIM, num_quantizers=1, codebook_size=7, stochastic_sample_codes=True,
                      sample_codebook_temp=temp).to(device)
    ours.load_state_dict(vqp.state_dict())
    with torch.no_grad():
        ours.residual.layers[0].codebook.copy_(torch.randn(7, DIM, device=device) * 0.3)
    codebook = ours.residual.layers[0].codebook.detach()
    x = torch.randn(1, 1, DIM, device=device).expand(1, n, DIM).contiguous()
    ours.train()
    _, idx, _ = ours(x, freeze_codebook=True)
    p = torch.softmax(-torch.cdist(x[0, :1], codebook)[0] / temp, 0).cpu().double().numpy()
    got = np.bincount(idx[..., 0].reshape(-1).cpu().numpy(), minlength=7)
    chi2 = ((got - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 22.5, (got, n * p)  # 6 degrees of freedom: p = 0.001
    ours.eval()  # eval: the nearest code, as vqp
    assert (ours(x)[1] == torch.cdist(x[0, :1], codebook).argmin()).all()


def test_diveq_same_noise_as_vqp(device):
    """diveq: both draw DiVeQ's noise from torch's generator at the same point: same outputs and gradients."""
    kwargs = dict(diveq=True)
    vqp = trained_vqp(kwargs, "bnd", False, device, steps=2)
    ours = ours_from(vqp, kwargs, None, device)
    (out_v, idx_v, loss_v, dx_v), (out_o, idx_o, loss_o, dx_o) = step_both(vqp, ours, "bnd", False, device)
    assert torch.equal(idx_o, idx_v)
    close(out_o, out_v, "output"), close(loss_o, loss_v, "losses"), close(dx_o, dx_v, "input gradient", 1e-4, 1e-5)
    compare_gradients(vqp, ours)


def test_shared_ema_codebook_one_update_per_step(device):
    """A shared EMA codebook (vqp: decayed once per level) takes one EMA step per training step from all the
    levels' counts and sums: checked against that update computed here; outputs and indices as vqp's."""
    g = 0.7
    kwargs = dict(shared_codebook=True, decay=g)
    vqp = trained_vqp(kwargs, "bnd", False, device, steps=0)
    ours = ours_from(vqp, kwargs, None, device)
    layer = ours.residual.layers[0]
    size0, sum0 = layer.cluster_size.clone(), layer.embed_sum.clone()
    codebook = layer.codebook.detach().clone()
    (out_v, idx_v, _, dx_v), (out_o, idx_o, _, dx_o) = step_both(vqp, ours, "bnd", False, device)
    assert torch.equal(idx_o, idx_v)
    close(out_o, out_v, "output"), close(dx_o, dx_v, "input gradient", 1e-4, 1e-5)
    x, _ = step_both.last_input
    residual, counts, sums = x.reshape(-1, DIM), torch.zeros(K, device=device), torch.zeros(K, DIM, device=device)
    idx = idx_o.reshape(-1, Q)
    for l in range(Q):  # every level's inputs and choices, one update
        counts.index_add_(0, idx[:, l], torch.ones(idx.shape[0], device=device))
        sums.index_add_(0, idx[:, l], residual)
        residual = residual - codebook[idx[:, l]]
    close(layer.cluster_size, g * size0 + (1 - g) * counts, "cluster_size")
    close(layer.embed_sum, g * sum0 + (1 - g) * sums, "embed_sum")
    assert all(torch.equal(v.quantizer.codebook, layer.codebook) for v in ours.layers)


# --- checkpoints, keys, arguments ---------------------------------------------------------------------


STATE_CONFIGS = ["ema", "learnable-projection", "sizes-per-level", "shared-learnable", "qinco", "frozen",
                 "learnable-dead-codes"]


@pytest.mark.parametrize("config", STATE_CONFIGS)
def test_state_dict_keys_shapes_and_initial_values_are_vqps(config):
    kwargs = CONFIGS[config][0]
    torch.manual_seed(0)
    theirs = make(VqpResidual, kwargs).state_dict()
    torch.manual_seed(0)
    ours = make(ResidualVQ, kwargs).state_dict()
    assert list(ours) == list(theirs)
    for name, t in theirs.items():
        assert ours[name].shape == t.shape and ours[name].dtype == t.dtype, name
        assert torch.equal(ours[name], t), name  # the same seed draws the same codes, projections and MLPs


@pytest.mark.parametrize("config", ["ema", "learnable-projection", "qinco", "shared-learnable"])
def test_our_checkpoint_loads_into_vqp(config, device):
    """ours -> vqp -> ours: the same indices and outputs, also nested in a model (prefixed keys)."""
    kwargs, layout, masked = CONFIGS[config]
    ours = make(ResidualVQ, kwargs).to(device).train()
    for _ in range(2):
        call(ours, *inputs(layout, masked, device))
    parent_ours = nn.ModuleDict({"rvq": ours})
    parent_vqp = nn.ModuleDict({"rvq": make(VqpResidual, kwargs)}).to(device)
    parent_vqp.load_state_dict(parent_ours.state_dict())
    twin = nn.ModuleDict({"rvq": make(ResidualVQ, kwargs)}).to(device)
    twin.load_state_dict(parent_vqp.state_dict())
    x, mask = inputs(layout, masked, device)
    for m in (ours, parent_vqp["rvq"], twin["rvq"]):
        m.eval()
    with torch.no_grad():
        got, want, back = call(ours, x, mask), call(parent_vqp["rvq"], x, mask), call(twin["rvq"], x, mask)
    assert torch.equal(got[1], want[1]) and torch.equal(back[1], got[1])
    close(got[0], want[0], "output in vqp")
    for name, t in ours.state_dict().items():
        assert torch.equal(twin["rvq"].state_dict()[name], t), name


def test_grouped_parity_and_keys(device):
    kwargs = dict(groups=2, num_quantizers=Q, codebook_size=K, learnable_codebook=True, ema_update=False)
    torch.manual_seed(0)
    vqp = VqpGrouped(dim=DIM, **kwargs).to(device)
    torch.manual_seed(0)
    ours = GroupedResidualVQ(dim=DIM, **kwargs).to(device)
    assert list(ours.state_dict()) == list(vqp.state_dict())
    assert all(torch.equal(ours.state_dict()[k], t) for k, t in vqp.state_dict().items())
    assert torch.equal(ours.codebooks, vqp.codebooks)
    for train in (False, True):
        vqp.train(train), ours.train(train)
        x = torch.randn(3, 11, DIM, device=device)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        (qa, ia, la), (qb, ib, lb) = vqp(xs[0]), ours(xs[1])
        assert torch.equal(ia, ib) and ia.shape == (2, 3, 11, Q) and la.shape == (2, Q)
        close(qb, qa, "output"), close(lb, la, "losses")
        if train:
            ((qa * x).sum() + la.sum()).backward(), ((qb * x).sum() + lb.sum()).backward()
            close(xs[1].grad, xs[0].grad, "input gradient", 1e-4, 1e-5)
    close(ours.get_output_from_indices(ib), vqp.get_output_from_indices(ia), "get_output_from_indices")
    close(ours.get_codes_from_indices(ib), vqp.get_codes_from_indices(ia), "get_codes_from_indices")
    out = ours(x, return_all_codes=True)
    assert len(out) == 4 and len(out[3]) == 2 and out[3][0].shape == (Q, 3, 11, DIM // 2)


def test_grouped_groups_share_one_dropout_draw(device):
    ours = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=4, codebook_size=K, quantize_dropout=True).to(device)
    ours.train()
    for _ in range(10):
        _, idx, losses = ours(torch.randn(2, 5, DIM, device=device))
        assert torch.equal(idx[0] >= 0, idx[1] >= 0) and torch.equal(losses[0] == 0, losses[1] == 0)


def test_cross_entropy_path(device):
    """indices=: vqp's ResidualVQ crashes; ours is the sum over levels of each level's cross entropy on the
    residual the given codes leave, checked against F.cross_entropy on those residuals."""
    vqp = make(VqpResidual, dict(learnable_codebook=True, ema_update=False)).to(device)
    ours = ours_from(vqp, dict(learnable_codebook=True, ema_update=False), None, device)
    x = torch.randn(2, 9, DIM, device=device, requires_grad=True)
    target = torch.randint(0, K, (2, 9, Q), device=device)
    with pytest.raises(Exception):
        vqp(x, indices=target)
    out, loss = ours(x, indices=target)
    residual, want = x, 0
    books = ours.codebooks
    for l in range(Q):
        d = torch.cdist(residual.reshape(-1, DIM), books[l])
        want = want + F.cross_entropy(-d, target[..., l].reshape(-1))
        residual = residual - books[l][target[..., l]].detach()
    close(loss, want, "summed cross entropy")
    close(out, ours.get_output_from_indices(target), "teacher-forced output")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(want, x)
    close(g1, g2, "cross-entropy gradient", 1e-4, 1e-6)
    out, loss = ours(x, indices=list(target.unbind(-1)))  # a list of per-level indices, as vqp takes
    close(loss, want, "list of indices")


def _params(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n != "self"}


@pytest.mark.parametrize("ours, theirs", [(ResidualVQ, VqpResidual), (GroupedResidualVQ, VqpGrouped)])
def test_same_constructor_and_forward_arguments_and_defaults_as_vqp(ours, theirs):
    assert _params(ours.__init__) == _params(theirs.__init__)
    assert _params(ours.forward) == _params(theirs.forward)


def test_arguments_checked_as_vqp():
    with pytest.raises(ValueError, match="not compatible with multi-headed"):
        ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, heads=2)
    with pytest.raises(ValueError, match="give num_quantizers"):
        ResidualVQ(dim=DIM, codebook_size=K)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['not_an_argument'\\]"):
        ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, not_an_argument=1)
    with pytest.raises(ValueError, match="affine_param=True is only compatible with the euclidean codebook"):
        ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, affine_param=True, use_cosine_sim=True)
    with pytest.raises(ValueError, match="in_place_codebook_optimizer needs a codebook parameter"):
        ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, in_place_codebook_optimizer=torch.optim.SGD)
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, beam_size=2, learnable_codebook=True, ema_update=False,
                     in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match="beam search in training is not supported with an in_place_codebook_optimizer"):
        rvq(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="eval_beam_size needs beam_size"):
        ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, eval_beam_size=2)


# --- in_place_codebook_optimizer -------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_in_place_optimizer_matches_vqp(masked, device):
    """Every level's own in-place optimiser (vqp's levels each build one of their codebook): three training
    steps give vqp's indices, outputs, losses, input gradient and codebooks after each step."""
    kwargs = dict(learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=lambda p: torch.optim.SGD(
        p, lr=0.4, momentum=0.3))
    torch.manual_seed(0)
    vqp = make(VqpResidual, kwargs).to(device).train()
    ours = make(ResidualVQ, kwargs).to(device).train()
    ours.load_state_dict(vqp.state_dict())
    for step in range(3):
        (out_v, idx_v, loss_v, dx_v), (out_o, idx_o, loss_o, dx_o) = step_both(vqp, ours, "bnd", masked, device)
        assert torch.equal(idx_o, idx_v), step
        close(out_o, out_v, f"step {step}: output")
        close(loss_o, loss_v, f"step {step}: losses")
        close(dx_o, dx_v, f"step {step}: input gradient", rtol=1e-4, atol=1e-5)
        for name, t in vqp.state_dict().items():
            close(ours.state_dict()[name], t, f"step {step}: {name}", rtol=1e-4, atol=1e-5)


def test_shared_codebook_in_place_optimizer_steps_once_with_every_levels_gradient(device):
    """A shared codebook: each level's in-place pass adds the gradient of its mean codebook loss on its own
    residual, and one SGD step follows the last level (vqp's would never step a learnable shared codebook)."""
    lr = 0.7
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, shared_codebook=True, learnable_codebook=True,
                     ema_update=False, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=lr)).to(device)
    assert len({id(layer.in_place_codebook_optimizer) for layer in rvq.layers}) == 1
    codes = rvq.codebooks[0].detach().clone().double()
    x = torch.randn(3, 11, DIM, device=device)
    mask = torch.rand(3, 11, device=device) > 0.3
    _, idx, _ = rvq(x, mask=mask)
    rows, keep = x.reshape(-1, DIM).double(), mask.reshape(-1)
    idx = idx.reshape(-1, Q)
    grad, residual = torch.zeros_like(codes), rows
    for l in range(Q):
        chosen = codes[idx[:, l].clamp_min(0)]
        diff = torch.where(keep.unsqueeze(1), chosen - residual, 0)
        grad.index_add_(0, idx[:, l].clamp_min(0), 2 * diff / (keep.sum() * DIM))
        residual = residual - torch.where(keep.unsqueeze(1), chosen, 0)
    close(rvq.codebooks[0].double(), codes - lr * grad, "one step with every level's gradient", rtol=1e-5, atol=1e-6)
    assert rvq.layers[0].codebook.grad is None
