"""kernels/gather.py: the bit-exact gather and the scatter-add (atomic and deterministic), called directly.

Ground truth: NumPy float64 (``np.add.at``) and ``vqtriton.torch_ops``. Buffers the launchers
allocate with ``torch.empty`` are poisoned (NaN, or -7 for integers) so an element a kernel
forgets to write shows up.
"""

import numpy as np
import pytest
import torch

from vqtriton import torch_ops
from vqtriton.kernels import gather as G
from helpers import f64, poison as poison_modules, random_idx, shape_id

SHAPES = [(1000, 333, 47), (1, 1, 1), (0, 4, 3), (75, 1, 300), (17, 9, 2048), (37, 19, 1), (300, 7, 33)]
LOW = [torch.float16, torch.bfloat16]
U32 = 2.0**-24
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture
def poison(monkeypatch):
    poison_modules(monkeypatch, G)


def ref_scatter(idx, rows, k):
    """float64 ``np.add.at`` sums, sums of absolute values (the error scale) and counts per code."""
    i, r = idx.cpu().numpy(), f64(rows)
    keep = i >= 0
    out, mag = np.zeros((k, r.shape[1])), np.zeros((k, r.shape[1]))
    np.add.at(out, i[keep], r[keep])
    np.add.at(mag, i[keep], np.abs(r[keep]))
    return out, mag, np.bincount(i[keep], minlength=k)


def assert_sums_close(got, ref, mag, counts, slack=0):
    """fp32 sums within ``max(1e-6, (count + slack) u)`` of float64, relative to the sum of |terms|.

    The bound of a recursive fp32 sum of ``count`` terms is ``(count - 1) u sum|x|``; codes with
    no rows must hold exact zeros.
    """
    got = f64(got)
    assert np.isfinite(got).all(), "a NaN/Inf: an element was not written"
    tol = np.maximum(1e-6, (counts + slack) * U32)[:, None] * mag
    bad = np.argwhere(np.abs(got - ref) > tol)
    assert bad.size == 0, "first mismatches (code, col, got, want): " + str(
        [(int(k), int(j), got[k, j], ref[k, j]) for k, j in bad[:5]]
    )


# --- gather -------------------------------------------------------------------------------------


def special_codebook(k, d, dtype, device):
    """Random codes with NaN, -0.0, +-Inf and a subnormal planted: a bit-exact copy keeps them all."""
    cb = torch.randn(k, d, device=device).to(dtype)
    flat = cb.view(-1)
    specials = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40], device=device)
    m = min(flat.numel(), specials.numel())
    flat[torch.randperm(flat.numel(), device=device)[:m]] = specials[:m].to(dtype)
    return cb


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gather_bit_exact(device, poison, shape, dtype):
    n, k, d = shape
    cb = special_codebook(k, d, dtype, device)
    idx = random_idx(n, k, device)
    out = G.gather(idx, cb)
    assert out.shape == (n, d) and out.dtype == dtype and out.device == cb.device
    want = torch_ops.gather(idx, cb)
    bits, want_bits = out.view(BITS[dtype]), want.view(BITS[dtype])
    bad = torch.nonzero(bits != want_bits)[:5].tolist()
    assert not bad, f"first mismatches (row, col): {bad}"
    # -1 rows are +0.0 bit patterns, and the valid rows are the codebook's values (float64 view).
    assert (bits[idx < 0] == 0).all()
    keep = (idx >= 0).cpu().numpy()
    np.testing.assert_array_equal(f64(out)[keep], f64(cb)[idx.cpu().numpy()[keep]])


def test_gather_strided_codebook(device, poison):
    """A row stride wider than D goes to the kernel as is; a transposed codebook is copied first."""
    k, d = 29, 13
    wide = torch.randn(k, d + 7, device=device)
    idx = random_idx(150, k, device)
    view = wide[:, 3 : 3 + d]
    assert view.stride(0) == d + 7
    assert torch.equal(G.gather(idx, view), torch_ops.gather(idx, view))
    cols = torch.randn(d, k, device=device).t()
    assert cols.stride(-1) != 1
    assert torch.equal(G.gather(idx, cols), torch_ops.gather(idx, cols))


def test_gather_all_masked(device, poison):
    out = G.gather(torch.full((9,), -1, device=device), torch.randn(4, 5, device=device))
    assert torch.equal(out.view(torch.int32), torch.zeros(9, 5, dtype=torch.int32, device=device))


# --- scatter_add --------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_scatter_add_matches_add_at(device, poison, shape, deterministic):
    n, k, d = shape
    rows = torch.randn(n, d, device=device)
    idx = random_idx(n, k, device)
    out = G.scatter_add(idx, rows, k, deterministic=deterministic)
    assert out.shape == (k, d) and out.dtype == torch.float32
    ref, mag, counts = ref_scatter(idx, rows, k)
    assert_sums_close(out, ref, mag, counts)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_scatter_add_all_rows_to_one_code(device, poison, deterministic):
    n, k, d = 600, 5, 19
    rows = torch.randn(n, d, device=device) + 3.0
    idx = torch.full((n,), 2, device=device)
    out = G.scatter_add(idx, rows, k, deterministic=deterministic)
    ref, mag, counts = ref_scatter(idx, rows, k)
    assert_sums_close(out, ref, mag, counts)
    assert (out[torch.arange(k, device=device) != 2] == 0).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_scatter_add_skips_masked_rows(device, poison, deterministic):
    """-1 rows add nothing, even when they hold huge values; all -1 gives exact zeros."""
    n, k, d = 40, 6, 7
    rows = torch.randn(n, d, device=device)
    idx = random_idx(n, k, device, masked=0.5)
    rows[idx < 0] = 1e30
    ref, mag, counts = ref_scatter(idx, torch.where((idx < 0)[:, None], 0.0, rows), k)
    assert_sums_close(G.scatter_add(idx, rows, k, deterministic=deterministic), ref, mag, counts)
    none = G.scatter_add(torch.full((n,), -1, device=device), rows, k, deterministic=deterministic)
    assert torch.equal(none, torch.zeros(k, d, device=device))


@pytest.mark.parametrize("shape", [(1000, 333, 47), (17, 9, 2048), (300, 7, 33)], ids=shape_id)
def test_scatter_add_deterministic_agrees_with_atomic(device, poison, shape):
    n, k, d = shape
    rows = torch.randn(n, d, device=device)
    idx = random_idx(n, k, device)
    first = G.scatter_add(idx, rows, k, deterministic=True)
    assert torch.equal(first.view(torch.int32), G.scatter_add(idx, rows, k, deterministic=True).view(torch.int32))
    atomic = G.scatter_add(idx, rows, k)
    _, mag, counts = ref_scatter(idx, rows, k)
    # Two fp32 sums of the same terms in two orders: each within its bound of the exact sum.
    assert_sums_close(atomic, f64(first), 2 * mag, counts)
    # And the torch version (index_add_) agrees the same way.
    assert_sums_close(torch_ops.scatter_add(idx, rows, k), f64(first), 2 * mag, counts)


@pytest.mark.parametrize("piece", [1, 3, 8])
def test_scatter_add_deterministic_pieces(device, poison, monkeypatch, piece):
    """Segments cut into many pieces (a collapsed code, empty codes, masked rows, a code whose size
    is a multiple of the piece): the same sums, and the same bits on every run."""
    monkeypatch.setattr(G, "_PIECE", piece)
    n, k, d = 203, 9, 13
    idx = torch.full((n,), 4, device=device)
    idx[:40] = torch.randint(0, 3, (40,), device=device)
    idx[40:64] = 7  # 24 rows: a multiple of every piece size here
    idx[64:80] = -1
    idx = idx[torch.randperm(n, device=device)]
    rows = torch.randn(n, d, device=device) + 2.0
    out = G.scatter_add(idx, rows, k, deterministic=True)
    ref, mag, counts = ref_scatter(idx, torch.where((idx < 0)[:, None], 0.0, rows), k)
    assert_sums_close(out, ref, mag, counts)
    assert (out[[5, 6, 8]] == 0).all()
    assert torch.equal(out.view(torch.int32), G.scatter_add(idx, rows, k, deterministic=True).view(torch.int32))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_scatter_add_low_precision_is_its_fp32_upcast(device, poison, dtype):
    n, k, d = 200, 11, 21
    rows = torch.randn(n, d, device=device).to(dtype)
    idx = random_idx(n, k, device)
    up = rows.float()
    # Same terms in the same order: the deterministic mode gives the same bits.
    det, det_up = G.scatter_add(idx, rows, k, deterministic=True), G.scatter_add(idx, up, k, deterministic=True)
    assert torch.equal(det.view(torch.int32), det_up.view(torch.int32))
    _, mag, counts = ref_scatter(idx, up, k)
    assert_sums_close(G.scatter_add(idx, rows, k), f64(G.scatter_add(idx, up, k)), 2 * mag, counts)


def test_scatter_add_strided_rows(device, poison):
    n, k, d = 90, 8, 10
    wide = torch.randn(n, d + 4, device=device)
    rows = wide[:, 1 : 1 + d]
    idx = random_idx(n, k, device)
    ref, mag, counts = ref_scatter(idx, rows, k)
    for det in (False, True):
        assert_sums_close(G.scatter_add(idx, rows, k, deterministic=det), ref, mag, counts)
        assert_sums_close(G.scatter_add(idx, rows.t().contiguous().t(), k, deterministic=det), ref, mag, counts)


# --- GPU only: real concurrency -----------------------------------------------------------------


@pytest.mark.gpu
def test_scatter_add_atomics_under_contention(device):
    """A million rows into four codes: every atomic add lands (checked against float64)."""
    n, k, d = 1 << 20, 4, 64
    rows = torch.randn(n, d, device=device)
    idx = torch.randint(0, k, (n,), device=device)
    ref, mag, counts = ref_scatter(idx, rows, k)
    assert_sums_close(G.scatter_add(idx, rows, k), ref, mag, counts)
    assert_sums_close(G.scatter_add(idx, rows, k, deterministic=True), ref, mag, counts)


@pytest.mark.gpu
def test_scatter_add_deterministic_is_bitwise_reproducible(device):
    """The atomic mode's bits change from run to run on such data; the deterministic mode's never do."""
    n, k, d = 1 << 20, 4, 64
    rows = torch.randn(n, d, device=device)
    idx = torch.randint(0, k, (n,), device=device)
    det = [G.scatter_add(idx, rows, k, deterministic=True).view(torch.int32) for _ in range(5)]
    assert all(torch.equal(det[0], o) for o in det[1:])
    atomic = [G.scatter_add(idx, rows, k).view(torch.int32) for _ in range(5)]
    assert any(not torch.equal(atomic[0], o) for o in atomic[1:]), "atomics looked deterministic: the test shows nothing"


@pytest.mark.gpu
def test_gather_and_scatter_past_int32_offsets(device):
    """Row offsets past 2^31 elements: int64 addressing (about 5 GiB of GPU memory)."""
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs a GPU with 16 GiB")
    d = 64
    n = (1 << 31) // d + 3000
    k = 7
    cb = torch.randn(k, d, device=device, dtype=torch.float16)
    idx = torch.randint(0, k, (n,), device=device)
    out = G.gather(idx, cb)
    tail = slice(n - 5000, n)
    assert torch.equal(out[tail], cb[idx[tail]])
    idx[: n - 5000] = -1
    ref, mag, counts = ref_scatter(idx[tail], out[tail], k)
    assert_sums_close(G.scatter_add(idx, out, k), ref, mag, counts)
