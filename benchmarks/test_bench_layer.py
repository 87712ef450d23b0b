"""One layer step (forward + backward): vqtriton's VectorQuantizer, a plain eager torch VQ layer and
vector-quantize-pytorch's VectorQuantize (its defaults). A layer that does not import is skipped."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("provider", list(bench.PROVIDERS["layer"]))
def test_layer(bench_provider, provider, shape):
    bench_provider("layer", provider, shape, backward=True)
