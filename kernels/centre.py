"""Operands of the tensor-core searches: vectors centred on the codebook mean, as tf32 / bf16 parts.

The expanded form ``|x|^2 + |y|^2 - 2 x.y`` loses accuracy to cancellation when the vectors share a
large offset, so both sides are centred on the codebook mean ``m`` first (distances are
translation-invariant): ``x = z - m``, ``y = c - m``. The searches then read ready-made operands:

- ``parts = 1``: ``x`` in fp32 (the tf32 search; the tensor core rounds it).
- ``parts = 2``: ``hi = bf16(x)`` (the bf16 search).
- ``parts = 3``: ``hi`` and ``lo = bf16(x - hi)``, so ``x = hi + lo + r`` with ``|r| <= 2^-16 |x|``
  (the certified split-bf16 search, three bf16 products per pair: about fp32 accuracy).

plus ``|x|^2`` in fp32. The rows ``z`` go through ``_centre_kernel`` (one read of ``z``, one write of
the parts), once per call instead of once per code tile inside the search; the codebook, with its
own non-finite policy and the mean, through two passes of its own (``centred_codebook``).

Under the interpreter bf16 parts stay fp32 tensors holding bf16 values (it mis-converts bf16
subnormals on load); a GPU reads half the bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vqtriton.kernels import _MAX_BLOCK_D, block_d, interpreting

__all__ = ["Codebook", "centred_codebook", "centre_rows"]


@triton.jit
def _round_bf16(b_x):
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32.

    The interpreter's ``.to(tl.bfloat16)`` truncates (and mishandles subnormals), so emulation
    rounds on the bits; a tensor core multiplies bf16 exactly and accumulates in fp32, so an fp32
    dot of these values is the same arithmetic as the bf16 dot on a GPU.
    """
    b_bits = b_x.to(tl.int32, bitcast=True)
    b_rnd = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & -65536
    return tl.where(b_x == b_x, b_rnd.to(tl.float32, bitcast=True), b_x)


@triton.jit
def _split_bf16(b_x, EMULATE_BF16: tl.constexpr):
    """``(hi, lo)``: bf16 parts of an fp32 block with ``x = hi + lo + r``, ``|r| <= 2^-16 |x|``.

    ``x - hi`` is exact in fp32 (``hi`` is ``x`` rounded to 8 significant bits). Under the
    interpreter both parts stay fp32 (holding bf16 values: see ``_round_bf16``).
    """
    if EMULATE_BF16:
        b_hi = _round_bf16(b_x)
        return b_hi, _round_bf16(b_x - b_hi)
    b_hi = b_x.to(tl.bfloat16)
    return b_hi, (b_x - b_hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _store_parts(hi_ptr, lo_ptr, p_x, b_x, m, PARTS: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Store an fp32 block ``x`` at offsets ``p_x`` as the search reads it: whole (``PARTS = 1``),
    its bf16 part (2), or its bf16 part and remainder (3)."""
    if PARTS == 1:
        tl.store(hi_ptr + p_x, b_x, mask=m)
    else:
        b_hi, b_lo = _split_bf16(b_x, EMULATE_BF16)
        tl.store(hi_ptr + p_x, b_hi, mask=m)
        if PARTS == 3:
            tl.store(lo_ptr + p_x, b_lo, mask=m)


@triton.jit
def _centre_kernel(z_ptr, mean_ptr, hi_ptr, lo_ptr, sq_ptr, N, D, stride_z, stride_x,
                   PARTS: tl.constexpr, EMULATE_BF16: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """One program per BN rows: ``x = z - mean`` in fp32, stored whole or as bf16 parts, and ``|x|^2``."""
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_sq = tl.zeros([BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        m = m_n[:, None] & m_d[None, :]
        b_z = tl.load(z_ptr + o_n[:, None] * stride_z + o_d[None, :], mask=m, other=0.0)
        b_x = b_z.to(tl.float32) - tl.load(mean_ptr + o_d, mask=m_d, other=0.0)[None, :]  # [BN, BD]
        b_sq += tl.sum(b_x * b_x, axis=1)
        _store_parts(hi_ptr, lo_ptr, o_n[:, None] * stride_x + o_d[None, :], b_x, m, PARTS, EMULATE_BF16)
    tl.store(sq_ptr + o_n, b_sq, mask=m_n)


# Rows per program of the pre-pass and its widest D tile: 32 x 64 fp32 = 8 KiB read per step.
_CENTRE_BN, _CENTRE_BD = 32, 64
# The interpreter pays per block operation, not per element (about 5 ms a program here at D = 47): there
# the row and code blocks are numpy-sized. Each row's (code's) arithmetic is the same whatever the block
# of rows (codes), so the results are the same bits; the D tiles of the row sums, which set their order,
# are the GPU's.
_INTERPRETER_ROWS = 1024


def _part_dtype(parts: int) -> torch.dtype:
    return torch.float32 if parts == 1 or interpreting() else torch.bfloat16


def _parts_buffer(rows: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An ``[rows, d]`` view whose row stride is a multiple of 16 elements: the searches' loads of
    it vectorise whatever D is (with D = 37, say, the compiled certified search needed every
    register and spilled; padded, it does not). The padding is never read."""
    return torch.empty(rows, 16 * triton.cdiv(d, 16), dtype=dtype, device=device)[:, :d]


def centre_rows(z: torch.Tensor, mean: torch.Tensor, parts: int
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(hi, lo, sq)`` of ``x = z - mean`` for rows ``z [N, D]`` (unit stride in D), one launch.

    ``hi [N, D]``: ``x`` itself (``parts = 1``, fp32) or its bf16 part; ``lo [N, D]`` the bf16
    remainder when ``parts = 3`` (else None); both with a row stride that is a multiple of 16.
    ``sq [N]``: fp32 ``|x|^2`` (NaN / Inf for rows holding one, so the searches can fail those rows
    without looking at them)."""
    n, d = z.shape
    dtype = _part_dtype(parts)
    hi = _parts_buffer(n, d, dtype, z.device)
    lo = _parts_buffer(n, d, dtype, z.device) if parts == 3 else None
    sq = torch.empty(n, dtype=torch.float32, device=z.device)
    bn = min(_INTERPRETER_ROWS, triton.next_power_of_2(n)) if interpreting() else _CENTRE_BN
    _centre_kernel[(triton.cdiv(n, bn),)](
        z, mean, hi, hi if lo is None else lo, sq, n, d, z.stride(0), hi.stride(0),
        PARTS=parts, EMULATE_BF16=interpreting(), BN=bn, BD=block_d(d, _CENTRE_BD))
    return hi, lo, sq


@triton.jit
def _codebook_scan_kernel(c_ptr, part_ptr, flag_ptr, aux_ptr, K, D, rows_per, stride_c, stride_part,
                          BK: tl.constexpr, BD: tl.constexpr):
    """Pass 1, one program per ``rows_per`` codes (a multiple of BK): each code's flag (0 finite,
    1 holds an Inf but no NaN, 2 holds a NaN) and the program's float64 column sums of its finite
    codes, with their count in column D (a ``[programs, D + 1]`` buffer that pass 2 sums in a fixed
    order, so the mean's bits never depend on scheduling). Program 0 also initialises pass 2's
    atomic maxima."""
    i_p = tl.program_id(0)
    k_lo = i_p * rows_per
    k_hi = tl.minimum(k_lo + rows_per, K)
    b_count = tl.zeros([BK], dtype=tl.float64)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_nan = tl.zeros([BK], dtype=tl.int32)
        b_inf = tl.zeros([BK], dtype=tl.int32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            b_c = tl.load(c_ptr + o_k[:, None].to(tl.int64) * stride_c + o_d[None, :],
                          mask=m_k[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)  # [BK, BD]
            b_nan = tl.maximum(b_nan, tl.max((b_c != b_c).to(tl.int32), axis=1))
            b_inf = tl.maximum(b_inf, tl.max((tl.abs(b_c) == float("inf")).to(tl.int32), axis=1))
        b_flag = tl.where(b_nan > 0, 2, b_inf)
        tl.store(flag_ptr + o_k, b_flag, mask=m_k)
        b_count += (m_k & (b_flag == 0)).to(tl.float64)
    # The flags written above are read back by other threads of this program.
    tl.debug_barrier()
    p_part = part_ptr + i_p * stride_part
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_sum = tl.zeros([BD], dtype=tl.float64)
        for k0 in range(k_lo, k_hi, BK):
            o_k = k0 + tl.arange(0, BK)
            m_use = (tl.load(flag_ptr + o_k, mask=o_k < k_hi, other=1) == 0)  # [BK]
            b_c = tl.load(c_ptr + o_k[:, None].to(tl.int64) * stride_c + o_d[None, :],
                          mask=m_use[:, None] & m_d[None, :], other=0.0).to(tl.float64)
            b_sum += tl.sum(b_c, axis=0)
        tl.store(p_part + o_d, b_sum, mask=m_d)
    tl.store(p_part + D, tl.sum(b_count, axis=0))
    if i_p == 0:
        tl.store(aux_ptr, 0.0)
        tl.store(aux_ptr + 1, -float("inf"))


@triton.jit
def _codebook_parts_kernel(c_ptr, part_ptr, flag_ptr, mean_ptr, hi_ptr, lo_ptr, sq_ptr, ce_ptr, aux_ptr,
                           K, D, P, stride_c, stride_part, stride_y, bound_e,
                           PARTS: tl.constexpr, EMULATE_BF16: tl.constexpr,
                           BP: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Pass 2, one program per BK codes: the mean (every program sums pass 1's P partial rows in the
    same order; program 0 stores it), the centred codes' parts and squared norms, ``e = bound_e |y|^2``
    and the aux maxima (order-independent atomics: the bits do not depend on scheduling)."""
    i_k = tl.program_id(0)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_flag = tl.load(flag_ptr + o_k, mask=m_k, other=2)
    m_use = m_k & (b_flag == 0)
    b_count = tl.zeros([BP], dtype=tl.float64)
    for p0 in range(0, P, BP):
        o_p = p0 + tl.arange(0, BP)
        b_count += tl.load(part_ptr + o_p * stride_part + D, mask=o_p < P, other=0.0)
    count = tl.maximum(tl.sum(b_count, axis=0), 1.0)
    b_sq = tl.zeros([BK], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_total = tl.zeros([BP, BD], dtype=tl.float64)
        for p0 in range(0, P, BP):
            o_p = p0 + tl.arange(0, BP)
            b_total += tl.load(part_ptr + o_p[:, None] * stride_part + o_d[None, :],
                               mask=(o_p < P)[:, None] & m_d[None, :], other=0.0)
        b_mean = (tl.sum(b_total, axis=0) / count).to(tl.float32)  # [BD]
        if i_k == 0:
            tl.store(mean_ptr + o_d, b_mean, mask=m_d)
        m = m_use[:, None] & m_d[None, :]
        b_c = tl.load(c_ptr + o_k[:, None].to(tl.int64) * stride_c + o_d[None, :], mask=m, other=0.0)
        b_y = tl.where(m, b_c.to(tl.float32) - b_mean[None, :], 0.0)  # [BK, BD] non-finite codes: 0
        b_sq += tl.sum(b_y * b_y, axis=1)
        _store_parts(hi_ptr, lo_ptr, o_k[:, None].to(tl.int64) * stride_y + o_d[None, :], b_y,
                     m_k[:, None] & m_d[None, :], PARTS, EMULATE_BF16)
    b_sq = tl.where(m_use, b_sq, float("inf"))
    tl.store(sq_ptr + o_k, b_sq, mask=m_k)
    if PARTS == 3:
        tl.store(ce_ptr + o_k, tl.where(m_use, bound_e * b_sq, 0.0), mask=m_k)
    tl.atomic_max(aux_ptr, tl.max(tl.where(m_k & (b_flag != 2), 1.0, 0.0), axis=0))
    tl.atomic_max(aux_ptr + 1, tl.max(tl.where(m_use, b_sq, -float("inf")), axis=0))


# Pass 1's row block, its D tile (16: wider tiles spill registers on sm_90 at D = 37, 64 (benchmarks/
# resources.py)) and its most programs (every pass-2 program reads all of pass 1's partial rows: a
# cap keeps that cost linear in K); pass 2's row block, its D tile and its block of partial rows.
_SCAN_BK, _SCAN_BD, _SCAN_PROGRAMS, _PARTS_BK, _CODEBOOK_BD, _BP = 128, 16, 64, 64, 64, 16


class Codebook(NamedTuple):
    """The codebook side of a tensor-core search (see ``centred_codebook``), all on the device."""

    mean: torch.Tensor  # [D] fp32
    hi: torch.Tensor  # [K, D] y in fp32 (parts = 1) or its bf16 part
    lo: torch.Tensor | None  # [K, D] the bf16 remainder (parts = 3)
    sq: torch.Tensor  # [K] fp32 |y|^2; +Inf for a code holding a NaN or Inf
    ce: torch.Tensor | None  # [K] fp32 bound_e |y|^2, 0 for a non-finite code (parts = 3)
    # [2] fp32: (1 if some code holds no NaN else 0: a failed row's distance is +Inf or NaN;
    # the largest |y|^2 of a finite code, -Inf if none)
    aux: torch.Tensor


def centred_codebook(codebook: torch.Tensor, parts: int, bound_e: float = 0.0) -> Codebook:
    """The centred codebook's parts (as ``centre_rows``), squared norms and the aux scalars, in two
    launches (a handful of small PyTorch ops per call would cost more than the search at small N).

    The mean is over the finite codes (so one NaN code cannot poison the rest), summed in float64
    (a codebook of huge finite values must not overflow it). A code holding a NaN or Inf becomes
    a zero vector with ``|y|^2 = +Inf``: every distance to it is +Inf (never NaN), so it loses to
    every finite code and breaks no bound. ``bound_e``: the factor of ``ce`` (``parts = 3``).
    """
    k, d = codebook.shape
    dev = codebook.device
    rows_per = _SCAN_BK * triton.cdiv(triton.cdiv(k, _SCAN_BK), _SCAN_PROGRAMS)
    scan_programs = triton.cdiv(k, rows_per)
    part = torch.empty(scan_programs, d + 1, dtype=torch.float64, device=dev)
    # (The interpreter adds pass 1's column sums code after code whatever the D tile: a wide one keeps their bits.)
    scan_bd = _MAX_BLOCK_D if interpreting() else _SCAN_BD
    flag = torch.empty(k, dtype=torch.int32, device=dev)
    aux = torch.empty(2, dtype=torch.float32, device=dev)
    _codebook_scan_kernel[(scan_programs,)](codebook, part, flag, aux, k, d, rows_per, codebook.stride(0),
                                            part.stride(0), BK=_SCAN_BK, BD=block_d(d, scan_bd))
    dtype = _part_dtype(parts)
    mean = torch.empty(d, dtype=torch.float32, device=dev)
    hi = _parts_buffer(k, d, dtype, dev)
    lo = _parts_buffer(k, d, dtype, dev) if parts == 3 else None
    sq = torch.empty(k, dtype=torch.float32, device=dev)
    ce = torch.empty(k, dtype=torch.float32, device=dev) if parts == 3 else None
    bk = min(_INTERPRETER_ROWS, triton.next_power_of_2(k)) if interpreting() else _PARTS_BK
    _codebook_parts_kernel[(triton.cdiv(k, bk),)](
        codebook, part, flag, mean, hi, hi if lo is None else lo, sq, sq if ce is None else ce, aux,
        k, d, scan_programs, codebook.stride(0), part.stride(0), hi.stride(0), bound_e,
        PARTS=parts, EMULATE_BF16=interpreting(), BP=_BP, BK=bk, BD=block_d(d, _CODEBOOK_BD))
    return Codebook(mean, hi, lo, sq, ce, aux)
