"""vqtriton: Triton kernels for vector quantization."""

__version__ = "0.1.0"
