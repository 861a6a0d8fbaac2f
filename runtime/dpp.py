"""CDPruner's conditional DPP selection (method.md §7, strategy ``cdpruner``), pure NumPy.

Relevance and kernel are float32 (in and out); the greedy MAP loop runs in float64 on the
float32 kernel. Kept indices come back int64, sorted ascending. Choices where §7 is silent:

- Zero rows: every norm is clipped at ``NORM_FLOOR`` before a cosine (as DivPrune does), so a
  zero row has cosine 0 with everything; a zero projected row gets ``L_ii = 0`` and is never a
  DPP pick, only a fill.
- The diagonal is computed like every other cosine (``S_ii = 1 ± 1e-7``), so exact duplicate rows
  keep gain 0 once one of them is picked. The price: with flat relevance (``relevance_weight = 0``,
  r = 1) every first gain is 1 up to round-off, and the first pick follows round-off.
- Non-finite inputs (NaN, inf) are rejected with ValueError: they would make every argmax
  meaningless.
- Ties (exact floating-point equality) go to the smaller index, in the greedy loop and in the fill.
- Rank spent: the loop stops at the first step whose best gain is ``<= RANK_SPENT`` (or NaN); in
  exact arithmetic gains never grow, so no later step could pick by the DPP again. The rest are the
  unpicked tokens of highest relevance. Exact duplicate rows (LLaVA's pad-to-square patches) reach
  it; a float32 kernel that is only numerically low-rank leaves residual gains near 1e-7 · max L_ii,
  above the floor, and the loop goes on picking by those residuals.
  Without ``relevance_weight`` the least relevant token has ``r = 1e-6 / (max r − min r)``, so
  ``L_ii`` is below the floor whenever that range is at least 0.1: it (and its duplicates) can
  only be kept by the fill.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.errors import InputError
from runtime.selection import check_budget, top_k

NORM_FLOOR = 1e-6  # norms are clipped here before every cosine (method.md is silent; as DivPrune)
RELEVANCE_OFFSET = 1e-6  # added in the min-max normalisation, so the least relevant token keeps r > 0
RANK_SPENT = 1e-10  # a best remaining gain at or below this ends the greedy loop (method.md §7.5)


def relevance(image_clip: np.ndarray, text_clip: np.ndarray, relevance_weight: float | None = None) -> np.ndarray:
    """Relevance ``[N]`` float32 of image rows ``image_clip [N, P]`` to question segments ``text_clip [M, P]``.

    ``r_i = mean_m(−cos(V_i, T_m))``, then ``(r − min r + 1e-6) / (max r − min r)`` (``r = 1`` when
    max = min), then ``exp(α r)`` with ``α = θ / (2(1 − θ))`` if ``relevance_weight θ`` is given
    (θ = 0 gives r = 1: the unweighted kernel).
    Example: V = [[1, 0], [0, 1], [1, 1]], T = [[1, 0]]: −cos = [−1, 0, −0.7071] ->
    r ≈ [1e-6, 1.000001, 0.292894].
    """
    v = _finite_matrix("image_clip", image_clip)
    t = _finite_matrix("text_clip", text_clip)
    if t.shape[0] < 1 or t.shape[1] != v.shape[1]:
        raise ValueError(f"text_clip must be [M >= 1, P={v.shape[1]}] like image_clip, got shape {t.shape}")
    raw = -_mean_cosine(v, t)  # the released code negates the cosine for LLaVA-1.5 (method.md §7.4)
    lo, hi = raw.min(), raw.max()
    r = np.ones_like(raw) if hi == lo else (raw - lo + np.float32(RELEVANCE_OFFSET)) / (hi - lo)
    if relevance_weight is not None:
        theta = float(relevance_weight)
        if not 0.0 <= theta < 1.0:
            raise InputError(f"relevance_weight must lie in [0, 1), got {relevance_weight!r}")
        r = np.exp(np.float32(theta / (2.0 * (1.0 - theta))) * r)
    return r.astype(np.float32)


def conditional_kernel(embeds: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """DPP kernel ``L = diag(r) S diag(r)`` ``[N, N]`` float32, ``S`` = cosine similarity of ``embeds [N, E]``.

    Example: embeds = [[1, 0], [0.6, 0.8], [0, 1]], r = [1, 2, 1] ->
    [[1, 1.2, 0], [1.2, 4, 1.6], [0, 1.6, 1]].
    """
    e = _finite_matrix("embeds", embeds)
    r = np.asarray(relevance, dtype=np.float32)
    if r.shape != (e.shape[0],):
        raise ValueError(f"relevance must be [N={e.shape[0]}] like embeds, got shape {r.shape}")
    unit = _unit_rows(e)
    return (r[:, None] * (unit @ unit.T) * r[None, :]).astype(np.float32)


def greedy_map(kernel: np.ndarray, budget: int) -> np.ndarray:
    """Fast greedy MAP of the DPP ``kernel [N, N]``: up to K int64 picks, in pick order (float64 loop).

    Chen et al. 2018 / method.md §7.5: ``d = diag(L)``; each step ``j = argmax d`` (smaller index on
    ties), ``e = (L[j] − Σ_s c_s[j] c_s) / sqrt(d_j)``, ``d ← d − e²``, ``d_j = −inf``. It stops early,
    returning fewer than K picks, once the best ``d_j <= RANK_SPENT`` (the kernel's rank is spent).
    Example: [[1, 1.2, 0], [1.2, 4, 1.6], [0, 1.6, 1]], K = 3: d = [1, 4, 1] picks 1, then
    d = [0.64, −inf, 0.36] picks 0, then d_2 = 0 stops -> [1, 0].
    """
    lk = _finite_matrix("kernel", kernel).astype(np.float64)
    n = lk.shape[0]
    if lk.shape != (n, n):
        raise ValueError(f"kernel must be square [N, N], got shape {lk.shape}")
    budget = check_budget(budget, n)
    gains = np.diag(lk).copy()
    rows = np.zeros((budget, n))  # c_s, the incremental Cholesky rows
    picks: list[int] = []
    for t in range(budget):
        j = int(np.argmax(gains))  # first maximum: smaller index on ties
        if not gains[j] > RANK_SPENT:
            break
        e = (lk[j] - rows[:t, j] @ rows[:t]) / math.sqrt(gains[j])
        rows[t] = e
        gains -= e * e
        gains[j] = -np.inf
        picks.append(j)
    return np.asarray(picks, dtype=np.int64)


def dpp_indices(kernel: np.ndarray, relevance: np.ndarray, budget: int) -> np.ndarray:
    """K distinct int64 indices, ascending: the greedy MAP picks of ``kernel [N, N]``, filled by ``relevance [N]``.

    When the kernel's rank is spent before K picks, the rest are the unpicked tokens of highest
    relevance (smaller index on ties).
    Example: [[1, 1.2, 0], [1.2, 4, 1.6], [0, 1.6, 1]], r = [1, 2, 1], K = 2 -> [0, 1].
    """
    return fill_by_relevance(greedy_map(kernel, budget), relevance, budget)


def fill_by_relevance(picks: np.ndarray, relevance: np.ndarray, budget: int) -> np.ndarray:
    """``picks [k <= K]`` plus the ``K − k`` unpicked tokens of highest ``relevance [N]`` (smaller
    index on ties): K distinct int64 indices, ascending.

    Example: picks [1], r = [3, 0, 3], K = 2 -> [0, 1].
    """
    r = np.asarray(relevance, dtype=np.float32)
    n = r.shape[0]
    if r.ndim != 1 or not 0 <= picks.shape[0] <= int(budget) <= n:
        raise ValueError(f"need relevance [N], picks [k <= K <= N]; got {r.shape}, {picks.shape}, K={budget}")
    taken = np.zeros(n, dtype=bool)
    taken[picks] = True
    rest = np.flatnonzero(~taken)  # ascending, so the fill's ties still go to the smaller index
    taken[rest[top_k(r[rest], int(budget) - picks.shape[0])]] = True
    return np.flatnonzero(taken).astype(np.int64)


def cdpruner_indices(
    embeds: np.ndarray,
    image_clip: np.ndarray,
    text_clip: np.ndarray,
    budget: int,
    relevance_weight: float | None = None,
) -> np.ndarray:
    """CDPruner's kept rows ``[K]`` int64 ascending, from ``embeds = projector(X) [N, E]``,
    ``image_clip = V [N, P]`` and the question's text embeddings ``text_clip = T [M, P]``.

    Example: orthogonal ``embeds`` with ``relevance_weight=0`` (r = 1, kernel = I): all gains tie
    at 1 -> [0, 1, ..., K−1].
    """
    e = _finite_matrix("embeds", embeds)
    if np.shape(image_clip)[:1] != e.shape[:1]:
        raise ValueError(f"image_clip must have N={e.shape[0]} rows like embeds, got shape {np.shape(image_clip)}")
    r = relevance(image_clip, text_clip, relevance_weight)
    return dpp_indices(conditional_kernel(e, r), r, budget)


def _finite_matrix(name: str, x: np.ndarray) -> np.ndarray:
    """``x`` as a float32 ``[rows >= 1, cols >= 1]`` matrix of finite values; ValueError otherwise."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x [n, d]`` float32 divided by their L2 norms, clipped at ``NORM_FLOOR``."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(NORM_FLOOR))


def _mean_cosine(image_clip: np.ndarray, text_clip: np.ndarray) -> np.ndarray:
    """``mean_m cos(V_i, T_m)`` ``[N]`` float32 of ``image_clip [N, P]`` and ``text_clip [M, P]``."""
    return (_unit_rows(image_clip) @ _unit_rows(text_clip).T).mean(axis=1)
