"""The benchmarks by name: reader, prompt, per-question score and the summary metrics.

Prompts follow LLaVA-1.5's evaluation: the question, a newline and "Answer the question using a
single word or phrase." (VizWiz first asks for "Unanswerable" when the image does not tell).
TextVQA is asked without OCR tokens (the val JSON has none; LLaVA adds Rosetta OCR tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import InputError
from tools.evaluation import scoring
from tools.evaluation.datasets import Dataset, read_mme, read_textvqa, read_vizwiz
from tools.evaluation.easyvqa import read_easyvqa

SHORT_ANSWER = "Answer the question using a single word or phrase."
VIZWIZ_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."

Record = Mapping[str, Any]  # one JSONL line: at least "score", "group" and "image_id"
Reader = Callable[[Path | None, Path | None], Dataset]


def mean_score(records: Sequence[Record]) -> dict[str, float]:
    """``score``: 100 × the mean per-question score; plus the same per non-empty ``group``.

    Example: scores [1, 0.6] in groups ["a", "b"] -> {"score": 80.0, "a": 100.0, "b": 60.0}.
    """
    if not records:
        raise ValueError("no records to summarise")
    out = {"score": 100.0 * sum(r["score"] for r in records) / len(records)}
    for group in sorted({r["group"] for r in records if r["group"]}):
        chosen = [r["score"] for r in records if r["group"] == group]
        out[group] = 100.0 * sum(chosen) / len(chosen)
    return out


def mme_summary(records: Sequence[Record]) -> dict[str, float]:
    """``score`` (all subtasks), ``perception``, ``cognition``; subtask = ``group``, acc+ per ``image_id``."""
    if not records:
        raise ValueError("no records to summarise")
    by_task: dict[str, list[tuple[str, float]]] = {}
    for r in records:
        by_task.setdefault(r["group"], []).append((r["image_id"], r["score"]))
    return scoring.mme_totals({task: scoring.mme_subtask(pairs) for task, pairs in by_task.items()})


@dataclass(frozen=True)
class TaskSpec:
    """How one benchmark is read, asked and scored."""

    name: str
    read: Reader  # (data path or None, images dir or None) -> Dataset
    score: Callable[[str, Sequence[str]], float]  # (prediction, answers) -> [0, 1]
    summarise: Callable[[Sequence[Record]], dict[str, float]]  # records -> metrics, "score" first
    instruction: str  # appended to the question after a newline

    def prompt(self, question: str) -> str:
        """The text the model is asked. Example: "What is it?" -> "What is it?\\nAnswer the ..."."""
        return f"{question}\n{self.instruction}"


def _needs_path(read: Callable[[Path, Path | None], Dataset]) -> Reader:
    def checked(path: Path | None, images: Path | None) -> Dataset:
        if path is None:
            raise InputError("--data is required for this task")
        if not path.exists():
            raise InputError(f"no data at {path}")
        return read(path, images)

    return checked


TASKS: dict[str, TaskSpec] = {
    "textvqa": TaskSpec("textvqa", _needs_path(read_textvqa), scoring.vqa_accuracy, mean_score, SHORT_ANSWER),
    "mme": TaskSpec("mme", _needs_path(read_mme), scoring.mme_correct, mme_summary, SHORT_ANSWER),
    "vizwiz": TaskSpec("vizwiz", _needs_path(read_vizwiz), scoring.vizwiz_accuracy, mean_score,
                       f"{VIZWIZ_HINT}\n{SHORT_ANSWER}"),
    "easyvqa": TaskSpec("easyvqa", read_easyvqa, scoring.exact_accuracy, mean_score, SHORT_ANSWER),
}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
