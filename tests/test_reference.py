"""The NumPy reference against the spec: its two theorems, its gradients, its tie rule, batching."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqtriton import reference as R


def random_model(rng, obs, latent, num_codes, lead=()):
    """A model with affine encoder/decoder (so finite differences are exact up to rounding)."""
    we, be = rng.normal(size=(obs, latent)), rng.normal(size=latent)
    wd, bd = rng.normal(size=(latent, obs)), rng.normal(size=obs)
    model = R.Model(lambda x: x @ we + be, rng.normal(size=(num_codes, latent)), lambda z: z @ wd + bd)
    return model, (we, be, wd, bd)


shapes = st.tuples(
    st.integers(1, 7),  # obs
    st.integers(1, 6),  # latent D
    st.integers(1, 9),  # num codes K
    st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple),  # leading dims of a batch
    st.integers(0, 2**32 - 1),  # seed
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shapes, st.floats(0.0, 4.0))
def test_theorem_loss_decomposes(shape, beta):
    """loss model beta x idx = reconstruction + codebook + beta * commitment (spec theorem)."""
    obs, latent, k, lead, seed = shape
    rng = np.random.default_rng(seed)
    model, _ = random_model(rng, obs, latent, k)
    x = rng.normal(size=lead + (obs,))
    idx = rng.integers(0, k, size=lead)
    total = R.loss(model, beta, x, idx)
    parts = (
        R.reconstruction_loss(model, x, idx)
        + R.codebook_loss(model, x, idx)
        + beta * R.commitment_loss(model, x, idx)
    )
    assert total == pytest.approx(parts, rel=1e-12, abs=1e-12)
    # And against a direct computation of each term from the model's pieces.
    z_e, z_q = model.encoder(x), model.codebook[idx]
    direct = np.sum((model.decoder(z_q) - x) ** 2) + (1 + beta) * np.sum((z_q - z_e) ** 2)
    assert total == pytest.approx(direct, rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shapes)
def test_theorem_quantized_is_embedding(shape):
    """quantized model idx = model.codebook.embedding idx (spec theorem), scalar and batched idx."""
    obs, latent, k, lead, seed = shape
    rng = np.random.default_rng(seed)
    model, _ = random_model(rng, obs, latent, k)
    i = int(rng.integers(0, k))
    assert np.array_equal(R.quantized(model, i), model.codebook[i])
    idx = rng.integers(0, k, size=lead)
    q = R.quantized(model, idx)
    assert q.shape == lead + (latent,)
    for pos in np.ndindex(*lead):
        assert np.array_equal(q[pos], model.codebook[idx[pos]])
    x = rng.normal(size=lead + (obs,))
    assert np.array_equal(R.forward(model, x, idx), model.decoder(model.codebook[idx]))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(shapes, st.floats(0.0, 2.0))
def test_batched_equals_sum_of_single_vectors(shape, beta):
    obs, latent, k, lead, seed = shape
    rng = np.random.default_rng(seed)
    model, _ = random_model(rng, obs, latent, k)
    lead = lead or (3,)
    x = rng.normal(size=lead + (obs,))
    idx = rng.integers(0, k, size=lead)
    for fn in (R.reconstruction_loss, R.codebook_loss, R.commitment_loss):
        single = sum(fn(model, x[p], int(idx[p])) for p in np.ndindex(*lead))
        assert fn(model, x, idx) == pytest.approx(single, rel=1e-12, abs=1e-12)
    single = sum(R.loss(model, beta, x[p], int(idx[p])) for p in np.ndindex(*lead))
    assert R.loss(model, beta, x, idx) == pytest.approx(single, rel=1e-12, abs=1e-12)


def central_difference(f, a, h=1e-6):
    a = a.astype(np.float64).copy()
    g = np.zeros_like(a)
    for i in np.ndindex(*a.shape):
        old = a[i]
        a[i] = old + h
        up = f(a)
        a[i] = old - h
        down = f(a)
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (5, 3, 4), (9, 7, 2)], ids=lambda v: str(v))
def test_gradients_match_finite_differences(n, k, d):
    rng = np.random.default_rng(n * 100 + k * 10 + d)
    obs = 3
    model, _ = random_model(rng, obs, d, k)
    x = rng.normal(size=(n, obs))
    idx = rng.integers(0, k, size=n)
    z_e = model.encoder(x)

    def with_codebook(c):
        return R.Model(model.encoder, c, model.decoder)

    def with_latents(z):
        return R.Model(lambda _x: z, model.codebook, model.decoder)

    # codebook term: the gradient reaches the codebook (its true derivative) and not z_e (sg).
    dz, dc = R.codebook_loss_grad(model, x, idx)
    assert np.array_equal(dz, np.zeros_like(z_e))
    num = central_difference(lambda c: R.codebook_loss(with_codebook(c), x, idx), model.codebook)
    np.testing.assert_allclose(dc, num, rtol=1e-6, atol=1e-6)
    # commitment term: the gradient reaches z_e (its true derivative) and not the codebook (sg).
    dz, dc = R.commitment_loss_grad(model, x, idx)
    assert np.array_equal(dc, np.zeros_like(model.codebook))
    num = central_difference(lambda z: R.commitment_loss(with_latents(z), x, idx), z_e)
    np.testing.assert_allclose(dz, num, rtol=1e-6, atol=1e-6)
    # reconstruction term, with respect to the decoder output.
    out = R.forward(model, x, idx)
    g = R.reconstruction_loss_grad(model, x, idx)
    num = central_difference(lambda o: float(np.sum((o - x) ** 2)), out)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-6)


def test_loss_grad_combines_terms_with_straight_through():
    rng = np.random.default_rng(0)
    model, (_, _, wd, _) = random_model(rng, 4, 3, 5)
    x = rng.normal(size=(6, 4))
    idx = rng.integers(0, 5, size=6)
    beta = 0.37
    # Straight-through: the gradient of the reconstruction term with respect to z_q reaches z_e.
    g_dec_in = R.reconstruction_loss_grad(model, x, idx) @ wd.T
    num = central_difference(
        lambda zq: float(np.sum((model.decoder(zq) - x) ** 2)), R.quantized(model, idx)
    )
    np.testing.assert_allclose(g_dec_in, num, rtol=1e-6, atol=1e-6)
    dz, dc = R.loss_grad(model, beta, x, idx, g_dec_in)
    z_e, z_q = R.encode(model, x), R.quantized(model, idx)
    np.testing.assert_allclose(dz, g_dec_in + beta * 2 * (z_e - z_q), rtol=1e-12)
    expected = np.zeros_like(model.codebook)
    np.add.at(expected, idx, 2 * (z_q - z_e))
    np.testing.assert_allclose(dc, expected, rtol=1e-12)


def test_nearest_code_lowest_index_on_ties():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(4, 3))
    codebook = np.concatenate([c, c, c])  # codes k, k+4, k+8 are identical
    z = codebook[[8, 5, 2, 11]]  # each vector equals a code that has duplicates
    assert list(R.nearest_code(z, codebook)) == [0, 1, 2, 3]
    # Equidistant from two distinct codes: the lower index wins.
    codebook = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]])
    assert R.nearest_code(np.zeros(2), codebook) == 0
    assert R.nearest_code(np.zeros((2, 2)), codebook[[1, 0, 2]]).tolist() == [0, 0]


def test_nearest_code_is_argmin_of_direct_distances_any_leading_dims():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2, 3, 5))
    codebook = rng.normal(size=(7, 5))
    idx = R.nearest_code(z, codebook)
    assert idx.shape == (2, 3) and idx.dtype == np.int64
    for p in np.ndindex(2, 3):
        d = [np.sum((z[p] - c) ** 2) for c in codebook]
        assert idx[p] == int(np.argmin(d))
    # cosine: the nearest code by angle, whatever the codes' lengths.
    scaled = codebook * rng.uniform(0.1, 10.0, size=(7, 1))
    cos = (z @ scaled.T) / np.linalg.norm(z, axis=-1, keepdims=True) / np.linalg.norm(scaled, axis=-1)
    assert np.array_equal(R.nearest_code(z, scaled, metric="cosine"), np.argmax(cos, axis=-1))


def test_reference_rejects_bad_input():
    model = R.Model(lambda x: x, np.zeros((3, 2)), lambda z: z)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        R.quantized(model, 3)
    with pytest.raises(IndexError):
        R.quantized(model, np.array([0, -1]))
    with pytest.raises(TypeError, match="integer"):
        R.quantized(model, 1.0)
    with pytest.raises(ValueError, match="codebook"):
        R.Model(lambda x: x, np.zeros(3), lambda z: z)
    with pytest.raises(ValueError, match="metric"):
        R.nearest_code(np.zeros((1, 2)), np.zeros((3, 2)), metric="dot")
    with pytest.raises(ValueError, match="share D"):
        R.nearest_code(np.zeros((1, 3)), np.zeros((3, 2)))


def test_reference_imports_numpy_only():
    """The reference stands alone: importing the package from its folder (without vqtriton) pulls in
    neither torch nor triton."""
    import os
    import subprocess
    import sys

    folder = os.path.dirname(os.path.dirname(R.__file__))  # vqtriton/, holding reference/
    src = (
        "import sys\n"
        f"sys.path.insert(0, {folder!r})\n"
        "import reference\n"
        "assert reference.__all__ and all(hasattr(reference, n) for n in reference.__all__)\n"
        "bad = [m for m in ('torch', 'triton', 'vqtriton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", src], check=True)
