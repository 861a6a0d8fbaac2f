"""DivPrune (method.md §3): max-min diversity on the projected embeddings, no merge."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.selection import check_budget
from runtime.strategies.registry import PROJECTOR, register
from runtime.types import PruneInputs, Selection

NORM_FLOOR = 1e-6  # embedding norms are clipped here before the cosine (as in method.md §1)


@dataclass(frozen=True)
class DivPruneOptions:
    """DivPrune has no options."""


def cosine_distance(embeds: np.ndarray) -> np.ndarray:
    """Pairwise ``1 − cos`` of ``embeds [N, E]``: ``[N, N]`` float64 (norms clipped at 1e-6).

    Example: [[1, 0], [0, 1], [-1, 0]] -> [[0, 1, 2], [1, 0, 1], [2, 1, 0]].
    """
    e = np.asarray(embeds, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeds must be [N, E], got shape {e.shape}")
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), NORM_FLOOR)
    return 1.0 - unit @ unit.T


def divprune_indices(dist: np.ndarray, budget: int) -> np.ndarray:
    """Max-min diverse subset ``[K]`` int64 (ascending) of a distance matrix ``dist [N, N]``.

    First pick: argmax_i min_{j != i} dist[i, j] (N = 1: token 0); then repeatedly the unpicked
    token farthest from the picked set (max of its min distance). Ties (exact floating-point
    equality): smaller index.
    Each token is picked at most once (method.md is silent): picked tokens are masked out of the
    argmax, so the result is always K distinct indices. The released loop takes the argmax over
    all tokens, where a picked token scores its self-distance 1 − cos(x, x), which is round-off
    (±1e-7), not 0; once every unpicked token duplicates a picked one (distance 0 — LLaVA's
    pad-to-square fills whole regions with identical mean-colour patches), it can pick a token
    again, and the LLM would get one row twice and fewer than K distinct tokens.
    Example: unit vectors at 0°, 10°, 180°, K = 2: nearest-other distances 0.015, 0.015, 1.985
    pick 2 first, then 0 (distance 2 > 1.985) -> [0, 2].
    """
    n = dist.shape[0]
    if dist.shape != (n, n) or not 1 <= budget <= n:
        raise ValueError(f"need dist [N, N] and 1 <= K <= N, got shape {dist.shape}, K={budget}")
    off_diag = dist.astype(np.float64, copy=True)
    np.fill_diagonal(off_diag, np.inf)
    first = int(np.argmax(off_diag.min(axis=1))) if n > 1 else 0
    picked = np.zeros(n, dtype=bool)
    picked[first] = True
    nearest = dist[first].astype(np.float64, copy=True)  # min distance to the picked set
    order = [first]
    for _ in range(budget - 1):
        candidate = np.where(picked, -np.inf, nearest)
        nxt = int(np.argmax(candidate))
        picked[nxt] = True
        order.append(nxt)
        nearest = np.minimum(nearest, dist[nxt])
    return np.sort(np.asarray(order, dtype=np.int64))


@register("divprune", DivPruneOptions, needs=(PROJECTOR,))
def divprune(inputs: PruneInputs, budget: int, options: DivPruneOptions) -> Selection:
    """Strategy ``divprune``: select on E = project(features), return the raw kept features.

    The pipeline projects ``tokens`` again; the projector is row-wise (an MLP), so those rows
    equal E[kept] and the LLM sees exactly the embeddings the selection was made on.
    """
    features = inputs.encoded.features
    budget = check_budget(budget, features.shape[0])
    kept = divprune_indices(cosine_distance(inputs.project(features)), budget)
    ones = np.ones(kept.shape[0], np.int64)
    return Selection(kept=kept, tokens=features[kept].astype(np.float32), counts=ones, report={})
