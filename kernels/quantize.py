"""The fused VQ backward: straight-through, commitment and codebook gradients in one launch.

With ``diff = z - codebook[idx]`` (fp32):

    dz        = grad_out + coef_z * diff             (straight-through + commitment term)
    dcodebook = scatter_idx  coef_codebook * -diff   (codebook term; sg[z] keeps it off dz)

One program reads its rows of ``z`` and ``grad_out``, gathers their code rows, writes ``dz`` and
adds into ``dcodebook`` with atomics. ``deterministic=True`` writes the per-row codebook
contributions instead and sums them with ``gather.scatter_add(..., deterministic=True)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqtriton.kernels import block_d, row_major, row_tile, tile_configs, tile_rows
from vqtriton.kernels.gather import scatter_add

__all__ = ["quantize_backward"]


@triton.autotune(
    # Five pointer blocks per tile: smaller tiles than the pure copies.
    configs=tile_configs([(2048, 4), (4096, 8), (1024, 4)]),
    key=["D", "HAS_GRAD", "ATOMIC"],
    # Timing runs add into dcodebook too: zero it before each run and after tuning.
    reset_to_zero=["p_dcb"],
)
@tile_rows
@triton.jit
def _quantize_bwd_kernel(
    p_z,
    p_cb,
    p_idx,
    p_g,
    p_coef,
    p_dz,
    p_dcb,
    N,
    D,
    stride_z,
    stride_cb,
    stride_g,
    stride_dz,
    stride_dcb,
    HAS_GRAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_n, o_d, m_n, m_d = row_tile(N, D, BLOCK_N, BLOCK_D)
    m = m_n[:, None] & m_d[None, :]  # [BN, BD]
    b_idx = tl.load(p_idx + o_n, mask=m_n, other=-1)  # [BN]
    # The contract has idx >= 0; a -1 row reads as gather does (a zero code) and adds to no code.
    m_c = m & (b_idx >= 0)[:, None]  # [BN, BD]
    b_z = tl.load(p_z + o_n[:, None] * stride_z + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_c = tl.load(p_cb + b_idx[:, None] * stride_cb + o_d[None, :], mask=m_c, other=0.0).to(tl.float32)
    b_diff = b_z - b_c  # [BN, BD]
    # The coefficients stay on the device: no host sync to read them.
    coef_z = tl.load(p_coef)
    coef_cb = tl.load(p_coef + 1)
    b_dz = coef_z * b_diff  # [BN, BD]
    if HAS_GRAD:
        b_dz += tl.load(p_g + o_n[:, None] * stride_g + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(p_dz + o_n[:, None] * stride_dz + o_d[None, :], b_dz.to(p_dz.dtype.element_ty), mask=m)
    b_dc = -coef_cb * b_diff  # [BN, BD]
    if ATOMIC:
        tl.atomic_add(p_dcb + b_idx[:, None] * stride_dcb + o_d[None, :], b_dc, mask=m_c, sem="relaxed")
    else:
        # Per-row contributions [N, D], summed in a fixed order by the caller.
        tl.store(p_dcb + o_n[:, None] * stride_dcb + o_d[None, :], b_dc, mask=m)


def quantize_backward(
    z: Tensor,
    codebook: Tensor,
    idx: Tensor,
    grad_out: Tensor | None,
    coef: Tensor,
    *,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(dz [N, D] in z.dtype, dcodebook float32 [K, D])`` of the VQ losses, in one launch.

    ``z [N, D]``, ``codebook [K, D]``, ``idx`` int64 ``[N]`` (>= 0), ``grad_out [N, D]`` or None (the
    gradient reaching z_q, passed straight through to z), ``coef`` float32 ``[2]`` on the device =
    ``(coef_z, coef_codebook)``. ``dz = grad_out + coef_z (z - codebook[idx])`` and
    ``dcodebook[idx] += coef_codebook (codebook[idx] - z)``, fp32 math.
    ``deterministic=True``: ``dcodebook`` is bitwise reproducible (per-row contributions, an extra
    fp32 ``[N, D]`` buffer, summed by ``gather.scatter_add(..., deterministic=True)``).
    """
    n, d = z.shape
    k = codebook.shape[0]
    dz = torch.empty(n, d, dtype=z.dtype, device=z.device)
    if n == 0:
        return dz, torch.zeros(k, d, dtype=torch.float32, device=z.device)
    z, codebook, idx = row_major(z), row_major(codebook), idx.contiguous()
    coef = coef.to(torch.float32).contiguous()
    has_grad = grad_out is not None
    grad_out = row_major(grad_out) if has_grad else z
    if deterministic:
        dcb = torch.empty(n, d, dtype=torch.float32, device=z.device)
    else:
        dcb = torch.zeros(k, d, dtype=torch.float32, device=z.device)
    bd = block_d(d)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, bd))

    _quantize_bwd_kernel[grid](
        z,
        codebook,
        idx,
        grad_out,
        coef,
        dz,
        dcb,
        n,
        d,
        z.stride(0),
        codebook.stride(0),
        grad_out.stride(0),
        dz.stride(0),
        dcb.stride(0),
        HAS_GRAD=has_grad,
        ATOMIC=not deterministic,
        BLOCK_D=bd,
    )
    if deterministic:
        dcb = scatter_add(idx, dcb, k, deterministic=True)
    return dz, dcb
