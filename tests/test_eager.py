"""The eager fast path (``vqtriton.eager.call``): the custom ops' own functions and gradients without the dispatcher.

Every case runs the op both ways on the same inputs: ``eager.call(name, *args)`` and
``torch.ops.vqtriton.<name>(*args)``. Outputs must be bitwise equal and so must every gradient (the same
functions run). The profiler shows whether the dispatcher ran the op (a ``vqtriton::<name>`` event), so
the tests also check that the fast path is taken in eager mode, that the op is what runs under a dispatch
mode (fake tensors), and that under ``torch.compile`` the graph holds the custom op itself, with no
graph break (dynamo sees ``torch.compiler.is_compiling()`` True and traces only the op call).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import vqtriton as vqt
from vqtriton import eager

BACKENDS = ["torch", "triton"]


def _cases(backend, device):
    """(name, args, differentiable input positions) on awkward shapes, with a masked index."""
    n, k, d = 19, 7, 5
    z = torch.randn(n, d, device=device)
    c = torch.randn(k, d, device=device)
    b = torch.randn(n, d, device=device)
    idx = torch.randint(0, k, (n,), device=device)
    idx[::4] = -1
    zq = c[idx.clamp_min(0)].masked_fill((idx < 0)[:, None], 0)
    w, v, g = torch.rand(n, device=device), torch.rand(n, device=device), torch.randn(n, d, device=device)
    yield "assign", (z, c, "exact", backend), ()
    yield "quantize", (z, c, "exact", backend, False, False), (0, 1)
    yield "quantize", (z, c, "exact", backend, True, True), (0, 1)  # deterministic, rotation trick
    yield "quantize_backward", (z, zq, idx, g, w, v, k, True, False, False, backend), ()
    yield "lookup", (idx, c, backend, False), (1,)
    yield "scatter_add", (idx, g, k, False, backend), ()
    for reduction in ("none", "sum", "mean"):
        yield "squared_error", (z, b, reduction, backend), (0, 1)
    yield "sqerr_backward", (z, b, w, backend), ()
    yield "code_stats", (idx, g, k, False, backend), ()
    yield "code_counts", (idx, k, backend), ()


def _run(fn, name, args, grads):
    """Outputs and input gradients of one call (backward of a fixed random combination of the float outputs)."""
    args = [a.detach().clone().requires_grad_(i in grads) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    out = fn(name, *args)
    outs = out if isinstance(out, tuple) else (out,)
    if grads:
        gen = torch.Generator().manual_seed(0)
        total = sum((o * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs if o.is_floating_point())
        total.backward()
    return outs, [args[i].grad for i in grads]


def _dispatched(fn) -> set[str]:
    """The vqtriton custom ops the dispatcher ran during ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return {e.key for e in p.key_averages() if e.key.startswith("vqtriton::")}


def _op(name, *args):
    return getattr(torch.ops.vqtriton, name)(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_is_bitwise_the_op(backend, device):
    for name, args, grads in _cases(backend, device):
        want, want_grads = _run(_op, name, args, grads)
        got, got_grads = _run(eager.call, name, args, grads)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and g.requires_grad == w.requires_grad, name
            assert torch.equal(g.nan_to_num(), w.nan_to_num()) and torch.equal(g.isnan(), w.isnan()), name
        for g, w in zip(got_grads, want_grads):
            assert torch.equal(g, w), f"{name}: gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_skip_the_dispatcher(backend, device):
    z = torch.randn(9, 4, device=device, requires_grad=True)
    c = torch.randn(6, 4, device=device, requires_grad=True)

    def step():
        r = vqt.quantize(z, c, 0.25, backend=backend)
        (r.loss + r.z_q.sum()).backward()
        vqt.assign(z, c, backend=backend)
        vqt.squared_error(z, z * 2, backend=backend).backward()
        vqt.lookup(torch.tensor([0, -1, 5], device=device), c, backend=backend).sum().backward()

    assert _dispatched(step) == set()
    out = eager.call("quantize", z, c, "exact", backend, False, False)
    assert type(out[0].grad_fn).__name__ == "_OpFunctionBackward"
    with torch.no_grad():  # no gradient needed: the op's function itself, no autograd node
        assert eager.call("quantize", z, c, "exact", backend, False, False)[0].grad_fn is None
    # The op's defaults fill the arguments not given, as the dispatcher's do.
    full = eager.call("assign", z.detach(), c.detach(), "exact", backend, 0, 0.0, None, False)
    short = eager.call("assign", z.detach(), c.detach(), "exact", backend)
    assert all(torch.equal(a, b) for a, b in zip(full, short))


def test_the_op_runs_where_something_must_see_it(device):
    z = torch.randn(9, 4, device=device, requires_grad=True)
    c = torch.randn(6, 4, device=device)
    # assign registers no gradient: with a gradient wanted the op itself runs (and raises on backward, as it does).
    assert _dispatched(lambda: eager.call("assign", z, c, "exact", "torch")) == {"vqtriton::assign"}
    mode = FakeTensorMode()
    fz, fc = mode.from_tensor(z.detach()), mode.from_tensor(c)
    with mode:  # fake tensors: only the op's fake implementation can answer
        idx, dist = eager.call("assign", fz, fc, "exact", "torch")
    assert idx.shape == (9,) and idx.dtype == torch.int64 and dist.shape == (9,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_code_keeps_the_custom_op(backend, device):
    graphs = []

    def backend_fn(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(z, c):
        r = vqt.quantize(z, c, 0.25, reduction="mean", backend=backend)
        return r.z_q, r.indices, r.loss

    z = torch.randn(13, 5, device=device)
    c = torch.randn(7, 5, device=device)
    explained = torch._dynamo.explain(step)(z, c)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend_fn, fullgraph=True)
    got, want = compiled(z, c), step(z, c)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert targets & {"vqtriton.quantize", "vqtriton.quantize.default"}, targets  # the op (packet or overload)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2])
    torch._dynamo.reset()
