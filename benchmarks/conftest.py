"""Benchmark set-up: device and shapes, and one helper that times a provider with pytest-benchmark.

CUDA (when available) gets the issue's five shapes and small-N; the CPU gets one tiny shape, with
vqtriton on its torch backend, so ``pytest benchmarks --benchmark-disable`` is a quick smoke test.
``--bench-device cpu`` forces the CPU run on a GPU machine. CUDA is asked about in hooks and
fixtures only, never at import.
"""

import gc

import pytest
import torch

from vqtriton import bench


def pytest_configure(config):
    # Raised by torch's own inductor import (torch/utils/mkldnn.py), once per torch.compile user.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_addoption(parser):
    parser.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto", help="device of the benchmarks")


def _device(config) -> str:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        device = _device(metafunc.config)
        shapes = bench.default_shapes(device) if device == "cuda" else bench.CPU_SHAPES[:1]
        metafunc.parametrize("shape", shapes, ids=[bench.shape_id(s) for s in shapes])


@pytest.fixture
def device(request):
    return _device(request.config)


@pytest.fixture
def bench_provider(benchmark, device):
    """``bench_provider(op, provider, shape, backward)``: times one provider's synchronised callable.

    Skips a provider that cannot run here; records provider, op, mode, shape, device and the peak
    CUDA memory above the inputs (MiB, None on the CPU) in ``benchmark.extra_info``.
    """

    def run(op: str, provider: str, shape, backward: bool):
        x = bench.make_inputs(shape, device, requires_grad=backward)
        try:
            fn = bench.timed_callable(bench.PROVIDERS[op][provider], x, backward)
        except bench.Unavailable as e:
            pytest.skip(str(e))
        mode = "fwd+bwd" if backward else "fwd"
        fn()  # warm-up: compiles torch.compile and Triton kernels outside the timing
        benchmark.group = f"{op} {mode} {bench.shape_id(shape)}"
        benchmark.extra_info.update(
            op=op, mode=mode, provider=provider, shape=list(shape), device=device, peak_mib=bench.peak_mib(fn)
        )
        benchmark(fn)

    yield run
    if torch.cuda.is_initialized():  # hand the GPU memory back before the next shape
        gc.collect()
        torch.cuda.empty_cache()
