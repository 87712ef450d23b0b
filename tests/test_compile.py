"""torch.compile: the custom ops (``torch.library.opcheck``) and whole training steps under fullgraph=True.

On the CPU both backends run ("torch", and "triton": the kernels through the interpreter) with the
``aot_eager`` backend: dynamo, AOTAutograd, fake tensors and functionalization, all of torch.compile but
inductor's code generation. Each compiled step must match eager: indices equal, outputs, losses, input
and codebook gradients and the module state close, step after step. GPU tests (marked gpu) compile with
inductor and capture the EMA training step in a CUDA graph (``mode="reduce-overhead"``).
"""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import vqtriton as vqt
from vqtriton import custom_ops
from vqtriton.compat import GroupedResidualVQ, ResidualVQ, VectorQuantize
from vqtriton.backend import ops
from vqtriton.torch_ops import __all__ as LAUNCHERS

BACKENDS = ["torch", "triton"]
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- the custom ops --------------------------------------------------------------------------------


def _op_cases(backend, device):
    """(name, op, args) for every op of torch.ops.vqtriton, on awkward shapes."""
    n, k, d = 23, 7, 5
    z = torch.randn(n, d, device=device, requires_grad=True)
    c = torch.randn(k, d, device=device, requires_grad=True)
    b = torch.randn(n, d, device=device, requires_grad=True)
    idx = torch.randint(0, k, (n,), device=device)
    idx[::5] = -1
    zq = c.detach()[idx.clamp_min(0)].masked_fill((idx < 0)[:, None], 0)
    w, v = torch.rand(n, device=device), torch.rand(n, device=device)
    g = torch.randn(n, d, device=device)
    ops_ = torch.ops.vqtriton
    yield "assign", ops_.assign, (z.detach(), c.detach(), "exact", backend)
    yield "quantize", ops_.quantize, (z, c, "exact", backend, False, False)
    yield "quantize-deterministic", ops_.quantize, (z, c, "exact", backend, True, False)
    yield "quantize-rotation", ops_.quantize, (z, c, "exact", backend, False, True)
    for cg in (True, False):
        for rotate in (False, True):
            yield f"quantize_backward-codebook_grad={cg}-rotate={rotate}", ops_.quantize_backward, (
                z.detach(), zq, idx, g, w, v, k, cg, False, rotate, backend)
    yield "lookup", ops_.lookup, (idx, c, backend, False)
    yield "scatter_add", ops_.scatter_add, (idx, g, k, False, backend)
    for reduction in ("none", "sum", "mean"):
        yield f"squared_error-{reduction}", ops_.squared_error, (z, b, reduction, backend)
    yield "sqerr_backward-total", ops_.sqerr_backward, (z.detach(), b.detach(), torch.tensor(0.7, device=device), backend)
    yield "sqerr_backward-rows", ops_.sqerr_backward, (z.detach(), b.detach(), w, backend)
    yield "code_stats", ops_.code_stats, (idx, g, k, False, backend)
    yield "code_counts", ops_.code_counts, (idx, k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(backend, device):
    names = []
    for name, op, args in _op_cases(backend, device):
        torch.library.opcheck(op, args)  # schema, fake tensors, autograd registration, AOT dispatch
        names.append(name.split("-")[0])
    assert set(names) == set(custom_ops.__all__)


# --- the layers' steps, compiled whole ------------------------------------------------------------


def _layer_cases():
    """name -> (module factory, input maker(device, n) -> (z, mask or None))."""
    def rows(dev, n):
        return torch.randn(n, 12, device=dev), None

    def image(dev, n):
        return torch.randn(n, 12, 3, 5, device=dev), None

    def masked(dev, n):
        z = torch.randn(n, 7, 12, device=dev)
        mask = torch.rand(n, 7, device=dev) > 0.3
        z[~mask] = float("nan")  # padding that must reach nothing
        return z, mask

    return {
        "learned": (lambda be: vqt.VectorQuantizer(12, 37, backend=be), rows),
        "ema-dead-codes": (lambda be: vqt.VectorQuantizer(12, 37, ema_decay=0.8, dead_code_threshold=0.9, backend=be), rows),
        "cosine-channel-first": (lambda be: vqt.VectorQuantizer(12, 37, metric="cosine", channel_dim=1, backend=be), image),
        "mask-ema": (lambda be: vqt.VectorQuantizer(12, 37, ema_decay=0.9, reduction="sum", backend=be), masked),
        "mask-learned": (lambda be: vqt.VectorQuantizer(12, 37, backend=be), masked),
        "heads": (lambda be: vqt.VectorQuantizer(12, 37, heads=3, ema_decay=0.9, backend=be), rows),
        "shared-heads": (lambda be: vqt.VectorQuantizer(12, 37, heads=2, shared_codebook=True, backend=be), masked),
        "kmeans": (lambda be: vqt.VectorQuantizer(12, 37, kmeans_init=True, kmeans_iters=3, ema_decay=0.9, backend=be), rows),
        "deterministic": (lambda be: vqt.VectorQuantizer(12, 37, deterministic=True, backend=be), rows),
        "rotation-trick": (lambda be: vqt.VectorQuantizer(12, 37, rotation_trick=True, backend=be), masked),
        "vqp-compat": (lambda be: VectorQuantize(12, 37, threshold_ema_dead_code=0.5, backend=be), rows),
        "residual-dropout": (
            lambda be: vqt.ResidualVQ(12, 37, 3, quantize_dropout=0.6, ema_decay=0.9, dead_code_threshold=0.5, backend=be),
            rows,
        ),
        "residual-every-frac-sizes": (
            lambda be: vqt.ResidualVQ(12, (37, 19, 5), output_gradient="every", quant_grad_frac=0.3, rotation_trick=True,
                                      backend=be), masked),
        "residual-shared-ema": (
            lambda be: vqt.ResidualVQ(12, 37, 3, shared_codebook=True, ema_decay=0.9, dead_code_threshold=0.5,
                                      quantize_dropout=0.5, backend=be), rows),
        "residual-beam": (lambda be: vqt.ResidualVQ(12, 37, 3, beam_size=3, ema_decay=0.9, backend=be), rows),
        "residual-qinco": (lambda be: vqt.ResidualVQ(12, 37, 3, implicit_neural_codebook=True, backend=be), rows),
        "residual-sampled": (lambda be: vqt.ResidualVQ(12, 37, 2, sample_temperature=0.7, ema_decay=0.9, backend=be), rows),
        "topk": (lambda be: _Summed(vqt.VectorQuantizer(12, 37, rotation_trick=True, backend=be), topk=4), masked),
        "directional": (lambda be: vqt.VectorQuantizer(12, 37, directional_reparam=True, dead_code_threshold=0.4,
                                                       backend=be), rows),
        "regularised": (lambda be: vqt.VectorQuantizer(12, 37, ema_decay=0.9, orthogonal_reg_weight=0.5,
                                                       orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=20,
                                                       codebook_diversity_weight=0.3, commitment_cross_entropy=True,
                                                       backend=be), rows),
        "bridged-sync-update": (lambda be: vqt.VectorQuantizer(12, 37, codebook_fn=nn.Linear(12, 12), sync_update_v=0.4,
                                                               backend=be), masked),
        "vqp-residual": (lambda be: _Summed(ResidualVQ(dim=12, num_quantizers=3, codebook_size=37, quantize_dropout=True,
                                                       threshold_ema_dead_code=0.5, backend=be)), rows),
        "vqp-residual-projection-beam": (
            lambda be: _Summed(ResidualVQ(dim=12, codebook_dim=7, num_quantizers=3, codebook_size=37, beam_size=2,
                                          learnable_codebook=True, ema_update=False, backend=be)), rows),
        "vqp-residual-qinco-masked": (
            lambda be: _Summed(ResidualVQ(dim=12, num_quantizers=2, codebook_size=37, implicit_neural_codebook=True,
                                          backend=be)), masked),
        "vqp-residual-sampled-shared": (
            lambda be: _Summed(ResidualVQ(dim=12, num_quantizers=3, codebook_size=37, stochastic_sample_codes=True,
                                          sample_codebook_temp=0.5, shared_codebook=True, backend=be)), rows),
        "vqp-residual-diveq": (lambda be: _Summed(ResidualVQ(dim=12, num_quantizers=2, codebook_size=37, diveq=True,
                                                             backend=be)), rows),
        "vqp-grouped": (lambda be: _Summed(GroupedResidualVQ(dim=12, groups=2, num_quantizers=3, codebook_size=37,
                                                             quantize_dropout=True, backend=be)), rows),
        "affine-heads": (lambda be: vqt.VectorQuantizer(12, 37, heads=2, ema_decay=0.9, affine=True, affine_eval_update=True,
                                                        dead_code_threshold=0.5, backend=be), masked),
        "vqp-affine-learnable": (lambda be: VectorQuantize(12, 37, affine_param=True, learnable_codebook=True,
                                                           ema_update=False, backend=be), rows),
        "residual-affine-dropout": (lambda be: vqt.ResidualVQ(12, 37, 3, affine=True, ema_decay=0.9, quantize_dropout=0.5,
                                                              backend=be), rows),
    }


class _Summed(nn.Module):
    """A module whose loss comes per level (vqp's residual modules) or per candidate (top-k), summed: the
    step's scalar loss (and top-k's candidate outputs summed: the input's shape). ``kwargs`` go to every call."""

    def __init__(self, module: nn.Module, **kwargs):
        super().__init__()
        self.module, self.kwargs = module, kwargs

    def forward(self, z, mask=None):
        out = self.module(z, **self.kwargs) if mask is None else self.module(z, mask=mask, **self.kwargs)
        z_q = out[0].sum(-2) if "topk" in self.kwargs else out[0]
        return z_q, out[1], out[2].nan_to_num().sum()


LAYERS = _layer_cases()


def _step(module, z, mask, w, seed):
    """One training step: forward (with this seed), backward of <z_q, w> + loss; what to compare."""
    z = z.clone().requires_grad_()
    torch.manual_seed(seed)
    z_q, idx, loss = module(z) if mask is None else module(z, mask)
    total = (z_q * w).nan_to_num().sum() + loss
    if total.requires_grad:  # (vqp's eval output, and loss, pass no gradient: compat's eval steps)
        total.backward()
    return z_q.detach(), idx, loss.detach(), z.grad


def _assert_same_step(eager, compiled, got, want, what, tol=TOL):
    (zq1, i1, l1, g1), (zq2, i2, l2, g2) = got, want
    assert torch.equal(i1, i2), f"{what}: indices"
    torch.testing.assert_close(zq1, zq2, **tol, equal_nan=True, msg=f"{what}: z_q")
    torch.testing.assert_close(l1, l2, **tol, msg=f"{what}: loss")
    assert (g1 is None) == (g2 is None), f"{what}: input gradient"
    if g1 is not None:
        torch.testing.assert_close(g1, g2, **tol, equal_nan=True, msg=f"{what}: input gradient")
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=f"{what}: gradient of {name}")
    want_state = compiled.state_dict()
    for name, t in eager.state_dict().items():
        torch.testing.assert_close(t, want_state[name], **tol, msg=f"{what}: state {name}")


def _train_both(case, eager, twin, compiled, inputs, device, n, steps=3):
    """``steps`` training steps of ``eager`` and of ``compiled`` (``twin`` compiled), on the same data."""
    for step in range(steps):
        z, mask = inputs(device, n)
        w = torch.randn_like(z)
        for m in (eager, twin):
            m.zero_grad(set_to_none=True)
        want = _step(eager, z, mask, w, seed=step)
        got = _step(compiled, z, mask, w, seed=step)
        _assert_same_step(eager, twin, got, want, f"{case} step {step}")
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_step_compiles_whole_and_matches_eager(case, backend, device):
    make, inputs = LAYERS[case]
    torch.manual_seed(0)
    eager = make(backend).to(device)
    twin = copy.deepcopy(eager)
    z, mask = inputs(device, 41)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(*([z] if mask is None else [z, mask]))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    w = _train_both(case, eager, twin, compiled, inputs, device, 41)
    eager.eval(), twin.eval()
    z, mask = inputs(device, 41)
    _assert_same_step(eager, twin, _step(compiled, z, mask, w, 9), _step(eager, z, mask, w, 9), "eval")


def test_kmeans_step_is_one_recompile(device):
    """The k-means step is a graph of its own: the next step recompiles once, without it."""
    vq = vqt.VectorQuantizer(12, 37, kmeans_init=True).to(device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(vq, fullgraph=True, backend=counter)
    for _ in range(4):
        compiled(torch.randn(41, 12, device=device))
    assert bool(vq.initted) and not vq._kmeans_pending
    assert counter.frame_count == 2


def _vqvae(backend):
    enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))
    dec = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))
    return vqt.VQVAE(enc, vqt.VectorQuantizer(6, 19, channel_dim=1, ema_decay=0.9, backend=backend), dec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vqvae_training_step(backend, device):
    """``model.loss`` compiled whole; ``loss.backward()`` and the optimiser step outside the compiled call."""
    torch.manual_seed(0)
    eager = _vqvae(backend).to(device)
    twin = copy.deepcopy(eager)
    loss_fn = torch.compile(twin.loss, fullgraph=True, backend="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, twin)]
    for step in range(3):
        x = torch.randn(3, 1, 6, 5, device=device)
        outs = []
        for m, fn, opt in ((eager, eager.loss, opts[0]), (twin, loss_fn, opts[1])):
            opt.zero_grad()
            out = fn(x)
            out.total.backward()
            outs.append(out)
            opt.step()
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
        for (name, t), u in zip(eager.named_buffers(), twin.buffers()):
            torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


# The in-place codebook optimiser runs backward() and an optimiser step inside the forward: eager, behind
# torch.compiler.disable. name -> module factory (inputs [n, 12]).
IN_PLACE = {
    "native-sgd": lambda: vqt.VectorQuantizer(12, 37, in_place_optimizer=lambda p: torch.optim.SGD(p, lr=0.2),
                                              backend="torch"),
    "native-affine-adam-bridge": lambda: vqt.VectorQuantizer(12, 37, affine=True, codebook_fn=nn.Linear(12, 12),
                                                             in_place_optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
                                                             backend="torch"),
    "vqp-compat": lambda: VectorQuantize(12, 37, learnable_codebook=True, ema_update=False, affine_param=True,
                                         in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.2), backend="torch"),
    "vqp-residual-shared": lambda: _Summed(ResidualVQ(dim=12, num_quantizers=3, codebook_size=37, shared_codebook=True,
                                                      learnable_codebook=True, ema_update=False, backend="torch",
                                                      in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.2))),
}


@pytest.mark.parametrize("case", list(IN_PLACE))
def test_in_place_optimizer_compiles_with_graph_breaks_only_there(case, device):
    """What the README says of ``in_place_optimizer`` under torch.compile: fullgraph=True refuses the step (the
    disabled in-place function), the default compile breaks the graph there and nowhere else, and its training
    steps match eager (outputs, gradients, codebook and optimiser state)."""
    torch.manual_seed(0)
    eager = IN_PLACE[case]().to(device)
    twin = copy.deepcopy(eager)
    z = torch.randn(41, 12, device=device)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(z)
    assert all("torch.compiler.disable" in str(b.reason) and "_in_place_step" in str(b.reason)
               for b in explained.break_reasons), [str(b.reason) for b in explained.break_reasons]
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="_in_place_step"):
        torch.compile(copy.deepcopy(eager), fullgraph=True, backend="aot_eager")(z)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    _train_both(case, eager, twin, torch.compile(twin, backend=counter), lambda dev, n: (torch.randn(n, 12, device=dev), None),
                device, 41)
    assert counter.frame_count >= 1  # the code after the in-place step is compiled


@pytest.mark.parametrize("case", ["learned", "mask-ema", "residual-dropout"])
def test_dynamic_batch_sizes_recompile_at_most_once(case, device):
    make, inputs = LAYERS[case]
    module = make(None).to(device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    for n in (29, 41, 53, 67, 80):
        z, mask = inputs(device, n)
        z.requires_grad_()
        z_q, idx, loss = compiled(z) if mask is None else compiled(z, mask)
        loss.backward()
        assert idx.shape == z.shape[:1] + idx.shape[1:] and z_q.shape == z.shape
    assert counter.frame_count <= 2, counter.frame_count


# --- no host sync on the step's path; errors as in eager --------------------------------------------

# aten ops that hand a tensor's value to the host (a device sync on CUDA), or size a tensor by its values.
_SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
            "_unique2", "bincount", "repeat_interleave"}


class _NoSync(TorchDispatchMode):
    """Fails on any aten op that reads values on the host. The custom ops are opaque here (their bodies
    run below this mode): what is checked is the step around them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func.namespace == "aten" and name in _SYNCING:
            raise AssertionError(f"host sync on the step's path: aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in LAYERS if c != "kmeans"])
def test_training_step_reads_no_value_on_the_host(case, backend, device):
    make, inputs = LAYERS[case]
    module = make(backend).to(device)
    z, mask = inputs(device, 41)
    z.requires_grad_()
    with _NoSync():
        for _ in range(2):
            z_q, idx, loss = module(z) if mask is None else module(z, mask)
            ((z_q * 0.5).nan_to_num().sum() + loss).backward()


def test_the_sync_guard_catches_a_sync(device):
    with pytest.raises(AssertionError, match="host sync"), _NoSync():
        torch.ones(3, device=device).sum().item()


@pytest.fixture
def no_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a launcher ran before the input checks answered")

    for name in LAUNCHERS:
        for backend in BACKENDS:
            monkeypatch.setattr(ops(backend), name, launched)


_SMALL_VQ = vqt.VectorQuantizer(6, 7)
BAD_UNDER_COMPILE = [
    ("assign-D", lambda z, c: vqt.assign(z[:, :3], c), ValueError, r"D = 5"),
    ("assign-int", lambda z, c: vqt.assign(z.long(), c), TypeError, r"floating-point tensor .*int64"),
    ("quantize-beta", lambda z, c: vqt.quantize(z, c, beta=-1.0), ValueError, r"beta must be >= 0"),
    ("quantize-mask", lambda z, c: vqt.quantize(z, c, mask=torch.ones(3, dtype=torch.bool, device=z.device)),
     ValueError, r"mask must have z's shape without the last dim, \(11,\), got \(3,\)"),
    ("lookup-range", lambda z, c: vqt.lookup(torch.full((4,), 9, device=c.device), c), IndexError,
     r"\[0, 7\) .*got values in \[9, 9\]"),
    ("sqerr-shape", lambda z, c: vqt.squared_error(z, z[:2]), ValueError, r"same shape"),
    ("layer-dim", lambda z, c: _SMALL_VQ.to(z.device)(z), ValueError, r"dim = 6 channels"),
]


@pytest.mark.parametrize("fn, error, match", [c[1:] for c in BAD_UNDER_COMPILE], ids=[c[0] for c in BAD_UNDER_COMPILE])
def test_bad_input_raises_the_same_error_under_compile(no_launch, fn, error, match, device):
    """The same error as in eager, before any launch. Under fullgraph=True dynamo wraps an exception raised
    while tracing in its own ``Unsupported`` ("Observed exception"), our message quoted in it; an error
    raised inside an op at run time (an index out of range) comes out as it is."""
    z, c = torch.randn(11, 5, device=device), torch.randn(7, 5, device=device)
    with pytest.raises(error, match=match):
        fn(z, c)
    with pytest.raises(error, match=match):
        torch.compile(fn, backend="aot_eager")(z, c)
    torch._dynamo.reset()
    wrapped = (error, torch._dynamo.exc.Unsupported)
    with pytest.raises(wrapped, match=match) as raised:
        torch.compile(fn, fullgraph=True, backend="aot_eager")(z, c)
    if raised.type is not error:
        assert f"raised exception {error.__name__}(" in str(raised.value)


# --- GPU: inductor and CUDA graphs ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["learned", "mask-ema", "heads", "shared-heads", "cosine-channel-first"])
def test_gpu_inductor_step_matches_eager(case, device):
    """(No random state: inductor draws other random numbers than eager, so restarts and k-means differ.)"""
    make, inputs = LAYERS[case]
    torch.manual_seed(0)
    eager = make(None).to(device)
    twin = copy.deepcopy(eager)
    _train_both(case, eager, twin, torch.compile(twin, fullgraph=True), inputs, device, 4099)


@pytest.mark.gpu
def test_gpu_ema_step_captures_in_a_cuda_graph(device):
    """mode="reduce-overhead": the whole EMA step (forward, EMA update) replays as a CUDA graph."""
    torch.manual_seed(0)
    eager = vqt.VectorQuantizer(64, 1000, ema_decay=0.9).to(device)
    twin = copy.deepcopy(eager)
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(twin, mode="reduce-overhead", fullgraph=True)
    for step in range(5):
        z = torch.randn(8191, 64, device=device)
        want = eager(z)
        got = compiled(z)
        assert torch.equal(got[1], want[1]), step
        torch.testing.assert_close(got[2], want[2])
        torch.testing.assert_close(twin.codebook, eager.codebook, rtol=1e-5, atol=1e-6)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], dict(torch._dynamo.utils.counters["inductor"])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["learned", "ema-dead-codes", "mask-ema", "residual-dropout"])
def test_gpu_eager_step_never_syncs(case, device):
    """The eager training step on CUDA under torch.cuda.set_sync_debug_mode("error"): any host sync,
    in the step or inside an op, raises."""
    make, inputs = LAYERS[case]
    module = make(None).to(device)
    z, mask = inputs(device, 4099)
    z.requires_grad_()
    for _ in range(2):  # warm-up: autotuning times configs (and syncs) on the first calls
        module(z) if mask is None else module(z, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z_q, idx, loss = module(z) if mask is None else module(z, mask)
        ((z_q * 0.5).nan_to_num().sum() + loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
