"""Helpers shared by the benchmark tools: sample images, markdown tables, medians, greedy decoding."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tools.sample_photos import photo

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


def sample_images(count: int) -> list[np.ndarray]:
    """Real photos from scikit-image when installed, else seeded noise images (H×W×3 uint8)."""
    try:
        return [photo(name) for name in PHOTO_NAMES[:count]]
    except ImportError:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (400, 500, 3), dtype=np.uint8) for _ in range(count)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column (``l``/``r``, default ``l``).

    Example: markdown_table(["a", "b"], [[1, 2]], "lr") -> "| a | b |\\n|---|---:|\\n| 1 | 2 |".
    """
    marks = [("---:" if (align[i:i + 1] == "r") else "---") for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, the header {len(header)}: {row}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def timed_ms(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), wall milliseconds)``."""
    start = time.perf_counter()
    result = fn()
    return result, 1000.0 * (time.perf_counter() - start)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (0.0 for an empty one: a stage that never ran)."""
    return float(statistics.median(values)) if len(values) else 0.0


def decode_greedy_ms(backend: Any, tokens: int) -> float:
    """Greedily decode ``tokens`` tokens after the evaluated prompt (EOS ignored); wall ms.

    ``backend`` is a :class:`runtime.llm.LlamaBackend` whose last evaluation left logits.
    """
    start = time.perf_counter()
    for _ in range(tokens):
        backend.eval_tokens([int(np.argmax(backend.logits()))])
    return 1000.0 * (time.perf_counter() - start)
