"""quantize (forward + backward): the fused VQ step against the same step in torch eager and torch.compile
(distance matrix, argmin, embedding, codebook and commitment MSE, straight-through)."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("provider", list(bench.PROVIDERS["quantize"]))
def test_quantize(bench_provider, provider, shape):
    bench_provider("quantize", provider, shape, backward=True)
