"""What a llama.cpp KV cache holds, position by position, so that a new prompt is evaluated only
from the first position where it differs (the next chat turn, the same image again).

Each position has an identity: ``("t", id)`` for a token, ``(key, i)`` for row i of injected
image rows whose ``key`` names their content (image digest, strategy, its options, K). Equal
identities mean equal inputs at that position, so with the same preceding positions the cached
keys and values are exactly what a fresh prefill would compute.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageRows:
    """Embedding rows to inject, with what identifies them for KV-cache reuse: equal keys mean
    equal rows (e.g. image digest, strategy, its options, K)."""

    key: Hashable
    rows: np.ndarray  # [M, n_embd] float32


PromptPiece = Sequence[int] | ImageRows  # token ids, or image rows


@dataclass(frozen=True)
class Prefill:
    """What :meth:`LlamaBackend.prefill` did: positions evaluated now and reused from the cache."""

    evaluated: int
    reused: int


def identities(pieces: Sequence[PromptPiece]) -> list[Hashable]:
    """One hashable per position: ``("t", id)`` for a token, ``(key, i)`` for image row i."""
    out: list[Hashable] = []
    for piece in pieces:
        if isinstance(piece, ImageRows):
            out += [(piece.key, i) for i in range(piece.rows.shape[0])]
        else:
            out += [("t", int(t)) for t in piece]
    return out


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common prefix. Example: ``common_prefix([1, 2, 3], [1, 2, 4]) == 2``."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
