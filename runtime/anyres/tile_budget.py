"""Split the image-token budget K over the tiles of a LLaVA-NeXT image (method.md §5 ``tile_budget``).

T tiles (tile 0 the base tile, then the grid row-major); tile t has ``caps[t]`` candidate patches
(its N patches minus the unpadded ones), so it can keep at most that many. Both modes return
int64 counts ``k[T]`` with ``sum(k) == K`` and ``0 <= k[t] <= caps[t]``; like the rest of the
runtime they need ``1 <= K <= sum(caps)``. Every tie goes to the smaller tile index.

- ``equal``: max-min fair ("water-filling") in integers. Deal the K tokens one at a time, each to
  the tile that holds the fewest so far among those below their cap, ties to the smaller index.
  Closed form: ``L`` = the largest level with ``sum_t min(caps[t], L) <= K``; tile t gets
  ``min(caps[t], L)``, and the ``R = K - sum_t min(caps[t], L)`` leftover tokens go one each to the
  first R tiles (in tile order) with ``caps[t] > L``. Without binding caps this is ``floor(K / T)``
  each and one more for the first ``K mod T`` tiles; a cap's surplus goes to the tiles still open.
- ``perplexity``: tile t's quota is proportional to ``exp(H_t)`` (its deep-layer [CLS]-attention
  entropy in nats; ``exp(H_t)`` is the effective number of patches the attention covers). Caps by
  proportional water-filling: with C the capped set (initially the tiles with cap 0), every open
  tile gets ``q_t = (K - sum_{c in C} caps[c]) * w_t / sum_{o open} w_o``; all open tiles with
  ``q_t >= caps[t]`` join C at once (quota = cap) and the quotas are recomputed, until none does
  (at most T rounds; the level only rises, so a capped tile stays capped). Then largest-remainder
  rounding: every tile gets ``floor(q_t)`` and the ``K - sum floor(q)`` tiles with the largest
  fractional parts one more, ties to the smaller index. ``exp`` is taken after subtracting the
  largest open entropy, so any finite entropies work. With equal entropies both modes agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.errors import InputError
from runtime.selection import top_k

MODES = ("equal", "perplexity")  # method.md §5; "equal" is the default
DEFAULT_MODE = "equal"


def split_tile_budget(
    budget: int,
    caps: Sequence[int] | np.ndarray,
    mode: str = DEFAULT_MODE,
    entropy: np.ndarray | None = None,
) -> np.ndarray:
    """K, [T] caps (and [T] entropies in nats for ``perplexity``) -> [T] int64 tokens per tile.

    ``entropy`` is validated whenever given and only used by ``perplexity``.
    Examples: ``split_tile_budget(11, [576] * 5)`` -> ``[3, 2, 2, 2, 2]``;
    ``split_tile_budget(10, [1, 576, 576])`` -> ``[1, 5, 4]`` (tile 0's cap frees one token);
    ``split_tile_budget(10, [576, 576], "perplexity", [ln 576, ln 144])`` -> ``[8, 2]``.
    """
    cap_arr, k, h = _check_inputs(budget, caps, mode, entropy)
    if mode == "equal":
        return _equal_split(k, cap_arr)
    return _largest_remainder(_capped_quotas(k, cap_arr, h), k)


def perplexity_quotas(
    budget: int, caps: Sequence[int] | np.ndarray, entropy: np.ndarray
) -> np.ndarray:
    """K, [T] caps, [T] entropies (nats) -> [T] float64 capped quotas before rounding (sum K).

    Example: ``perplexity_quotas(11, [576] * 3, [ln 576, ln 144, ln 144])`` -> ``[7.33, 1.83, 1.83]``
    (shares 576 : 144 : 144); a capped tile's quota is its cap.
    """
    cap_arr, k, h = _check_inputs(budget, caps, "perplexity", entropy)
    return _capped_quotas(k, cap_arr, h)


def _equal_split(budget: int, caps: np.ndarray) -> np.ndarray:
    """Integer water-filling: min(caps, L) each, the R leftovers to the first open tiles."""
    level = _water_level(budget, caps)
    counts = np.minimum(caps, level)
    rest = budget - int(counts.sum())
    counts[np.flatnonzero(caps > level)[:rest]] += 1
    return counts.astype(np.int64)


def _water_level(budget: int, caps: np.ndarray) -> int:
    """The largest L in [0, max caps] with sum_t min(caps[t], L) <= K (bisection)."""
    lo, hi = 0, int(caps.max())  # sum min(caps, 0) = 0 <= K always holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(caps, mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _capped_quotas(budget: int, caps: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    """Proportional water-filling of K over weights exp(log_weights) -> [T] float64 quotas."""
    quotas = caps.astype(np.float64)  # capped tiles keep quota = cap
    is_open = caps > 0
    while is_open.any():
        idx = np.flatnonzero(is_open)
        free = budget - int(caps[~is_open].sum())
        w = np.exp(log_weights[idx] - log_weights[idx].max())  # largest weight is exactly 1
        q = free * w / w.sum()
        full = q >= caps[idx]
        if not full.any():
            quotas[idx] = q
            break
        is_open[idx[full]] = False
    return quotas


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """[T] quotas summing to ``total`` -> [T] int64: floors, then +1 by largest fraction."""
    floors = np.floor(quotas)
    counts = floors.astype(np.int64)
    # Open quotas are < cap, so floor + 1 <= cap; capped quotas are integers (fraction 0).
    counts[top_k(quotas - floors, total - int(counts.sum()))] += 1
    return counts


def _check_inputs(
    budget: int, caps: Sequence[int] | np.ndarray, mode: str, entropy: np.ndarray | None
) -> tuple[np.ndarray, int, np.ndarray]:
    """Validate everything (one-line InputError) -> ([T] int64 caps, K, [T] float64 entropy)."""
    if mode not in MODES:
        raise InputError(f"unknown tile_budget mode {mode!r}; choose one of: {', '.join(MODES)}")
    cap_arr = _check_caps(caps)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise InputError(f"token budget K must be an integer, got {budget!r}")
    total = int(cap_arr.sum())
    if not 1 <= budget <= total:
        raise InputError(
            f"token budget K must satisfy 1 <= K <= sum of tile caps={total}, got {budget}"
        )
    if entropy is None:
        if mode == "perplexity":
            raise InputError("tile_budget 'perplexity' needs the tiles' entropy, got None")
        return cap_arr, int(budget), np.zeros(cap_arr.shape[0])
    h = np.asarray(entropy, dtype=np.float64)
    if h.shape != cap_arr.shape:
        raise InputError(f"entropy must be [T={cap_arr.shape[0]}] like caps, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise InputError(f"entropy must be finite, got {h.tolist()}")
    return cap_arr, int(budget), h


def _check_caps(caps: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(caps)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise InputError(f"caps must be a non-empty [T] list of integers, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"caps must be integers, got {arr.tolist()}")
    if np.any(arr < 0):
        raise InputError(f"caps must be >= 0, got {arr.tolist()}")
    return arr.astype(np.int64)
