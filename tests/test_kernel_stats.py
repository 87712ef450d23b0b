"""kernels/stats.py: per-code counts and sums in one pass, called directly.

Ground truth: ``np.bincount`` (counts, exact) and ``np.add.at`` in float64 (sums), and
``vqtriton.torch_ops``. Buffers allocated with ``torch.empty`` (the deterministic sums) are
poisoned with NaN.
"""

import numpy as np
import pytest
import torch

from vqtriton import torch_ops
from vqtriton.kernels import gather as G
from vqtriton.kernels import stats as ST
from helpers import f64, poison as poison_modules, random_idx, shape_id

SHAPES = [(1000, 333, 47), (1, 1, 1), (0, 4, 3), (75, 1, 300), (17, 9, 2048), (37, 19, 1), (300, 7, 33)]
U32 = 2.0**-24
MODES = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])


@pytest.fixture
def poison(monkeypatch):
    poison_modules(monkeypatch, G)


def check_stats(idx, z, k, counts, sums):
    """Counts exactly ``np.bincount``; sums within the fp32 bound of ``np.add.at`` in float64."""
    i = idx.cpu().numpy()
    keep = i >= 0
    want_counts = np.bincount(i[keep], minlength=k)
    assert counts.shape == (k,) and counts.dtype == torch.float32
    bad = np.nonzero(f64(counts) != want_counts)[0]
    assert bad.size == 0, f"first count mismatches (code, got, want): {[(c, counts[c].item(), want_counts[c]) for c in bad[:5]]}"
    if z is None:
        assert sums is None
        return
    assert sums.shape == (k, z.shape[1]) and sums.dtype == torch.float32
    r = f64(z)
    want, mag = np.zeros((k, r.shape[1])), np.zeros((k, r.shape[1]))
    np.add.at(want, i[keep], r[keep])
    np.add.at(mag, i[keep], np.abs(r[keep]))
    got = f64(sums)
    assert np.isfinite(got).all(), "a NaN/Inf: an element was not written"
    tol = np.maximum(1e-6, want_counts * U32)[:, None] * mag
    bad = np.argwhere(np.abs(got - want) > tol)
    assert bad.size == 0, f"first sum mismatches (code, col): {bad[:5].tolist()}"


@MODES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_code_stats_matches_bincount_and_add_at(device, poison, shape, deterministic):
    n, k, d = shape
    z = torch.randn(n, d, device=device)
    idx = random_idx(n, k, device)
    counts, sums = ST.code_stats(idx, z, k, deterministic=deterministic)
    check_stats(idx, z, k, counts, sums)
    t_counts, _ = torch_ops.code_stats(idx, z, k)
    assert torch.equal(counts, t_counts)


@MODES
def test_code_stats_counts_only(device, poison, deterministic):
    n, k = 500, 37
    idx = random_idx(n, k, device)
    counts, sums = ST.code_stats(idx, None, k, deterministic=deterministic)
    check_stats(idx, None, k, counts, sums)


@MODES
def test_code_stats_edge_cases(device, poison, deterministic):
    """All rows to one code, every row masked, and no rows."""
    k, d = 6, 9
    z = torch.randn(400, d, device=device) - 5.0
    one = torch.full((400,), k - 1, device=device)
    check_stats(one, z, k, *ST.code_stats(one, z, k, deterministic=deterministic))
    none = torch.full((400,), -1, device=device)
    counts, sums = ST.code_stats(none, z, k, deterministic=deterministic)
    assert torch.equal(counts, torch.zeros(k, device=device)) and torch.equal(sums, torch.zeros(k, d, device=device))
    empty = torch.empty(0, dtype=torch.int64, device=device)
    counts, sums = ST.code_stats(empty, z[:0], k, deterministic=deterministic)
    assert torch.equal(counts, torch.zeros(k, device=device)) and torch.equal(sums, torch.zeros(k, d, device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_code_stats_low_precision_is_its_fp32_upcast(device, poison, dtype):
    n, k, d = 250, 13, 17
    z = torch.randn(n, d, device=device).to(dtype)
    idx = random_idx(n, k, device)
    counts, sums = ST.code_stats(idx, z, k, deterministic=True)
    counts_up, sums_up = ST.code_stats(idx, z.float(), k, deterministic=True)
    assert torch.equal(counts, counts_up)
    assert torch.equal(sums.view(torch.int32), sums_up.view(torch.int32))
    check_stats(idx, z, k, *ST.code_stats(idx, z, k))


def test_code_stats_deterministic_repeats_and_agrees(device, poison):
    n, k, d = 700, 29, 40
    z = torch.randn(n, d, device=device)
    idx = random_idx(n, k, device)
    c1, s1 = ST.code_stats(idx, z, k, deterministic=True)
    c2, s2 = ST.code_stats(idx, z, k, deterministic=True)
    assert torch.equal(c1, c2) and torch.equal(s1.view(torch.int32), s2.view(torch.int32))
    c3, s3 = ST.code_stats(idx, z, k)
    assert torch.equal(c1, c3)
    assert torch.allclose(s1, s3, rtol=0, atol=64 * U32 * float(z.abs().max()))


@pytest.mark.gpu
def test_code_stats_counts_exact_under_contention(device):
    """Four million rows, most into one code: integer counts stay exact under concurrent atomics."""
    n, k = 1 << 22, 3
    idx = torch.where(torch.rand(n, device=device) < 0.9, 1, torch.randint(-1, k, (n,), device=device))
    z = torch.randn(n, 8, device=device)
    for det in (False, True):
        counts, sums = ST.code_stats(idx, z, k, deterministic=det)
        check_stats(idx, z, k, counts, sums)
