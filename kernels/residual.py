"""Residual VQ in one launch: every level's nearest code of the running residual, and its replay.

Forward (``residual_assign_fwd``, ``_residual_kernel``): a program owns BN rows and runs the residual
loop ``r_0 = z, i_l = nearest(x_l, C_l), r_{l+1} = r_l - C_l[i_l]`` over all L levels itself, with
``x_l = r_l`` (l2) or ``r_l / |r_l|`` (cosine; the codes come normalised). Each level is one search
of ``kernels/assign.py`` (its jit helpers, unchanged) on rows the program wrote itself: the residual
(fp32), and for the tensor-core searches the centred operands (``centre._centre_kernel``'s body, run
on this program's rows). Those rows live in per-row scratch buffers that only their program touches,
written and read back within the launch (L1 / L2), never a round trip through another launch; z is
read once, and only z_q, the indices and the distances are written for good.

Exact mode runs the certified split-bf16 search of ``_search_certify``. A row its bound cannot
separate cannot wait for a later launch (the next level needs its code now), so the program re-ranks
it at once with the direct-form search ``_search_exact`` over that level's codes, one such row at a
time (a ``[1, BK, BD]`` tile: only the listed rows pay CUDA-core work). ``precision="tf32" | "bf16"``
run ``_search_dot``. The code axis is never split across programs (each level depends on the one
before), so at small N this kernel fills fewer SMs than L split ``assign`` launches would.

Backward (``residual_backward``, ``_replay_kernel``): one launch. A program replays its rows'
residuals from z and the step's codes (the same fp32 subtractions as the forward, so the same bits),
level by level within each D tile, and writes dz and every level's codebook gradient (atomics, or
per-(row, level) contributions summed by ``gather.scatter_add(..., deterministic=True)``). The
straight-through part reaches z once ("first": level 0's output) or once per level ("every"), as it
is or rotated (the rotation trick); cosine levels apply the normalisation's Jacobian. Whole-row sums
(norms, the rotation's scalars) take extra passes over the row before the one that writes.
The same replay gives every level's EMA statistics (``residual_stats``): counts and sums of each
level's input ``x_l``, in one launch.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqtriton.kernels import interpreting, row_major, tune_configs
from vqtriton.kernels.assign import (
    _CERTIFY, _DOT_INTERPRETER, _GROUP, _MODES, KEY_MAX, PRECISIONS, _certified, _certify_bound, _finish,
    _fit_bd, _row_block, _search_certify, _search_dot, _search_exact,
)
from vqtriton.kernels.centre import _centre_kernel, _part_dtype, _parts_buffer, centred_codebook
from vqtriton.kernels.gather import scatter_add
from vqtriton.kernels.quantize import INTERPRETER_TILE, ROTATION_EPS, _rotation_scalars, block_rows

__all__ = ["residual_assign_fwd", "residual_backward", "residual_stats", "OUTPUT_GRADS"]

OUTPUT_GRADS = ("first", "every")
# F.normalize's eps (the cosine metric's vectors, functional.unit); the rotation trick's clamp of the
# norms is kernels/quantize.py's ROTATION_EPS.
UNIT_EPS = tl.constexpr(1e-12)
# The direct-form re-rank of one row the certified bound cannot separate: a [1, BK, BD] tile.
_ROW_BK, _ROW_BD = 64, 16
# D tile of the passes over a program's rows (start, unit, centre, finish, advance): [BN, 16] tiles keep
# their 64-bit pointers in few registers (the interpreter takes 64: it pays per block operation).
_PASS_BD = 16


# --- forward ----------------------------------------------------------------------------------------


@triton.jit
def _level_on(l, n_lv, BN: tl.constexpr):
    """``[BN]`` copies of ``l < n_lv`` (a scalar condition as a block: the interpreter mistypes
    ``block & scalar``)."""
    return tl.full([BN], l, tl.int32) < n_lv


@triton.jit
def _kept_rows(keep_ptr, levels_ptr, o_n, m_n, L, HAS_MASK: tl.constexpr, HAS_LEVELS: tl.constexpr):
    """The rows that run (in range, and kept by the mask) and how many leading levels run: quantize
    dropout's n, clamped to [0, L] (decided on the device, never read on the host)."""
    keep = m_n
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + o_n, mask=m_n, other=0) != 0)
    n_lv = L
    if HAS_LEVELS:
        n_lv = tl.minimum(tl.maximum(tl.load(levels_ptr).to(tl.int32), 0), L)
    return keep, n_lv


@triton.jit
def _start(z_ptr, r_ptr, zq_ptr, o_n, m_n, keep, D, stride_z, stride_r, stride_zq, BN: tl.constexpr,
           BD: tl.constexpr):
    """r_0 = z in fp32 (masked rows: zeros, whatever they hold) and z_q = 0."""
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_z = tl.load(z_ptr + o_n[:, None] * stride_z + o_d[None, :], mask=keep[:, None] & m, other=0.0)
        tl.store(r_ptr + o_n[:, None] * stride_r + o_d[None, :], b_z.to(tl.float32), mask=m)
        tl.store(zq_ptr + o_n[:, None] * stride_zq + o_d[None, :], tl.zeros([BN, BD], dtype=tl.float32), mask=m)


@triton.jit
def _unit_rows(r_ptr, u_ptr, o_n, m_n, D, stride_r, BN: tl.constexpr, BD: tl.constexpr):
    """u = r / max(|r|, eps) for the rows of ``m_n``, the norm and the division in float64 (as
    ``functional.unit``: no overflow of |r|^2, and the fp32 result is F.normalize's, rounded once)."""
    b_ss = tl.zeros([BN], dtype=tl.float64)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_r = tl.load(r_ptr + o_n[:, None] * stride_r + o_d[None, :], mask=m, other=0.0).to(tl.float64)
        b_ss += tl.sum(b_r * b_r, axis=1)
    b_den = tl.maximum(tl.sqrt(b_ss), UNIT_EPS)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_n[:, None] & (o_d < D)[None, :]
        p = o_n[:, None] * stride_r + o_d[None, :]
        b_r = tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float64)
        tl.store(u_ptr + p, (b_r / b_den[:, None]).to(tl.float32), mask=m)


@triton.jit
def _advance(r_ptr, zq_ptr, c_ptr, b_code, o_n, m_ok, D, stride_r, stride_c, stride_zq, BD: tl.constexpr):
    """r -= c and z_q += c (fp32) for the rows that took a code this level (``m_ok``)."""
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_ok[:, None] & (o_d < D)[None, :]
        b_c = tl.load(c_ptr + b_code[:, None] * stride_c + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        p_r = r_ptr + o_n[:, None] * stride_r + o_d[None, :]
        p_zq = zq_ptr + o_n[:, None] * stride_zq + o_d[None, :]
        tl.store(p_r, tl.load(p_r, mask=m, other=0.0) - b_c, mask=m)
        tl.store(p_zq, tl.load(p_zq, mask=m, other=0.0) + b_c, mask=m)


@triton.jit
def _rerank_rows(b_key, m_todo, i_n, u_ptr, c_ptr, k_n, D, stride_r, stride_c, GROUP: tl.constexpr,
                 BN: tl.constexpr, RBK: tl.constexpr, RBD: tl.constexpr):
    """``b_key`` with each row of ``m_todo`` replaced by its direct-form best key over ``k_n`` codes,
    one row at a time (lowest row first): the rows the certified bound left open."""
    o_b = tl.arange(0, BN)
    for _ in range(0, tl.sum(m_todo.to(tl.int32), axis=0)):
        i_row = tl.min(tl.where(m_todo, o_b, BN), axis=0)
        o_1 = i_n * BN + i_row + tl.arange(0, 1)  # [1] int64: that row
        t_key = tl.min(_search_exact(u_ptr, c_ptr, o_1, o_1 >= 0, 0, k_n, D, stride_r, stride_c, GROUP, 1, RBK, RBD),
                       axis=0)
        m_this = o_b == i_row
        b_key = tl.where(m_this, t_key, b_key)
        m_todo = m_todo & ~m_this
    return b_key


@triton.jit
def _residual_kernel(z_ptr, c_ptr, ch_ptr, cl_ptr, csq_ptr, ce_ptr, aux_ptr, mean_ptr, koff_ptr, keep_ptr,
                     levels_ptr, r_ptr, u_ptr, xh_ptr, xl_ptr, xsq_ptr, sidx_ptr, sdist_ptr, idx_ptr, dist_ptr, zq_ptr,
                     N, D, L, stride_z, stride_c, stride_cs, stride_r, stride_x, stride_zq, bound_e, n_bucket, k_total,
                     MODE: tl.constexpr, COSINE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LEVELS: tl.constexpr,
                     EMULATE_BF16: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     BD: tl.constexpr, PD: tl.constexpr, RBK: tl.constexpr, RBD: tl.constexpr):
    # n_bucket and k_total are only autotune keys.
    i_n = tl.program_id(0).to(tl.int64)
    o_n, m_n = _row_block(N, BN)
    keep, n_lv = _kept_rows(keep_ptr, levels_ptr, o_n, m_n, L, HAS_MASK, HAS_LEVELS)
    _start(z_ptr, r_ptr, zq_ptr, o_n, m_n, keep, D, stride_z, stride_r, stride_zq, BN, PD)
    m_alive = keep  # rows still quantizing: kept, with a finite distance at every level so far
    b_fail = tl.zeros([BN], dtype=tl.float32)  # a dead row's failing distance (NaN or +Inf)
    tl.debug_barrier()
    for l in range(0, L):
        k_lo = tl.load(koff_ptr + l)
        k_n = (tl.load(koff_ptr + l + 1) - k_lo).to(tl.int32)
        c_l = c_ptr + k_lo * stride_c
        m_on = m_alive & _level_on(l, n_lv, BN)
        b_code = tl.full([BN], -1, tl.int64)
        b_dist = tl.zeros([BN], dtype=tl.float32)
        if tl.max(m_on.to(tl.int32), axis=0) > 0:
            if COSINE:
                _unit_rows(r_ptr, u_ptr, o_n, m_on, D, stride_r, BN, PD)
                tl.debug_barrier()
            if MODE != 0:
                # The tensor-core operands of this level, as centre_rows makes them for assign.
                _centre_kernel(u_ptr, mean_ptr + l * D, xh_ptr, xl_ptr, xsq_ptr, N, D, stride_r, stride_x, MODE,
                               EMULATE_BF16, BN, PD)
                tl.debug_barrier()
            if MODE == 3:
                b_min, t_code, b_ebest, b_lrest = _search_certify(
                    xh_ptr, xl_ptr, xsq_ptr, ch_ptr + k_lo * stride_cs, cl_ptr + k_lo * stride_cs, csq_ptr + k_lo,
                    ce_ptr + k_lo, o_n, m_on, 0, k_n, k_n, D, stride_x, stride_cs, EMULATE_BF16, BN, BK, BD)
                b_xsq = tl.load(xsq_ptr + o_n, mask=m_on, other=0.0)
                m_cert = m_on & _certified(b_min, b_ebest, b_lrest, b_xsq, aux_ptr + 2 * l, bound_e)
                b_key = _rerank_rows(tl.where(m_cert, t_code.to(tl.int64), KEY_MAX), m_on & ~m_cert, i_n, u_ptr, c_l,
                                     k_n, D, stride_r, stride_c, GROUP, BN, RBK, RBD)
            elif MODE == 0:
                b_key = _search_exact(u_ptr, c_l, o_n, m_on, 0, k_n, D, stride_r, stride_c, GROUP, BN, BK, BD)
            else:
                b_key = _search_dot(xh_ptr, xsq_ptr, ch_ptr + k_lo * stride_cs, csq_ptr + k_lo, aux_ptr + 2 * l, o_n,
                                    m_on, 0, k_n, D, stride_x, stride_cs, MODE, EMULATE_BF16, BN, BK, BD)
            # Index, direct-form distance and the NaN / Inf policy as assign finishes a row (the distance summed
            # in this kernel's tiles: within the same bound, not always assign's bits).
            _finish(b_key, u_ptr, c_l, sidx_ptr, sdist_ptr, sdist_ptr, o_n, m_on, D, stride_r, stride_c, 0,
                    MODE == 0, False, GROUP, BN, PD)
            tl.debug_barrier()
            b_code = tl.load(sidx_ptr + o_n, mask=m_on, other=-1)
            b_dist = tl.load(sdist_ptr + o_n, mask=m_on, other=0.0)
        m_ok = m_on & (b_code >= 0)
        # A row without a finite distance gets -1 from this level on, and keeps that distance.
        b_fail = tl.where(m_on & ~m_ok, b_dist, b_fail)
        m_alive = m_alive & (m_ok | ~m_on)
        out = tl.where(m_ok, b_dist, tl.where(keep & _level_on(l, n_lv, BN), b_fail, 0.0))
        tl.store(idx_ptr + o_n * L + l, tl.where(m_ok, b_code, -1), mask=m_n)
        tl.store(dist_ptr + o_n * L + l, out, mask=m_n)
        _advance(r_ptr, zq_ptr, c_l, tl.where(m_ok, b_code, 0), o_n, m_ok, D, stride_r, stride_c, stride_zq, PD)
        tl.debug_barrier()


_KEY = ["n_bucket", "k_total", "D", "L", "MODE", "COSINE", "HAS_MASK", "HAS_LEVELS"]

# The plain direct-form search (exact mode without the certified search, N >= 2^31): a broadcast tile,
# BD <= 64 for the bound of _direct_tile. (Of six tiles tried, the only one without a spill on sm_90
# at both D = 37 and 64.)
_residual_exact = triton.autotune(
    configs=tune_configs(
        [triton.Config({"BN": 32, "BK": 64, "BD": 8}, num_warps=8)],
        triton.Config({"BN": 64, "BK": 64, "BD": 32}),
    ),
    key=_KEY,
)(_residual_kernel)

# Tensor-core tiles (BD cut to D as for assign), on 8 warps: this kernel holds the level loop's per-row
# state besides a search, and assign's 64 x 64 x 32 tile on 4 warps needed every register and spilled
# on sm_90 at D = 37 (benchmarks/resources.py). Smaller tiles for small N (16 or 32 rows, mma.sync)
# spilled 8-200 B in some variants (ptxas settles on 128 registers there), so there are none.
_RESIDUAL_DOT_CONFIGS = [
    triton.Config({"BN": 64, "BK": 64, "BD": 32}, num_warps=8, num_stages=3),
    triton.Config({"BN": 128, "BK": 64, "BD": 32}, num_warps=8, num_stages=3),
    triton.Config({"BN": 64, "BK": 128, "BD": 32}, num_warps=8, num_stages=3),
    triton.Config({"BN": 128, "BK": 128, "BD": 32}, num_warps=8, num_stages=3),
]
_residual_dot = triton.autotune(configs=tune_configs(_RESIDUAL_DOT_CONFIGS, _DOT_INTERPRETER), key=_KEY,
                                prune_configs_by={"early_config_prune": _fit_bd})(_residual_kernel)


@functools.lru_cache(maxsize=64)
def _offsets(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """int64 ``[L + 1]`` code offsets of the levels, made once per (sizes, device): no host-to-device
    copy per call (none may run while a CUDA graph is captured)."""
    return torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64, device=device)


def _level_codebooks(codebooks: Tensor, sizes: tuple[int, ...], parts: int, bound_e: float):
    """Every level's centred codebook (``centre.centred_codebook``, two launches a level: each level
    has its own mean) in one buffer per field, codes stacked in level order; the parts keep their
    padded row stride. Returns ``(hi, lo, sq, ce, aux [L, 2], mean [L, D])``."""
    levels, k0 = [], 0
    for k in sizes:
        levels.append(centred_codebook(codebooks[k0:k0 + k], parts=parts, bound_e=bound_e))
        k0 += k
    total, d = codebooks.shape
    dtype, dev = levels[0].hi.dtype, codebooks.device
    hi = torch.cat([b.hi for b in levels], out=_parts_buffer(total, d, dtype, dev))
    lo = torch.cat([b.lo for b in levels], out=_parts_buffer(total, d, dtype, dev)) if parts == 3 else hi
    ce = torch.cat([b.ce for b in levels]) if parts == 3 else levels[0].sq
    return (hi, lo, torch.cat([b.sq for b in levels]), ce, torch.stack([b.aux for b in levels]),
            torch.stack([b.mean for b in levels]))


def residual_assign_fwd(z: Tensor, codebooks: Tensor, sizes, *, precision: str = "exact", cosine: bool = False,
                        keep: Tensor | None = None, levels: Tensor | None = None, certified: bool | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(idx int64 [N, L], z_q float32 [N, D], dist float32 [N, L])`` of the residual loop, one launch
    (plus each level's codebook preparation for the tensor-core searches).

    ``z [N, D]``; ``codebooks [sum K_l, D]`` every level's codes stacked in level order, ``sizes`` the
    K_l (inputs checked by the caller: float32/float16/bfloat16, one device, K_l >= 1; for ``cosine``
    the codes come l2-normalised). Level l searches ``x_l = r_l`` (or ``r_l / |r_l|`` with ``cosine``,
    in float64 as ``functional.unit``) under assign's contract for ``precision`` (DESIGN.md section 4:
    the certified search plus a direct-form re-rank for exact); the residual is fp32,
    ``r_{l+1} = r_l - C_l[i_l]``, and ``z_q`` the fp32 sum of the chosen codes in level order.
    ``dist[:, l]`` is the direct-form fp32 ``|x_l - C_l[i_l]|^2``.

    ``keep`` (bool ``[N]``) / ``levels`` (0-dim integer n): masked rows, and every level >= n, get
    index -1 and distance 0 and add nothing. A row without a finite distance at some level (a NaN or
    Inf, fp32 overflow, or only non-finite codes) gets -1 from that level on, its z_q stops there,
    and every later level repeats that level's distance (NaN or +Inf, assign's policy).
    ``certified=False`` runs the plain direct-form search for exact mode (the default for N >= 2^31).
    Extra memory: fp32 ``[N, D]`` scratch rows (two for cosine), plus the operands of the tensor-core
    searches (``[N, D]`` bf16 x2 for exact) and O(N + sum K_l D).
    """
    if precision not in _MODES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    sizes = tuple(int(k) for k in sizes)
    n, d = z.shape
    n_levels, k_total = len(sizes), codebooks.shape[0]
    if k_total >= 2**31:
        raise ValueError(f"the code index must fit the key's 31 bits, got {k_total} codes in all")
    dev = z.device
    idx = torch.empty(n, n_levels, dtype=torch.int64, device=dev)
    dist = torch.empty(n, n_levels, dtype=torch.float32, device=dev)
    z_q = torch.empty(n, d, dtype=torch.float32, device=dev)
    if n == 0:
        return idx, z_q, dist
    z, codebooks = row_major(z), row_major(codebooks)
    mode = _MODES[precision]
    if mode == 0 and (n < 2**31 if certified is None else certified):
        mode = _CERTIFY
    r = _parts_buffer(n, d, torch.float32, dev)
    u = _parts_buffer(n, d, torch.float32, dev) if cosine else r
    sidx = torch.empty(n, dtype=torch.int64, device=dev)
    sdist = torch.empty(n, dtype=torch.float32, device=dev)
    bound_e = _certify_bound(d) if mode == _CERTIFY else 0.0
    if mode == 0:
        # The direct-form search reads the rows and the codebook only (the other pointers are unused).
        hi = lo = xh = xl = codebooks
        sq = ce = aux = mean = xsq = sdist
    else:
        hi, lo, sq, ce, aux, mean = _level_codebooks(codebooks, sizes, mode, bound_e)
        xh = _parts_buffer(n, d, _part_dtype(mode), dev)
        xl = _parts_buffer(n, d, _part_dtype(mode), dev) if mode == _CERTIFY else xh
        xsq = torch.empty(n, dtype=torch.float32, device=dev)
    launch = _residual_exact if mode == 0 else _residual_dot

    def grid(meta):
        return (triton.cdiv(n, meta["BN"]),)

    launch[grid](
        z, codebooks, hi, lo, sq, ce, aux, mean, _offsets(sizes, dev), sdist if keep is None else keep.contiguous(),
        sidx if levels is None else levels, r, u, xh, xl, xsq, sidx, sdist, idx, dist, z_q,
        n, d, n_levels, z.stride(0), codebooks.stride(0), hi.stride(0), r.stride(0), xh.stride(0), z_q.stride(0),
        bound_e, triton.next_power_of_2(n), k_total,
        MODE=mode, COSINE=bool(cosine), HAS_MASK=keep is not None, HAS_LEVELS=levels is not None,
        EMULATE_BF16=interpreting(), GROUP=_GROUP, PD=_PASS_BD if not interpreting() else 64, RBK=_ROW_BK,
        RBD=_ROW_BD,
    )
    return idx, z_q, dist


# --- backward and statistics: the replay ------------------------------------------------------------


@triton.jit
def _col(b_t, o_l, l):
    """Column ``l`` of a ``[BN, LP]`` block of per-level values: ``[BN]``."""
    return tl.sum(tl.where(o_l[None, :] == l, b_t, 0.0), axis=1)


@triton.jit
def _add_col(b_t, o_l, l, b_v):
    """``b_t`` with ``b_v [BN]`` added to its column ``l``."""
    return b_t + tl.where(o_l[None, :] == l, b_v[:, None], 0.0)


@triton.jit
def _level_rows(c_ptr, koff_ptr, idx_ptr, o_n, m_n, keep, n_lv, l, L, stride_c, BN: tl.constexpr):
    """This level's code offset, each row's code (-1: none), whether the level ran for the row
    (kept, and l < n) and the pointers of the rows' codes (any valid row for those without one)."""
    k_lo = tl.load(koff_ptr + l)
    b_idx = tl.load(idx_ptr + o_n * L + l, mask=m_n, other=-1)
    m_act = keep & _level_on(l, n_lv, BN)
    m_has = m_act & (b_idx >= 0)
    p_code = c_ptr + (k_lo + tl.where(m_has, b_idx, 0)) * stride_c
    return k_lo, b_idx, m_act, m_has, p_code


@triton.jit
def _z_tile(z_ptr, o_n, keep, d0, D, stride_z, BD: tl.constexpr):
    """Columns ``[d0, d0 + BD)`` of the rows of z: offsets ``o_d``, mask ``m`` (kept rows) and the tile in
    fp32 (zeros outside ``m``), ``[BN, BD]``."""
    o_d = d0 + tl.arange(0, BD)
    m = keep[:, None] & (o_d < D)[None, :]
    return o_d, m, tl.load(z_ptr + o_n[:, None] * stride_z + o_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _level_code(c_ptr, koff_ptr, idx_ptr, o_n, m_n, keep, n_lv, l, L, stride_c, o_d, m, BN: tl.constexpr):
    """``[BN, BD]`` fp32: columns ``o_d`` of each row's level-``l`` code (zeros where the level has none
    for the row, or outside ``m``)."""
    _, _, _, m_has, p_code = _level_rows(c_ptr, koff_ptr, idx_ptr, o_n, m_n, keep, n_lv, l, L, stride_c, BN)
    return tl.load(p_code[:, None] + o_d[None, :], mask=m_has[:, None] & m, other=0.0).to(tl.float32)


@triton.jit
def _replay_tile(z_ptr, c_ptr, koff_ptr, idx_ptr, g_ptr, w_ptr, v_ptr, dz_ptr, dcb_ptr, cnt_ptr, o_n, m_n, keep,
                 n_lv, o_d, o_l, c_inv, c_jt, c_lam, c_alpha, c_beta, D, L, stride_z, stride_c, stride_g, stride_wn,
                 stride_wl, stride_vn, stride_vl, stride_dz, stride_dcb, COSINE: tl.constexpr, EVERY: tl.constexpr,
                 ROTATE: tl.constexpr, HAS_GRAD: tl.constexpr, CODEBOOK_GRAD: tl.constexpr, ATOMIC: tl.constexpr,
                 STATS: tl.constexpr, m_count, BN: tl.constexpr, BD: tl.constexpr):
    """One ``[BN, BD]`` tile, every level: dz, and each level's codebook gradient (or, with ``STATS``,
    each level's input x_l, and for the rows of ``m_count`` a 1 into its code's count)."""
    m_d = o_d < D
    m = keep[:, None] & m_d[None, :]
    b_r = tl.load(z_ptr + o_n[:, None] * stride_z + o_d[None, :], mask=m, other=0.0).to(tl.float32)  # [BN, BD]
    b_dz = tl.zeros([BN, BD], dtype=tl.float32)
    if HAS_GRAD:
        b_g = tl.load(g_ptr + o_n[:, None] * stride_g + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    for l in range(0, L):
        k_lo, b_idx, m_act, m_has, p_code = _level_rows(c_ptr, koff_ptr, idx_ptr, o_n, m_n, keep, n_lv, l, L, stride_c, BN)
        m_c = m_has[:, None] & m_d[None, :]
        b_q = tl.load(p_code[:, None] + o_d[None, :], mask=m_c, other=0.0).to(tl.float32)  # [BN, BD]
        b_x = b_r
        if COSINE:
            b_inv = _col(c_inv, o_l, l)
            b_x = b_r * b_inv[:, None]
        if STATS:
            b_dc = b_x
        else:
            b_w = 2.0 * tl.load(w_ptr + o_n * stride_wn + l * stride_wl, mask=m_act, other=0.0).to(tl.float32)
            b_h = b_w[:, None] * (b_x - b_q)  # the commitment term, d/d x_l
            if HAS_GRAD:
                m_st = m_act
                if not EVERY:
                    m_st = m_st & ~_level_on(0, l, BN)
                f_st = m_st.to(tl.float32)
                if ROTATE:
                    b_h += f_st[:, None] * (_col(c_lam, o_l, l)[:, None] * b_g + _col(c_alpha, o_l, l)[:, None] * b_x
                                            + _col(c_beta, o_l, l)[:, None] * b_q)
                else:
                    b_h += f_st[:, None] * b_g
            if COSINE:
                # d x_l / d r_l = (I - u u^T) / |r_l| (I / eps below eps): the row sum u.h came with c_jt.
                b_h = (b_h - b_x * _col(c_jt, o_l, l)[:, None]) * b_inv[:, None]
            b_dz += b_h
            if CODEBOOK_GRAD:
                b_v = 2.0 * tl.load(v_ptr + o_n * stride_vn + l * stride_vl, mask=m_has, other=0.0).to(tl.float32)
                b_dc = b_v[:, None] * (b_q - b_x)
        if STATS or CODEBOOK_GRAD:
            if ATOMIC:
                tl.atomic_add(dcb_ptr + (k_lo + b_idx)[:, None] * stride_dcb + o_d[None, :], b_dc, mask=m_c,
                              sem="relaxed")
            else:
                # Per-(row, level) contributions [N L, D], zero where no code, summed in a fixed order later.
                tl.store(dcb_ptr + (o_n * L + l)[:, None] * stride_dcb + o_d[None, :], tl.where(m_c, b_dc, 0.0),
                         mask=m_n[:, None] & m_d[None, :])
        if STATS:
            tl.atomic_add(cnt_ptr + k_lo + b_idx, 1, mask=m_has & m_count, sem="relaxed")
        b_r = b_r - b_q
    if not STATS:
        tl.store(dz_ptr + o_n[:, None] * stride_dz + o_d[None, :], b_dz.to(dz_ptr.dtype.element_ty),
                 mask=m_n[:, None] & m_d[None, :])


def _replay_rows(configs, named_args, **kwargs):
    """Whole rows per program (the sums' passes) keep a ``[BN, LP]`` block per per-level scalar and run
    more live tiles than the one-pass tile: half-size tiles (1 to 2 elements a thread), and at most 256
    rows x levels a block, whatever L. (With the full tiles the cosine + rotation variant needed every
    register and spilled 256 B on sm_90, benchmarks/resources.py.) Not under the interpreter: it has no
    registers, and pays per block operation."""
    if not kwargs.get("WHOLE_ROWS") or interpreting():
        return configs
    cap = max(1, 256 // kwargs["LP"]) * kwargs["BLOCK_D"]
    return [triton.Config({**c.kwargs, "TILE": min(c.kwargs["TILE"] // 2, cap)}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in configs]


@triton.autotune(
    # One-pass tiles of 2 to 4 elements a thread (at 8 and 16 some variants spilled 8-16 B on sm_90).
    configs=tune_configs([triton.Config({"TILE": t}, num_warps=w) for t, w in [(512, 4), (1024, 8), (256, 4)]],
                         triton.Config({"TILE": INTERPRETER_TILE})),
    key=["D", "L", "COSINE", "EVERY", "ROTATE", "HAS_GRAD", "CODEBOOK_GRAD", "ATOMIC", "STATS", "HAS_MASK",
         "HAS_LEVELS"],
    # Timing runs add into the codebook buffers too: zero them before each run and after tuning.
    reset_to_zero=["dcb_ptr", "cnt_ptr"],
    prune_configs_by={"early_config_prune": _replay_rows},
)
@triton.heuristics({"BLOCK_N": block_rows})
@triton.jit
def _replay_kernel(z_ptr, c_ptr, koff_ptr, idx_ptr, g_ptr, w_ptr, v_ptr, keep_ptr, levels_ptr, dz_ptr, dcb_ptr, cnt_ptr,
                   N, D, L, stride_z, stride_c, stride_g, stride_wn, stride_wl, stride_vn, stride_vl, stride_dz,
                   stride_dcb, COSINE: tl.constexpr, EVERY: tl.constexpr, ROTATE: tl.constexpr,
                   HAS_GRAD: tl.constexpr, CODEBOOK_GRAD: tl.constexpr, ATOMIC: tl.constexpr, STATS: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_LEVELS: tl.constexpr, WHOLE_ROWS: tl.constexpr, LP: tl.constexpr,
                   TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    BN: tl.constexpr = BLOCK_N
    BD: tl.constexpr = BLOCK_D
    o_n, m_n = _row_block(N, BN)
    keep, n_lv = _kept_rows(keep_ptr, levels_ptr, o_n, m_n, L, HAS_MASK, HAS_LEVELS)
    o_l = tl.arange(0, LP)
    c_inv = tl.zeros([BN, LP], dtype=tl.float32)  # cosine: 1 / max(|r_l|, eps)
    c_jt = tl.zeros([BN, LP], dtype=tl.float32)  # cosine: u_l . h_l (0 below eps)
    c_lam = tl.zeros([BN, LP], dtype=tl.float32)  # rotation trick: lam R^T g = lam g + alpha x + beta q
    c_alpha = tl.zeros([BN, LP], dtype=tl.float32)
    c_beta = tl.zeros([BN, LP], dtype=tl.float32)
    if WHOLE_ROWS:
        # Pass 1: |r_l|^2 and |q_l|^2 per level; pass 2: the sums that need the norms; then the tiles.
        # "first" without cosine needs level 0 alone (r_0 = z): no replay in the sums' passes.
        n_sum = L if (EVERY or COSINE) else 1
        s_rr = tl.zeros([BN, LP], dtype=tl.float32)
        s_qq = tl.zeros([BN, LP], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d, m, b_r = _z_tile(z_ptr, o_n, keep, d0, D, stride_z, BD)
            for l in range(0, n_sum):
                b_q = _level_code(c_ptr, koff_ptr, idx_ptr, o_n, m_n, keep, n_lv, l, L, stride_c, o_d, m, BN)
                s_rr = _add_col(s_rr, o_l, l, tl.sum(b_r * b_r, axis=1))
                s_qq = _add_col(s_qq, o_l, l, tl.sum(b_q * b_q, axis=1))
                b_r = b_r - b_q
        s_xx = s_rr
        if COSINE:
            b_nr = tl.sqrt(s_rr)
            c_inv = 1.0 / tl.maximum(b_nr, UNIT_EPS)
            s_xx = s_rr * c_inv * c_inv
        e_x = tl.maximum(tl.sqrt(s_xx), ROTATION_EPS)
        e_q = tl.maximum(tl.sqrt(s_qq), ROTATION_EPS)
        s_tt = tl.zeros([BN, LP], dtype=tl.float32)  # |x^ + q^|^2, elementwise (u = -q gives exactly 0)
        s_tg = tl.zeros([BN, LP], dtype=tl.float32)  # (x^ + q^) . g
        s_qg = tl.zeros([BN, LP], dtype=tl.float32)  # q^ . g
        s_ud = tl.zeros([BN, LP], dtype=tl.float32)  # cosine: x . (x - q), elementwise (no cancellation)
        s_ug = tl.zeros([BN, LP], dtype=tl.float32)  # cosine: x . g, x . x, x . q
        s_uu = tl.zeros([BN, LP], dtype=tl.float32)
        s_uq = tl.zeros([BN, LP], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d, m, b_r = _z_tile(z_ptr, o_n, keep, d0, D, stride_z, BD)
            b_g = tl.zeros([BN, BD], dtype=tl.float32)
            if HAS_GRAD:
                b_g = tl.load(g_ptr + o_n[:, None] * stride_g + o_d[None, :], mask=m, other=0.0).to(tl.float32)
            for l in range(0, n_sum):
                b_q = _level_code(c_ptr, koff_ptr, idx_ptr, o_n, m_n, keep, n_lv, l, L, stride_c, o_d, m, BN)
                b_x = b_r
                if COSINE:
                    b_x = b_r * _col(c_inv, o_l, l)[:, None]
                    s_ud = _add_col(s_ud, o_l, l, tl.sum(b_x * (b_x - b_q), axis=1))
                    s_ug = _add_col(s_ug, o_l, l, tl.sum(b_x * b_g, axis=1))
                    s_uu = _add_col(s_uu, o_l, l, tl.sum(b_x * b_x, axis=1))
                    s_uq = _add_col(s_uq, o_l, l, tl.sum(b_x * b_q, axis=1))
                if ROTATE:
                    b_qn = b_q / _col(e_q, o_l, l)[:, None]
                    b_t = b_x / _col(e_x, o_l, l)[:, None] + b_qn
                    s_tt = _add_col(s_tt, o_l, l, tl.sum(b_t * b_t, axis=1))
                    s_tg = _add_col(s_tg, o_l, l, tl.sum(b_t * b_g, axis=1))
                    s_qg = _add_col(s_qg, o_l, l, tl.sum(b_qn * b_g, axis=1))
                b_r = b_r - b_q
        if ROTATE:
            c_lam, c_alpha, c_beta = _rotation_scalars(s_xx, s_qq, s_tt, s_tg, s_qg)
        if COSINE and not STATS:  # (the statistics need no u.h; their w_ptr is a placeholder)
            # u.h = 2 w u.(u - q) + [the straight-through part, where it applies] u.T(g).
            m_lv = keep[:, None] & (o_l < n_lv)[None, :]
            b_w = 2.0 * tl.load(w_ptr + o_n[:, None] * stride_wn + o_l[None, :] * stride_wl, mask=m_lv,
                                other=0.0).to(tl.float32)
            b_st = s_ug
            if ROTATE:
                b_st = c_lam * s_ug + c_alpha * s_uu + c_beta * s_uq
            m_st = m_lv
            if not EVERY:
                m_st = m_st & (o_l == 0)[None, :]
            if not HAS_GRAD:
                b_st = tl.zeros([BN, LP], dtype=tl.float32)
            c_jt = tl.where(b_nr > UNIT_EPS, b_w * s_ud + tl.where(m_st, b_st, 0.0), 0.0)
        for d0 in range(0, D, BD):
            _replay_tile(z_ptr, c_ptr, koff_ptr, idx_ptr, g_ptr, w_ptr, v_ptr, dz_ptr, dcb_ptr, cnt_ptr, o_n, m_n,
                         keep, n_lv, d0 + tl.arange(0, BD), o_l, c_inv, c_jt, c_lam, c_alpha, c_beta, D, L, stride_z,
                         stride_c, stride_g, stride_wn, stride_wl, stride_vn, stride_vl, stride_dz, stride_dcb, COSINE,
                         EVERY, ROTATE, HAS_GRAD, CODEBOOK_GRAD, ATOMIC, STATS, ~_level_on(0, d0, BN), BN, BD)
    else:
        i_d = tl.program_id(1)
        _replay_tile(z_ptr, c_ptr, koff_ptr, idx_ptr, g_ptr, w_ptr, v_ptr, dz_ptr, dcb_ptr, cnt_ptr, o_n, m_n, keep,
                     n_lv, i_d * BD + tl.arange(0, BD), o_l, c_inv, c_jt, c_lam, c_alpha, c_beta, D, L, stride_z,
                     stride_c, stride_g, stride_wn, stride_wl, stride_vn, stride_vl, stride_dz, stride_dcb, COSINE,
                     EVERY, ROTATE, HAS_GRAD, CODEBOOK_GRAD, ATOMIC, STATS, ~_level_on(0, i_d, BN), BN, BD)


# D tile of the whole-row passes (several live tiles a level: narrower than the one-pass tile; with 32,
# unaligned rows (D = 37) spilled 8-16 B on sm_90 in some variants, benchmarks/resources.py).
_WHOLE_ROW_BD = 16


def _replay(z, codes, sizes, idx, *, dz=None, grad=None, w=None, v=None, dcb=None, counts=None, cosine=False,
            every=False, rotate=False, keep=None, levels=None, atomic=True, stats=False):
    """One launch of the replay kernel (see ``residual_backward`` / ``residual_stats``)."""
    n, d = z.shape
    n_levels = len(sizes)
    whole_rows = bool(rotate or cosine)
    bd = min(triton.next_power_of_2(d), _WHOLE_ROW_BD if whole_rows else 128)
    w_arg, v_arg = (w if w is not None else z), (v if v is not None else z)
    # Unused pointers get a live tensor of their kind that no run reads, or one each run rewrites whole: the
    # autotuner zeroes dcb_ptr and cnt_ptr before each timing run (never the inputs).
    dcb_arg = dcb if dcb is not None else dz
    cnt_arg = counts if counts is not None else torch.zeros(1, dtype=torch.int32, device=z.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), 1 if whole_rows else triton.cdiv(d, bd))

    _replay_kernel[grid](
        z, codes, _offsets(tuple(sizes), z.device), idx, grad if grad is not None else z, w_arg, v_arg,
        keep if keep is not None else idx, levels if levels is not None else idx,
        dz if dz is not None else dcb_arg, dcb_arg, cnt_arg,
        n, d, n_levels, z.stride(0), codes.stride(0), grad.stride(0) if grad is not None else 0,
        w_arg.stride(0), w_arg.stride(-1), v_arg.stride(0), v_arg.stride(-1), dz.stride(0) if dz is not None else 0,
        dcb_arg.stride(0),
        COSINE=bool(cosine), EVERY=bool(every), ROTATE=bool(rotate), HAS_GRAD=grad is not None,
        CODEBOOK_GRAD=v is not None, ATOMIC=bool(atomic), STATS=bool(stats), HAS_MASK=keep is not None,
        HAS_LEVELS=levels is not None, WHOLE_ROWS=whole_rows, LP=triton.next_power_of_2(n_levels), BLOCK_D=bd,
    )


def _per_level_rows(idx: Tensor, sizes) -> Tensor:
    """Each (row, level)'s code as an index into the stacked codebooks, ``[N L]`` (-1 stays -1)."""
    off = _offsets(tuple(sizes), idx.device)[:-1]
    return torch.where(idx >= 0, idx + off, -1).reshape(-1)


def residual_backward(z: Tensor, codes: Tensor, sizes, idx: Tensor, grad_zq: Tensor | None, w: Tensor,
                      v: Tensor | None, *, cosine: bool = False, output_grad: str = "first", rotate: bool = False,
                      keep: Tensor | None = None, levels: Tensor | None = None, deterministic: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """``(dz [N, D] in z.dtype, dcodebooks float32 [sum K_l, D] or None)`` of the residual VQ terms, one launch.

    ``codes`` the step's stacked codebooks (as the forward read them), ``idx [N, L]`` its indices,
    ``grad_zq [N, D]`` (or None) the gradient reaching the output z_q, ``w, v [N, L]`` (any strides)
    those reaching the commitment and codebook distances (``v = None``: no codebook gradient, no
    scatter). Level l's input x_l is r_l (or r_l / |r_l|, cosine), q_l its code:

        dz   = sum_l J_l^T (2 w_l (x_l - q_l) + [l in S] T_l(grad_zq))
        dC_l[i_l] += 2 v_l (q_l - x_l)

    J_l the normalisation's Jacobian (cosine; else I), ``S = {0}`` (``output_grad="first"``) or every
    level (``"every"``), ``T_l`` the identity or, with ``rotate``, the rotation trick from x_l to q_l.
    Rows and levels that did not run (``keep``, ``levels``) contribute nothing. ``deterministic``: the
    codebook gradient is bitwise reproducible (an fp32 ``[N L, D]`` buffer of contributions, summed
    by ``gather.scatter_add(..., deterministic=True)``).
    """
    if output_grad not in OUTPUT_GRADS:
        raise ValueError(f"output_grad must be one of {OUTPUT_GRADS}, got {output_grad!r}")
    n, d = z.shape
    total = codes.shape[0]
    dz = torch.empty(n, d, dtype=z.dtype, device=z.device)
    if v is None:
        dcb = None
    elif deterministic:
        dcb = torch.empty(n * len(sizes), d, dtype=torch.float32, device=z.device)
    else:
        dcb = torch.zeros(total, d, dtype=torch.float32, device=z.device)
    if n == 0:
        return dz, None if v is None else torch.zeros(total, d, dtype=torch.float32, device=z.device)
    _replay(row_major(z), row_major(codes), sizes, idx.contiguous(), dz=dz,
            grad=None if grad_zq is None else row_major(grad_zq), w=w, v=v, dcb=dcb, cosine=cosine,
            every=output_grad == "every", rotate=rotate and grad_zq is not None,
            keep=None if keep is None else keep.contiguous(), levels=levels,
            atomic=not deterministic)
    if dcb is not None and deterministic:
        dcb = scatter_add(_per_level_rows(idx, sizes), dcb, total, deterministic=True)
    return dz, dcb


def residual_stats(z: Tensor, codes: Tensor, sizes, idx: Tensor, *, cosine: bool = False,
                   deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """``(counts float32 [sum K_l], sums float32 [sum K_l, D])``: per code of every level, the number
    and the sum of the level inputs x_l (r_l, or r_l / |r_l| for cosine) of the rows that chose it
    (index -1 skipped), the residuals replayed from ``z`` and ``idx [N, L]`` in one launch (the EMA
    statistics of every level). ``deterministic``: the sums are bitwise reproducible (an fp32
    ``[N L, D]`` buffer of the inputs, summed per code by ``gather.scatter_add``)."""
    n, d = z.shape
    total = codes.shape[0]
    counts = torch.zeros(total, dtype=torch.int32, device=z.device)
    if n == 0:
        return counts.float(), torch.zeros(total, d, dtype=torch.float32, device=z.device)
    z, codes, idx = row_major(z), row_major(codes), idx.contiguous()
    if deterministic:
        rows = torch.empty(n * len(sizes), d, dtype=torch.float32, device=z.device)
        _replay(z, codes, sizes, idx, dcb=rows, cosine=cosine, atomic=False, stats=True, counts=counts)
        return counts.float(), scatter_add(_per_level_rows(idx, sizes), rows, total, deterministic=True)
    sums = torch.zeros(total, d, dtype=torch.float32, device=z.device)
    _replay(z, codes, sizes, idx, dcb=sums, cosine=cosine, atomic=True, stats=True, counts=counts)
    return counts.float(), sums
