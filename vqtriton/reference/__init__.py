"""``vqtriton.reference``: NumPy float64 definitions that every kernel and module is tested against.

One module per family, each importing NumPy only (not torch, triton, nor the rest of vqtriton), so
the package loads on its own:

    vqvae.py    the VQ-VAE spec (``spec/VqVae-spec.txt``): encode, quantized, forward, the three loss
                terms and the total, nearest-code assignment and the analytic gradients

Every public name of the submodules is re-exported here (``reference.nearest_code``, ...).
"""

from .vqvae import *  # noqa: F401,F403
from .vqvae import __all__ as _vqvae_all

__all__ = [*_vqvae_all]
