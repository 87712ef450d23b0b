"""LFQ's entropy ops (vqtriton.entropy, kernels/lfq.py) and the LFQ module against the NumPy reference,
on both backends ("torch", and "triton": the kernels through the interpreter on a CPU)."""

import math

import numpy as np
import pytest
import torch
from helpers import f64, poison
from torch import nn

import vqtriton as vqt
from vqtriton import entropy as E
from vqtriton import reference as R
from vqtriton.entropy_torch import FLUSH
from vqtriton.kernels import lfq as K
from vqtriton.lfq import _subsample

BACKENDS = ["torch", "triton"]
# (N, heads, d): empty, one row, odd sizes, several codebooks, a 4096-code codebook.
CASES = [(0, 1, 3), (1, 1, 1), (37, 1, 7), (23, 3, 5), (19, 2, 12)]
VALUE_RTOL = 1e-6  # of the largest reference value
GRAD_RTOL = 3e-6  # of the largest reference gradient entry


def _case_id(c):
    return "N{}-H{}-d{}".format(*c)


def _logits(n, h, d, device, spread=0.01, tau=100.0):
    """Bit logits 4 tau x of LFQ-like inputs: a mix of confident and uncertain bits."""
    x = torch.randn(n, h, d, device=device) * spread
    return (4 * tau * x).requires_grad_()


def _close(got, want, rtol, what):
    got, want = f64(got), np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    err = np.abs(got - want).max(initial=0.0)
    assert err <= rtol * scale, f"{what}: max error {err:.3e} = {err / scale:.2e} of the largest value {scale:.3e}"


def _weights(kind, n, device):
    if kind == "uniform":
        return None, np.full(n, 1.0 / max(n, 1))
    w = torch.rand(n, device=device)
    if kind == "zeros":
        w = torch.zeros(n, device=device)
    w = w / w.sum().clamp_min(1e-30)
    return w, f64(w)


# --- the ops ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("weight", ["uniform", "random", "zeros"])
def test_code_distribution_and_entropy_match_the_reference(backend, case, weight, device):
    n, h, d = case
    u = _logits(n, h, d, device)
    w, wn = _weights(weight, n, device)
    m = E.code_distribution(u, w, backend=backend)
    assert m.shape == (h, 2**d) and m.dtype == torch.float32
    un = f64(u)
    for head in range(h):
        ref = R.lfq_batch_distribution(un[:, head], wn) if n else np.zeros(2**d)
        _close(m[head], ref, VALUE_RTOL, f"distribution, head {head}")
        for eps in (None, 1e-5):
            got = E.distribution_entropy(m[head], eps, backend=backend)
            assert got.dim() == 0
            want = R.distribution_entropy(ref, eps)
            assert abs(got.item() - want) <= VALUE_RTOL * max(abs(want), 1e-30) + 1e-7, (eps, got.item(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[1:], ids=_case_id)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_entropy_gradients_match_the_analytic_ones(backend, case, eps, device):
    n, h, d = case
    u = _logits(n, h, d, device)
    w, wn = _weights("random", n, device)
    a, b = torch.randn(h, device=device), torch.randn(h, device=device)
    per_sample = E.bit_entropy(u, w, eps=eps)
    batch = E.distribution_entropy(E.code_distribution(u, w, backend=backend), eps, backend=backend)
    ((a * per_sample).sum() + (b * batch).sum()).backward()
    un, tau = f64(u), 100.0
    for head in range(h):
        x = un[:, head] / (4 * tau)  # back to the inputs of the definitions (magnitude 1)
        assert per_sample[head].item() == pytest.approx(R.lfq_per_sample_entropy(x, tau, 1.0, eps, wn), rel=VALUE_RTOL, abs=1e-7)
        assert batch[head].item() == pytest.approx(R.lfq_batch_entropy(x, tau, 1.0, eps, wn), rel=VALUE_RTOL, abs=1e-7)
        want = (a[head].item() * R.lfq_per_sample_entropy_grad(x, tau, 1.0, eps, wn)
                + b[head].item() * R.lfq_batch_entropy_grad(x, tau, 1.0, eps, wn)) / (4 * tau)
        _close(u.grad[:, head], want, GRAD_RTOL, f"gradient, head {head}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_twenty_bits_against_the_factored_reference(backend, device):
    """d = 20 (a million codes): the distribution and its entropy's gradient, against the factored float64
    forms (themselves checked against the definitions in test_reference_fsq_lfq.py)."""
    n, d = 9, 20
    u = _logits(n, 1, d, device, spread=0.003)
    m = E.code_distribution(u, backend=backend)
    un = f64(u)[:, 0]
    ref = R.lfq_batch_distribution(un)
    _close(m[0], ref, VALUE_RTOL, "distribution")
    batch = E.distribution_entropy(m, backend=backend)
    assert batch.item() == pytest.approx(R.distribution_entropy(ref), rel=VALUE_RTOL)
    batch.sum().backward()
    _close(u.grad[:, 0], R.lfq_batch_distribution_grad(un, -np.log(ref) - 1), GRAD_RTOL, "gradient")


@pytest.mark.parametrize("d", [9, 18])
def test_clamped_per_sample_entropy_is_exact(d, device):
    """vqp's clamp on uncertain rows, where it is not the per-bit sum: the sort over one half, against the
    float64 grid of both halves; its gradient against the grid's."""
    n = 5
    u = (torch.randn(n, d, device=device) * 3).requires_grad_()
    got = E.bit_entropy(u, eps=1e-5)
    un = f64(u)
    want = R.lfq_clamped_sample_entropy(un, 1e-5)
    assert got.item() == pytest.approx(want.mean(), rel=VALUE_RTOL)
    assert want.mean() < R.lfq_bit_entropy(un).mean() - 1e-4  # the clamp matters here
    got.backward()
    _close(u.grad, R.lfq_clamped_sample_entropy_grad(un, 1e-5) / n, GRAD_RTOL, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lfq_entropy_with_a_mask(backend, device):
    u = _logits(31, 2, 6, device)
    keep = torch.rand(31, device=device) > 0.4
    got = E.lfq_entropy(u, keep, eps=1e-5, backend=backend)
    un = f64(u)[f64(keep).astype(bool)] / 400
    for head in range(2):
        assert got.per_sample[head].item() == pytest.approx(R.lfq_per_sample_entropy(un[:, head], 100.0, 1.0, 1e-5), rel=1e-5)
        assert got.batch[head].item() == pytest.approx(R.lfq_batch_entropy(un[:, head], 100.0, 1.0, 1e-5), rel=1e-5)
    none = E.lfq_entropy(u, torch.zeros(31, dtype=torch.bool, device=device), backend=backend)
    assert (none.per_sample == 0).all() and (none.batch == 0).all()
    single = E.lfq_entropy(u[:, 0], backend=backend)
    assert single.per_sample.dim() == 0 and single.batch.dim() == 0


def test_the_flush_leaves_no_subnormal(device):
    """Probabilities below 2^-62 are 0 (no subnormal operand reaches a multiply), on both backends."""
    u = (torch.randn(17, 1, 10, device=device) * 60).requires_grad_()
    ref = R.lfq_batch_distribution(f64(u)[:, 0])
    for backend in BACKENDS:
        m = E.code_distribution(u, backend=backend)
        assert ((m == 0) | (m >= FLUSH**2)).all()
        # What was dropped is below the flush: each row adds at most its weight times FLUSH there.
        dropped = f64(m[0]) == 0
        assert dropped.any() and ref[dropped].max() <= FLUSH
        _close(m[0], ref, VALUE_RTOL, "distribution")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend, device):
    u = _logits(13, 2, 5, device).detach().transpose(0, 1).contiguous().requires_grad_()
    w = torch.rand(13, device=device)
    m, a, b = torch.ops.vqtriton.lfq_code_distribution(u, w, backend)
    g = torch.randn_like(m)
    ops = torch.ops.vqtriton
    torch.library.opcheck(ops.lfq_code_distribution, (u, w, backend))
    torch.library.opcheck(ops.lfq_code_distribution_backward, (u.detach(), m.detach(), a.detach(), b.detach(), g, backend))
    torch.library.opcheck(ops.lfq_clamped_entropy, (u, w, 1e-5, backend))
    _, ga, gb = ops.lfq_clamped_entropy(u.detach(), w, 1e-5, backend)
    torch.library.opcheck(ops.lfq_clamped_entropy_backward, (u.detach(), w, ga, gb, torch.randn(2, device=device), backend))
    pm = m.detach().clone().requires_grad_()
    for eps in (0.0, 1e-5):
        torch.library.opcheck(ops.distribution_entropy, (pm, eps, backend))
        torch.library.opcheck(ops.distribution_entropy_backward, (pm.detach(), torch.randn(2, device=device), eps, backend))


def test_kernels_write_every_element_and_take_strides(monkeypatch, device):
    """Poisoned outputs, a head-strided view of u, and sizes that are not multiples of the tiles."""
    poison(monkeypatch, K)
    base = torch.randn(29, 3, 11, device=device) * 4
    u = base.transpose(0, 1)  # [H, N, d] with row stride 33
    w = torch.rand(29, device=device)
    from vqtriton import entropy_torch as T

    for bit0, k in ((0, 5), (5, 6), (0, 0), (3, 1)):
        got = K.lfq_halves(u, w, bit0, k)
        torch.testing.assert_close(got, T.lfq_halves(u, w, bit0, k), rtol=1e-6, atol=1e-12)
        dp = torch.randn_like(got)
        torch.testing.assert_close(K.lfq_halves_backward(u, got, dp, bit0, k), T.lfq_halves_backward(u, got, dp, bit0, k),
                                   rtol=1e-5, atol=1e-6)
    m = torch.rand(3, 5000, device=device)
    m = m / m.sum(1, keepdim=True)
    g = torch.randn(3, device=device)
    for eps in (0.0, 1e-5, 0.5):
        torch.testing.assert_close(K.distribution_entropy(m, eps), T.distribution_entropy(m, eps), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(K.distribution_entropy_grad(m, g, eps), T.distribution_entropy_grad(m, g, eps),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="at most 16 bits"):
        K.lfq_halves_backward(u, u, u, 0, 17)


BAD_CALLS = [
    ("int-logits", lambda: E.code_distribution(torch.zeros(3, 4, dtype=torch.int64)), TypeError, "floating-point"),
    ("1-D", lambda: E.bit_entropy(torch.zeros(4)), ValueError, r"\[N, d\] or \[N, H, d\]"),
    ("33-bits", lambda: E.code_distribution(torch.zeros(2, 33)), ValueError, "d <= 32"),
    ("weight-shape", lambda: E.code_distribution(torch.zeros(3, 4), torch.ones(2)), ValueError, r"\[N\] = \[3\]"),
    ("eps", lambda: E.distribution_entropy(torch.ones(4) / 4, 2.0), ValueError, "eps must be"),
    ("mask-shape", lambda: E.lfq_entropy(torch.zeros(3, 4), torch.ones(2, dtype=torch.bool)), ValueError, "mask must have"),
]


@pytest.mark.parametrize("fn, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_answered(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


# --- the module ---------------------------------------------------------------------------------

# name -> (LFQ kwargs, input layout); the reference terms take the transformed inputs.
CONFIGS = {
    "default": (dict(), "rows"),
    "vqp-clamp-commitment": (dict(entropy_eps=1e-5, commitment_weight=0.7, diversity_gamma=0.5), "rows"),
    "spherical-scale": (dict(spherical=True, scale=0.5), "rows"),
    "heads-softplus": (dict(heads=2, softplus_offset=2.0, entropy_weight=0.3), "rows"),
    "soft-clamp-rotation": (dict(soft_clamp=1.5, rotation=True, commitment_weight=0.2), "rows"),
    "channel-first": (dict(channel_dim=1, entropy_eps=1e-5), "image"),
}
DIM = 6


def _inputs(layout, device, n=21):
    shape = {"rows": (n, DIM), "image": (2, DIM, 3, 4)}[layout]
    return torch.randn(shape, device=device) * 0.02


def _reference_terms(lfq, z, keep=None, tau=100.0):
    """(codes, indices, per_sample, batch, commitment) by the reference, over each head; z channel-last rows."""
    rot = None if lfq.rotation is None else f64(lfq.rotation)
    x = f64(z).reshape(-1, lfq.heads, lfq.codebook_dim)
    x = R.lfq_transform(x, scale=lfq.scale, spherical=lfq.spherical, soft_clamp=lfq.soft_clamp, rotation=rot)
    codes, idx = R.lfq_quantize(x, scale=lfq.scale, spherical=lfq.spherical)
    w = None if keep is None else f64(keep).reshape(-1)
    mag = R.lfq_code_magnitude(lfq.codebook_dim, lfq.scale, lfq.spherical)
    eps = lfq.entropy_eps
    ps = np.mean([R.lfq_per_sample_entropy(x[:, h], tau, mag, eps, w) for h in range(lfq.heads)])
    be = np.mean([R.lfq_batch_entropy(x[:, h], tau, mag, eps, w) for h in range(lfq.heads)])
    cm = R.lfq_commitment(x.reshape(x.shape[0], -1), codes.reshape(x.shape[0], -1), w) if lfq.commitment_weight else 0.0
    if rot is not None:
        codes = codes @ rot.T
    return codes, idx, ps, be, cm


def _loss(lfq, ps, be, cm):
    return R.lfq_loss(ps, be, cm, entropy_weight=lfq.entropy_weight, diversity_gamma=lfq.diversity_gamma,
                      commitment_weight=lfq.commitment_weight, softplus_offset=lfq.softplus_offset)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_module_matches_the_reference(config, backend, device):
    kwargs, layout = CONFIGS[config]
    lfq = vqt.LFQ(DIM, backend=backend, **kwargs).to(device).train()
    z = _inputs(layout, device)
    z_q, idx, loss, parts = lfq(z, return_breakdown=True)
    assert z_q.shape == z.shape and z_q.dtype == z.dtype and idx.dtype == torch.int64
    rows = z.movedim(lfq.channel_dim, -1)
    codes, ref_idx, ps, be, cm = _reference_terms(lfq, rows)
    lead = rows.shape[:-1]
    assert np.array_equal(f64(idx).astype(np.int64).reshape(-1), ref_idx.reshape(-1))
    assert idx.shape == (lead if lfq.heads == 1 else (*lead, lfq.heads))
    np.testing.assert_allclose(f64(z_q.movedim(lfq.channel_dim, -1)).reshape(-1), codes.reshape(-1), rtol=1e-6, atol=1e-6)
    for got, want in zip(parts, (ps, be, cm)):
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(_loss(lfq, ps, be, cm), rel=1e-5, abs=1e-6)
    # The codes of the indices are the output, bit for bit, in the input layout.
    assert torch.equal(lfq.indices_to_codes(idx), z_q.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_gradient_is_the_analytic_one(backend, device):
    """Without input transforms: the output's gradient passes straight through, the loss's is the
    reference's analytic gradient (entropies through the softplus, and the commitment)."""
    lfq = vqt.LFQ(DIM, entropy_eps=1e-5, commitment_weight=0.3, diversity_gamma=0.7, softplus_offset=1.0,
                  backend=backend).to(device)
    z = _inputs("rows", device).requires_grad_()
    g = torch.randn_like(z)
    z_q, _, loss = lfq(z)
    ((z_q * g).sum() + loss).backward()
    x = f64(z)
    codes, _, ps, be, cm = _reference_terms(lfq, z.detach())
    slope = 1 / (1 + math.exp(-(ps - 0.7 * be + 1.0)))  # softplus'
    want = f64(g) + lfq.entropy_weight * slope * (R.lfq_per_sample_entropy_grad(x, 100.0, 1.0, 1e-5)
                                                  - 0.7 * R.lfq_batch_entropy_grad(x, 100.0, 1.0, 1e-5))
    want = want + 0.3 * R.lfq_commitment_grad(x, codes)
    _close(z.grad, want, GRAD_RTOL, "input gradient")


@pytest.mark.parametrize("config", ["spherical-scale", "soft-clamp-rotation", "heads-softplus"])
def test_module_loss_gradient_through_the_transforms(config, device):
    """float64 (the torch path): the loss's gradient through soft clamp, rotation and normalisation
    against finite differences."""
    kwargs, _ = CONFIGS[config]
    lfq = vqt.LFQ(DIM, **kwargs).to(device).double()
    z = (torch.randn(7, DIM, device=device, dtype=torch.float64) * 0.02).requires_grad_()
    torch.autograd.gradcheck(lambda t: lfq(t)[2], (z,), eps=1e-7, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vectors_count_in_nothing(backend, device):
    lfq = vqt.LFQ(DIM, entropy_eps=1e-5, commitment_weight=0.5, backend=backend).to(device)
    z = _inputs("rows", device, n=30).reshape(5, 6, DIM)
    keep = torch.rand(5, 6, device=device) > 0.3
    z = torch.where(keep[..., None], z, torch.nan)  # NaN padding reaches nothing
    z_q, idx, loss, parts = lfq(z, keep, return_breakdown=True)
    assert (idx[~keep] == -1).all() and (z_q[~keep] == 0).all() and torch.isfinite(loss)
    _, _, ps, be, cm = _reference_terms(lfq, z[keep])
    for got, want in zip(parts, (ps, be, cm)):
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # A kept NaN vector: index -1 and a NaN loss, never hidden.
    z2 = _inputs("rows", device)
    z2[3, 1] = torch.nan
    _, idx2, loss2 = lfq(z2)
    assert idx2[3] == -1 and (idx2[torch.arange(len(idx2), device=device) != 3] >= 0).all() and loss2.isnan()
    # No kept vector: loss 0.
    _, idx3, loss3 = lfq(z, torch.zeros_like(keep))
    assert loss3.item() == 0.0 and (idx3 == -1).all()


def test_eval_mode_has_no_loss_and_keeps_the_straight_through_gradient(device):
    lfq = vqt.LFQ(DIM, commitment_weight=1.0).to(device).eval()
    z = _inputs("rows", device).requires_grad_()
    z_q, _, loss, parts = lfq(z, return_breakdown=True)
    assert loss.item() == 0.0 and all(p.item() == 0.0 for p in parts)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_activation_shapes_the_straight_through_gradient(device):
    lfq = vqt.LFQ(DIM, activation=nn.Tanh(), entropy_weight=0.0).to(device)
    z = _inputs("rows", device).mul(50).requires_grad_()
    z_q, _, _ = lfq(z)
    assert torch.equal(z_q.abs(), torch.ones_like(z_q))
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, 1 - torch.tanh(z.detach()) ** 2)


@pytest.mark.parametrize("masked", [False, True])
def test_entropy_fraction_draws_floor_of_the_kept_rows(masked, device):
    n, frac = 41, 0.37
    keep = (torch.rand(n, device=device) > 0.3) if masked else None
    kept = n if keep is None else int(keep.sum())
    g = torch.Generator(device=device).manual_seed(5)
    chosen = _subsample(n, keep, frac, g, device)
    assert int(chosen.sum()) == math.floor(kept * frac)
    if keep is not None:
        assert not (chosen & ~keep).any()
    else:  # vqp's draw: the same rows from the same generator state
        g.manual_seed(5)
        assert torch.equal(chosen, torch.randn(n, generator=g, device=device).argsort() < math.floor(n * frac))
    # The module's breakdown is the reference's over the chosen rows.
    lfq = vqt.LFQ(DIM, entropy_fraction=frac, generator=torch.Generator(device=device).manual_seed(9)).to(device)
    z = _inputs("rows", device, n=n)
    mask = None if keep is None else keep
    _, _, _, parts = lfq(z, mask, return_breakdown=True)
    rows = _subsample(n, keep, frac, torch.Generator(device=device).manual_seed(9), device)
    _, _, ps, be, _ = _reference_terms(lfq, z[rows])
    assert parts.per_sample_entropy.item() == pytest.approx(ps, rel=1e-5)
    assert parts.batch_entropy.item() == pytest.approx(be, rel=1e-5)
    # Drawing no row gives 0.
    tiny = vqt.LFQ(DIM, entropy_fraction=0.01).to(device)
    _, _, loss = tiny(z)
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_inputs(dtype, device):
    lfq = vqt.LFQ(DIM, entropy_eps=1e-5).to(device)
    z = _inputs("rows", device, n=64).to(dtype)
    z_q, idx, loss = lfq(z)
    assert z_q.dtype == dtype and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    z32_q, idx32, loss32 = lfq(z.double() if dtype == torch.float64 else z.float())
    assert torch.equal(idx, idx32)
    assert loss.item() == pytest.approx(loss32.item(), rel=1e-6)


def test_backends_agree(device):
    kwargs = dict(heads=2, entropy_eps=1e-5, commitment_weight=0.1)
    z = _inputs("rows", device, n=50).reshape(10, 5, DIM).requires_grad_()
    out = {}
    for backend in BACKENDS:
        z.grad = None
        z_q, idx, loss = vqt.LFQ(DIM, backend=backend, **kwargs).to(device)(z)
        (z_q.sum() + loss).backward()
        out[backend] = (idx, loss.detach(), z.grad.clone())
    assert torch.equal(out["torch"][0], out["triton"][0])
    torch.testing.assert_close(out["torch"][1], out["triton"][1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["torch"][2], out["triton"][2], rtol=1e-5, atol=1e-6)


def test_indices_to_codes(device):
    lfq = vqt.LFQ(DIM, heads=3, spherical=True, rotation=True, channel_dim=1).to(device)
    z = _inputs("image", device)
    z_q, idx, _ = lfq(z)
    assert idx.shape == (2, 3, 4, 3)
    assert torch.equal(lfq.indices_to_codes(idx), z_q.detach())
    idx[0, 0, 0, 1] = -1
    codes = lfq.decode(idx)
    assert (codes[0, 2:4, 0, 0] == 0).all()
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        lfq.indices_to_codes(torch.full((2, 3), 4, device=device))
    with pytest.raises(ValueError, match="heads = 3"):
        lfq.indices_to_codes(torch.zeros(2, 2, dtype=torch.long, device=device))
    assert lfq.codebook.shape == (4, 2)


def test_inv_temperature_per_call(device):
    lfq = vqt.LFQ(DIM).to(device)
    z = _inputs("rows", device)
    _, _, _, parts = lfq(z, inv_temperature=10.0, return_breakdown=True)
    x = f64(z)
    assert parts.per_sample_entropy.item() == pytest.approx(R.lfq_per_sample_entropy(x, 10.0, 1.0), rel=1e-5)


def test_no_vectors(device):
    lfq = vqt.LFQ(DIM, commitment_weight=1.0).to(device)
    z = torch.randn(0, 4, DIM, device=device, requires_grad=True)
    z_q, idx, loss = lfq(z)
    assert z_q.shape == z.shape and idx.shape == (0, 4) and loss.item() == 0.0
    loss.backward()


BAD_MODULES = [
    ("dim-heads", lambda: vqt.LFQ(7, heads=2), ValueError, "divisible by heads"),
    ("too-many-bits", lambda: vqt.LFQ(33), ValueError, "at most 32 bits"),
    ("soft-clamp", lambda: vqt.LFQ(4, scale=2.0, soft_clamp=1.0), ValueError, "soft_clamp must be >= scale"),
    ("fraction", lambda: vqt.LFQ(4, entropy_fraction=0.0), ValueError, "entropy_fraction"),
    ("eps", lambda: vqt.LFQ(4, entropy_eps=1.0), ValueError, "entropy_eps"),
    ("generator", lambda: vqt.LFQ(4, generator=3), TypeError, "generator"),
    ("activation", lambda: vqt.LFQ(4, activation=3), TypeError, "activation"),
    ("channels", lambda: vqt.LFQ(4)(torch.zeros(3, 5)), ValueError, "dim = 4 channels"),
    ("mask", lambda: vqt.LFQ(4)(torch.zeros(3, 4), torch.ones(4, dtype=torch.bool)), ValueError, "mask must have"),
]


@pytest.mark.parametrize("fn, error, match", [c[1:] for c in BAD_MODULES], ids=[c[0] for c in BAD_MODULES])
def test_bad_module_arguments(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


@pytest.mark.gpu
def test_gpu_kernels_match_the_torch_path_at_scale():
    """2,048 vectors of 18 bits on CUDA (compiled kernels, cuBLAS in fp32) against the CPU torch path."""
    u = (torch.randn(2048, 1, 18) * 4).requires_grad_()
    ug = u.detach().cuda().requires_grad_()
    for eps in (None, 1e-5):
        got = E.distribution_entropy(E.code_distribution(ug, backend="triton"), eps, backend="triton")
        want = E.distribution_entropy(E.code_distribution(u, backend="torch"), eps, backend="torch")
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
        (gu,) = torch.autograd.grad(got.sum(), ug)
        (wu,) = torch.autograd.grad(want.sum(), u)
        torch.testing.assert_close(gu.cpu(), wu, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_gpu_distribution_entropy_of_many_rows():
    """More rows than a CUDA grid's second axis holds (65535): the entropy kernels use one flat axis."""
    p = torch.softmax(torch.randn(70001, 37, device="cuda"), -1).requires_grad_()
    for eps in (None, 1e-3):
        got = E.distribution_entropy(p, eps, backend="triton")
        want = E.distribution_entropy(p, eps, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (g1,) = torch.autograd.grad(got.sum(), p)
        (g2,) = torch.autograd.grad(want.sum(), p)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
