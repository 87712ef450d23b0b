"""The FSQ and LFQ references against direct definitions: index orders against NumPy's mixed radix, the
factored entropy forms against the full 2^d softmax, and every analytic gradient against float64 finite
differences of the definitions."""

import numpy as np
import pytest

from vqtriton import reference as R

LEVEL_SETS = [([8, 5, 5, 5], False), ([8, 5, 5, 5], True), ([7, 2, 4], True), ([3, 6], False), ([2], True), ([5], False)]


def _fd(f, x, h=1e-6):
    """Central differences of a scalar function of an array."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


# --- FSQ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels, symmetric", LEVEL_SETS, ids=lambda v: str(v))
@pytest.mark.parametrize("hard_clamp", [False, True])
def test_fsq_levels_cover_every_code_and_index_orders_are_numpy_mixed_radix(levels, symmetric, hard_clamp):
    rng = np.random.default_rng(0)
    # Inputs across the whole range, with the extremes that reach the outermost levels.
    z = np.concatenate([rng.normal(size=(4000, len(levels))) * 3, np.full((1, len(levels)), 1e3),
                        np.full((1, len(levels)), -1e3)])
    k = R.fsq_levels(z, levels, symmetric=symmetric, hard_clamp=hard_clamp)
    assert k.min() >= 0 and (k.max(0) <= np.array(levels) - 1).all()
    for i, lv in enumerate(levels):
        assert set(k[:, i]) == set(range(lv)), f"channel {i}: not every level reached"
    idx = R.fsq_index(k, levels)
    assert np.array_equal(idx, np.ravel_multi_index(k.T, levels))  # first channel most significant
    vqp = R.fsq_index(k, levels, first_most_significant=False)
    assert np.array_equal(vqp, np.ravel_multi_index(k.T[::-1], levels[::-1]))  # first channel least significant
    for order in (True, False):
        back = R.fsq_levels_from_index(R.fsq_index(k, levels, first_most_significant=order), levels,
                                       first_most_significant=order)
        assert np.array_equal(back, k)
    codes, i2 = R.fsq_quantize(z, levels, symmetric=symmetric, hard_clamp=hard_clamp)
    assert np.array_equal(i2, idx)
    assert np.array_equal(codes, R.fsq_implicit_codebook(levels, symmetric=symmetric)[idx])


@pytest.mark.parametrize("levels, symmetric", LEVEL_SETS, ids=lambda v: str(v))
def test_fsq_codes_by_definition(levels, symmetric):
    lv = np.array(levels)
    book = R.fsq_implicit_codebook(levels, symmetric=symmetric)
    assert book.shape == (int(np.prod(lv)), len(levels)) and np.abs(book).max() == 1.0
    for i, L in enumerate(levels):
        values = np.unique(book[:, i])
        if symmetric:  # 2k / (L - 1) - 1: symmetric about 0, endpoints +-1
            assert np.allclose(values, np.linspace(-1, 1, L)) and np.allclose(values, -values[::-1])
        else:  # (k - floor(L/2)) / floor(L/2)
            assert np.allclose(values, (np.arange(L) - L // 2) / (L // 2))


@pytest.mark.parametrize("levels, symmetric", LEVEL_SETS, ids=lambda v: str(v))
@pytest.mark.parametrize("hard_clamp", [False, True])
def test_fsq_straight_through_gradient_is_the_bounds_derivative(levels, symmetric, hard_clamp):
    """The gradient is the derivative of the continuous bound (rounding held fixed), by finite differences."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(60, len(levels))) * 1.5
    z = z[(np.abs(np.abs(z) - 1) > 1e-3).all(1)]  # away from the hard clamp's kinks
    lv = np.array(levels, dtype=np.float64)

    def bound(t):
        if symmetric:
            squash = np.clip(t, -1, 1) if hard_clamp else np.tanh(t)
            return ((lv - 1) * (squash + 1) / 2 + 0.5) * 2 / (lv - 1) - 1  # the code before flooring
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = np.where(lv % 2 == 0, 0.5, 0.0)
        shift = offset / half_l if hard_clamp else np.arctanh(offset / half_l)
        squash = np.clip(t + shift, -1, 1) if hard_clamp else np.tanh(t + shift)
        return (squash * half_l - offset) / (lv // 2)

    h = 1e-6
    fd = (bound(z + h) - bound(z - h)) / (2 * h)
    assert np.allclose(R.fsq_quantize_grad(z, levels, symmetric=symmetric, hard_clamp=hard_clamp), fd, atol=1e-6)


def test_fsq_noise_and_its_gradient():
    rng = np.random.default_rng(2)
    codes = R.fsq_implicit_codebook([5, 5], symmetric=True)
    drop = rng.random(codes.shape) < 0.5
    offset = rng.random(codes.shape) - 0.5
    out = R.fsq_noise(codes, drop, offset)
    assert np.array_equal(out[~drop], codes[~drop])
    assert np.array_equal(out[drop], np.clip(codes + offset, -1, 1)[drop])
    assert np.array_equal(R.fsq_noise(codes, np.zeros_like(drop), offset), codes)
    g = R.fsq_noise_grad(codes, drop, offset)
    assert np.array_equal(g[~drop], np.ones((~drop).sum()))
    assert np.array_equal(g[drop], (np.abs(codes + offset) <= 1)[drop].astype(float))


def test_fsq_rejects_bad_levels():
    for bad in ([], [1, 3], [2, 3], [3.5]):
        with pytest.raises(ValueError):
            R.fsq_levels(np.zeros((1, max(len(bad), 1))), bad)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        R.fsq_levels(np.zeros((3, 3)), [3, 3])


# --- LFQ quantization -----------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 8])
@pytest.mark.parametrize("scale, spherical", [(1.0, False), (0.5, False), (1.0, True), (0.25, True)])
def test_lfq_codes_and_indices_by_definition(d, scale, spherical):
    rng = np.random.default_rng(d)
    x = rng.normal(size=(50, d))
    x[0] = 0.0  # zero is bit 0
    codes, idx = R.lfq_quantize(x, scale=scale, spherical=spherical)
    bits = (x > 0).astype(int)
    assert np.array_equal(idx, [int("".join(map(str, b)), 2) for b in bits])  # first channel most significant
    assert np.array_equal(R.lfq_bits_from_index(idx, d), bits)
    m = scale / np.sqrt(d) if spherical else scale
    assert np.allclose(codes, np.where(bits, m, -m))
    assert np.array_equal(R.lfq_codebook(d, scale=scale, spherical=spherical)[idx], codes)
    if spherical:
        assert np.allclose(np.linalg.norm(codes, axis=-1), scale)


def test_lfq_transform():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 6)) * 4
    rot = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    t = R.lfq_transform(x, soft_clamp=1.5)
    assert np.abs(t).max() < 1.5 and np.allclose(t, 1.5 * np.tanh(x / 1.5))
    t = R.lfq_transform(x, scale=0.5, spherical=True, soft_clamp=2.0, rotation=rot)
    assert np.allclose(np.linalg.norm(t, axis=-1), 0.5)
    direct = 2.0 * np.tanh(x / 2.0) @ rot
    assert np.allclose(t, 0.5 * direct / np.linalg.norm(direct, axis=-1, keepdims=True))


# --- LFQ entropies: the factored forms equal the definitions --------------------------------------


def _rows(d, n=23, spread=0.02, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) * spread


@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_code_probabilities_are_products_of_bit_sigmoids(d):
    x = _rows(d)
    tau, m = 100.0, 0.7
    p = R.lfq_code_probabilities(x, tau, m)
    u = R.lfq_bit_logits(x, tau, m)
    bits = R.lfq_bits_from_index(np.arange(2**d), d)
    q, q_bar = 1 / (1 + np.exp(-u)), 1 / (1 + np.exp(u))  # q_bar: not 1 - q, which cancels
    direct = np.prod(np.where(bits[None], q[:, None, :], q_bar[:, None, :]), -1)
    np.testing.assert_allclose(p, direct, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-13)


@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_per_sample_entropy_is_the_sum_of_binary_entropies(d):
    x = _rows(d)
    w = np.random.default_rng(4).random(x.shape[0])
    u = R.lfq_bit_logits(x, 100.0, 1.0)
    want = R.lfq_per_sample_entropy(x, 100.0, 1.0, weight=w)
    assert R.lfq_bit_entropy(u) @ (w / w.sum()) == pytest.approx(want, rel=1e-12)
    # And against -sum p log p written out.
    p = R.lfq_code_probabilities(x, 100.0, 1.0)
    assert (-(p * np.log(p)).sum(-1)) @ (w / w.sum()) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_batch_distribution_is_one_gemm_of_the_halves_for_every_split(d):
    x = _rows(d)
    w = np.random.default_rng(5).random(x.shape[0])
    u = R.lfq_bit_logits(x, 100.0, 1.0)
    full = (w / w.sum()) @ R.lfq_code_probabilities(x, 100.0, 1.0)
    for split in range(d + 1):
        a, b = R.lfq_half_distributions(u, split)
        assert a.shape == (x.shape[0], 2**split) and b.shape == (x.shape[0], 2 ** (d - split))
        np.testing.assert_allclose(R.lfq_batch_distribution(u, w, split), full, rtol=1e-12, atol=1e-17)
    assert R.distribution_entropy(full) == pytest.approx(R.lfq_batch_entropy(x, 100.0, 1.0, weight=w), rel=1e-13)


@pytest.mark.parametrize("d", [2, 5, 9])
@pytest.mark.parametrize("spread", [0.002, 0.01, 0.05])
def test_clamped_per_sample_entropy_on_the_grid_of_halves(d, spread):
    """vqp's clamp: -sum p log max(p, eps) = E_p[min(L, -log eps)], by the two halves' grid; it differs from
    the per-bit sum exactly when a code has p < eps."""
    eps = 1e-5
    x = _rows(d, spread=spread)
    u = R.lfq_bit_logits(x, 100.0, 1.0)
    p = R.lfq_code_probabilities(x, 100.0, 1.0)
    direct = -(p * np.log(np.maximum(p, eps))).sum(-1)
    for split in (0, d // 2, d):
        np.testing.assert_allclose(R.lfq_clamped_sample_entropy(u, eps, split), direct, rtol=1e-10, atol=1e-15)
    assert R.lfq_per_sample_entropy(x, 100.0, 1.0, eps) == pytest.approx(direct.mean(), rel=1e-12)
    clipped = (p < eps).any(-1)
    exact = R.lfq_bit_entropy(u)
    assert np.allclose(direct[~clipped], exact[~clipped], rtol=1e-12)
    assert (direct[clipped] < exact[clipped]).all()


def test_distribution_entropy_edges():
    assert R.distribution_entropy(np.array([1.0, 0.0, 0.0])) == 0.0
    assert R.distribution_entropy(np.full(8, 1 / 8)) == pytest.approx(np.log(8))
    p = np.array([0.5, 0.5 - 1e-7, 1e-7])
    assert R.distribution_entropy(p, 1e-5) == pytest.approx(-(0.5 * np.log(0.5) + (0.5 - 1e-7) * np.log(0.5 - 1e-7)
                                                              + 1e-7 * np.log(1e-5)))


# --- analytic gradients against finite differences ------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 6])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_entropy_gradients_against_finite_differences(d, eps):
    x = _rows(d, n=7, spread=0.01, seed=d)
    w = np.random.default_rng(6).random(7)
    tau, m = 100.0, 1.0
    for value, grad in ((R.lfq_per_sample_entropy, R.lfq_per_sample_entropy_grad),
                        (R.lfq_batch_entropy, R.lfq_batch_entropy_grad)):
        fd = _fd(lambda t: value(t, tau, m, eps, w), x)
        np.testing.assert_allclose(grad(x, tau, m, eps, w), fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


def test_commitment_and_loss():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 4))
    codes, _ = R.lfq_quantize(x)
    keep = rng.random(9) > 0.4
    fd = _fd(lambda t: R.lfq_commitment(t, codes, keep), x)
    np.testing.assert_allclose(R.lfq_commitment_grad(x, codes, keep), fd, atol=1e-7)
    assert R.lfq_commitment(x, codes, keep) == pytest.approx(np.square(x - codes)[keep].mean())
    assert R.lfq_commitment(x, codes, np.zeros(9)) == 0.0
    assert R.lfq_loss(0.3, 2.0, 0.5, entropy_weight=0.1, diversity_gamma=0.5, commitment_weight=0.25) == pytest.approx(
        0.1 * (0.3 - 1.0) + 0.25 * 0.5)
    assert R.lfq_loss(0.3, 2.0, 0.0, softplus_offset=5.0) == pytest.approx(0.1 * np.log1p(np.exp(0.3 - 2.0 + 5.0)))


@pytest.mark.parametrize("d", [1, 4, 7])
def test_factored_gradients_equal_the_definitions(d):
    x = _rows(d, n=11, spread=0.01, seed=10 + d)
    w = np.random.default_rng(8).random(11)
    tau, m = 100.0, 0.5
    u = R.lfq_bit_logits(x, tau, m)
    c = 4 * tau * m
    wn = w / w.sum()
    # Per-sample, exact: the per-bit derivative.
    np.testing.assert_allclose(R.lfq_bit_entropy_grad(u) * wn[:, None] * c,
                               R.lfq_per_sample_entropy_grad(x, tau, m, None, w), rtol=1e-9, atol=1e-12)
    # Per-sample, clamped: the grid form.
    np.testing.assert_allclose(R.lfq_clamped_sample_entropy_grad(u, 1e-5) * wn[:, None] * c,
                               R.lfq_per_sample_entropy_grad(x, tau, m, 1e-5, w), rtol=1e-9, atol=1e-12)
    # Batch: the two GEMMs of the halves, for each clamp.
    mean = R.lfq_batch_distribution(u, w)
    for eps in (None, 1e-5):
        g = -np.log(mean) - 1 if eps is None else -np.log(np.maximum(mean, eps)) - (mean >= eps)
        np.testing.assert_allclose(R.lfq_batch_distribution_grad(u, g, w) * c,
                                   R.lfq_batch_entropy_grad(x, tau, m, eps, w), rtol=1e-8, atol=1e-12)


def test_weights_must_be_non_negative_rows():
    x = _rows(3, n=4)
    with pytest.raises(ValueError, match="weight"):
        R.lfq_per_sample_entropy(x, 100.0, 1.0, weight=np.ones(3))
    with pytest.raises(ValueError, match="weight"):
        R.lfq_batch_entropy(x, 100.0, 1.0, weight=-np.ones(4))
    assert R.lfq_per_sample_entropy(x, 100.0, 1.0, weight=np.zeros(4)) == 0.0


@pytest.mark.parametrize("d", [12])
def test_larger_d_factored_forms_match(d):
    """d = 12: 4096 codes, still small enough for the definitions."""
    x = _rows(d, n=6, spread=0.003, seed=99)
    u = R.lfq_bit_logits(x, 100.0, 1.0)
    p = R.lfq_code_probabilities(x, 100.0, 1.0)
    np.testing.assert_allclose(R.lfq_batch_distribution(u), p.mean(0), rtol=1e-11, atol=1e-18)
    np.testing.assert_allclose(R.lfq_bit_entropy(u), -(p * np.log(p)).sum(-1), rtol=1e-11)
