"""torch.compile of the FSQ / LFQ training steps: fullgraph, no graph break, no host sync, and compiled ==
eager step after step (``aot_eager`` on the CPU, both backends), for the native modules and the drop-ins.
The entropy ops' ``opcheck`` is in test_lfq.py."""

import copy

import pytest
import torch
from test_compile import _assert_same_step, _fresh_dynamo, _NoSync  # noqa: F401 (_fresh_dynamo: an autouse fixture)

import vqtriton as vqt
from vqtriton import compat

BACKENDS = ["torch", "triton"]
TOL = dict(rtol=1e-5, atol=1e-6)


def _rows(dim):
    return lambda dev, n: (torch.randn(n, dim, device=dev) * 0.05, None)


def _image(dim):
    return lambda dev, n: (torch.randn(n, dim, 3, 2, device=dev) * 0.05, None)


def _masked(dim):
    def make(dev, n):
        z = torch.randn(n, 5, dim, device=dev) * 0.05
        mask = torch.rand(n, 5, device=dev) > 0.3
        z[~mask] = float("nan")  # padding that must reach nothing
        return z, mask

    return make


def _seq(dim):
    return lambda dev, n: (torch.randn(2, n, dim, device=dev) * 0.05, None)


def _cases():
    """name -> (module factory(backend), input maker(device, n) -> (z, mask or None))."""
    return {
        "fsq": (lambda be: vqt.FSQ([8, 5, 5, 5]), _rows(4)),
        "fsq-noise-heads-mask": (lambda be: vqt.FSQ([5, 3], heads=2, symmetric=True, noise_dropout=0.4), _masked(4)),
        "fsq-channel-first-rotation": (lambda be: vqt.FSQ([5, 5, 3], channel_dim=1, rotation=True), _image(3)),
        "lfq": (lambda be: vqt.LFQ(6, backend=be), _rows(6)),
        "lfq-vqp-clamp-mask": (lambda be: vqt.LFQ(6, entropy_eps=1e-5, commitment_weight=0.3, backend=be), _masked(6)),
        "lfq-fraction-heads": (lambda be: vqt.LFQ(8, heads=2, entropy_fraction=0.5, softplus_offset=1.0, backend=be),
                               _masked(8)),
        "lfq-spherical-rotation": (lambda be: vqt.LFQ(5, spherical=True, rotation=True, soft_clamp=1.5, channel_dim=1,
                                                      backend=be), _image(5)),
        "residual-fsq-dropout": (lambda be: vqt.ResidualFSQ([5, 5, 3], 4, quantize_dropout=0.7), _rows(3)),
        "residual-lfq-dropout-mask": (lambda be: vqt.ResidualLFQ(4, 3, quantize_dropout=0.7, entropy_eps=1e-5,
                                                                 backend=be), _masked(4)),
        "compat-fsq": (lambda be: compat.FSQ([5, 5, 3], dim=7, preserve_symmetry=True, noise_dropout=0.5), _seq(7)),
        "compat-lfq": (lambda be: compat.LFQ(dim=7, codebook_size=32, frac_per_sample_entropy=0.6, backend=be), _seq(7)),
        "compat-residual-fsq": (lambda be: compat.ResidualFSQ(dim=5, levels=[5, 5, 3], num_quantizers=3,
                                                              quantize_dropout=True), _seq(5)),
        "compat-residual-lfq": (lambda be: compat.ResidualLFQ(dim=6, codebook_size=16, num_quantizers=3,
                                                              quantize_dropout=True, backend=be), _seq(6)),
    }


CASES = _cases()


def _call(module, z, mask):
    return module(z) if mask is None else module(z, mask)


def _step(module, z, mask, seed):
    """One training step: forward (with this seed), backward of <out, w> + the loss; what to compare."""
    z = z.clone().requires_grad_()
    torch.manual_seed(seed)
    out = _call(module, z, mask)
    y, idx = out[0], out[1]
    loss = out[2].sum() if len(out) > 2 else y.new_zeros(())
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    ((y * w).nan_to_num().sum() + loss).backward()
    return y.detach(), idx, loss.detach(), z.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_step_compiles_whole_and_matches_eager(case, backend, device):
    make, inputs = CASES[case]
    torch.manual_seed(0)
    eager = make(backend).to(device)
    twin = copy.deepcopy(eager)
    z, mask = inputs(device, 11)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(*([z] if mask is None else [z, mask]))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for step in range(3):
        z, mask = inputs(device, 11)
        for m in (eager, twin):
            m.zero_grad(set_to_none=True)
        want = _step(eager, z, mask, seed=step)
        got = _step(compiled, z, mask, seed=step)
        _assert_same_step(eager, twin, got, want, f"{case} step {step}", TOL)
    eager.eval(), twin.eval()
    z, mask = inputs(device, 11)
    _assert_same_step(eager, twin, _step(compiled, z, mask, 9), _step(eager, z, mask, 9), "eval", TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if "lfq" in c])
def test_training_step_reads_no_value_on_the_host(case, backend, device):
    make, inputs = CASES[case]
    module = make(backend).to(device)
    z, mask = inputs(device, 11)
    z.requires_grad_()
    with _NoSync():
        for _ in range(2):
            out = _call(module, z, mask)
            ((out[0] * 0.5).nan_to_num().sum() + out[2].sum()).backward()


def test_a_new_batch_size_recompiles_at_most_once(device):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(vqt.LFQ(6, entropy_eps=1e-5).to(device), fullgraph=True, backend=counter)
    for n in (29, 41, 53, 67):
        z = torch.randn(n, 6, device=device, requires_grad=True)
        compiled(z)[2].backward()
    assert counter.frame_count <= 2, counter.frame_count
