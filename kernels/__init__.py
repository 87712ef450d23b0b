"""Triton kernels, one file per op, each with its launcher (installed as ``vqtriton.kernels``).

    assign.py    fused distance + argmin (+ epilogue: gather of z_q)
    gather.py    bit-exact codebook gather and its scatter-add backward
    sqerr.py     squared-error reductions (per row, total) and their backward
    stats.py     per-code counts and vector sums (EMA, k-means, usage)
    quantize.py  the fused VQ backward (straight-through + codebook + commitment terms)

Launchers take 2-D ``[N, D]`` rows; checks of user input live in ``vqtriton.functional``.
"""

import triton
from torch import Tensor

from vqtriton.backend import interpreting

# Widest D tile of the row kernels: 128 fp32 = 512 B per row per program, coalesced, and few
# registers per thread.
_MAX_BLOCK_D = 128


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
