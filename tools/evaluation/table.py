"""Table-1-style markdown: rows = strategy, columns = budgets, cells = score (% of ``none``)."""

from __future__ import annotations

from collections.abc import Sequence

from tools.evaluation.runner import ALL_TOKENS, NONE, Run

MISSING = "—"


def relative(score: float, reference: float | None) -> float | None:
    """``score`` as a percentage of ``reference`` (None without a positive reference).
    Example: relative(45.0, 60.0) -> 75.0."""
    if reference is None or reference <= 0:
        return None
    return 100.0 * score / reference


def _cell(value: float | None, reference: float | None) -> str:
    if value is None:
        return MISSING
    rel = relative(value, reference)
    return f"{value:.2f}" if rel is None else f"{value:.2f} ({rel:.1f}%)"


def render_table(metrics: dict[Run, dict[str, float]], strategies: Sequence[str], budgets: Sequence[int],
                 metric: str = "score") -> str:
    """One markdown table of ``metric``; ``none`` (all tokens) repeats its score in every column
    and every other cell also shows its share of it. Example row: ``| entropy | 52.00 (86.7%) |``."""
    budgets = list(dict.fromkeys(budgets))
    none = metrics.get(Run(NONE, ALL_TOKENS), {}).get(metric)
    lines = ["| strategy | " + " | ".join(f"K={k}" for k in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for strategy in dict.fromkeys(strategies):
        if strategy == NONE:
            cells = [_cell(none, None)] * len(budgets)
            label = "none (all tokens)"
        else:
            cells = [_cell(metrics.get(Run(strategy, k), {}).get(metric), none) for k in budgets]
            label = strategy
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(task: str, metrics: dict[Run, dict[str, float]], strategies: Sequence[str],
                  budgets: Sequence[int], questions: int) -> str:
    """The score table, then one table per further metric (MME perception/cognition, groups)."""
    names = list(dict.fromkeys(name for values in metrics.values() for name in values if name != "score"))
    parts = [f"{task}: {questions} questions; cells = score (% of none)", "",
             render_table(metrics, strategies, budgets)]
    for name in names:
        parts += ["", f"{task} / {name}", "", render_table(metrics, strategies, budgets, name)]
    return "\n".join(parts)
