"""DART's duplicate-aware selection (method.md §7): pivots by key L1 norm, quotas, least-similar picks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import dart
from runtime.dart import dart_indices, dart_pivots, dart_quotas
from runtime.errors import InputError

# Hand case: 6 image rows, 2 text tokens (2-D keys and H). Key L1 norms 2.4, 2, 1, 3, 0.2, 0.3 make
# the image pivots 3, 0 (by L2 norm, 1.70 < 2 < 2.12, they would be 3, 1); text pivot: token 1.
HAND_IMAGE_KEYS = np.array([[1.2, 1.2], [2.0, 0.0], [0.5, 0.5], [1.5, 1.5], [0.2, 0.0], [0.0, 0.3]])
HAND_TEXT_KEYS = np.array([[1.0, 0.0], [0.0, 2.0]])
# H: exact vectors, so that cos(3, 2) = cos(3, 5) = −1/√2 and cos(0, 1) = cos(0, 5) = 0 tie exactly.
HAND_IMAGE_HIDDEN = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [-2.0, -0.5], [0.0, -1.0]])
HAND_TEXT_HIDDEN = np.array([[1.0, 0.5], [-0.2, 1.0]])


def _hand(budget: int, p_img: int = 2, p_txt: int = 1) -> np.ndarray:
    """dart.dart_indices on the hand case (looked up on the module: a patched one runs)."""
    return dart.dart_indices(HAND_IMAGE_KEYS, HAND_TEXT_KEYS, HAND_IMAGE_HIDDEN, HAND_TEXT_HIDDEN, budget,
                             p_img=p_img, p_txt=p_txt)


def assert_hand_case() -> None:
    # p = 3 pivots share K − p_img = 3 rows, one each; candidates 1, 2, 4, 5.
    # Pivot 3 (1, 1): cos 0.71, −0.71, −0.86, −0.71 -> 4. Pivot 0 (1, 0) on 1, 2, 5: cos 0, −1, 0 -> 2.
    # Text pivot 1 (−0.2, 1) on 1, 5: cos 0.98, −0.98 -> 5. Kept: pivots 0, 3 and 4, 2, 5.
    # (Pivots 3, 1 by L2 norm would keep 4, then 5 (cos −1), then 0 (cos −0.2) -> [0, 1, 3, 4, 5].)
    got = _hand(5)
    assert got.dtype == np.int64 and got.shape == (5,)
    np.testing.assert_array_equal(got, [0, 2, 3, 4, 5])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine as the product computes it, (a · b) / (|a| |b|), norms clipped at 1e-6."""
    norm_a = max(math.sqrt(sum(float(x) * float(x) for x in a)), 1e-6)
    norm_b = max(math.sqrt(sum(float(x) * float(x) for x in b)), 1e-6)
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True)) / (norm_a * norm_b)


def _dart_loop(ik: np.ndarray, tk: np.ndarray, ih: np.ndarray, th: np.ndarray, k: int, p_img: int,
               p_txt: int) -> list[int]:
    """Slow reference of §7.2-5 with explicit loops."""
    def by_l1(keys: np.ndarray, count: int) -> list[int]:
        norms = [sum(abs(float(x)) for x in row) for row in keys]
        return sorted(range(len(keys)), key=lambda i: (-norms[i], i))[:count]

    image_pivots, text_pivots = by_l1(ik, p_img), by_l1(tk, p_txt)
    if k <= len(image_pivots):
        return sorted(image_pivots[:k])
    pivots = [ih[i] for i in image_pivots] + [th[i] for i in text_pivots]
    quotas = [(k - p_img) // len(pivots) + (1 if i < (k - p_img) % len(pivots) else 0) for i in range(len(pivots))]
    kept = list(image_pivots)
    for h, quota in zip(pivots, quotas, strict=True):
        rest = [i for i in range(len(ik)) if i not in kept]
        kept += sorted(rest, key=lambda i, h=h: (_cos(ih[i], h), i))[:quota]
    return sorted(kept)


def test_hand_case() -> None:
    assert_hand_case()
    np.testing.assert_array_equal(_hand(2), [0, 3])  # K <= p_img: the K image pivots
    np.testing.assert_array_equal(_hand(1), [3])
    np.testing.assert_array_equal(_hand(6), np.arange(6))
    # No text pivots: p = 2 share 3 rows, [2, 1]. Pivot 3 keeps 4 then 2 (−0.86, then −1/√2 for 2
    # and 5: the tie goes to 2); pivot 0 on 1, 5: cos 0, 0 (a tie) -> 1.
    np.testing.assert_array_equal(_hand(5, p_txt=0), [0, 1, 2, 3, 4])


def test_pivots_and_quotas_hand_cases() -> None:
    got = dart_pivots(np.array([[3.0, 0.0], [2.0, 2.0], [1.0, -1.0]]), 2)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [1, 0])  # L1 norms 3, 4, 2
    np.testing.assert_array_equal(dart_pivots(np.ones((3, 2)), 2), [0, 1])  # ties: smaller index
    np.testing.assert_array_equal(dart_pivots(np.ones((3, 2)), 5), [0, 1, 2])  # fewer rows than asked
    np.testing.assert_array_equal(dart_pivots(np.zeros((0, 2)), 4), np.zeros(0, np.int64))
    np.testing.assert_array_equal(dart_quotas(10, 4, 8), [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(dart_quotas(128, 4, 8), [16, 16, 16, 16, 15, 15, 15, 15])  # 124 rows
    np.testing.assert_array_equal(dart_quotas(64, 4, 6), [10] * 6)


def test_ties_go_to_the_smaller_index() -> None:
    # Equal keys and identical H: pivots 0, 1; every candidate ties at cos 1 -> 2, 3, ... in order.
    got = dart_indices(np.ones((8, 3)), np.ones((2, 3)), np.ones((8, 2)), np.ones((2, 2)), 5, p_img=2, p_txt=2)
    np.testing.assert_array_equal(got, [0, 1, 2, 3, 4])


def test_negative_control_l2_pivots(monkeypatch) -> None:
    """Pivots by the L2 norm of the keys instead of L1 fail the hand case."""
    monkeypatch.setattr(dart, "_key_norms", lambda keys: np.sqrt((keys * keys).sum(axis=1)))
    with pytest.raises(AssertionError):
        assert_hand_case()


RANDOM_CASES = [(0, 1, 4, 4), (1, 4, 4, 4), (2, 5, 4, 4), (3, 20, 4, 4), (4, 60, 4, 4), (5, 33, 2, 0),
                (6, 17, 0, 3), (7, 40, 4, 20), (8, 128, 4, 4)]


def _random(seed: int, n: int = 60, m: int = 10) -> tuple[np.ndarray, ...]:
    """Keys [n, 16], [m, 16] and H [n, 12], [m, 12], standard normal: no exact ties."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 16)), rng.standard_normal((m, 16)),
            rng.standard_normal((n, 12)), rng.standard_normal((m, 12)))


def assert_matches_loop(seed: int, k: int, p_img: int, p_txt: int) -> None:
    n = max(60, k)
    ik, tk, ih, th = _random(seed, n)
    got = dart.dart_indices(ik, tk, ih, th, k, p_img=p_img, p_txt=p_txt)
    assert got.dtype == np.int64 and got.shape == (k,)
    np.testing.assert_array_equal(got, _dart_loop(ik, tk, ih, th, k, p_img, p_txt), err_msg=f"K={k}")


@pytest.mark.parametrize(("seed", "k", "p_img", "p_txt"), RANDOM_CASES)
def test_matches_loop_reference(seed: int, k: int, p_img: int, p_txt: int) -> None:
    assert_matches_loop(seed, k, p_img, p_txt)


@pytest.mark.parametrize(("seed", "k", "p_img", "p_txt"), [(2, 5, 4, 4), (3, 20, 4, 4), (6, 17, 0, 3), (7, 40, 4, 20)])
def test_negative_control_l2_pivots_random(seed: int, k: int, p_img: int, p_txt: int, monkeypatch) -> None:
    """The L2-norm variant also fails random comparisons (K < N, where L1 and L2 pivots differ)."""
    monkeypatch.setattr(dart, "_key_norms", lambda keys: np.sqrt((keys * keys).sum(axis=1)))
    with pytest.raises(AssertionError):
        assert_matches_loop(seed, k, p_img, p_txt)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(0, 6), st.integers(0, 5), st.integers(0, 5), st.integers(0, 10_000))
def test_properties(n: int, m: int, p_img: int, p_txt: int, seed: int) -> None:
    """Small integer rows (ties, duplicates, zero rows): every K in 1..N gives K distinct sorted indices
    that contain the top min(K, p_img) image pivots and equal the loop reference (exact ties)."""
    rng = np.random.default_rng(seed)
    ik, tk = rng.integers(-2, 3, size=(n, 3)), rng.integers(-2, 3, size=(m, 3))
    ih, th = rng.integers(-2, 3, size=(n, 2)), rng.integers(-2, 3, size=(m, 2))
    for k in range(1, n + 1):
        if p_img + min(p_txt, m) == 0:
            with pytest.raises(InputError, match="at least one pivot"):
                dart_indices(ik, tk, ih, th, k, p_img=p_img, p_txt=p_txt)
            continue
        kept = dart_indices(ik, tk, ih, th, k, p_img=p_img, p_txt=p_txt)
        assert kept.dtype == np.int64 and kept.shape == (k,)
        assert np.all(np.diff(kept) > 0) and 0 <= kept[0] and kept[-1] < n
        assert set(dart_pivots(ik, min(k, p_img)).tolist()) <= set(kept.tolist())
        np.testing.assert_array_equal(kept, _dart_loop(ik, tk, ih, th, k, p_img, p_txt))


def test_rejects_bad_input() -> None:
    ik, tk, ih, th = _random(0, 6, 2)
    with pytest.raises(ValueError, match=r"text_keys must have shape \(2, 16\), got \(2, 5\)"):
        dart_indices(ik, tk[:, :5], ih, th, 3)
    with pytest.raises(ValueError, match=r"image_hidden must have shape \(6, 12\), got \(5, 12\)"):
        dart_indices(ik, tk, ih[:5], th, 3)
    with pytest.raises(ValueError, match=r"text_hidden must have shape \(2, 12\), got \(1, 12\)"):
        dart_indices(ik, tk, ih, th[:1], 3)
    with pytest.raises(ValueError, match=r"image_keys must be a 2-D matrix \[rows >= 1.*\(0, 16\)"):
        dart_indices(ik[:0], tk, ih[:0], th, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        dart_indices(np.full((6, 16), np.nan), tk, ih, th, 3)
    with pytest.raises(InputError, match=r"1 <= K <= N=6, got 7"):
        dart_indices(ik, tk, ih, th, 7)
    with pytest.raises(InputError, match="p_txt must be an integer >= 0, got -1"):
        dart_indices(ik, tk, ih, th, 5, p_txt=-1)
    with pytest.raises(ValueError, match="K >= p_img"):
        dart_quotas(3, 4, 8)
