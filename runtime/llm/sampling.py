"""Pure helpers of text generation: next-token sampling and stop-string scanning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def top_p_keep(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Ids kept by nucleus (top-p) filtering of ``probs [n_vocab]``, most probable first (int64).

    The smallest prefix of the ids sorted by descending probability (stable: ties by smaller
    id) whose mass reaches ``top_p`` of the total. Example: [0.1, 0.6, 0.3], top_p 0.8 -> [1, 2].
    """
    if probs.ndim != 1 or probs.shape[0] == 0 or not 0 < top_p <= 1:
        raise ValueError(f"need probs [n_vocab] with n_vocab > 0 and 0 < top_p <= 1, got {probs.shape}, {top_p}")
    order = np.argsort(-probs.astype(np.float64), kind="stable")
    mass = np.cumsum(probs[order].astype(np.float64))
    count = min(int(np.searchsorted(mass, top_p * mass[-1])) + 1, len(order))
    return order[:count].astype(np.int64)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Next token id from ``logits [n_vocab]``: argmax at ``temperature == 0``, else a draw from
    softmax(logits / temperature) (float64) restricted to :func:`top_p_keep` and renormalised.
    Example: logits [0, 2, 1], temperature 0 -> 1; top_p 1e-9 at any temperature -> 1.
    """
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be [n_vocab] with n_vocab > 0, got {logits.shape}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    keep = top_p_keep(probs / probs.sum(), top_p)
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])


@dataclass(frozen=True)
class StopScan:
    """Result of feeding text to :class:`StopScanner`."""

    text: str  # safe to emit now
    stopped: bool  # a stop string was found; ``text`` ends right before it


class StopScanner:
    """Streams text while holding back any tail that could start a stop string.

    Independent of how the text is cut into pieces: generation stops at the first character
    that completes a stop string; the text emitted ends before the earliest-starting stop string
    complete at that point. Example: stops ["</s>"]; feed("Hi <") -> "Hi ", feed("/s> x") -> ""
    and stopped.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> StopScan:
        """Add ``text``; return what can be emitted and whether generation must stop."""
        start = len(self._pending)
        self._pending += text
        for end in range(start + 1, len(self._pending) + 1):  # first character completing a stop
            seen = self._pending[:end]
            if any(seen.endswith(s) for s in self._stops):
                first = min(seen.find(s) for s in self._stops if s in seen)
                self._pending = ""
                return StopScan(seen[:first], True)
        hold = max(
            (n for s in self._stops for n in range(len(s) - 1, 0, -1) if self._pending.endswith(s[:n])), default=0
        )
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return StopScan(out, False)

    def flush(self) -> str:
        """The held-back text once generation ends without a stop string."""
        out, self._pending = self._pending, ""
        return out
