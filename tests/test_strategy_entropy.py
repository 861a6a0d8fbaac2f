"""Strategies ``entropy`` (method.md §1) and ``none``/``uniform``/``fastervlm`` (§3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from runtime.errors import InputError
from runtime.strategies import baselines
from runtime.strategies.baselines import uniform_indices
from runtime.strategies.entropy import EntropyOptions
from runtime.strategies.registry import available, get_strategy
from runtime.types import EncoderOutput, PruneInputs
from tests.strategy_fakes import NumpyWith
from tests.test_merging import MERGE_ATOL, MERGE_RTOL, loop_merge
from tests.test_scoring import EXACT, loop_distributions, loop_entropy, loop_kl, random_attention
from tests.test_selection import loop_select_dual, loop_top

# Tiny case, f = 5, N = 8: per-layer patch distributions (each head puts 0.5 on [CLS]).
HAND_S = np.array([
    [0.05, 0.20, 0.10, 0.15, 0.10, 0.15, 0.10, 0.15],  # layer 1: flat -> l_s in (1, 2)
    [0.65, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],  # layer 2: peaked
    [0.125] * 8,  # layer 3: outside both ranges
    [0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.40, 0.48],  # layer 4: peaked -> l_d in (4, 5)
    [0.20, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.20],  # layer 5
])
# Kept (by hand): deep S^4 takes 7, 6; shallow S^1 then takes 1 and 3 (0.15 tie with 5 and 7).
HAND_X = np.array([[2, 0.2], [1, 0], [0.1, 3], [0, 1], [-0.5, 0.05], [0.3, 0.2], [-1, 0], [0, -1]])
HAND_OPTIONS = {"shallow": (1, 2), "deep": (4, 5), "p_shallow": 0.5}


def make_inputs(cls_attn: np.ndarray, features: np.ndarray) -> PruneInputs:
    n, d = features.shape
    keys = np.zeros((n, max(1, d // 2)), dtype=np.float32)
    encoded = EncoderOutput(features=features.astype(np.float32),
                            cls_attn=cls_attn.astype(np.float32), keys=keys)
    return PruneInputs(encoded=encoded, project=lambda x: x)


def hand_inputs() -> PruneInputs:
    return make_inputs(np.stack([HAND_S / 2, HAND_S / 2], axis=1), HAND_X)


def run(name: str, inputs: PruneInputs, budget: int, **options: object):
    strategy = get_strategy(name)
    return strategy.run(inputs, budget, strategy.make_options(**options))


def test_registered_names() -> None:
    assert {"entropy", "none", "uniform", "fastervlm"} <= set(available())
    assert not get_strategy("entropy").needs_probe


def test_entropy_hand_case() -> None:
    sel = run("entropy", hand_inputs(), 4, **HAND_OPTIONS)
    assert sel.kept.dtype == np.int64 and sel.counts.dtype == np.int64
    assert sel.tokens.dtype == np.float32 and sel.tokens.shape == (4, 2)
    np.testing.assert_array_equal(sel.kept, [1, 3, 6, 7])
    np.testing.assert_array_equal(sel.counts, [3, 2, 2, 1])
    expected = [[(1 + 2 + 0.3) / 3, (0 + 0.2 + 0.2) / 3], [0.05, 2.0], [-0.75, 0.025], [0, -1]]
    np.testing.assert_allclose(sel.tokens, expected, rtol=MERGE_RTOL, atol=MERGE_ATOL,
                               err_msg="hand-merged tokens")
    report = sel.report
    assert report["layers"] == {"shallow": 1, "deep": 4}
    assert (report["k_s"], report["k_d"]) == (2, 2)
    h = [-sum(p * math.log(p) for p in row) for row in HAND_S.tolist()]
    np.testing.assert_allclose(report["entropy"], h, rtol=1e-6, err_msg="H(1..f)")  # float32 attn
    assert len(report["kl"]) == 4
    json.dumps(report)  # JSON-serialisable


def test_entropy_hand_case_negative_controls() -> None:
    reference = run("entropy", hand_inputs(), 4, **HAND_OPTIONS)
    swapped = run("entropy", hand_inputs(), 4, rule="min-max", **HAND_OPTIONS)
    assert swapped.report["layers"] == {"shallow": 2, "deep": 5}
    assert not np.array_equal(swapped.kept, reference.kept)
    unmerged = run("entropy", hand_inputs(), 4, merge="none", **HAND_OPTIONS)
    np.testing.assert_array_equal(unmerged.kept, reference.kept)
    np.testing.assert_array_equal(unmerged.counts, [1, 1, 1, 1])
    assert not np.allclose(unmerged.tokens, reference.tokens, rtol=MERGE_RTOL, atol=MERGE_ATOL)


@pytest.mark.parametrize(("seed", "budget"), [(0, 32), (1, 64), (2, 1), (3, 144)])
def test_entropy_matches_loop_reference(seed: int, budget: int) -> None:
    assert_entropy_matches_loop(seed, budget)


@pytest.mark.parametrize(("seed", "budget"), [(0, 32), (1, 64)])
def test_entropy_negative_control_shallow_layer_first(seed: int, budget: int, monkeypatch) -> None:
    """The strategy calling select_dual with the layers swapped (the shallow layer takes its k_s
    first, the deep one picks among the rest) fails the same loop comparison."""
    from runtime.selection import select_dual
    from runtime.strategies import entropy

    def shallow_first(s_shallow: np.ndarray, s_deep: np.ndarray, k_s: int, k_d: int) -> np.ndarray:
        return select_dual(s_deep, s_shallow, k_d, k_s)  # the real select_dual, called the wrong way round

    monkeypatch.setattr(entropy, "select_dual", shallow_first)
    with pytest.raises(AssertionError, match="Arrays are not equal"):  # the kept indices differ
        assert_entropy_matches_loop(seed, budget)


def assert_entropy_matches_loop(seed: int, budget: int) -> None:
    f, n, d = 23, 144, 16
    attn = random_attention(seed, (f, 4, n))
    features = np.random.default_rng(100 + seed).normal(size=(n, d)).astype(np.float32)
    sel = run("entropy", make_inputs(attn, features), budget)

    dists = loop_distributions(attn)
    h = loop_entropy(dists)
    l_s = max(range(6, 9), key=lambda layer: (h[layer - 1], -layer))  # ties -> smaller layer
    l_d = min(range(20, 22), key=lambda layer: (h[layer - 1], layer))
    k_s = math.floor(0.4 * budget + 0.5)
    kept = loop_select_dual(np.array(dists[l_s - 1]), np.array(dists[l_d - 1]), k_s, budget - k_s)
    tokens, counts = loop_merge(features, kept)

    assert sel.report["layers"] == {"shallow": l_s, "deep": l_d}
    assert (sel.report["k_s"], sel.report["k_d"]) == (k_s, budget - k_s)
    np.testing.assert_array_equal(sel.kept, kept)
    np.testing.assert_array_equal(sel.counts, counts)
    np.testing.assert_allclose(sel.tokens, tokens, rtol=MERGE_RTOL, atol=MERGE_ATOL)
    np.testing.assert_allclose(sel.report["entropy"], h, rtol=EXACT)
    np.testing.assert_allclose(sel.report["kl"], loop_kl(dists), rtol=1e-10, atol=EXACT)


def test_entropy_rejects_budget_outside_1_to_n() -> None:
    for budget in (0, 9):
        with pytest.raises(InputError, match="K"):
            run("entropy", hand_inputs(), budget, **HAND_OPTIONS)
    with pytest.raises(InputError, match=r"within 1\.\.5"):
        run("entropy", hand_inputs(), 4)  # default ranges (6, 8), (20, 21) exceed f = 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rule": "maxmin"}, "rule must be one of"),
        ({"merge": "max"}, "merge must be one of"),
        ({"p_shallow": 1.2}, r"\[0, 1\]"),
        ({"p_shallow": "0.4"}, "number"),
        ({"shallow": (0, 2)}, "numbered from 1"),
        ({"deep": (21, 20)}, "lo <= hi"),
        ({"deep": (20.0, 21)}, "integers"),
        ({"shallow": (6,)}, "two layer numbers"),
        ({"rule": "fixed"}, "required with rule 'fixed'"),
        ({"fixed": (6, 20)}, "required with rule 'fixed'"),
        ({"rule": "fixed", "fixed": (0, 20)}, "numbered from 1"),
    ],
)
def test_entropy_options_validation(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EntropyOptions(**options)
    with pytest.raises(InputError, match="strategy 'entropy'"):
        get_strategy("entropy").make_options(**options)


def test_entropy_options_coerce_sequences_to_tuples() -> None:
    options = get_strategy("entropy").make_options(shallow=[2, 3], deep=np.array([4, 5]))
    assert options.shallow == (2, 3) and options.deep == (4, 5)
    assert type(options.deep[0]) is int
    fixed = EntropyOptions(rule="fixed", fixed=[6, 20])
    assert fixed.fixed == (6, 20)
    assert EntropyOptions() == EntropyOptions(
        rule="max-min", shallow=(6, 8), deep=(20, 21), p_shallow=0.4, merge="mean", fixed=None)


def test_none_keeps_everything_and_ignores_the_budget() -> None:
    inputs = hand_inputs()
    sel = run("none", inputs, 3)
    np.testing.assert_array_equal(sel.kept, np.arange(8))
    np.testing.assert_array_equal(sel.tokens, inputs.encoded.features)
    np.testing.assert_array_equal(sel.counts, np.ones(8))
    assert sel.report == {}  # the pipeline adds the H(l)/KL(l) curves; `none` never reads the [CLS] rows


def test_uniform_hand_case_and_float_formula() -> None:
    np.testing.assert_array_equal(uniform_indices(10, 4), [1, 3, 6, 8])
    n = 576
    for k in range(1, n + 1):
        expected = [math.floor((i + 0.5) * n / k) for i in range(k)]
        np.testing.assert_array_equal(uniform_indices(n, k), expected, err_msg=f"K={k}")
    sel = run("uniform", hand_inputs(), 4)
    np.testing.assert_array_equal(sel.kept, [1, 3, 5, 7])
    np.testing.assert_array_equal(sel.tokens, HAND_X[[1, 3, 5, 7]].astype(np.float32))


def test_uniform_negative_control_off_by_half(monkeypatch) -> None:
    """The strategy with floor(i N / K) (no + 0.5) inside fails the hand case above."""
    monkeypatch.setattr(baselines, "uniform_indices", lambda n, k: np.arange(k, dtype=np.int64) * n // k)
    assert run("uniform", hand_inputs(), 4).kept.tolist() != [1, 3, 5, 7]


@pytest.mark.parametrize("seed", range(3))
def test_fastervlm_matches_loop_reference(seed: int) -> None:
    attn = random_attention(seed, (23, 4, 144))
    features = np.random.default_rng(seed).normal(size=(144, 8)).astype(np.float32)
    sel = run("fastervlm", make_inputs(attn, features), 32)
    dists = loop_distributions(attn)
    expected = sorted(loop_top(np.array(dists[-1]), 32))
    np.testing.assert_array_equal(sel.kept, expected)
    np.testing.assert_array_equal(sel.tokens, features[expected])
    np.testing.assert_array_equal(sel.counts, np.ones(32))


@pytest.mark.parametrize("seed", range(3))
def test_fastervlm_negative_controls(seed: int, monkeypatch) -> None:
    """An encoder one block short (S^{f-1} as the last row) and a strategy that forgets to sort
    its indices both fail the loop-reference check above."""
    attn = random_attention(seed, (23, 4, 144))
    features = np.random.default_rng(seed).normal(size=(144, 8)).astype(np.float32)
    expected = sorted(loop_top(np.array(loop_distributions(attn)[-1]), 32))
    one_block_short = run("fastervlm", make_inputs(attn[:-1], features), 32)
    assert not np.array_equal(one_block_short.kept, expected)
    monkeypatch.setattr(baselines, "np", NumpyWith(sort=np.asarray))
    unsorted = run("fastervlm", make_inputs(attn, features), 32)
    assert not np.array_equal(unsorted.kept, expected)


@pytest.mark.parametrize("name", ["uniform", "fastervlm"])
def test_baselines_reject_budget_outside_1_to_n(name: str) -> None:
    for budget in (0, 9):
        with pytest.raises(InputError, match=rf"1 <= K <= N=8, got {budget}"):
            run(name, hand_inputs(), budget)
    with pytest.raises(InputError, match="takes no option"):
        get_strategy(name).make_options(p_shallow=0.5)
