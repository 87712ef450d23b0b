"""``vqtriton.compat``: drop-ins for vector-quantize-pytorch (vqp) 1.32.0's quantizers.

``from vqtriton.compat import VectorQuantize`` in place of ``from vector_quantize_pytorch import
VectorQuantize``: vqp's constructor and forward arguments with their defaults, its outputs and shapes,
its state_dict keys in both directions. Each class is a thin translator (one module per vqp class)
over vqtriton's native modules: it maps arguments, layouts, loss conventions and checkpoint keys, and
would refuse by name (``NotImplementedError``) an argument value it did not implement (``UNSUPPORTED``,
empty: every vqp 1.32.0 argument of these classes is implemented).

    vector_quantize.py    VectorQuantize  -> vqtriton.VectorQuantizer
    residual_vq.py        ResidualVQ      -> vqtriton.ResidualVQ
    grouped_residual_vq.py GroupedResidualVQ -> vqtriton.ResidualVQ, one per group
    fsq.py                FSQ             -> vqtriton.FSQ
    lfq.py                LFQ             -> vqtriton.LFQ
    residual_fsq.py       ResidualFSQ     -> vqtriton.ResidualFSQ
    residual_lfq.py       ResidualLFQ     -> vqtriton.ResidualLFQ
"""

from vqtriton.compat._common import VQP_VERSION
from vqtriton.compat.vector_quantize import UNSUPPORTED, UNSUPPORTED_FORWARD, LossBreakdown, VectorQuantize
from vqtriton.compat.residual_vq import ResidualVQ
from vqtriton.compat.grouped_residual_vq import GroupedResidualVQ
from vqtriton.compat.fsq import FSQ
from vqtriton.compat.lfq import LFQ
from vqtriton.compat.residual_fsq import ResidualFSQ
from vqtriton.compat.residual_lfq import ResidualLFQ

__all__ = ["VQP_VERSION", "VectorQuantize", "LossBreakdown", "UNSUPPORTED", "UNSUPPORTED_FORWARD", "ResidualVQ",
           "GroupedResidualVQ", "FSQ", "LFQ", "ResidualFSQ", "ResidualLFQ"]
