"""Gumbel-max sampled assignment (``vqtriton.sample_codes``, ``quantize(temperature=...)``; kernels/sample.py
and ``torch_ops.sample_fwd``): the noise's generator bit for bit, the draw's distribution by a chi-square
test against ``reference.gumbel_probabilities`` (fixed seeds: deterministic, it cannot flake), and what
a seed must guarantee (reproducible, independent of the launch, the same on both backends).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from scipy import stats

import vqtriton as vqt
from vqtriton import reference as R
from vqtriton import torch_ops
from vqtriton.kernels import sample as S
from helpers import f64

BACKENDS = ["triton", "torch"]
# Significance of the goodness-of-fit tests: a correct sampler fails one with probability 1e-4 per seed;
# the seeds are fixed, so a pass is a pass for good.
ALPHA = 1e-4


# --- the generator ---------------------------------------------------------------------------------------


def test_philox_reference_known_answers():
    # Random123's known-answer vectors for philox4x32-10 (kat_vectors).
    kat = [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for key, counter, want in kat:
        assert tuple(int(w) for w in R.philox4x32(key, counter)) == want


@triton.jit
def _bits_kernel(seed_ptr, rows_ptr, codes_ptr, out_ptr, log_e_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    o_n, o_k = tl.arange(0, BN), tl.arange(0, BK)
    m = (o_n < N)[:, None] & (o_k < K)[None, :]
    b_rows = tl.load(rows_ptr + o_n, mask=o_n < N, other=0)
    b_codes = tl.load(codes_ptr + o_k, mask=o_k < K, other=0)
    seed = tl.load(seed_ptr)
    p = o_n[:, None] * K + o_k[None, :]
    tl.store(out_ptr + p, S._philox_bits(seed, b_rows, b_codes).to(tl.int64), mask=m)
    tl.store(log_e_ptr + p, S._gumbel_log_e(seed, b_rows, b_codes), mask=m)


SEEDS = [0, 1, 12345, -1, -(2**63), 2**63 - 1, 0x1234_5678_9ABC_DEF0]


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_bits_are_the_same_everywhere(device, seed):
    """Triton's kernel helper, the torch path's int64 arithmetic and NumPy's uint64 reference agree bit for
    bit, for rows past 2^32 and codes up to 2^31 - 1; the noise agrees to float rounding."""
    rows = torch.tensor([0, 1, 2, 77, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 11],
                        dtype=torch.int64)
    codes = torch.tensor([0, 1, 2, 3, 1000, 65535, 65536, 2**24 + 1, 2**31 - 1], dtype=torch.int64)
    ref_bits = R.philox4x32((seed % 2**64 & 0xFFFFFFFF, seed % 2**64 >> 32),
                            (codes.numpy()[None, :], rows.numpy()[:, None] & 0xFFFFFFFF, rows.numpy()[:, None] >> 32, 0))[0]
    seed_t = torch.tensor(seed, dtype=torch.int64)
    assert np.array_equal(torch_ops.philox_bits(seed_t, rows, codes).numpy(), np.broadcast_to(ref_bits, (11, 9)))
    out = torch.empty(11, 9, dtype=torch.int64, device=device)
    log_e = torch.empty(11, 9, dtype=torch.float32, device=device)
    _bits_kernel[(1,)](seed_t.to(device), rows.to(device), codes.to(device), out, log_e, 11, 9, BN=16, BK=16)
    assert np.array_equal(out.cpu().numpy(), np.broadcast_to(ref_bits, (11, 9)))
    g_ref = R.gumbel_noise(seed, rows.numpy(), codes.numpy())
    np.testing.assert_allclose(-torch_ops.gumbel_log_e(seed_t, rows, codes).numpy(), g_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(-f64(log_e), g_ref, rtol=2e-6, atol=2e-6)


def test_noise_is_standard_gumbel():
    """The noise of many (row, code) pairs: Kolmogorov-Smirnov against the standard Gumbel law, and the
    far tail (where draws are won) as often as it should be."""
    g = R.gumbel_noise(2024, np.arange(4000), np.arange(250)).ravel()  # 1e6 values
    assert stats.kstest(g, stats.gumbel_r.cdf).pvalue > ALPHA
    for t in (5.0, 10.0, 13.0):  # P(g > t) = 1 - exp(-exp(-t)): 6.7e-3, 4.5e-5, 2.3e-6
        p = -np.expm1(-np.exp(-t))
        hits = int((g > t).sum())
        assert stats.binomtest(hits, g.size, p).pvalue > ALPHA, (t, hits, p * g.size)


# --- the distribution of a draw ---------------------------------------------------------------------------


def chi_square_pvalue(idx: np.ndarray, probs: np.ndarray) -> float:
    """The p-value of the codes drawn for each distinct vector (rows of ``idx`` [V, draws]) against its
    probabilities ``probs [V, K]``: Pearson's statistic summed over the vectors (independent draws, so
    chi-square with the summed degrees of freedom); cells expecting fewer than 5 draws pooled."""
    stat, dof = 0.0, 0
    for i, p in enumerate(probs):
        counts = np.bincount(idx[i], minlength=p.size).astype(np.float64)
        expected = p * idx.shape[1]
        small = expected < 5
        obs, exp = counts[~small], expected[~small]
        if expected[small].sum() > 0:
            obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
        stat += float(((obs - exp) ** 2 / exp).sum())
        dof += obs.size - 1
    return float(stats.chi2.sf(stat, dof))


def draws(backend, z, c, copies, temperature, seed, metric="l2"):
    """Codes of ``copies`` copies of each row of ``z`` (rows ``[V, copies]``), one draw each."""
    zz = z.repeat_interleave(copies, 0)
    idx = vqt.sample_codes(zz, c, temperature, seed, metric=metric, backend=backend)
    return idx.reshape(z.shape[0], copies).cpu().numpy()


# (metric, temperature, seed): vqp's L2 logits are -sqrt(d) (a spread of a few units here), its cosine
# ones lie in [-1, 1], hence colder temperatures there.
FITS = [("l2", 1.0, 11), ("l2", 0.35, 12), ("cosine", 0.4, 13)]


@pytest.mark.parametrize("fit", FITS, ids=lambda f: f"{f[0]}-T{f[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_follow_the_softmax(device, backend, fit):
    """Four vectors x 2500 draws over K = 11 codes: chi-square goodness of fit to vqp's softmax(logits / T)
    (``reference.gumbel_probabilities``, float64)."""
    metric, temperature, seed = fit
    z = torch.randn(4, 5, device=device)
    c = torch.randn(11, 5, device=device) * 0.8
    probs = R.gumbel_probabilities(f64(z), f64(c), temperature, metric)
    assert (probs.max(1) < 0.9).all() and (probs.max(1) > 2 * probs.min(1)).all(), "no spread of probabilities"
    p = chi_square_pvalue(draws(backend, z, c, 2500, temperature, seed, metric), probs)
    assert p > ALPHA, f"p-value {p}"


def test_the_goodness_of_fit_test_has_power(device):
    """The same test rejects those draws against a nearby wrong distribution (the temperature 30 % off),
    so passing it means something."""
    z = torch.randn(4, 5, device=device)
    c = torch.randn(11, 5, device=device) * 0.8
    idx = draws("torch", z, c, 2500, 1.0, 11)
    assert chi_square_pvalue(idx, R.gumbel_probabilities(f64(z), f64(c), 1.0)) > ALPHA
    assert chi_square_pvalue(idx, R.gumbel_probabilities(f64(z), f64(c), 1.3)) < ALPHA


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_codebook_follows_the_softmax(device, backend):
    """K = 333 (several code tiles; many codes of tiny probability, pooled), D = 37, one vector x 6000 draws."""
    z = torch.randn(1, 37, device=device)
    c = z + 0.35 * torch.randn(333, 37, device=device)
    probs = R.gumbel_probabilities(f64(z), f64(c), 0.5)
    assert probs.max() < 0.5
    assert chi_square_pvalue(draws(backend, z, c, 6000, 0.5, 99), probs) > ALPHA


# --- what a seed guarantees --------------------------------------------------------------------------------


def test_seed_reproduces_and_both_backends_draw_alike(device):
    """A seed gives the same draw each time and on both backends (the same noise bits; the scores' last
    bits may differ, so only rows whose two best float64 scores are closer than 1e-4 may disagree);
    another seed gives other draws."""
    n, k_codes, d, temperature = 3000, 97, 16, 0.7
    z = torch.randn(n, d, device=device)
    c = torch.randn(k_codes, d, device=device)
    a = vqt.sample_codes(z, c, temperature, 5, backend="triton")
    assert torch.equal(a, vqt.sample_codes(z, c, temperature, 5, backend="triton"))
    assert torch.equal(a, vqt.sample_codes(z, c, temperature, torch.tensor(5, device=device), backend="triton"))
    b = vqt.sample_codes(z, c, temperature, 5, backend="torch")
    score = R.sampling_logits(f64(z), f64(c)) / temperature + R.gumbel_noise(5, np.arange(n), np.arange(k_codes))
    top2 = np.sort(score, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    ref = score.argmax(1)
    assert clear.mean() > 0.99
    assert (a.cpu().numpy()[clear] == ref[clear]).all() and (b.cpu().numpy()[clear] == ref[clear]).all()
    other = vqt.sample_codes(z, c, temperature, 6, backend="triton")
    assert (other != a).float().mean() > 0.3


def test_noise_depends_on_row_and_code_only(device, monkeypatch):
    """Tiles, the split of the code axis and the number of rows do not change a row's draw: a prefix of
    the rows draws the same codes."""
    z = torch.randn(150, 24, device=device)
    c = torch.randn(70, 24, device=device)
    base = S.sample_fwd(z, c, 0.8, torch.tensor(3, device=device), split=1)
    for split in (2, 3):
        out = S.sample_fwd(z, c, 0.8, torch.tensor(3, device=device), split=split)
        assert all(torch.equal(x, y) for x, y in zip(base[:2], out[:2])), f"split {split}"
    monkeypatch.setattr(S._sample, "configs", [triton.Config({"BN": 16, "BK": 16, "BD": 16})])
    small = S.sample_fwd(z, c, 0.8, torch.tensor(3, device=device), split=1)
    assert torch.equal(base[0], small[0])
    prefix = S.sample_fwd(z[:37], c, 0.8, torch.tensor(3, device=device))
    assert torch.equal(prefix[0], base[0][:37])


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_temperature_gives_the_nearest_code(device, backend):
    z = torch.randn(400, 12, device=device)
    c = torch.randn(60, 12, device=device)
    d = np.sort(R.squared_distances(f64(z), f64(c)), axis=1)
    clear = np.sqrt(d[:, 1]) - np.sqrt(d[:, 0]) > 1e-3
    for metric in ("l2", "cosine"):
        idx = vqt.sample_codes(z, c, 1e-6, 1, metric=metric, backend=backend).cpu().numpy()
        want = vqt.assign(z, c, metric=metric).cpu().numpy()
        if metric == "l2":
            assert (idx[clear] == want[clear]).all() and clear.mean() > 0.9
        else:
            assert (idx == want).mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_returned_distances_and_shapes(device, backend):
    z = torch.randn(2, 3, 7, 9, device=device)
    c = torch.randn(17, 9, device=device)
    idx, dist = vqt.sample_codes(z, c, 2.0, 8, return_distance=True, backend=backend)
    assert idx.shape == dist.shape == (2, 3, 7) and idx.dtype == torch.int64 and dist.dtype == torch.float32
    d = R.squared_distances(f64(z), f64(c)).reshape(-1, 17)
    got = d[np.arange(42), idx.reshape(-1).cpu().numpy()]
    np.testing.assert_allclose(f64(dist).reshape(-1), got, rtol=1e-5)
    _, dcos = vqt.sample_codes(z, c, 2.0, 8, metric="cosine", return_distance=True, backend=backend)
    assert ((dcos >= 0) & (dcos <= 4 + 1e-5)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_and_codes(device, backend):
    z = torch.randn(30, 6, device=device)
    c = torch.randn(40, 6, device=device)
    c[3, 1], c[7, 0], c[9] = float("nan"), float("inf"), -float("inf")
    z[4, 2], z[5, 0], z[6] = float("nan"), float("inf"), -float("inf")
    idx, dist = vqt.sample_codes(z, c, 50.0, 4, return_distance=True, backend=backend)  # hot: every code likely
    assert idx[4] == -1 and torch.isnan(dist[4]) and idx[5] == -1 and dist[5] == float("inf") and idx[6] == -1
    ok = torch.ones(30, dtype=torch.bool, device=device)
    ok[4:7] = False
    assert torch.isfinite(c[idx[ok]]).all(), "a non-finite code was drawn"
    z2 = z.clone()
    z2[4:7] = 0.5
    assert torch.equal(vqt.sample_codes(z2, c, 50.0, 4, backend=backend)[ok], idx[ok]), "a bad row changed others"
    cn = torch.full_like(c, float("nan"))
    i2, d2 = vqt.sample_codes(z, cn, 1.0, 4, return_distance=True, backend=backend)
    assert (i2 == -1).all() and torch.isnan(d2).all()


# --- quantize with a temperature ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_with_temperature(device, backend, metric):
    """quantize(temperature=T, seed=s) draws sample_codes' codes; z_q, the losses and every gradient are
    quantize's for those codes (checked against the reference's analytic gradients)."""
    z = torch.randn(50, 6, device=device)
    c = torch.randn(13, 6, device=device)
    if metric == "cosine":
        z, c = F.normalize(z, dim=-1), F.normalize(c, dim=-1)  # the layer passes normalised vectors
    z.requires_grad_()
    c.requires_grad_()
    mask = torch.rand(50, device=device) > 0.2
    r = vqt.quantize(z, c, 0.3, temperature=0.9, seed=21, sample_metric=metric, mask=mask, backend=backend)
    want = vqt.sample_codes(z, c, 0.9, 21, metric=metric, backend=backend)
    assert torch.equal(r.indices, torch.where(mask, want, -1))
    assert (r.indices[mask] != vqt.assign(z, c)[mask]).any(), "T = 0.9 should move some codes off the nearest"
    keep = mask.cpu().numpy()
    i = r.indices.cpu().numpy()
    zq_ref = f64(c)[np.where(keep, i, 0)] * keep[:, None]
    np.testing.assert_array_equal(f64(r.z_q), np.where(keep[:, None], zq_ref, 0))
    sq = ((f64(z) - zq_ref) ** 2).sum(1) * keep
    np.testing.assert_allclose(r.codebook_loss.item(), sq.sum(), rtol=1e-5)
    g = torch.randn(50, 6, device=device)
    torch.autograd.backward([r.z_q, r.loss], [g, None])
    model = R.Model(lambda x: x, f64(c), lambda x: x)
    dz, dc = R.loss_grad(model, 0.3, f64(z)[keep], i[keep], f64(g)[keep])
    np.testing.assert_allclose(f64(z.grad)[keep], dz, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(c.grad), dc, rtol=1e-5, atol=1e-5)


def test_quantize_temperature_zero_is_unchanged(device):
    z = torch.randn(40, 5, device=device)
    c = torch.randn(9, 5, device=device)
    a = vqt.quantize(z, c)
    b = vqt.quantize(z, c, temperature=0.0, seed=3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.z_q, b.z_q) and torch.equal(a.loss, b.loss)


# --- arguments -------------------------------------------------------------------------------------------


def test_bad_arguments(device):
    z, c = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    for t, err, msg in ((0.0, ValueError, "temperature must be > 0, got 0.0"), (-1, ValueError, "> 0"),
                        (float("inf"), ValueError, "temperature must be > 0, got inf"),
                        (float("nan"), ValueError, "temperature"), ("1", TypeError, "temperature must be a real"),
                        (True, TypeError, "temperature must be a real number, got bool")):
        with pytest.raises(err, match=msg):
            vqt.sample_codes(z, c, t, 0)
    for seed, err, msg in ((1.5, TypeError, "seed must be an int, got float"), (None, TypeError, "seed must be an int"),
                           (2**63, ValueError, "seed must fit int64"), (-(2**63) - 1, ValueError, "int64"),
                           (torch.tensor(1.0), TypeError, "0-dim integer tensor, got a torch.float32 tensor"),
                           (torch.tensor([1, 2]), ValueError, r"seed must be a 0-dim tensor, got shape \(2,\)"),
                           (torch.tensor(True), TypeError, "torch.bool")):
        with pytest.raises(err, match=msg):
            vqt.sample_codes(z, c, 1.0, seed)
    with pytest.raises(ValueError, match="metric"):
        vqt.sample_codes(z, c, 1.0, 0, metric="dot")
    with pytest.raises(ValueError, match="seed is required when temperature > 0"):
        vqt.quantize(z, c, temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        vqt.quantize(z, c, temperature=-0.5, seed=1)
    with pytest.raises(ValueError, match="sample_metric"):
        vqt.quantize(z, c, temperature=1.0, seed=1, sample_metric="cos")
    with pytest.raises(ValueError, match="seed must be a 0-dim integer tensor"):
        S.sample_fwd(z, c, 1.0, 3)
    with pytest.raises(ValueError, match="temperature"):
        S.sample_fwd(z, c, 0.0, torch.tensor(3))


@pytest.mark.gpu
def test_gpu_draws_follow_the_softmax_and_match_the_torch_path():
    z = torch.randn(8, 64, device="cuda")
    c = torch.randn(1024, 64, device="cuda") * 0.15 + z[0]
    probs = R.gumbel_probabilities(f64(z), f64(c), 0.3)
    idx = draws("triton", z, c, 50000, 0.3, 7)
    assert chi_square_pvalue(idx, probs) > ALPHA
    zz = z.repeat_interleave(50000, 0)
    a = vqt.sample_codes(zz, c, 0.3, 7, backend="triton")
    b = vqt.sample_codes(zz, c, 0.3, 7, backend="torch")
    assert (a == b).float().mean() > 0.999
