"""kernels/sqerr.py: per-row and total squared error, and the backward, called directly.

Ground truth: NumPy float64 and ``vqtriton.torch_ops``. Buffers the launchers allocate with
``torch.empty`` (outputs, the total's partials) are poisoned with NaN.
"""

import numpy as np
import pytest
import torch

from vqtriton import torch_ops
from vqtriton.kernels import sqerr as S
from helpers import f64, poison as poison_modules, shape_id

SHAPES = [(1000, 333, 47), (1, 1, 1), (0, 4, 3), (75, 1, 300), (17, 9, 2048), (37, 19, 1), (300, 7, 33)]
LOW = [torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture
def poison(monkeypatch):
    poison_modules(monkeypatch, S)


def pair(n, d, device, dtype=torch.float32):
    """Two row sets; ``b`` sits near ``a`` on some rows (small differences) and far on others."""
    a = torch.randn(n, d, device=device)
    b = a + torch.randn(n, d, device=device) * torch.rand(n, 1, device=device) * 3
    return a.to(dtype), b.to(dtype)


def stored_bits(x32, dtype):
    """The bits of ``x32`` (float32) stored as ``dtype`` by a kernel's ``.to(dtype)``.

    Round to nearest even, except bfloat16 under Triton's interpreter, which truncates
    (seen with triton 3.9); a GPU rounds to nearest even.
    """
    if dtype == torch.bfloat16 and x32.device.type == "cpu":
        return (x32.view(torch.int32) >> 16).to(torch.int16)
    return x32.to(dtype).view(BITS[dtype])


def assert_rel(got, want, rtol, what):
    # At least 1-D: np.argwhere of a 0-dim array finds nothing.
    got, want = np.atleast_1d(np.asarray(got, dtype=np.float64)), np.atleast_1d(np.asarray(want, dtype=np.float64))
    assert np.isfinite(got).all(), f"{what}: a NaN/Inf (an element was not written)"
    bad = np.argwhere(np.abs(got - want) > rtol * np.abs(want))
    assert bad.size == 0, f"{what}: first mismatches (pos, got, want): " + str(
        [(tuple(p), got[tuple(p)], want[tuple(p)]) for p in bad[:5]]
    )


# --- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sqerr_rows_and_sum_match_float64(device, poison, shape):
    n, _, d = shape
    a, b = pair(n, d, device)
    want = np.square(f64(a) - f64(b)).sum(-1)
    rows = S.sqerr_rows(a, b)
    assert rows.shape == (n,) and rows.dtype == torch.float32
    assert_rel(f64(rows), want, 1e-6, "rows")
    total = S.sqerr_sum(a, b)
    assert total.shape == () and total.dtype == torch.float32
    assert_rel(f64(total), want.sum(), 1e-6, "total")
    assert_rel(f64(torch_ops.sqerr_rows(a, b)), f64(rows), 1e-6, "torch_ops rows")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sqerr_low_precision_is_its_fp32_upcast(device, poison, dtype):
    a, b = pair(300, 33, device, dtype)
    up_a, up_b = a.float(), b.float()
    assert_rel(f64(S.sqerr_rows(a, b)), f64(S.sqerr_rows(up_a, up_b)), 1e-6, "rows")
    # The total runs one pinned tile shape: same terms, same order, same bits.
    assert torch.equal(S.sqerr_sum(a, b), S.sqerr_sum(up_a, up_b))
    assert_rel(f64(S.sqerr_sum(a, b)), np.square(f64(a) - f64(b)).sum(), 1e-6, "total")


def test_sqerr_sum_is_deterministic(device, poison):
    a, b = pair(2000, 23, device)
    first = S.sqerr_sum(a, b)
    assert all(torch.equal(first, S.sqerr_sum(a, b)) for _ in range(3))


def test_sqerr_sum_second_stage_sums_every_partial(device):
    """The fixed-order second stage over several ragged chunks of partials."""
    x = torch.rand(3 * S._PARTIALS_BLOCK - 17, device=device)
    out = torch.full((), float("nan"), device=device)
    S._sum_partials_kernel[(1,)](x, out, x.numel(), BLOCK=S._PARTIALS_BLOCK)
    assert_rel(f64(out), f64(x).sum(), 1e-6, "sum of partials")


def test_sqerr_strided_inputs(device, poison):
    n, d = 70, 9
    wide_a, wide_b = torch.randn(n, d + 5, device=device), torch.randn(n, d + 3, device=device)
    a, b = wide_a[:, 2 : 2 + d], wide_b[:, :d]
    want = np.square(f64(a) - f64(b)).sum(-1)
    assert_rel(f64(S.sqerr_rows(a, b)), want, 1e-6, "rows, row strides")
    col_a = a.t().contiguous().t()
    assert_rel(f64(S.sqerr_rows(col_a, b)), want, 1e-6, "rows, column-major a")
    assert_rel(f64(S.sqerr_sum(col_a, b)), want.sum(), 1e-6, "total, column-major a")
    g = torch.randn(n, device=device)
    assert_rel(f64(S.sqerr_backward(col_a, b, g)), 2 * (f64(a) - f64(b)) * f64(g)[:, None], 1e-6, "backward")


def test_sqerr_exact_zero(device, poison):
    a = torch.randn(40, 13, device=device)
    assert torch.equal(S.sqerr_rows(a, a.clone()), torch.zeros(40, device=device))
    assert S.sqerr_sum(a, a.clone()).item() == 0.0


# --- backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_row", [False, True], ids=["total", "per_row"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sqerr_backward_matches_float64(device, poison, shape, per_row):
    n, _, d = shape
    a, b = pair(n, d, device)
    g = torch.randn(n, device=device) if per_row else torch.tensor(-0.75, device=device)
    out = S.sqerr_backward(a, b, g)
    assert out.shape == (n, d) and out.dtype == a.dtype
    g64 = f64(g)[:, None] if per_row else f64(g)
    assert_rel(f64(out), 2 * (f64(a) - f64(b)) * g64, 1e-6, "grad")
    assert_rel(f64(torch_ops.sqerr_backward(a, b, g)), f64(out), 1e-6, "torch_ops grad")


def test_sqerr_backward_expanded_grad(device, poison):
    """A per-row gradient of stride 0 (autograd's expanded ones) is read through its stride."""
    a, b = pair(50, 6, device)
    g = torch.tensor([0.5], device=device).expand(50)
    assert g.stride(0) == 0
    assert_rel(f64(S.sqerr_backward(a, b, g)), f64(a - b), 1e-6, "grad")


@pytest.mark.parametrize("per_row", [False, True], ids=["total", "per_row"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sqerr_backward_low_precision_is_its_fp32_upcast(device, poison, dtype, per_row):
    """fp32 math, one rounding to ``dtype`` at the store: the same bits as the fp32 result stored."""
    a, b = pair(120, 37, device, dtype)
    g = torch.randn(120, device=device) if per_row else torch.tensor(1.3, device=device)
    out = S.sqerr_backward(a, b, g)
    assert out.dtype == dtype
    want = stored_bits(S.sqerr_backward(a.float(), b.float(), g), dtype)
    bad = torch.nonzero(out.view(BITS[dtype]) != want)[:5].tolist()
    assert not bad, f"first mismatches (row, col): {bad}"


@pytest.mark.gpu
def test_sqerr_past_int32_offsets(device):
    """Row offsets past 2^31 elements: int64 addressing (about 13 GiB of GPU memory)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB")
    d = 32
    n = (1 << 31) // d + 3000
    a = torch.randn(n, d, device=device, dtype=torch.float16)
    b = torch.zeros_like(a)
    tail = slice(n - 3000, n)
    assert torch.equal(S.sqerr_rows(a, b)[tail], S.sqerr_rows(a[tail], b[tail]))
    g = S.sqerr_backward(a, b, torch.tensor(0.5, device=device))
    assert torch.equal(g[tail], a[tail])
