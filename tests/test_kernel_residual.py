"""The residual VQ launchers (``kernels/residual.py`` and their torch path, ``vqtriton/residual_torch.py``)
against the NumPy float64 reference (``vqtriton.reference.residual``).

Both backends run every test: "triton" through Triton's interpreter on a machine without CUDA, and
"torch". Shapes are interpreter-sized and awkward (N <= 200, K ~ 37, D ~ 13, L = 3..5, sizes that differ
per level). Outputs and scratch buffers are poisoned (NaN, or -7 for integers) before the kernels run.
"""

import numpy as np
import pytest
import torch

from vqtriton import reference as R
from vqtriton import residual_torch
from vqtriton.functional import unit
from vqtriton.kernels import residual as K
from vqtriton.kernels.assign import assign_fwd
from helpers import f64, poison as poison_modules

BACKENDS = ["triton", "torch"]
LAUNCHERS = {"triton": K, "torch": residual_torch}
PRECISIONS = ["exact", "tf32", "bf16"]
EXACT = 1 + 2**-16
# Unit roundoff of the dot's operands (as tests/test_kernel_assign.py): tf32 may truncate, bf16 rounds.
U_DOT = {"tf32": 2.0**-10, "bf16": 2.0**-8}


@pytest.fixture(params=BACKENDS)
def launch(request, monkeypatch):
    poison_modules(monkeypatch, K, residual_torch)
    return LAUNCHERS[request.param]


def books(sizes, d, device, scale=0.6, dtype=torch.float32):
    """Codebooks of shrinking scale (as trained residual levels are), and their stacked form."""
    cbs = [torch.randn(k, d, device=device).mul(scale**l).to(dtype) for l, k in enumerate(sizes)]
    return cbs, torch.cat(cbs)


def first(rows, *cols):
    rows = np.asarray(rows).reshape(-1)[:5]
    return [(int(r), *(np.asarray(c)[r].tolist() for c in cols)) for r in rows]


def replayed(z, cbs, idx, cosine=False):
    """Each level's input x_l as the launchers compute it (fp32 residual, the normalised code subtracted),
    float64, ``[L, N, D]``."""
    r = z.float()
    xs = []
    for l, c in enumerate(cbs):
        x = unit(r) if cosine else r
        xs.append(f64(x))
        i = idx[:, l]
        r = r - torch.where((i >= 0)[:, None], c.float()[i.clamp_min(0)], 0)
    return np.stack(xs)


def check(z, cbs, out, cosine=False, mask=None, levels=None, same_index=True, precision="exact"):
    """Indices equal to the float64 residual loop (``same_index``), each level's code within the precision
    contract for the residual the launcher computed, z_q the sum of the chosen codes, distances direct."""
    idx, zq, dist = out
    n, n_levels = z.shape[0], len(cbs)
    assert idx.dtype == torch.int64 and idx.shape == (n, n_levels)
    assert zq.shape == z.shape and dist.shape == (n, n_levels)
    codes = [unit(c) if cosine else c for c in cbs]  # what the launcher got
    ref_i, ref_q, ref_d = R.residual_nearest(f64(z), [f64(c) for c in cbs], "cosine" if cosine else "l2",
                                             None if mask is None else mask.cpu().numpy(), levels)
    i = idx.cpu().numpy()
    if same_index:
        bad = np.nonzero((i != ref_i).any(1))[0]
        assert bad.size == 0, f"(row, got, want): {first(bad, i, ref_i)}"
    xs = replayed(z, codes, idx, cosine)
    d = f64(dist)
    for l, c in enumerate(codes):
        ok = i[:, l] >= 0
        if not ok.any():
            continue
        dl = R.squared_distances(xs[l][ok], f64(c))
        got = dl[np.arange(ok.sum()), i[ok, l]]
        if precision == "exact":
            bound = dl.min(1) * EXACT
        else:
            x, y = xs[l][ok] - f64(c).mean(0), f64(c) - f64(c).mean(0)
            nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1).max()
            u = U_DOT[precision]
            bound = dl.min(1) + 2 * 1.05 * (2 * (2 * u + u * u) * nx * ny + (2 * z.shape[1] + 16) * 2.0**-24 * (nx + ny) ** 2)
        bad = np.nonzero(got > bound)[0]
        assert bad.size == 0, f"level {l} contract (row, got, min): {first(bad, got, dl.min(1))}"
        np.testing.assert_allclose(d[ok, l], got, rtol=1e-5, atol=1e-6, err_msg=f"level {l} distance")
    want_q = np.zeros_like(f64(z))
    for l, c in enumerate(codes):
        ok = i[:, l] >= 0
        want_q[ok] += f64(c)[i[ok, l]]
    np.testing.assert_allclose(f64(zq), want_q, rtol=1e-6, atol=1e-6)
    if same_index:
        np.testing.assert_allclose(f64(zq), ref_q, rtol=1e-5, atol=1e-5)
        fine = np.isfinite(ref_d)
        np.testing.assert_allclose(d[fine], ref_d[fine], rtol=1e-4, atol=1e-5)


SHAPES = [(150, 37, 13, 4), (1, 1, 1, 1), (7, 5, 3, 3), (33, 9, 40, 5), (64, 2, 1, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-K{}-D{}-L{}".format(*s))
def test_exact_matches_the_reference(device, launch, shape):
    n, k, d, n_levels = shape
    cbs, flat = books([k] * n_levels, d, device)
    z = torch.randn(n, d, device=device)
    check(z, cbs, launch.residual_assign_fwd(z, flat, [k] * n_levels))


def test_no_rows(device, launch):
    cbs, flat = books([5, 3], 4, device)
    idx, zq, dist = launch.residual_assign_fwd(torch.randn(0, 4, device=device), flat, [5, 3])
    assert idx.shape == (0, 2) and zq.shape == (0, 4) and dist.shape == (0, 2)


@pytest.mark.parametrize("sizes", [(37, 1, 20, 5), (3, 64, 2)], ids=str)
def test_per_level_sizes(device, launch, sizes):
    cbs, flat = books(sizes, 13, device)
    z = torch.randn(120, 13, device=device)
    check(z, cbs, launch.residual_assign_fwd(z, flat, sizes))


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_within_its_bound(device, launch, precision):
    cbs, flat = books((37, 29, 33), 13, device)
    z = torch.randn(150, 13, device=device)
    check(z, cbs, launch.residual_assign_fwd(z, flat, (37, 29, 33), precision=precision), same_index=False,
          precision=precision)


def test_offset_data(device, launch):
    # A large common offset at level 0 (100 + N(0, 1)): the expanded form alone would lose it.
    cbs, flat = books((40, 30, 20), 16, device)
    cbs[0] = cbs[0] + 100
    flat = torch.cat(cbs)
    z = torch.randn(150, 16, device=device) + 100
    check(z, cbs, launch.residual_assign_fwd(z, flat, (40, 30, 20)))


def test_exact_ties_go_to_the_lowest_index(device, launch):
    # Small integers: residuals and distances are exact in fp32, so ties are exact ties, at every level.
    d, sizes = 5, (37, 23, 31)
    cbs = [torch.randint(-2, 3, (k, d), device=device).float() for k in sizes]
    cbs[0][30] = cbs[0][4]  # duplicates: the certified bound can never separate them
    cbs[1][20] = cbs[1][2]
    cbs[2][:] = cbs[2][:1]  # every code of the last level the same: every row ties, all listed
    z = torch.randint(-3, 4, (150, d), device=device).float()
    z[0] = cbs[0][30]
    out = launch.residual_assign_fwd(z, torch.cat(cbs), sizes)
    check(z, cbs, out)
    assert out[0][0, 0] == 4 and (out[0][:, 2] == 0).all()
    d0 = R.squared_distances(f64(z), f64(cbs[0]))
    assert ((d0 == d0.min(1, keepdims=True)).sum(1) > 1).sum() > 20, "the data should be full of exact ties"


def test_certified_and_plain_search_agree(device):
    cbs, flat = books((37, 29, 33, 11), 13, device)
    z = torch.randn(150, 13, device=device)
    a = K.residual_assign_fwd(z, flat, (37, 29, 33, 11))
    b = K.residual_assign_fwd(z, flat, (37, 29, 33, 11), certified=False)
    for name, x, y in zip(("idx", "z_q", "dist"), a, b):
        assert torch.equal(x, y), name


def test_equals_a_loop_of_assign(device):
    """In the interpreter the fused kernel's arithmetic is that of L assign launches on the fp32 residual,
    in every precision (on a GPU the tiles, and so the roundings of tf32 / bf16, may differ)."""
    cbs, flat = books((37, 29, 33), 13, device)
    z = torch.randn(100, 13, device=device)
    for precision in PRECISIONS:
        idx, zq, dist = K.residual_assign_fwd(z, flat, (37, 29, 33), precision=precision)
        r, q_sum = z.clone(), torch.zeros_like(z)
        for l, c in enumerate(cbs):
            i, dl, q = assign_fwd(r, c, precision=precision, return_zq=True)
            assert torch.equal(idx[:, l], i) and torch.equal(dist[:, l], dl), (precision, l)
            r, q_sum = r - q, q_sum + q
        assert torch.equal(zq, q_sum), precision


def test_backends_agree(device):
    cbs, flat = books((37, 29, 33, 5), 13, device)
    z = torch.randn(150, 13, device=device)
    for cosine in (False, True):
        codes = unit(flat) if cosine else flat
        a = K.residual_assign_fwd(z, codes, (37, 29, 33, 5), cosine=cosine)
        b = residual_torch.residual_assign_fwd(z, codes, (37, 29, 33, 5), cosine=cosine)
        assert torch.equal(a[0], b[0]), cosine
        torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cosine(device, launch, precision):
    sizes = (37, 20, 29)
    cbs, flat = books(sizes, 13, device)
    z = torch.randn(130, 13, device=device) * 3
    out = launch.residual_assign_fwd(z, unit(flat), sizes, precision=precision, cosine=True)
    check(z, cbs, out, cosine=True, same_index=precision == "exact", precision=precision)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
def test_half_inputs_equal_their_fp32_upcast(device, launch, dtypes):
    cbs, flat = books((37, 20, 11), 13, device, dtype=dtypes[1])
    z = torch.randn(100, 13, device=device).to(dtypes[0])
    a = launch.residual_assign_fwd(z, flat, (37, 20, 11))
    b = launch.residual_assign_fwd(z.float(), flat.float(), (37, 20, 11))
    for name, x, y in zip(("idx", "z_q", "dist"), a, b):
        assert torch.equal(x, y), name
    assert a[1].dtype == torch.float32


def test_row_strides(device, launch):
    cbs, flat = books((37, 20), 13, device)
    big = torch.randn(200, 30, device=device)
    z = big[::2, 5:18]
    a = launch.residual_assign_fwd(z, flat, (37, 20))
    b = launch.residual_assign_fwd(z.contiguous(), flat, (37, 20))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --- NaN, Inf, masks, levels ---------------------------------------------------------------------------


def test_nan_and_inf_rows(device, launch):
    sizes = (37, 20, 11)
    cbs, flat = books(sizes, 13, device)
    cbs[1][3, 2] = float("nan")  # a NaN code is never chosen while a finite one exists
    cbs[2][5, 0] = float("inf")
    flat = torch.cat(cbs)
    z = torch.randn(60, 13, device=device)
    z[4, 7] = float("nan")
    z[9, 0] = float("inf")
    idx, zq, dist = launch.residual_assign_fwd(z, flat, sizes)
    assert (idx[[4, 9]] == -1).all() and (zq[[4, 9]] == 0).all()
    assert torch.isnan(dist[4]).all() and torch.isinf(dist[9]).all() and (dist[9] > 0).all()
    keep = torch.ones(60, dtype=torch.bool, device=device)
    keep[[4, 9]] = False
    assert (idx[:, 1] != 3).all() and (idx[:, 2] != 5).all()
    check(z[keep], cbs, (idx[keep], zq[keep], dist[keep]))


def test_a_row_that_overflows_at_a_later_level(device, launch):
    # Level 0 is finite (distance 2.5e37); every distance of level 1 passes float32's range (4e38):
    # -1 from level 1 on, the distance +Inf there and after, z_q = level 0's code.
    d = 3
    c0 = torch.zeros(4, d, device=device)
    c0[2, 0] = 1e19
    c1 = torch.zeros(5, d, device=device)
    c1[:, 0] = -1.5e19
    c1[:, 1] = torch.arange(5, device=device).float()
    c2 = torch.randn(6, d, device=device)
    z = torch.randn(8, d, device=device)
    z[3] = torch.tensor([1.5e19, 0.0, 0.0])
    idx, zq, dist = launch.residual_assign_fwd(z, torch.cat([c0, c1, c2]), (4, 5, 6))
    assert idx[3].tolist() == [2, -1, -1] and torch.equal(zq[3], c0[2])
    assert torch.isfinite(dist[3, 0]) and torch.isinf(dist[3, 1:]).all()
    assert (idx[[0, 1, 2, 4]] >= 0).all()


def test_all_codes_nan(device, launch):
    cbs, flat = books((7, 5), 4, device)
    cbs[1][:] = float("nan")
    idx, zq, dist = launch.residual_assign_fwd(torch.randn(20, 4, device=device), torch.cat(cbs), (7, 5))
    assert (idx[:, 0] >= 0).all() and (idx[:, 1] == -1).all() and torch.isnan(dist[:, 1]).all()
    torch.testing.assert_close(zq, cbs[0][idx[:, 0]])


def test_masked_rows(device, launch):
    sizes = (37, 20, 29)
    cbs, flat = books(sizes, 13, device)
    z = torch.randn(130, 13, device=device)
    keep = torch.rand(130, device=device) > 0.3
    z[~keep] = float("nan")  # padding: whatever masked rows hold
    idx, zq, dist = launch.residual_assign_fwd(z, flat, sizes, keep=keep)
    assert (idx[~keep] == -1).all() and (zq[~keep] == 0).all() and (dist[~keep] == 0).all()
    full = launch.residual_assign_fwd(z[keep], flat, sizes)
    for x, y in zip((idx[keep], zq[keep], dist[keep]), full):
        assert torch.equal(x, y)
    check(z, cbs, (idx, zq, dist), mask=keep)


@pytest.mark.parametrize("n_run", [0, 1, 2, 4, 9])
def test_levels_act_as_masked(device, launch, n_run):
    sizes = (37, 20, 29, 11)
    cbs, flat = books(sizes, 13, device)
    z = torch.randn(90, 13, device=device)
    keep = torch.rand(90, device=device) > 0.2
    z[5, 1] = float("nan")
    levels = torch.tensor(n_run, device=device)
    idx, zq, dist = launch.residual_assign_fwd(z, flat, sizes, keep=keep, levels=levels)
    m = min(n_run, 4)
    assert (idx[:, m:] == -1).all() and (dist[:, m:] == 0).all()
    full = launch.residual_assign_fwd(z, flat, sizes, keep=keep)
    assert torch.equal(idx[:, :m], full[0][:, :m])
    torch.testing.assert_close(dist[:, :m], full[2][:, :m], rtol=0, atol=0, equal_nan=True)
    ref_i, _, ref_d = R.residual_nearest(f64(z), [f64(c) for c in cbs], mask=keep.cpu().numpy(), levels=n_run)
    assert (idx.cpu().numpy() == ref_i).all()
    np.testing.assert_array_equal(np.isnan(f64(dist)), np.isnan(ref_d))
    if keep[5] and n_run > 0:
        assert torch.isnan(dist[5, :m]).all()


# --- backward ----------------------------------------------------------------------------------------------


def grads_case(device, sizes=(37, 20, 29, 11), n=90, d=13, cosine=False, mask=False):
    cbs, flat = books(sizes, d, device)
    codes = unit(flat) if cosine else flat
    z = torch.randn(n, d, device=device) * (2 if cosine else 1)
    keep = (torch.rand(n, device=device) > 0.25) if mask else None
    idx, _, _ = K.residual_assign_fwd(z, codes, sizes, cosine=cosine, keep=keep)
    g = torch.randn(n, d, device=device)
    w, v = torch.rand(n, len(sizes), device=device), torch.rand(n, len(sizes), device=device)
    return cbs, codes, z, keep, idx, g, w, v


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("rotate", [False, True], ids=["st", "rotation"])
@pytest.mark.parametrize("output_grad", ["first", "every"])
def test_backward_matches_the_reference(device, launch, output_grad, rotate, cosine):
    sizes = (37, 20, 29, 11)
    cbs, codes, z, keep, idx, g, w, v = grads_case(device, sizes, cosine=cosine)
    dz, dcb = launch.residual_backward(z, codes, sizes, idx, g, w, v, cosine=cosine, output_grad=output_grad,
                                       rotate=rotate)
    assert dz.dtype == z.dtype and dcb.dtype == torch.float32 and dcb.shape == codes.shape
    # The reference's codebook gradient is for the raw codes; the launcher's for the codes it was given.
    want_dz, want_dc = R.residual_quantize_grad(f64(z), [f64(c) for c in codes.split(sizes)], idx.cpu().numpy(), f64(g),
                                                f64(w), f64(v), "l2", output_grad, rotate)
    if cosine:
        want_dz, _ = R.residual_quantize_grad(f64(z), [f64(c) for c in cbs], idx.cpu().numpy(), f64(g), f64(w), f64(v),
                                              "cosine", output_grad, rotate)
        x, q, r = R.residual_inputs(f64(z), [f64(c) for c in cbs], idx.cpu().numpy(), "cosine")
        want_dc = []
        for l, k in enumerate(sizes):
            i = idx.cpu().numpy()[:, l]
            dc = np.zeros((k, z.shape[1]))
            np.add.at(dc, i[i >= 0], (2 * f64(v)[:, l, None] * (q[l] - x[l]))[i >= 0])
            want_dc.append(dc)
    np.testing.assert_allclose(f64(dz), want_dz, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(f64(dcb), np.concatenate(want_dc), rtol=1e-4, atol=2e-5)


def test_cosine_backward_at_tiny_residuals(device, launch):
    """Below the normalisation's eps (1e-12) its Jacobian is I / eps, as F.normalize's."""
    sizes = (7, 5)
    cbs, flat = books(sizes, 4, device)
    codes = unit(flat)
    z = torch.randn(6, 4, device=device)
    z[2] = 1e-14
    idx, _, _ = K.residual_assign_fwd(z, codes, sizes, cosine=True)
    g, w, v = torch.randn(6, 4, device=device), torch.rand(6, 2, device=device), torch.rand(6, 2, device=device)
    dz, _ = launch.residual_backward(z, codes, sizes, idx, g, w, v, cosine=True)
    want, _ = R.residual_quantize_grad(f64(z), [f64(c) for c in cbs], idx.cpu().numpy(), f64(g), f64(w), f64(v), "cosine")
    np.testing.assert_allclose(f64(dz), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("output_grad", ["first", "every"])
def test_backward_masks_and_levels(device, launch, output_grad):
    sizes = (37, 20, 29, 11)
    cbs, codes, z, keep, _, g, w, v = grads_case(device, sizes, mask=True)
    z[~keep] = float("nan")
    levels = torch.tensor(2, device=device)
    idx, _, _ = K.residual_assign_fwd(z, codes, sizes, keep=keep, levels=levels)
    dz, dcb = launch.residual_backward(z, codes, sizes, idx, g, w, v, output_grad=output_grad, rotate=True,
                                       keep=keep, levels=levels)
    assert (dz[~keep] == 0).all() and torch.isfinite(dz).all()
    want_dz, want_dc = R.residual_quantize_grad(f64(torch.where(keep[:, None], z, 0)), [f64(c) for c in cbs],
                                                idx.cpu().numpy(), f64(g), f64(w), f64(v), "l2", output_grad, True,
                                                mask=keep.cpu().numpy(), levels=2)
    np.testing.assert_allclose(f64(dz), want_dz, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(f64(dcb), np.concatenate(want_dc), rtol=1e-4, atol=2e-5)
    assert (dcb[sum(sizes[:2]):] == 0).all(), "a dropped level gets no codebook gradient"


def test_backward_without_grad_out_or_codebook_grad(device, launch):
    sizes = (37, 20, 29)
    cbs, codes, z, _, idx, g, w, v = grads_case(device, sizes)
    dz, dcb = launch.residual_backward(z, codes, sizes, idx, None, w, None, output_grad="every", rotate=True)
    assert dcb is None
    want, _ = R.residual_quantize_grad(f64(z), [f64(c) for c in cbs], idx.cpu().numpy(), np.zeros(z.shape), f64(w),
                                       np.zeros(w.shape), "l2", "every", True)
    np.testing.assert_allclose(f64(dz), want, rtol=1e-4, atol=2e-5)


def test_backward_expanded_weights(device, launch):
    # A sum's gradient arrives expanded: stride 0 along both dims.
    sizes = (37, 20, 29)
    cbs, codes, z, _, idx, g, _, _ = grads_case(device, sizes)
    w = torch.tensor(0.3, device=device).expand(z.shape[0], 3)
    v = torch.tensor(0.7, device=device).expand(z.shape[0], 3)
    a = launch.residual_backward(z, codes, sizes, idx, g, w, v)
    b = launch.residual_backward(z, codes, sizes, idx, g, w.contiguous(), v.contiguous())
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)


def test_backward_deterministic(device, launch):
    sizes = (37, 20, 29)
    _, codes, z, _, idx, g, w, v = grads_case(device, sizes)
    a = launch.residual_backward(z, codes, sizes, idx, g, w, v, deterministic=True)
    b = launch.residual_backward(z, codes, sizes, idx, g, w, v, deterministic=True)
    c = launch.residual_backward(z, codes, sizes, idx, g, w, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[1], c[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_half_z(device, launch, dtype):
    sizes = (37, 20)
    _, codes, z, _, idx, g, w, v = grads_case(device, sizes)
    zh = z.to(dtype)
    dz, dcb = launch.residual_backward(zh, codes, sizes, idx, g, w, v)
    dz32, dcb32 = launch.residual_backward(zh.float(), codes, sizes, idx, g, w, v)
    want = dz32.to(dtype)
    if launch is K and dtype == torch.bfloat16 and device == "cpu":
        want = (dz32.view(torch.int32) >> 16).to(torch.int16).view(dtype)  # the interpreter truncates to bf16
    assert dz.dtype == dtype and torch.equal(dz, want)
    torch.testing.assert_close(dcb, dcb32, rtol=1e-6, atol=1e-6)


# --- EMA statistics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_stats_match_the_reference(device, launch, cosine, deterministic):
    sizes = (37, 20, 29)
    cbs, codes, z, keep, idx, _, _, _ = grads_case(device, sizes, cosine=cosine, mask=True)
    idx = torch.where(keep[:, None], idx, -1)
    counts, sums = launch.residual_stats(z, codes, sizes, idx, cosine=cosine, deterministic=deterministic)
    want_n, want_s = R.residual_code_stats(f64(z), [f64(c) for c in cbs], idx.cpu().numpy(),
                                           "cosine" if cosine else "l2")
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    np.testing.assert_array_equal(f64(counts), np.concatenate(want_n))
    np.testing.assert_allclose(f64(sums), np.concatenate(want_s), rtol=1e-5, atol=1e-5)
    if deterministic:
        again = launch.residual_stats(z, codes, sizes, idx, cosine=cosine, deterministic=True)
        assert torch.equal(sums, again[1])


# --- on a GPU: compiled kernels, autotuned tiles, real tensor cores --------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
def test_gpu_against_the_torch_path(cosine):
    """Every autotuned config (the tuner's timing runs included) against the torch path, at shapes with
    many programs and code tiles: exact indices equal, low precision within its bound, the backward and
    the statistics close."""
    sizes = (1024, 333, 1024, 77, 512, 1024)
    cbs, flat = books(sizes, 64, "cuda")
    codes = unit(flat) if cosine else flat
    z = torch.randn(5000, 64, device="cuda")
    keep = torch.rand(5000, device="cuda") > 0.1
    levels = torch.tensor(5, device="cuda")
    out = K.residual_assign_fwd(z, codes, sizes, cosine=cosine, keep=keep, levels=levels)
    want = residual_torch.residual_assign_fwd(z, codes, sizes, cosine=cosine, keep=keep, levels=levels)
    assert torch.equal(out[0], want[0])
    torch.testing.assert_close(out[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], want[2], rtol=1e-4, atol=1e-5)
    for precision in ("tf32", "bf16"):
        low = K.residual_assign_fwd(z[:2000], codes, sizes, precision=precision, cosine=cosine)
        check(z[:2000], cbs, low, cosine=cosine, same_index=False, precision=precision)
    idx = out[0]
    g, w, v = torch.randn_like(z), torch.rand(5000, 6, device="cuda"), torch.rand(5000, 6, device="cuda")
    for output_grad, rotate in (("first", False), ("every", True)):
        for deterministic in (False, True):
            got = K.residual_backward(z, codes, sizes, idx, g, w, v, cosine=cosine, output_grad=output_grad,
                                      rotate=rotate, keep=keep, levels=levels, deterministic=deterministic)
            ref = residual_torch.residual_backward(z, codes, sizes, idx, g, w, v, cosine=cosine,
                                                   output_grad=output_grad, rotate=rotate, keep=keep, levels=levels)
            torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-3)
    counts, sums = K.residual_stats(z, codes, sizes, idx, cosine=cosine)
    ref_n, ref_s = residual_torch.residual_stats(z, codes, sizes, idx, cosine=cosine)
    assert torch.equal(counts, ref_n)
    torch.testing.assert_close(sums, ref_s, rtol=1e-4, atol=1e-3)
