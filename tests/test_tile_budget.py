"""Budget split over LLaVA-NeXT tiles: ``equal`` and ``perplexity`` (method.md §5 tile_budget)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from export.reference.anyres import equal_budgets, perplexity_budgets
from runtime.anyres import tile_budget
from runtime.anyres.tile_budget import MODES, perplexity_quotas, split_tile_budget
from runtime.errors import InputError
from runtime.selection import top_k

QUOTA_RTOL = 1e-12  # float64 quotas vs exact hand fractions: a few ulp of exp and one division
LN = math.log
N_PATCHES = 576  # one CLIP ViT-L/14-336 tile

# (K, caps, expected) for "equal", each checked by hand against the docstring rule.
EQUAL_CASES = [
    (10, [N_PATCHES] * 5, [2, 2, 2, 2, 2]),
    (11, [N_PATCHES] * 5, [3, 2, 2, 2, 2]),
    (10, [1, N_PATCHES, N_PATCHES], [1, 5, 4]),  # tile 0's cap frees 2 tokens: level 4, +1 to tile 1
    (10, [0, 3, N_PATCHES, N_PATCHES], [0, 3, 4, 3]),  # level 3 (sum 9), +1 to the first open: tile 2
    (6, [1, 5, 5, 5], [1, 2, 2, 1]),  # max-min fair: not [1, 3, 1, 1]
    (7, [2, 3, 2], [2, 3, 2]),  # K = sum(caps)
]
# (K, caps, entropy, quotas, expected) for "perplexity".
PERPLEXITY_CASES = [
    (10, [N_PATCHES] * 2, [LN(576), LN(144)], [8, 2], [8, 2]),  # shares 576 : 144
    (11, [N_PATCHES] * 3, [LN(576), LN(144), LN(144)], [22 / 3, 11 / 6, 11 / 6], [7, 2, 2]),
    (6, [9, 9, 9], [0.0, LN(2), LN(2)], [1.2, 2.4, 2.4], [1, 3, 2]),  # tied fractions -> tile 1
    (11, [4, N_PATCHES, N_PATCHES], [LN(576), LN(144), LN(144)], [4, 3.5, 3.5], [4, 4, 3]),  # capped
    (5, [0, N_PATCHES], [7.0, 1.0], [0, 5], [0, 5]),  # a cap-0 tile gets nothing
    (8, [N_PATCHES] * 2, [1000.0, 1000.0 + LN(3)], [2, 6], [2, 6]),  # exp(1000) would overflow
]


def random_tiles(seed: int) -> tuple[int, list[int], list[float]]:
    """2..9 tiles, caps in 0..60 (some tight), entropies in [0, ln 576], K in 1..sum(caps)."""
    rng = np.random.default_rng(seed)
    t = int(rng.integers(2, 10))
    caps = rng.integers(0, 61, size=t).tolist()
    caps[0] = max(caps[0], 1)
    entropy = rng.uniform(0.0, LN(N_PATCHES), size=t).tolist()
    return int(rng.integers(1, sum(caps) + 1)), caps, entropy


def assert_equal_case(budget: int, caps: list[int], expected: list[int]) -> None:
    got = tile_budget.split_tile_budget(budget, caps)
    assert got.dtype == np.int64 and got.shape == (len(caps),)
    np.testing.assert_array_equal(got, expected, err_msg=f"K={budget}, caps={caps}")


def assert_perplexity_case(budget: int, caps: list[int], entropy: list[float],
                           expected: list[int]) -> None:
    got = tile_budget.split_tile_budget(budget, caps, "perplexity", np.array(entropy))
    assert got.dtype == np.int64 and got.shape == (len(caps),)
    np.testing.assert_array_equal(got, expected, err_msg=f"K={budget}, caps={caps}")


@pytest.mark.parametrize(("budget", "caps", "expected"), EQUAL_CASES)
def test_equal_hand_cases(budget: int, caps: list[int], expected: list[int]) -> None:
    assert_equal_case(budget, caps, expected)
    assert equal_budgets(budget, caps) == expected


@pytest.mark.parametrize(("budget", "caps", "entropy", "quotas", "expected"), PERPLEXITY_CASES)
def test_perplexity_hand_cases(budget: int, caps: list[int], entropy: list[float],
                               quotas: list[float], expected: list[int]) -> None:
    got_quotas = perplexity_quotas(budget, caps, np.array(entropy))
    assert got_quotas.dtype == np.float64 and got_quotas.shape == (len(caps),)
    np.testing.assert_allclose(got_quotas, quotas, rtol=QUOTA_RTOL, atol=0, err_msg=str(entropy))
    assert_perplexity_case(budget, caps, entropy, expected)


@pytest.mark.parametrize("seed", range(40))
def test_both_modes_match_loop_references(seed: int) -> None:
    budget, caps, entropy = random_tiles(seed)
    np.testing.assert_array_equal(split_tile_budget(budget, caps), equal_budgets(budget, caps),
                                  err_msg=f"equal K={budget} caps={caps}")
    np.testing.assert_array_equal(split_tile_budget(budget, caps, "perplexity", np.array(entropy)),
                                  perplexity_budgets(budget, caps, entropy),
                                  err_msg=f"perplexity K={budget} caps={caps} H={entropy}")


def test_negative_control_rounding_down_without_largest_remainder(monkeypatch) -> None:
    """Plain floor of the quotas (no largest remainder) loses tokens: sum(k) != K."""
    monkeypatch.setattr(tile_budget, "_largest_remainder",
                        lambda quotas, total: np.floor(quotas).astype(np.int64))
    budget, caps, entropy, _, expected = PERPLEXITY_CASES[1]
    got = tile_budget.split_tile_budget(budget, caps, "perplexity", np.array(entropy))
    assert int(got.sum()) != budget
    with pytest.raises(AssertionError):
        assert_perplexity_case(budget, caps, entropy, expected)


def test_negative_control_ties_to_larger_index(monkeypatch) -> None:
    """Largest remainder breaking tied fractions by the larger tile index fails the tie case."""

    def top_k_larger_index(scores: np.ndarray, k: int) -> np.ndarray:
        return (len(scores) - 1 - top_k(np.asarray(scores)[::-1], k)).astype(np.int64)

    monkeypatch.setattr(tile_budget, "top_k", top_k_larger_index)
    budget, caps, entropy, _, expected = PERPLEXITY_CASES[2]
    with pytest.raises(AssertionError):
        assert_perplexity_case(budget, caps, entropy, expected)


def test_negative_control_ignoring_caps(monkeypatch) -> None:
    """floor(K/T) (+1 for the first K mod T) and plain proportional quotas, both without caps,
    give a tile more than its candidates: the capped hand cases fail."""
    monkeypatch.setattr(tile_budget, "_equal_split", lambda budget, caps: np.array(
        [budget // len(caps) + (t < budget % len(caps)) for t in range(len(caps))], np.int64))
    monkeypatch.setattr(tile_budget, "_capped_quotas", lambda budget, caps, h: (
        budget * np.exp(h - h.max()) / np.exp(h - h.max()).sum()))
    for budget, caps, expected in EQUAL_CASES[2:5]:
        assert np.any(tile_budget.split_tile_budget(budget, caps) > np.array(caps))
        with pytest.raises(AssertionError):
            assert_equal_case(budget, caps, expected)
    budget, caps, entropy, _, expected = PERPLEXITY_CASES[3]
    with pytest.raises(AssertionError):
        assert_perplexity_case(budget, caps, entropy, expected)


@st.composite
def tiles(draw: st.DrawFn, max_cap: int = 40) -> tuple[int, np.ndarray, np.ndarray]:
    """(K, [T] caps with sum >= 1, [T] entropies, wide enough to underflow exp without the shift)."""
    t = draw(st.integers(1, 8))
    caps = draw(st.lists(st.integers(0, max_cap), min_size=t, max_size=t).filter(lambda c: sum(c)))
    entropy = draw(st.lists(st.floats(-1000, 1000), min_size=t, max_size=t))
    return draw(st.integers(1, sum(caps))), np.array(caps), np.array(entropy)


@settings(max_examples=150, deadline=None)
@given(case=tiles(), mode=st.sampled_from(MODES))
def test_exact_budget_within_caps(case: tuple[int, np.ndarray, np.ndarray], mode: str) -> None:
    budget, caps, entropy = case
    got = split_tile_budget(budget, caps, mode, entropy)
    assert got.dtype == np.int64 and got.shape == caps.shape
    assert int(got.sum()) == budget
    assert np.all(got >= 0) and np.all(got <= caps), (got, caps)


@settings(max_examples=150, deadline=None)
@given(case=tiles(), h=st.floats(-1000, 1000))
def test_equal_entropies_make_perplexity_equal(case: tuple[int, np.ndarray, np.ndarray],
                                               h: float) -> None:
    budget, caps, _ = case
    same = np.full(caps.shape, h)
    np.testing.assert_array_equal(split_tile_budget(budget, caps, "perplexity", same),
                                  split_tile_budget(budget, caps, "equal"))


@settings(max_examples=150, deadline=None)
@given(t=st.integers(1, 8), data=st.data())
def test_raising_one_entropy_never_lowers_that_share(t: int, data: st.DataObject) -> None:
    """Without binding caps (every cap >= K), a busier tile never loses tokens or quota."""
    entropy = np.array(data.draw(st.lists(st.floats(0, LN(N_PATCHES)), min_size=t, max_size=t)))
    budget = data.draw(st.integers(1, 300))
    tile = data.draw(st.integers(0, t - 1))
    raised = entropy.copy()
    raised[tile] += data.draw(st.floats(1e-3, 5.0))
    caps = np.full(t, budget)
    before = split_tile_budget(budget, caps, "perplexity", entropy)
    after = split_tile_budget(budget, caps, "perplexity", raised)
    assert after[tile] >= before[tile], (entropy.tolist(), raised.tolist(), before, after)
    assert perplexity_quotas(budget, caps, raised)[tile] >= perplexity_quotas(budget, caps, entropy)[tile]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, [3, 3]), r"1 <= K <= sum of tile caps=6, got -1"),
        ((0, [3, 3]), r"1 <= K <= sum of tile caps=6, got 0"),
        ((7, [3, 3]), r"1 <= K <= sum of tile caps=6, got 7"),
        ((2.5, [3, 3]), r"K must be an integer, got 2\.5"),
        ((True, [3, 3]), r"K must be an integer, got True"),
        ((2, [3, -1, 4]), r"caps must be >= 0, got \[3, -1, 4\]"),
        ((2, [3.0, 4.0]), r"caps must be integers, got \[3\.0, 4\.0\]"),
        ((2, []), r"non-empty \[T\].*\(0,\)"),
        ((2, [[3, 3]]), r"non-empty \[T\].*\(1, 2\)"),
        ((2, [3, 3], "perplexity"), r"'perplexity' needs the tiles' entropy, got None"),
        ((2, [3, 3], "perplexity", [1.0]), r"entropy must be \[T=2\] like caps, got shape \(1,\)"),
        ((2, [3, 3], "equal", [1.0, 2.0, 3.0]), r"\[T=2\].*\(3,\)"),
        ((2, [3, 3], "perplexity", [1.0, float("nan")]), r"entropy must be finite, got \[1\.0, nan\]"),
        ((2, [3, 3], "perplexity", [float("inf"), 1.0]), r"entropy must be finite, got \[inf, 1\.0\]"),
        ((2, [3, 3], "greedy"), r"unknown tile_budget mode 'greedy'; choose one of: equal, perplexity"),
    ],
)
def test_rejects_bad_input_in_one_line(args: tuple, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        split_tile_budget(*args)
    assert "\n" not in str(info.value)
