"""What the FSQ / LFQ translators of :mod:`vqtriton.compat` share: vector-quantize-pytorch's checkpoint
layout over a native module, its cosine-similarity projection, and its quantize-dropout draw.

Each translator holds its native module as ``self.quantizer``. vqp keeps its quantizers' tensors at the
top level (``orthogonal_rot``, ``layers.0.orthogonal_rot``, ``mask``, ``activation.*``); the hooks here
move ``quantizer.<path>`` there (a native ``rotation`` buffer is vqp's ``orthogonal_rot``), and write
vqp's ``mask`` buffer of every LFQ (its persistent ``2^(d-1-i)`` bit weights) so that vqp loads our
checkpoints as they are; loading checks those against this module's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtriton import checks
from vqtriton.compat._common import vqp_dropout_probability, vqp_fixed_seed_levels
from vqtriton.lfq import LFQ as NativeLFQ

__all__ = ["CosineSimLinear", "register_vqp_layout", "set_vqp_dropout", "dropout_translation", "dropout_count"]


class CosineSimLinear(nn.Module):
    """vqp's ``cosine_sim_project_in``: ``scale * normalize(x) @ normalize(weight, dim=0)``, ``weight [in, out]``
    drawn from N(0, 1) (vqp's parameter, its name and its draw)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0) * self.scale


def _vqp_name(path: str) -> str:
    """A native tensor's name in vqp's layout (inside the translator): ``rotation`` is ``orthogonal_rot``."""
    head, _, last = path.rpartition(".")
    last = "orthogonal_rot" if last == "rotation" else last
    return f"{head}.{last}" if head else last


def _lfq_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    """vqp's ``mask`` buffer (name in the translator -> value) of every native LFQ inside ``module.quantizer``."""
    out = {}
    for path, m in module.quantizer.named_modules():
        if isinstance(m, NativeLFQ):
            out[f"{path}.mask" if path else "mask"] = m._powers
    return out


def _to_vqp(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "quantizer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + _vqp_name(key[len(inner):])] = state_dict.pop(key)
    for name, powers in _lfq_masks(module).items():
        state_dict[prefix + name] = powers.detach().clone()


def _from_vqp(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for name, powers in _lfq_masks(module).items():
        value = state_dict.pop(prefix + name, None)
        if value is not None and not torch.equal(value.to(powers.device, torch.int64), powers):
            errors.append(f"{prefix + name} holds the bit weights of another codebook size: {value.tolist()}, "
                          f"this module has {powers.tolist()}")
    for path in module.quantizer.state_dict():
        theirs = prefix + _vqp_name(path)
        if theirs in state_dict:
            state_dict[prefix + "quantizer." + path] = state_dict.pop(theirs)


def register_vqp_layout(module: nn.Module) -> None:
    """Give ``module`` (a translator with a native ``module.quantizer``) vqp's state_dict layout, both ways
    (a state_dict in the native layout, ``quantizer.*``, loads too)."""
    module._register_state_dict_hook(_to_vqp)
    module._register_load_state_dict_pre_hook(_from_vqp, with_module=True)


def set_vqp_dropout(module: nn.Module, num_quantizers, quantize_dropout, cutoff, multiple_of) -> None:
    """vqp's residual quantizers' attributes ``num_quantizers``, ``quantize_dropout`` (on only with more than
    one level), ``quantize_dropout_cutoff_index`` and ``quantize_dropout_multiple_of``, checked."""
    module.num_quantizers = checks.integer("num_quantizers", num_quantizers, 1)
    module.quantize_dropout = bool(quantize_dropout) and module.num_quantizers > 1
    module.quantize_dropout_cutoff_index = checks.integer("quantize_dropout_cutoff_index", cutoff, 0)
    module.quantize_dropout_multiple_of = checks.integer("quantize_dropout_multiple_of", multiple_of, 1)
    if module.quantize_dropout and module.quantize_dropout_cutoff_index >= module.num_quantizers:
        raise ValueError(f"quantize_dropout_cutoff_index must be < num_quantizers = {module.num_quantizers}, "
                         f"got {module.quantize_dropout_cutoff_index}")


def dropout_translation(module: nn.Module) -> dict:
    """vqp's quantize dropout (``set_vqp_dropout``'s attributes) as the native modules' arguments
    (:func:`vqtriton.compat._common.vqp_dropout_probability`: the same distribution)."""
    q, cutoff = module.num_quantizers, module.quantize_dropout_cutoff_index
    return dict(quantize_dropout=vqp_dropout_probability(q, module.quantize_dropout, cutoff),
                quantize_dropout_cutoff_index=min(cutoff, q - 1),
                quantize_dropout_multiple_of=module.quantize_dropout_multiple_of)


def dropout_count(module: nn.Module, seed) -> int | None:
    """The levels a vqp residual quantizer keeps this call, where it is known on the host: all of them
    when vqp would not drop (eval mode, no dropout, or no gradient), vqp's own ``random.Random(seed)``
    draw for a fixed seed; None (the native module draws on the device) otherwise."""
    q = module.num_quantizers
    if not (module.training and module.quantize_dropout and q > 1 and torch.is_grad_enabled()):
        return q
    if seed is None:
        return None
    return vqp_fixed_seed_levels(seed, q, module.quantize_dropout_cutoff_index, module.quantize_dropout_multiple_of)
