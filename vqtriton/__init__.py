"""vqtriton: Triton kernels for vector quantization.

Exact nearest-code assignment without the N x K distance matrix, the VQ-VAE losses with their
stop-gradients, and a VQ layer built on them. ``vqtriton.reference`` is the NumPy ground truth.
"""

from vqtriton.functional import QuantizeResult, assign, lookup, quantize, squared_error, verify_assignment
from vqtriton.layer import QuantizerBreakdown, VectorQuantizer
from vqtriton.model import VQVAE, LossBreakdown
from vqtriton.residual import ResidualVQ

__version__ = "0.1.0"

__all__ = [
    "assign",
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
]
