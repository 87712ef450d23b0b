"""Top-k assignment (``vqtriton.kernels.topk.topk_fwd``, ``torch_ops.topk_fwd``, ``vqtriton.assign(k=...)``)
against the NumPy float64 reference (``reference.nearest_codes``).

On a machine without CUDA the kernel runs through Triton's interpreter (see conftest.py) with its
single config; ``test_small_blocks`` also runs GPU-sized tiles there (many code tiles, several merge
rounds per tile).
"""

import numpy as np
import pytest
import torch
import triton

import vqtriton as vqt
from vqtriton import reference as R
from vqtriton import torch_ops
from vqtriton.kernels import assign as A
from vqtriton.kernels import topk as T
from helpers import f64, poison as poison_modules, shape_id
from test_kernel_assign import U_DOT, low_precision_bound

# (N, K, D, k): awkward shapes, k = K, k = 1, k on both sides of the state sizes (4, 16, 64).
CASES = [(300, 97, 37, 5), (1, 1, 1, 1), (7, 5, 3, 5), (40, 200, 1, 4), (50, 70, 300, 17), (0, 5, 4, 2),
         (64, 80, 6, 64), (33, 19, 8, 16)]
PRECISIONS = ["exact", "tf32", "bf16"]
BACKENDS = ["triton", "torch"]
EXACT = 1 + 2**-16


def case_id(c):
    return shape_id(c[:3]) + f"-k{c[3]}"


def first(rows, *cols):
    rows = np.asarray(rows).reshape(-1)[:5]
    return [(int(r), *(np.asarray(c)[r].tolist() for c in cols)) for r in rows]


def run(backend, z, c, k, **kw):
    return (T.topk_fwd if backend == "triton" else torch_ops.topk_fwd)(z, c, k, **kw)


def check_topk(z, c, idx, dist, k, same_index=True):
    """The contract position by position, dist the direct distance, and (optionally) the reference order."""
    n = z.shape[0]
    assert idx.dtype == torch.int64 and idx.shape == (n, k)
    assert dist.dtype == torch.float32 and dist.shape == (n, k)
    if n == 0:
        return
    d = R.squared_distances(f64(z), f64(c))
    i = idx.cpu().numpy()
    assert ((i >= 0) & (i < c.shape[0])).all(), f"indices out of range: {first(np.nonzero((i < 0).any(1))[0], i)}"
    assert (np.sort(i, axis=1)[:, 1:] != np.sort(i, axis=1)[:, :-1]).all(), "a code returned twice in a row"
    got = np.take_along_axis(d, i, axis=1)
    want = np.sort(d, axis=1)[:, :k]  # the true j-th smallest distances
    bad = np.nonzero((got > want * EXACT).any(1) | (got < want / EXACT).any(1))[0]
    assert bad.size == 0, f"contract (row, got, want): {first(bad, got, want)}"
    if same_index:
        ref = R.nearest_codes(f64(z), f64(c), k)
        bad = np.nonzero((i != ref).any(1))[0]
        assert bad.size == 0, f"first mismatches (row, got, want): {first(bad, i, ref)}"
    dd = f64(dist)
    bad = np.nonzero((np.abs(dd - got) > 1e-5 * got + 1e-12).any(1))[0]
    assert bad.size == 0, f"dist is not the direct distance (row, got, want): {first(bad, dd, got)}"


# --- exact mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_exact_matches_reference(device, backend, case):
    n, k_codes, d, k = case
    z = torch.randn(n, d, device=device)
    c = torch.randn(k_codes, d, device=device)
    idx, dist = run(backend, z, c, k)
    check_topk(z, c, idx, dist, k)


@pytest.mark.parametrize("kind", ["offset", "near-ties"])
def test_exact_contract_on_hard_data(device, kind):
    n, k_codes, d, k = 200, 64, 24, 6
    c = torch.randn(k_codes, d, device=device)
    if kind == "near-ties":
        # Points near midpoints of code pairs: the pair's two distances agree to 1e-3 .. 1e-8.
        a, b = torch.randint(0, k_codes, (2, n), device=device)
        z = (c[a] + c[b]) / 2 + torch.logspace(-3, -8, n, device=device)[:, None] * (c[b] - c[a])
    else:
        z, c = torch.randn(n, d, device=device) + 100, c + 100  # the expanded form alone loses these
    for backend in BACKENDS:
        idx, dist = run(backend, z, c, k)
        check_topk(z, c, idx, dist, k, same_index=kind == "offset")


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_go_to_the_lowest_index(device, backend, split):
    # Small integers: every distance is an exact integer in fp32, so ties are exact ties.
    k_codes, d, k = 150, 5, 7
    c = torch.randint(-2, 3, (k_codes, d), device=device).float()
    c[120], c[121], c[90] = c[5], c[5], c[5]  # four copies of code 5 in different tiles and split runs
    z = torch.randint(-2, 3, (200, d), device=device).float()
    z[0] = c[5]
    kw = {"split": split} if backend == "triton" else {}
    idx, dist = run(backend, z, c, k, **kw)
    check_topk(z, c, idx, dist, k)
    copies = torch.nonzero((c == c[5]).all(1))[:, 0].tolist()  # 5, 90, 120, 121 (and any chance equals)
    assert idx[0, : len(copies)].tolist() == copies[:k] and (dist[0, : len(copies)] == 0).all()
    d64 = R.squared_distances(f64(z), f64(c))
    kth = np.sort(d64, axis=1)[:, k - 1]
    assert ((d64 == kth[:, None]).sum(1) > 1).sum() > 100, "the data should be full of ties at the k-th distance"


def test_certified_search_equals_the_direct_search(device, monkeypatch):
    """Both exact searches give the same codes; the bound certifies most N(0, 1) rows and never a row
    whose k-th and (k+1)-th codes tie."""
    n, k_codes, d, k = 400, 97, 37, 5
    z = torch.randn(n, d, device=device)
    c = torch.randn(k_codes, d, device=device)
    c[60:70] = c[:10]  # duplicates
    z[:100] = c[torch.randint(0, 10, (100,), device=device)] + 1e-3 * torch.randn(100, d, device=device)
    for split in (1, 3):
        idx = torch.empty(n, k, dtype=torch.int64, device=device)
        dist = torch.empty(n, k, dtype=torch.float32, device=device)
        listed = int(T._topk_launch(z, c, k, idx, dist, A._CERTIFY, split))
        direct = torch.empty_like(idx), torch.empty_like(dist)
        assert T._topk_launch(z, c, k, *direct, 0, split) is None
        assert torch.equal(idx, direct[0]), f"rows {torch.nonzero((idx != direct[0]).any(1))[:5, 0].tolist()}"
        np.testing.assert_allclose(f64(dist), f64(direct[1]), rtol=2e-6)
        check_topk(z, c, idx, dist, k)
        # Rows 0-99 sit by a code and its duplicate, which are both in the top k: certifiable. Only the
        # rows whose k-th and (k+1)-th distances are within the bound may be listed.
        d64 = np.sort(R.squared_distances(f64(z), f64(c)), axis=1)
        tight = int((d64[:, k] - d64[:, k - 1] < 1e-3 * d64[:, k]).sum())
        assert listed <= tight + n // 20, f"{listed} rows listed, {tight} tight ones"
    monkeypatch.setattr(A, "_CERTIFIED_SEARCH", False)
    plain = T.topk_fwd(z, c, k)
    assert torch.equal(plain[0], idx)


def test_certified_search_lists_the_tied_rows(device):
    """A row whose k-th and (k+1)-th codes are exact duplicates is never certified; it is finished by
    the direct-form search with the lowest index first. Ties inside the top k do not stop a row."""
    k_codes, d, k = 40, 12, 3
    c = torch.randn(k_codes, d, device=device) * 3
    step = torch.zeros(d, device=device)
    step[0] = 0.5
    c[39] = c[20]  # rows at c[20]: 20 and 39 at distance 0 (ranks 1-2) ...
    c[37] = c[38] = c[20] + step  # ... 37 and 38 tie for ranks 3-4 (0.25): k = 3 cuts between them
    c[10] = c[20] - 2 * step  # rows at c[10] + step: 37 and 38 tie at the top, 20 and 39 tie next (ranks 3-4)
    z = torch.randn(64, d, device=device) * 3
    z[:8] = c[20]
    idx = torch.empty(64, k, dtype=torch.int64, device=device)
    dist = torch.empty(64, k, dtype=torch.float32, device=device)
    listed = int(T._topk_launch(z, c, k, idx, dist, A._CERTIFY, 1))
    assert idx[:8].tolist() == [[20, 39, 37]] * 8, idx[:8].tolist()
    check_topk(z, c, idx, dist, k)
    assert 8 <= listed < 30, listed


def test_certified_bounds_merge_across_code_tiles(device, monkeypatch):
    """The k-th and (k+1)-th codes sit in different code tiles, 1e-3 apart, far closer than split-bf16
    distances resolve: whatever is certified must be the true top k."""
    small = [triton.Config({"BN": 16, "BK": 16, "BD": 16})]
    monkeypatch.setattr(T._topk_certify, "configs", small)
    monkeypatch.setattr(T._topk_exact, "configs", small)
    k_codes, d, n = 64, 20, 96
    c = torch.randn(k_codes, d, device=device) * 4
    a = torch.randint(0, 16, (n,), device=device)  # first code tile
    b = torch.randint(32, 64, (n,), device=device)  # a later tile
    c[b] = c[a] + 1e-3 * torch.randn(n, d, device=device)
    e = torch.randint(16, 32, (n,), device=device)  # a middle tile: code e ranks first, then a, then b
    c[e] = c[a] + 0.1 * torch.randn(n, d, device=device)
    for k, z in ((1, c[a] + 0.475 * (c[b] - c[a])), (2, c[a] + 0.475 * (c[b] - c[a]) + 0.6 * (c[e] - c[a]))):
        idx = torch.empty(n, k, dtype=torch.int64, device=device)
        dist = torch.empty(n, k, dtype=torch.float32, device=device)
        listed = int(T._topk_launch(z, c, k, idx, dist, A._CERTIFY, 1))
        check_topk(z, c, idx, dist, k)
        assert listed > n // 2, f"k = {k}: rows this close to two codes must go to the direct search"
    # The runner-up in the same tile as the k-th code: the tile's first round takes the k-th out and
    # leaves the runner-up in the tile, whose lower bound must still reach the rest.
    c = torch.randn(k_codes, d, device=device) * 4
    a = torch.randint(0, 8, (n,), device=device)
    c[a + 8] = c[a] + 1e-3 * torch.randn(n, d, device=device)
    z = c[a] + 0.475 * (c[a + 8] - c[a])
    idx = torch.empty(n, 1, dtype=torch.int64, device=device)
    dist = torch.empty(n, 1, dtype=torch.float32, device=device)
    listed = int(T._topk_launch(z, c, 1, idx, dist, A._CERTIFY, 1))
    check_topk(z, c, idx, dist, 1)
    assert listed > n // 2, f"{listed}: rows this close to two codes of one tile must go to the direct search"


# --- tf32 / bf16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_is_exact_where_the_dot_separates(device, precision, split):
    """The k codes come from the expanded form (no certificate) and are ordered by their direct-form
    distances: every row whose (k, k+1) gap exceeds twice the dot's error bound gets the exact answer."""
    n, k = 300, 5
    c = 3 * torch.randn(50, 16, device=device)
    z = c[torch.randint(0, 50, (n,), device=device)] + 0.5 * torch.randn(n, 16, device=device)
    idx, dist = T.topk_fwd(z, c, k, precision=precision, split=split)
    d = R.squared_distances(f64(z), f64(c))
    got = np.take_along_axis(d, idx.cpu().numpy(), axis=1)
    np.testing.assert_allclose(f64(dist), got, rtol=1e-5)
    assert (np.diff(f64(dist), axis=1) >= 0).all(), "not in increasing distance"
    ds = np.sort(d, axis=1)
    clear = np.nonzero(ds[:, k] - ds[:, k - 1] > low_precision_bound(z, c, U_DOT[precision]))[0]
    assert clear.size > n // 4, f"only {clear.size} separated rows: the data tests nothing"
    ref = R.nearest_codes(f64(z), f64(c), k)
    bad = clear[(idx.cpu().numpy()[clear] != ref[clear]).any(1)]
    assert bad.size == 0, f"(row, got, want): {first(bad, idx.cpu().numpy(), ref)}"


# --- launch configuration, dtypes, strides -----------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_small_blocks(device, monkeypatch, precision):
    # GPU-sized tiles: many code tiles, merge rounds limited by the rows' new candidates, D = 300
    # in several GROUP partials.
    small = triton.Config({"BN": 16, "BK": 16, "BD": 16})
    for tuner in (T._topk_exact, T._topk_certify, T._topk_dot):
        monkeypatch.setattr(tuner, "configs", [small])
    z = torch.randn(40, 300, device=device)
    c = torch.randn(45, 300, device=device)
    base = T.topk_fwd(z, c, 7, precision=precision, split=1)
    for split in (2, 3):
        out = T.topk_fwd(z, c, 7, precision=precision, split=split)
        assert torch.equal(base[0], out[0]) and torch.equal(base[1], out[1]), f"split {split} changes the result"
    if precision == "exact":
        check_topk(z, c, *base, 7)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_split_gives_identical_results(device, precision):
    z = torch.randn(60, 20, device=device)
    c = torch.randn(333, 20, device=device)
    base = T.topk_fwd(z, c, 9, precision=precision, split=1)
    for split in (2, 7):  # 7: more programs than code tiles, some runs are empty
        out = T.topk_fwd(z, c, 9, precision=precision, split=split)
        for name, a, b in zip(("idx", "dist"), base, out):
            bad = torch.nonzero((a != b).any(1))[:, 0].cpu()
            assert bad.numel() == 0, f"split={split} changes {name} at rows {bad[:5].tolist()}"


def test_every_slot_is_written(device, monkeypatch):
    poison_modules(monkeypatch, T)
    z = torch.randn(70, 9, device=device)
    c = torch.randn(30, 9, device=device)
    z[3, 1] = float("nan")
    for precision in PRECISIONS:
        idx, dist = T.topk_fwd(z, c, 5, precision=precision)
        assert (idx != -7).all() and (idx[3] == -1).all() and torch.isnan(dist[3]).all()
        keep = torch.arange(70, device=device) != 3
        assert not torch.isnan(dist[keep]).any()


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
def test_half_inputs_equal_their_fp32_upcast(device, dtypes):
    z = torch.randn(120, 33, device=device).to(dtypes[0])
    c = torch.randn(70, 33, device=device).to(dtypes[1])
    idx, dist = T.topk_fwd(z, c, 5)
    idx32, dist32 = T.topk_fwd(z.float(), c.float(), 5)
    assert torch.equal(idx, idx32) and torch.equal(dist, dist32)
    check_topk(z, c, idx, dist, 5)


def test_row_strides_are_honoured(device):
    big = torch.randn(120, 50, device=device)
    z = big[::2, 3:30]
    c = torch.randn(41, 60, device=device)[:, 10:37]
    got, want = T.topk_fwd(z, c, 6), T.topk_fwd(z.contiguous(), c.contiguous(), 6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# --- NaN / Inf -----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets inf - inf
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows(device, backend, precision):
    z = torch.randn(40, 8, device=device)
    c = torch.randn(50, 8, device=device)
    bad = {3: "nan", 4: "inf", 5: "-inf", 6: "nan+inf"}
    zb = z.clone()
    zb[3, 2] = float("nan")
    zb[4, 0] = float("inf")
    zb[5] = -float("inf")
    zb[6, 1], zb[6, 5] = float("inf"), float("nan")
    idx, dist = run(backend, zb, c, 4, precision=precision)
    for r, what in bad.items():
        assert (idx[r] == -1).all(), f"{what} row {r}: {idx[r].tolist()}"
        want_nan = "nan" in what
        assert torch.isnan(dist[r]).all() if want_nan else (dist[r] == float("inf")).all(), f"{what}: {dist[r]}"
    ok = torch.tensor([r not in bad for r in range(40)], device=device)
    clean = run(backend, z, c, 4, precision=precision)
    assert torch.equal(idx[ok], clean[0][ok]) and torch.equal(dist[ok], clean[1][ok])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_finite_codes_than_k(device, backend, precision):
    """Non-finite codes are never chosen while a finite one is left; slots no finite code can fill get
    -1 and +Inf; with no finite code at all every slot fails (NaN for an all-NaN codebook)."""
    z = torch.randn(30, 6, device=device)
    c = torch.randn(9, 6, device=device)
    c[1, 2], c[4, 0], c[7, 5] = float("nan"), float("inf"), -float("inf")
    c[8] = float("nan")
    finite = torch.isfinite(c).all(1)
    idx, dist = run(backend, z, c, 7, precision=precision)
    n_fin = int(finite.sum())
    assert (idx[:, :n_fin] >= 0).all() and finite[idx[:, :n_fin]].all()
    assert (idx[:, n_fin:] == -1).all() and (dist[:, n_fin:] == float("inf")).all()
    if precision == "exact":
        ref = torch.nonzero(finite)[:, 0].cpu().numpy()[R.nearest_codes(f64(z), f64(c[finite]), n_fin)]
        assert (idx[:, :n_fin].cpu().numpy() == ref).all()
    for fill, nan in ((float("nan"), True), (float("inf"), False)):
        cf = c.clone()
        cf[:, 3] = fill
        idx, dist = run(backend, z, cf, 3, precision=precision)
        assert (idx == -1).all() and (torch.isnan(dist).all() if nan else (dist == float("inf")).all())


# --- the public op -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_k_shapes_metrics_and_k1(device, backend):
    z = torch.randn(3, 5, 11, device=device)
    c = torch.randn(23, 11, device=device)
    idx, dist = vqt.assign(z, c, k=4, return_distance=True, backend=backend)
    assert idx.shape == dist.shape == (3, 5, 4)
    assert torch.equal(idx.reshape(-1, 4), T.topk_fwd(z.reshape(-1, 11), c, 4)[0])
    one = vqt.assign(z, c, k=1, backend=backend)
    assert one.shape == (3, 5, 1) and torch.equal(one[..., 0], vqt.assign(z, c, backend=backend))
    cos = vqt.assign(z, c, metric="cosine", k=3, backend=backend)
    ref = R.nearest_codes(f64(z), f64(c), 3, metric="cosine")
    assert (cos.cpu().numpy() == ref).all()
    full = vqt.assign(z, c, k=23, backend=backend)  # k = K: every code, in order
    assert (full.cpu().numpy() == R.nearest_codes(f64(z), f64(c), 23)).all()


def test_assign_k_above_the_kernel_takes_the_torch_path(device, monkeypatch):
    z = torch.randn(20, 4, device=device)
    c = torch.randn(80, 4, device=device)
    idx, dist = vqt.assign(z, c, k=T.MAX_K + 1, return_distance=True)
    assert idx.shape == (20, T.MAX_K + 1)
    check_topk(z, c, idx, dist, T.MAX_K + 1)
    with pytest.raises(RuntimeError, match="k <= 64"):
        vqt.assign(z, c, k=T.MAX_K + 1, backend="triton")
    monkeypatch.setenv("VQTRITON_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="k <= 64"):
        vqt.assign(z, c, k=T.MAX_K + 1)


def test_bad_k(device):
    z, c = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    for k, err, msg in ((0, ValueError, "k must be >= 1, got 0"), (-2, ValueError, "k must be >= 1"),
                        (6, ValueError, r"k must be <= K = 5 .*got k = 6"), (2.0, TypeError, "k must be an int, got float"),
                        (True, TypeError, "k must be an int, got bool"), ("3", TypeError, "k must be an int, got str")):
        with pytest.raises(err, match=msg):
            vqt.assign(z, c, k=k)
    with pytest.raises(ValueError, match="k must be an int in"):
        T.topk_fwd(z, c, 6)
    with pytest.raises(ValueError, match="precision"):
        T.topk_fwd(z, c, 2, precision="fp8")
    with pytest.raises(ValueError, match="split"):
        T.topk_fwd(z, c, 2, split=0)


# --- GPU only -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32768, 1024, 256), (65536, 1024, 128), (8192, 16384, 64)], ids=shape_id)
@pytest.mark.parametrize("k", [2, 8, 40])
def test_gpu_certified_topk_on_tensor_cores(shape, k):
    """Real split-bf16 tensor-core dots keep the bound (answers exact), leave few rows to the direct
    search, and agree with the plain direct-form search."""
    n, k_codes, d = shape
    z = torch.randn(n, d, device="cuda")
    c = torch.randn(k_codes, d, device="cuda")
    idx = torch.empty(n, k, dtype=torch.int64, device="cuda")
    dist = torch.empty(n, k, dtype=torch.float32, device="cuda")
    listed = int(T._topk_launch(z, c, k, idx, dist, A._CERTIFY, A._auto_split(n, k_codes, z.device)))
    assert listed < n // 5, f"{listed} of {n} rows were not certified"
    rows = torch.randperm(n, device="cuda")[:512]
    check_topk(z[rows], c, idx[rows], dist[rows], k)
    direct = T.topk_fwd(z[rows], c, k, precision="exact", split=1)
    assert torch.equal(direct[0], idx[rows])
