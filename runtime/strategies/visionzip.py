"""VisionZip (method.md §3): dominant tokens by [CLS] attention plus merged contextual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.selection import check_budget
from runtime.strategies.registry import CLS_ATTN, KEYS, register
from runtime.types import PruneInputs, Selection

NORM_FLOOR = 1e-6  # key norms are clipped here before the cosine (as in method.md §1)


@dataclass(frozen=True)
class VisionZipOptions:
    """VisionZip has no options: the dominant/contextual split is fixed by the budget."""


def contextual_count(budget: int) -> int:
    """C = round(5K/32), rounding halves up: floor(5K/32 + 0.5). Example: 64 -> 10, 4 -> 1."""
    return int(np.floor(5 * budget / 32 + 0.5))


def contextual_groups(
    keys: np.ndarray, remaining: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Targets ``[C]`` and each remaining patch's target position ``[R]`` (-1 for the targets).

    ``remaining [R]`` are patch indices in raster order; the targets are every max(1, R // C)-th
    of them, the first C; every other one joins the target whose key has the highest cosine
    (ties: the earlier target). R >= C always holds (R = N − K + C with K <= N).
    Example: R = 5, C = 2 -> step 2, targets remaining[[0, 2]].
    """
    r = remaining.shape[0]
    if count == 0:
        return np.zeros(0, np.int64), np.full(r, -1, np.int64)
    step = max(1, r // count)
    target_pos = np.arange(0, r, step)[:count]
    targets = remaining[target_pos]
    unit = keys.astype(np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), NORM_FLOOR)
    sim = unit[remaining] @ unit[targets].T  # [R, C]
    assign = np.argmax(sim, axis=1).astype(np.int64)
    assign[target_pos] = -1
    return targets.astype(np.int64), assign


def visionzip_select(features: np.ndarray, cls_attn: np.ndarray, keys: np.ndarray,
                     budget: int) -> Selection:
    """VisionZip on ``features [N, D]``, block-f ``cls_attn [H, N]``, ``keys [N, d]``: K tokens.

    Dominant K − C patches by head-summed attention (ties: smaller index), ascending; then C
    contextual tokens x_target + mean(members) in target order (a target with no members stays
    x_target, as the original's count clamp does). Example: N = 4, K = 4 -> C = 1, kept
    = the 3 most attended ascending, then the fourth patch alone.
    """
    n, _ = features.shape
    if cls_attn.ndim != 2 or cls_attn.shape[1] != n or keys.shape[0] != n:
        raise ValueError(
            f"need cls_attn [H, {n}] and keys [{n}, d], got {cls_attn.shape}, {keys.shape}"
        )
    count = contextual_count(budget)
    score = cls_attn.astype(np.float64).sum(axis=0)
    dominant = np.sort(np.argsort(-score, kind="stable")[: budget - count]).astype(np.int64)
    remaining = np.setdiff1d(np.arange(n, dtype=np.int64), dominant)  # sorted: raster order
    targets, assign = contextual_groups(keys, remaining, count)
    x = features.astype(np.float64)
    sums = np.zeros((count, x.shape[1]))
    members = np.zeros(count, np.int64)
    joined = assign >= 0
    np.add.at(sums, assign[joined], x[remaining[joined]])
    np.add.at(members, assign[joined], 1)
    contextual = x[targets] + sums / np.maximum(members, 1)[:, None]
    tokens = np.concatenate([x[dominant], contextual]).astype(np.float32)
    kept = np.concatenate([dominant, targets])
    counts = np.concatenate([np.ones(dominant.shape[0], np.int64), 1 + members])
    assignment = np.full(n, -1, np.int64)
    assignment[kept] = np.arange(kept.shape[0])
    assignment[remaining[joined]] = dominant.shape[0] + assign[joined]
    report = {"dominant": int(dominant.shape[0]), "contextual": int(count)}
    return Selection(kept=kept, tokens=tokens, counts=counts, report=report, assignment=assignment)


@register("visionzip", VisionZipOptions, needs=(CLS_ATTN, KEYS))
def visionzip(inputs: PruneInputs, budget: int, options: VisionZipOptions) -> Selection:
    """Strategy ``visionzip``: the block-f [CLS] attention and keys of the encoder output."""
    enc = inputs.encoded
    budget = check_budget(budget, enc.num_patches)
    return visionzip_select(enc.features, enc.cls_attn[-1], enc.keys, budget)
