"""Ranking, budget split, layer choice and dual selection (method.md §1.3-5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime import selection
from runtime.errors import InputError
from runtime.selection import (
    RULES,
    BudgetSplit,
    LayerChoice,
    check_budget,
    choose_layers,
    select_dual,
    split_budget,
    top_k,
)
from tests.strategy_fakes import ModuleWith, NumpyWith

# Layers 1..10. shallow (2, 4): H = 0.9, 0.9, 0.1; deep (6, 9): H = 0.7, 0.2, 0.2, 0.8.
HAND_H = np.array([0.5, 0.9, 0.9, 0.1, 0.3, 0.7, 0.2, 0.2, 0.8, 0.4])
HAND_RANGES = {"shallow": (2, 4), "deep": (6, 9)}


def loop_top(scores: np.ndarray, k: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    candidates = [i for i in range(len(scores)) if i not in exclude]
    return sorted(candidates, key=lambda i: (-float(scores[i]), i))[:k]


def loop_select_dual(s_shallow: np.ndarray, s_deep: np.ndarray, k_s: int, k_d: int) -> list[int]:
    deep = loop_top(s_deep, k_d)
    shallow = loop_top(s_shallow, k_s, frozenset(deep))
    return sorted(deep + shallow)


def tied_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scores on a coarse grid, so that many ties must be broken by the smaller index."""
    return rng.integers(0, 12, size=n) / 12.0


def test_top_k_hand_case_breaks_ties_by_smaller_index() -> None:
    got = top_k(np.array([0.1, 0.3, 0.3, 0.2]), 3)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [1, 2, 3])
    np.testing.assert_array_equal(top_k(np.array([0.1, 0.3]), 0), np.zeros(0, dtype=np.int64))


@pytest.mark.parametrize("seed", range(5))
def test_top_k_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = tied_scores(rng, 200)
    for k in (1, 17, 200):
        np.testing.assert_array_equal(top_k(scores, k), loop_top(scores, k), err_msg=f"k={k}")


@pytest.mark.parametrize("seed", range(5))
def test_top_k_negative_control_unstable_sort(seed: int, monkeypatch) -> None:
    """top_k without kind="stable" (numpy's default quicksort) breaks ties arbitrarily: the same check fails."""
    scores = tied_scores(np.random.default_rng(seed), 200)
    monkeypatch.setattr(selection, "np", NumpyWith(argsort=lambda a, kind=None: np.argsort(a, kind="quicksort")))
    assert not np.array_equal(selection.top_k(scores, 200), loop_top(scores, 200))


def test_top_k_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"0 <= k <= N=2, got 3"):
        top_k(np.zeros(2), 3)
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([0.0, np.nan]), 1)
    with pytest.raises(ValueError, match=r"\[N\].*\(2, 2\)"):
        top_k(np.zeros((2, 2)), 1)


HAND_SPLITS = [(64, 0.4, 26, 38), (128, 0.4, 51, 77), (192, 0.4, 77, 115), (1, 0.4, 0, 1),
               (5, 0.5, 3, 2), (64, 0.0, 0, 64), (64, 1.0, 64, 0), (576, 0.4, 230, 346)]


def assert_split(budget: int, p_shallow: float, k_s: int, k_d: int) -> None:
    split = selection.split_budget(budget, p_shallow)  # looked up on the module: a patched one runs
    assert split == BudgetSplit(k_s=k_s, k_d=k_d) and split.total == budget


@pytest.mark.parametrize(("budget", "p_shallow", "k_s", "k_d"), HAND_SPLITS)
def test_split_budget_hand_cases(budget: int, p_shallow: float, k_s: int, k_d: int) -> None:
    assert_split(budget, p_shallow, k_s, k_d)


@pytest.mark.parametrize(("budget", "p_shallow", "k_s", "k_d"),
                         [case for case in HAND_SPLITS if case[:2] in {(64, 0.4), (192, 0.4), (5, 0.5)}])
def test_split_budget_negative_control_truncating(budget: int, p_shallow: float, k_s: int, k_d: int,
                                                  monkeypatch) -> None:
    """split_budget truncating p_s K (floor without the + 0.5, as ``int(p_s * K)`` does) fails the
    hand cases whose fractional part is >= 0.5: its own floor is patched to give floor(x - 0.5)."""
    monkeypatch.setattr(selection, "math", ModuleWith(math, floor=lambda x: math.floor(x - 0.5)))
    with pytest.raises(AssertionError):
        assert_split(budget, p_shallow, k_s, k_d)


@pytest.mark.parametrize(("budget", "p_shallow"), [(0, 0.4), (-3, 0.4), (2.5, 0.4), (True, 0.4),
                                                   (64, -0.1), (64, 1.5), (64, float("nan"))])
def test_split_budget_rejects_bad_values(budget: object, p_shallow: float) -> None:
    with pytest.raises(InputError):
        split_budget(budget, p_shallow)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("max-min", (2, 7)), ("max-max", (2, 9)), ("min-min", (4, 7)), ("min-max", (4, 9))],
)
def test_choose_layers_every_rule_hand_computed(rule: str, expected: tuple[int, int]) -> None:
    choice = choose_layers(HAND_H, rule, **HAND_RANGES)
    assert choice == LayerChoice(shallow=expected[0], deep=expected[1])


def test_choose_layers_fixed_rule() -> None:
    assert choose_layers(HAND_H, "fixed", fixed=(1, 10)) == LayerChoice(shallow=1, deep=10)
    # The unused ranges are not checked under "fixed" (defaults exceed f = 10 here).
    assert choose_layers(HAND_H, "fixed", fixed=(6, 9)) == LayerChoice(shallow=6, deep=9)
    assert set(RULES) == {"max-min", "max-max", "min-min", "min-max", "fixed"}


def test_choose_layers_negative_control_off_by_one_layer(monkeypatch) -> None:
    """choose_layers reading H(l + 1) as H(l) (0-based window) fails the hand-computed case."""

    def zero_based_pick(h: np.ndarray, layers: tuple[int, int], how: str) -> int:
        lo, hi = layers
        window = h[lo : hi + 1]
        return lo + int(np.argmax(window) if how == "max" else np.argmin(window))

    monkeypatch.setattr(selection, "_pick", zero_based_pick)
    assert choose_layers(HAND_H, "max-min", **HAND_RANGES) != LayerChoice(shallow=2, deep=7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shallow": (0, 2)}, r"shallow layer range \(lo, hi\) must lie within 1\.\.10.*\(0, 2\)"),
        ({"deep": (9, 11)}, r"deep layer range .* within 1\.\.10"),
        ({"deep": (8, 7)}, r"lo <= hi, got \(8, 7\)"),
        ({"shallow": (1.5, 2)}, r"within 1\.\.10"),
        ({"shallow": (1,)}, "two integers"),
        ({"rule": "fixed"}, r"needs fixed=\(l_s, l_d\)"),
        ({"rule": "fixed", "fixed": (0, 5)}, r"fixed layers \(l_s, l_d\) must lie within 1\.\.10"),
        ({"fixed": (3, 5)}, "need rule 'fixed'"),
        ({"rule": "max-mean"}, "unknown layer rule 'max-mean'; choose one of: max-min, max-max"),
    ],
)
def test_choose_layers_validation_is_one_line(kwargs: dict, message: str) -> None:
    args = {**HAND_RANGES, **kwargs}
    with pytest.raises(InputError, match=message) as info:
        choose_layers(HAND_H, **args)
    assert "\n" not in str(info.value)


def test_select_dual_hand_case() -> None:
    s_deep = np.array([0.1, 0.5, 0.2, 0.5, 0.0, 0.3])
    s_shallow = np.array([0.9, 0.8, 0.1, 0.7, 0.6, 0.2])
    got = select_dual(s_shallow, s_deep, k_s=2, k_d=2)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 1, 3, 4])


def assert_select_dual_matches_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 144
    s_shallow, s_deep = tied_scores(rng, n), tied_scores(rng, n)
    for budget in (1, 16, 64, n):
        split = split_budget(budget, 0.4)
        got = select_dual(s_shallow, s_deep, split.k_s, split.k_d)
        expected = loop_select_dual(s_shallow, s_deep, split.k_s, split.k_d)
        np.testing.assert_array_equal(got, expected, err_msg=f"K={budget}")


@pytest.mark.parametrize("seed", range(6))
def test_select_dual_matches_loop_reference(seed: int) -> None:
    assert_select_dual_matches_loop(seed)


@pytest.mark.parametrize("seed", range(6))
def test_select_dual_negative_control_unstable_ranking(seed: int, monkeypatch) -> None:
    """select_dual over a ranking without kind="stable" (tied scores ordered arbitrarily) fails the
    same loop comparison: the tied grid scores make the tie rule decide many picks."""
    monkeypatch.setattr(selection, "np", NumpyWith(argsort=lambda a, kind=None: np.argsort(a, kind="quicksort")))
    with pytest.raises(AssertionError):
        assert_select_dual_matches_loop(seed)


def test_select_dual_rejects_bad_budgets() -> None:
    scores = np.linspace(0, 1, 8)
    with pytest.raises(InputError, match=r"1 <= K <= N=8, got 9"):
        select_dual(scores, scores, 4, 5)
    with pytest.raises(InputError, match=r"1 <= K <= N=8, got 0"):
        select_dual(scores, scores, 0, 0)
    with pytest.raises(InputError, match=">= 0"):
        select_dual(scores, scores, -1, 3)
    with pytest.raises(ValueError, match=r"both be \[N\]"):
        select_dual(scores, scores[:4], 1, 1)
    with pytest.raises(InputError, match="integer"):
        check_budget(2.0, 8)  # type: ignore[arg-type]


def test_selection_assignment_is_checked() -> None:
    """A merging Selection must say where every patch went, consistently with kept and counts."""
    from runtime.types import Selection

    kept, tokens = np.array([0, 2]), np.zeros((2, 3), np.float32)
    good = Selection(kept, tokens, np.array([2, 1]), assignment=np.array([0, 0, 1, -1]))
    np.testing.assert_array_equal(good.assignment_for(4), [0, 0, 1, -1])
    np.testing.assert_array_equal(Selection(kept, tokens, np.array([1, 1])).assignment_for(4), [0, -1, 1, -1])
    with pytest.raises(ValueError, match="must give their assignment"):
        Selection(kept, tokens, np.array([2, 1]))
    with pytest.raises(ValueError, match="disagrees with counts"):
        Selection(kept, tokens, np.array([2, 1]), assignment=np.array([0, 1, 1, -1]))
    with pytest.raises(ValueError, match="its own position"):
        Selection(kept, tokens, np.array([2, 1]), assignment=np.array([1, 0, 0, -1]))
