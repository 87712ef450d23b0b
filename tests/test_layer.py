"""VectorQuantizer against vector-quantize-pytorch, vqtriton.reference and float64 computations.

Core behaviour runs on both backends ("torch", "triton": the kernels, through the interpreter on a
CPU); the longer training tests run once on the default routing. Shapes are small and not powers of two.
"""

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from vqtriton import reference
from vqtriton.layer import VectorQuantizer
from helpers import f64

BACKENDS = ["torch", "triton"]


def per_code_sums(idx: np.ndarray, rows: np.ndarray, num_codes: int) -> np.ndarray:
    out = np.zeros((num_codes, rows.shape[1]))
    np.add.at(out, idx, rows)
    return out


def smoothed(size: np.ndarray, eps: float) -> np.ndarray:
    n = size.sum()
    return (size + eps) / (n + size.shape[0] * eps) * n


def spread(ref: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Indices of the kept rows (``m`` True) at their positions, -1 elsewhere."""
    out = np.full(m.shape, -1, np.int64)
    out[m] = ref
    return out


def spread_rows(rows: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Rows of the kept vectors at their positions ``[..., D]``, zeros elsewhere."""
    out = np.zeros((*m.shape, rows.shape[-1]))
    out[m] = rows
    return out


def close(actual, expected, rtol=1e-6, atol=1e-6):
    actual = f64(actual) if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# --- parity with vector-quantize-pytorch ------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_vector_quantize_pytorch(backend, masked, device):
    B, T, D, K, beta = 3, 37, 19, 45, 0.3
    ours = VectorQuantizer(D, K, beta=beta, backend=backend).to(device)
    theirs = VectorQuantize(D, K, learnable_codebook=True, ema_update=False, commitment_weight=1.0).to(device).train()
    with torch.no_grad():
        theirs._codebook.embed.copy_(ours.codebook.unsqueeze(0))  # their embed is [heads=1, K, D]
    z = torch.randn(B, T, D, device=device)
    mask = torch.rand(B, T, device=device) > 0.3 if masked else None

    # An input without grad: with grad they apply the rotation trick, equal to z_q only up to rounding.
    z_q, idx, loss = ours(z, mask)
    their_q, their_idx, their_loss = theirs(z, mask=mask)
    assert torch.equal(idx, their_idx)
    assert torch.equal(z_q, their_q)
    # Theirs is mse(z_q, z); ours is codebook + beta * commitment, each that same mse.
    torch.testing.assert_close(loss, their_loss * (1 + beta), rtol=1e-5, atol=0)

    # Loss gradients: the same on the codebook; beta times theirs on z (their mse trains z fully).
    z_ours, z_theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours(z_ours, mask)[2].backward()
    theirs(z_theirs, mask=mask)[2].backward()
    torch.testing.assert_close(ours.codebook.grad, theirs._codebook.embed.grad[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(z_ours.grad, beta * z_theirs.grad, rtol=1e-5, atol=1e-8)


# --- the learned layer, masks, channel-first, cosine ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_against_float64(backend, device):
    B, T, D, K, beta = 4, 29, 13, 31, 0.3
    vq = VectorQuantizer(D, K, beta=beta, backend=backend).to(device)
    mask = torch.rand(B, T, device=device) > 0.4
    z = torch.randn(B, T, D, device=device)
    z[~mask] = float("nan")  # a masked vector that reached any loss, statistic or metric would show
    z.requires_grad_()
    z_q, idx, loss, parts = vq(z, mask, return_breakdown=True)

    m = f64(mask).astype(bool)
    zk, cb = f64(z)[m], f64(vq.codebook)
    ref = reference.nearest_code(zk, cb)
    assert torch.equal(idx[~mask], torch.full_like(idx[~mask], -1))
    np.testing.assert_array_equal(idx[mask].cpu().numpy(), ref)
    assert torch.equal(z_q[mask], vq.codebook.detach()[idx[mask]])
    assert torch.equal(z_q[~mask], torch.zeros_like(z_q[~mask]))

    mse = np.mean((zk - cb[ref]) ** 2)  # over the kept elements only
    close(parts.codebook_loss, mse)
    close(parts.commitment_loss, mse)
    close(loss, (1 + beta) * mse)
    p = np.bincount(ref, minlength=K) / ref.size
    close(parts.perplexity, np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    close(parts.usage, np.mean(p > 0))

    w = torch.randn_like(z_q)
    ((z_q * w).sum() + loss).backward()
    scale = 2.0 / zk.size
    close(z.grad, spread_rows(f64(w)[m] + beta * scale * (zk - cb[ref]), m))  # straight-through + commitment
    close(vq.codebook.grad, per_code_sums(ref, scale * (cb[ref] - zk), K))


def test_all_masked_batch(device):
    vq = VectorQuantizer(7, 5, ema_decay=0.9, reduction="sum").to(device)
    z = torch.randn(3, 4, 7, device=device)
    z_q, idx, loss, parts = vq(z, torch.zeros(3, 4, dtype=torch.bool, device=device), return_breakdown=True)
    assert torch.equal(idx, torch.full((3, 4), -1, device=device))
    assert torch.equal(z_q, torch.zeros_like(z))
    assert loss.item() == 0.0 and parts.perplexity.item() == 1.0 and parts.usage.item() == 0.0


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (3, 7, 11)], ids=["BCHW", "BCT"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_first(backend, shape, device):
    D, K, beta = shape[1], 19, 0.25
    vq = VectorQuantizer(D, K, beta=beta, channel_dim=1, backend=backend).to(device)
    z = torch.randn(shape, device=device, requires_grad=True)
    lead = (shape[0], *shape[2:])
    mask = torch.rand(lead, device=device) > 0.3
    z_q, idx, loss = vq(z, mask)

    assert z_q.shape == z.shape and idx.shape == lead
    m = f64(mask).astype(bool)
    zk, cb = f64(z.movedim(1, -1))[m], f64(vq.codebook)
    ref = reference.nearest_code(zk, cb)
    np.testing.assert_array_equal(idx.cpu().numpy(), spread(ref, m))
    np.testing.assert_array_equal(f64(z_q.movedim(1, -1)), spread_rows(cb[ref], m))
    close(loss, (1 + beta) * np.mean((zk - cb[ref]) ** 2))
    # Decoding indices gives the same layout; -1 decodes to zeros.
    assert torch.equal(vq.get_output_from_indices(idx), z_q)
    assert vq.decode == vq.get_output_from_indices

    w = torch.randn_like(z_q)
    ((z_q * w).sum() + loss).backward()
    dz = f64(w.movedim(1, -1))[m] + beta * 2 * (zk - cb[ref]) / zk.size
    close(z.grad.movedim(1, -1), spread_rows(dz, m))


@pytest.mark.parametrize("ema_decay", [None, 0.7], ids=["learned", "ema"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine(backend, ema_decay, device):
    N, D, K, beta = 83, 9, 21, 0.25
    vq = VectorQuantizer(D, K, beta=beta, metric="cosine", ema_decay=ema_decay, backend=backend).to(device)
    z = 3 * torch.randn(N, D, device=device) + 0.5
    cb = f64(vq.codebook)
    z_q, idx, loss = vq(z)

    ref = reference.nearest_code(f64(z), cb, metric="cosine")
    np.testing.assert_array_equal(idx.cpu().numpy(), ref)
    close(z_q, reference.normalize(cb)[ref])
    close(vq.get_output_from_indices(idx), reference.normalize(f64(vq.codebook))[ref])  # codes after any update
    err = np.mean((reference.normalize(f64(z)) - reference.normalize(cb)[ref]) ** 2)
    close(loss, (1 + beta if ema_decay is None else beta) * err)
    if ema_decay is not None:  # the statistics sum the normalised vectors the quantizer compared
        sums = per_code_sums(ref, reference.normalize(f64(z)), K)
        close(vq.embed_sum, ema_decay * cb + (1 - ema_decay) * sums, rtol=1e-5)


# --- EMA, dead codes, k-means -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_steps_against_float64(backend, device):
    N, D, K, g, eps, beta = 150, 11, 23, 0.9, 1e-3, 0.4
    vq = VectorQuantizer(D, K, beta=beta, ema_decay=g, eps=eps, backend=backend).to(device)
    assert list(vq.parameters()) == [] and "codebook" in dict(vq.named_buffers())
    size, embed_sum = np.ones(K), f64(vq.codebook)
    for step in range(3):
        z = (1.5 * torch.randn(N, D, device=device)).requires_grad_()
        mask = None if step == 0 else torch.rand(N, device=device) > 0.25
        before = vq.codebook.clone()
        z_q, idx, loss = vq(z, mask)

        m = np.ones(N, bool) if mask is None else f64(mask).astype(bool)
        zk, cb = f64(z)[m], f64(before)
        ref = reference.nearest_code(zk, cb)
        np.testing.assert_array_equal(idx.cpu().numpy(), spread(ref, m))
        assert torch.equal(z_q[idx >= 0], before[idx[idx >= 0]])  # the codebook from before the update

        close(loss, beta * np.mean((zk - cb[ref]) ** 2))
        (dz,) = torch.autograd.grad(loss, z)  # the buffer takes no gradient; z gets beta * commitment's
        dz_kept = beta * 2 * (zk - cb[ref]) / zk.size
        close(dz, spread_rows(dz_kept, m))

        size = g * size + (1 - g) * np.bincount(ref, minlength=K)
        embed_sum = g * embed_sum + (1 - g) * per_code_sums(ref, zk, K)
        assert vq.cluster_size.dtype == vq.embed_sum.dtype == torch.float32
        close(vq.cluster_size, size)
        close(vq.embed_sum, embed_sum, rtol=1e-5)
        close(vq.codebook, embed_sum / smoothed(size, eps)[:, None], rtol=1e-5)

    vq.eval()  # no update in eval mode; the loss is still computed
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    _, _, loss = vq(torch.randn(N, D, device=device))
    assert loss.item() > 0
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in state.items())


def test_dead_code_restart_revives_starved_codes(device):
    D, K, g, thr = 6, 40, 0.8, 1.0
    vq = VectorQuantizer(D, K, ema_decay=g, dead_code_threshold=thr).to(device)
    twin = VectorQuantizer(D, K, ema_decay=g).to(device)  # no restart
    with torch.no_grad():  # starve codes 10..39: far from the N(0, 1) data, statistics consistent
        vq.codebook[10:] += 50.0
        vq.embed_sum.copy_(vq.codebook)
        twin.load_state_dict(vq.state_dict())

    # 25 rows, 5 of them masked: more dead codes than kept rows, so only 20 are re-seeded now.
    z = torch.randn(25, D, device=device)
    mask = torch.arange(25, device=device) >= 5
    z[~mask] = 1e3  # masked rows must never seed a code
    _, idx, _ = vq(z, mask)

    size = g + (1 - g) * np.bincount(idx[mask].cpu().numpy(), minlength=K)  # the EMA step
    dead = size < thr
    kept = f64(z[mask])
    match = np.abs(f64(vq.codebook)[:, None, :] - kept[None, :, :]).max(-1) < 1e-5  # [K, kept rows]
    seeded = match.any(1)
    assert seeded.sum() == min(dead.sum(), 20) == 20  # more dead codes than rows: one code per row
    assert dead[seeded].all() and len(set(match[seeded].argmax(1))) == 20  # distinct kept rows
    close(vq.cluster_size, np.where(seeded, 1.0, size))  # re-seeded codes restart as fresh ones
    close(vq.codebook, f64(vq.embed_sum) / smoothed(f64(vq.cluster_size), vq.eps)[:, None])  # consistent

    for _ in range(3):
        z = torch.randn(100, D, device=device)
        vq(z), twin(z)
    assert f64(vq.codebook).max() < 10  # no starved code left
    assert (f64(twin.codebook).max(1) > 40).sum() == 30
    vq.eval(), twin.eval()
    z = torch.randn(300, D, device=device)
    assert vq(z, return_breakdown=True)[3].usage > twin(z, return_breakdown=True)[3].usage + 0.4


def clustered(num_clusters: int, per: int, D: int, device) -> torch.Tensor:
    centres = 6 * torch.randn(num_clusters, D, device=device)
    return centres.repeat_interleave(per, 0) + 0.2 * torch.randn(num_clusters * per, D, device=device)


def lloyd(x: torch.Tensor, k: int, iters: int, valid: torch.Tensor | None = None) -> np.ndarray:
    """Float64 Lloyd's k-means on the rows of ``x`` where ``valid``, from the centres the layer samples
    (call with the same generator state): one uniform key per row of the batch, the valid rows in the
    order of their keys, and the codes take them in turn (cycling when there are fewer rows than codes)."""
    valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if valid is None else valid
    key = torch.rand(x.shape[0], device=x.device)
    valid_rows = torch.nonzero(valid).squeeze(1)
    order = valid_rows[key[valid].argsort()]
    pick = order[torch.arange(k, device=x.device) % order.numel()]
    xs = f64(x[valid])
    centres = f64(x)[pick.cpu().numpy()]
    for _ in range(iters):
        a = reference.nearest_code(xs, centres)
        counts = np.bincount(a, minlength=k)[:, None]
        centres = np.where(counts > 0, per_code_sums(a, xs, k) / np.maximum(counts, 1), centres)
    return centres


@pytest.mark.parametrize("ema_decay", [None, 0.9], ids=["learned", "ema"])
def test_kmeans_init_on_clustered_data(ema_decay, device):
    D, K, iters, g = 8, 23, 4, 0.9
    x = torch.cat([clustered(3, 40, D, device), torch.full((10, D), 1e3, device=device)])
    mask = torch.arange(x.shape[0], device=device) < 120  # the far rows are padding
    km = VectorQuantizer(D, K, ema_decay=ema_decay, kmeans_init=True, kmeans_iters=iters).to(device)
    rnd = VectorQuantizer(D, K, ema_decay=ema_decay).to(device)

    km.eval()
    km(x, mask)  # no k-means in eval mode
    assert not km.initted
    km.train()
    torch.manual_seed(11)
    z_q, idx, _, parts = km(x, mask, return_breakdown=True)
    assert km.initted
    torch.manual_seed(11)
    centres = lloyd(x, K, iters, mask)

    # This step quantized with the k-means centres (an EMA step follows it in EMA mode).
    ref = reference.nearest_code(f64(x[mask]), centres)
    np.testing.assert_array_equal(idx[mask].cpu().numpy(), ref)
    close(z_q[mask], centres[ref], atol=1e-5)
    assert parts.commitment_loss < 0.01 * rnd(x, mask, return_breakdown=True)[3].commitment_loss
    if ema_decay is None:  # k-means runs once: a learned codebook stays put in later forwards
        close(km.codebook, centres, atol=1e-5)
        km(clustered(3, 5, D, device))
        close(km.codebook, centres, atol=1e-5)
    else:  # k-means gave the codes fresh statistics (cluster size 1) before this step's EMA update
        close(km.cluster_size, g + (1 - g) * np.bincount(ref, minlength=K))


def test_kmeans_init_with_fewer_rows_than_codes(device):
    vq = VectorQuantizer(5, 9, kmeans_init=True, kmeans_iters=3).to(device)
    x = torch.randn(4, 5, device=device)
    torch.manual_seed(3)
    vq(x)
    torch.manual_seed(3)
    close(vq.codebook, lloyd(x, 9, 3), atol=1e-6)  # every row starts two or three codes


# --- dtypes, autocast, state_dict -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast(dtype, device):
    N, D, K, g = 70, 10, 17, 0.9
    lin = nn.Linear(D, D).to(device)
    vq = VectorQuantizer(D, K, ema_decay=g).to(device)
    before = vq.codebook.clone()
    with torch.autocast(torch.device(device).type, dtype=dtype):
        z = lin(torch.randn(N, D, device=device))
        assert z.dtype == dtype
        z_q, idx, loss = vq(z)
    assert z_q.dtype == dtype and loss.dtype == torch.float32
    ref = reference.nearest_code(f64(z), f64(before))  # the fp32 codes, against z's values as given
    np.testing.assert_array_equal(idx.cpu().numpy(), ref)
    assert torch.equal(z_q, before[idx].to(dtype))
    close(loss, 0.25 * np.mean((f64(z) - f64(before)[ref]) ** 2), rtol=1e-5)  # fp32 codes, not rounded to z's dtype
    assert vq.cluster_size.dtype == vq.embed_sum.dtype == torch.float32
    close(vq.cluster_size, g + (1 - g) * np.bincount(ref, minlength=K))
    close(vq.embed_sum, g * f64(before) + (1 - g) * per_code_sums(ref, f64(z), K), rtol=1e-5)
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


def test_casts_keep_ema_statistics_fp32(device):
    N, D, K, g = 90, 6, 13, 0.95
    vq = VectorQuantizer(D, K, ema_decay=g).to(device)
    vq(torch.randn(N, D, device=device))
    stats = {name: getattr(vq, name).clone() for name in ("cluster_size", "embed_sum")}
    for cast in (torch.bfloat16, torch.float16, torch.float64, torch.float32, torch.bfloat16):
        vq.to(cast)
        assert vq.codebook.dtype == cast
        for name, value in stats.items():  # full-precision values, not rounded through the cast
            assert getattr(vq, name).dtype == torch.float32 and torch.equal(getattr(vq, name), value)

    z = torch.randn(N, D, device=device, dtype=torch.bfloat16)
    z_q, idx, _ = vq(z)  # a bf16 module still accumulates fp32 statistics
    assert z_q.dtype == torch.bfloat16 and vq.cluster_size.dtype == torch.float32
    counts = np.bincount(idx.cpu().numpy(), minlength=K)
    close(vq.cluster_size, g * f64(stats["cluster_size"]) + (1 - g) * counts, rtol=1e-6, atol=0)
    close(vq.embed_sum, g * f64(stats["embed_sum"]) + (1 - g) * per_code_sums(idx.cpu().numpy(), f64(z), K), rtol=1e-5)


@pytest.mark.parametrize("ema_decay", [None, 0.9], ids=["learned", "ema"])
def test_state_dict_round_trip(ema_decay, device):
    D, K = 7, 15
    cfg = dict(ema_decay=ema_decay, kmeans_init=True, kmeans_iters=3, dead_code_threshold=0.5 if ema_decay else 0.0)
    a = VectorQuantizer(D, K, **cfg).to(device)
    for _ in range(2):
        a(torch.randn(60, D, device=device))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    expected = {"codebook", "initted"} | ({"cluster_size", "embed_sum"} if ema_decay else set())
    assert set(saved) == expected

    b = VectorQuantizer(D, K, **cfg).to(device)
    b.load_state_dict(saved)
    for name, value in a.state_dict().items():
        assert b.state_dict()[name].dtype == value.dtype and torch.equal(b.state_dict()[name], value)
    # The same training step on both: identical outputs and state (k-means does not run again).
    z = torch.randn(60, D, device=device)
    torch.manual_seed(7)
    out_a = a(z)
    torch.manual_seed(7)
    out_b = b(z)
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# --- argument checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dim=0), ValueError, "dim must be >= 1"),
        (dict(dim=4.0), TypeError, "dim must be an int"),
        (dict(num_codes=0), ValueError, "num_codes must be >= 1"),
        (dict(beta=-0.5), ValueError, "beta must be >= 0"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(ema_decay=1.5), ValueError, r"ema_decay must be in \(0, 1\]"),
        (dict(ema_decay=0.0), ValueError, "ema_decay"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(metric="dot"), ValueError, "metric must be one of"),
        (dict(channel_dim=1.0), TypeError, "channel_dim must be an int"),
        (dict(kmeans_iters=-1), ValueError, "kmeans_iters must be >= 0"),
        (dict(dead_code_threshold=-1.0), ValueError, "dead_code_threshold must be >= 0"),
        (dict(usage_decay=0.0), ValueError, r"usage_decay must be in \(0, 1\]"),
        (dict(rotation_trick=True, directional_reparam=True), ValueError, "choose one"),
        (dict(sample_temperature=-1.0), ValueError, "sample_temperature must be >= 0"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(reduction="none"), ValueError, "reduction must be one of"),
        (dict(precision="fp8"), ValueError, "precision must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(affine=True, metric="cosine"), ValueError, "affine=True needs the l2 metric"),
        (dict(affine=True, affine_batch_decay=1.5), ValueError, r"affine_batch_decay must be in \[0, 1\]"),
        (dict(affine=True, affine_codebook_decay=-0.1), ValueError, r"affine_codebook_decay must be in \[0, 1\]"),
        (dict(sync_affine=1), TypeError, "sync_affine must be None, True or False"),
        (dict(in_place_optimizer=3), TypeError, "in_place_optimizer must be a callable"),
        (dict(ema_decay=0.9, in_place_optimizer=torch.optim.SGD), ValueError, "in_place_optimizer needs codebook parameters"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_constructor_checks(kwargs, error, match):
    args = dict(dim=4, num_codes=8) | kwargs
    with pytest.raises(error, match=match):
        VectorQuantizer(args.pop("dim"), args.pop("num_codes"), **args)


def test_forward_checks(device):
    vq = VectorQuantizer(5, 8, channel_dim=1).to(device)
    with pytest.raises(ValueError, match=r"dim = 5 channels in dim 1, got shape \(2, 4, 3\)"):
        vq(torch.randn(2, 4, 3, device=device))
    with pytest.raises(ValueError, match="channels in dim 1"):
        vq(torch.randn(5, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.ones(2, 5, 3, dtype=torch.int64, device=device))
    z = torch.randn(2, 5, 3, device=device)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        vq(z, torch.ones(2, 3, device=device))
    with pytest.raises(ValueError, match=r"mask must have .* \(2, 3\) for z \(2, 5, 3\), got \(2, 5\)"):
        vq(z, torch.ones(2, 5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="reduction"):
        vq(z, reduction="none")


# --- per-call options: top-k, given indices, EMA weights and accumulation, freezing, gradients --------


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_candidates(backend, device):
    """topk=k: the k nearest codes (reference order), each candidate's output straight through to its
    vector, a loss per candidate; no codebook change."""
    B, T, D, K, k, beta = 2, 9, 5, 17, 4, 0.3
    vq = VectorQuantizer(D, K, beta=beta, ema_decay=0.8, backend=backend).to(device)
    state = {n: t.clone() for n, t in vq.state_dict().items()}
    z = torch.randn(B, T, D, device=device, requires_grad=True)
    mask = torch.rand(B, T, device=device) > 0.3
    z_q, idx, loss = vq(z, mask, topk=k)
    assert z_q.shape == (B, T, k, D) and idx.shape == (B, T, k) and loss.shape == (B, T, k)
    m = f64(mask).astype(bool)
    ref = reference.nearest_codes(f64(z)[m], f64(vq.codebook), k)
    np.testing.assert_array_equal(idx.cpu().numpy()[m], ref)
    assert (idx[~mask] == -1).all() and (loss[~mask] == 0).all() and (z_q[~mask] == 0).all()
    codes = f64(vq.codebook)[ref]
    close(z_q[mask], codes)
    close(loss[mask], beta * ((f64(z)[m][:, None] - codes) ** 2).mean(-1), rtol=1e-5)
    w = torch.randn_like(z_q)
    (dz,) = torch.autograd.grad((z_q * w).sum(), z)
    close(dz, f64(w.sum(2)) * m[..., None])
    assert all(torch.equal(t, vq.state_dict()[n]) for n, t in state.items())
    with pytest.raises(ValueError, match="one head"):
        VectorQuantizer(4, 7, heads=2).to(device)(torch.randn(3, 4, device=device), topk=2)


def test_update_indices_is_the_forward_update(device):
    """update_indices(z, indices) after a top-k call == the update forward makes with its own indices."""
    a = VectorQuantizer(6, 11, ema_decay=0.7, dead_code_threshold=0.0).to(device)
    b = copy.deepcopy(a)
    z = torch.randn(4, 10, 6, device=device)
    mask = torch.rand(4, 10, device=device) > 0.2
    _, idx, _ = a(z, mask)
    _, top, _ = b(z, mask, topk=1)
    b.update_indices(z, top[..., 0], mask)
    for name, t in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], t, msg=name)
    with pytest.raises(ValueError, match=r"indices must have shape \(4, 10\)"):
        b.update_indices(z, top)
    for bad in (11, -2):  # never counted as another code (nor, on a GPU, written outside the codebook)
        with pytest.raises(IndexError, match=r"indices must lie in \[0, 11\)"):
            b.update_indices(z, torch.full((4, 10), bad, device=device))


def test_cross_entropy_commitment_of_no_kept_vector_is_zero(device):
    """A fully masked call (also a residual level that quantize dropout left out) has commitment 0, not
    0 / 0 = NaN, and its gradient is finite; the public code_cross_entropy of no target stays NaN."""
    from vqtriton.residual import ResidualVQ

    vq = VectorQuantizer(5, 9, commitment_cross_entropy=True).to(device)
    z = torch.randn(7, 5, device=device, requires_grad=True)
    _, _, loss = vq(z, torch.zeros(7, dtype=torch.bool, device=device))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(vq.codebook.grad).all() and torch.isfinite(z.grad).all()
    assert torch.isnan(vq.code_cross_entropy(z.detach(), torch.full((7,), -1, device=device)))
    rvq = ResidualVQ(5, 9, 3, commitment_cross_entropy=True).to(device)
    *_, losses = rvq(z, return_all_losses=True, num_active=torch.tensor(1, device=device))
    assert torch.isfinite(losses).all() and (losses[1:] == 0).all()


def test_frozen_codebook_gets_no_orthogonal_gradient(device):
    vq = VectorQuantizer(6, 10, orthogonal_reg_weight=1.0).to(device)
    z = torch.randn(20, 6, device=device, requires_grad=True)
    vq(z, freeze_codebook=True)[2].backward()
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    vq(z)[2].backward()
    assert vq.codebook.grad.any()


def test_ema_update_weight_and_accumulation(device):
    """A weight w_k moves code k by (1 - g) w_k of the way (float64 check); accumulated calls add their
    counts and sums to the next step's, with no step of their own; ema_update=False keeps the codes."""
    N, D, K, g = 60, 4, 7, 0.8
    vq = VectorQuantizer(D, K, ema_decay=g, backend="torch").to(device)
    size0, sum0 = f64(vq.cluster_size), f64(vq.embed_sum)
    weight = torch.rand(K, device=device)
    z = torch.randn(N, D, device=device)
    _, idx, _ = vq(z, ema_update_weight=lambda sums, counts: weight)
    ref = idx.cpu().numpy()
    rate = (1 - g) * f64(weight)
    close(vq.cluster_size, size0 + rate * (np.bincount(ref, minlength=K) - size0))
    close(vq.embed_sum, sum0 + rate[:, None] * (per_code_sums(ref, f64(z), K) - sum0), rtol=1e-5)

    acc, plain = copy.deepcopy(vq), copy.deepcopy(vq)
    z1, z2 = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    codes = acc.codebook.clone()
    acc(z1, accum_ema_update=True)
    assert torch.equal(acc.codebook, codes)
    acc(z2)
    _, i1, _ = plain(z1, freeze_codebook=True)
    _, i2, _ = plain(z2, freeze_codebook=True)
    both = torch.cat([z1, z2])
    plain.update_indices(both, torch.cat([i1, i2]))  # one step with both batches' statistics
    for name, t in plain.state_dict().items():
        torch.testing.assert_close(acc.state_dict()[name], t, msg=name)
    assert not acc.accum_counts.any()

    codes = vq.codebook.clone()
    vq(z, ema_update=False)  # no dead-code restarts: nothing moves at all
    assert torch.equal(vq.codebook, codes)


def test_freeze_and_manual_ema_update(device):
    vq = VectorQuantizer(4, 9).to(device)
    z = torch.randn(20, 4, device=device, requires_grad=True)
    _, _, loss = vq(z, freeze_codebook=True)
    loss.backward()
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    ema = VectorQuantizer(4, 9, ema_decay=0.5, manual_ema_update=True).to(device)
    codes = ema.codebook.clone()
    ema(z.detach())
    assert torch.equal(ema.codebook, codes) and not torch.equal(ema.cluster_size, torch.ones_like(ema.cluster_size))
    ema.refresh_codes()
    torch.testing.assert_close(ema.codebook, ema.embed_sum / smoothed_t(ema.cluster_size, ema.eps).unsqueeze(1))
    with pytest.raises(ValueError, match="refresh_codes needs an EMA codebook"):
        vq.refresh_codes()


def smoothed_t(size: torch.Tensor, eps: float) -> torch.Tensor:
    n = size.sum()
    return (size + eps) / (n + size.shape[0] * eps) * n


def test_learned_codebook_restarts_dead_codes_by_usage(device):
    """A learned codebook with dead_code_threshold tracks its usage (usage_decay) and re-seeds unused codes
    from batch rows; its codes stay parameters."""
    D, K = 3, 12
    vq = VectorQuantizer(D, K, dead_code_threshold=0.5, usage_decay=0.4).to(device)
    assert isinstance(vq.codebook, nn.Parameter) and vq.keeps_statistics
    with torch.no_grad():
        vq.codebook[1:] += 100.0  # only code 0 is ever chosen
    z = torch.randn(40, D, device=device)
    vq(z)
    rows = f64(z)
    revived = f64(vq.codebook)[1:]
    assert all(np.isclose(rows, c).all(1).any() for c in revived)  # every starved code is now a batch row
    close(vq.cluster_size[1:], np.full(K - 1, 1.0))


def test_output_gradients_to_codebook_and_input(device):
    """route_gradients_to_input=False: z_q is the codes (the codebook's gradient, none to z);
    straight_through_in_eval=False: the same in eval mode; DiVeQ with variance 0 has the codes' value."""
    z = torch.randn(15, 4, device=device, requires_grad=True)
    vq = VectorQuantizer(4, 9, route_gradients_to_input=False).to(device)
    z_q, idx, _ = vq(z)
    w = torch.randn_like(z_q)
    dz, dc = torch.autograd.grad((z_q * w).sum(), (z, vq.codebook), allow_unused=True)
    assert dz is None
    want = torch.zeros_like(vq.codebook).index_add_(0, idx, w)
    torch.testing.assert_close(dc, want)
    ev = VectorQuantizer(4, 9, straight_through_in_eval=False).to(device).eval()
    z_q, _, _ = ev(z)
    assert not torch.autograd.grad(z_q.sum(), z, allow_unused=True, materialize_grads=True)[0].any()
    dv = VectorQuantizer(4, 9, directional_reparam=True, directional_reparam_variance=0.0).to(device)
    z_q, idx, _ = dv(z)
    torch.testing.assert_close(z_q, dv.codebook[idx], rtol=1e-5, atol=1e-6)
    dz, dc = torch.autograd.grad((z_q * w).sum(), (z, dv.codebook))
    e = (dv.codebook[idx] - z).detach()
    u = e / e.norm(dim=1, keepdim=True)
    # d/dz <z + u |c - z|, w> = w - u (w.u) ; d/dc = u (w.u) at each row's code
    torch.testing.assert_close(dz, w - u * (w * u).sum(1, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dc, torch.zeros_like(dc).index_add_(0, idx, u * (w * u).sum(1, keepdim=True)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads, shared", [(1, False), (2, True), (2, False)], ids=["one", "shared", "separate"])
def test_code_cross_entropy(heads, shared, device):
    """code_cross_entropy == F.cross_entropy over vqp's logits (-sqrt of the squared distance), per head."""
    D, K = 6, 9
    vq = VectorQuantizer(D, K, heads=heads, shared_codebook=shared).to(device)
    z = torch.randn(3, 7, D, device=device, requires_grad=True)
    target = torch.randint(-1, K, (3, 7, heads) if heads > 1 else (3, 7), device=device)
    loss = vq.code_cross_entropy(z, target)
    books = vq.codebook if vq.num_books > 1 else vq.codebook.expand(heads, K, D // heads)
    parts = z.reshape(-1, heads, D // heads)
    t = target.reshape(-1, heads)
    logits = torch.stack([-torch.cdist(parts[:, h], books[h]) for h in range(heads)], 1)  # [n, H, K]
    want = nn.functional.cross_entropy(logits.reshape(-1, K), t.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(loss, (z, vq.codebook), retain_graph=True)
    g2 = torch.autograd.grad(want, (z, vq.codebook))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    _, _, _, ce = vq(z, target_indices=target)
    torch.testing.assert_close(ce, want, rtol=1e-5, atol=1e-6)


def test_generator(device):
    """Every draw takes the layer's generator (k-means starts, restarts): the same seed, the same run; the
    global generator untouched."""
    def run():
        gen = torch.Generator(device=device).manual_seed(3)
        vq = VectorQuantizer(4, 10, ema_decay=0.5, dead_code_threshold=3.0, kmeans_init=True, generator=gen).to(device)
        data = torch.Generator(device=device).manual_seed(0)
        for _ in range(3):
            vq(torch.randn(25, 4, device=device, generator=data))
        return vq.state_dict()
    state = torch.get_rng_state()
    a, b = run(), run()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the affine map (affine=True) -------------------------------------------------------------------------


def _moments(x: np.ndarray):
    return x.mean(0), x.var(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_steps_against_float64(backend, device):
    """Three EMA steps with the affine map, each against float64: the running statistics (first value as it
    is, then decayed; the batch's over kept finite rows only), the nearest of the mapped codes, the output
    (the mapped codes), and the EMA statistics of the inputs mapped back."""
    N, D, K, g, gb, gc, eps = 90, 7, 13, 0.8, 0.7, 0.4, 1e-5
    vq = VectorQuantizer(D, K, ema_decay=g, eps=eps, affine=True, affine_batch_decay=gb, affine_codebook_decay=gc,
                         backend=backend).to(device)
    size, embed_sum = np.ones(K), f64(vq.codebook)
    bm = bv = cm = cv = None
    std = lambda v: np.sqrt(np.maximum(v, 1e-5))  # noqa: E731
    for step in range(3):
        z = 3 * torch.randn(N, D, device=device) + 2
        mask = None if step == 0 else torch.rand(N, device=device) > 0.3
        if step == 2:
            z[5] = float("nan")  # a non-finite row: in no statistic (index -1)
        codes = f64(vq.codebook)
        z_q, idx, _ = vq(z, mask)
        m = np.ones(N, bool) if mask is None else f64(mask).astype(bool)
        m[~np.isfinite(f64(z)).all(1)] = False
        zk = f64(z)[m]
        new_cm, new_cv = _moments(codes)
        new_bm, new_bv = _moments(zk)
        cm, cv = (new_cm, new_cv) if cm is None else (gc * cm + (1 - gc) * new_cm, gc * cv + (1 - gc) * new_cv)
        bm, bv = (new_bm, new_bv) if bm is None else (gb * bm + (1 - gb) * new_bm, gb * bv + (1 - gb) * new_bv)
        close(vq.affine_codebook_mean, cm, rtol=1e-5, atol=1e-6)
        close(vq.affine_codebook_var, cv, rtol=1e-5, atol=1e-6)
        close(vq.affine_batch_mean, bm, rtol=1e-5, atol=1e-5)
        close(vq.affine_batch_var, bv, rtol=1e-5, atol=1e-5)
        mapped = (codes - cm) * (std(bv) / std(cv)) + bm
        ref = reference.nearest_code(zk, mapped)
        np.testing.assert_array_equal(idx.cpu().numpy(), spread(ref, m))
        close(z_q[torch.as_tensor(m, device=device)], mapped[ref], rtol=1e-5, atol=1e-5)
        back = (zk - bm) * (std(cv) / std(bv)) + cm
        size = g * size + (1 - g) * np.bincount(ref, minlength=K)
        embed_sum = g * embed_sum + (1 - g) * per_code_sums(ref, back, K)
        close(vq.cluster_size, size, rtol=1e-5)
        close(vq.embed_sum, embed_sum, rtol=1e-4, atol=1e-5)
    now = (f64(vq.codebook) - cm) * (std(bv) / std(cv)) + bm  # decoding: the codes after the update, mapped
    close(vq.get_output_from_indices(idx)[idx >= 0], now[f64(idx[idx >= 0]).astype(int)], rtol=1e-5, atol=1e-5)


def test_affine_statistics_wait_for_rows_and_for_training(device):
    """A batch with no kept vector leaves the batch statistics (and before any, the map is the identity); eval
    calls move nothing unless affine_eval_update, which moves the batch statistics only."""
    vq = VectorQuantizer(5, 9, affine=True, backend="torch").to(device)
    z = torch.randn(20, 5, device=device) + 4
    codes = vq.codebook.detach().clone()
    z_q, idx, _ = vq(z, torch.zeros(20, dtype=torch.bool, device=device))
    assert not vq.affine_batch_initted and vq.affine_codebook_initted and (idx == -1).all()
    assert torch.allclose(vq.get_output_from_indices(torch.arange(9, device=device)), codes, atol=1e-6)  # identity
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(z)
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in state.items())
    vq.affine_eval_update = True
    vq(z)
    assert vq.affine_batch_initted
    torch.testing.assert_close(vq.affine_batch_mean, z.mean(0))
    assert torch.equal(vq.affine_codebook_mean, state["affine_codebook_mean"])


def test_affine_heads_state_dict_and_casts(device):
    """Separate codebooks keep statistics per head ([H, d]); they round-trip through a state_dict and stay
    float32 under a cast."""
    vq = VectorQuantizer(12, 7, heads=3, affine=True, backend="torch").to(device)
    z = torch.randn(30, 12, device=device) * torch.arange(1, 13, device=device)
    vq(z)
    assert vq.affine_batch_mean.shape == (3, 4) and vq.affine_batch_initted.shape == (3,)
    torch.testing.assert_close(vq.affine_batch_mean, z.mean(0).view(3, 4))
    twin = VectorQuantizer(12, 7, heads=3, affine=True, backend="torch").to(device)
    twin.load_state_dict(vq.state_dict())
    x = torch.randn(8, 12, device=device)
    vq.eval(), twin.eval()
    assert torch.equal(vq(x)[0], twin(x)[0])
    vq.to(torch.bfloat16)
    assert all(getattr(vq, n).dtype == torch.float32 for n in ("affine_batch_mean", "affine_codebook_var"))


# --- the in-place optimiser (in_place_optimizer) ------------------------------------------------------------


def test_in_place_step_against_a_hand_step(device):
    """One training call: the SGD step on the codebook loss of the first pass's codes, then the output from
    the stepped codes; the breakdown reports the loss the step minimised."""
    N, D, K, lr = 31, 5, 11, 0.6
    vq = VectorQuantizer(D, K, in_place_optimizer=lambda p: torch.optim.SGD(p, lr=lr), backend="torch").to(device)
    z = torch.randn(N, D, device=device)
    mask = torch.rand(N, device=device) > 0.2
    codes = f64(vq.codebook)
    m = f64(mask).astype(bool)
    zk = f64(z)[m]
    ref = reference.nearest_code(zk, codes)
    grad = per_code_sums(ref, 2 * (codes[ref] - zk), K) / zk.size
    stepped = codes - lr * grad
    z_q, idx, loss, parts = vq(z, mask, return_breakdown=True)
    close(vq.codebook, stepped, rtol=1e-5, atol=1e-6)
    close(parts.in_place_loss, np.mean((zk - codes[ref]) ** 2), rtol=1e-5)
    ref2 = reference.nearest_code(zk, stepped)
    np.testing.assert_array_equal(idx.cpu().numpy(), spread(ref2, m))
    close(loss, np.mean((zk - stepped[ref2]) ** 2) * 1.25, rtol=1e-5)  # codebook + 0.25 commitment, the new codes
    assert vq.codebook.grad is None


def test_in_place_step_only_in_unfrozen_training_calls(device):
    vq = VectorQuantizer(5, 9, in_place_optimizer=lambda p: torch.optim.SGD(p, lr=0.5), backend="torch").to(device)
    z = torch.randn(20, 5, device=device)
    codes = vq.codebook.detach().clone()
    vq(z, freeze_codebook=True)
    vq(z, topk=3)
    vq.eval()
    vq(z)
    assert torch.equal(vq.codebook, codes) and vq.codebook.grad is None
    vq.train()
    with torch.no_grad():  # the in-place pass builds its own graph
        vq(z)
    assert not torch.equal(vq.codebook, codes)


def test_in_place_step_skips_a_dropped_residual_level(device):
    """A residual level that does not run this call takes no in-place step (its codebook stays)."""
    from vqtriton.residual import ResidualVQ

    rvq = ResidualVQ(5, 9, 3, in_place_optimizer=lambda p: torch.optim.SGD(p, lr=0.5), backend="torch").to(device)
    books = [layer.codebook.detach().clone() for layer in rvq.layers]
    _, idx, _ = rvq(torch.randn(20, 5, device=device), num_active=1)
    assert (idx[:, 1:] == -1).all()
    assert not torch.equal(rvq.layers[0].codebook, books[0])
    assert all(torch.equal(rvq.layers[l].codebook, books[l]) for l in (1, 2))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_regulariser_counts_once_whatever_the_heads(device, reduction):
    """Separate codebooks per head: the orthogonal term joins the loss once (as its breakdown reports it),
    not once per codebook, which a "sum" over heads would count H times."""
    torch.manual_seed(0)
    plain = VectorQuantizer(6, 10, heads=3, reduction=reduction, backend="torch").to(device)
    reg = VectorQuantizer(6, 10, heads=3, reduction=reduction, orthogonal_reg_weight=0.7, backend="torch").to(device)
    reg.load_state_dict(plain.state_dict())
    z = torch.randn(25, 6, device=device)
    base = plain(z, return_breakdown=True)[2]
    _, _, loss, parts = reg(z, return_breakdown=True)
    assert float(parts.orthogonal_loss.detach()) > 0
    torch.testing.assert_close(loss, base + 0.7 * parts.orthogonal_loss, rtol=1e-6, atol=1e-7)


def test_a_generator_on_another_device_is_refused_before_any_draw():
    """``.to()`` moves a module's tensors, not its generator: the call says so (here the tensors go to the
    meta device, the stand-in for a GPU on a machine without one)."""
    import vqtriton as vqt

    modules = [VectorQuantizer(4, 5, generator=torch.Generator()), vqt.ResidualVQ(4, 5, 2, generator=torch.Generator()),
               vqt.FSQ([5, 3], generator=torch.Generator()), vqt.LFQ(4, generator=torch.Generator()),
               vqt.ResidualFSQ([5, 3], 2, generator=torch.Generator()), vqt.ResidualLFQ(4, 2, generator=torch.Generator())]
    for m in modules:
        dim = 2 if isinstance(m, (vqt.FSQ, vqt.ResidualFSQ)) else 4
        with pytest.raises(ValueError, match=r"generator is on cpu, its input on meta"):
            m.to("meta")(torch.randn(3, dim, device="meta"))
