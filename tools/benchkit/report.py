"""Outputs of tools/bench.py: markdown tables, ``bench.json``, ``bench.csv`` and ``bench.png``.

The table, the CSV and the JSON carry the same numbers (the CSV with full float precision, the
table rounded to 0.01 ms / 0.1 tokens/s); the PNG stacks the stages of each (strategy, K).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.atomic import write_atomic, write_json_atomic
from tools.benchkit.common import markdown_table
from tools.benchkit.types import STAGES, BenchResult

CSV_COLUMNS = ("strategy", "tokens", "newline_rows", "rows_fed", *(f"{s}_ms" for s in STAGES), "ttft_ms",
               "decode_tokens_per_s", "prefill_positions", "runs", "peak_rss_mb")
COLORS = ("#b0b0b0", "#4c72b0", "#dd8452", "#55a868", "#da8bc3", "#c44e52", "#8172b3", "#937860")  # one per STAGES


def result_json(result: BenchResult) -> dict[str, Any]:
    """Everything as JSON-able values (paths as strings)."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result.config).items()}
    llm = dataclasses.asdict(result.llm) | {"random_rows": result.llm.random_rows, "note": result.llm.note()}
    rows = [dataclasses.asdict(r) | {"stages_ms": dict(r.stages_ms), "rows_fed": r.rows_fed} for r in result.rows]
    return {"config": config, "family": result.family, "peak_rss_mb": result.peak_rss_mb,
            "rss_per_run": result.rss_per_run, "llm": llm, "rows": rows,
            "skipped": list(result.skipped),
            "mtmd": dict(result.mtmd) if result.mtmd is not None else None}


def csv_text(result: BenchResult) -> str:
    """One line per (strategy, K), columns :data:`CSV_COLUMNS`, floats at full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in result.rows:
        stages = (repr(r.stages_ms[s]) for s in STAGES)
        writer.writerow([r.strategy, r.tokens, r.newline_rows, r.rows_fed, *stages, repr(r.ttft_ms),
                         repr(r.decode_tokens_per_s), r.prefill_positions, r.runs, repr(r.peak_rss_mb)])
    return buffer.getvalue()


def result_markdown(result: BenchResult) -> str:
    """The stage table (milliseconds, medians) with lines saying which LLM fed on what and what was counted."""
    header = ["strategy", "K", "newline rows", "rows fed", *STAGES, "TTFT", "decode tok/s", "prefill positions",
              "peak RSS MB"]
    cells = [[r.strategy, r.tokens, r.newline_rows, r.rows_fed, *(f"{r.stages_ms[s]:.2f}" for s in STAGES),
              f"{r.ttft_ms:.2f}", f"{r.decode_tokens_per_s:.1f}", r.prefill_positions, f"{r.peak_rss_mb:.0f}"]
             for r in result.rows]
    c = result.config
    next_note = (" LLaVA-NeXT: all tiles encoded as one batch; prune = K split + per-tile pruning (+ cdpruner's "
                 "text tower); projector = kept tokens + image_newline rows packed."
                 if result.family == "llava-next" else "")
    rss_note = ("" if result.rss_per_run else " — not per run here: this kernel keeps its high-water mark, so "
                "each row shows the process's peak so far")
    lines = [f"{result.llm.note()}; probe: {result.llm.probe}.",
             f"Medians over {c.images} images × {c.repeats} repeats (ms; projector = all-N projection + the K rows; "
             f"TTFT = image in → first token out; decode = {c.decode_tokens} greedy tokens; image rows at "
             f"{c.positions} positions).{next_note} "
             f"Peak RSS: the process's most resident memory while pruning and running the LLM (a context sized "
             f"for the run){rss_note}; the whole run's: {result.peak_rss_mb:.0f} MB.", "",
             markdown_table(header, cells, "lrrr" + "r" * (len(header) - 4))]
    lines += [f"skipped {s}" for s in result.skipped]
    return "\n".join(lines)


def _fmt(agreement: Mapping[str, float]) -> str:
    return f"{agreement['cos_min']:.6f} / {agreement['cos_mean']:.6f} / {agreement['max_abs']:.3g}"


def mtmd_markdown(report: Mapping[str, Any]) -> str:
    """The libmtmd comparison: cosine min / mean / max |Δ| to HF per alignment, and encode times."""
    t = report["timings_ms"]
    lines = [f"libmtmd side by side ({report['pixels']}); cosine min / mean / max |Δ| to Hugging Face "
             "get_image_features, all rows before the LLM:", ""]
    rows = [["ours: ONNX tower + projector", _fmt(report["ours_vs_hf"]), "", "",
             f"{t['ours_encode']:.1f} + {t['ours_project_all']:.1f} (projector)"]]
    if report["status"] != "ok":
        lines.insert(0, f"libmtmd unavailable: {report['reason']}")
    for key, label in (("mtmd_hf", "libmtmd, our mmproj (standard layout)"),
                       ("mtmd_cls-last", "libmtmd, our mmproj (cls-last diagnostic)")):
        if key in report:
            m = report[key]
            timing = f"{t['mtmd_encode']:.1f} (+ {t['mtmd_preprocess']:.1f} preprocess)" if key == "mtmd_hf" else ""
            rows.append([label, _fmt(m["aligned"]), _fmt(m["shifted"]), _fmt(m["last_vs_cls"]), timing])
    header = ["path", "row r vs HF patch r", "row r vs HF patch r+1", "last row vs HF [CLS]", "encode ms (median)"]
    return "\n".join(lines + [markdown_table(header, rows)])


def plot_png(result: BenchResult, path: Path) -> Path:
    """Stacked bars of the stages per (strategy, K) (their sum is the time to first token); written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tools.entropy_plots import save_png

    labels = [f"{r.strategy}\nK={r.tokens}" + (f"\n{r.rows_fed} rows" if r.newline_rows else "") for r in result.rows]
    parts = {s: [r.stages_ms[s] for r in result.rows] for s in STAGES}
    fig = Figure(figsize=(max(6.0, 0.75 * len(labels) + 2), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bottom = [0.0] * len(labels)
    for (name, values), color in zip(parts.items(), COLORS, strict=True):
        ax.bar(labels, values, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, (top, r) in enumerate(zip(bottom, result.rows, strict=True)):
        ax.annotate(f"{r.decode_tokens_per_s:.0f} tok/s", (x, top), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("ms (median) — time to first token")
    ax.set_title(f"{Path(result.llm.path).name}{' (random rows)' if result.llm.random_rows else ''}; "
                 "bar labels: decode tokens/s", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, ncols=4)
    return save_png(fig, path)


def write_outputs(result: BenchResult, out: Path) -> dict[str, Path]:
    """``bench.json``, ``bench.csv`` and ``bench.png`` in ``out`` (each written atomically)."""
    out = Path(out)
    data = csv_text(result).encode("utf-8")
    return {
        "json": write_json_atomic(out / "bench.json", result_json(result)),
        "csv": write_atomic(out / "bench.csv", lambda handle: handle.write(data)),
        "png": plot_png(result, out / "bench.png"),
    }
