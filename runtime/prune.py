"""``python -m runtime.prune IMAGE --model DIR``: prune one image's visual tokens and report.

Prints a human summary, or with ``--json`` exactly one JSON object on stdout; ``--save`` writes
the embeddings and indices to an ``.npz`` (atomically).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from runtime.anyres.pipeline import AnyresPipeline, PrunedAnyres
from runtime.atomic import write_atomic
from runtime.bundle.manifest import Manifest, load_manifest
from runtime.cli import OneLineParser, layer_pair, layer_range, run_cli
from runtime.errors import BundleError, InputError
from runtime.llm.probe import DEFAULT_QUESTION, probe_from_manifest
from runtime.llm.prompt_cache import POSITION_MODES, ImageRows
from runtime.model_registry import bundle_path
from runtime.ort_session import available_providers
from runtime.pipeline import Pipeline, PrunedImage, require_question
from runtime.preprocess import load_image
from runtime.strategies.capabilities import format_table, refusal, strategy_table
from runtime.strategies.registry import available, get_strategy


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Bundle, strategy and method flags shared by ``runtime.prune`` and ``runtime.chat``."""
    parser.add_argument("--model", required=True,
                        help="bundle directory written by export.clip (or a registry alias)")
    parser.add_argument("--tokens", type=int, default=64, help="visual tokens to keep, K (default: 64)")
    parser.add_argument("--strategy", default="entropy",
                        help=f"one of {', '.join(available())} (default: entropy)")
    parser.add_argument("--rule", default=None, help="entropy layer rule: max-min, max-max, min-min, min-max, fixed "
                        "(default: the bundle's, max-min)")
    parser.add_argument("--shallow", type=layer_range, default=None,
                        help="shallow layer range, e.g. 6-8 (default: bundle's)")
    parser.add_argument("--deep", type=layer_range, default=None,
                        help="deep layer range, e.g. 20-21 (default: bundle's)")
    parser.add_argument("--fixed", type=layer_pair, default=None, help="layers for --rule fixed, e.g. 6,20")
    parser.add_argument("--p-shallow", type=float, default=None,
                        help="share of K from the shallow layer (default: 0.4)")
    parser.add_argument("--merge", default=None, help="mean or none (default: mean)")
    parser.add_argument("--relevance-weight", type=float, default=None,
                        help="cdpruner: relevance weight θ in [0, 1), r <- exp(θ/(2(1-θ)) r) "
                             "(default: off, the min-max relevance itself)")
    parser.add_argument("--layer", type=int, default=None,
                        help="dart: layer P whose keys pick the pivots (default: the bundle probe's, 2)")
    parser.add_argument("--pivots-image", type=int, default=None, help="dart: image pivots (default: 4)")
    parser.add_argument("--pivots-text", type=int, default=None,
                        help="dart: text pivots among the tokens after the image (default: 4)")
    parser.add_argument("--provider", default=None,
                        help=f"onnxruntime provider (default: CPU; here: {', '.join(available_providers())})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for onnxruntime and llama.cpp (default: all cores)")
    parser.add_argument("--int8", action="store_true", help="use vision.int8.onnx (default: fp32)")
    parser.add_argument("--tile-budget", default="equal", choices=("equal", "perplexity"),
                        help="LLaVA-NeXT bundles: how K is split across tiles, equal shares or by each tile's "
                             "[CLS]-attention perplexity (default: equal)")
    parser.add_argument("--newline", default="rows", choices=("rows", "none"),
                        help="LLaVA-NeXT bundles: an image_newline row after every packed row that kept a token, "
                             "or none (default: rows)")
    parser.add_argument("--positions", default="packed", choices=POSITION_MODES,
                        help="positions of the kept rows in the language model: consecutive (packed), or the ones "
                             "they had with every row present, the text after the image where the full image ends "
                             "(original; costs one llama.cpp decode per run of consecutive kept rows; runtime.prune "
                             "reports the positions with --json) (default: packed)")


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy keyword options given on the command line (None = not given)."""
    return {"rule": args.rule, "shallow": args.shallow, "deep": args.deep, "fixed": args.fixed,
            "p_shallow": args.p_shallow, "merge": args.merge, "relevance_weight": args.relevance_weight,
            "layer": args.layer, "pivots_image": args.pivots_image, "pivots_text": args.pivots_text}


def positions_json(rows: ImageRows, mode: str) -> dict[str, Any]:
    """``positions`` (the mode) and, for ``original``, the positions fed: each row's offset from the
    image's first position (``row_positions``, in the order the rows are fed: ascending, so for
    LLaVA-1.5 the sorted ``kept``, which only visionzip lists in another order) and the positions the
    image spans (``positions_span``: the text after it starts there)."""
    if mode == "packed":
        return {"positions": mode}
    return {"positions": mode, "row_positions": [int(p) for p in rows.offsets], "positions_span": rows.width}


def result_json(result: PrunedImage, positions: str = "packed") -> dict[str, Any]:
    """The ``--json`` object."""
    report = dict(result.report)
    return {
        "strategy": result.strategy,
        "tokens": result.tokens,
        "num_patches": result.num_patches,
        "kept": [int(i) for i in result.kept],
        "counts": [int(c) for c in result.counts],
        "layers": report.pop("layers", None),
        "entropy": report.pop("entropy"),
        "kl": report.pop("kl"),
        **report,
        **positions_json(result.image_rows(None, positions), positions),
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
    }


def summary(result: PrunedImage) -> str:
    """A few human-readable lines."""
    lines = [f"strategy {result.strategy}: kept {result.tokens}/{result.num_patches} tokens "
             f"-> embeddings {result.embeddings.shape[0]}x{result.embeddings.shape[1]}"]
    layers = result.report.get("layers")
    if layers:
        lines.append(f"layers: shallow L{layers['shallow']}, deep L{layers['deep']} "
                     f"(k_s={result.report.get('k_s')}, k_d={result.report.get('k_d')})")
    entropy = result.report["entropy"]
    lines.append("H(l): " + " ".join(f"{h:.2f}" for h in entropy))
    lines.append(f"merged members per kept token: max {int(result.counts.max())}, mean {result.counts.mean():.2f}")
    lines.append("timings: " + ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items()))
    return "\n".join(lines)


def save_npz(path: Path, result: PrunedImage) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=result.embeddings, kept=result.kept, counts=result.counts)
    write_atomic(path, lambda handle: handle.write(buffer.getvalue()))


def anyres_json(result: PrunedAnyres, positions: str = "packed") -> dict[str, Any]:
    """The ``--json`` object of a LLaVA-NeXT image: per tile k_t and its strategy report, rows fed."""
    order = result.order
    return {
        "strategy": result.strategy, "family": "llava-next", "tokens": result.tokens, "rows": order.num_rows,
        "newline_rows": int(order.is_newline.sum()), "total_rows": result.total_rows,
        "image_size": list(result.image_size), "grid": list(result.grid),
        "tiles": [{"tile": t.tile, "candidates": t.candidates, "kept": t.kept,
                   **{k: v for k, v in t.report.items() if k not in ("entropy", "kl")}} for t in result.tiles],
        "rows_source": [[int(t), int(p)] for t, p in zip(order.source_tile, order.source_patch, strict=True)],
        **positions_json(result.image_rows(None, positions), positions),
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
    }


def prune_anyres(manifest: Manifest, image: Any, args: argparse.Namespace) -> int:
    """``runtime.prune`` on a LLaVA-NeXT bundle (prints the summary or ``--json``; ``--save``)."""
    pipeline = AnyresPipeline(manifest, args.provider, args.threads, args.int8)
    probe = None
    if get_strategy(args.strategy).needs_probe:  # one probe of all the image's packed rows (runtime.anyres.probe)
        probe = probe_from_manifest(manifest, args.question or DEFAULT_QUESTION, n_threads=args.threads,
                                    n_ctx=pipeline.probe_context())
    result = pipeline.prune(image, args.tokens, args.strategy, args.tile_budget, args.newline, args.question, probe,
                            **method_options(args))
    if args.json:
        print(json.dumps(anyres_json(result, args.positions)))
    else:
        per_tile = ", ".join(str(t.kept) for t in result.tiles)
        print(f"strategy {result.strategy}: kept {result.tokens} tokens over {len(result.tiles)} tiles "
              f"(k_t: {per_tile}) -> {result.order.num_rows} rows with {int(result.order.is_newline.sum())} "
              f"newlines (all rows: {result.total_rows})")
    if args.save:
        buffer = io.BytesIO()
        np.savez(buffer, embeddings=result.embeddings, source_tile=result.order.source_tile,
                 source_patch=result.order.source_patch, is_newline=result.order.is_newline)
        write_atomic(args.save, lambda handle: handle.write(buffer.getvalue()))
    return 0


def check(bundle: Path) -> int:
    """``--check``: hash every file of ``bundle``; print the table; one line and exit 2 if any differs."""
    from runtime.bundle.check import check_bundle, check_table, require_intact

    manifest = load_manifest(bundle)
    checks = check_bundle(manifest)
    print(check_table(checks))
    require_intact(manifest, checks)
    print(f"bundle {bundle}: all {len(checks)} files are as exported")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m runtime.prune", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, nargs="?", default=None,
                        help="image file (any format Pillow reads; a name that starts with - as ./-photo.jpg or "
                             "after --); not needed with --check")
    add_pipeline_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument("--save", type=Path, default=None, help="write embeddings and indices to OUT.npz")
    parser.add_argument("--check", action="store_true",
                        help="check every bundle file against the sha256 its export recorded, then exit "
                             "(reads every byte; default: off, loading checks sizes and export ids only)")
    parser.add_argument("--list-strategies", action="store_true",
                        help="list every strategy, what it needs and whether this bundle can run it, then exit")
    parser.add_argument("--question", default=None,
                        help="the question to prune for: required by the question-aware strategies (cdpruner, "
                             "dart); the other probe strategies (entropyprune, fastv) see it in their prompt "
                             f"(default: none; they then see {DEFAULT_QUESTION!r})")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.check:
            return check(bundle_path(args.model))
        if args.list_strategies:
            print(format_table(strategy_table(load_manifest(bundle_path(args.model)))))
            return 0
        if args.image is None:
            raise InputError("give an IMAGE to prune (or --check to check the bundle)")
        strategy = get_strategy(args.strategy)
        require_question(strategy, args.question)  # before anything loads
        image = load_image(args.image)  # a bad image fails before the sessions load
        manifest = load_manifest(bundle_path(args.model))
        reason = refusal(strategy, manifest)
        if reason:  # before any session loads
            raise BundleError(reason)
        if manifest.anyres is not None:
            return prune_anyres(manifest, image, args)
        pipeline = Pipeline(manifest, args.provider, args.threads, args.int8)
        probe = None
        if strategy.needs_probe:  # EntropyPrune/FastV/DART: the bundle's llama.cpp probe
            probe = probe_from_manifest(pipeline.manifest, args.question or DEFAULT_QUESTION, n_threads=args.threads)
        result = pipeline.prune(image, args.tokens, args.strategy, probe, args.question, **method_options(args))
        print(json.dumps(result_json(result, args.positions)) if args.json else summary(result))
        if args.save:
            save_npz(args.save, result)
        return 0

    return run_cli(body, "runtime.prune")


if __name__ == "__main__":
    raise SystemExit(main())
