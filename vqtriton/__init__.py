"""vqtriton: Triton kernels for vector quantization.

Exact nearest-code assignment without the N x K distance matrix, the VQ-VAE losses with their
stop-gradients, and a VQ layer built on them. ``vqtriton.reference`` is the NumPy ground truth.
"""

from vqtriton.functional import QuantizeResult, assign, lookup, quantize, sample_codes, squared_error, verify_assignment
from vqtriton.residual_ops import (
    ResidualAssignResult, ResidualQuantizeResult, residual_assign, residual_code_stats, residual_quantize,
)
from vqtriton.layer import QuantizerBreakdown, VectorQuantizer
from vqtriton.model import VQVAE, LossBreakdown
from vqtriton.residual import ResidualVQ
from vqtriton.fsq import FSQ
from vqtriton.lfq import LFQ, LFQBreakdown
from vqtriton.residual_scalar import ResidualFSQ, ResidualLFQ
from vqtriton.entropy import LFQEntropy, bit_entropy, code_distribution, distribution_entropy, lfq_entropy

__version__ = "0.1.0"

__all__ = [
    "assign",
    "sample_codes",
    "lookup",
    "squared_error",
    "quantize",
    "verify_assignment",
    "QuantizeResult",
    "VectorQuantizer",
    "QuantizerBreakdown",
    "VQVAE",
    "LossBreakdown",
    "ResidualVQ",
    "FSQ",
    "LFQ",
    "LFQBreakdown",
    "ResidualFSQ",
    "ResidualLFQ",
    "lfq_entropy",
    "bit_entropy",
    "code_distribution",
    "distribution_entropy",
    "LFQEntropy",
    "residual_assign",
    "residual_quantize",
    "residual_code_stats",
    "ResidualAssignResult",
    "ResidualQuantizeResult",
]
