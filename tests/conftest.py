"""Test set-up: Triton's interpreter on machines without CUDA, a `gpu` marker, seeded tests.

TRITON_INTERPRET must be set before anything imports triton, so this runs first and decides
without initialising CUDA: it asks the driver through `torch.cuda.is_available()` only, which
does not create a context.
"""

import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible data per test: the seed derives from the test's id."""
    seed = sum(map(ord, request.node.nodeid)) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def device():
    return DEVICE
