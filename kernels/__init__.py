"""Triton kernels, one file per op, each with its launcher (installed as ``vqtriton.kernels``).

    assign.py    fused distance + argmin (+ epilogue: gather of z_q)
    gather.py    bit-exact codebook gather and its scatter-add backward
    sqerr.py     squared-error reductions (per row, total) and their backward
    stats.py     per-code counts and vector sums (EMA, k-means, usage)
    quantize.py  the fused VQ backward (straight-through + codebook + commitment terms)
    topk.py      exact top-k assignment (the certified search keeping the k best, and its direct-form re-rank)
    sample.py    Gumbel-max sampled assignment (Philox noise keyed by seed, row and code)
    residual.py  every residual level in one launch, its one-launch backward and the levels' statistics
    lfq.py       LFQ's entropy: the bit halves' distributions, their backward, and the entropy reduction
    centre.py    the tensor-core searches' operands (centred rows and codes, bf16 parts, bounds)

Launchers take 2-D ``[N, D]`` rows with any row stride (copied only when the last dim is not
unit-stride: ``row_major``); checks of user input live in ``vqtriton.functional``.
"""

import os

import triton
import triton.language as tl
from torch import Tensor

# Widest D tile of the row kernels: 128 fp32 = 512 B per row per program, coalesced, and few
# registers per thread.
_MAX_BLOCK_D = 128


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on for this process (``TRITON_INTERPRET`` set before
    triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tune_configs(configs: list, interpreter=None) -> list:
    """An autotune space for the GPU; under the interpreter (which cannot time configs) one config:
    ``interpreter`` when given, else the first. The interpreter pays per block operation rather than
    per element, so a kernel may pin larger, numpy-sized blocks there."""
    if not interpreting():
        return configs
    return [interpreter] if interpreter is not None else configs[:1]


def block_d(d: int, cap: int = _MAX_BLOCK_D) -> int:
    """The D tile for rows of width ``d``: the next power of two, at most ``cap``."""
    return min(triton.next_power_of_2(d), cap)


def row_major(t: Tensor) -> Tensor:
    """``t`` itself when its last dim is unit-stride (row strides go to the kernels), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def tile_configs(tiles_warps: list[tuple[int, int]]) -> list:
    """Autotune configs of ``TILE`` (elements per program) and ``num_warps``, pinned under the interpreter."""
    return tune_configs([triton.Config({"TILE": t}, num_warps=w) for t, w in tiles_warps])


# BLOCK_N from the config's TILE and the launcher's BLOCK_D: the same tile size whatever D, so
# narrow rows get many rows per program and wide rows do not spill registers.
tile_rows = triton.heuristics({"BLOCK_N": lambda args: max(1, args["TILE"] // args["BLOCK_D"])})


@triton.jit
def row_tile(N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets (int64) and masks of this program's ``[BLOCK_N, BLOCK_D]`` tile of ``N x D`` rows:
    programs ``(i_n, i_d)`` of a ``(cdiv(N, BLOCK_N), cdiv(D, BLOCK_D))`` grid."""
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    o_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    return o_n, o_d, o_n < N, o_d < D
