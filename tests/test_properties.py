"""Hypothesis properties of the pure scoring, selection and merging functions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.merging import merge_tokens
from runtime.scoring import layer_distributions, layer_entropy, layer_kl
from runtime.selection import choose_layers, select_dual, split_budget, top_k
from runtime.strategies.baselines import uniform_indices

ENTROPY_SLACK = 1e-9  # float64 rounding on sums of up to ~64 terms of order 1
KL_SLACK = 1e-9  # clipping at 1e-12 can push KL below 0 by at most N * 1e-12
HULL_SLACK = 1e-5  # float32 rounding of a mean of float32 values of magnitude <= 100

unit = st.floats(0.0, 1.0, allow_nan=False, width=32)
attention = st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 40)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=unit).filter(
        lambda a: bool(np.all(a.mean(axis=1).sum(axis=1) > 0))
    )
)
scores = st.integers(1, 60).flatmap(
    lambda n: hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
    | hnp.arrays(np.float64, n, elements=st.floats(-1e3, 1e3, allow_nan=False))
)
features = st.tuples(st.integers(1, 30), st.integers(1, 6)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32))
)


@given(attention)
def test_distributions_sum_to_one_and_entropy_in_0_ln_n(attn: np.ndarray) -> None:
    dists = layer_distributions(attn)
    np.testing.assert_allclose(dists.sum(axis=1), 1.0, rtol=1e-12)
    entropy = layer_entropy(dists)
    n = attn.shape[2]
    assert entropy.shape == (attn.shape[0],)
    assert np.all(entropy >= -ENTROPY_SLACK) and np.all(entropy <= math.log(n) + ENTROPY_SLACK)
    kl = layer_kl(dists)
    assert kl.shape == (attn.shape[0] - 1,) and np.all(kl >= -KL_SLACK)


@given(scores, st.data())
def test_top_k_is_a_stable_descending_prefix(s: np.ndarray, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, s.shape[0]))
    idx = top_k(s, k)
    assert idx.shape == (k,) and len(set(idx.tolist())) == k
    keys = [(-s[i], i) for i in idx]
    assert keys == sorted(keys)  # descending scores, smaller index first among ties
    if 0 < k < s.shape[0]:
        rest = np.setdiff1d(np.arange(s.shape[0]), idx)
        assert s[rest].max() <= s[idx[-1]]


@given(st.integers(1, 5000), st.floats(0.0, 1.0))
def test_split_budget_is_exact(budget: int, p_shallow: float) -> None:
    split = split_budget(budget, p_shallow)
    assert split.k_s + split.k_d == budget and 0 <= split.k_s <= budget
    assert abs(split.k_s - p_shallow * budget) <= 0.5 + 1e-9


@given(scores, st.data())
def test_select_dual_exact_budget_unique_sorted(s_deep: np.ndarray, data: st.DataObject) -> None:
    n = s_deep.shape[0]
    s_shallow = data.draw(hnp.arrays(np.float64, n, elements=st.floats(-1, 1)))
    budget = data.draw(st.integers(1, n))
    split = split_budget(budget, data.draw(st.floats(0.0, 1.0)))
    kept = select_dual(s_shallow, s_deep, split.k_s, split.k_d)
    assert kept.dtype == np.int64 and kept.shape == (budget,)
    assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < n
    assert set(top_k(s_deep, split.k_d).tolist()) <= set(kept.tolist())


@given(st.data())
def test_choose_layers_stays_in_range_and_hits_the_extremum(data: st.DataObject) -> None:
    f = data.draw(st.integers(1, 30))
    h = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, 3.0]), min_size=f, max_size=f)))
    lo_s, hi_s = sorted(data.draw(st.tuples(st.integers(1, f), st.integers(1, f))))
    lo_d, hi_d = sorted(data.draw(st.tuples(st.integers(1, f), st.integers(1, f))))
    rule = data.draw(st.sampled_from(["max-min", "max-max", "min-min", "min-max"]))
    choice = choose_layers(h, rule, (lo_s, hi_s), (lo_d, hi_d))
    for layer, (lo, hi), how in zip(choice.__dict__.values(), [(lo_s, hi_s), (lo_d, hi_d)],
                                    rule.split("-"), strict=True):
        window = h[lo - 1 : hi]
        best = window.max() if how == "max" else window.min()
        assert lo <= layer <= hi and h[layer - 1] == best
        assert layer == lo + int(np.flatnonzero(window == best)[0])  # the smallest such layer


@given(features, st.data())
def test_merge_assigns_every_patch_once_and_means_inside_hull(x: np.ndarray,
                                                              data: st.DataObject) -> None:
    n = x.shape[0]
    kept = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))), dtype=np.int64)
    result = merge_tokens(x, kept)
    k = kept.shape[0]
    assert result.tokens.shape == (k, x.shape[1]) and result.tokens.dtype == np.float32
    assert result.assignment.shape == (n,)
    assert np.all((result.assignment >= 0) & (result.assignment < k))
    np.testing.assert_array_equal(result.assignment[kept], np.arange(k))  # kept -> itself
    assert result.counts.sum() == n and np.all(result.counts >= 1)
    for pos in range(k):
        members = x[result.assignment == pos].astype(np.float64)
        assert members.shape[0] == result.counts[pos]
        np.testing.assert_allclose(result.tokens[pos], members.mean(axis=0), rtol=1e-6,
                                   atol=HULL_SLACK, err_msg="merged token = mean of its members")
        assert np.all(result.tokens[pos] >= members.min(axis=0) - HULL_SLACK)
        assert np.all(result.tokens[pos] <= members.max(axis=0) + HULL_SLACK)


@settings(max_examples=200)
@given(st.integers(1, 3000), st.data())
def test_uniform_indices_exact_budget_unique_sorted(n: int, data: st.DataObject) -> None:
    budget = data.draw(st.integers(1, n))
    idx = uniform_indices(n, budget)
    assert idx.shape == (budget,) and idx.dtype == np.int64
    assert np.all(np.diff(idx) >= 1) and idx[0] >= 0 and idx[-1] < n
