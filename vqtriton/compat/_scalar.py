"""What the FSQ / LFQ translators of :mod:`vqtriton.compat` share: vector-quantize-pytorch's checkpoint
layout over a native module, its cosine-similarity projection, and the decoded codebook dim.

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

from vqtriton.lfq import LFQ as NativeLFQ

__all__ = ["CosineSimLinear", "register_vqp_layout", "with_codebook_dim"]


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


def with_codebook_dim(module: nn.Module, decoded: torch.Tensor) -> torch.Tensor:
    """A residual translator's decoded ``[..., d]`` with vqp's codebook dim, ``[..., 1, d]``, when its indices
    keep it (``module.keep_num_codebooks_dim``: vqp's levels decode the indices' ``[..., 1, Q]`` so)."""
    return decoded.unsqueeze(-2) if module.keep_num_codebooks_dim else decoded
