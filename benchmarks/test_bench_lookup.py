"""lookup: the codebook gather (forward) and its scatter-add into the codebook gradient (backward)."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(bench.PROVIDERS["lookup"]))
def test_lookup(bench_provider, provider, shape, backward):
    bench_provider("lookup", provider, shape, backward)
