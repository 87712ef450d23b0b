"""Bit-exact codebook gather, and its backward: a scatter-add of rows into a ``[K, D]`` buffer.

An index of -1 means "no code" (a masked vector, or a row with no finite distance): ``gather``
writes zeros for it and the scatters skip it.

The scatter has two modes. The default adds with atomics (fast; the order of the fp32 additions,
hence the last bits, may change from run to run on a GPU). ``deterministic=True`` sorts the
indices (stable), cuts each code's segment of the sorted order into pieces of at most ``_PIECE``
rows, sums each piece in one program, then each code's pieces in order, all with pinned tile
shapes: every run adds the same numbers in the same order (bitwise reproducible), and a code that
takes most rows (a collapsed codebook) is spread over many programs instead of one.
The scatter kernels also count rows per code (``COUNT``), which ``stats.code_stats`` reuses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqtriton.kernels import block_d, row_major, row_tile, tile_configs, tile_rows

__all__ = ["gather", "scatter_add"]

# The deterministic segment sum runs one pinned tile size (elements) and warp count: its addition
# order must depend on D alone, never on which config an autotuner picked in this process.
_SEG_TILE = 2048
_SEG_WARPS = 4
# Rows per piece of a code's segment (deterministic scatter): a piece is one program's work.
_PIECE = 256


@triton.autotune(configs=tile_configs([(4096, 4), (8192, 8), (2048, 4)]), key=["D"])
@tile_rows
@triton.jit
def _gather_kernel(
    p_idx,
    p_cb,
    p_out,
    N,
    D,
    stride_cb,
    stride_out,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_n, o_d, m_n, m_d = row_tile(N, D, BLOCK_N, BLOCK_D)
    b_idx = tl.load(p_idx + o_n, mask=m_n, other=-1)  # [BN]
    # -1 rows load nothing and keep `other`: zeros, as the contract says.
    m_c = (b_idx >= 0)[:, None] & m_d[None, :]  # [BN, BD]
    # No arithmetic on the values: the copy is bit-exact in every dtype.
    b_c = tl.load(p_cb + b_idx[:, None] * stride_cb + o_d[None, :], mask=m_c, other=0.0)  # [BN, BD]
    tl.store(p_out + o_n[:, None] * stride_out + o_d[None, :], b_c, mask=m_n[:, None] & m_d[None, :])


@triton.autotune(
    configs=tile_configs([(4096, 4), (8192, 8), (2048, 4)]),
    key=["D", "HAS_ROWS", "COUNT"],
    # Timing runs add into the outputs too: zero them before each run and after tuning.
    reset_to_zero=["p_out", "p_counts"],
)
@tile_rows
@triton.jit
def _scatter_add_kernel(
    p_idx,
    p_rows,
    p_out,
    p_counts,
    N,
    D,
    stride_rows,
    stride_out,
    HAS_ROWS: tl.constexpr,
    COUNT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_n, o_d, m_n, m_d = row_tile(N, D, BLOCK_N, BLOCK_D)
    b_idx = tl.load(p_idx + o_n, mask=m_n, other=-1)  # [BN]
    # -1 ("no code") and rows past N add nothing.
    m_k = b_idx >= 0  # [BN]
    if COUNT:
        # One count per row: only the programs of the first D tile count.
        if tl.program_id(1) == 0:
            b_one = tl.full([BLOCK_N], 1, dtype=tl.int32)  # [BN]
            tl.atomic_add(p_counts + b_idx, b_one, mask=m_k, sem="relaxed")
    if HAS_ROWS:
        m = m_k[:, None] & m_d[None, :]  # [BN, BD]
        b_x = tl.load(p_rows + o_n[:, None] * stride_rows + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(p_out + b_idx[:, None] * stride_out + o_d[None, :], b_x, mask=m, sem="relaxed")


@triton.jit
def _segment_sum_kernel(
    p_order,
    p_offsets,
    p_rows,
    p_out,
    D,
    stride_rows,
    stride_out,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_k = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D
    # Segment k is order[offsets[k]:offsets[k + 1]] (stable sort: ascending row number).
    start = tl.load(p_offsets + i_k)
    end = tl.load(p_offsets + i_k + 1)
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # [BN, BD]
    for s in range(start, end, BLOCK_N):
        o_s = s + tl.arange(0, BLOCK_N)  # [BN]
        m_s = o_s < end
        b_row = tl.load(p_order + o_s, mask=m_s, other=0)  # [BN]
        m = m_s[:, None] & m_d[None, :]  # [BN, BD]
        b_x = tl.load(p_rows + b_row[:, None] * stride_rows + o_d[None, :], mask=m, other=0.0)
        b_acc += b_x.to(tl.float32)
    # Every (code, D tile) is written, empty segments with zeros: the output needs no zero fill.
    tl.store(p_out + i_k * stride_out + o_d, tl.sum(b_acc, axis=0).to(p_out.dtype.element_ty), mask=m_d)


def gather(idx: Tensor, codebook: Tensor) -> Tensor:
    """``codebook[idx]`` for int64 ``idx [N]`` in ``[-1, K)``: ``[N, D]`` in ``codebook.dtype``.

    Bit-exact (values are copied, never computed); rows with index -1 are zeros.
    """
    n = idx.shape[0]
    d = codebook.shape[1]
    out = torch.empty(n, d, dtype=codebook.dtype, device=codebook.device)
    if n == 0:
        return out
    idx = idx.contiguous()
    codebook = row_major(codebook)
    bd = block_d(d)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, bd))

    _gather_kernel[grid](idx, codebook, out, n, d, codebook.stride(0), out.stride(0), BLOCK_D=bd)
    return out


def scatter_add(idx: Tensor, rows: Tensor, num_codes: int, *, deterministic: bool = False) -> Tensor:
    """``out[k] = sum of rows[i] (in fp32) over i with idx[i] == k``: float32 ``[K, D]``; idx -1 is skipped.

    ``idx`` int64 ``[N]`` in ``[-1, K)``, ``rows [N, D]``. Default: atomic adds.
    ``deterministic=True``: a stable sort of ``idx`` and a per-code segment sum, bitwise reproducible
    from run to run (no atomics on values), at the cost of the sort and an int64 ``[N]`` permutation.
    """
    out, _ = scatter_rows(idx, rows, num_codes, rows.shape[1], count=False, deterministic=deterministic)
    return out


def scatter_rows(
    idx: Tensor, rows: Tensor | None, num_codes: int, d: int, *, count: bool, deterministic: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Per-code fp32 sums of ``rows`` (None when ``rows`` is None) and, when ``count``, float32 counts.

    The one pass behind ``scatter_add`` and ``stats.code_stats``; ``d`` is the row width.
    """
    n = idx.shape[0]
    device = idx.device
    assert rows is not None or count, "nothing to scatter"
    # Only the atomic counts are int32: sums, and the deterministic counts, take any N.
    assert not (count and not deterministic) or n < 2**31, "counts are int32"
    if n == 0:
        sums = None if rows is None else torch.zeros(num_codes, d, dtype=torch.float32, device=device)
        counts = torch.zeros(num_codes, dtype=torch.float32, device=device) if count else None
        return sums, counts
    idx = idx.contiguous()
    rows = None if rows is None else row_major(rows)
    bd = block_d(d)
    if deterministic:
        return _segment_scatter(idx, rows, num_codes, d, bd, count)
    sums = None if rows is None else torch.zeros(num_codes, d, dtype=torch.float32, device=device)
    counts = torch.zeros(num_codes, dtype=torch.int32, device=device) if count else None
    # Unused pointers get a live tensor of their kind (never dereferenced under the constexpr flags).
    p_out = sums if sums is not None else torch.zeros(1, dtype=torch.float32, device=device)
    p_counts = counts if counts is not None else torch.zeros(1, dtype=torch.int32, device=device)
    p_rows = rows if rows is not None else p_out
    stride_rows = rows.stride(0) if rows is not None else 0
    d_tiles = triton.cdiv(d, bd) if rows is not None else 1

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), d_tiles)

    _scatter_add_kernel[grid](
        idx,
        p_rows,
        p_out,
        p_counts,
        n,
        d,
        stride_rows,
        p_out.stride(0),
        HAS_ROWS=rows is not None,
        COUNT=count,
        BLOCK_D=bd,
    )
    return sums, None if counts is None else counts.to(torch.float32)


def _segment_scatter(
    idx: Tensor, rows: Tensor | None, num_codes: int, d: int, bd: int, count: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The deterministic scatter: stable sort; pieces of at most ``_PIECE`` rows of each code's
    segment summed by one program each; then each code's pieces summed in order. Both passes are
    ``_segment_sum_kernel`` (segments of sorted rows, then segments of piece sums). No host sync:
    the piece count is bounded by ``cdiv(N, _PIECE) + K`` and the pieces past the real count are
    empty."""
    n = idx.shape[0]
    dev = idx.device
    sorted_idx, order = torch.sort(idx, stable=True)
    # offsets[k] = first sorted position holding a code >= k; the -1 rows sort before offsets[0].
    codes = torch.arange(num_codes + 1, dtype=torch.int64, device=dev)
    offsets = torch.searchsorted(sorted_idx, codes)
    sizes = offsets.diff()  # [K] rows per code
    counts = sizes.to(torch.float32) if count else None
    if rows is None:
        return None, counts
    # Code k owns pieces [piece_end[k] - pieces[k], piece_end[k]); piece p of it starts at
    # offsets[k] + (p - first piece of k) * _PIECE in the sorted order.
    pieces = (sizes + _PIECE - 1) // _PIECE
    piece_end = pieces.cumsum(0)
    bound = triton.cdiv(n, _PIECE) + num_codes
    p = torch.arange(bound, dtype=torch.int64, device=dev)
    owner = torch.searchsorted(piece_end, p, right=True).clamp_max(num_codes - 1)
    start = offsets[owner] + (p - (piece_end[owner] - pieces[owner])) * _PIECE
    start = torch.where(p < piece_end[-1], start, n)  # pieces past the real count: empty, at the end
    piece_bounds = torch.cat([start, start.new_full((1,), n)])
    partial = _segment_sum(order, piece_bounds, rows, bound, d, bd)
    piece_offsets = torch.cat([piece_end.new_zeros(1), piece_end])
    return _segment_sum(p, piece_offsets, partial, num_codes, d, bd), counts


def _segment_sum(order: Tensor, offsets: Tensor, rows: Tensor, segments: int, d: int, bd: int) -> Tensor:
    """``out[s] = sum of rows[order[i]]`` over ``offsets[s] <= i < offsets[s + 1]``: float32
    ``[segments, d]``, summed in a fixed order (pinned tile shape)."""
    out = torch.empty(segments, d, dtype=torch.float32, device=rows.device)
    _segment_sum_kernel[(segments, triton.cdiv(d, bd))](
        order,
        offsets,
        rows,
        out,
        d,
        rows.stride(0),
        out.stride(0),
        BLOCK_N=max(1, _SEG_TILE // bd),
        BLOCK_D=bd,
        num_warps=_SEG_WARPS,
    )
    return out
