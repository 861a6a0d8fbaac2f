"""export.reference.vision: the PyTorch reference's selection pieces on synthetic tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from export.reference import baselines as rb
from export.reference import vision as rv
from runtime.errors import InputError

N = 576
EXACT = 1e-12  # float64 arithmetic on small hand cases

# --- selection pieces: hand cases -----------------------------------------------------------------


def test_distribution_entropy_kl_hand_cases() -> None:
    dist = rv.head_mean_distribution(torch.tensor([[[0.2, 0.2], [0.4, 0.0]]]))
    np.testing.assert_allclose(dist.numpy(), [[0.75, 0.25]], rtol=0, atol=EXACT)
    h = rv.attention_entropy(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    np.testing.assert_allclose(h.numpy(), [math.log(2), 0.0], rtol=0, atol=EXACT)
    kl = rv.attention_kl(torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64))
    np.testing.assert_allclose(
        kl.numpy(), [0.0, 0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-12)], rtol=1e-12, atol=EXACT
    )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("max-min", (1, 4)),
        ("max-max", (1, 3)),
        ("min-min", (2, 4)),
        ("min-max", (2, 3)),
        ("fixed", (2, 5)),
    ],
)
def test_choose_layers_rules(rule: str, expected: tuple[int, int]) -> None:
    entropy = torch.tensor([3.0, 1.0, 2.0, 0.5, 2.0], dtype=torch.float64)  # layers 1..5
    got = rv.choose_layers(entropy, rule, shallow=(1, 2), deep=(3, 5), fixed=(2, 5))
    assert (got.l_s, got.l_d) == expected


def test_choose_layers_ties_and_validation() -> None:
    flat = torch.ones(5, dtype=torch.float64)
    assert rv.choose_layers(flat, "max-min", (2, 3), (4, 5), (1, 1)) == rv.LayerChoice(2, 4)
    with pytest.raises(InputError, match="1 <= lo <= hi <= f=5"):
        rv.choose_layers(flat, "max-min", (2, 3), (4, 6), (1, 1))
    with pytest.raises(InputError, match="choose one of"):
        rv.choose_layers(flat, "median", (2, 3), (4, 5), (1, 1))


def test_split_budget_and_visionzip_contextual() -> None:
    assert rv.split_budget(64, 0.4) == rv.BudgetSplit(26, 38)
    assert rv.split_budget(5, 0.5) == rv.BudgetSplit(3, 2)  # halves round up
    assert [rb.visionzip_contextual(k) for k in (64, 128, 192, 16, 1)] == [10, 20, 30, 3, 0]


def test_rank_and_dual_select_hand_case() -> None:
    np.testing.assert_array_equal(
        rv.rank_descending(torch.tensor([1.0, 3.0, 3.0])).numpy(), [1, 2, 0]
    )
    deep = torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=torch.float64)
    shallow = torch.tensor([0.1, 0.9, 0.0, 0.1], dtype=torch.float64)
    # deep takes 1 then 2; 1 is taken, so shallow's best remaining is 0 (tie with 3: smaller)
    kept = rv.dual_layer_select(shallow, deep, rv.BudgetSplit(k_s=1, k_d=2))
    np.testing.assert_array_equal(kept.numpy(), [0, 1, 2])


def test_merge_uniform_cosine_hand_cases() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    merged = rv.merge_into_kept(x, torch.tensor([0, 1]))
    np.testing.assert_allclose(merged.tokens.numpy(), [[2.0, 0.0], [0.0, 1.0]], rtol=0, atol=EXACT)
    np.testing.assert_array_equal(merged.counts.numpy(), [2, 1])
    np.testing.assert_array_equal(rb.uniform_indices(8, 2).numpy(), [2, 6])
    np.testing.assert_array_equal(rb.uniform_indices(N, 64).numpy()[:3], [4, 13, 22])
    cos = rv.cosine_matrix(
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    )
    np.testing.assert_allclose(
        cos.numpy(), [[1.0, 0.0], [0.0, 0.0]], rtol=0, atol=EXACT
    )  # zero vector: 0


def test_visionzip_hand_case() -> None:
    # N=6, K=6 -> C=1: five dominant by head-summed attention, one contextual from the rest
    x = torch.arange(12, dtype=torch.float32).view(6, 2)
    attn = torch.tensor([[0.0, 0.3, 0.1, 0.2, 0.2, 0.2], [0.1, 0.0, 0.1, 0.0, 0.1, 0.1]])
    got = rb.visionzip_select(x, attn, torch.eye(6, 2), budget=6)
    np.testing.assert_array_equal(got.kept.numpy(), [1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(got.counts.numpy(), [1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(
        got.tokens[-1].numpy(), x[0].numpy(), rtol=0, atol=EXACT
    )  # no members
    # N=8, K=7 -> C=1: 6 dominant, remaining [6, 7]: target 6, member 7 (equal keys)
    x8 = torch.arange(16, dtype=torch.float32).view(8, 2)
    attn8 = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    got8 = rb.visionzip_select(x8, attn8, torch.ones(8, 3), budget=7)
    np.testing.assert_array_equal(got8.kept.numpy(), [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(got8.counts.numpy(), [1, 1, 1, 1, 1, 1, 2])
    np.testing.assert_allclose(got8.tokens[-1].numpy(), (x8[6] + x8[7]).numpy(), rtol=0, atol=EXACT)


def test_divprune_hand_case() -> None:
    e = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    np.testing.assert_array_equal(rb.divprune_select(e, 2).numpy(), [0, 2])
    np.testing.assert_array_equal(rb.divprune_select(e, 3).numpy(), [0, 1, 2])


# --- selection pieces: seeded random cases against slow loop references ---------------------------


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (max(np.linalg.norm(a), 1e-6) * max(np.linalg.norm(b), 1e-6)))


def _top_loop(scores: list[float], k: int, skip: set[int]) -> list[int]:
    order = sorted((i for i in range(len(scores)) if i not in skip), key=lambda i: (-scores[i], i))
    return order[:k]


def _merge_loop(x: np.ndarray, kept: list[int]) -> tuple[np.ndarray, list[int]]:
    sums = {i: x[i].astype(np.float64) for i in kept}
    counts = dict.fromkeys(kept, 1)
    for j in range(len(x)):
        if j in counts:
            continue
        best = max(kept, key=lambda i: (_cos(x[j], x[i]), -i))
        sums[best] = sums[best] + x[j]
        counts[best] += 1
    return np.stack([sums[i] / counts[i] for i in kept]), [counts[i] for i in kept]


def _divprune_loop(e: np.ndarray, k: int) -> list[int]:
    n = len(e)
    d = [[1.0 - _cos(e[i], e[j]) for j in range(n)] for i in range(n)]
    nearest = [min(d[i][j] for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(d[i][p] for p in picked), -i)))
    return sorted(picked)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_select_and_merge_match_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d, k = 40, 5, 11
    s_sh, s_dp = rng.random(n).round(2), rng.random(n).round(2)  # rounding forces ties
    x = rng.standard_normal((n, d)).astype(np.float32)
    split = rv.split_budget(k, 0.4)
    deep = _top_loop(list(s_dp), split.k_d, set())
    expected = sorted(deep + _top_loop(list(s_sh), split.k_s, set(deep)))
    kept = rv.dual_layer_select(torch.from_numpy(s_sh), torch.from_numpy(s_dp), split)
    np.testing.assert_array_equal(kept.numpy(), expected)
    merged = rv.merge_into_kept(torch.from_numpy(x), kept)
    tokens, counts = _merge_loop(x, expected)
    np.testing.assert_array_equal(merged.counts.numpy(), counts)
    np.testing.assert_allclose(
        merged.tokens.numpy(), tokens, rtol=0, atol=1e-6, err_msg="merged mean"
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_visionzip_matches_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d, dk, k = 50, 4, 3, 20  # C = round(100/32) = 3
    x = rng.standard_normal((n, d)).astype(np.float32)
    attn = rng.random((2, n)).astype(np.float32)
    keys = rng.standard_normal((n, dk)).astype(np.float32)
    c = 3
    dominant = sorted(_top_loop(list(attn.astype(np.float64).sum(0)), k - c, set()))
    remaining = [i for i in range(n) if i not in dominant]
    targets = remaining[:: max(1, len(remaining) // c)][:c]
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for j in remaining:
        if j not in groups:
            groups[max(targets, key=lambda t: (_cos(keys[j], keys[t]), -t))].append(j)
    context = [x[t] + (np.mean(x[g], axis=0) if g else 0.0) for t, g in groups.items()]
    got = rb.visionzip_select(
        torch.from_numpy(x), torch.from_numpy(attn), torch.from_numpy(keys), k
    )
    np.testing.assert_array_equal(got.kept.numpy(), dominant + targets)
    np.testing.assert_array_equal(
        got.counts.numpy(), [1] * (k - c) + [1 + len(g) for g in groups.values()]
    )
    np.testing.assert_allclose(
        got.tokens.numpy(),
        np.concatenate([x[dominant], np.stack(context)]),
        rtol=0,
        atol=1e-6,
        err_msg="visionzip tokens",
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divprune_matches_loop(seed: int) -> None:
    e = np.random.default_rng(seed).standard_normal((30, 6))
    np.testing.assert_array_equal(
        rb.divprune_select(torch.from_numpy(e), 9).numpy(), _divprune_loop(e, 9)
    )


# --- selection pieces: properties -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 60),
    frac=st.floats(0.0, 1.0),
    p_s=st.floats(0.0, 1.0),
    seed=st.integers(0, 999),
)
def test_entropy_selection_properties(n: int, frac: float, p_s: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(frac * n))
    attn = torch.rand(4, 3, n, generator=gen, dtype=torch.float64) ** 4
    dist = rv.head_mean_distribution(attn)
    h = rv.attention_entropy(dist)
    assert bool((h >= -EXACT).all() and (h <= math.log(n) + EXACT).all())
    assert bool((rv.attention_kl(dist) >= -EXACT).all())
    kept = rv.dual_layer_select(dist[0], dist[3], rv.split_budget(k, p_s))
    assert kept.shape == (k,) and bool((kept[1:] > kept[:-1]).all())  # exact budget, unique, sorted
    x = torch.randn(n, 3, generator=gen)
    merged = rv.merge_into_kept(x, kept)
    assert int(merged.counts.sum()) == n
    target = torch.argmax(rv.cosine_matrix(x, x[kept]), dim=1)  # every patch's group (kept: itself)
    target[kept] = torch.arange(k)
    for i in range(k):  # the mean lies inside its members' bounding box
        members = x[target == i]
        assert bool((merged.tokens[i] >= members.min(0).values - 1e-5).all())
        assert bool((merged.tokens[i] <= members.max(0).values + 1e-5).all())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), frac=st.floats(0.0, 1.0), seed=st.integers(0, 999))
def test_baseline_budgets_properties(n: int, frac: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(frac * n))
    for kept in (rb.uniform_indices(n, k), rb.divprune_select(torch.randn(n, 4, generator=gen), k)):
        assert kept.shape == (k,) and bool((kept[1:] > kept[:-1]).all()) and 0 <= int(kept[0])
        assert int(kept[-1]) < n
    zipped = rb.visionzip_select(
        torch.randn(n, 3, generator=gen),
        torch.rand(2, n, generator=gen),
        torch.randn(n, 2, generator=gen),
        k,
    )
    assert zipped.kept.shape == (k,) and len(set(zipped.kept.tolist())) == k
    assert int(zipped.counts.sum()) == (n if rb.visionzip_contextual(k) else k)
