"""``vqtriton.compat``: drop-ins for vector-quantize-pytorch (vqp) 1.32.0's quantizers.

``from vqtriton.compat import VectorQuantize`` in place of ``from vector_quantize_pytorch import
VectorQuantize``: vqp's constructor and forward arguments with their defaults, its outputs and shapes,
its state_dict keys in both directions. Each class is a thin translator (one module per vqp class)
over vqtriton's native modules: it maps arguments, layouts, loss conventions and checkpoint keys, and
refuses by name (``NotImplementedError``) any argument value it does not implement.

    vector_quantize.py    VectorQuantize  -> vqtriton.VectorQuantizer
"""

from vqtriton.compat._common import VQP_VERSION
from vqtriton.compat.vector_quantize import UNSUPPORTED, UNSUPPORTED_FORWARD, LossBreakdown, VectorQuantize

__all__ = ["VQP_VERSION", "VectorQuantize", "LossBreakdown", "UNSUPPORTED", "UNSUPPORTED_FORWARD"]
