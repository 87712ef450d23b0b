"""Exact top-k assignment: the k nearest codes of every row, in increasing distance, without N x K.

A kernel of its own (``_topk_kernel``) beside assign.py's k = 1 kernel, built from the same jit
helpers and autotune configs: the per-row state here is a ``[BN, KP]`` block of keys instead of one
key, with its own finish (k columns), so folding it into ``_assign_kernel`` would add a second state
machine to a five-mode kernel and recompile every k = 1 variant. Kept apart, the k = 1 code is
untouched (same compiled code, same speed).

- The state: an unsorted block of the k best int64 keys per row (assign.py's keys, ``(bits of d) << 32
  | code``, so the order is distance then code: ties go to the lowest index; ``KP`` is 4, 16 or 64,
  slots past k are inert). A candidate enters by replacing the block's maximum (the current k-th key)
  when it is below it; the key that leaves, or the candidate itself when it does not enter, is "the
  rest". Per code tile only candidates below the k-th key can enter, smallest first, for as many rounds
  as the row of the block with most of them needs (at most k): after the first tiles few rows have
  any, so a tile costs a few rounds of ``[BN, BK]`` reductions, not k.
- Exact mode, certified (every N < 2^31): split-bf16 tensor-core distances ``a`` (``_dot_tile``, mode
  3) with the certified search's rigorous bound (``|a_j - d_j| <= E |x|^2 + e_j``, see
  ``assign._search_certify``). The state holds the k least ``a`` and, as k = 1's search does, the least
  lower bound ``l = a - e`` of every code not in it. The k codes are the true k nearest when their
  greatest upper bound is below every other code's lower bound, ``max_j (a_j + e_j) + 2 E |x|^2 <
  l_rest`` (``assign._certified``); the finish then computes their direct-form fp32 distances and
  writes them in that order, ties to the lowest index. Rows the bound cannot separate (the k-th and
  (k+1)-th codes within the bound, exact ties there, fewer than k finite codes, NaN/Inf rows) are
  listed, and a last launch runs the direct-form search on just those rows.
- Exact mode, direct form (those rows; all rows when N >= 2^31): ``_direct_tile``'s fp32 distances,
  within (1 + 2^-16) of float64 (``assign._search_exact``), so the code at position j is within
  (1 + 2^-16) of the true j-th distance.
- ``"tf32"`` / ``"bf16"``: the expanded form on tensor cores picks the k codes (no certificate); the
  finish orders them by their direct-form distances.
- ``split > 1`` (small N, large K): each program's k keys (and its ``l_rest``) go to ``[split, N, KP]``
  buffers and a finish-only launch merges them, as assign.py does for k = 1. The finish measures the
  reported distances with assign's fixed D tile (``_DIST_BD``), so results are bitwise the same for every
  split. (The direct-form search's rows report the distances its keys hold: summed with its own tile.)
- Above ``MAX_K`` (64) the state would not fit the registers: ``vqtriton.assign`` takes the torch path.

Cost (predicted, not measured: no GPU here): the distance work of k = 1 plus, per code tile, the
rounds above (three ``[BN, BK]`` passes each); with k = 8 about k rounds on the first tiles and 2-5 on
later ones, so roughly 2-4x the k = 1 exact search at K = 1024 and close to it at K >= 8192. A second
rule of thumb: the uncertified share grows with the density of distances near the k-th one (a few
percent of N(0, 1) rows at k = 1) and each listed row costs a direct-form scan of all K codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqtriton.kernels import assign as _assign
from vqtriton.kernels import interpreting, tune_configs
from vqtriton.kernels.assign import (
    _CERTIFY, _DIST_BD, _DOT_CONFIGS, _DOT_INTERPRETER, _EXACT_CONFIGS, _EXACT_INTERPRETER, _GROUP, _MODES,
    INF_BITS, KEY_MAX, NAN_BITS, PRECISIONS, _auto_split, _certified, _certify_bound, _code_run, _direct_tile,
    _dot_tile, _fit_bd, _key_value, _keys, _launch_finish, _prepare, _program_rows, _rank_key, _row_distance,
    _search_grid, _tile_best,
)
from vqtriton.kernels.centre import centre_rows, centred_codebook

__all__ = ["topk_fwd", "MAX_K"]

# The largest k the kernel serves (its state is a [BN, KP] block of int64 keys per program);
# vqtriton.assign takes the torch path above it.
MAX_K = 64
KEY_MIN = tl.constexpr(-(2**63))
# High word of a key that holds no code: an empty slot of the state (KEY_MAX - 1 - p: distinct) or a
# candidate already taken out of its tile (KEY_MAX). Every real key's high word is at most NAN_BITS.
EMPTY_HI = tl.constexpr(0x7FFFFFFF)


def _slots(k: int) -> int:
    """KP, the state's slots for k: 4, 16 or 64 (three compiled sizes, not one per k)."""
    return 4 if k <= 4 else 16 if k <= 16 else 64


@triton.jit
def _topk_init(k, BN: tl.constexpr, KP: tl.constexpr):
    """An empty ``[BN, KP]`` state: slot p < k holds KEY_MAX - 1 - p (distinct, above every real key,
    below KEY_MAX), slots past k hold KEY_MIN (never the maximum, so never replaced)."""
    o_p = tl.arange(0, KP)
    b_init = tl.where(o_p < k, KEY_MAX - 1 - o_p.to(tl.int64), KEY_MIN)  # [KP]
    return tl.zeros([BN, KP], dtype=tl.int64) + b_init[None, :]


@triton.jit
def _push(b_top, b_x):
    """Offer one candidate key per row: it replaces the row's k-th key (the state's maximum) when it
    is below it. Returns the new state and the key that is now outside it (the old k-th, or b_x)."""
    b_kth = tl.max(b_top, axis=1)
    m_take = b_x < b_kth
    b_top = tl.where(m_take[:, None] & (b_top == b_kth[:, None]), b_x[:, None], b_top)
    return b_top, tl.where(m_take, b_kth, b_x)


@triton.jit
def _rest_bound(b_out, ce_ptr, m_n):
    """The lower bound ``a - e`` of a key that left (or never entered) the state; +Inf for no code."""
    m_real = m_n & ((b_out >> 32) != EMPTY_HI)
    b_e = tl.load(ce_ptr + (b_out & 0x7FFFFFFF), mask=m_real, other=0.0)
    return tl.where(m_real, _key_value(b_out) - b_e, float("inf"))


@triton.jit
def _merge_keys(b_top, b_key, m_n, k):
    """The state after a ``[BN, BK]`` tile of direct-form keys (codes above the state's): its
    candidates below the k-th key enter, smallest first."""
    b_kth = tl.max(b_top, axis=1)
    m_new = (b_key < b_kth[:, None]) & m_n[:, None]
    n_new = tl.max(tl.minimum(tl.sum(m_new.to(tl.int32), axis=1), k), axis=0)
    for _ in range(0, n_new):
        b_x = tl.min(b_key, axis=1)
        b_key = tl.where(b_key == b_x[:, None], KEY_MAX, b_key)
        b_top, _ = _push(b_top, b_x)
    return b_top


@triton.jit
def _merge_ranks(b_top, b_lrest, b_a, o_k, m_k, m_n, ce_ptr, k, BOUND: tl.constexpr):
    """``_merge_keys`` for a ``[BN, BK]`` tile of fp32 ranks ``a`` (any sign; +Inf never enters), as
    fp32 / int32 work per round. With ``BOUND`` (the certified search) the lower bound of every code
    that ends outside the state, taken out of the tile or not, joins ``b_lrest``."""
    b_kth = tl.max(b_top, axis=1)
    b_kth_a = tl.where((b_kth >> 32) == EMPTY_HI, float("inf"), _key_value(b_kth))
    if BOUND:
        b_l = b_a - tl.load(ce_ptr + o_k, mask=m_k, other=0.0)[None, :]  # [BN, BK]
    # Codes in this tile are above the state's, so "below the k-th key" is a < the k-th a.
    m_new = (b_a < b_kth_a[:, None]) & m_n[:, None]
    n_new = tl.max(tl.minimum(tl.sum(m_new.to(tl.int32), axis=1), k), axis=0)
    for _ in range(0, n_new):
        t_min, t_code = _tile_best(b_a, o_k)
        b_a = tl.where(o_k[None, :] == t_code[:, None], float("inf"), b_a)
        b_x = tl.where(t_min < float("inf"), _rank_key(t_min, t_code), KEY_MAX)
        b_top, b_out = _push(b_top, b_x)
        if BOUND:
            b_lrest = tl.minimum(b_lrest, _rest_bound(b_out, ce_ptr, m_n))
    if BOUND:
        # What stayed in the tile is at or above the k-th key: outside the state.
        b_lrest = tl.minimum(b_lrest, tl.min(tl.where(b_a < float("inf"), b_l, float("inf")), axis=1))
    return b_top, b_lrest


@triton.jit
def _merge_runs(key_ptr, part_ptr, ce_ptr, o_n, m_n, N, k, split, BOUND: tl.constexpr,
                BN: tl.constexpr, KP: tl.constexpr):
    """The state of each row over the ``split`` programs' code runs (``[split, N, KP]`` keys and, with
    ``BOUND``, ``[split, N]`` rest bounds): every run's keys are offered in turn."""
    o_p = tl.arange(0, KP)
    b_top = _topk_init(k, BN, KP)
    b_lrest = tl.full([BN], float("inf"), tl.float32)
    for i_s in range(0, split):
        p_run = key_ptr + (i_s * N + o_n)[:, None] * KP + o_p[None, :]
        b_run = tl.load(p_run, mask=m_n[:, None] & (o_p[None, :] < k), other=KEY_MAX)  # [BN, KP]
        b_run = tl.where((b_run >> 32) == EMPTY_HI, KEY_MAX, b_run)  # a run's empty slots offer nothing
        if BOUND:
            b_lrest = tl.minimum(b_lrest, tl.load(part_ptr + i_s * N + o_n, mask=m_n, other=float("inf")))
        for _ in range(0, k):
            b_x = tl.min(b_run, axis=1)
            b_run = tl.where(b_run == b_x[:, None], KEY_MAX, b_run)
            b_top, b_out = _push(b_top, b_x)
            if BOUND:
                b_lrest = tl.minimum(b_lrest, _rest_bound(b_out, ce_ptr, m_n))
    return b_top, b_lrest


@triton.jit
def _exact_keys(b_top, b_fail, z_ptr, c_ptr, o_n, m_n, D, stride_z, stride_c, k,
                GROUP: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    """Direct-form keys (fp32 distances, ``_row_distance``) of the state's codes; an empty slot p gets
    ``b_fail << 32 | p`` (no code: the row's NaN or +Inf)."""
    o_p = tl.arange(0, KP)
    b_exact = tl.full([BN, KP], KEY_MAX, tl.int64)
    for p in range(0, k):
        b_key = tl.max(tl.where(o_p[None, :] == p, b_top, KEY_MIN), axis=1)  # [BN] slot p
        m_full = (b_key >> 32) != EMPTY_HI
        b_code = tl.where(m_full, b_key & 0x7FFFFFFF, 0)
        b_d = _row_distance(z_ptr, c_ptr, o_n, b_code, m_n & m_full, D, stride_z, stride_c, GROUP, BN, _DIST_BD)
        b_key = tl.where(m_full, _rank_key(b_d, b_code), (b_fail.to(tl.int64) << 32) | p)
        b_exact = tl.where(o_p[None, :] == p, b_key[:, None], b_exact)
    return b_exact


@triton.jit
def _emit(b_keys, idx_ptr, dist_ptr, o_n, m_n, k, KP: tl.constexpr):
    """Rows ``[k]`` of idx / dist from direct-form keys, in key order (distance, then lowest code);
    slots without a finite distance get -1 and the row's failure (NaN when its best key is NaN, as
    k = 1 decides, else +Inf)."""
    o_p = tl.arange(0, KP)
    b_keys = tl.where(o_p[None, :] < k, b_keys, KEY_MAX)
    b_first = (tl.min(b_keys, axis=1) >> 32).to(tl.int32)
    b_fail = tl.where(b_first == NAN_BITS, float("nan"), float("inf"))
    for j in range(0, k):
        b_x = tl.min(b_keys, axis=1)
        # Remove one slot (keys of failed slots may repeat): the lowest holding the minimum.
        b_pos = tl.min(tl.where(b_keys == b_x[:, None], o_p[None, :], KP), axis=1)
        b_keys = tl.where(o_p[None, :] == b_pos[:, None], KEY_MAX, b_keys)
        b_bits = (b_x >> 32).to(tl.int32)
        m_ok = b_bits < INF_BITS
        tl.store(idx_ptr + o_n * k + j, tl.where(m_ok, b_x & 0x7FFFFFFF, -1), mask=m_n)
        tl.store(dist_ptr + o_n * k + j, tl.where(m_ok, b_bits.to(tl.float32, bitcast=True), b_fail), mask=m_n)


@triton.jit
def _topk_kernel(z_ptr, c_ptr, xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, ce_ptr, aux_ptr,
                 key_ptr, part_ptr, idx_ptr, dist_ptr, rows_ptr, count_ptr,
                 N, K, D, k, stride_z, stride_c, stride_x, stride_cs, split, n_bucket, bound_e,
                 MODE: tl.constexpr, EMULATE_BF16: tl.constexpr, SEARCH: tl.constexpr, FINISH: tl.constexpr,
                 ROWS: tl.constexpr, KP: tl.constexpr, GROUP: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # MODE 0: direct form; 1 / 2: tf32 / bf16 expanded form; 3: certified split-bf16 (see the module
    # docstring). n_bucket is only an autotune key (N rounded up to a power of two).
    if ROWS:
        # Sized for every row: programs past the listed count have none and return at once.
        if tl.program_id(0) * BN >= tl.load(count_ptr):
            return
    o_n, m_n = _program_rows(N, rows_ptr, count_ptr, ROWS, BN)
    i_s = tl.program_id(1).to(tl.int64)
    o_p = tl.arange(0, KP)
    if SEARCH:
        k_lo, k_hi = _code_run(K, split, BK)
        b_top = _topk_init(k, BN, KP)
        b_lrest = tl.full([BN], float("inf"), tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < k_hi
            if MODE == 0:
                b_d = _direct_tile(z_ptr, c_ptr, o_n, m_n, o_k, m_k, D, stride_z, stride_c, GROUP, BN, BK, BD)
                b_top = _merge_keys(b_top, _keys(b_d, o_k, m_k), m_n, k)
            else:
                b_a = _dot_tile(xh_ptr, xl_ptr, xsq_ptr, ch_ptr, cl_ptr, csq_ptr, o_n, m_n, o_k, m_k, D, stride_x,
                                stride_cs, MODE, EMULATE_BF16, BN, BK, BD)
                b_top, b_lrest = _merge_ranks(b_top, b_lrest, b_a, o_k, m_k, m_n, ce_ptr, k, MODE == 3)
        if not FINISH:
            # This run's state: keys in key_ptr [split, N, KP], the rest bound in part_ptr [split, N].
            tl.store(key_ptr + (i_s * N + o_n)[:, None] * KP + o_p[None, :], b_top, mask=m_n[:, None])
            if MODE == 3:
                tl.store(part_ptr + i_s * N + o_n, b_lrest, mask=m_n)
    else:
        b_top, b_lrest = _merge_runs(key_ptr, part_ptr, ce_ptr, o_n, m_n, N, k, split, MODE == 3, BN, KP)
    if FINISH:
        if MODE == 0:
            # The keys hold the direct-form distances themselves.
            _emit(b_top, idx_ptr, dist_ptr, o_n, m_n, k, KP)
        else:
            b_xsq = tl.load(xsq_ptr + o_n, mask=m_n, other=0.0)
            m_slot = o_p[None, :] < k
            m_full = m_slot & ((b_top >> 32) != EMPTY_HI)  # [BN, KP]
            if MODE == 3:
                b_e = tl.load(ce_ptr + (b_top & 0x7FFFFFFF), mask=m_n[:, None] & m_full, other=0.0)
                b_up = tl.max(tl.where(m_full, _key_value(b_top) + b_e, -float("inf")), axis=1)
                m_all = tl.sum((m_slot & ~m_full).to(tl.int32), axis=1) == 0
                m_out = m_n & m_all & _certified(b_up, tl.zeros([BN], dtype=tl.float32), b_lrest, b_xsq, aux_ptr,
                                                 bound_e)
                # Rows the bound cannot separate go to the direct-form search (next launch).
                m_retry = m_n & ~m_out
                b_slot = tl.atomic_add(count_ptr + tl.zeros([BN], dtype=tl.int32), 1, mask=m_retry)
                tl.store(rows_ptr + b_slot, o_n, mask=m_retry)
                b_fail = tl.full([BN], INF_BITS, tl.int32)  # (certified rows have every slot)
            else:
                m_out = m_n
                # As k = 1's expanded-form search: NaN for a NaN row or an all-NaN codebook, else +Inf.
                b_all_nan = tl.load(aux_ptr + tl.zeros([BN], dtype=tl.int32)) == 0
                b_fail = tl.where((b_xsq != b_xsq) | b_all_nan, NAN_BITS, INF_BITS)
            b_exact = _exact_keys(b_top, b_fail, z_ptr, c_ptr, o_n, m_out, D, stride_z, stride_c, k, GROUP, BN, KP)
            _emit(b_exact, idx_ptr, dist_ptr, o_n, m_out, k, KP)


_KEY = ["n_bucket", "K", "D", "split", "KP", "MODE", "SEARCH", "FINISH", "ROWS"]
# Register budget of the state: BN * KP keys per program at most (the [128, 16] block of 8 warps is
# 16 registers a thread); larger KP keeps the configs with fewer rows.
_STATE_KEYS = 2048


def _fit_state(configs, named_args, **kwargs):
    """The configs whose state fits ``_STATE_KEYS`` (at least the one with the fewest rows), tensor-core
    tiles also cut to D (``assign._fit_bd``)."""
    if kwargs.get("MODE", 0) != 0:
        configs = _fit_bd(configs, named_args, **kwargs)
    kept = [c for c in configs if c.kwargs["BN"] * kwargs["KP"] <= _STATE_KEYS]
    return kept or [min(configs, key=lambda c: c.kwargs["BN"])]


_PRUNE = {"early_config_prune": _fit_state}
_topk_exact = triton.autotune(configs=tune_configs(_EXACT_CONFIGS, _EXACT_INTERPRETER), key=_KEY,
                              prune_configs_by=_PRUNE)(_topk_kernel)
_topk_dot = triton.autotune(configs=tune_configs(_DOT_CONFIGS, _DOT_INTERPRETER), key=_KEY,
                            prune_configs_by=_PRUNE)(_topk_kernel)
# Every timing run of the certified search lists its uncertified rows again.
_topk_certify = triton.autotune(configs=tune_configs(_DOT_CONFIGS, _DOT_INTERPRETER), key=_KEY,
                                reset_to_zero=["count_ptr"], prune_configs_by=_PRUNE)(_topk_kernel)


def topk_fwd(z: torch.Tensor, codebook: torch.Tensor, k: int, *, precision: str = "exact",
             split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """idx int64 ``[N, k]``, dist float32 ``[N, k]``: the k nearest codes of each row of ``z [N, D]`` in
    ``codebook [K, D]`` in increasing distance (inputs checked by the caller, as for ``assign_fwd``;
    ``1 <= k <= min(K, MAX_K)``). Never allocates N x K.

    - ``precision="exact"``: the code at position j has a float64 direct-form distance within
      (1 + 2^-16) of the true j-th smallest (DESIGN.md section 8); among equal distances the lowest
      index comes first. ``"tf32"`` / ``"bf16"``: the k codes come from the expanded form on tensor
      cores (each distance off by up to the dot's rounding, as in ``assign_fwd``), ordered by their
      direct-form distances.
    - ``dist``: the direct-form fp32 squared distance to each returned code.
    - A slot without a finite distance (a row holding a NaN or Inf, fp32 overflow, or fewer than k
      finite codes) gets -1 and ``dist`` NaN when the row's nearest distance is NaN (a NaN in the row,
      or every code holds one), else +Inf: k = 1's policy, slot by slot.
    - ``split``: programs along the code axis per row block (``None``: from N, K and the GPU); results
      do not depend on it.
    """
    if precision not in _MODES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n = z.shape[0]
    num_codes = codebook.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(num_codes, MAX_K):
        raise ValueError(f"k must be an int in [1, min(K, {MAX_K})] = [1, {min(num_codes, MAX_K)}], got {k!r}")
    z, codebook, idx, dist, _ = _prepare(z, codebook, split, k=k)
    if n == 0:
        return idx, dist
    mode = _MODES[precision]
    if mode == 0 and _assign._CERTIFIED_SEARCH and n < 2**31:
        mode = _CERTIFY
    split = _auto_split(n, num_codes, z.device) if split is None else split
    _topk_launch(z, codebook, k, idx, dist, mode, split)
    return idx, dist


def _topk_launch(z, codebook, k: int, idx, dist, mode: int, split: int) -> torch.Tensor | None:
    """Writes ``idx`` and ``dist``; returns the certified search's count of listed rows (int32 ``[1]`` on
    the device, for tests and tuning), None in the other modes."""
    n, d = z.shape
    num_codes = codebook.shape[0]
    kp = _slots(k)
    bound_e = _certify_bound(d) if mode == _CERTIFY else 0.0
    if mode == 0:
        # The direct-form search reads z and the codebook only (the other pointers are unused).
        operands = (dist,) * 8
        stride_x = stride_cs = d
    else:
        parts = 3 if mode == _CERTIFY else mode
        cb = centred_codebook(codebook, parts=parts, bound_e=bound_e)
        xh, xl, xsq = centre_rows(z, cb.mean, parts=parts)
        operands = (xh, xh if xl is None else xl, xsq, cb.hi, cb.hi if cb.lo is None else cb.lo, cb.sq,
                    cb.sq if cb.ce is None else cb.ce, cb.aux)
        stride_x, stride_cs = xh.stride(0), cb.hi.stride(0)
    keys = torch.empty(split, n, kp, dtype=torch.int64, device=z.device) if split > 1 else idx
    part = torch.empty(split, n, dtype=torch.float32, device=z.device) if split > 1 and mode == _CERTIFY else dist
    rows = torch.empty(n, dtype=torch.int64, device=z.device) if mode == _CERTIFY else idx
    count = torch.zeros(1, dtype=torch.int32, device=z.device) if mode == _CERTIFY else idx

    def args(split):
        return (z, codebook, *operands, keys, part, idx, dist, rows, count, n, num_codes, d, k, z.stride(0),
                codebook.stride(0), stride_x, stride_cs, split, triton.next_power_of_2(n), bound_e)

    flags = dict(EMULATE_BF16=interpreting(), KP=kp, GROUP=_GROUP)
    launch = {0: _topk_exact, _CERTIFY: _topk_certify}.get(mode, _topk_dot)
    launch[_search_grid(n, split)](*args(split), MODE=mode, SEARCH=True, FINISH=split == 1, ROWS=False, **flags)
    if split > 1:
        _launch_finish(_topk_kernel, n, args(split), MODE=mode, ROWS=False, **flags)
    if mode == _CERTIFY:
        # Sized for every row; programs past the listed count return at once (no host sync). Each
        # listed row's search runs over all K codes (split 1).
        _topk_exact[_search_grid(n, 1)](*args(1), MODE=0, SEARCH=True, FINISH=True, ROWS=True, **flags)
        return count
    return None
