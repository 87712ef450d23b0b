"""torch.compile and the residual VQ ops: ``torch.library.opcheck`` of every ``torch.ops.vqtriton.residual_*``
op, and whole steps under ``fullgraph=True`` (0 graph breaks, compiled == eager) on both backends.

As tests/test_compile.py: the ``aot_eager`` backend on the CPU (dynamo, AOTAutograd, fake tensors and
functionalization), the Triton kernels through the interpreter.
"""

import pytest
import torch

import vqtriton as vqt
from vqtriton.functional import unit
from test_compile import _fresh_dynamo  # noqa: F401 (an autouse fixture)

BACKENDS = ["torch", "triton"]
OPS = ("residual_assign", "residual_quantize", "residual_quantize_backward", "residual_stats")


def _cases(backend, device):
    """(name, op, args) for every residual op, on awkward shapes with per-level sizes."""
    n, d, sizes = 23, 5, [7, 3, 6]
    z = torch.randn(n, d, device=device, requires_grad=True)
    c = torch.randn(sum(sizes), d, device=device, requires_grad=True)
    keep = torch.rand(n, device=device) > 0.3
    levels = torch.tensor(2, device=device)
    o = torch.ops.vqtriton
    for cosine in (False, True):
        codes = unit(c.detach()).requires_grad_() if cosine else c
        yield f"residual_assign-cosine={cosine}", o.residual_assign, (
            z.detach(), codes.detach(), sizes, "exact", cosine, None, None, backend)
        for mode, rotate in (("first", False), ("every", True)):
            yield f"residual_quantize-cosine={cosine}-{mode}-rotate={rotate}", o.residual_quantize, (
                z, codes, sizes, "exact", cosine, None, None, mode, rotate, False, backend)
    yield "residual_assign-mask-levels", o.residual_assign, (
        z.detach(), c.detach(), sizes, "exact", False, keep, levels, backend)
    yield "residual_quantize-mask-levels-deterministic", o.residual_quantize, (
        z, c, sizes, "exact", False, keep, levels, "every", True, True, backend)
    idx, _, _ = o.residual_assign(z.detach(), c.detach(), sizes, "exact", False, None, None, backend)
    g, w, v = torch.randn(n, d, device=device), torch.rand(n, 3, device=device), torch.rand(n, 3, device=device)
    for cg in (True, False):
        yield f"residual_quantize_backward-codebook_grad={cg}", o.residual_quantize_backward, (
            z.detach(), c.detach(), sizes, idx, g, w, v, False, "every", True, keep, levels, cg, False, backend)
    for det in (False, True):
        yield f"residual_stats-deterministic={det}", o.residual_stats, (
            z.detach(), c.detach(), sizes, idx, False, det, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_residual_op(backend, device):
    names = set()
    for name, op, args in _cases(backend, device):
        torch.library.opcheck(op, args)  # schema, fake tensors, autograd registration, AOT dispatch
        names.add(name.split("-")[0])
    assert names == set(OPS)


def _train_step(backend, metric, output_grad, rotation_trick):
    def step(z, codebooks, mask, levels):
        out = vqt.residual_quantize(z, codebooks, metric=metric, mask=mask, levels=levels, output_grad=output_grad,
                                    rotation_trick=rotation_trick, backend=backend)
        keep = mask.unsqueeze(-1).float()
        count = (keep.sum() * z.shape[-1]).clamp_min(1)
        loss = ((out.dist_codebook + 0.25 * out.dist_commitment) * keep).sum() / count
        return out.z_q, out.indices, loss

    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric, output_grad, rotation_trick",
                         [("l2", "first", False), ("l2", "every", True), ("cosine", "first", True)])
def test_training_step_compiles_whole_and_matches_eager(backend, device, metric, output_grad, rotation_trick):
    step = _train_step(backend, metric, output_grad, rotation_trick)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in range(2):  # a second call reuses the graph
        torch.manual_seed(seed)
        z = torch.randn(3, 17, 6, device=device)
        cb = torch.randn(4, 9, 6, device=device)
        mask = torch.rand(3, 17, device=device) > 0.2
        levels = torch.randint(1, 5, (), device=device)  # quantize dropout, drawn on the device
        results = []
        for fn in (step, compiled):
            zz, cc = z.clone().requires_grad_(), cb.clone().requires_grad_()
            z_q, idx, loss = fn(zz, cc, mask, levels)
            ((z_q * 0.5).sum() + loss).backward()
            results.append((z_q, idx, loss, zz.grad, cc.grad))
        for name, a, b in zip(("z_q", "indices", "loss", "dz", "dcodebooks"), *results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    z, cb = torch.randn(3, 17, 6, device=device), torch.randn(4, 9, 6, device=device, requires_grad=True)
    explained = torch._dynamo.explain(step)(z, cb, torch.ones(3, 17, dtype=torch.bool, device=device),
                                            torch.tensor(3, device=device))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_and_ema_statistics_compile_whole(backend, device):
    """An eval encode (``residual_assign``, per-level sizes) and a step's EMA statistics (on indices from the
    forward: ``check_indices=False``, nothing read on the host) trace whole and match eager."""
    sizes = [9, 4, 7]

    def encode(z, books):
        r = vqt.residual_assign(z, books, metric="cosine", backend=backend)
        counts, sums = vqt.residual_code_stats(z, books, r.indices, metric="cosine", backend=backend,
                                               check_indices=False)
        return r.indices, r.z_q, r.distances, *counts, *sums

    z = torch.randn(2, 21, 6, device=device)
    books = [torch.randn(k, 6, device=device) for k in sizes]
    eager = encode(z, books)
    compiled = torch.compile(encode, fullgraph=True, backend="aot_eager")(z, books)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    explained = torch._dynamo.explain(encode)(z, books)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
