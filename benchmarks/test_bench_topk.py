"""Top-k and sampled assignment (forward). Top-k: vqtriton's exact k = 8 nearest codes (and its bf16
mode) against the N x K distance matrix + ``topk`` (addmm in fp32 / TF32, cdist). Sampling: one
Gumbel-max draw per vector, fused, against vqp's way (N x K logits, N x K noise, argmax)."""

import pytest

from vqtriton import bench


@pytest.mark.parametrize("provider", list(bench.PROVIDERS["topk"]))
def test_topk(bench_provider, provider, shape):
    bench_provider("topk", provider, shape, backward=False)


@pytest.mark.parametrize("provider", list(bench.PROVIDERS["sample"]))
def test_sample(bench_provider, provider, shape):
    bench_provider("sample", provider, shape, backward=False)
