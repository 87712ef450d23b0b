"""LFQ's training step (forward + backward with the entropy loss, issue 18): vqtriton.LFQ (exact
entropies; eager and compiled), the drop-in vqtriton.compat.LFQ with vector-quantize-pytorch's
defaults (its clamped entropies, computed exactly) and vqp's LFQ itself, which builds the N x 2^d
softmax.

On CUDA the issue's two shapes, (4096 vectors, 2^14 codes) and (2048, 2^18) (vqp's step there needs
gigabytes; out of memory it is skipped); on the CPU one small shape for a smoke run, since the issue's
first shape takes vqp about ten seconds a step here (time those with ``vqtriton bench --device cpu
--ops lfq``; a vqp step over the CPU memory budget is skipped). Compare providers of one group within one run.
"""

import pytest

from vqtriton import bench

CPU_SHAPE = (512, 1024, 10)


@pytest.mark.parametrize("which", [0, 1], ids=[bench.shape_id(s) for s in bench.LFQ_SHAPES])
@pytest.mark.parametrize("provider", list(bench.PROVIDERS["lfq"]))
def test_lfq_step(bench_provider, device, provider, which):
    if device != "cuda" and which:
        pytest.skip("the CPU smoke run times one small shape (see the module docstring)")
    bench_provider("lfq", provider, bench.LFQ_SHAPES[which] if device == "cuda" else CPU_SHAPE, backward=True)
