"""Merge removed patches into their most similar kept patch (method.md §1.6).

Runs on the encoder features X, before the projector (a mean does not commute with the MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MERGE_MODES = ("mean", "none")
NORM_FLOOR = 1e-6  # feature norms are clipped below at this value in the cosine
DROPPED = -1  # assignment of a removed patch under merge="none": it is dropped, not merged


@dataclass(frozen=True)
class MergeResult:
    """The K output tokens and who they stand for."""

    tokens: np.ndarray  # [K, D] float32: merged features, in the order of ``kept``
    counts: np.ndarray  # [K] int64: patches per token (itself + members); all 1 for merge="none"
    assignment: np.ndarray  # [N] int64: position in ``kept`` of each patch's token, or DROPPED


def assign_to_kept(features: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """[N, D] features, [K] kept indices -> [N] int64 position in ``kept`` of each patch's target.

    A kept patch maps to its own position; a removed patch j maps to argmax_i cos(x_j, x_kept[i])
    (float64, norms clipped at ``NORM_FLOOR``; ties to the smaller position).
    Example: X = [[1, 0], [0, 1], [1, 0.1]], kept = [0, 1] -> ``[0, 1, 0]``.
    """
    x, idx = _check(features, kept)
    targets = x[idx]
    targets /= np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), NORM_FLOOR)
    # |x_j| is constant along row j, so the argmax of x_j · unit(x_i) is that of the cosine
    similarity = x @ targets.T  # [N, K]
    assignment = np.argmax(similarity, axis=1).astype(np.int64)  # argmax: first = smaller position
    assignment[idx] = np.arange(idx.shape[0], dtype=np.int64)
    return assignment


def merge_tokens(features: np.ndarray, kept: np.ndarray, mode: str = "mean") -> MergeResult:
    """[N, D] features, [K] kept -> K tokens; "mean": x'_i = (x_i + sum_{t(j)=i} x_j) / (1 + n_i).

    Sums are accumulated in float64 in ascending patch order and returned as float32.
    "none" returns x_kept unchanged with counts 1 and DROPPED for every removed patch.
    Example: X = [[1, 0], [0, 1], [3, 0.3]], kept = [0, 1]
    -> tokens [[2, 0.15], [0, 1]], counts [2, 1].
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    x, idx = _check(features, kept)
    k = idx.shape[0]
    if mode == "none":
        assignment = np.full(x.shape[0], DROPPED, dtype=np.int64)
        assignment[idx] = np.arange(k, dtype=np.int64)
        return MergeResult(x[idx].astype(np.float32), np.ones(k, dtype=np.int64), assignment)
    assignment = assign_to_kept(x, idx)
    counts = np.bincount(assignment, minlength=k).astype(np.int64)  # every target has itself: >= 1
    order = np.argsort(assignment, kind="stable")  # grouped by target, ascending patch order inside
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.add.reduceat(x[order], starts, axis=0)  # row j summed into its target (kept rows too)
    return MergeResult((sums / counts[:, None]).astype(np.float32), counts, assignment)


def _check(features: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and indices; return (float64 [N, D] features, int64 [K] kept)."""
    x = np.asarray(features)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {x.shape}")
    idx = np.asarray(kept)
    if idx.ndim != 1 or idx.shape[0] == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"kept must be a non-empty [K] integer array, got {idx.dtype} {idx.shape}")
    n = x.shape[0]
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"kept indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    if np.unique(idx).shape[0] != idx.shape[0]:
        raise ValueError("kept indices must be unique")
    return x.astype(np.float64), idx.astype(np.int64)
