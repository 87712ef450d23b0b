"""The tensor-core searches' operands (kernels/centre.py) against the same arithmetic in PyTorch."""

import pytest
import torch

from vqtriton.kernels import centre as C

NAN, INF = float("nan"), float("inf")


def bf16_parts(y):
    """hi, lo as the kernels make them: round to nearest bf16, then the remainder, in fp32."""
    hi = y.to(torch.bfloat16).float()
    return hi, (y - hi).to(torch.bfloat16).float()


@pytest.fixture(params=[(128, 2), (4, 3)], ids=["default-blocks", "small-blocks"])
def blocks(request, monkeypatch):
    """The shipped block sizes, and tiny ones so that pass 1 runs several programs of several blocks."""
    scan_bk, scan_programs = request.param
    monkeypatch.setattr(C, "_SCAN_BK", scan_bk)
    monkeypatch.setattr(C, "_SCAN_PROGRAMS", scan_programs)
    monkeypatch.setattr(C, "_PARTS_BK", 16 if scan_bk == 4 else C._PARTS_BK)
    monkeypatch.setattr(C, "_BP", 2 if scan_bk == 4 else C._BP)
    # The interpreter's numpy-sized row and code blocks: small too, so pass 2 runs several programs.
    monkeypatch.setattr(C, "_INTERPRETER_ROWS", 16 if scan_bk == 4 else C._INTERPRETER_ROWS)


@pytest.mark.parametrize("k, d", [(1, 1), (37, 5), (130, 67), (257, 9)], ids=["K1-D1", "K37-D5", "K130-D67", "K257-D9"])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_centred_codebook(device, blocks, k, d, parts, dtype):
    c = (torch.randn(k, d, device=device) * 3 + 50).to(dtype)
    bad = torch.randperm(k, device=device)[: k // 5]
    if k > 1:
        c[bad[: len(bad) // 2], 0] = NAN
        c[bad[len(bad) // 2:], d - 1] = -INF
    bound_e = 0.375
    cb = C.centred_codebook(c, parts, bound_e)
    c32 = c.float()
    usable = torch.isfinite(c32).all(1)
    mean = (torch.where(usable[:, None], c32.double(), 0).sum(0) / usable.sum().clamp_min(1)).float()
    torch.testing.assert_close(cb.mean, mean, rtol=1e-6, atol=1e-6)
    y = torch.where(usable[:, None], c32 - cb.mean, 0.0)
    if parts == 1:
        assert torch.equal(cb.hi.float(), y) and cb.lo is None
    else:
        hi, lo = bf16_parts(y)
        assert torch.equal(cb.hi.float(), hi)
        assert (cb.lo is None) == (parts == 2)
        if parts == 3:
            assert torch.equal(cb.lo.float(), lo)
    sq = torch.where(usable, y.double().square().sum(1), INF)
    torch.testing.assert_close(cb.sq.double(), sq, rtol=1e-5, atol=0)
    if parts == 3:
        torch.testing.assert_close(cb.ce, torch.where(usable, bound_e * cb.sq, 0.0), rtol=1e-6, atol=0)
    some_code_without_nan = bool((~torch.isnan(c32).any(1)).any())
    assert cb.aux[0].item() == float(some_code_without_nan)
    assert cb.aux[1].item() == (cb.sq[usable].max().item() if usable.any() else -INF)


def test_centred_codebook_all_nan_and_huge_values(device):
    cb = C.centred_codebook(torch.full((7, 4), NAN, device=device), 3, 1.0)
    assert cb.aux.tolist() == [0.0, -INF] and torch.isinf(cb.sq).all() and (cb.ce == 0).all()
    assert (cb.mean == 0).all() and (cb.hi == 0).all()
    # A float64 mean: finite codes near fp32's limit must not overflow it.
    c = torch.full((9, 3), 3e38, device=device)
    c[::2] = 2e38
    cb = C.centred_codebook(c, 1)
    assert torch.isfinite(cb.mean).all() and torch.isfinite(cb.hi).all()


@pytest.mark.parametrize("n, d", [(1, 1), (33, 7), (70, 130)], ids=["N1-D1", "N33-D7", "N70-D130"])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_centre_rows(device, blocks, n, d, parts, dtype):
    z = (torch.randn(n, d, device=device) + 20).to(dtype)
    if n > 2:
        z[1, 0], z[2, d - 1] = NAN, INF
    mean = torch.randn(d, device=device) + 20
    hi, lo, sq = C.centre_rows(z, mean, parts)
    x = z.float() - mean
    want_sq = x.double().square().sum(1)
    finite = torch.isfinite(want_sq)
    torch.testing.assert_close(sq.double()[finite], want_sq[finite], rtol=1e-5, atol=1e-6)
    if n > 2:
        assert torch.isnan(sq[1]) and sq[2].item() == INF
    if parts == 1:
        torch.testing.assert_close(hi, x, rtol=0, atol=0, equal_nan=True)
        assert lo is None
    else:
        want_hi, want_lo = bf16_parts(x)
        ok = torch.isfinite(x)
        assert torch.equal(hi.float()[ok], want_hi[ok])
        assert (lo is None) == (parts == 2)
        if parts == 3:
            assert torch.equal(lo.float()[ok], want_lo[ok])
