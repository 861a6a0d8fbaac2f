"""Ranking, budget split, layer choice and dual-layer selection (method.md §1.3-5).

Layer numbers are 1-based (layer ``l`` is row ``l - 1`` of the ``[f, ...]`` score arrays). Every
ranking breaks ties by the smaller index; selected indices come back int64, sorted ascending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

from runtime.errors import InputError

RULES = ("max-min", "max-max", "min-min", "min-max", "fixed")  # shallow rule - deep rule


@dataclass(frozen=True)
class BudgetSplit:
    """How the budget K is shared between the shallow and the deep layer."""

    k_s: int  # tokens picked by the shallow layer's scores
    k_d: int  # tokens picked by the deep layer's scores (taken first)

    @property
    def total(self) -> int:
        return self.k_s + self.k_d


@dataclass(frozen=True)
class LayerChoice:
    """The two encoder layers whose [CLS] attention ranks the patches (1-based)."""

    shallow: int  # l_s
    deep: int  # l_d


def check_budget(budget: int, num_patches: int) -> int:
    """Return ``budget`` as an int after checking ``1 <= K <= N``; InputError otherwise."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise InputError(f"token budget K must be an integer, got {budget!r}")
    if not 1 <= budget <= num_patches:
        raise InputError(f"token budget K must satisfy 1 <= K <= N={num_patches}, got {budget}")
    return int(budget)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[N] scores -> [k] int64 indices of the k largest, best first, ties to the smaller index.

    Example: ``top_k([0.1, 0.3, 0.3, 0.2], 3)`` -> ``[1, 2, 3]``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be [N], got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not 0 <= k <= s.shape[0]:
        raise ValueError(f"k must satisfy 0 <= k <= N={s.shape[0]}, got {k}")
    return np.argsort(-s, kind="stable")[:k].astype(np.int64)


def split_budget(budget: int, p_shallow: float) -> BudgetSplit:
    """K and p_s -> k_s = floor(p_s K + 0.5), k_d = K - k_s.

    Example: ``split_budget(64, 0.4)`` -> ``BudgetSplit(k_s=26, k_d=38)``.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise InputError(f"token budget K must be an integer >= 1, got {budget!r}")
    if isinstance(p_shallow, bool) or not isinstance(p_shallow, Real) or not 0 <= p_shallow <= 1:
        raise InputError(f"p_shallow must be a number in [0, 1], got {p_shallow!r}")
    k_s = math.floor(p_shallow * budget + 0.5)
    return BudgetSplit(k_s=int(k_s), k_d=int(budget) - int(k_s))


def choose_layers(
    entropy: np.ndarray,
    rule: str = "max-min",
    shallow: tuple[int, int] = (6, 8),
    deep: tuple[int, int] = (20, 21),
    fixed: tuple[int, int] | None = None,
) -> LayerChoice:
    """[f] entropies H(1..f) -> (l_s, l_d) by ``rule``; ranges are inclusive and 1-based.

    ``max-min`` takes argmax H over ``shallow`` and argmin H over ``deep``; the other rules swap
    max/min; ``fixed`` returns ``fixed`` (the ranges are then unused and not checked). Ties go to
    the smaller layer. Example: H = [0.1, 0.9, 0.9, 0.5, 0.2], shallow (2, 3), deep (4, 5) ->
    ``LayerChoice(shallow=2, deep=5)``.
    """
    h = np.asarray(entropy, dtype=np.float64)
    if h.ndim != 1 or h.shape[0] == 0:
        raise ValueError(f"entropy must be a non-empty [f] array, got shape {h.shape}")
    f = h.shape[0]
    if rule not in RULES:
        raise InputError(f"unknown layer rule {rule!r}; choose one of: {', '.join(RULES)}")
    if rule == "fixed":
        if fixed is None:
            raise InputError("rule 'fixed' needs fixed=(l_s, l_d)")
        l_s, l_d = _check_layers("fixed", fixed, f, pair=True)
        return LayerChoice(shallow=l_s, deep=l_d)
    if fixed is not None:
        raise InputError(f"fixed layers {tuple(fixed)} need rule 'fixed', not {rule!r}")
    shallow_rule, deep_rule = rule.split("-")
    return LayerChoice(
        shallow=_pick(h, _check_layers("shallow", shallow, f), shallow_rule),
        deep=_pick(h, _check_layers("deep", deep, f), deep_rule),
    )


def select_dual(s_shallow: np.ndarray, s_deep: np.ndarray, k_s: int, k_d: int) -> np.ndarray:
    """Top k_d patches by ``s_deep``, then top k_s by ``s_shallow`` among the rest -> [K] sorted.

    Example: s_deep = [0.4, 0.3, 0.2, 0.1], s_shallow = [0.9, 0.0, 0.5, 0.6], k_s = 1, k_d = 1
    -> deep takes 0, shallow takes 3 -> ``[0, 3]``.
    """
    shallow_scores = np.asarray(s_shallow, dtype=np.float64)
    deep_scores = np.asarray(s_deep, dtype=np.float64)
    if shallow_scores.ndim != 1 or shallow_scores.shape != deep_scores.shape:
        raise ValueError(
            f"s_shallow and s_deep must both be [N], "
            f"got {shallow_scores.shape} and {deep_scores.shape}"
        )
    if min(k_s, k_d) < 0:
        raise InputError(f"k_s and k_d must be >= 0, got k_s={k_s}, k_d={k_d}")
    check_budget(int(k_s) + int(k_d), shallow_scores.shape[0])
    taken = np.zeros(shallow_scores.shape[0], dtype=bool)
    taken[top_k(deep_scores, k_d)] = True
    rest = np.flatnonzero(~taken)  # ascending, so ties among the rest still go to the smaller index
    taken[rest[top_k(shallow_scores[rest], k_s)]] = True
    return np.flatnonzero(taken).astype(np.int64)


def _check_layers(
    name: str, layers: tuple[int, int], f: int, pair: bool = False
) -> tuple[int, int]:
    """Validate a (lo, hi) range or an (l_s, l_d) pair against layers 1..f (InputError)."""
    what = "layers (l_s, l_d)" if pair else "layer range (lo, hi)"
    try:
        a, b = (int(v) for v in layers)
        ok = all(float(v) == int(v) for v in layers)
    except (TypeError, ValueError):
        raise InputError(f"{name} {what} must be two integers, got {layers!r}") from None
    if not ok or not (1 <= a <= f and 1 <= b <= f) or (not pair and a > b):
        order = "" if pair else " and lo <= hi"
        raise InputError(
            f"{name} {what} must lie within 1..{f} (layers are numbered from 1){order}, "
            f"got {tuple(layers)}"
        )
    return a, b


def _pick(h: np.ndarray, layers: tuple[int, int], how: str) -> int:
    lo, hi = layers
    window = h[lo - 1 : hi]
    offset = int(np.argmax(window) if how == "max" else np.argmin(window))  # first = smaller layer
    return lo + offset
