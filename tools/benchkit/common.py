"""Helpers shared by the benchmark tools: sample images, markdown tables, medians, greedy decoding,
peak resident memory, and the vision side of a bundle of either family (:func:`open_vision`).

:class:`FlatVision` (LLaVA-1.5's single view, ``runtime.pipeline.Pipeline``) and
:class:`TiledVision` (LLaVA-NeXT's tiles, ``runtime.anyres.pipeline.AnyresPipeline``) give the
benchmarks one interface: encode an image (preprocess and encode timed), prune it at K into the
rows the language model is fed (newline rows included) with the prune-side stage times.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle.manifest import load_manifest
from runtime.errors import SettingError
from runtime.strategies.capabilities import refusal
from runtime.strategies.registry import get_strategy
from tools.sample_photos import photo

PROMPT_ROOM = 512  # probe context positions for the prompt text around LLaVA-1.5's image rows
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

    ``backend`` is a :class:`runtime.llm.backend.LlamaBackend` whose last evaluation left logits.
    """
    start = time.perf_counter()
    for _ in range(tokens):
        backend.eval_tokens([int(np.argmax(backend.logits()))])
    return 1000.0 * (time.perf_counter() - start)


def _status_mb(field: str) -> float | None:
    """``/proc/self/status`` field (``VmHWM``, ``VmRSS``) in MB; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _vm_hwm_mb() -> float:
    """This process's resident high-water mark in MB (Linux ``VmHWM``; elsewhere ``ru_maxrss``)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class PeakRss:
    """Peak resident memory per measured span and of the whole run (MB).

    ``start()`` resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux); where that
    is not possible (``separable`` False) a span reports the process's high-water mark so far."""

    def __init__(self) -> None:
        self.overall = _vm_hwm_mb()
        self.separable = True

    def start(self) -> None:
        self.overall = max(self.overall, _vm_hwm_mb())
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # 5: reset the peak RSS to the current RSS
        except OSError:
            self.separable = False
            return
        rss, hwm = _status_mb("VmRSS"), _status_mb("VmHWM")
        if rss is None or hwm is None or hwm > rss + 1.0:  # the write was accepted but changed nothing
            self.separable = False

    def stop(self) -> float:
        """The peak since :meth:`start`."""
        peak = _vm_hwm_mb()
        self.overall = max(self.overall, peak)
        return peak


@dataclass(frozen=True)
class PrunedRows:
    """One image pruned at K, as the benchmarks see it."""

    embeddings: np.ndarray  # [R, E] float32: the rows the language model is fed, newline rows included
    tokens: int  # image tokens among them (K; all of them for a strategy that keeps all)
    newline_rows: int  # R - tokens (LLaVA-NeXT's image_newline rows; 0 for LLaVA-1.5)
    stages_ms: Mapping[str, float]  # prune, projector, text_tower, probe
    positions: np.ndarray | None = None  # [R] int64 offsets from the image start (positions "original")
    span: int | None = None  # positions the image takes; None with positions None (packed)


class FlatVision:
    """LLaVA-1.5: one 336×336 view of N patches (``runtime.pipeline.Pipeline``)."""

    default_tokens = (64, 128, 192)

    def __init__(self, pipeline: Any) -> None:
        self.pipeline, self.manifest = pipeline, pipeline.manifest
        self.probe_ctx = self.manifest.vision.num_patches + PROMPT_ROOM  # positions the probe's context needs

    def encode(self, image: Any) -> tuple[Any, float, float]:
        """``(encoded, preprocess ms, encode ms)``."""
        pixels, pre = timed_ms(lambda: self.pipeline.pixel_values(image))
        encoded, enc = timed_ms(lambda: self.pipeline.encoder.encode(pixels))
        return encoded, pre, enc

    def budgets(self, strategy: str, tokens: Sequence[int]) -> tuple[int, ...]:
        """The K values to run ``strategy`` at, each checked (1..N); N alone for a strategy keeping all."""
        ks = (self.pipeline.num_patches,) if get_strategy(strategy).keeps_all else tuple(tokens)
        return tuple(self.pipeline.check_budget(k) for k in ks)

    def refusal(self, strategy: str) -> str | None:
        return refusal(get_strategy(strategy), self.manifest)

    def prune(self, encoded: Any, k: int, strategy: str, probe: Any = None, question: str | None = None,
              positions: str = "packed") -> PrunedRows:
        """``positions``: method.md §6 ``packed`` or ``original`` (rows in patch order at their indices)."""
        pruned = self.pipeline.prune_encoded(encoded, k, strategy, probe, question)
        t = pruned.timings_ms
        stages = {"prune": t["prune"], "projector": t.get("project_all", 0.0) + t["project"],
                  "text_tower": t.get("text_tower", 0.0) + t.get("clip_image", 0.0), "probe": t.get("probe", 0.0)}
        placed = pruned.image_rows(None, positions)
        return PrunedRows(placed.rows, pruned.tokens, 0, stages, placed.positions, placed.span)


class TiledVision:
    """LLaVA-NeXT: a base view plus a grid of 336×336 tiles, encoded as one batch, pruned per tile
    and packed with ``image_newline`` rows (``runtime.anyres.pipeline.AnyresPipeline``). The prune
    stage includes the K split and, for cdpruner, the question's text tower (not timed apart); the
    probe strategies' one probe of every packed row is timed apart."""

    default_tokens = (640, 320, 160)

    def __init__(self, pipeline: Any) -> None:
        self.pipeline, self.manifest = pipeline, pipeline.manifest
        self.probe_ctx = pipeline.probe_context()  # every packed row of the largest pinpoint + text room

    def encode(self, image: Any) -> tuple[Any, float, float]:
        encoded = self.pipeline.encode(image)
        return encoded, encoded.timings_ms["preprocess"], encoded.timings_ms["encode"]

    def budgets(self, strategy: str, tokens: Sequence[int]) -> tuple[int, ...]:
        """The K values (checked per image when pruning: the candidates depend on its size); 0 stands
        for "all rows" when ``strategy`` keeps all."""
        if get_strategy(strategy).keeps_all:
            return (0,)
        if any(k < 1 for k in tokens):
            raise SettingError("tokens", f"must be >= 1, got {list(tokens)}")
        return tuple(tokens)

    def refusal(self, strategy: str) -> str | None:
        return refusal(get_strategy(strategy), self.manifest)

    def prune(self, encoded: Any, k: int, strategy: str, probe: Any = None, question: str | None = None,
              positions: str = "packed") -> PrunedRows:
        """``positions``: method.md §6 ``packed`` or ``original`` (each row at its place in the full pack)."""
        pruned = self.pipeline.prune_encoded(encoded, k, strategy, question=question, probe=probe)
        newlines, t = int(pruned.order.is_newline.sum()), pruned.timings_ms
        stages = {"prune": t["prune"], "projector": t.get("project_all", 0.0) + t["project"], "text_tower": 0.0,
                  "probe": t.get("probe", 0.0)}
        placed = pruned.image_rows(None, positions)
        return PrunedRows(placed.rows, pruned.tokens, newlines, stages, placed.positions, placed.span)


def open_vision(bundle: str | Path, threads: int | None = None) -> FlatVision | TiledVision:
    """The vision side of ``bundle``: :class:`TiledVision` when its manifest has ``anyres``."""
    manifest = load_manifest(bundle)
    if manifest.anyres is not None:
        from runtime.anyres.pipeline import AnyresPipeline

        return TiledVision(AnyresPipeline(manifest, threads=threads))
    from runtime.pipeline import Pipeline

    return FlatVision(Pipeline(manifest, threads=threads))
