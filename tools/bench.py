"""Measured per-stage breakdown of image → answer, per strategy and budget, and libmtmd side by side.

``python tools/bench.py --model BUNDLE [--gguf PATH] [--strategies S ...] [--tokens K ...]
[--images N] [--repeats R] [--decode-tokens D] [--threads N] [--positions packed|original] [--out DIR]
[--mtmd [--hf-model CKPT]]``

Per image and repeat: preprocess and encode (shared by every strategy: measured once per image
and repeat), then per strategy and budget K the strategy itself (prune), the projector (all N
rows for DivPrune/EntropyPrune/FastV/CDPruner/DART, then the K kept ones), CDPruner's text tower
(the question through CLIP's text tower and V, the features in CLIP space), the probe
(EntropyPrune, FastV; DART with its final-norm probe),
and llama.cpp: a fresh context sized for the run, prefill of the prompt with the image rows
injected where ``<image>`` stands (``--positions original``: each at its true position, method.md
§6), the first greedy token, then D greedy tokens (EOS ignored) for
decode speed. Every number is the median over images × repeats; time to first token (image in →
first token out) is the sum of the stage medians, first-token sampling included. Next to the
times: the rows fed and the peak resident memory while pruning and running the LLM (the context
is created per run, so its KV cache holds just the prompt, the rows and the decoded tokens).
Writes ``bench.json``, ``bench.csv`` and ``bench.png`` (stacked bars) to --out, the table to stdout.

A LLaVA-NeXT bundle (manifest ``anyres``) runs through ``runtime.anyres.pipeline``: all tiles
encoded as one batch, K split across tiles, rows packed with ``image_newline`` rows (fed and
counted in "rows fed"); ``none`` feeds every row (~2,900 for a 672×672 image); default K
640 320 160 (LLaVA-1.5: 64 128 192). The probe strategies' probe sees every packed row once.

``--gguf PATH`` swaps in another LLaMA GGUF (e.g. a 7B-shaped random Q4_0 from
tools/make_random_gguf.py), also for a bundle without a language model; the probe is cut from it
(same layer as the bundle's). When its width
differs from the projector's, the LLM stages get seeded random rows N(0, 0.02²) of its width
instead of the projected ones, and the output says so; the vision stages stay real. ``--mtmd``
adds the libmtmd comparison of tools/bench_mtmd.py on the bundle's own checkpoint (--hf-model,
default the manifest's source directory).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError
from runtime.llm.backend import LlamaBackend, projector_out_dim
from runtime.llm.bundle import open_language_model
from runtime.llm.context import LlamaContext
from runtime.llm.probe import LlamaProbe, probe_from_manifest
from runtime.llm.prompt_cache import ImageRows
from runtime.llm.template import Conversation, PromptTokens, conversation_segments, encode_prompt, get_template
from runtime.strategies.registry import available, get_strategy
from tools.benchkit.common import PeakRss, decode_greedy_ms, median, open_vision, sample_images, timed_ms
from tools.benchkit.report import mtmd_markdown, result_markdown, write_outputs
from tools.benchkit.types import RANDOM_ROW_STD, STAGES, BenchConfig, BenchResult, LlmInfo, StageRow

TOKENIZER_CTX = 64  # the context held open with the model: it only tokenizes, each run opens its own
WARMUP_ROWS = 32  # rows of the warm-up prefill (enough to touch every weight)


@dataclass(frozen=True)
class _Llm:
    """Open native handles of one run (closed by the ExitStack that built it)."""

    backend: LlamaBackend
    prompt: PromptTokens
    info: LlmInfo
    rows_for: Callable[[np.ndarray], np.ndarray]  # projected rows [M, E] -> rows the LLM gets
    probe: Callable[..., Any] | None
    threads: int | None


def _random_rows(count: int, width: int) -> np.ndarray:
    """Seeded N(0, RANDOM_ROW_STD²) rows [count, width] float32, made in place (no float64 temporary
    counted in the run's peak memory; the first M rows are the same for every count)."""
    rows = np.random.default_rng(0).standard_normal((count, width), dtype=np.float32)
    rows *= RANDOM_ROW_STD
    return rows


def _cut_probe(config: BenchConfig, manifest: Any, stack: ExitStack, n_ctx: int) -> LlamaProbe:
    """A probe cut from ``--gguf`` at the bundle's probe layer, in a temporary directory."""
    from export.llm_gguf.probe import read_probe_weights, save_probe_weights, write_final_probe_gguf, write_probe_gguf

    layer = manifest.llm.probe.layer
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-probe-")))
    log(f"cutting a probe (blocks 0..{layer - 1}) and a final-norm probe (blocks 0..{layer}) from {config.gguf}")
    write_probe_gguf(config.gguf, tmp / "probe.gguf", layer, "bench")  # a throw-away probe: no bundle id
    write_final_probe_gguf(config.gguf, tmp / "probe_final.gguf", layer + 1, "bench")
    save_probe_weights(tmp / "probe_weights.npz", read_probe_weights(config.gguf, layer), "bench")
    probe = LlamaProbe(tmp / "probe.gguf", tmp / "probe_weights.npz", n_threads=config.threads, n_ctx=n_ctx,
                       final_path=tmp / "probe_final.gguf")
    stack.callback(probe.close)
    return probe


def _open_llm(config: BenchConfig, manifest: Any, stack: ExitStack, wants_probe: bool, probe_ctx: int) -> _Llm:
    """The bundle's GGUF (or --gguf), the prompt tokens, the row feeder and the probe callable
    (its context: ``probe_ctx`` positions)."""
    segments = conversation_segments(Conversation().ask(config.question), get_template(manifest.chat_template))
    if config.gguf is not None:
        return _open_other_llm(config, manifest, stack, wants_probe, segments, probe_ctx)
    if manifest.llm is None:
        raise InputError(f"bundle {manifest.root} has no language model: run python -m export.llm --out "
                         f"{manifest.root} ..., or pass --gguf")
    backend = open_language_model(manifest.root, manifest.data, n_threads=config.threads, n_ctx=TOKENIZER_CTX)
    stack.callback(backend.close)
    probe = probe_from_manifest(manifest, config.question, n_threads=config.threads,
                                n_ctx=probe_ctx) if wants_probe else None
    info = LlmInfo(str(backend.path), backend.n_embd, projector_out_dim(manifest.data) or 0,
                   "the bundle's probe.gguf")
    return _Llm(backend, encode_prompt(segments, backend), info, lambda rows: rows, probe, config.threads)


def _open_other_llm(config: BenchConfig, manifest: Any, stack: ExitStack, wants_probe: bool,
                    segments: tuple, probe_ctx: int) -> _Llm:
    """--gguf: its own probe, and random rows of its width when that differs from the projector's."""
    backend = LlamaBackend(config.gguf, n_ctx=TOKENIZER_CTX, n_threads=config.threads)
    stack.callback(backend.close)
    cut_from = f"cut from {Path(config.gguf).name}" if wants_probe and manifest.llm is not None else "none"
    info = LlmInfo(str(backend.path), backend.n_embd, projector_out_dim(manifest.data) or 0, cut_from)
    width = backend.n_embd
    rows_for = (lambda rows: _random_rows(rows.shape[0], width)) if info.random_rows else (lambda rows: rows)
    probe = None
    if wants_probe and manifest.llm is not None:
        cut = _cut_probe(config, manifest, stack, probe_ctx)
        tokens = encode_prompt(segments, cut.backend)
        bound = cut.bind(tokens.prefix, tokens.suffix)
        probe = lambda rows, final=False: bound(rows_for(rows), final=final)  # noqa: E731
    return _Llm(backend, encode_prompt(segments, backend), info, rows_for, probe, config.threads)


@dataclass(frozen=True)
class _Encoded:
    """The shared stages: encoded images and their per-run preprocess / encode times."""

    encoded: list[Any]
    preprocess_ms: list[float]
    encode_ms: list[float]


def _encode_all(vision: Any, images: list[Image.Image], repeats: int) -> _Encoded:
    encoded, pre, enc = [], [], []
    for image in images:
        encoded.append(vision.encode(image)[0])  # warm-up; the strategies' input
        for _ in range(repeats):
            _, pre_ms, enc_ms = vision.encode(image)
            pre.append(pre_ms)
            enc.append(enc_ms)
    return _Encoded(encoded, pre, enc)


def _llm_run(llm: _Llm, rows: np.ndarray, decode_tokens: int, positions: np.ndarray | None = None,
             span: int | None = None) -> dict[str, float]:
    """A context for prefix + rows + suffix + decode, prefill (the rows at ``positions``/``span``,
    :class:`ImageRows`), first greedy token, then greedy decode."""
    prompt = llm.prompt
    n_ctx = len(prompt.prefix) + rows.shape[0] + len(prompt.suffix) + decode_tokens  # cells: gaps take none
    context = LlamaContext(llm.backend.model, n_ctx=n_ctx, n_threads=llm.threads)
    image = ImageRows(object(), rows, positions, span)
    try:
        prefill_ms = timed_ms(lambda: context.prefill([prompt.prefix, image, prompt.suffix]))[1]
        first_ms = timed_ms(lambda: int(np.argmax(context.logits())))[1]
        decode_ms = decode_greedy_ms(context, decode_tokens)
    finally:
        context.close()
    return {"prefill": prefill_ms, "first_token": first_ms, "decode": decode_ms}


def _measure(vision: Any, llm: _Llm, shared: _Encoded, strategy: str, k: int, config: BenchConfig,
             memory: PeakRss) -> StageRow:
    """All images × repeats of one (strategy, K) -> medians (peak memory: the most of any run)."""
    runs: list[dict[str, float]] = []
    for encoded in shared.encoded:
        for _ in range(config.repeats):
            memory.start()
            pruned = vision.prune(encoded, k, strategy, llm.probe, config.question, config.positions)
            run = dict(pruned.stages_ms) | _llm_run(llm, llm.rows_for(pruned.embeddings), config.decode_tokens,
                                                    pruned.positions, pruned.span)
            rows_fed = pruned.embeddings.shape[0]
            runs.append(run | {"tokens": pruned.tokens, "newlines": pruned.newline_rows, "rss": memory.stop(),
                               "span": rows_fed if pruned.span is None else pruned.span})
    pre, enc = median(shared.preprocess_ms), median(shared.encode_ms)
    stages = {"preprocess": pre, "encode": enc} | {s: median([r[s] for r in runs]) for s in STAGES[2:]}
    tokens, newlines, span = (round(median([r[key] for r in runs])) for key in ("tokens", "newlines", "span"))
    positions = len(llm.prompt.prefix) + span + len(llm.prompt.suffix)
    tokens_per_s = config.decode_tokens / (median([r["decode"] for r in runs]) / 1000.0)
    return StageRow(strategy, tokens, stages, sum(stages.values()), tokens_per_s, positions, len(runs), newlines,
                    max(r["rss"] for r in runs))


def run_bench(config: BenchConfig) -> BenchResult:
    """Measure every (strategy, K) of ``config``; see the module docstring."""
    memory = PeakRss()
    vision = open_vision(config.bundle, config.threads)
    manifest, tokens = vision.manifest, config.tokens or vision.default_tokens
    names = config.strategies or tuple(sorted(available(), key=lambda s: not get_strategy(s).keeps_all))  # baseline 1st
    skipped = tuple(f"{s}: {reason}" for s in names if (reason := vision.refusal(s)))
    plan = [(s, k) for s in names if not any(x.startswith(f"{s}:") for x in skipped) for k in vision.budgets(s, tokens)]
    if not plan:
        raise InputError("no strategy can run on this bundle: " + "; ".join(skipped))
    with ExitStack() as stack:
        llm = _open_llm(config, manifest, stack, any(get_strategy(s).needs_probe for s, _ in plan), vision.probe_ctx)
        log(f"{len(plan)} (strategy, K) pairs × {config.images} images × {config.repeats} repeats; {llm.info.note()}")
        images = [Image.fromarray(a) for a in sample_images(config.images)]
        shared = _encode_all(vision, images, config.repeats)
        first = vision.prune(shared.encoded[0], plan[0][1], plan[0][0], llm.probe, config.question)
        _llm_run(llm, llm.rows_for(first.embeddings[:WARMUP_ROWS]), 1)  # warm-up
        rows = []
        for strategy, k in plan:
            rows.append(_measure(vision, llm, shared, strategy, k, config, memory))
            log(f"  {strategy} K={rows[-1].tokens} ({rows[-1].rows_fed} rows): time to first token "
                f"{rows[-1].ttft_ms:.1f} ms, peak RSS {rows[-1].peak_rss_mb:.0f} MB")
    memory.stop()
    return BenchResult(config, llm.info, tuple(rows), skipped, manifest.family, memory.overall, memory.separable)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="tools/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bundle directory (export.clip + export.llm)")
    parser.add_argument("--gguf", type=Path, default=None, help="another LLaMA GGUF for the LLM stages "
                        "(default: the bundle's); of another width it gets random rows")
    parser.add_argument("--strategies", nargs="+", default=[], help="strategies to run (default: all registered)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[], help="budgets K (default: 64 128 192; "
                        "for a LLaVA-NeXT bundle 640 320 160)")
    parser.add_argument("--images", type=int, default=2, help="sample photos to run (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per image, medians taken (default: 3)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens per decode run (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="threads for onnxruntime and llama.cpp "
                        "(default: their own defaults)")
    parser.add_argument("--positions", default="packed",
                        help="image rows' positions (method.md §6): packed, or original (their true positions, one "
                        "llama_decode per run of consecutive rows) (default: packed)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default: bench-out)")
    parser.add_argument("--mtmd", action="store_true", help="also compare with llama.cpp's libmtmd (default: off)")
    parser.add_argument("--hf-model", type=Path, default=None,
                        help="HF checkpoint for --mtmd (default: the manifest's source directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        config = BenchConfig(args.model, args.gguf, tuple(args.strategies), tuple(args.tokens), args.images,
                             args.repeats, args.decode_tokens, args.threads, positions=args.positions)
        result = run_bench(config)
        if args.mtmd:
            result = _with_mtmd(result, args.hf_model, args.out)
        paths = write_outputs(result, args.out)
        print(result_markdown(result))
        if result.mtmd is not None:
            print("\n" + mtmd_markdown(result.mtmd))
        log("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0

    return run_cli(body, "bench")


def _with_mtmd(result: BenchResult, hf_model: Path | None, out: Path) -> BenchResult:
    """``result`` plus the libmtmd comparison (tools/bench_mtmd.py) on the bundle's checkpoint."""
    import dataclasses

    from runtime.bundle.manifest import load_manifest
    from tools.bench_mtmd import compare_with_mtmd

    source = hf_model or Path(str(load_manifest(result.config.bundle).data.get("source", {}).get("model", "")))
    if not (source / "config.json").is_file():
        raise InputError(f"--mtmd needs the Hugging Face checkpoint of the bundle; pass --hf-model (got {source})")
    log(f"libmtmd side by side on {source}")
    report = compare_with_mtmd(result.config.bundle, source, out, result.config.images, result.config.repeats,
                               result.config.threads)
    return dataclasses.replace(result, mtmd=report)


if __name__ == "__main__":
    raise SystemExit(main())
