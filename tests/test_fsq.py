"""vqtriton.FSQ against the NumPy reference: codes, indices, straight-through gradients, layouts, masks,
noise dropout, the index helpers, and every code reachable from bfloat16 / float16 inputs (vqp #114)."""

import numpy as np
import pytest
import torch
from helpers import f64

import vqtriton as vqt
from vqtriton import reference as R

# (levels, symmetric, hard_clamp)
MODES = [([8, 5, 5, 5], False, False), ([8, 5, 5, 5], True, False), ([7, 2, 4], True, True), ([3, 6], False, True),
         ([2], True, False), ([5, 3, 9, 4, 2, 6], True, False)]


def _mode_id(m):
    return "{}-{}{}".format("x".join(map(str, m[0])), "sym" if m[1] else "std", "-hard" if m[2] else "")


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_codes_indices_and_gradients_match_the_reference(mode, device):
    levels, symmetric, hard = mode
    fsq = vqt.FSQ(levels, symmetric=symmetric, hard_clamp=hard).to(device)
    z = (torch.randn(123, len(levels), device=device) * 2).requires_grad_()
    g = torch.randn_like(z)
    out, idx = fsq(z)
    (out * g).sum().backward()
    zn = f64(z)
    codes, ref_idx = R.fsq_quantize(zn, levels, symmetric=symmetric, hard_clamp=hard)
    assert idx.dtype == torch.int64 and np.array_equal(f64(idx), ref_idx)
    np.testing.assert_allclose(f64(out), codes, rtol=0, atol=2e-7)
    np.testing.assert_allclose(f64(z.grad), f64(g) * R.fsq_quantize_grad(zn, levels, symmetric=symmetric, hard_clamp=hard),
                               rtol=1e-5, atol=1e-6)
    # The codes of the indices are the output, bit for bit.
    assert torch.equal(fsq.indices_to_codes(idx), out.detach())
    assert torch.equal(fsq.codes_to_indices(out.detach()), idx)
    np.testing.assert_allclose(f64(fsq.implicit_codebook), R.fsq_implicit_codebook(levels, symmetric=symmetric), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES[:4], ids=_mode_id)
def test_every_code_is_reachable_from_low_precision_inputs(mode, dtype, device):
    """vqp #114: in bfloat16 the bound's tanh(z) h rounds onto half the level boundaries and half the codes
    are never chosen. Here the levels are computed in float32: every level of every channel (so every
    code) is reached by some input of the dtype, and the indices are those of the same values in float32."""
    levels, symmetric, hard = mode
    fsq = vqt.FSQ(levels, symmetric=symmetric, hard_clamp=hard).to(device)
    # Every representable value of the dtype in [-6, 6], in each channel.
    grid = torch.linspace(-6, 6, 200001, device=device).to(dtype).unique()
    z = grid[:, None].expand(-1, len(levels)).contiguous()
    out, idx = fsq(z)
    assert out.dtype == dtype
    _, idx32 = fsq(z.float())
    assert torch.equal(idx, idx32)
    k = fsq.levels_from_indices(idx)
    for c, lv in enumerate(levels):
        assert set(k[:, c].tolist()) == set(range(lv)), f"channel {c}: levels reached {sorted(set(k[:, c].tolist()))}"
    # And in combination: random low-precision vectors cover the whole (small) codebook.
    if fsq.codebook_size <= 1000:
        zr = grid[torch.randint(len(grid), (200000, len(levels)), device=device)]
        assert fsq(zr)[1].unique().numel() == fsq.codebook_size


def test_layouts_heads_and_masks(device):
    levels = [5, 4, 3]
    fsq = vqt.FSQ(levels, heads=2, channel_dim=1).to(device)
    z = torch.randn(2, 6, 5, 7, device=device)
    mask = torch.rand(2, 5, 7, device=device) > 0.3
    out, idx = fsq(z, mask)
    assert out.shape == z.shape and idx.shape == (2, 5, 7, 2)
    zn = f64(z.movedim(1, -1)).reshape(2, 5, 7, 2, 3)
    codes, ref_idx = R.fsq_quantize(zn, levels)
    keep = f64(mask).astype(bool)
    assert np.array_equal(f64(idx)[keep], ref_idx[keep]) and (f64(idx)[~keep] == -1).all()
    got = f64(out.movedim(1, -1)).reshape(2, 5, 7, 2, 3)
    np.testing.assert_allclose(got[keep], codes[keep], atol=2e-7)
    assert (got[~keep] == 0).all()
    dec = fsq.indices_to_codes(idx)
    assert torch.equal(dec, out)  # -1 decodes to zeros, as the masked output


def test_rotation(device):
    levels = [5, 5, 5, 5]
    fsq = vqt.FSQ(levels, symmetric=True, rotation=True, generator=torch.Generator().manual_seed(3)).to(device)
    rot = f64(fsq.rotation)
    np.testing.assert_allclose(rot @ rot.T, np.eye(4), atol=1e-6)
    z = torch.randn(50, 4, device=device)
    out, idx = fsq(z)
    codes, ref_idx = R.fsq_quantize(f64(z) @ rot, levels, symmetric=True)
    assert np.array_equal(f64(idx), ref_idx)
    np.testing.assert_allclose(f64(out), codes @ rot.T, atol=1e-6)
    assert torch.equal(fsq.indices_to_codes(idx), out)
    assert torch.equal(fsq.codes_to_indices(out), idx)
    again = vqt.FSQ(levels, symmetric=True, rotation=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.rotation, fsq.rotation.cpu())
    assert set(fsq.state_dict()) == {"rotation"}


def test_noise_dropout(device):
    levels = [7, 5, 3]
    fsq = vqt.FSQ(levels, symmetric=True, noise_dropout=0.3, generator=torch.Generator(device=device).manual_seed(1))
    fsq = fsq.to(device)
    z = (torch.randn(4000, 3, device=device)).requires_grad_()
    out, idx = fsq(z)
    # Replay the draws: Bernoulli(p) positions, then uniform offsets, of the codes' shape.
    g = torch.Generator(device=device).manual_seed(1)
    drop = torch.empty(4000, 1, 3, device=device).bernoulli_(0.3, generator=g).bool()
    offset = torch.rand(4000, 1, 3, generator=g, device=device) - 0.5
    codes, ref_idx = R.fsq_quantize(f64(z), levels, symmetric=True)
    assert np.array_equal(f64(idx), ref_idx)  # the indices are the clean codes'
    want = R.fsq_noise(codes, f64(drop)[:, 0].astype(bool), f64(offset)[:, 0])
    np.testing.assert_allclose(f64(out), want, atol=1e-6)
    assert abs(drop.float().mean().item() - 0.3) < 0.02  # p, not vqp's 1/2
    out.sum().backward()
    grad = R.fsq_quantize_grad(f64(z), levels, symmetric=True) * R.fsq_noise_grad(codes, f64(drop)[:, 0].astype(bool),
                                                                                   f64(offset)[:, 0])
    np.testing.assert_allclose(f64(z.grad), grad, rtol=1e-5, atol=1e-6)
    fsq.eval()  # no noise in eval mode
    out, idx = fsq(z)
    assert torch.equal(fsq.indices_to_codes(idx), out.detach())


def test_huge_codebooks_keep_exact_indices(device):
    """2^40 codes: the mixed-radix index is an exact int64 (a float32 sum would not be)."""
    levels = [1024, 1024, 1024, 1024]
    fsq = vqt.FSQ(levels, symmetric=True).to(device)
    z = torch.randn(200, 4, device=device) * 3
    z[0] = 50.0  # the last code
    _, idx = fsq(z)
    k = R.fsq_levels(f64(z), levels, symmetric=True)
    assert np.array_equal(f64(idx).astype(np.int64), np.ravel_multi_index(k.T, levels))
    assert idx[0].item() == 2**40 - 1
    assert torch.equal(fsq.levels_from_indices(idx), torch.from_numpy(k).to(device))


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("levels", [[1001, 3], [1003, 1004], [2000, 7]])
def test_saturated_inputs_stay_within_many_levels(device, levels, hard):
    """Past 1000 levels the bound's slack exceeds half a level: a saturated input must still get the last
    level (vqp's FSQ gives L, an index past the codebook), as in the reference."""
    fsq = vqt.FSQ(levels, hard_clamp=hard).to(device)
    z = torch.tensor([[100.0, -100.0], [-100.0, 100.0], [3.0, -0.2], [-1e30, 1e30]], device=device)
    out, idx = fsq(z)
    codes, ref_idx = R.fsq_quantize(f64(z), levels, hard_clamp=hard)
    assert np.array_equal(f64(idx), ref_idx)
    assert ((0 <= ref_idx) & (ref_idx < fsq.codebook_size)).all()
    np.testing.assert_allclose(f64(out), codes, rtol=0, atol=2e-7)
    assert f64(out).max() <= 1 and f64(out).min() >= -1
    assert torch.equal(fsq.indices_to_codes(idx), out)


def test_non_finite_vectors_get_no_code(device):
    fsq = vqt.FSQ([5, 5], heads=2).to(device)
    z = torch.randn(4, 4, device=device)
    z[1, 0], z[2, 3] = torch.nan, torch.inf
    _, idx = fsq(z)
    assert idx[1, 0] == -1 and idx[1, 1] >= 0 and idx[2, 1] == -1 and idx[2, 0] >= 0
    assert (idx[[0, 3]] >= 0).all()


def test_no_vectors_and_one_channel(device):
    fsq = vqt.FSQ([5]).to(device)
    out, idx = fsq(torch.randn(0, 3, 1, device=device))
    assert out.shape == (0, 3, 1) and idx.shape == (0, 3)
    out, idx = fsq(torch.tensor([[-10.0], [0.0], [10.0]], device=device))
    assert idx.tolist() == [0, 2, 4] and out.squeeze(-1).tolist() == [-1.0, 0.0, 1.0]


BAD = [
    ("levels-empty", lambda: vqt.FSQ([]), ValueError, "non-empty"),
    ("levels-one", lambda: vqt.FSQ([1, 3]), ValueError, ">= 2"),
    ("levels-two-standard", lambda: vqt.FSQ([2, 3]), ValueError, "symmetric=True"),
    ("levels-float", lambda: vqt.FSQ([3.0]), TypeError, "int"),
    ("noise-standard", lambda: vqt.FSQ([3], noise_dropout=0.1), ValueError, "symmetric=True"),
    ("noise-range", lambda: vqt.FSQ([3], symmetric=True, noise_dropout=1.5), ValueError, r"\[0, 1\]"),
    ("channels", lambda: vqt.FSQ([3, 3])(torch.zeros(2, 3)), ValueError, "dim = 2 channels"),
    ("int-input", lambda: vqt.FSQ([3])(torch.zeros(2, 1, dtype=torch.long)), TypeError, "floating-point"),
    ("index-range", lambda: vqt.FSQ([3]).indices_to_codes(torch.tensor([3])), IndexError, r"\[0, 3\)"),
    ("index-heads", lambda: vqt.FSQ([3], heads=2).indices_to_codes(torch.tensor([1])), ValueError, "heads = 2"),
]


@pytest.mark.parametrize("fn, error, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_arguments(fn, error, match):
    with pytest.raises(error, match=match):
        fn()
