"""The evaluation loop: every (question, strategy, budget) once, one JSONL line each, resumable.

Lines are appended with flush + fsync, so a crash loses at most the line being written; on
start the file is read, a torn last line is cut off, and keys already present are skipped.
``none`` keeps all N tokens whatever the budget: it runs once per question, with ``tokens`` 0.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from runtime.cli import log
from runtime.errors import InputError
from tools.evaluation.datasets import Dataset
from tools.evaluation.tasks import TaskSpec

NONE = "none"
ALL_TOKENS = 0  # the ``tokens`` of a ``none`` line: every patch is kept
KEY_FIELDS = ("task", "question_id", "strategy", "tokens")


class Answerer(Protocol):
    """A model that answers a question about an image with its visual tokens pruned."""

    def answer(self, image: Image.Image, question: str, strategy: str, tokens: int) -> str: ...


@dataclass(frozen=True)
class RunKey:
    """What one JSONL line is about; a line exists at most once per key."""

    task: str
    question_id: str
    strategy: str
    tokens: int  # K, or ALL_TOKENS for ``none``

    @classmethod
    def of(cls, record: dict[str, Any]) -> RunKey:
        return cls(str(record["task"]), str(record["question_id"]), str(record["strategy"]), int(record["tokens"]))


@dataclass(frozen=True)
class Run:
    """One (strategy, budget) column cell of the table."""

    strategy: str
    tokens: int


def plan_runs(strategies: Sequence[str], budgets: Sequence[int]) -> tuple[Run, ...]:
    """Every strategy at every budget, ``none`` once. Example: (none, entropy), (64, 128) ->
    none@0, entropy@64, entropy@128."""
    if not strategies or not budgets:
        raise InputError("need at least one strategy and one budget")
    bad = [k for k in budgets if k < 1]
    if bad:
        raise InputError(f"--tokens must be >= 1, got {bad[0]}")
    runs: list[Run] = []
    for strategy in dict.fromkeys(strategies):
        for k in ([ALL_TOKENS] if strategy == NONE else dict.fromkeys(budgets)):
            runs.append(Run(strategy, k))
    return tuple(runs)


class ResultsFile:
    """An append-only JSONL file of result lines."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[RunKey, dict[str, Any]]:
        """Existing lines by key (a torn last line is removed from the file first)."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log(f"{self.path}: dropping an incomplete last line ({len(data) - keep} bytes)")
            with self.path.open("r+b") as handle:
                handle.truncate(keep)
            data = data[:keep]
        done: dict[RunKey, dict[str, Any]] = {}
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done[RunKey.of(record)] = record
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{self.path}: line {number} is not a result line; fix or move the file") from None
        return done

    def append(self, record: dict[str, Any]) -> None:
        """Write one line and make it durable (flush + fsync)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def run_eval(task: TaskSpec, dataset: Dataset, answerer: Answerer, runs: Sequence[Run], results: ResultsFile,
             model: str = "", progress: Callable[[str], None] = log) -> dict[RunKey, dict[str, Any]]:
    """Answer every missing (question, run); return the lines of this evaluation by key."""
    done = results.load()
    wanted = [(item, RunKey(task.name, item.question_id, r.strategy, r.tokens))
              for item in dataset.items for r in runs]
    todo = sum(key not in done for _, key in wanted)
    others = sorted({str(done[key].get("model")) for _, key in wanted if key in done} - {model})
    if others:
        progress(f"warning: {results.path} already holds lines of model(s) {', '.join(others)}; they are "
                 f"reused for {model} (use one --out file per model)")
    progress(f"{task.name}: {len(dataset.items)} questions × {len(runs)} runs; "
             f"{len(wanted) - todo} done before, {todo} to go")
    finished, start = 0, time.perf_counter()
    for item in dataset.items:
        missing = [RunKey(task.name, item.question_id, r.strategy, r.tokens) for r in runs]
        missing = [key for key in missing if key not in done]
        if not missing:
            continue
        image, prompt = dataset.open_image(item), task.prompt(item.question)
        for key in missing:
            began = time.perf_counter()
            prediction = answerer.answer(image, prompt, key.strategy, key.tokens)
            record = {"task": key.task, "question_id": key.question_id, "strategy": key.strategy,
                      "tokens": key.tokens, "prediction": prediction,
                      "score": task.score(prediction, item.answers), "group": item.group,
                      "image_id": item.image_id, "question": item.question, "model": model,
                      "seconds": round(time.perf_counter() - began, 4)}
            results.append(record)
            done[key] = record
            finished += 1
        if finished % 50 < len(missing) or finished == todo:
            progress(f"  {finished}/{todo} answered ({time.perf_counter() - start:.0f} s)")
    return {key: done[key] for _, key in wanted}


def summarise(task: TaskSpec, dataset: Dataset, runs: Sequence[Run],
              lines: dict[RunKey, dict[str, Any]]) -> dict[Run, dict[str, float]]:
    """Metrics per run over the dataset's questions, rescored from the stored predictions."""
    answers = {item.question_id: item.answers for item in dataset.items}
    out = {}
    for run in runs:
        records = [{**line, "score": task.score(line["prediction"], answers[key.question_id])}
                   for key, line in lines.items() if (key.strategy, key.tokens) == (run.strategy, run.tokens)]
        if records:
            out[run] = task.summarise(records)
    return out
