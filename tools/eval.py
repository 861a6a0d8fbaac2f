"""Accuracy of pruning strategies on VQA benchmarks, as a Table-1-style markdown table.

``python tools/eval.py --model DIR --task textvqa|mme|vizwiz|easyvqa --data PATH
[--strategies none entropy ...] [--tokens 64 128 192] [--limit N] [--out results.jsonl]
[--max-tokens 16]``

One JSONL line per (question, strategy, budget) is appended to ``--out`` (fsync'd); a rerun
skips the lines already there, so an interrupted evaluation resumes. The table (stdout) gives
each strategy's score per budget and its share of ``none`` (all tokens). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError
from runtime.strategies.registry import available, get_strategy
from tools.evaluation.runner import Answerer, ResultsFile, plan_runs, run_eval, summarise
from tools.evaluation.table import render_report
from tools.evaluation.tasks import TASKS, get_task

DEFAULT_STRATEGIES = ("none", "entropy")
DEFAULT_TOKENS = (64, 128, 192)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tools/eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="bundle directory (export.clip + export.llm) or alias")
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--data", type=Path, default=None,
                        help="TextVQA/VizWiz JSON file or MME folder; easyvqa: the wheel or a folder to cache "
                             "it in (default for easyvqa only: ~/.cache/entroprune, downloaded with pip)")
    parser.add_argument("--images", type=Path, default=None,
                        help="images folder (default: train_images/ beside the TextVQA JSON, val/ beside VizWiz's)")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        help=f"strategies to compare, of {', '.join(available())} (default: none entropy)")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS),
                        help="budgets K (default: 64 128 192); none always keeps all tokens")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (default: all)")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"),
                        help="JSONL results, appended and resumed (default: results.jsonl)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length limit in tokens (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    return parser


def evaluate(args: argparse.Namespace, make: Callable[..., Answerer]) -> str:
    """Read the data, answer what is missing, return the markdown report."""
    task = get_task(args.task)
    for name in args.strategies:
        get_strategy(name)  # unknown names fail before any work
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    runs = plan_runs(args.strategies, args.tokens)
    dataset = task.read(args.data, args.images).limited(args.limit)
    dataset.check_images()
    results = ResultsFile(args.out)
    results.load()  # a malformed results file fails before the model loads
    answerer = make(args.model, max_tokens=args.max_tokens, threads=args.threads)
    lines = run_eval(task, dataset, answerer, runs, results, model=str(args.model))
    metrics = summarise(task, dataset, runs, lines)
    return render_report(task.name, metrics, args.strategies, args.tokens, len(dataset.items))


def real_answerer(model: str, max_tokens: int, threads: int | None) -> Answerer:
    """The llama.cpp answerer (imported here so --help and bad input never load llama.cpp)."""
    from tools.evaluation.answerer import make_answerer

    return make_answerer(model, max_tokens=max_tokens, threads=threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        report = evaluate(args, real_answerer)
        print(report)
        log(f"results in {args.out}")
        return 0

    return run_cli(body, "tools/eval.py")


if __name__ == "__main__":
    raise SystemExit(main())
