"""The fused VQ backward: straight-through, commitment and codebook gradients in one launch.

The forward gives each row i two copies of its squared distance ``d_i = |z_i - z_q,i|^2``
(``z_q = codebook[idx]``): one for the codebook term and one for the commitment term. With ``w_i`` and
``v_i`` the gradients that reach them (per row: the reduction's scale, or a mask's zero) and
``diff = z - z_q`` (fp32):

    dz        = grad_out + 2 w * diff             (straight-through + commitment term)
    dcodebook = scatter_idx  2 v * -diff          (codebook term; sg[z] keeps it off dz)

The codes come from the forward's own ``z_q`` (saved for backward), not from the codebook: a
codebook updated in place after the forward (an EMA step) cannot change this step's gradient, also
under torch.compile, which may drop a defensive copy of it. One program reads its rows of ``z``,
``z_q`` and ``grad_out``, writes ``dz`` and adds into ``dcodebook`` with atomics.
``deterministic=True`` writes the per-row codebook contributions instead and sums them with
``gather.scatter_add(..., deterministic=True)``. Without a codebook gradient (an EMA codebook is a
buffer) the scatter is skipped entirely.

With the rotation trick (Fifty et al., "Restructuring Vector Quantization with the Rotation Trick",
ICLR 2025) the straight-through part is rotated: ``grad_out`` reaches z as ``lam R^T grad_out``, R
the rotation taking z's direction to z_q's and ``lam = |z_q| / |z|``, both held constant. Per row that
is ``lam g + alpha z + beta z_q`` with three scalars from row sums (``_rotation``): one program takes
whole rows, sums them over D (two passes), then writes the tiles (a third). No [N, D, D] tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqtriton.kernels import block_d, interpreting, row_major, tune_configs
from vqtriton.kernels.gather import scatter_add

__all__ = ["quantize_backward"]


# vector-quantize-pytorch's clamp of the norms in the rotation trick (its safe_div and l2norm eps).
ROTATION_EPS = tl.constexpr(1e-6)
# The interpreter pays per block operation and per program, not per element: there one program takes up
# to 64 Ki elements, and no more rows than N (``block_rows``). Each row's arithmetic is the same whatever
# the rows per program, and the atomics add the rows in the same order, so the results are the same bits.
INTERPRETER_TILE = 1 << 16


def block_rows(args) -> int:
    """BLOCK_N of the row kernels here and in residual.py: the config's TILE over the launcher's BLOCK_D
    (as ``kernels.tile_rows``); under the interpreter at most N, rounded up to a power of two."""
    rows = max(1, args["TILE"] // args["BLOCK_D"])
    return min(rows, triton.next_power_of_2(args["N"])) if interpreting() else rows


@triton.jit
def _rotation(p_z, p_zq, p_g, o_n, m_n, D, stride_z, stride_zq, stride_g, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Per-row ``(lam, alpha, beta)`` with ``lam R^T g = lam g + alpha z + beta z_q``: the rotation trick's
    gradient (Fifty et al. 2024) for rows of ``z`` (u = z / |z|), ``z_q`` (q = z_q / |z_q|) and the
    gradient ``g`` reaching z_q; ``R = I - 2 w w^T + 2 q u^T``, ``w = (u + q) / |u + q|``,
    ``lam = |z_q| / |z|``, all treated as constants (never an [N, D, D] matrix).

    Two passes over the rows: their norms, then sums over the elements of ``u + q`` itself. (|u + q|^2
    from the norms and z . z_q cancels when u is near -q, e.g. D = 1; elementwise, u + q is exactly 0
    when u = -q, as vector-quantize-pytorch computes it.)"""
    s_zz = tl.zeros([BLOCK_N], dtype=tl.float32)  # [BN]
    s_qq = tl.zeros_like(s_zz)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)  # [BD]
        m = m_n[:, None] & (o_d < D)[None, :]  # [BN, BD]
        b_z = tl.load(p_z + o_n[:, None] * stride_z + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_q = tl.load(p_zq + o_n[:, None] * stride_zq + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        s_zz += tl.sum(b_z * b_z, axis=1)
        s_qq += tl.sum(b_q * b_q, axis=1)
    e_z = tl.maximum(tl.sqrt(s_zz), ROTATION_EPS)
    e_q = tl.maximum(tl.sqrt(s_qq), ROTATION_EPS)
    s_tt = tl.zeros_like(s_zz)  # |u + q|^2
    s_tg = tl.zeros_like(s_zz)  # (u + q) . g
    s_qg = tl.zeros_like(s_zz)  # q . g
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)  # [BD]
        m = m_n[:, None] & (o_d < D)[None, :]  # [BN, BD]
        b_u = tl.load(p_z + o_n[:, None] * stride_z + o_d[None, :], mask=m, other=0.0).to(tl.float32) / e_z[:, None]
        b_q = tl.load(p_zq + o_n[:, None] * stride_zq + o_d[None, :], mask=m, other=0.0).to(tl.float32) / e_q[:, None]
        b_g = tl.load(p_g + o_n[:, None] * stride_g + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_t = b_u + b_q  # [BN, BD]
        s_tt += tl.sum(b_t * b_t, axis=1)
        s_tg += tl.sum(b_t * b_g, axis=1)
        s_qg += tl.sum(b_q * b_g, axis=1)
    return _rotation_scalars(s_zz, s_qq, s_tt, s_tg, s_qg)


@triton.jit
def _rotation_scalars(s_xx, s_qq, s_tt, s_tg, s_qg):
    """``(lam, alpha, beta)`` with ``lam R^T g = lam g + alpha x + beta q`` (``_rotation``; also the residual
    kernels' per-level rotation) from the row sums |x|^2, |q|^2, |t|^2, t.g and q^.g, ``t = x^ + q^`` summed
    elementwise (x^, q^ the rows over their clamped norms), of any block shape."""
    e_x = tl.maximum(tl.sqrt(s_xx), ROTATION_EPS)
    e_q = tl.maximum(tl.sqrt(s_qq), ROTATION_EPS)
    s = tl.maximum(tl.sqrt(s_tt), ROTATION_EPS)
    lam = tl.sqrt(s_qq) / e_x
    wg = s_tg / s  # w . g
    return lam, 2.0 * lam * (s_qg - wg / s) / e_x, -2.0 * lam * wg / (s * e_q)


@triton.jit
def _backward_tile(p_z, p_zq, p_g, p_dz, p_dcb, o_n, m_n, o_d, D, b_idx, b_w, b_v, lam, alpha, beta,
                   stride_z, stride_zq, stride_g, stride_dz, stride_dcb, HAS_GRAD: tl.constexpr,
                   CODEBOOK_GRAD: tl.constexpr, ATOMIC: tl.constexpr, ROTATE: tl.constexpr):
    """dz and the codebook contributions of one ``[BN, BD]`` tile (``b_w, b_v``: 2 w and -2 v per row)."""
    m = m_n[:, None] & (o_d < D)[None, :]  # [BN, BD]
    # A -1 row (no code) has a zero z_q, as gather writes it, and adds to no code.
    m_c = m & (b_idx >= 0)[:, None]  # [BN, BD]
    b_z = tl.load(p_z + o_n[:, None] * stride_z + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_c = tl.load(p_zq + o_n[:, None] * stride_zq + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_diff = b_z - b_c  # [BN, BD]
    b_dz = b_w[:, None] * b_diff  # [BN, BD]
    if HAS_GRAD:
        b_g = tl.load(p_g + o_n[:, None] * stride_g + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        if ROTATE:
            b_g = lam[:, None] * b_g + alpha[:, None] * b_z + beta[:, None] * b_c
        b_dz += b_g
    tl.store(p_dz + o_n[:, None] * stride_dz + o_d[None, :], b_dz.to(p_dz.dtype.element_ty), mask=m)
    if CODEBOOK_GRAD:
        b_dc = b_v[:, None] * b_diff  # [BN, BD]
        if ATOMIC:
            tl.atomic_add(p_dcb + b_idx[:, None] * stride_dcb + o_d[None, :], b_dc, mask=m_c, sem="relaxed")
        else:
            # Per-row contributions [N, D], summed in a fixed order by the caller.
            tl.store(p_dcb + o_n[:, None] * stride_dcb + o_d[None, :], b_dc, mask=m)


def _rotation_tiles(configs, named_args, **kwargs):
    """Half-size tiles for the rotation trick's whole-row loops: with the full ones (16 elements a
    thread) its sm_90 code at D = 37 needed every register and spilled 168-496 B; at 8 elements a
    thread, at most 197 registers (triton 3.9) or 220 (3.6), no spill (benchmarks/resources.py)."""
    if not kwargs.get("ROTATE"):
        return configs
    return [triton.Config({**c.kwargs, "TILE": c.kwargs["TILE"] // 2}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in configs]


@triton.autotune(
    # Five pointer blocks per tile: smaller tiles than the pure copies.
    configs=tune_configs([triton.Config({"TILE": t}, num_warps=w) for t, w in [(2048, 4), (4096, 8), (1024, 4)]],
                         triton.Config({"TILE": INTERPRETER_TILE})),
    key=["D", "HAS_GRAD", "CODEBOOK_GRAD", "ATOMIC", "ROTATE"],
    # Timing runs add into dcodebook too: zero it before each run and after tuning.
    reset_to_zero=["p_dcb"],
    prune_configs_by={"early_config_prune": _rotation_tiles},
)
@triton.heuristics({"BLOCK_N": block_rows})
@triton.jit
def _quantize_bwd_kernel(
    p_z,
    p_zq,
    p_idx,
    p_g,
    p_w,
    p_v,
    p_dz,
    p_dcb,
    N,
    D,
    stride_z,
    stride_zq,
    stride_g,
    stride_w,
    stride_v,
    stride_dz,
    stride_dcb,
    HAS_GRAD: tl.constexpr,
    CODEBOOK_GRAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    ROTATE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < N
    b_idx = tl.load(p_idx + o_n, mask=m_n, other=-1)  # [BN]
    # Per-row weights, any stride (0: one value for every row, as a sum's gradient is).
    b_w = 2.0 * tl.load(p_w + o_n * stride_w, mask=m_n, other=0.0).to(tl.float32)  # [BN]
    b_v = b_w
    if CODEBOOK_GRAD:
        b_v = -2.0 * tl.load(p_v + o_n * stride_v, mask=m_n, other=0.0).to(tl.float32)  # [BN]
    if ROTATE:
        # Whole rows per program (a D grid of 1): the row sums first, then the tiles.
        lam, alpha, beta = _rotation(p_z, p_zq, p_g, o_n, m_n, D, stride_z, stride_zq, stride_g, BLOCK_N, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            _backward_tile(p_z, p_zq, p_g, p_dz, p_dcb, o_n, m_n, d0 + tl.arange(0, BLOCK_D), D, b_idx, b_w, b_v,
                           lam, alpha, beta, stride_z, stride_zq, stride_g, stride_dz, stride_dcb, HAS_GRAD,
                           CODEBOOK_GRAD, ATOMIC, ROTATE)
    else:
        o_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        _backward_tile(p_z, p_zq, p_g, p_dz, p_dcb, o_n, m_n, o_d, D, b_idx, b_w, b_v, b_w, b_w, b_w,
                       stride_z, stride_zq, stride_g, stride_dz, stride_dcb, HAS_GRAD, CODEBOOK_GRAD, ATOMIC,
                       ROTATE)


def quantize_backward(
    z: Tensor,
    z_q: Tensor,
    idx: Tensor,
    grad_out: Tensor | None,
    w: Tensor,
    v: Tensor | None,
    num_codes: int,
    *,
    deterministic: bool = False,
    rotate: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``(dz [N, D] in z.dtype, dcodebook float32 [K, D] or None)`` of the VQ losses, in one launch.

    ``z [N, D]``, ``z_q [N, D]`` the forward's codes (``codebook[idx]``, zero where ``idx`` is -1, in a
    dtype that holds them exactly), ``idx`` int64 ``[N]`` in ``[-1, K)``, ``grad_out [N, D]`` or None
    (the gradient reaching z_q, passed straight through to z), ``w`` and ``v`` ``[N]`` (any stride: an
    expanded 0-dim gradient reads as one value for every row) the gradients reaching each row's
    commitment and codebook distance. ``dz = grad_out + 2 w (z - z_q)`` and
    ``dcodebook[idx] += 2 v (z_q - z)``, fp32 math; ``v = None``: no codebook gradient (``dcodebook``
    is None, no scatter runs). ``deterministic=True``: ``dcodebook`` is bitwise reproducible
    (per-row contributions, an extra fp32 ``[N, D]`` buffer, summed by
    ``gather.scatter_add(..., deterministic=True)``). ``rotate=True``: the rotation trick, ``grad_out``
    reaches z rotated and scaled (``_rotation``); each program then takes whole rows.
    """
    n, d = z.shape
    dz = torch.empty(n, d, dtype=z.dtype, device=z.device)
    codebook_grad = v is not None
    if n == 0:
        return dz, torch.zeros(num_codes, d, dtype=torch.float32, device=z.device) if codebook_grad else None
    z, z_q, idx = row_major(z), row_major(z_q), idx.contiguous()
    has_grad = grad_out is not None
    grad_out = row_major(grad_out) if has_grad else z
    v_arg = v if codebook_grad else w
    if not codebook_grad:
        dcb = None
    elif deterministic:
        dcb = torch.empty(n, d, dtype=torch.float32, device=z.device)
    else:
        dcb = torch.zeros(num_codes, d, dtype=torch.float32, device=z.device)
    dcb_arg = dcb if codebook_grad else dz
    rotate = rotate and has_grad
    bd = block_d(d)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), 1 if rotate else triton.cdiv(d, bd))

    _quantize_bwd_kernel[grid](
        z,
        z_q,
        idx,
        grad_out,
        w,
        v_arg,
        dz,
        dcb_arg,
        n,
        d,
        z.stride(0),
        z_q.stride(0),
        grad_out.stride(0),
        w.stride(0),
        v_arg.stride(0),
        dz.stride(0),
        dcb_arg.stride(0),
        HAS_GRAD=has_grad,
        CODEBOOK_GRAD=codebook_grad,
        ATOMIC=not deterministic,
        ROTATE=rotate,
        BLOCK_D=bd,
    )
    if codebook_grad and deterministic:
        dcb = scatter_add(idx, dcb, num_codes, deterministic=True)
    return dz, dcb
