"""CDPruner's conditional DPP (method.md §7): relevance, kernel, fast greedy MAP, fill."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import dpp
from runtime.dpp import cdpruner_indices, conditional_kernel, dpp_indices, greedy_map, relevance
from runtime.errors import InputError

EXACT_TOL = 1e-6  # float32 kernels of short vectors with entries like 0.6 and 1.2 (float32 spacing ~1e-7)
RELEVANCE_TOL = 1e-5  # float32 cosines (~1e-7 relative) divided by a relevance range >= 0.1 (checked)
KERNEL_TOL = 1e-5  # r_i S_ij r_j with r from RELEVANCE_TOL and r <= 1 + 1e-5 in these cases
RANK_SPENT = 1e-10  # method.md §7.5: a best remaining gain at or below this ends the greedy loop
CASES = [(0, 40, 48, 12, None), (1, 60, 64, 30, None), (2, 50, 56, 20, 0.3), (3, 30, 40, 30, 0.7)]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    norm_a = max(math.sqrt(sum(float(x) * float(x) for x in a)), 1e-6)
    norm_b = max(math.sqrt(sum(float(x) * float(x) for x in b)), 1e-6)
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True)) / (norm_a * norm_b)


def _relevance_loop(v: np.ndarray, t: np.ndarray, theta: float | None) -> np.ndarray:
    """Slow reference of §7.4 in float64: mean negated cosine, min-max with 1e-6, optional exp(α r)."""
    raw = [-sum(_cos(v[i], t[m]) for m in range(len(t))) / len(t) for i in range(len(v))]
    lo, hi = min(raw), max(raw)
    r = [1.0] * len(raw) if hi == lo else [(x - lo + 1e-6) / (hi - lo) for x in raw]
    if theta is not None:
        r = [math.exp(theta / (2 * (1 - theta)) * x) for x in r]
    return np.array(r)


def _kernel_loop(embeds: np.ndarray, r: np.ndarray) -> np.ndarray:
    n = len(embeds)
    return np.array([[r[i] * _cos(embeds[i], embeds[j]) * r[j] for j in range(n)] for i in range(n)])


def _logdet_loop(kernel: np.ndarray, r: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Slow greedy MAP: every step recomputes log det L[S + c, S + c] for each candidate c.

    Returns (DPP picks in order, kept sorted). The gain det(L_{S+c}) / det(L_S) <= 1e-10 (or a
    non-positive determinant) ends the loop; the rest are the unpicked of highest r.
    """
    n, picked, logdet = kernel.shape[0], [], 0.0
    while len(picked) < k:
        best, best_gain, best_logdet = -1, -math.inf, 0.0
        for c in (c for c in range(n) if c not in picked):
            sign, value = np.linalg.slogdet(kernel[np.ix_(picked + [c], picked + [c])].astype(np.float64))
            gain = math.exp(value - logdet) if sign > 0 else 0.0
            if gain > best_gain:  # strict: ties keep the smaller index
                best, best_gain, best_logdet = c, gain, value
        if best_gain <= RANK_SPENT:
            break
        picked.append(best)
        logdet = best_logdet
    rest = sorted((i for i in range(n) if i not in picked), key=lambda i: (-float(r[i]), i))
    return picked, sorted(picked + rest[: k - len(picked)])


def _case(seed: int, n: int, e: int, duplicates: bool = False) -> dict[str, np.ndarray]:
    """Random embeds [n, e], V [n, 8], T [3, 8]; with ``duplicates`` every row repeats a row of n // 2."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n // 2, size=n) if duplicates else np.arange(n)
    return {"embeds": rng.standard_normal((n, e)).astype(np.float32)[rows],
            "image_clip": rng.standard_normal((n, 8)).astype(np.float32)[rows],
            "text_clip": rng.standard_normal((3, 8)).astype(np.float32)}


def assert_cdpruner_matches_loop(case: dict[str, np.ndarray], k: int, theta: float | None) -> None:
    """dpp.cdpruner_indices (looked up on the module: a patched one runs) == the slow float64 loops."""
    r = _relevance_loop(case["image_clip"], case["text_clip"], theta)
    _, expected = _logdet_loop(_kernel_loop(case["embeds"], r), r, k)
    got = dpp.cdpruner_indices(case["embeds"], case["image_clip"], case["text_clip"], k, relevance_weight=theta)
    assert got.dtype == np.int64 and got.shape == (k,)
    np.testing.assert_array_equal(got, expected, err_msg=f"K={k} theta={theta}")


def test_relevance_hand_case() -> None:
    # −cos = [−1, 0, −1/√2]; min −1, max 0: r = −cos + 1 + 1e-6.
    expected = np.array([1e-6, 1 + 1e-6, 1 - 1 / math.sqrt(2) + 1e-6])
    got = relevance(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 0.0]]))
    assert got.dtype == np.float32 and got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=EXACT_TOL)
    weighted = relevance(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 0.0]]), 0.5)
    np.testing.assert_allclose(weighted, np.exp(0.5 * expected), rtol=0, atol=EXACT_TOL)  # α = 0.5 / (2 · 0.5)
    flat = relevance(np.ones((4, 2)), np.array([[1.0, 0.0], [0.0, 1.0]]))  # max r = min r -> r = 1
    np.testing.assert_array_equal(flat, np.ones(4, np.float32))


def test_kernel_and_greedy_hand_cases() -> None:
    kernel = conditional_kernel(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), np.array([1.0, 2.0, 1.0]))
    assert kernel.dtype == np.float32 and kernel.shape == (3, 3)
    np.testing.assert_allclose(kernel, [[1, 1.2, 0], [1.2, 4, 1.6], [0, 1.6, 1]], rtol=0, atol=EXACT_TOL)
    # d = [1, 4, 1] picks 1; d = [0.64, −inf, 0.36] picks 0: det L[{0,1}] = 2.56 beats det L[{1,2}] = 1.44.
    np.testing.assert_array_equal(dpp_indices(kernel, np.array([1.0, 2.0, 1.0]), 2), [0, 1])
    # Unweighted (r = 1): d = [1, 1, 1] picks 0 (tie, smaller index); then d = [−inf, 0.64, 1] picks 2.
    plain = conditional_kernel(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), np.ones(3))
    np.testing.assert_array_equal(dpp_indices(plain, np.ones(3), 2), [0, 2])
    # Rank 2, exactly representable: d = [1, 2, 1] picks 1, d = [0.5, −inf, 0.5] picks 0, then d_2 = 0.
    rank_two = np.array([[1.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 1.0]])
    got = greedy_map(rank_two, 3)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [1, 0])


def test_rank_spent_fills_by_relevance() -> None:
    # Rows a, a, b, c, c (orthogonal a, b, c), r = [1, 1, 3, 2, 2]: L = diag(r) S diag(r) has rank 3.
    # Greedy: 2 (r² = 9), 3 (4, tie with 4), 0 (1, tie with 1); the twins' gains are then 0.
    # Fill: the unpicked 1 and 4 by r = 1, 2 -> 4.
    embeds = np.eye(3)[[0, 0, 1, 2, 2]]
    r = np.array([1.0, 1.0, 3.0, 2.0, 2.0])
    kernel = conditional_kernel(embeds, r)
    np.testing.assert_array_equal(greedy_map(kernel, 4), [2, 3, 0])
    np.testing.assert_array_equal(dpp_indices(kernel, r, 4), [0, 2, 3, 4])
    np.testing.assert_array_equal(dpp_indices(kernel, r, 5), [0, 1, 2, 3, 4])


@pytest.mark.parametrize(("seed", "n", "e", "k", "theta"), CASES)
def test_relevance_and_kernel_match_loops(seed: int, n: int, e: int, k: int, theta: float | None) -> None:
    case = _case(seed, n, e)
    r_loop = _relevance_loop(case["image_clip"], case["text_clip"], theta)
    raw = [-np.mean([_cos(v, t) for t in case["text_clip"]]) for v in case["image_clip"]]
    assert max(raw) - min(raw) >= 0.1  # the premise of RELEVANCE_TOL
    r = relevance(case["image_clip"], case["text_clip"], theta)
    np.testing.assert_allclose(r, r_loop, rtol=0, atol=RELEVANCE_TOL, err_msg="relevance")
    kernel = conditional_kernel(case["embeds"], r)
    np.testing.assert_allclose(kernel, _kernel_loop(case["embeds"], r), rtol=0, atol=KERNEL_TOL, err_msg="kernel")


@pytest.mark.parametrize(("seed", "n", "e", "k", "duplicates"),
                         [(10, 40, 48, 12, False), (11, 60, 64, 40, False), (12, 40, 24, 30, True)])
def test_greedy_map_matches_logdet_loop(seed: int, n: int, e: int, k: int, duplicates: bool) -> None:
    """Same float32 kernel into both: the picks and their order agree; duplicates spend the rank."""
    case = _case(seed, n, e, duplicates)
    r = relevance(case["image_clip"], case["text_clip"])
    kernel = conditional_kernel(case["embeds"], r)
    order, kept = _logdet_loop(kernel, r, k)
    np.testing.assert_array_equal(greedy_map(kernel, k), order)
    np.testing.assert_array_equal(dpp_indices(kernel, r, k), kept)
    if duplicates:  # one pick per distinct row, but the least relevant (r = 1e-6 / range, L_ii < 1e-10)
        assert len(order) == len(np.unique(case["embeds"], axis=0)) - 1 < k  # the fill was exercised


@pytest.mark.parametrize(("seed", "n", "e", "k", "theta"), CASES)
def test_cdpruner_matches_loop_reference(seed: int, n: int, e: int, k: int, theta: float | None) -> None:
    assert_cdpruner_matches_loop(_case(seed, n, e), k, theta)


@pytest.mark.parametrize(("seed", "n", "e", "k", "theta"), CASES[:3])
def test_negative_control_cosine_without_minus(seed: int, n: int, e: int, k: int, theta: float | None,
                                                monkeypatch) -> None:
    """Relevance +cos instead of −cos (the minus sign dropped) fails the same comparison."""
    mean_cosine = dpp._mean_cosine
    monkeypatch.setattr(dpp, "_mean_cosine", lambda v, t: -mean_cosine(v, t))
    with pytest.raises(AssertionError):
        assert_cdpruner_matches_loop(_case(seed, n, e), k, theta)


@pytest.mark.parametrize(("seed", "n", "e", "k", "theta"), CASES[:3])
def test_negative_control_unweighted_kernel(seed: int, n: int, e: int, k: int, theta: float | None,
                                            monkeypatch) -> None:
    """Kernel S instead of diag(r) S diag(r) (the relevance ignored) fails the same comparison."""
    kernel = dpp.conditional_kernel
    monkeypatch.setattr(dpp, "conditional_kernel", lambda embeds, r: kernel(embeds, np.ones_like(r)))
    with pytest.raises(AssertionError):
        assert_cdpruner_matches_loop(_case(seed, n, e), k, theta)


def _orthogonal(rng: np.random.Generator, norms: np.ndarray) -> np.ndarray:
    """Rows norms[i] · (±unit vector), a random signed permutation: exactly orthogonal in float32."""
    n = norms.shape[0]
    signs = rng.choice([-1.0, 1.0], size=n)
    return (np.eye(n)[rng.permutation(n)] * (signs * norms)[:, None]).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(0, 10_000))
def test_orthogonal_features_pick_largest_norms(n: int, seed: int) -> None:
    """Orthogonal rows: the greedy picks the K largest kernel norms sqrt(L_ii), ties to the smaller index."""
    rng = np.random.default_rng(seed)
    norms = rng.integers(1, 5, size=n).astype(np.float64)  # small integers: many exact ties
    embeds = _orthogonal(rng, norms)
    clip = rng.standard_normal((n, 4)).astype(np.float32)
    for k in range(1, n + 1):
        expected = sorted(sorted(range(n), key=lambda i: (-norms[i], i))[:k])
        gram = embeds.astype(np.float64) @ embeds.T.astype(np.float64)  # diag(norms²): the norm counts
        np.testing.assert_array_equal(np.sort(greedy_map(gram, k)), expected)
        np.testing.assert_array_equal(dpp_indices(conditional_kernel(embeds, norms), norms, k), expected)
        # Unweighted (θ = 0 gives r = 1): cosine rows all have norm 1, so every gain ties -> 0..K−1.
        unweighted = cdpruner_indices(embeds, clip, clip[:1], k, relevance_weight=0.0)
        np.testing.assert_array_equal(unweighted, np.arange(k))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 4), st.integers(0, 10_000), st.sampled_from([None, 0.0, 0.5]))
def test_cdpruner_properties(n: int, e: int, seed: int, theta: float | None) -> None:
    """Small integer rows (duplicates, zero rows, low rank): every K in 1..N gives K distinct sorted
    indices, and the greedy makes each K's set contain the set of K − 1."""
    rng = np.random.default_rng(seed)
    embeds, image_clip = rng.integers(-2, 3, size=(n, e)), rng.integers(-2, 3, size=(n, 3))
    text_clip = rng.integers(-2, 3, size=(int(rng.integers(1, 4)), 3))
    previous: set[int] = set()
    for k in range(1, n + 1):
        kept = cdpruner_indices(embeds, image_clip, text_clip, k, relevance_weight=theta)
        assert kept.dtype == np.int64 and kept.shape == (k,)
        assert np.all(np.diff(kept) > 0) and 0 <= kept[0] and kept[-1] < n
        assert previous <= set(kept.tolist())
        previous = set(kept.tolist())


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"text_clip must be \[M >= 1, P=2\].*\(1, 3\)"):
        relevance(np.ones((4, 2)), np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"relevance must be \[N=4\].*\(3,\)"):
        conditional_kernel(np.ones((4, 2)), np.ones(3))
    with pytest.raises(ValueError, match=r"square \[N, N\].*\(2, 3\)"):
        greedy_map(np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        greedy_map(np.array([[np.nan]]), 1)
    with pytest.raises(ValueError, match=r"image_clip must have N=4 rows.*\(3, 2\)"):
        cdpruner_indices(np.ones((4, 2)), np.ones((3, 2)), np.ones((1, 2)), 2)
    with pytest.raises(InputError, match=r"1 <= K <= N=4, got 5"):
        cdpruner_indices(np.ones((4, 2)), np.ones((4, 2)), np.ones((1, 2)), 5)
    with pytest.raises(InputError, match=r"relevance_weight must lie in \[0, 1\), got 1.0"):
        relevance(np.ones((4, 2)), np.ones((1, 2)), 1.0)
