"""squared_error (sum): the reduction (forward) and its gradient to both inputs (backward)."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(bench.PROVIDERS["sqerr"]))
def test_sqerr(bench_provider, provider, shape, backward):
    bench_provider("sqerr", provider, shape, backward)
