"""Per-call overhead (issue 19): small batches, where the host's work per call is the cost.

At N = 1, 64 and 1024 vectors (K = 256, D = 32), on one torch thread (``bench.one_thread``; the issue
measured that way): the eager training step (forward + backward) and the eval forward of
``VectorQuantizer`` with a learned and with an EMA codebook against vector-quantize-pytorch's
``VectorQuantize`` with matching settings (``bench._vq_pair``); ``assign`` against ``torch.cdist`` +
argmin; and on CUDA the Triton path's host time per launch (``vqt.assign`` whole and its launcher,
timed without the device sync after the call, so the queued kernel is not in the number; skipped on
the CPU, where the interpreter runs the kernel inside the launch). Medians over many rounds
(``benchmark.pedantic``; the device synchronised before each round, outside the timer); compare the
providers of one group within one run, never across runs on this shared machine. On glibc, fix the
allocator's thresholds for numbers that do not depend on the other provider's allocations (see
``bench.LATENCY_CLOCK``): ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456``.
"""

import pytest

from vqtriton import bench

CASES = [(op, provider) for op in bench.LATENCY_OPS for provider in bench.PROVIDERS[op]]


@pytest.mark.parametrize("latency_shape", bench.LATENCY_SHAPES, ids=[bench.shape_id(s) for s in bench.LATENCY_SHAPES])
@pytest.mark.parametrize("op, provider", CASES, ids=[f"{op}-{p}" for op, p in CASES])
def test_latency(benchmark, device, op, provider, latency_shape):
    x = bench.make_inputs(latency_shape, device, requires_grad=op not in bench.FORWARD_ONLY_OPS)
    try:
        fn = bench.timed_callable(
            bench.PROVIDERS[op][provider], x, op not in bench.FORWARD_ONLY_OPS, device_sync=op not in bench.HOST_ONLY_OPS
        )
    except bench.Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"{op} {bench.shape_id(latency_shape)}"
    benchmark.extra_info.update(op=op, provider=provider, shape=list(latency_shape), device=device, threads=1)
    with bench.one_thread():
        benchmark.pedantic(fn, setup=bench.sync, rounds=200, warmup_rounds=20)
