"""The assign kernel (``vqtriton.kernels.assign.assign_fwd``) against the NumPy float64 reference.

On a machine without CUDA these run through Triton's interpreter (see conftest.py), which runs the
interpreter's single config; ``test_small_blocks`` also runs GPU-sized blocks there.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from vqtriton import reference as R
from vqtriton import torch_ops
from vqtriton.kernels import assign as A
from vqtriton.kernels import centre as C
from vqtriton.kernels.assign import assign_fwd
from helpers import f64, poison as poison_modules, shape_id

SHAPES = [(1000, 333, 47), (1, 1, 1), (7, 1, 5), (1, 50, 3), (37, 19, 1), (0, 5, 4), (20, 30, 300), (5, 9, 2048)]
PRECISIONS = ["exact", "tf32", "bf16"]
HALF = [torch.float16, torch.bfloat16]
# Unit roundoff of the dot's operands: tf32 may truncate (10 bits kept), bf16 rounds to 8 bits.
U_DOT = {"tf32": 2.0**-10, "bf16": 2.0**-8}
EXACT = 1 + 2**-16


def first(rows, *cols):
    """The first few offending rows with their columns, for assertion messages."""
    rows = np.asarray(rows).reshape(-1)[:5]
    return [(int(r), *(c[r].item() if hasattr(c[r], "item") else c[r] for c in cols)) for r in rows]


def chosen_distances(z, c, idx):
    """float64 direct distances ``d [N, K]`` and ``d[row, idx[row]]``."""
    d = R.squared_distances(f64(z), f64(c))
    i = idx.cpu().numpy()
    return d, d[np.arange(len(i)), i]


def check_exact(z, c, idx, dist, same_index=True):
    """The precision contract, ``dist`` is the direct distance of ``idx``, and (optionally) argmin."""
    assert idx.dtype == torch.int64 and idx.shape == (z.shape[0],)
    assert dist.dtype == torch.float32 and dist.shape == (z.shape[0],)
    if z.shape[0] == 0:
        return
    d, got = chosen_distances(z, c, idx)
    i = idx.cpu().numpy()
    assert ((i >= 0) & (i < c.shape[0])).all(), f"indices out of range: {first(np.nonzero(i < 0)[0], i)}"
    bad = np.nonzero(got > d.min(1) * EXACT)[0]
    assert bad.size == 0, f"contract (row, got, want): {first(bad, i, d.argmin(1))}"
    if same_index:
        ref = R.nearest_code(f64(z), f64(c))
        bad = np.nonzero(i != ref)[0]
        assert bad.size == 0, f"first mismatches (row, got, want): {first(bad, i, ref)}"
    dd = f64(dist)
    bad = np.nonzero(np.abs(dd - got) > 1e-5 * got + 1e-12)[0]
    assert bad.size == 0, f"dist is not the direct distance (row, got, want): {first(bad, dd, got)}"


def low_precision_bound(z, c, u):
    """Per row: how far the chosen code's float64 distance may exceed the minimum in tf32/bf16 mode.

    Each approximate distance is |zc|^2 + |cc|^2 - 2 zc.cc on vectors centred on the codebook mean,
    with the dot's operands rounded to relative error u (so the dot is off by at most
    (2u + u^2) |zc| |cc|) and fp32 everywhere else (a few D 2^-24 (|zc| + |cc|)^2, centring included).
    The chosen code and the true nearest one are each off by at most that much.
    """
    z64, c64 = f64(z), f64(c)
    zc = z64 - c64.mean(0)
    m = np.linalg.norm(c64 - c64.mean(0), axis=1).max()
    nz = np.linalg.norm(zc, axis=1)
    one = 2 * (2 * u + u * u) * nz * m + (2 * z.shape[1] + 16) * 2.0**-24 * (nz + m) ** 2
    return 2 * 1.05 * one


# --- exact mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_exact_matches_reference(device, shape):
    n, k, d = shape
    z = torch.randn(n, d, device=device)
    c = torch.randn(k, d, device=device)
    idx, dist, zq = assign_fwd(z, c)
    assert zq is None
    check_exact(z, c, idx, dist)


@pytest.mark.parametrize("kind", ["normal", "offset", "near-ties"])
def test_exact_contract_on_hard_data(device, kind):
    n, k, d = 400, 64, 24
    c = torch.randn(k, d, device=device)
    if kind == "near-ties":
        # Midpoints of code pairs, nudged by 1e-3 .. 1e-8 of the pair's spacing: some rows fp32
        # can separate, some only to within the contract.
        a, b = torch.randint(0, k, (2, n), device=device)
        nudge = torch.logspace(-3, -8, n, device=device)[:, None] * (c[b] - c[a])
        z = (c[a] + c[b]) / 2 + nudge
    else:
        z = torch.randn(n, d, device=device)
    if kind == "offset":
        # The expanded form loses these (|z|^2 ~ 2.4e5 against gaps ~ 1); the direct form does not.
        z, c = z + 100, c + 100
    idx, dist, _ = assign_fwd(z, c)
    check_exact(z, c, idx, dist, same_index=kind != "near-ties")
    if kind == "near-ties":
        # Where the float64 gap to the runner-up exceeds fp32's resolution, the index must be right.
        d64 = np.sort(R.squared_distances(f64(z), f64(c)), axis=1)
        clear = np.nonzero(d64[:, 1] - d64[:, 0] > 1e-5 * d64[:, 0])[0]
        ref = R.nearest_code(f64(z), f64(c))
        bad = clear[idx.cpu().numpy()[clear] != ref[clear]]
        assert clear.size > n // 4 and bad.size == 0, f"(row, got, want): {first(bad, idx, ref)}"


@pytest.mark.parametrize("split", [1, 2, 3])
def test_exact_ties_go_to_the_lowest_index(device, split):
    # Small integers: every distance is an exact integer in fp32, so ties are exact ties.
    k, d = 333, 6
    c = torch.randint(-2, 3, (k, d), device=device).float()
    c[300] = c[5]  # duplicates in different code tiles (and different split programs)
    c[200] = c[17]
    z = torch.randint(-2, 3, (300, d), device=device).float()
    z[0], z[1] = c[300], c[200]
    # Midpoint of two codes two units apart along one axis: an exact two-way tie.
    c[250] = c[40]
    c[250, 0] += 2
    z[2] = c[40]
    z[2, 0] += 1
    idx, dist, _ = assign_fwd(z, c, split=split)
    check_exact(z, c, idx, dist)
    assert idx[:3].tolist() == [5, 17, 40]
    ties = (R.squared_distances(f64(z), f64(c)) == f64(dist)[:, None]).sum(1)
    assert (ties > 1).sum() > 100, "the data should be full of exact ties"


def test_offset_data_also_matches_torch_ops(device):
    z = torch.randn(300, 16, device=device) + 100
    c = torch.randn(90, 16, device=device) + 100
    idx, dist, _ = assign_fwd(z, c)
    t_idx, t_dist, _ = torch_ops.assign_fwd(z, c)
    bad = torch.nonzero(idx != t_idx).flatten().cpu()
    assert bad.numel() == 0, f"(row, kernel, torch_ops): {first(bad, idx.cpu(), t_idx.cpu())}"
    torch.testing.assert_close(dist, t_dist, rtol=1e-5, atol=1e-6)


# --- split, z_q, dtypes, strides -------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_split_gives_identical_results(device, precision):
    z = torch.randn(60, 20, device=device)
    c = torch.randn(333, 20, device=device)
    base = assign_fwd(z, c, precision=precision, return_zq=True, split=1)
    for split in (2, 3, 7):  # 7: more programs than code tiles, some scan nothing
        out = assign_fwd(z, c, precision=precision, return_zq=True, split=split)
        for name, a, b in zip(("idx", "dist", "z_q"), base, out):
            bad = torch.nonzero(a != b)[:, 0].cpu()
            assert bad.numel() == 0, f"split={split} changes {name} at rows {bad[:5].tolist()}"


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_return_zq_writes_every_row(device, monkeypatch, dtype, split):
    poison_modules(monkeypatch, A)
    z = torch.randn(150, 37, device=device, dtype=dtype)
    c = torch.randn(333, 37, device=device, dtype=dtype)
    z[7, 3] = float("nan")  # no code: its z_q row is zeros
    idx, dist, zq = assign_fwd(z, c, return_zq=True, split=split)
    assert zq.dtype == dtype and zq.shape == z.shape
    want = torch.where((idx >= 0)[:, None], c[idx.clamp_min(0)], 0)
    bad = torch.nonzero((zq.view(torch.int16 if dtype != torch.float32 else torch.int32)
                         != want.view(torch.int16 if dtype != torch.float32 else torch.int32)).any(1))
    assert bad.numel() == 0, f"z_q != codebook[idx] bit for bit at rows {bad[:5, 0].tolist()}"
    assert idx[7] == -1 and torch.isnan(dist[7]) and not torch.isnan(zq).any()
    keep = torch.ones(150, dtype=torch.bool, device=device)
    keep[7] = False
    check_exact(z[keep], c, idx[keep], dist[keep])


@pytest.mark.parametrize("precision", ["exact", "bf16"])
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
def test_half_inputs_equal_their_fp32_upcast(device, dtypes, precision):
    z = torch.randn(200, 33, device=device).to(dtypes[0])
    c = torch.randn(70, 33, device=device).to(dtypes[1])
    idx, dist, zq = assign_fwd(z, c, precision=precision, return_zq=True)
    idx32, dist32, zq32 = assign_fwd(z.float(), c.float(), precision=precision, return_zq=True)
    bad = torch.nonzero((idx != idx32) | (dist != dist32)).flatten().cpu()
    cols = (idx.cpu(), idx32.cpu(), dist.cpu(), dist32.cpu())
    assert bad.numel() == 0, f"(row, idx, idx32, dist, dist32): {first(bad, *cols)}"
    assert zq.dtype == dtypes[1] and torch.equal(zq, c[idx]) and torch.equal(zq.float(), zq32)
    if precision == "exact":
        check_exact(z, c, idx, dist)


def test_row_strides_are_honoured(device):
    big = torch.randn(120, 50, device=device)
    z = big[::2, 3:30]  # row stride 100, unit column stride: passed as is
    c = torch.randn(41, 60, device=device)[:, 10:37]
    got = assign_fwd(z, c, return_zq=True)
    want = assign_fwd(z.contiguous(), c.contiguous(), return_zq=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ct = torch.randn(27, 41, device=device).t()  # stride(-1) != 1: the launcher copies it
    assert all(torch.equal(a, b) for a, b in zip(assign_fwd(z, ct)[:2], assign_fwd(z, ct.contiguous())[:2]))


# --- NaN / Inf ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets inf - inf
@pytest.mark.parametrize("precision", PRECISIONS)
def test_nonfinite_rows(device, precision):
    z = torch.randn(40, 8, device=device)
    c = torch.randn(50, 8, device=device)
    # Every code shares coordinate 0, so centred codes are 0 there and row 4's inf * 0 gives NaN dots.
    c[:, 0] = 0.5
    bad_rows = {3: "nan", 4: "inf", 5: "-inf", 6: "nan+inf", 7: "overflow"}
    z_bad = z.clone()
    z_bad[3, 2] = float("nan")
    z_bad[4, 0] = float("inf")
    z_bad[5] = -float("inf")
    z_bad[6, 1], z_bad[6, 5] = float("inf"), float("nan")
    z_bad[7] = 1e30  # finite, but every distance overflows fp32
    idx, dist, zq = assign_fwd(z_bad, c, precision=precision, return_zq=True)
    want_nan = {3: True, 4: False, 5: False, 6: True, 7: False}
    for r, what in bad_rows.items():
        assert idx[r] == -1, f"{what} row {r}: idx {idx[r].item()}"
        assert bool(torch.isnan(dist[r])) == want_nan[r], f"{what} row {r}: dist {dist[r].item()}"
        assert want_nan[r] or dist[r] == float("inf"), f"{what} row {r}: dist {dist[r].item()}"
        assert (zq[r] == 0).all()
    # A bad row changes no other row.
    ok = torch.tensor([r not in bad_rows for r in range(40)], device=device)
    idx_clean, dist_clean, _ = assign_fwd(z, c, precision=precision)
    assert torch.equal(idx[ok], idx_clean[ok]) and torch.equal(dist[ok], dist_clean[ok])
    # The same policy as torch_ops (which computes in float64: the fp32 overflow row differs there).
    t_idx, t_dist, _ = torch_ops.assign_fwd(z_bad[:7], c)
    assert torch.equal(idx[:7], t_idx) and torch.equal(torch.isnan(dist[:7]), torch.isnan(t_dist))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets inf - inf
@pytest.mark.parametrize("precision", PRECISIONS)
def test_nonfinite_codes_are_never_chosen(device, precision):
    z = torch.randn(60, 8, device=device)
    c = torch.randn(40, 8, device=device) * 3
    # Poisoned copies of the rows' own vectors: nearest of all, were they finite.
    c[0], c[0, 1] = z[0], float("nan")
    c[2], c[2, 0] = z[1], float("inf")
    c[9], c[9, 7] = z[2], -float("inf")
    c[11] = float("nan")
    finite = torch.isfinite(c).all(1)
    idx, dist, _ = assign_fwd(z, c, precision=precision)
    assert finite[idx].all(), f"non-finite codes chosen: {idx[~finite[idx]].tolist()}"
    ref = torch.nonzero(finite).flatten().cpu().numpy()[R.nearest_code(f64(z), f64(c[finite]))]
    if precision == "exact":
        bad = np.nonzero(idx.cpu().numpy() != ref)[0]
        assert bad.size == 0, f"(row, got, want): {first(bad, idx.cpu(), ref)}"
        assert torch.equal(idx, torch_ops.assign_fwd(z, c)[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets inf - inf
@pytest.mark.parametrize("precision", PRECISIONS)
def test_no_finite_code(device, precision):
    z = torch.randn(20, 5, device=device)
    z[3, 1] = float("nan")
    z[4, 0] = float("inf")
    for fill, nan_rows in ((float("nan"), "all"), (float("inf"), {3})):
        c = torch.randn(30, 5, device=device)
        c[:, 2] = fill  # every code holds it
        idx, dist, _ = assign_fwd(z, c, precision=precision)
        assert (idx == -1).all(), f"fill {fill}: {idx.tolist()}"
        want = torch.ones(20, dtype=torch.bool) if nan_rows == "all" else torch.zeros(20, dtype=torch.bool)
        if nan_rows != "all":
            want[list(nan_rows)] = True
        assert torch.equal(torch.isnan(dist).cpu(), want), f"fill {fill}: {dist.tolist()}"
        assert torch.isinf(dist[~want.to(device)]).all()
        t_idx, t_dist, _ = torch_ops.assign_fwd(z, c)
        assert torch.equal(idx, t_idx) and torch.equal(torch.isnan(dist), torch.isnan(t_dist))


# --- tf32 / bf16 modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "offset"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_within_bound(device, precision, kind):
    z = torch.randn(300, 40, device=device)
    c = torch.randn(97, 40, device=device)
    if kind == "offset":
        z, c = z + 100, c + 100  # centring on the codebook mean keeps the expanded form usable
    idx, dist, zq = assign_fwd(z, c, precision=precision, return_zq=True)
    d, got = chosen_distances(z, c, idx)
    excess = got - d.min(1)
    bound = low_precision_bound(z, c, U_DOT[precision])
    bad = np.nonzero(excess > bound)[0]
    assert bad.size == 0, f"(row, excess, bound): {first(bad, excess, bound)}"
    bad = np.nonzero(np.abs(f64(dist) - got) > 1e-5 * got + 1e-12)[0]
    assert bad.size == 0, f"dist is not the direct distance (row, got, want): {first(bad, f64(dist), got)}"
    assert torch.equal(zq, c[idx])


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_well_separated_is_exact(device, precision):
    c = 3 * torch.randn(50, 16, device=device)
    z = c[torch.randint(0, 50, (400,), device=device)] + 0.01 * torch.randn(400, 16, device=device)
    d = np.sort(R.squared_distances(f64(z), f64(c)), axis=1)
    assert (d[:, 1] - d[:, 0] > low_precision_bound(z, c, U_DOT[precision])).all(), "data not separated"
    idx, dist, _ = assign_fwd(z, c, precision=precision)
    check_exact(z, c, idx, dist)


def test_bf16_mode_is_the_rounded_expanded_form(device):
    # The interpreter emulates the tensor-core bf16 dot (operands rounded to nearest bf16, exact
    # products, fp32 sums); on a GPU this is the real thing. Either way the pick is the argmin of
    # |zc|^2 + |cc|^2 - 2 bf16(zc).bf16(cc), up to fp32 round-off.
    c = torch.randn(97, 40, device=device)
    z = torch.randn(500, 40, device=device)
    # Half the rows sit near midpoints of code pairs, where bf16's error flips the pick.
    a, b = torch.randint(0, 97, (2, 250), device=device)
    z[:250] = (c[a] + c[b]) / 2 + 1e-5 * (c[b] - c[a])
    idx, _, _ = assign_fwd(z, c, precision="bf16")
    # The launcher's centring: an fp32 mean (summed in float64), fp32 differences.
    mean = (c.double().sum(0) / c.shape[0]).float()
    zc32, cc32 = z - mean, c - mean
    zc, cc = zc32.double(), cc32.double()
    dot = zc32.to(torch.bfloat16).double() @ cc32.to(torch.bfloat16).double().T
    approx = (zc.square().sum(1)[:, None] + cc.square().sum(1)[None, :] - 2 * dot).cpu().numpy()
    i = idx.cpu().numpy()
    tol = 64 * 40 * 2.0**-24 * (zc.norm(dim=1)[:, None] + cc.norm(dim=1).max()).square().flatten().cpu().numpy()
    excess = approx[np.arange(500), i] - approx.min(1)
    bad = np.nonzero(excess > tol)[0]
    assert bad.size == 0, f"(row, excess, tol): {first(bad, excess, tol)}"
    # ... and bf16 rounding really happened: some rows pick differently from the exact search.
    assert (idx != assign_fwd(z, c)[0]).sum() > 10


def test_round_bf16_matches_torch(device):
    @triton.jit
    def round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < n
        tl.store(y_ptr + o, C._round_bf16(tl.load(x_ptr + o, mask=m, other=0.0)), mask=m)

    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 14,), dtype=torch.int64).to(torch.int32)
    special = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 2.0 - 2**-24, 3.3961e38, 3.4028e38, 1e-40, -1e-40,
                            2**-126 * (1 - 2**-9), float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    x = torch.cat([special, bits.view(torch.float32), torch.randn(1000)]).to(device)
    y = torch.empty_like(x)
    round_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16).float()
    bad = torch.nonzero((y.view(torch.int32) != want.view(torch.int32)) & ~(y.isnan() & want.isnan())).flatten()
    assert bad.numel() == 0, f"(x, got, want): {[(x[i].item(), y[i].item(), want[i].item()) for i in bad[:5]]}"


def test_keys_sort_by_distance_then_code(device):
    # The keys' order must be: distance (negative round-off and -0.0 as +0), then lowest code;
    # NaN after +Inf after every finite distance; padding codes after everything.
    @triton.jit
    def keys_kernel(d_ptr, key_ptr, n, BK: tl.constexpr):
        o_k = tl.arange(0, BK).to(tl.int64)
        m_k = o_k < n
        b_d = tl.load(d_ptr + o_k, mask=m_k, other=0.0)[None, :]  # [1, BK]
        tl.store(key_ptr + o_k[None, :], A._keys(b_d, o_k, m_k), mask=(o_k < BK)[None, :])

    vals = [0.0, -0.0, -1e-6, -3.0, 1e-45, 1.0, 1.0, 2.5, 3e38, float("inf"), float("nan"), -float("nan"),
            float("inf"), 2.5, -0.0, 0.0]
    d = torch.tensor(vals * 2, device=device)[torch.randperm(2 * len(vals), device=device)]
    keys = torch.empty(64, dtype=torch.int64, device=device)
    keys_kernel[(1,)](d, keys, d.numel(), BK=64)
    keys = keys.cpu().numpy()
    assert (keys[d.numel():] == 2**63 - 1).all(), "padding codes must sort last"
    dv = np.nan_to_num(np.maximum(f64(d), 0.0), nan=np.inf)  # NaN and inf share a rank here ...
    rank = np.where(np.isnan(f64(d)), 2, np.where(np.isinf(f64(d)), 1, 0))  # ... split by this one
    want = np.lexsort((np.arange(d.numel()), dv, rank))
    got = np.argsort(keys[: d.numel()], kind="stable")
    assert (got == want).all(), f"key order {got.tolist()} != {want.tolist()}"


# --- GPU-sized blocks, arguments --------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_small_blocks(device, monkeypatch, precision):
    # The GPU's smallest tiles: many code tiles, many D chunks, several GROUP partials (D = 300).
    small = {"exact": triton.Config({"BN": 16, "BK": 16, "BD": 4}),
             "tf32": triton.Config({"BN": 16, "BK": 16, "BD": 16}),
             "bf16": triton.Config({"BN": 16, "BK": 16, "BD": 16})}[precision]
    monkeypatch.setattr(A._assign_exact if precision == "exact" else A._assign_dot, "configs", [small])
    if precision == "exact":
        # The certified search (split 1) with small tensor-core tiles: its best / runner-up bounds
        # must merge across many code tiles.
        monkeypatch.setattr(A._assign_certify, "configs", [triton.Config({"BN": 16, "BK": 16, "BD": 16})])
    z = torch.randn(40, 300, device=device)
    c = torch.randn(45, 300, device=device)
    for split in (1, 2):
        idx, dist, zq = assign_fwd(z, c, precision=precision, return_zq=True, split=split)
        assert torch.equal(zq, c[idx])
        if precision == "exact":
            check_exact(z, c, idx, dist)
        else:
            d, got = chosen_distances(z, c, idx)
            bad = np.nonzero(got - d.min(1) > low_precision_bound(z, c, U_DOT[precision]))[0]
            assert bad.size == 0, f"rows {bad[:5]}"
            np.testing.assert_allclose(f64(dist), got, rtol=1e-5)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reported_distance_depends_on_neither_split_nor_tile(device, monkeypatch, precision):
    """``dist`` is summed with one D tile (``_DIST_BD``) whatever the split and the search's tiles: the
    GPU's tensor-core tile (BD = 32) and a narrower one, D = 300 in several tiles, split 1 (the search
    launch finishes) against 2 and 3 (a finish-only launch). The same codes get the same bits."""
    z = torch.randn(40, 300, device=device)
    c = torch.randn(45, 300, device=device)
    first_out = None
    for bd in (32, 16):
        tile = triton.Config({"BN": 16, "BK": 16, "BD": bd})
        for tuner in (A._assign_dot, A._assign_certify):
            monkeypatch.setattr(tuner, "configs", [tile])
        base = assign_fwd(z, c, precision=precision, return_zq=True, split=1)
        for split in (2, 3):
            out = assign_fwd(z, c, precision=precision, return_zq=True, split=split)
            for name, a, b in zip(("idx", "dist", "z_q"), base, out):
                bad = torch.nonzero((a != b).reshape(a.shape[0], -1).any(1))[:, 0].cpu()
                assert bad.numel() == 0, f"BD={bd}: split={split} changes {name} at rows {bad[:5].tolist()}"
        if first_out is None:
            first_out = base
            continue
        # Another search tile may round an approximate distance differently (tf32 / bf16 may then pick
        # another code at a near-tie); the distance of a code is the same bits.
        same = first_out[0] == base[0]
        if precision == "exact":
            assert same.all(), f"rows {torch.nonzero(~same)[:5, 0].tolist()}"
        assert same.sum() > 30 and torch.equal(first_out[1][same], base[1][same]), "the tile changes dist"


# --- the certified exact search -------------------------------------------------------------------


def certified(z, c, return_zq=False, split=1):
    """Run the certified exact search; also return how many rows it had to list."""
    n, d = z.shape
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    dist = torch.empty(n, dtype=torch.float32, device=z.device)
    zq = torch.empty(n, d, dtype=c.dtype, device=z.device) if return_zq else None
    count = A._assign_certified(z, c, idx, dist, zq, split)
    return idx, dist, zq, int(count)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("kind", ["normal", "offset", "ties"])
def test_certified_search_equals_the_direct_search(device, monkeypatch, kind, split):
    """Both exact searches give the same codes; the bound certifies most rows, never a tie. With
    split 3 the code runs are merged by the finish launch (duplicates 60-89 straddle two runs of
    64 codes; the third run is empty)."""
    n, k, d = 500, 97, 37
    z = torch.randn(n, d, device=device)
    c = torch.randn(k, d, device=device)
    if kind == "offset":
        z, c = z + 100, c + 100
    if kind == "ties":
        c[60:90] = c[:30]  # duplicates: rows nearest to one of them are exact ties
        z[:200] = c[torch.randint(0, 30, (200,), device=device)] + 1e-3 * torch.randn(200, d, device=device)
    idx, dist, zq, listed = certified(z, c, return_zq=True, split=split)
    monkeypatch.setattr(A, "_CERTIFIED_SEARCH", False)
    idx2, dist2, _ = assign_fwd(z, c)
    bad = torch.nonzero(idx != idx2)[:, 0].cpu()
    assert bad.numel() == 0, f"certified vs direct search differ at rows {bad[:5].tolist()}"
    np.testing.assert_allclose(f64(dist), f64(dist2), rtol=2e-6)
    assert torch.equal(zq, c[idx])
    check_exact(z, c, idx, dist)
    if kind == "ties":
        # A row whose two nearest codes are exact duplicates can never be certified.
        assert listed >= 200, f"only {listed} rows listed for the direct search"
    else:
        assert 0 <= listed < n // 10, f"{listed} of {n} rows were not certified: the bound is too loose"


def test_certified_search_lists_exactly_the_hard_rows(device):
    """Rows planted on exact ties are listed and finished by the direct search (lowest index);
    clear rows are finished by the certified search."""
    k, d = 40, 12
    c = torch.randn(k, d, device=device)
    c[39] = c[3]
    z = torch.randn(64, d, device=device) * 3
    z[:8] = c[3]  # equidistant (0) from codes 3 and 39
    z[8:16] = (c[5] + c[6]) / 2  # midpoints: ties up to rounding
    idx, dist, _, listed = certified(z, c)
    assert 16 <= listed < 40, listed
    assert idx[:8].tolist() == [3] * 8 and dist[:8].abs().max().item() == 0.0
    check_exact(z, c, idx, dist, same_index=False)


def test_certified_bound_is_rigorous_where_fp32_barely_separates(device):
    """Near-ties at every scale of the gap: whatever the bound certifies must be the true nearest code."""
    k, d, n = 50, 20, 600
    c = torch.randn(k, d, device=device, dtype=torch.float64)
    a, b = torch.randint(0, k, (2, n), device=device)
    gap = torch.logspace(-1, -9, n, device=device, dtype=torch.float64)[:, None]
    z = ((c[a] + c[b]) / 2 + gap * (c[b] - c[a])).float()
    c = c.float()
    idx, dist, _, listed = certified(z, c)
    check_exact(z, c, idx, dist, same_index=False)
    assert listed < n, "nothing was certified"


def test_certified_bounds_merge_across_code_tiles(device, monkeypatch):
    """The two nearest codes sit in different code tiles, 1e-3 apart, and z is 10 % closer to the
    earlier one: far beyond the contract's slack, far below what split-bf16 distances resolve. No row
    may be certified for the later code, whichever tile order the approximate distances suggest."""
    monkeypatch.setattr(A._assign_certify, "configs", [triton.Config({"BN": 16, "BK": 16, "BD": 16})])
    monkeypatch.setattr(A._assign_exact, "configs", [triton.Config({"BN": 16, "BK": 16, "BD": 16})])
    k, d, n = 64, 20, 160
    c = torch.randn(k, d, device=device) * 4
    a = torch.randint(0, 16, (n,), device=device)  # first code tile
    b = torch.randint(32, 64, (n,), device=device)  # a later tile
    c[b] = c[a] + 1e-3 * torch.randn(n, d, device=device)
    z = c[a] + 0.475 * (c[b] - c[a])
    idx, dist, _, listed = certified(z, c)
    check_exact(z, c, idx, dist)
    assert listed > n // 2, "rows this close to two codes must go to the direct search"


def test_bad_arguments(device):
    z, c = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    with pytest.raises(ValueError, match="precision"):
        assign_fwd(z, c, precision="fp8")
    for split in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="split"):
            assign_fwd(z, c, split=split)


# --- GPU only -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_tensor_cores_keep_their_bound(precision):
    z = torch.randn(4096, 64, device="cuda")
    c = torch.randn(1024, 64, device="cuda")
    idx, dist, _ = assign_fwd(z, c, precision=precision)
    d, got = chosen_distances(z, c, idx)
    ref = d.argmin(1)
    rate = float((idx.cpu().numpy() != ref).mean())
    if precision == "exact":
        check_exact(z, c, idx, dist)
    else:
        bad = np.nonzero(got - d.min(1) > low_precision_bound(z, c, U_DOT[precision]))[0]
        assert bad.size == 0, f"rows {bad[:5]}"
        # Measured orders of magnitude on an H100 (DESIGN.md: ~6e-4 tf32, ~1e-2 bf16).
        assert rate < {"tf32": 1e-2, "bf16": 5e-2}[precision], rate
    np.testing.assert_allclose(f64(dist), got, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_auto_split_for_few_rows():
    z = torch.randn(8, 64, device="cuda")
    c = torch.randn(16384, 64, device="cuda")
    assert A._auto_split(8, 16384, z.device) > 1
    auto = assign_fwd(z, c, return_zq=True)
    one = assign_fwd(z, c, return_zq=True, split=1)
    assert all(torch.equal(a, b) for a, b in zip(auto, one))
    check_exact(z, c, auto[0], auto[1])


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets():
    # N * D > 2^31: offsets must be int64 (4.3 GB of fp16).
    n, d = (1 << 22) + 5, 513
    z = torch.randn(n, d, device="cuda", dtype=torch.float16)
    c = torch.randn(4, d, device="cuda", dtype=torch.float16)
    idx, dist, _ = assign_fwd(z, c)
    tail = slice(n - 1000, n)
    t_idx, t_dist, _ = torch_ops.assign_fwd(z[tail], c)
    assert torch.equal(idx[tail], t_idx)
    torch.testing.assert_close(dist[tail], t_dist, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32768, 1024, 256), (65536, 1024, 128), (65536, 16384, 8), (262144, 4096, 64)],
                         ids=shape_id)
def test_gpu_certified_search_on_tensor_cores(shape):
    """Real split-bf16 tensor-core dots keep the bound (answers exact) and leave few rows to the
    direct search (0.5-3 % of N(0, 1) rows under the interpreter's emulation of the same arithmetic)."""
    n, k, d = shape
    z = torch.randn(n, d, device="cuda")
    c = torch.randn(k, d, device="cuda")
    idx, dist, _, listed = certified(z, c)
    assert listed < n // 10, f"{listed} of {n} rows were not certified"
    rows = torch.randperm(n, device="cuda")[:1024]
    check_exact(z[rows], c, idx[rows], dist[rows])

