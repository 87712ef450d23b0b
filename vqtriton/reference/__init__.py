"""``vqtriton.reference``: NumPy float64 definitions that every kernel and module is tested against.

One module per family, each importing NumPy only (not torch, triton, nor the rest of vqtriton), so
the package loads on its own:

    vqvae.py    the VQ-VAE spec (``spec/VqVae-spec.txt``): encode, quantized, forward, the three loss
                terms and the total, nearest-code assignment and the analytic gradients
    fsq.py      finite scalar quantization: bounds, levels, codes, mixed-radix indices, noise dropout
    lfq.py      lookup-free quantization: sign codes, indices, the entropy terms (by definition and in
                the factored forms the kernels use), commitment, the loss and the analytic gradients
    residual.py residual VQ: the residual loop (l2 / cosine, per-level sizes, masks, levels), the
                analytic gradients of both output modes, and every level's EMA statistics
    assign.py   top-k assignment (nearest first), the Gumbel-max sampling distribution (vqp's softmax)
                and the Philox4x32-10 generator of the sampling noise

Every public name of the submodules is re-exported here (``reference.nearest_code``, ...).
"""

from .vqvae import *  # noqa: F401,F403
from .vqvae import __all__ as _vqvae_all
from .fsq import *  # noqa: F401,F403
from .fsq import __all__ as _fsq_all
from .lfq import *  # noqa: F401,F403
from .lfq import __all__ as _lfq_all
from .residual import *  # noqa: F401,F403
from .residual import __all__ as _residual_all
from .assign import *  # noqa: F401,F403
from .assign import __all__ as _assign_all

__all__ = [*_vqvae_all, *_fsq_all, *_lfq_all, *_residual_all, *_assign_all]
