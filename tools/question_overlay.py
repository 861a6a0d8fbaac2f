"""Kept tokens of a question-aware strategy for several questions on one photo, side by side.

``python tools/question_overlay.py IMAGE --model BUNDLE --question Q1 --question Q2 [--strategy cdpruner]
[--tokens 64] [--caption TEXT] [--out question_overlay.png]``

Each panel shows the encoder's view of the image with the dropped patches dimmed and the kept
ones framed (``tools/entropy_plots.kept_overlay``). On a bundle of random weights (the tiny test
model) the choices are random-weight choices: the figure shows that the selection follows the
question, not that it is a good one — the caption names the bundle so nobody mistakes it.
"""

from __future__ import annotations

from pathlib import Path

from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError
from runtime.llm.probe import probe_from_manifest
from runtime.pipeline import Pipeline
from runtime.preprocess import load_image
from runtime.strategies.registry import get_strategy
from tools.entropy_plots import (
    add_figure_args,
    bundle_caption,
    display_image,
    kept_overlay,
    kept_panels_figure,
    save_png,
)


def question_overlays(bundle: Path, image: Path, questions: list[str], strategy: str, tokens: int,
                      out: Path, caption: str | None = None) -> list[list[int]]:
    """Prune ``image`` once per question, write the figure to ``out``; the kept indices per question.

    ``caption`` (default: the bundle's folder and the model it was exported from) heads the figure."""
    if len(questions) < 1:
        raise InputError("give at least one --question")
    pipeline = Pipeline(bundle)
    chosen = get_strategy(strategy)
    picture = load_image(image)
    pixels = pipeline.pixel_values(picture)
    encoded = pipeline.encoder.encode(pixels)
    rgb = display_image(pixels, pipeline.preprocess_config.image_mean, pipeline.preprocess_config.image_std)
    overlays, titles, kept = [], [], []
    for question in questions:
        probe = probe_from_manifest(pipeline.manifest, question) if chosen.needs_probe else None
        result = pipeline.prune_encoded(encoded, tokens, strategy, probe, question)
        kept.append([int(i) for i in result.kept])
        overlays.append(kept_overlay(rgb, pipeline.manifest.vision.grid, result.kept, None))
        titles.append(f"{question!r}\n{strategy}, K = {result.tokens}")
    save_png(kept_panels_figure(overlays, titles, caption or bundle_caption(bundle, pipeline.manifest)), out)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/question_overlay.py", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="photo to prune")
    parser.add_argument("--model", type=Path, required=True, help="bundle directory")
    parser.add_argument("--question", action="append", default=[], help="a question (repeat for more panels)")
    parser.add_argument("--strategy", default="cdpruner", help="a question-aware strategy (default: cdpruner)")
    parser.add_argument("--tokens", type=int, default=64, help="visual tokens to keep, K (default: 64)")
    add_figure_args(parser, "question_overlay.png")
    args = parser.parse_args(argv)

    def body() -> int:
        kept = question_overlays(args.model, args.image, args.question, args.strategy, args.tokens, args.out,
                                 args.caption)
        shared = set(kept[0]).intersection(*map(set, kept[1:]))
        log(f"wrote {args.out}; {len(shared)} of {len(kept[0])} kept tokens are shared by all questions")
        return 0

    return run_cli(body, "question_overlay")


if __name__ == "__main__":
    raise SystemExit(main())
