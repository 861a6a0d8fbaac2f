"""Measured per-stage breakdown of image → answer, per strategy and budget, and libmtmd side by side.

``python tools/bench.py --model BUNDLE [--gguf PATH] [--strategies S ...] [--tokens 64 128 192]
[--images N] [--repeats R] [--decode-tokens D] [--threads N] [--out DIR] [--mtmd [--hf-model CKPT]]``

Per image and repeat: preprocess and encode (shared by every strategy: measured once per image
and repeat), then per strategy and budget K the strategy itself (prune), the projector (all N
rows for DivPrune/EntropyPrune/FastV/CDPruner/DART, then the K kept ones), CDPruner's text tower
(the question through CLIP's text tower and V, the features in CLIP space), the probe
(EntropyPrune, FastV; DART with its final-norm probe),
and llama.cpp: a fresh KV cache, prefill of the LLaVA-1.5 prompt with the K rows injected where
``<image>`` stands, the first greedy token, then D greedy tokens (EOS ignored) for decode speed.
Every number is the median over images × repeats; time to first token (image in → first token
out) is the sum of the stage medians, first-token sampling included. Writes
``bench.json``, ``bench.csv`` and ``bench.png`` (stacked bars) to --out, the table to stdout.

``--gguf PATH`` swaps in another LLaMA GGUF (e.g. a 7B-shaped random Q4_0 from
tools/make_random_gguf.py); the probe is cut from it (same layer as the bundle's). When its width
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
from runtime.llm import LlamaBackend, projector_out_dim
from runtime.llm_bundle import open_language_model
from runtime.pipeline import Pipeline
from runtime.probe import LlamaProbe, probe_from_manifest
from runtime.prompt_cache import ImageRows
from runtime.strategies.registry import TEXT_TOWER, available, get_strategy
from runtime.template import Conversation, PromptTokens, conversation_segments, encode_prompt, get_template
from tools.bench_report import mtmd_markdown, result_markdown, write_outputs
from tools.bench_types import RANDOM_ROW_STD, STAGES, BenchConfig, BenchResult, LlmInfo, StageRow
from tools.benchlib import decode_greedy_ms, median, sample_images, timed_ms

PROMPT_ROOM = 512  # context positions reserved for the prompt text around the image rows


@dataclass(frozen=True)
class _Llm:
    """Open native handles of one run (closed by the ExitStack that built it)."""

    backend: LlamaBackend
    prompt: PromptTokens
    info: LlmInfo
    rows_for: Callable[[np.ndarray], np.ndarray]  # projected rows [M, E] -> rows the LLM gets
    probe: Callable[..., Any] | None


def _random_rows(count: int, width: int) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((count, width)) * RANDOM_ROW_STD).astype(np.float32)


def _cut_probe(config: BenchConfig, manifest: Any, stack: ExitStack, n_ctx: int) -> LlamaProbe:
    """A probe cut from ``--gguf`` at the bundle's probe layer, in a temporary directory."""
    from export.gguf_probe import read_probe_weights, save_probe_weights, write_final_probe_gguf, write_probe_gguf

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


def _open_llm(config: BenchConfig, manifest: Any, stack: ExitStack, wants_probe: bool) -> _Llm:
    """The bundle's GGUF (or --gguf), the prompt tokens, the row feeder and the probe callable."""
    n_ctx = manifest.vision.num_patches + PROMPT_ROOM + config.decode_tokens
    width = projector_out_dim(manifest.data) or 0
    segments = conversation_segments(Conversation().ask(config.question), get_template(manifest.chat_template))
    if config.gguf is not None:
        return _open_other_llm(config, manifest, stack, wants_probe, n_ctx, segments)
    backend = open_language_model(manifest.root, manifest.data, n_threads=config.threads, n_ctx=n_ctx)
    stack.callback(backend.close)
    probe = probe_from_manifest(manifest, config.question, n_threads=config.threads) if wants_probe else None
    info = LlmInfo(str(backend.path), backend.n_embd, width, "the bundle's probe.gguf")
    return _Llm(backend, encode_prompt(segments, backend), info, lambda rows: rows, probe)


def _open_other_llm(config: BenchConfig, manifest: Any, stack: ExitStack, wants_probe: bool, n_ctx: int,
                    segments: tuple) -> _Llm:
    """--gguf: its own probe, and random rows of its width when that differs from the projector's."""
    backend = LlamaBackend(config.gguf, n_ctx=n_ctx, n_threads=config.threads)
    stack.callback(backend.close)
    info = LlmInfo(str(backend.path), backend.n_embd, projector_out_dim(manifest.data) or 0,
                   f"cut from {Path(config.gguf).name}")
    random = _random_rows(manifest.vision.num_patches, backend.n_embd) if info.random_rows else None
    rows_for = (lambda rows: random[: rows.shape[0]]) if random is not None else (lambda rows: rows)
    probe = None
    if wants_probe and manifest.llm is not None:
        cut = _cut_probe(config, manifest, stack, n_ctx)
        tokens = encode_prompt(segments, cut.backend)
        bound = cut.bind(tokens.prefix, tokens.suffix)
        probe = lambda rows, final=False: bound(rows_for(rows), final=final)  # noqa: E731
    return _Llm(backend, encode_prompt(segments, backend), info, rows_for, probe)


@dataclass(frozen=True)
class _Vision:
    """The shared stages: encoded images and their per-run preprocess / encode times."""

    encoded: list[Any]
    preprocess_ms: list[float]
    encode_ms: list[float]


def _vision(pipeline: Pipeline, images: list[Image.Image], repeats: int) -> _Vision:
    encoded, pre, enc = [], [], []
    for image in images:
        encoded.append(pipeline.encoder.encode(pipeline.pixel_values(image)))  # warm-up; the strategies' input
        for _ in range(repeats):
            pixels, ms = timed_ms(lambda im=image: pipeline.pixel_values(im))
            pre.append(ms)
            enc.append(timed_ms(lambda px=pixels: pipeline.encoder.encode(px))[1])
    return _Vision(encoded, pre, enc)


def _llm_run(llm: _Llm, rows: np.ndarray, decode_tokens: int) -> dict[str, float]:
    """Prefill prefix + rows + suffix from an empty cache, first greedy token, then greedy decode."""
    backend, prompt = llm.backend, llm.prompt
    backend.reset()

    def prefill() -> None:
        backend.prefill([prompt.prefix, ImageRows(object(), rows), prompt.suffix])

    prefill_ms = timed_ms(prefill)[1]
    first_ms = timed_ms(lambda: int(np.argmax(backend.logits())))[1]
    return {"prefill": prefill_ms, "first_token": first_ms, "decode": decode_greedy_ms(backend, decode_tokens)}


def _measure(pipeline: Pipeline, llm: _Llm, vision: _Vision, strategy: str, k: int, config: BenchConfig) -> StageRow:
    """All images × repeats of one (strategy, K) -> medians."""
    runs: list[dict[str, float]] = []
    for encoded in vision.encoded:
        for _ in range(config.repeats):
            pruned = pipeline.prune_encoded(encoded, k, strategy, llm.probe, config.question)
            t = pruned.timings_ms
            run = {"prune": t["prune"], "projector": t.get("project_all", 0.0) + t["project"],
                   "text_tower": t.get("text_tower", 0.0) + t.get("clip_image", 0.0), "probe": t.get("probe", 0.0)}
            runs.append(run | _llm_run(llm, llm.rows_for(pruned.embeddings), config.decode_tokens))
    pre, enc = median(vision.preprocess_ms), median(vision.encode_ms)
    stages = {"preprocess": pre, "encode": enc} | {s: median([r[s] for r in runs]) for s in STAGES[2:]}
    positions = len(llm.prompt.prefix) + k + len(llm.prompt.suffix)
    tokens_per_s = config.decode_tokens / (median([r["decode"] for r in runs]) / 1000.0)
    return StageRow(strategy, k, stages, sum(stages.values()), tokens_per_s, positions, len(runs))


def run_bench(config: BenchConfig) -> BenchResult:
    """Measure every (strategy, K) of ``config``; see the module docstring."""
    pipeline = Pipeline(config.bundle, threads=config.threads)
    for k in config.tokens:
        pipeline.check_budget(k)
    names = config.strategies or tuple(sorted(available(), key=lambda s: not get_strategy(s).keeps_all))  # baseline 1st
    with ExitStack() as stack:
        llm = _open_llm(config, pipeline.manifest, stack, any(get_strategy(s).needs_probe for s in names))
        skipped = tuple(f"{s}: needs the probe (export.llm)" for s in names
                        if get_strategy(s).needs_probe and llm.probe is None)
        skipped += tuple(f"{s}: needs the CLIP text tower (export.clip --text-tower-only)" for s in names
                         if TEXT_TOWER in get_strategy(s).needs and pipeline.manifest.text_tower is None)
        plan = [(s, k) for s in names if not any(x.startswith(f"{s}:") for x in skipped)
                for k in ((pipeline.num_patches,) if get_strategy(s).keeps_all else config.tokens)]
        log(f"{len(plan)} (strategy, K) pairs × {config.images} images × {config.repeats} repeats; {llm.info.note()}")
        images = [Image.fromarray(a) for a in sample_images(config.images)]
        vision = _vision(pipeline, images, config.repeats)
        first = plan[0]
        _llm_run(llm, llm.rows_for(pipeline.prune_encoded(vision.encoded[0], first[1], first[0], llm.probe,
                                                          config.question).embeddings), 1)  # warm-up
        rows = []
        for strategy, k in plan:
            rows.append(_measure(pipeline, llm, vision, strategy, k, config))
            log(f"  {strategy} K={k}: time to first token {rows[-1].ttft_ms:.1f} ms")
    return BenchResult(config, llm.info, tuple(rows), skipped)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="tools/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bundle directory (export.clip + export.llm)")
    parser.add_argument("--gguf", type=Path, default=None, help="another LLaMA GGUF for the LLM stages "
                        "(default: the bundle's); of another width it gets random rows")
    parser.add_argument("--strategies", nargs="+", default=[], help="strategies to run (default: all registered)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 192], help="budgets K (default: 64 128 192)")
    parser.add_argument("--images", type=int, default=2, help="sample photos to run (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per image, medians taken (default: 3)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens per decode run (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="threads for onnxruntime and llama.cpp "
                        "(default: their own defaults)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default: bench-out)")
    parser.add_argument("--mtmd", action="store_true", help="also compare with llama.cpp's libmtmd (default: off)")
    parser.add_argument("--hf-model", type=Path, default=None,
                        help="HF checkpoint for --mtmd (default: the manifest's source directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        config = BenchConfig(args.model, args.gguf, tuple(args.strategies), tuple(args.tokens), args.images,
                             args.repeats, args.decode_tokens, args.threads)
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

    from runtime.manifest import load_manifest
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
