"""vqtriton.compat.FSQ / LFQ / ResidualFSQ / ResidualLFQ against vector-quantize-pytorch 1.32.0 itself.

Each translator is built from the same seed as vqp's class (same projections and rotations: the
state_dicts are equal, key for key), run side by side on the same input, and compared: outputs,
indices, losses and their breakdowns, input and parameter gradients; state_dicts load both ways. vqp's
README examples (its tests/test_readme.py and tests/test_lfq.py, 1.31.0) for these four classes run on
the translators with vqp's assertions. Where vqp is wrong, the test says so and checks the translator
against the NumPy reference instead.
"""

import inspect
import math

import pytest
import torch
import vector_quantize_pytorch as vqp
from helpers import f64
from torch import nn

from vqtriton import compat
from vqtriton import reference as R

CLASSES = ["FSQ", "LFQ", "ResidualFSQ", "ResidualLFQ"]
# vqtriton's own keyword-only arguments (all others are vqp's, in vqp's order, with vqp's defaults).
OWN = {"generator", "backend"}


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    # The parity is the translation's: the kernels' agreement with the torch path is tested in test_lfq.py.
    monkeypatch.setenv("VQTRITON_BACKEND", "torch")


def _params(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def _same_default(a, b):
    if isinstance(a, nn.Module) or isinstance(b, nn.Module):
        return type(a) is type(b)
    return a == b or (a is inspect.Parameter.empty and b is inspect.Parameter.empty)


@pytest.mark.parametrize("name", CLASSES)
def test_same_constructor_and_forward_arguments_and_defaults_as_vqp(name):
    theirs, ours = getattr(vqp, name), getattr(compat, name)
    for fn in ("__init__", "forward"):
        t, o = _params(getattr(theirs, fn)), _params(getattr(ours, fn))
        assert [n for n in t if n != "kwargs"] == [n for n in o if n not in OWN | {"kwargs"}], fn
        assert ("kwargs" in t) == ("kwargs" in o)
        assert all(_same_default(t[n], o[n]) for n in t), {n: (t[n], o[n]) for n in t if not _same_default(t[n], o[n])}
    kinds_t = {n: p.kind for n, p in inspect.signature(theirs.__init__).parameters.items()}
    kinds_o = {n: p.kind for n, p in inspect.signature(ours.__init__).parameters.items()}
    assert all(kinds_t[n] == kinds_o[n] for n in kinds_t)


def _pair(name, seed=0, **kwargs):
    """vqp's module and ours from one seed; their state_dicts must be equal (same keys, same values)."""
    torch.manual_seed(seed)
    theirs = getattr(vqp, name)(**kwargs)
    torch.manual_seed(seed)
    ours = getattr(compat, name)(**kwargs)
    st, so = theirs.state_dict(), ours.state_dict()
    assert list(st) == list(so) or set(st) == set(so), (list(st), list(so))
    for k in st:
        assert torch.equal(st[k], so[k]), k
    return theirs, ours


def _run(module, x, seed, *args, **kwargs):
    """One call with the global seed set; backward of <out, w> + the loss (when there is one), with ``w``
    fixed by the output's shape."""
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = module(x, *args, **kwargs)
    ret = out[0] if isinstance(out[0], tuple) else out
    breakdown = out[1] if isinstance(out[0], tuple) else None
    y = ret[0]
    total = (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum()
    if len(ret) > 2 and ret[2] is not None:
        total = total + ret[2].sum()
    if y.requires_grad:
        total.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return ret, breakdown, x.grad, grads


def _assert_parity(theirs, ours, x, *args, index_equal=True, grads=True, seed=7, loss_rtol=1e-5, **kwargs):
    rt, bt, gt, pt = _run(theirs, x, seed, *args, **kwargs)
    ro, bo, go, po = _run(ours, x, seed, *args, **kwargs)
    torch.testing.assert_close(ro[0], rt[0], rtol=1e-5, atol=1e-5, msg="output")
    if rt[1] is None:
        assert ro[1] is None
    else:
        # vqp's stack promotes int32 FSQ indices to int64 when a level was dropped (-1); ours stay int32.
        promoted = rt[1].dtype == torch.int64 and ro[1].dtype == torch.int32 and bool((rt[1] == -1).any())
        assert (ro[1].dtype == rt[1].dtype or promoted) and ro[1].shape == rt[1].shape
        if index_equal:
            assert torch.equal(ro[1].long(), rt[1].long()), "indices"
    if len(rt) > 2:
        torch.testing.assert_close(ro[2].float(), rt[2].float(), rtol=loss_rtol, atol=1e-6, msg="loss")
    if bt is not None:
        for a, b in zip(bo, bt):
            torch.testing.assert_close(a.float(), b.float(), rtol=loss_rtol, atol=1e-6, msg="loss breakdown")
    if grads and gt is not None:
        scale = gt.abs().max().clamp_min(1e-6)
        assert (go - gt).abs().max() <= 1e-4 * scale, f"input gradient: {(go - gt).abs().max():.3e} of {scale:.3e}"
        for n, g in pt.items():
            if g is not None:
                assert (po[n] - g).abs().max() <= 1e-4 * g.abs().max().clamp_min(1e-6), n
    return ro


# --- FSQ ---------------------------------------------------------------------------------------------

FSQ_CASES = {
    "default": (dict(levels=[8, 5, 5, 5]), (2, 37, 4)),
    "symmetric": (dict(levels=[8, 5, 5, 5], preserve_symmetry=True), (2, 37, 4)),
    "hard-clamp": (dict(levels=[7, 6, 2], preserve_symmetry=True, bound_hard_clamp=True), (2, 37, 3)),
    "projection-codebooks": (dict(levels=[5, 4, 3], dim=10, num_codebooks=2), (3, 11, 10)),
    "keep-codebook-dim": (dict(levels=[5, 3], keep_num_codebooks_dim=True), (2, 9, 2)),
    "channel-first": (dict(levels=[5, 5], channel_first=True, dim=3), (2, 3, 13)),
    "image": (dict(levels=[6, 5], dim=5), (2, 5, 4, 3)),
    "video": (dict(levels=[3, 3, 3]), (2, 3, 2, 3, 4)),
    "rotation": (dict(levels=[5, 5, 5], preserve_symmetry=True, orthogonal_rotation=True), (2, 17, 3)),
    "noise-half": (dict(levels=[5, 5, 5], preserve_symmetry=True, noise_dropout=0.5), (2, 40, 3)),
    "no-projection-bias": (dict(levels=[5, 5], dim=7, projection_has_bias=False), (2, 5, 7)),
}


@pytest.mark.parametrize("case", list(FSQ_CASES))
def test_fsq_parity(case):
    kwargs, shape = FSQ_CASES[case]
    theirs, ours = _pair("FSQ", **kwargs)
    x = torch.randn(shape) * 1.5
    for mode in ("train", "eval"):
        theirs.train(mode == "train"), ours.train(mode == "train")
        ro = _assert_parity(theirs, ours, x)
        if case != "noise-half" or mode == "eval":
            assert torch.equal(ours.indices_to_codes(ro[1]), ro[0].detach()), "indices_to_codes"
            torch.testing.assert_close(ours.indices_to_codes(ro[1]), theirs.indices_to_codes(ro[1]))
    assert torch.equal(ours.implicit_codebook, theirs.implicit_codebook)
    codes = theirs.implicit_codebook[torch.randint(ours.codebook_size, (50,))]
    assert torch.equal(ours.codes_to_indices(codes), theirs.codes_to_indices(codes))
    idx = torch.randint(ours.codebook_size, (4, 5))
    assert torch.equal(ours.indices_to_level_indices(idx), theirs.indices_to_level_indices(idx))


def test_fsq_low_precision_inputs_follow_vqp_dtypes():
    theirs, ours = _pair("FSQ", levels=[8, 5, 5, 5])
    x = torch.randn(2, 50, 4).bfloat16()
    (to, ti), (oo, oi) = theirs(x), ours(x)
    assert oo.dtype == to.dtype == torch.bfloat16 and torch.equal(oo, to) and torch.equal(oi, ti)


def test_fsq_without_indices_and_with_the_state_dict_both_ways():
    theirs, ours = _pair("FSQ", levels=[5, 5, 5], dim=6, preserve_symmetry=True, orthogonal_rotation=True, seed=1)
    _, other = _pair("FSQ", levels=[5, 5, 5], dim=6, preserve_symmetry=True, orthogonal_rotation=True, seed=2)
    assert {"orthogonal_rot", "project_in.weight", "project_out.bias"} <= set(other.state_dict())
    other.load_state_dict(theirs.state_dict())  # vqp -> ours
    x = torch.randn(2, 9, 6)
    assert torch.equal(other(x)[0], theirs(x)[0])
    fresh = vqp.FSQ(levels=[5, 5, 5], dim=6, preserve_symmetry=True, orthogonal_rotation=True)
    fresh.load_state_dict(ours.state_dict())  # ours -> vqp
    assert torch.equal(fresh(x)[0], ours(x)[0])
    assert compat.FSQ([5, 5], return_indices=False)(torch.randn(1, 3, 2))[1] is None


def test_fsq_noise_dropout_is_p_where_vqp_draws_one_half():
    """vqp's ``full_like(z, p).bernoulli_()`` draws Bernoulli(1/2) whatever p is; ours draws Bernoulli(p)."""
    kwargs = dict(levels=[5, 5, 5], preserve_symmetry=True, noise_dropout=0.1)
    theirs, ours = _pair("FSQ", **kwargs)
    x = torch.randn(1, 20000, 3)
    frac_t = (theirs(x)[0] != theirs.indices_to_codes(theirs(x)[1])).float().mean().item()
    out, idx = ours(x)
    frac_o = (out != ours.indices_to_codes(idx)).float().mean().item()
    assert frac_t > 0.3 and frac_o < 0.1


# --- LFQ ---------------------------------------------------------------------------------------------

LFQ_CASES = {
    "default": (dict(dim=6, codebook_size=64), (2, 23, 6), {}),
    "spherical-scale": (dict(dim=5, codebook_size=32, spherical=True, codebook_scale=0.5), (2, 23, 5), {}),
    "codebooks-projection": (dict(dim=9, codebook_size=16, num_codebooks=2), (2, 17, 9), {}),
    "commitment-clamp-softplus": (dict(dim=6, codebook_size=64, commitment_loss_weight=0.4, soft_clamp_input_value=2.0,
                                       experimental_softplus_entropy_loss=True, entropy_loss_offset=1.0,
                                       diversity_gamma=0.6, entropy_loss_weight=0.3), (2, 23, 6), {}),
    "frac-per-sample": (dict(dim=6, codebook_size=64, frac_per_sample_entropy=0.4), (2, 31, 6), {}),
    "rotation": (dict(dim=5, codebook_size=32, orthogonal_rotation=True), (2, 23, 5), {}),
    "cosine-project-in": (dict(dim=7, codebook_size=16, cosine_sim_project_in=True, codebook_scale=0.7), (2, 19, 7), {}),
    "image": (dict(dim=6, codebook_size=64), (2, 6, 4, 5), {}),
    "video-channel-first": (dict(dim=4, codebook_size=16, channel_first=True), (2, 4, 3, 2, 2), {}),
    "channel-first-3d": (dict(dim=4, codebook_size=16, channel_first=True), (2, 4, 13), {}),
    "activation": (dict(dim=5, codebook_size=32, straight_through_activation=nn.Tanh()), (2, 23, 5), {}),
    "inv-temperature": (dict(dim=6, codebook_size=64), (2, 23, 6), dict(inv_temperature=10.0)),
    "batch-mask": (dict(dim=6, codebook_size=64), (3, 23, 6), dict(mask=torch.tensor([True, False, True]))),
    "keep-codebook-dim": (dict(dim=4, codebook_size=16, keep_num_codebooks_dim=True), (2, 11, 4), {}),
    "no-projection-bias": (dict(dim=7, codebook_size=8, projection_has_bias=False, has_projections=True), (2, 11, 7), {}),
}


@pytest.mark.parametrize("case", list(LFQ_CASES))
def test_lfq_parity(case):
    kwargs, shape, call = LFQ_CASES[case]
    theirs, ours = _pair("LFQ", **kwargs)
    x = torch.randn(shape) * 0.03
    ro = _assert_parity(theirs, ours, x, return_loss_breakdown=True, **call)
    assert torch.equal(ours.indices_to_codes(ro[1]), ro[0].detach())
    torch.testing.assert_close(ours.indices_to_codes(ro[1]), theirs.indices_to_codes(ro[1]))
    torch.testing.assert_close(ours.indices_to_codes(ro[1], project_out=False),
                               theirs.indices_to_codes(ro[1], project_out=False))
    theirs.eval(), ours.eval()  # vqp's eval output has no gradient: compare values, indices and the 0 loss
    _assert_parity(theirs, ours, x, grads=False, **call)
    assert torch.equal(ours.codebook, theirs.codebook) and torch.equal(ours.mask, theirs.mask)


def test_lfq_sequence_mask_is_the_intended_batch():
    """A [B, N] mask: vqp flattens the codebook dim into the rows there, so its batch entropy is the
    per-sample one. Ours is the entropy of the kept vectors' mean distribution (the reference's)."""
    theirs, ours = _pair("LFQ", dim=6, codebook_size=64)
    x = torch.randn(3, 20, 6) * 0.03
    mask = torch.rand(3, 20) > 0.4
    (_, _, _), bt = theirs(x, return_loss_breakdown=True, mask=mask)
    (out, idx, loss), bo = ours(x, return_loss_breakdown=True, mask=mask)
    assert bt.batch_entropy == pytest.approx(bt.per_sample_entropy.item(), rel=1e-5)  # vqp's defect
    kept = f64(x)[f64(mask).astype(bool)]
    assert bo.per_sample_entropy.item() == pytest.approx(bt.per_sample_entropy.item(), rel=1e-5)
    assert bo.batch_entropy.item() == pytest.approx(R.lfq_batch_entropy(kept, 100.0, 1.0, 1e-5), rel=1e-5)
    assert torch.equal(idx, theirs(x, mask=mask)[1])  # every vector is still quantized, as vqp


def test_lfq_state_dict_both_ways():
    kwargs = dict(dim=7, codebook_size=16, orthogonal_rotation=True, straight_through_activation=nn.PReLU())
    theirs, ours = _pair("LFQ", **kwargs)
    assert {"mask", "orthogonal_rot", "activation.weight", "project_in.weight"} <= set(ours.state_dict())
    torch.manual_seed(5)
    other = compat.LFQ(**{**kwargs, "straight_through_activation": nn.PReLU()})
    other.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 7)
    assert torch.equal(other(x)[0], theirs(x)[0])
    fresh = vqp.LFQ(**{**kwargs, "straight_through_activation": nn.PReLU()})
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh(x)[0], ours(x)[0])
    wrong = compat.LFQ(dim=7, codebook_size=8)
    state = {**vqp.LFQ(dim=7, codebook_size=16).state_dict()}
    with pytest.raises(RuntimeError):
        wrong.load_state_dict(state)


# --- ResidualFSQ -----------------------------------------------------------------------------------

RFSQ_CASES = {
    "readme": (dict(dim=6, levels=[8, 5, 5, 3], num_quantizers=4), (2, 29, 6), {}),
    "soft-clamp-tanh": (dict(levels=[5, 5], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=[1.2, 1.5]),
                        (2, 29, 2), {}),
    "no-clamp": (dict(levels=[7, 4], num_quantizers=3, bound_hard_clamp=False), (2, 29, 2), {}),
    "dropout-seed": (dict(dim=5, levels=[5, 5, 5], num_quantizers=5, quantize_dropout=True, quantize_dropout_cutoff_index=1,
                          quantize_dropout_multiple_of=2), (2, 29, 5), dict(rand_quantize_dropout_fixed_seed=123)),
    "rotation-noise": (dict(levels=[5, 5, 5], num_quantizers=3, orthogonal_rotation=True, noise_dropout=0.5),
                       (2, 29, 3), {}),
    "channel-first": (dict(dim=3, levels=[5, 4], num_quantizers=3, is_channel_first=True), (2, 3, 4, 5), {}),
    "keep-codebook-dim": (dict(levels=[5, 3], num_quantizers=2, keep_num_codebooks_dim=True), (2, 9, 2), {}),
}


def _as_forward(decoded: torch.Tensor, case: str, channel_last: bool = False) -> torch.Tensor:
    """A residual translator's decoded output in its forward's layout: vqp's decoding keeps the indices'
    codebook dim, and (``channel_last``: ResidualLFQ's) gives channel-last outputs of channel-first inputs."""
    if case == "keep-codebook-dim":
        return decoded.squeeze(-2)
    return decoded.movedim(-1, 1) if channel_last and case in ("image", "channel-first") else decoded


@pytest.mark.parametrize("case", list(RFSQ_CASES))
def test_residual_fsq_parity(case):
    kwargs, shape, call = RFSQ_CASES[case]
    theirs, ours = _pair("ResidualFSQ", **kwargs)
    x = torch.randn(shape)
    for seed in (123, 7, 8):
        call = {**call, "rand_quantize_dropout_fixed_seed": seed} if "rand_quantize_dropout_fixed_seed" in call else call
        ro = _assert_parity(theirs, ours, x, **call)
        if case != "channel-first":
            assert ro[1].dtype == torch.int32
    theirs.eval(), ours.eval()
    ro = _assert_parity(theirs, ours, x)
    assert torch.equal(_as_forward(ours.get_output_from_indices(ro[1]), case), ro[0].detach())
    torch.testing.assert_close(ours.codebooks, theirs.codebooks)
    if case == "rotation-noise":  # vqp decodes without its levels' rotations: not its own forward's output
        assert not torch.allclose(theirs.get_output_from_indices(ro[1]), ro[0])
    elif case != "channel-first":
        torch.testing.assert_close(ours.get_output_from_indices(ro[1]), theirs.get_output_from_indices(ro[1]))
        torch.testing.assert_close(ours.get_codes_from_indices(ro[1]), theirs.get_codes_from_indices(ro[1]))
        (_, _, codes_t), (_, _, codes_o) = theirs(x, return_all_codes=True), ours(x, return_all_codes=True)
        torch.testing.assert_close(codes_o, codes_t)


def test_residual_fsq_channel_first_round_trip():
    """is_channel_first: vqp returns indices [B, Q, ...] but decodes [B, ..., Q] into channel-last outputs;
    ours decodes the forward's own indices into the forward's layout."""
    _, ours = _pair("ResidualFSQ", dim=3, levels=[5, 4], num_quantizers=3, is_channel_first=True)
    ours.eval()
    x = torch.randn(2, 3, 4, 5)
    out, idx = ours(x)
    assert idx.shape == (2, 3, 4, 5) and torch.equal(ours.get_output_from_indices(idx), out)


def test_residual_fsq_dropout_without_a_seed_draws_on_the_device():
    _, ours = _pair("ResidualFSQ", levels=[5, 5], num_quantizers=4, quantize_dropout=True)
    x = torch.randn(1, 10, 2, requires_grad=True)
    counts = {int((ours(x)[1][0, 0] >= 0).sum()) for _ in range(60)}
    assert counts == {1, 2, 3, 4}
    with torch.no_grad():  # vqp drops only while gradients are recorded
        assert (ours(x)[1] >= 0).all()


# --- ResidualLFQ -----------------------------------------------------------------------------------

RLFQ_CASES = {
    "readme": (dict(dim=8, codebook_size=32, num_quantizers=3), (2, 23, 8), {}),
    "dropout-seed": (dict(dim=5, codebook_size=32, num_quantizers=4, quantize_dropout=True), (2, 23, 5),
                     dict(rand_quantize_dropout_fixed_seed=3)),
    "kwargs": (dict(dim=4, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.3, entropy_loss_weight=0.2,
                    soft_clamp_input_value=1.5, frac_per_sample_entropy=0.5), (2, 23, 4), {}),
    "batch-mask": (dict(dim=4, codebook_size=16, num_quantizers=2), (3, 23, 4), dict(mask=torch.tensor([True, False, True]))),
    "spherical": (dict(dim=4, codebook_size=16, num_quantizers=2, spherical=True), (2, 23, 4), {}),
    "keep-codebook-dim": (dict(dim=4, codebook_size=16, num_quantizers=2, keep_num_codebooks_dim=True), (2, 9, 4), {}),
    "image": (dict(dim=4, codebook_size=16, num_quantizers=3), (2, 4, 3, 5), {}),  # levels: channel_first=None
    "channel-first": (dict(dim=4, codebook_size=16, num_quantizers=2, channel_first=True), (2, 4, 7), {}),
}


@pytest.mark.parametrize("case", list(RLFQ_CASES))
def test_residual_lfq_parity(case):
    kwargs, shape, call = RLFQ_CASES[case]
    theirs, ours = _pair("ResidualLFQ", **kwargs)
    x = torch.randn(shape) * 0.2
    _assert_parity(theirs, ours, x, **call)
    theirs.eval(), ours.eval()
    ro = _assert_parity(theirs, ours, x, grads=False)
    assert torch.equal(_as_forward(ours.get_output_from_indices(ro[1]), case, channel_last=True), ro[0].detach())
    assert torch.equal(ours.codebooks, theirs.codebooks)
    if case != "spherical":  # vqp decodes with its unnormalised codebook there
        torch.testing.assert_close(ours.get_output_from_indices(ro[1]), theirs.get_output_from_indices(ro[1]))
        torch.testing.assert_close(ours.get_codes_from_indices(ro[1]), theirs.get_codes_from_indices(ro[1]))
        (*_, ct), (*_, co) = theirs(x, return_all_codes=True), ours(x, return_all_codes=True)
        torch.testing.assert_close(co, ct)


def test_residual_lfq_state_dict_has_vqps_keys():
    theirs, ours = _pair("ResidualLFQ", dim=5, codebook_size=16, num_quantizers=3, orthogonal_rotation=True)
    assert list(ours.state_dict()) and set(ours.state_dict()) == set(theirs.state_dict())
    fresh = vqp.ResidualLFQ(dim=5, codebook_size=16, num_quantizers=3, orthogonal_rotation=True)
    fresh.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 5)
    fresh.eval(), ours.eval()
    assert torch.equal(fresh(x)[0], ours(x)[0])


# --- vqp's README examples, unchanged but for the import -------------------------------------------


def exists(v):
    return v is not None


@pytest.mark.parametrize("preserve_symmetry", (True, False))
@pytest.mark.parametrize("bound_hard_clamp", (True, False))
def test_readme_fsq(preserve_symmetry, bound_hard_clamp):
    from vqtriton.compat import FSQ

    levels = [8, 5, 5, 5]  # see 4.1 and A.4.1 in the paper
    quantizer = FSQ(levels, preserve_symmetry=preserve_symmetry, bound_hard_clamp=bound_hard_clamp)

    x = torch.randn(1, 1024, 4)  # 4 since there are 4 levels
    xhat, indices = quantizer(x)

    assert torch.all(xhat == quantizer.indices_to_codes(indices))


def test_readme_fsq_without_indices():
    from vqtriton.compat import FSQ

    levels = [8, 5, 5, 5]  # see 4.1 and A.4.1 in the paper
    quantizer = FSQ(levels, return_indices=False)

    x = torch.randn(1, 1024, 4)  # 4 since there are 4 levels
    xhat, indices = quantizer(x)

    assert not exists(indices)


def test_readme_rfsq():
    from vqtriton.compat import ResidualFSQ

    residual_fsq = ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)

    x = torch.randn(1, 1024, 256)

    residual_fsq.eval()

    quantized, indices = residual_fsq(x)

    quantized_out = residual_fsq.get_output_from_indices(indices)

    assert torch.all(quantized == quantized_out)


@pytest.mark.parametrize("spherical", (True, False))
@pytest.mark.parametrize("codebook_scale", (1.0, 0.5))
def test_readme_lfq(spherical, codebook_scale):
    from vqtriton.compat import LFQ

    quantizer = LFQ(
        codebook_size=65536,  # codebook size, must be a power of 2
        dim=16,  # this is the input feature dimension, defaults to log2(codebook_size) if not defined
        entropy_loss_weight=0.1,  # how much weight to place on entropy loss
        diversity_gamma=1.0,  # within entropy loss, how much weight to give to diversity of codes
        spherical=spherical,
        codebook_scale=codebook_scale,
    )

    image_feats = torch.randn(1, 16, 32, 32)

    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)

    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_readme_lfq_video():
    from vqtriton.compat import LFQ

    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)

    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)

    assert seq.shape == quantized.shape

    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, *_ = quantizer(video_feats)

    assert video_feats.shape == quantized.shape


def test_readme_lfq2():
    from vqtriton.compat import LFQ

    quantizer = LFQ(codebook_size=4096, dim=16, num_codebooks=4)  # 4 codebooks, total codebook dim log2(4096) * 4

    image_feats = torch.randn(1, 16, 32, 32)

    quantized, indices, entropy_aux_loss = quantizer(image_feats)

    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_readme_rflq():
    from vqtriton.compat import ResidualLFQ

    residual_lfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)

    x = torch.randn(1, 1024, 256)

    residual_lfq.eval()

    quantized, indices, commit_loss = residual_lfq(x)

    quantized_out = residual_lfq.get_output_from_indices(indices)

    assert torch.all(quantized == quantized_out)


# vqp's tests/test_lfq.py (masks, and the subsampled per-sample entropy as an unbiased estimate).


@pytest.mark.parametrize("frac_per_sample_entropy", (1.0, 0.5))
@pytest.mark.parametrize("mask", (torch.tensor([False, False]), torch.tensor([True, False]), torch.tensor([True, True])))
def test_vqp_masked_lfq(frac_per_sample_entropy, mask):
    from vqtriton.compat import LFQ

    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0,
                    frac_per_sample_entropy=frac_per_sample_entropy)

    image_feats = torch.randn(2, 16, 32, 32)

    ret, _ = quantizer(image_feats, inv_temperature=100.0, return_loss_breakdown=True, mask=mask)

    quantized, indices, _ = ret
    assert (quantized == quantizer.indices_to_codes(indices)).all()


@pytest.mark.parametrize("mask", (None, torch.tensor([True, False])))
def test_vqp_lfq_bruteforce_frac_per_sample_entropy(mask):
    """vqp's check that the subsampled per-sample entropy is unbiased, with 40 draws and a 3.3 sigma bound
    where vqp takes 10 draws and 1.96 sigma: that interval misses the true value at one seed in twenty
    (for vqp and for this alike: measured here, 1 of 20 seeds), and the seeds here are fixed per test."""
    from vqtriton.compat import LFQ

    frac_per_sample_entropy, iters = 0.1, 40
    image_feats = torch.randn(2, 16, 32, 32)

    full = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0, frac_per_sample_entropy=1)
    partial = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0,
                  frac_per_sample_entropy=frac_per_sample_entropy)

    _, loss_breakdown = full(image_feats, inv_temperature=100.0, return_loss_breakdown=True, mask=mask)
    true_per_sample_entropy = loss_breakdown.per_sample_entropy

    per_sample_losses = torch.zeros(iters)
    for i in range(iters):
        ret, loss_breakdown = partial(image_feats, inv_temperature=100.0, return_loss_breakdown=True, mask=mask)
        quantized, indices, _ = ret
        assert (quantized == partial.indices_to_codes(indices)).all()
        per_sample_losses[i] = loss_breakdown.per_sample_entropy

    # 99.9% confidence interval
    assert abs(per_sample_losses.mean() - true_per_sample_entropy) < (3.29 * (per_sample_losses.std() / math.sqrt(iters)))
