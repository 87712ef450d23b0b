"""A residual VQ training step (forward + backward, 8 levels): vqtriton's ResidualVQ, the drop-in
vqtriton.compat.ResidualVQ and vector-quantize-pytorch's ResidualVQ, each with vqp's defaults (EMA codebooks,
rotation trick). A module that does not import is skipped."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("provider", list(bench.PROVIDERS["rvq"]))
def test_rvq(bench_provider, provider, shape):
    bench_provider("rvq", provider, shape, backward=True)
