"""Overhead of each pruning strategy as a fraction of the vision encoder's time.

``python tools/bench_prune.py BUNDLE [BUNDLE ...] [--tokens 64 128 192] [--repeats 5] [--images N]``

For every bundle, strategy and budget: median over repeats and images of encode time and of
the strategy's own work (score + select + merge), plus the extra stages some strategies need
(``project_all``: DivPrune/EntropyPrune/FastV/CDPruner/DART project all N tokens; ``text tower``:
CDPruner's question through CLIP's text tower and the features into CLIP space; ``probe``: the
language-model probe, DART's with its final-norm probe). Prints a markdown table; the target for
the paper's method is prune/encode ≤ 1 %. Strategies that need the language-model probe run only
when the bundle has one (export.llm), CDPruner only with the text tower; the question-aware
strategies prune for ``--question``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from runtime.cli import OneLineParser, log, run_cli
from runtime.llm.probe import DEFAULT_QUESTION
from runtime.pipeline import Pipeline
from runtime.strategies.registry import TEXT_TOWER, available, get_strategy
from tools.benchkit.common import markdown_table, sample_images


def probe_for(pipeline: Pipeline, question: str = DEFAULT_QUESTION):
    """The language-model probe of the bundle on a prompt with ``question``, or None when export.llm
    has not written one."""
    from runtime.llm.probe import probe_from_manifest

    return probe_from_manifest(pipeline.manifest, question)


def bench_bundle(bundle: Path, budgets: list[int], repeats: int, images: int, threads: int | None,
                 question: str = DEFAULT_QUESTION) -> list[dict]:
    from PIL import Image

    pipeline = Pipeline(bundle, threads=threads)
    label = f"{bundle.parent.name}/{bundle.name}"
    probe = probe_for(pipeline, question)
    pixels = [pipeline.pixel_values(Image.fromarray(a)) for a in sample_images(images)]
    rows = []
    encodes, encoded = [], []
    for p in pixels:
        encoded.append(pipeline.encoder.encode(p))  # warm-up; also the input of every strategy
        for _ in range(repeats):
            start = time.perf_counter()
            pipeline.encoder.encode(p)
            encodes.append(1000 * (time.perf_counter() - start))
    encode_ms = statistics.median(encodes)
    for name in available():
        if get_strategy(name).needs_probe and probe is None:
            rows.append({"bundle": label, "strategy": name, "tokens": "-", "note": "needs export.llm probe"})
            continue
        if TEXT_TOWER in get_strategy(name).needs and pipeline.manifest.text_tower is None:
            rows.append({"bundle": label, "strategy": name, "tokens": "-", "note": "needs the CLIP text tower"})
            continue
        for k in ([pipeline.num_patches] if get_strategy(name).keeps_all else budgets):
            timings: dict[str, list[float]] = {}
            for enc in encoded:
                for _ in range(repeats):
                    out = pipeline.prune_encoded(enc, k, name, probe=probe, question=question)
                    for stage, ms in out.timings_ms.items():
                        timings.setdefault(stage, []).append(ms)
            med = {stage: statistics.median(v) for stage, v in timings.items()}
            text_ms = med.get("text_tower", 0.0) + med.get("clip_image", 0.0)
            extra = med.get("project_all", 0.0) + med.get("probe", 0.0) + text_ms
            rows.append({"bundle": label, "strategy": name, "tokens": k, "encode_ms": encode_ms,
                         "prune_ms": med["prune"], "project_all_ms": med.get("project_all", 0.0),
                         "text_tower_ms": text_ms,
                         "probe_ms": med.get("probe", 0.0), "prune_pct": 100 * med["prune"] / encode_ms,
                         "total_pct": 100 * (med["prune"] + extra) / encode_ms, "note": ""})
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["bundle", "strategy", "K", "encode ms", "prune ms", "prune / encode", "project-all ms",
              "text tower ms", "probe ms", "all extra / encode", "note"]
    cells = []
    for r in rows:
        if "encode_ms" not in r:
            cells.append([r["bundle"], r["strategy"], "-", "", "", "", "", "", "", "", r["note"]])
            continue
        cells.append([r["bundle"], r["strategy"], r["tokens"], f"{r['encode_ms']:.1f}", f"{r['prune_ms']:.2f}",
                      f"{r['prune_pct']:.2f} %", f"{r['project_all_ms']:.2f}", f"{r['text_tower_ms']:.2f}",
                      f"{r['probe_ms']:.2f}",
                      f"{r['total_pct']:.2f} %", r["note"]])
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/bench_prune.py", description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="bundle directories written by export.clip")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 192], help="budgets (default: 64 128 192)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per image (default: 5)")
    parser.add_argument("--images", type=int, default=3, help="photos to average over (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--question", default=DEFAULT_QUESTION,
                        help=f"what the question-aware strategies prune for (default: {DEFAULT_QUESTION!r})")
    args = parser.parse_args(argv)

    def body() -> int:
        rows = []
        for bundle in args.bundles:
            log(f"benchmarking {bundle}")
            rows += bench_bundle(bundle, args.tokens, args.repeats, args.images, args.threads, args.question)
        print(markdown(rows))
        return 0

    return run_cli(body, "bench_prune")


if __name__ == "__main__":
    sys.exit(main())
