"""VisionZip: dominant tokens by head-summed [CLS] attention plus key-cosine contextual merges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import InputError
from runtime.strategies.registry import get_strategy
from runtime.strategies.visionzip import contextual_count, visionzip_select
from runtime.types import EncoderOutput
from tests.strategy_fakes import make_encoded, make_inputs

TOKEN_TOL = 1e-5  # float32 outputs of float64 sums


def _visionzip_loop(features: np.ndarray, attn: np.ndarray, keys: np.ndarray, k: int):
    """Slow reference straight from method.md §3: (kept, counts, tokens)."""
    n = features.shape[0]
    c = math.floor(5 * k / 32 + 0.5)
    score = [sum(float(attn[h, j]) for h in range(attn.shape[0])) for j in range(n)]
    dominant = sorted(sorted(range(n), key=lambda j: (-score[j], j))[: k - c])
    remaining = [j for j in range(n) if j not in dominant]
    targets = remaining[:: max(1, len(remaining) // c)][:c] if c else []
    members: dict[int, list[int]] = {t: [] for t in targets}
    for j in remaining:
        if j in targets:
            continue
        best, best_sim = -1, -math.inf
        for t in targets:
            kj, kt = keys[j].astype(np.float64), keys[t].astype(np.float64)
            sim = float(kj @ kt) / (max(np.linalg.norm(kj), 1e-6) * max(np.linalg.norm(kt), 1e-6))
            if sim > best_sim:
                best, best_sim = t, sim
        members[best].append(j)
    tokens = [features[j].astype(np.float64) for j in dominant]
    for t in targets:
        extra = np.mean(features[members[t]].astype(np.float64), axis=0) if members[t] else 0.0
        tokens.append(features[t].astype(np.float64) + extra)
    counts = [1] * len(dominant) + [1 + len(members[t]) for t in targets]
    return np.array(dominant + targets), np.array(counts), np.array(tokens)


def test_contextual_count_rounds_half_up() -> None:
    assert [contextual_count(k) for k in (64, 128, 192)] == [10, 20, 30]
    assert [contextual_count(k) for k in (1, 3, 4, 9, 10, 576)] == [0, 0, 1, 1, 2, 90]


def test_visionzip_hand_case_one_contextual_token() -> None:
    # K = 4 -> C = 1. Head sums [0.3, 0.5, 0.1, 0.6, 0.4, 0.4]: dominant 3, 1, then 4 (ties 5).
    attn = np.array([[0.1, 0.5, 0.0, 0.3, 0.2, 0.0], [0.2, 0.0, 0.1, 0.3, 0.2, 0.4]])
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    sel = visionzip_select(x, attn, np.ones((6, 3)), 4)
    np.testing.assert_array_equal(sel.kept, [1, 3, 4, 0])  # remaining [0, 2, 5], target 0
    np.testing.assert_array_equal(sel.counts, [1, 1, 1, 3])
    np.testing.assert_allclose(sel.tokens, [x[1], x[3], x[4], x[0] + (x[2] + x[5]) / 2],
                               atol=TOKEN_TOL)
    # Negative control: the plain mean (x_t + Σ members) / (1 + n) is a different token.
    assert not np.allclose(sel.tokens[3], (x[0] + x[2] + x[5]) / 3, atol=TOKEN_TOL)


def test_visionzip_hand_case_assignment_uses_keys() -> None:
    # N = 11, K = 10 -> C = 2, 8 dominant; remaining [1, 5, 10], step 1, targets 1 and 5.
    attn = np.array([[0.9, 0.1, 0.8, 0.7, 0.6, 0.05, 0.5, 0.4, 0.3, 0.2, 0.0]])
    keys = np.ones((11, 2))
    keys[1], keys[5], keys[10] = [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]  # 10 is closest to 5
    x = np.random.default_rng(0).standard_normal((11, 3)).astype(np.float32)
    x[1], x[5], x[10] = [1, 0, 0], [0, 1, 0], [1, 0.1, 0]  # by features 10 would join 1
    sel = visionzip_select(x, attn, keys, 10)
    np.testing.assert_array_equal(sel.kept, [0, 2, 3, 4, 6, 7, 8, 9, 1, 5])
    np.testing.assert_array_equal(sel.counts, [1] * 8 + [1, 2])
    np.testing.assert_allclose(sel.tokens[8:], [x[1], x[5] + x[10]], atol=TOKEN_TOL)
    # Negative control: assigning by feature cosine puts 10 with target 1.
    _, counts_by_features, _ = _visionzip_loop(x, attn, x, 10)
    assert counts_by_features.tolist()[8:] == [2, 1]


def test_visionzip_edge_cases() -> None:
    enc = make_encoded(n=8)
    attn = enc.cls_attn[-1]
    one = visionzip_select(enc.features, attn, enc.keys, 1)  # C = 0: the top patch only
    assert one.kept.tolist() == [int(np.argmax(attn.sum(0)))] and one.counts.tolist() == [1]
    full = visionzip_select(enc.features, attn, enc.keys, 8)  # K = N: C = 1 target, no members
    assert sorted(full.kept.tolist()) == list(range(8)) and full.counts.tolist() == [1] * 8
    np.testing.assert_allclose(full.tokens, enc.features[full.kept], atol=TOKEN_TOL)


@pytest.mark.parametrize("budget", [64, 128, 192, 5, 575])
def test_visionzip_matches_loop_reference(budget: int) -> None:
    enc = make_encoded(n=576, d=16, f=4, heads=4, key_dim=8, seed=budget)
    sel = visionzip_select(enc.features, enc.cls_attn[-1], enc.keys, budget)
    kept, counts, tokens = _visionzip_loop(enc.features, enc.cls_attn[-1], enc.keys, budget)
    np.testing.assert_array_equal(sel.kept, kept, err_msg=f"K={budget}")
    np.testing.assert_array_equal(sel.counts, counts)
    np.testing.assert_allclose(sel.tokens, tokens, atol=TOKEN_TOL)
    assert sel.kept.dtype == np.int64 and sel.tokens.dtype == np.float32
    # Negative control: ranking by an earlier block's attention picks other dominant tokens.
    wrong, _, _ = _visionzip_loop(enc.features, enc.cls_attn[0], enc.keys, budget)
    assert not np.array_equal(wrong, kept)


def test_visionzip_strategy_uses_last_block() -> None:
    strategy = get_strategy("visionzip")
    assert not strategy.needs_probe
    inputs = make_inputs(n=40)
    sel = strategy.run(inputs, 12, strategy.make_options())
    enc: EncoderOutput = inputs.encoded
    kept, counts, _ = _visionzip_loop(enc.features, enc.cls_attn[-1], enc.keys, 12)
    np.testing.assert_array_equal(sel.kept, kept)
    np.testing.assert_array_equal(sel.counts, counts)
    assert sel.report == {"dominant": 10, "contextual": 2}
    with pytest.raises(InputError, match="1 <= K <= N=40"):
        strategy.run(inputs, 0, strategy.make_options())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.data())
def test_visionzip_properties(n: int, data: st.DataObject) -> None:
    budget = data.draw(st.integers(1, n))
    enc = make_encoded(n=n, seed=data.draw(st.integers(0, 10_000)))
    sel = visionzip_select(enc.features, enc.cls_attn[-1], enc.keys, budget)
    c = contextual_count(budget)
    assert sel.kept.shape == (budget,) and len(set(sel.kept.tolist())) == budget
    dominant, targets = sel.kept[: budget - c], sel.kept[budget - c :]
    assert np.all(np.diff(dominant) > 0) and np.all(np.diff(targets) > 0)
    assert int(sel.counts.sum()) == (n if c else budget)  # every patch is kept or merged once
