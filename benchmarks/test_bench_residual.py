"""Residual VQ encode (forward, 8 levels): ``vqtriton.residual_assign`` (every level in one launch) against
the level-by-level loop of ``vqtriton.assign`` launches and a plain torch cdist + argmin loop."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("provider", list(bench.PROVIDERS["residual"]))
def test_residual(bench_provider, provider, shape):
    bench_provider("residual", provider, shape, backward=False)
