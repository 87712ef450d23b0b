"""assign (forward): vqtriton's exact nearest code against torch eager fp32 / TF32, torch.compile,
cdist, and the fp32 / bf16 GEMM alone (speed-of-light references; they find no index)."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("provider", list(bench.PROVIDERS["assign"]))
def test_assign(bench_provider, provider, shape):
    bench_provider("assign", provider, shape, backward=False)
