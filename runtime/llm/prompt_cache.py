"""What a llama.cpp KV cache holds, position by position, so that a new prompt is evaluated only
from the first position where it differs (the next chat turn, the same image again).

Each position has a *virtual* position (what Hugging Face's ``position_ids`` would say: tokens and
image rows count up from 0, except that image rows fed with ``positions`` keep their own offsets,
method.md §6) and an identity: ``(("t", id), v)`` for a token, ``((key, i), v)`` for row i of
injected image rows whose ``key`` names their content (image digest, strategy, its options, K), v
being the virtual position. Equal identities mean equal inputs at equal positions, so with the
same preceding positions the cached keys and values are exactly what a fresh prefill would
compute; rows fed at packed and at original positions never share a cache entry past the first
position where their positions differ.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError, SettingError

POSITION_MODES = ("packed", "original")  # method.md §6: where kept image rows sit


@dataclass(frozen=True, eq=False)
class ImageRows:
    """Embedding rows to inject, with what identifies them for KV-cache reuse: equal keys mean
    equal rows (e.g. image digest, strategy, its options, K).

    ``positions``: each row's offset from the image's first position (strictly increasing ints
    >= 0, may start above 0) and ``span``: positions the image takes (text after it starts at
    image start + span). None: consecutive offsets 0..M-1 and span M (packed positions).
    Example: offsets (3, 7, 8), span 10 after 5 tokens -> rows at 8, 12, 13, text from 15.
    """

    key: Hashable
    rows: np.ndarray  # [M, n_embd] float32
    positions: np.ndarray | None = None  # [M] int64 offsets from the image start, strictly increasing
    span: int | None = None  # positions the image takes, > the last offset; None with positions None

    def __post_init__(self) -> None:
        m = int(self.rows.shape[0])
        if self.positions is None:
            if self.span is not None and self.span != m:
                raise InputError(f"span must be the row count {m} without positions, got {self.span}")
            return
        offsets = np.asarray(self.positions)
        if offsets.shape != (m,) or (m and offsets.dtype.kind not in "iu"):
            raise InputError(f"positions must be [{m}] integers (one per row), "
                             f"got {offsets.dtype} {list(offsets.shape)}")
        offsets = offsets.astype(np.int64)
        if m and (offsets[0] < 0 or np.any(np.diff(offsets) <= 0)):
            raise InputError("positions must be strictly increasing offsets >= 0")
        last = int(offsets[-1]) if m else -1
        if isinstance(self.span, bool) or not isinstance(self.span, (int, np.integer)) or self.span <= last:
            raise InputError(f"span must be an integer above the last offset {last}, got {self.span!r}")
        offsets.setflags(write=False)
        object.__setattr__(self, "positions", offsets)
        object.__setattr__(self, "span", int(self.span))

    @property
    def offsets(self) -> np.ndarray:
        """[M] int64: each row's offset from the image start (0..M-1 when consecutive)."""
        if self.positions is None:
            return np.arange(self.rows.shape[0], dtype=np.int64)
        return self.positions

    @property
    def width(self) -> int:
        """Positions the image takes: ``span``, or M when consecutive."""
        return int(self.rows.shape[0]) if self.span is None else self.span


PromptPiece = Sequence[int] | ImageRows  # token ids, or image rows


def check_positions(mode: str) -> str:
    """``mode`` when it is one of :data:`POSITION_MODES`, else a one-line SettingError."""
    if mode not in POSITION_MODES:
        raise SettingError("positions", f"must be one of {', '.join(POSITION_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Prefill:
    """What :meth:`LlamaBackend.prefill` did: positions evaluated now and reused from the cache."""

    evaluated: int
    reused: int


def virtual_positions(pieces: Sequence[PromptPiece], start: int = 0) -> np.ndarray:
    """[P] int64 strictly increasing: the Hugging Face ``position_ids`` of every position of
    ``pieces`` when the first one sits at ``start``. Example: ``[[1, 2], ImageRows(k, rows[3],
    positions=(1, 2, 5), span=7), [9]]`` -> 0, 1, 3, 4, 7, 9."""
    out, v = [], int(start)
    for piece in pieces:
        if isinstance(piece, ImageRows):
            out.append(v + piece.offsets)
            v += piece.width
        else:
            out.append(v + np.arange(len(piece), dtype=np.int64))
            v += len(piece)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def identities(pieces: Sequence[PromptPiece], start: int = 0) -> list[Hashable]:
    """One hashable per position: ``(("t", id), v)`` for a token, ``((key, i), v)`` for image row
    i, v its virtual position (:func:`virtual_positions` from ``start``)."""
    content: list[Hashable] = []
    for piece in pieces:
        if isinstance(piece, ImageRows):
            content += [(piece.key, i) for i in range(piece.rows.shape[0])]
        else:
            content += [("t", int(t)) for t in piece]
    return list(zip(content, virtual_positions(pieces, start).tolist(), strict=True))


def position_runs(positions: np.ndarray, previous: int) -> list[tuple[int, int, int]]:
    """Split strictly increasing ``positions`` [P] into runs of consecutive values:
    ``(begin, end, gap)`` per run, rows ``begin:end``, ``gap`` = positions skipped before it
    (after ``previous``, the position before the first; -1 when nothing precedes).
    Example: ``position_runs([3, 4, 7], 0) == [(0, 2, 2), (2, 3, 2)]``."""
    p = np.asarray(positions, dtype=np.int64)
    if p.ndim != 1 or np.any(np.diff(p) <= 0) or (p.size and p[0] <= previous):
        raise ValueError(f"positions must be strictly increasing and above {previous}, got {p.tolist()[:8]}...")
    if not p.size:
        return []
    breaks = np.flatnonzero(np.diff(p) > 1) + 1
    begins, ends = np.r_[0, breaks], np.r_[breaks, p.size]
    befores = np.r_[previous, p[ends[:-1] - 1]]
    return [(int(b), int(e), int(p[b] - before - 1)) for b, e, before in zip(begins, ends, befores, strict=True)]


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common prefix. Example: ``common_prefix([1, 2, 3], [1, 2, 4]) == 2``."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
