"""torch.compile and the custom-op contract of top-k and sampled assignment: ``torch.ops.vqtriton.assign``
with ``k`` or a temperature, ``torch.ops.vqtriton.quantize`` with a temperature (``torch.library.opcheck``),
and a step that draws its seed on the device, compiled whole (``fullgraph=True``, ``aot_eager`` on the CPU)
and equal to eager, without a host read. Both backends ("triton": the kernels through the interpreter).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import vqtriton as vqt
from test_compile import _fresh_dynamo, _NoSync  # noqa: F401 (_fresh_dynamo: an autouse fixture)

BACKENDS = ["torch", "triton"]


def _cases(backend, device):
    n, k, d = 23, 9, 5
    z = torch.randn(n, d, device=device, requires_grad=True)
    c = torch.randn(k, d, device=device, requires_grad=True)
    seed = torch.tensor(1234567, device=device)
    ops = torch.ops.vqtriton
    for top in (1, 4, 9):
        yield f"assign-k{top}", ops.assign, (z.detach(), c.detach(), "exact", backend, top)
    yield "assign-k3-bf16", ops.assign, (z.detach(), c.detach(), "bf16", backend, 3)
    for cosine in (False, True):
        yield f"assign-sample-cosine={cosine}", ops.assign, (z.detach(), c.detach(), "exact", backend, 0, 0.7, seed,
                                                             cosine)
        yield f"quantize-sample-cosine={cosine}", ops.quantize, (z, c, "exact", backend, False, False, 0.7, seed,
                                                                 cosine)
    yield "quantize-sample-rotation", ops.quantize, (z, c, "exact", backend, True, True, 2.5, seed, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_new_arguments(backend, device):
    for name, op, args in _cases(backend, device):
        torch.library.opcheck(op, args)  # schema, fake tensors, autograd registration, AOT dispatch


def _step(z, c, w):
    """Top-k, a sample and a sampled quantize step with a seed drawn on the device; what to compare."""
    seed = torch.randint(0, 2**62, (), device=z.device)
    top, dist = vqt.assign(z, c, k=3, return_distance=True)
    drawn = vqt.sample_codes(z, c, 0.8, seed, metric="cosine")
    r = vqt.quantize(z, c, 0.25, temperature=0.8, seed=seed + 1)
    return top, dist, drawn, r.indices, r.z_q, (r.z_q * w).sum() + r.loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_compiles_whole_and_matches_eager(backend, device, monkeypatch):
    monkeypatch.setenv("VQTRITON_BACKEND", backend)
    c0 = torch.randn(31, 6, device=device)
    explained = torch._dynamo.explain(_step)(torch.randn(17, 6, device=device), c0, torch.randn(17, 6, device=device))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    for step in range(3):
        z, w = torch.randn(17, 6, device=device), torch.randn(17, 6, device=device)
        outs = []
        for fn in (_step, compiled):
            zz, cc = z.clone().requires_grad_(), c0.clone().requires_grad_()
            torch.manual_seed(step)
            *vals, loss = fn(zz, cc, w)
            loss.backward()
            outs.append((*vals, loss.detach(), zz.grad, cc.grad))
        (t1, d1, s1, i1, q1, l1, gz1, gc1), (t2, d2, s2, i2, q2, l2, gz2, gc2) = outs
        assert torch.equal(t1, t2) and torch.equal(d1, d2) and torch.equal(s1, s2) and torch.equal(i1, i2)
        assert torch.equal(q1, q2)
        for a, b in ((l1, l2), (gz1, gz2), (gc1, gc2)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_reads_no_value_on_the_host(backend, device, monkeypatch):
    """Around the opaque ops nothing syncs: the seed stays on the device (no .item() of it)."""
    monkeypatch.setenv("VQTRITON_BACKEND", backend)
    z = torch.randn(17, 6, device=device, requires_grad=True)
    c = torch.randn(31, 6, device=device, requires_grad=True)
    with _NoSync():
        *_, loss = _step(z, c, torch.randn(17, 6, device=device))
        loss.backward()


def test_int_seeds_recompile_at_most_once(device):
    """A Python int seed that changes every call: dynamo makes it dynamic after one recompile."""
    counter = CompileCounterWithBackend("aot_eager")

    def draw(z, c, seed):
        return vqt.sample_codes(z, c, 1.0, seed)

    compiled = torch.compile(draw, fullgraph=True, backend=counter)
    z, c = torch.randn(13, 4, device=device), torch.randn(7, 4, device=device)
    for seed in (3, 4, 5, 6):
        assert torch.equal(compiled(z, c, seed), draw(z, c, seed))
    assert counter.frame_count <= 2, counter.frame_count
