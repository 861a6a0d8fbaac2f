"""What tools/bench.py measures and returns, shared with its report writer (tools/benchkit/report.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import InputError
from runtime.llm.probe import DEFAULT_QUESTION
from runtime.llm.prompt_cache import check_positions
from runtime.strategies.registry import get_strategy

STAGES = ("preprocess", "encode", "prune", "projector", "text_tower", "probe", "prefill", "first_token")
RANDOM_ROW_STD = 0.02  # projected LLaVA rows are roughly this size (as tools/bench_llm.py)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure (CLI flags map one to one)."""

    bundle: Path
    gguf: Path | None = None
    strategies: tuple[str, ...] = ()  # empty: every registered strategy
    tokens: tuple[int, ...] = ()  # empty: the family's defaults (64 128 192; LLaVA-NeXT 640 320 160)
    images: int = 2
    repeats: int = 3
    decode_tokens: int = 16
    threads: int | None = None
    question: str = DEFAULT_QUESTION
    positions: str = "packed"  # method.md §6: "packed" or "original" (the image rows at their true positions)

    def __post_init__(self) -> None:
        if self.images < 1 or self.repeats < 1 or self.decode_tokens < 1:
            raise InputError(f"need --images, --repeats, --decode-tokens >= 1; got {self.images}, "
                             f"{self.repeats}, {self.decode_tokens}")
        for name in self.strategies:
            get_strategy(name)  # unknown names: one line listing the valid ones
        check_positions(self.positions)


@dataclass(frozen=True)
class StageRow:
    """Medians of one (strategy, K)."""

    strategy: str
    tokens: int  # K image tokens fed to the LLM (median over the runs; all of them for `none`)
    stages_ms: Mapping[str, float]  # every name in STAGES (0.0 where the stage does not run)
    ttft_ms: float  # the sum of stages_ms
    decode_tokens_per_s: float
    prefill_positions: int  # positions the prompt spans: prompt tokens + rows fed (+ the gaps, "original")
    runs: int  # images × repeats behind each median
    newline_rows: int = 0  # LLaVA-NeXT's image_newline rows fed besides the K tokens (median)
    peak_rss_mb: float = 0.0  # the most resident memory while pruning and running the LLM (max over runs)

    @property
    def rows_fed(self) -> int:
        """Image rows the LLM is fed: K tokens + newline rows."""
        return self.tokens + self.newline_rows


@dataclass(frozen=True)
class LlmInfo:
    """The language model the LLM stages ran on."""

    path: str
    n_embd: int
    projector_dim: int
    probe: str  # where the probe came from

    @property
    def random_rows(self) -> bool:
        return self.n_embd != self.projector_dim

    def note(self) -> str:
        if not self.random_rows:
            return f"LLM {Path(self.path).name} (n_embd {self.n_embd}) fed the projected rows"
        return (f"LLM {Path(self.path).name} has n_embd {self.n_embd} ≠ projector width {self.projector_dim}: "
                f"its stages (probe, prefill, decode) got random rows N(0, {RANDOM_ROW_STD}²) of width "
                f"{self.n_embd}; preprocess, encode, prune and projector are real")


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    llm: LlmInfo
    rows: tuple[StageRow, ...]
    skipped: tuple[str, ...] = ()  # strategies that could not run, with the reason
    family: str = "llava-1.5"  # the bundle's (manifest ``family``)
    peak_rss_mb: float = 0.0  # the whole run's peak resident memory
    rss_per_run: bool = True  # False: the kernel kept its high-water mark, each run's is the process's so far
    mtmd: Mapping[str, Any] | None = field(default=None)
