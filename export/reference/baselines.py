"""PyTorch reference of the baseline selectors (method.md §3): uniform, VisionZip and DivPrune,
pure tensor functions with the conventions of :mod:`export.reference.vision` (float64 scores and
cosines, int64 indices, ties to the smaller index).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from export.reference.vision import TokenSet, check_budget, check_ndim, cosine_matrix, rank_descending


def uniform_indices(n: int, budget: int) -> Tensor:
    """[K] int64 indices floor((i + 0.5)·N/K), exact integer arithmetic. (8, 2) -> [2, 6]."""
    check_budget(budget, n)
    i = torch.arange(budget, dtype=torch.int64)
    return ((2 * i + 1) * n) // (2 * budget)


def visionzip_contextual(budget: int) -> int:
    """C = round(5K/32), halves rounded up (decided here): 64 -> 10, 128 -> 20, 16 -> 3."""
    return (5 * budget + 16) // 32


def visionzip_select(features: Tensor, attn_f: Tensor, keys: Tensor, budget: int) -> TokenSet:
    """VisionZip (method.md §3): K-C dominant patches by head-summed attention, then C contextual.

    features [N, D], attn_f [H, N] (block f), keys [N, D/H]. A target with no members is
    ``x_target`` itself (VisionZip's clamped count). Output: dominant ascending, then the
    contextual tokens in target (raster) order; ``kept`` holds their target indices.
    """
    check_ndim(attn_f, 2, "attn_f [H, N]")
    n = int(features.shape[0])
    if attn_f.shape[1] != n or keys.shape[0] != n:
        raise ValueError(
            f"attn_f [H, {n}] and keys [{n}, D/H] expected, got "
            f"{tuple(attn_f.shape)}, {tuple(keys.shape)}"
        )
    check_budget(budget, n)
    c = visionzip_contextual(budget)
    dominant = torch.sort(rank_descending(attn_f.to(torch.float64).sum(0))[: budget - c]).values
    ones = torch.ones(budget - c, dtype=torch.int64, device=features.device)
    if c == 0:
        return TokenSet(kept=dominant, tokens=features[dominant], counts=ones)
    rest = torch.ones(n, dtype=torch.bool, device=features.device)
    rest[dominant] = False
    remaining = torch.nonzero(rest).flatten()
    is_target = torch.zeros(remaining.shape[0], dtype=torch.bool, device=features.device)
    is_target[torch.arange(0, remaining.shape[0], max(1, remaining.shape[0] // c))[:c]] = True
    targets, members = remaining[is_target], remaining[~is_target]
    assign = torch.argmax(cosine_matrix(keys[members], keys[targets]), dim=1)
    sums = torch.zeros(c, features.shape[1], dtype=torch.float64, device=features.device)
    sums = sums.index_add(0, assign, features[members].to(torch.float64))
    n_members = torch.zeros(c, dtype=torch.int64, device=features.device)
    n_members = n_members.index_add(0, assign, torch.ones_like(assign))
    context = features[targets].to(torch.float64) + sums / n_members.clamp_min(1)[:, None]
    return TokenSet(
        kept=torch.cat([dominant, targets]),
        tokens=torch.cat([features[dominant], context.to(features.dtype)]),
        counts=torch.cat([ones, 1 + n_members]),
    )


def divprune_select(embeddings: Tensor, budget: int) -> Tensor:
    """DivPrune on [N, E] projected embeddings -> [K] int64 ascending (greedy max-min diversity).

    Distance 1 - cos (norms clipped at 1e-6). First pick: the token whose nearest *other*
    token is farthest (the diagonal is excluded); then repeatedly the unpicked token farthest
    from its nearest picked one. Example: E = [[1, 0], [1, 0.1], [0, 1]], K = 2 -> [0, 2].
    """
    check_ndim(embeddings, 2, "embeddings [N, E]")
    n = int(embeddings.shape[0])
    check_budget(budget, n)
    dist = 1.0 - cosine_matrix(embeddings, embeddings)
    eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    nearest_other = dist.masked_fill(eye, math.inf).min(dim=1).values if n > 1 else dist[:, 0]
    picked = torch.zeros(n, dtype=torch.bool, device=embeddings.device)
    first = int(torch.argmax(nearest_other))
    picked[first] = True
    to_picked = dist[first].clone()  # distance of every token to its nearest picked token
    for _ in range(budget - 1):
        nxt = int(torch.argmax(to_picked.masked_fill(picked, -math.inf)))
        picked[nxt] = True
        to_picked = torch.minimum(to_picked, dist[nxt])
    return torch.nonzero(picked).flatten()
