"""Per-code counts and vector sums from indices, in one pass with no one-hot matrix.

Feeds EMA codebook updates (with Laplace smoothing), dead-code detection, perplexity and usage.
It is gather.py's scatter with its ``COUNT`` flag on: each row adds 1 to its code's count and its
values to its code's sum in the same program; index -1 ("no code") is skipped.
"""

from __future__ import annotations

from torch import Tensor

from vqtriton.kernels.gather import scatter_rows

__all__ = ["code_stats"]


def code_stats(
    idx: Tensor, z: Tensor | None, num_codes: int, *, deterministic: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Counts (float32 ``[K]``) and sums (float32 ``[K, D]``, None when ``z`` is None) of the rows with ``idx >= 0``.

    ``idx`` int64 ``[N]`` in ``[-1, K)``, ``z [N, D]``. Counts are exact integers (accumulated in
    int32, then converted). ``deterministic=True`` makes the sums bitwise reproducible run to run
    (stable sort and per-code segment sums, as ``gather.scatter_add``).
    """
    d = 1 if z is None else z.shape[1]
    sums, counts = scatter_rows(idx, z, num_codes, d, count=True, deterministic=deterministic)
    return counts, sums
