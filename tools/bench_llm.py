"""Benchmark llama.cpp prefill over injected image rows, and decode speed.

``python -m tools.bench_llm GGUF [--rows 16,32,64,128,192,288,576] [--repeats 3]
[--decode-tokens 32] [--threads N] [--n-batch 512] [--n-gpu-layers 0]``

For each row count M, the median wall time of ``eval_embeddings`` of M random rows (std 0.02,
as projected LLaVA tokens roughly are) from an empty context; then greedy decode speed after
64 rows. Prints a markdown table and the ratio prefill(64)/prefill(576) to stdout.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.cli import OneLineParser, log, run_cli
from runtime.llm.backend import LlamaBackend
from tools.benchkit.common import decode_greedy_ms, markdown_table

DEFAULT_ROWS = (16, 32, 64, 128, 192, 288, 576)
DECODE_AFTER_ROWS = 64


@dataclass(frozen=True)
class BenchResult:
    """Timings of one GGUF."""

    prefill_ms: dict[int, float]  # rows -> median milliseconds
    decode_tokens_per_s: float


def _prefill_ms(backend: LlamaBackend, rows: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        backend.reset()
        start = time.perf_counter()
        backend.eval_embeddings(rows)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _decode_tokens_per_s(backend: LlamaBackend, rows: np.ndarray, tokens: int, repeats: int) -> float:
    speeds = []
    for _ in range(repeats):
        backend.reset()
        backend.eval_embeddings(rows)
        speeds.append(tokens / (decode_greedy_ms(backend, tokens) / 1000.0))
    return statistics.median(speeds)


def bench(
    path: Path,
    rows: tuple[int, ...] = DEFAULT_ROWS,
    repeats: int = 3,
    decode_tokens: int = 32,
    threads: int | None = None,
    n_batch: int = 512,
    n_gpu_layers: int = 0,
) -> BenchResult:
    """Run the benchmark (one warm-up prefill first)."""
    n_ctx = max(max(rows), DECODE_AFTER_ROWS + decode_tokens) + 8
    with LlamaBackend(path, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_gpu_layers=n_gpu_layers) as backend:
        data = (np.random.default_rng(0).standard_normal((max(rows), backend.n_embd)) * 0.02).astype(np.float32)
        _prefill_ms(backend, data[:16], 1)  # warm-up
        prefill = {}
        for m in rows:
            prefill[m] = _prefill_ms(backend, data[:m], repeats)
            log(f"  {m} rows: {prefill[m]:.1f} ms")
        decode = _decode_tokens_per_s(backend, data[:DECODE_AFTER_ROWS], decode_tokens, repeats)
    return BenchResult(prefill, decode)


def table(result: BenchResult) -> str:
    """Markdown table of the prefill timings, decode speed and the 64/576 ratio when present."""
    lines = [markdown_table(["image rows", "prefill ms (median)", "rows/s"],
                            [[m, f"{ms:.1f}", f"{m / ms * 1000:.0f}"] for m, ms in result.prefill_ms.items()], "rrr")]
    lines.append(f"\ndecode: {result.decode_tokens_per_s:.1f} tokens/s (greedy, after {DECODE_AFTER_ROWS} rows)")
    if 64 in result.prefill_ms and 576 in result.prefill_ms:
        lines.append(f"prefill(64)/prefill(576) = {result.prefill_ms[64] / result.prefill_ms[576]:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tools.bench_llm", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="GGUF file (e.g. from tools.make_random_gguf or export.llm)")
    parser.add_argument(
        "--rows",
        default=",".join(map(str, DEFAULT_ROWS)),
        help=f"comma-separated image row counts (default: {','.join(map(str, DEFAULT_ROWS))})",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement, median taken (default: 3)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per repeat (default: 32)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama.cpp's)")
    parser.add_argument("--n-batch", type=int, default=512, help="llama.cpp batch size (default: 512)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to a GPU (default: 0)")
    args = parser.parse_args(argv)
    rows = tuple(int(x) for x in args.rows.split(",") if x.strip())

    def body() -> int:
        result = bench(args.gguf, rows, args.repeats, args.decode_tokens, args.threads, args.n_batch, args.n_gpu_layers)
        print(table(result))
        return 0

    return run_cli(body, "bench_llm")


if __name__ == "__main__":
    sys.exit(main())
