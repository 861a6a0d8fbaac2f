"""Assignment of removed patches and mean merging (method.md §1.6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.merging import DROPPED, NORM_FLOOR, assign_to_kept, merge_tokens

MERGE_RTOL = 1e-6  # float64 sums cast to float32: both sides round the same float64 value
MERGE_ATOL = 1e-6  # absolute slack for coordinates near zero, well below feature scale (~1)

HAND_X = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.3], [0.2, 2.0], [0.0, 0.0]], dtype=np.float32)
HAND_KEPT = np.array([0, 1])


def loop_assign(x: np.ndarray, kept: list[int]) -> list[int]:
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        dot = sum(float(p) * float(q) for p, q in zip(a, b, strict=True))
        na = max(math.sqrt(sum(float(p) ** 2 for p in a)), NORM_FLOOR)
        nb = max(math.sqrt(sum(float(q) ** 2 for q in b)), NORM_FLOOR)
        return dot / (na * nb)

    out = []
    for j in range(x.shape[0]):
        if j in kept:
            out.append(kept.index(j))
            continue
        best, best_pos = -math.inf, -1
        for pos, i in enumerate(kept):
            c = cos(x[j], x[i])
            if c > best:  # strict: the first (smaller) position wins ties
                best, best_pos = c, pos
        out.append(best_pos)
    return out


def loop_merge(x: np.ndarray, kept: list[int]) -> tuple[np.ndarray, list[int]]:
    target = loop_assign(x, kept)
    tokens, counts = [], []
    for pos in range(len(kept)):
        members = [j for j in range(x.shape[0]) if target[j] == pos]  # includes kept[pos] itself
        total = [sum(float(x[j, d]) for j in members) for d in range(x.shape[1])]
        tokens.append([t / len(members) for t in total])
        counts.append(len(members))
    return np.array(tokens, dtype=np.float32), counts


def test_hand_computed_assignment_and_mean() -> None:
    assignment = assign_to_kept(HAND_X, HAND_KEPT)
    assert assignment.dtype == np.int64
    # patch 4 is all zeros: the norm floor makes every cosine 0 and the tie goes to position 0
    np.testing.assert_array_equal(assignment, [0, 1, 0, 1, 0])
    result = merge_tokens(HAND_X, HAND_KEPT)
    assert result.tokens.dtype == np.float32 and result.counts.dtype == np.int64
    np.testing.assert_array_equal(result.counts, [3, 2])
    np.testing.assert_array_equal(result.assignment, assignment)
    expected = [[(1 + 3 + 0) / 3, (0 + 0.3 + 0) / 3], [(0 + 0.2) / 2, (1 + 2) / 2]]
    np.testing.assert_allclose(result.tokens, expected, rtol=MERGE_RTOL, atol=MERGE_ATOL,
                               err_msg="(x_i + sum of members) / (1 + n_i)")


def test_exact_cosine_tie_goes_to_smaller_position() -> None:
    x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_array_equal(assign_to_kept(x, np.array([1, 0])), [1, 0, 0])
    np.testing.assert_array_equal(assign_to_kept(x, np.array([0, 1])), [0, 1, 0])


def test_kept_patch_maps_to_itself_even_next_to_a_duplicate() -> None:
    x = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 4.0], [0.0, 1.0]])
    np.testing.assert_array_equal(assign_to_kept(x, np.array([0, 1])), [0, 1, 0, 0])


def test_merge_none_keeps_features_and_drops_the_rest() -> None:
    result = merge_tokens(HAND_X, HAND_KEPT, mode="none")
    np.testing.assert_array_equal(result.tokens, HAND_X[HAND_KEPT])
    np.testing.assert_array_equal(result.counts, [1, 1])
    np.testing.assert_array_equal(result.assignment, [0, 1, DROPPED, DROPPED, DROPPED])


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    kept = sorted(rng.choice(60, size=9, replace=False).tolist())
    ref_tokens, ref_counts = loop_merge(x, kept)
    result = merge_tokens(x, np.array(kept))
    np.testing.assert_array_equal(result.assignment, loop_assign(x, kept))
    np.testing.assert_array_equal(result.counts, ref_counts)
    np.testing.assert_allclose(result.tokens, ref_tokens, rtol=MERGE_RTOL, atol=MERGE_ATOL,
                               err_msg="merged tokens vs loop reference")


def test_negative_controls_fail_at_the_same_tolerance() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    kept = sorted(rng.choice(60, size=9, replace=False).tolist())
    ref_tokens, _ = loop_merge(x, kept)
    result = merge_tokens(x, np.array(kept))
    members_only = np.zeros_like(ref_tokens)  # forgets the kept token itself
    for pos in range(len(kept)):
        members = [j for j in range(60) if result.assignment[j] == pos and j != kept[pos]]
        members_only[pos] = x[members].mean(axis=0) if members else x[kept[pos]]
    assert not np.allclose(members_only, ref_tokens, rtol=MERGE_RTOL, atol=MERGE_ATOL)
    euclidean = np.argmin(((x[:, None, :] - x[kept][None]) ** 2).sum(-1), axis=1)  # not cosine
    euclidean[kept] = np.arange(len(kept))
    assert not np.array_equal(euclidean, result.assignment)
    summed = result.tokens * result.counts[:, None]  # sum, not mean
    assert not np.allclose(summed, ref_tokens, rtol=MERGE_RTOL, atol=MERGE_ATOL)


@pytest.mark.parametrize(
    ("kept", "error"),
    [
        (np.array([0, 0]), "unique"),
        (np.array([0, 5]), r"\[0, 5\), got \[0, 5\]"),
        (np.array([-1, 2]), r"\[0, 5\)"),
        (np.array([0.0, 1.0]), "integer"),
        (np.zeros(0, dtype=np.int64), "non-empty"),
    ],
)
def test_bad_kept_indices(kept: np.ndarray, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        merge_tokens(HAND_X, kept)


def test_bad_features_and_mode() -> None:
    with pytest.raises(ValueError, match=r"\[N, D\].*\(5,\)"):
        assign_to_kept(np.ones(5), np.array([0]))
    with pytest.raises(ValueError, match="merge mode"):
        merge_tokens(HAND_X, HAND_KEPT, mode="max")
