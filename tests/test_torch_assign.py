"""The torch path's candidate search (``torch_ops.assign_fwd``) against the float64 reference.

For float32 / float16 / bfloat16 inputs the search runs in float32 with a rigorous error bound, hands the
rows that bound cannot serve (overflow, underflow, NaN / Inf) to a float64 search, and ranks every row's
candidates in the float64 direct form: the answer must be the reference's (``nearest_code``: the float64
argmin of the direct-form distances, lowest index on ties) on every kind of data that could fool a float32
search: shared offsets, near-ties at every scale down to float64's noise, exact ties, huge and tiny
magnitudes, distances past float32's range, and mixtures of these in one batch (and one chunk or several).
"""

import numpy as np
import pytest
import torch

import vqtriton as vqt
from vqtriton import reference as R
from vqtriton import torch_ops
from helpers import f64, shape_id


def reference(z: torch.Tensor, c: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Indices (-1 where no distance is finite in float32) and float64 distances to them."""
    zz, cc = f64(z).reshape(-1, z.shape[-1]), f64(c)
    with np.errstate(invalid="ignore", over="ignore"):
        d = ((zz[:, None, :] - cc[None, :, :]) ** 2).sum(-1)
    d = np.where(np.isnan(d), np.inf, d)
    idx = np.argmin(d, axis=1)
    best = d[np.arange(len(idx)), idx]
    with np.errstate(over="ignore"):
        idx = np.where(best.astype(np.float32) < np.inf, idx, -1)
    return idx, best


def check(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``assign_fwd`` (and ``vqt.assign`` on the torch backend) equal the reference: indices exactly, the
    distance as the float64 direct form rounded once to float32 (+-1 ulp: NumPy and torch sum in different
    orders), z_q the chosen codes bit for bit."""
    want, want_d = reference(z, c)
    idx, dist, z_q = torch_ops.assign_fwd(z, c, return_zq=True)
    got = idx.numpy()
    bad = np.flatnonzero(got != want)
    assert not bad.size, f"{bad.size} rows differ, first {bad[:5]}: got {got[bad[:5]]}, want {want[bad[:5]]}"
    ok = want >= 0
    out = np.float64 if dist.dtype == torch.float64 else np.float32
    np.testing.assert_array_max_ulp(dist.numpy()[ok], want_d[ok].astype(out), maxulp=1 if out == np.float32 else 64)
    assert torch.equal(z_q, torch.where(idx.unsqueeze(1) >= 0, c[idx.clamp_min(0)], 0))
    assert torch.equal(vqt.assign(z, c, backend="torch"), idx)
    return idx


@pytest.fixture
def stages(monkeypatch):
    """The working dtypes the search ran in (one entry per call of ``_candidates``)."""
    seen = []
    run = torch_ops._candidates

    def spy(z, book):
        seen.append(book.codes.dtype)
        return run(z, book)

    monkeypatch.setattr(torch_ops, "_candidates", spy)
    return seen


SHAPES = [(64, 256, 32), (1000, 333, 47), (37, 1025, 3), (5000, 7, 1), (129, 2, 300), (257, 64, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gaussian_data_is_settled_in_float32(shape, stages):
    n, k, d = shape
    z, c = torch.randn(n, d), torch.randn(k, d)
    check(z, c)
    assert set(stages) == {torch.float32}, "float32 rows whose bound holds need no float64 search"


@pytest.mark.parametrize("offset", [1e2, 1e4, -3e5], ids=lambda o: f"offset{o:g}")
@pytest.mark.parametrize("spread", [1.0, 1e-2], ids=lambda s: f"spread{s:g}")
def test_shared_offsets(offset, spread):
    """Vectors around a large common offset: the expanded form without centring loses the answer."""
    d = 24
    c = offset + spread * torch.randn(300, d)
    z = offset + spread * torch.randn(700, d)
    check(z, c)


@pytest.mark.parametrize("rel", [2.0**-e for e in (8, 14, 20, 26, 32, 40)], ids=lambda r: f"2^{np.log2(r):.0f}")
def test_near_ties_at_every_scale(rel):
    """Each row is nearly equidistant from two codes, by a relative margin from far above float32's
    rounding to far below it (where only the float64 ranking can tell them apart)."""
    g = torch.Generator().manual_seed(int(-np.log2(rel)))
    d, k, n = 40, 200, 600
    c64 = torch.randn(k, d, generator=g, dtype=torch.float64) * 3
    a, b = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    b = torch.where(a == b, (b + 1) % k, b)
    t = 0.5 + rel * torch.randn(n, 1, generator=g, dtype=torch.float64)
    z = (c64[a] * (1 - t) + c64[b] * t).float()
    check(z, c64.float())


def test_exact_ties_take_the_lowest_index():
    """Duplicate codes, and vectors exactly halfway between two codes on small-integer data."""
    base = torch.randint(-8, 9, (50, 12)).float()
    c = torch.cat([base, base[:20], base[5:30]])  # every code of base[5:20] three times
    z = torch.cat([base[torch.randint(0, 50, (400,))], (base[:40] + base[10:50]) / 2])
    idx = check(z, c)
    assert (idx < 50).all()


@pytest.mark.parametrize("scale", [1e18, 4e18, 1e19, 1e30, 3e37], ids=lambda s: f"{s:g}")
def test_huge_magnitudes(scale, stages):
    """Squared norms past float32's safe range go to the float64 search (and past its range the
    distance is Inf: index -1)."""
    c = torch.randn(70, 20, dtype=torch.float64) * scale
    z = c[torch.randint(0, 70, (300,))] + torch.randn(300, 20, dtype=torch.float64) * scale * 0.3
    check(z.float(), c.float())
    assert torch.float64 in stages


@pytest.mark.parametrize("scale", [1e-15, 1e-21, 1e-30, 1e-40, 2.0**-140], ids=lambda s: f"{s:g}")
def test_tiny_magnitudes(scale):
    """Squares below float32's normal range lose relative precision: those rows go to float64, where
    subnormal float32 inputs are exact."""
    c = (torch.randn(60, 16, dtype=torch.float64) * scale).float()
    z = (torch.randn(500, 16, dtype=torch.float64) * scale).float()
    check(z, c)


def test_one_huge_code_sends_every_row_to_float64(stages):
    """A finite code whose float32 squared norm overflows bounds no float32 row."""
    c = torch.randn(100, 16)
    c[17] = 1e25
    z = torch.randn(400, 16)
    z[:5] = c[17]
    idx = check(z, c)
    assert stages == [torch.float32, torch.float64] * 2 and (idx[:5] == 17).all()  # assign_fwd, then vqt.assign


def test_distances_past_float32_range_get_no_code():
    c = torch.randn(50, 8) * 1e19
    z = torch.cat([c + 1, torch.full((3, 8), 3e38), torch.full((3, 8), -3e38)])
    z = torch.cat([z, torch.randn(200, 8) * 1e19])
    idx = check(z, c)
    assert (idx[50:56] == -1).all()


def test_nonfinite_rows_and_codes():
    c = torch.randn(80, 10)
    c[3], c[40, 2], c[41, 0] = float("nan"), float("inf"), -float("inf")
    z = torch.randn(300, 10)
    z[7], z[8, 1], z[9, 4] = float("nan"), float("inf"), -float("inf")
    idx, dist, _ = torch_ops.assign_fwd(z, c)
    assert idx[7:10].tolist() == [-1, -1, -1] and dist[7].isnan() and dist[8:10].isinf().all()
    keep = torch.ones(300, dtype=torch.bool)
    keep[7:10] = False
    assert not bool(((idx[keep] == 3) | (idx[keep] == 40) | (idx[keep] == 41)).any())
    check(z[keep], c)


def test_nonfinite_rows_rank_no_code(monkeypatch):
    """A row holding a NaN or Inf has no finite distance: it gets -1 without a direct-form ranking of every
    code (a batch padded with NaN would otherwise cost N K D)."""
    ranked = []
    pairs = torch_ops._pair_distances
    monkeypatch.setattr(torch_ops, "_pair_distances",
                        lambda zc, c, r, k: ranked.append(r.numel()) or pairs(zc, c, r, k))
    z = torch.randn(500, 16)
    z[::2, 3] = float("nan")
    z[1::4, 0] = float("inf")
    idx, _, _ = torch_ops.assign_fwd(z, torch.randn(300, 16))
    assert (idx[::2] == -1).all() and (idx[1::4] == -1).all() and (idx[3::4] >= 0).all()
    assert sum(ranked) < 50 * 2, "only near-tied finite rows are ranked"


@pytest.mark.parametrize("chunk", [1 << 22, 1 << 11], ids=["one-chunk", "chunks"])
def test_mixed_rows_in_one_batch(chunk, monkeypatch):
    """Gaussian, huge, tiny, near-tied and non-finite rows side by side: each stage serves its own rows
    and the answers are put back in place (in one chunk, and across chunks of 8 rows)."""
    monkeypatch.setattr(torch_ops, "_CHUNK_ELEMS", chunk)
    d = 12
    c = torch.randn(256, d) * 2
    parts = [
        torch.randn(100, d),
        torch.randn(30, d) * 1e19,
        (torch.randn(30, d, dtype=torch.float64) * 1e-25).float(),
        ((c[:40].double() + c[40:80].double()) / 2 + 1e-9 * torch.randn(40, d, dtype=torch.float64)).float(),
        torch.full((5, d), float("nan")),
        torch.randn(100, d) + 5,
    ]
    z = torch.cat(parts)[torch.randperm(305)]
    want, _ = reference(z, c)
    idx, _, _ = torch_ops.assign_fwd(z, c)
    assert np.array_equal(idx.numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs(dtype, stages):
    z, c = torch.randn(400, 33).to(dtype), torch.randn(150, 33).to(dtype)
    check(z, c)
    assert set(stages) == {torch.float32}


def test_float64_inputs_search_in_float64(stages):
    z, c = torch.randn(300, 20, dtype=torch.float64), torch.randn(100, 20, dtype=torch.float64)
    check(z, c)
    assert set(stages) == {torch.float64}


def test_float64_rows_past_float64_range_rank_every_code():
    """Where even the float64 expanded form could overflow, every code is ranked in the direct form."""
    c = torch.randn(40, 6, dtype=torch.float64) * 1e155
    z = c[torch.randint(0, 40, (200,))] * (1 + 1e-3 * torch.randn(200, 1, dtype=torch.float64))
    with np.errstate(over="ignore"):  # the reference's squares of the far codes overflow (to +Inf: never nearest)
        want = R.nearest_code(f64(z), f64(c))
    idx, dist, _ = torch_ops.assign_fwd(z, c)
    assert np.array_equal(idx.numpy(), want) and torch.isfinite(dist).all()


def test_reduced_precision_gemm_is_not_trusted(monkeypatch, stages):
    """With float32 GEMMs allowed to run in bf16 / TF32 the float32 bound would not hold: float64 only."""
    old = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        check(torch.randn(200, 16), torch.randn(90, 16))
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old
    assert set(stages) == {torch.float64}


def test_window_is_a_bound_on_the_float32_error():
    """The float32 expanded form's error never exceeds half the window (float64 truth), on data built to
    make it large: long vectors, a shared offset of the same order as the spread, codes of mixed norms."""
    g = torch.Generator().manual_seed(0)
    for d in (1, 7, 64, 512):
        c = torch.randn(300, d, generator=g) * torch.logspace(-3, 3, 300).unsqueeze(1) + 10
        z = torch.randn(200, d, generator=g) * 100 + 10
        book = torch_ops._centred(c, torch.float32)
        zc = z - book.mean
        approx = torch.addmm(book.sq, zc, book.codes.T, alpha=-2.0).double()
        truth = ((z.double()[:, None] - c.double()[None]) ** 2).sum(-1) - (zc.double() ** 2).sum(-1, keepdim=True)
        st = (zc.square().sum(-1) + book.sq_max).double()
        half = 2.0 * torch_ops._gamma(3 * d + 8, 2.0**-24) * st
        assert ((approx - truth).abs() <= half.unsqueeze(1)).all()


def test_cuda_fp32_matmul_sets_and_restores_the_new_api():
    """After a user set TF32 through torch's new API, reading the legacy ``allow_tf32`` raises (torch >= 2.9):
    the helper the LFQ GEMM and the benchmarks use goes through ``fp32_precision`` and restores it."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with torch_ops.cuda_fp32_matmul(tf32=False):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with torch_ops.cuda_fp32_matmul(tf32=True):
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = old
