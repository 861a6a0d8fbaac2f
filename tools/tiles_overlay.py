"""Kept tokens of a LLaVA-NeXT bundle drawn on a photo's tiles: the base view and the grid.

``python tools/tiles_overlay.py IMAGE --model BUNDLE [--strategy entropy] [--tokens 320]
[--tile-budget equal] [--question TEXT] [--caption TEXT] [--out tiles_overlay.png]``

The image is cut into tiles as the model sees them (``runtime.anyres.pipeline``), pruned at K
split across tiles, and drawn in two panels: the 336×336 base view and the grid of 336×336 tiles
side by side at one scale in their places (``tools/entropy_plots.kept_overlay`` per tile: dropped patches
dimmed, kept ones framed). Grid patches that unpadding removes (the padding around an image of
another aspect) are never candidates and are painted flat ``PADDING``. ``image_newline`` rows are
fed to the model but have no place on the image, so they are not drawn. Every strategy the bundle
can run draws: ``cdpruner`` and ``dart`` prune for ``--question``; the probe strategies (``fastv``,
``entropyprune``, ``dart``) run the bundle's probe once over all packed rows with that question
(default: ``runtime.llm.probe.DEFAULT_QUESTION``), as ``runtime.prune`` does. On a bundle of random
weights the picks are random-weight picks; the caption (``--caption``) should say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from runtime.anyres.pack import PackedLayout
from runtime.anyres.pipeline import AnyresPipeline, PrunedAnyres
from runtime.anyres.tile_budget import MODES
from runtime.cli import OneLineParser, log, run_cli
from runtime.llm.probe import DEFAULT_QUESTION, probe_from_manifest
from runtime.model_registry import bundle_path
from runtime.pipeline import require_question
from runtime.preprocess import load_image
from runtime.strategies.registry import get_strategy
from tools.entropy_plots import DPI, add_figure_args, bundle_caption, display_image, kept_overlay, save_png

PADDING = (0.92, 0.92, 0.92)  # RGB of a grid patch removed by unpadding (light grey)


@dataclass(frozen=True)
class TilesOverlay:
    """What the figure shows."""

    kept: tuple[np.ndarray, ...]  # [k_t] int64 per tile (base first): the patches drawn as kept
    candidates: tuple[int, ...]  # patches per tile left after unpadding
    grid: tuple[int, int]  # (rows, cols) of grid tiles
    rows_fed: int  # rows the LLM gets, newline rows included (not drawn)
    path: Path


def kept_per_tile(pruned: PrunedAnyres, num_tiles: int) -> tuple[np.ndarray, ...]:
    """[k_t] int64 sorted patch indices per tile from the packed order (newline rows skipped).

    Example: source_tile [0, 0, 1, -1], source_patch [3, 5, 2, -1], 2 tiles -> ([3, 5], [2])."""
    order = pruned.order
    tokens = ~order.is_newline
    return tuple(np.sort(order.source_patch[tokens & (order.source_tile == t)]).astype(np.int64)
                 for t in range(num_tiles))


def grid_overlay(tiles_rgb: np.ndarray, kept: tuple[np.ndarray, ...], layout: PackedLayout,
                 grid: tuple[int, int], side: int) -> np.ndarray:
    """``[T-1, S, S, 3]`` grid tiles -> ``[rows*S, cols*S, 3]``: each tile's overlay in its place,
    patches that unpadding removed painted ``PADDING``. ``side``: patches per tile side."""
    rows, cols = grid
    size = tiles_rgb.shape[1]
    patch = size // side
    out = np.zeros((rows * size, cols * size, 3), np.float32)
    for t in range(1, 1 + rows * cols):
        drawn = kept_overlay(tiles_rgb[t - 1], side, kept[t], None)
        removed = (layout.position[t] < 0).reshape(side, side)
        drawn[np.repeat(np.repeat(removed, patch, 0), patch, 1)] = PADDING
        r, c = divmod(t - 1, cols)
        out[r * size:(r + 1) * size, c * size:(c + 1) * size] = drawn
    return out


def tiles_figure(panels: list[np.ndarray], titles: list[str], caption: str) -> Figure:
    """The overlays side by side at one scale (panel widths in proportion to their pixels), titled."""
    widths = [panel.shape[1] for panel in panels]
    fig = Figure(figsize=(2.2 + sum(widths) / 110, 1.6 + max(p.shape[0] for p in panels) / 110), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    for ax, panel, title in zip(fig.subplots(1, len(panels), width_ratios=widths, squeeze=False)[0], panels, titles,
                                strict=True):
        ax.imshow(panel, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=9, wrap=True)
    fig.suptitle(caption, fontsize=9)
    return fig


def tiles_overlay(bundle: Path | str, image: Path, strategy: str, tokens: int, out: Path, tile_budget: str = "equal",
                  caption: str | None = None, question: str | None = None) -> TilesOverlay:
    """Prune ``image`` with ``strategy`` at ``tokens`` (for ``question``, see the module doc), write
    the two-panel figure to ``out``."""
    bundle = bundle_path(str(bundle))  # a directory or a registry alias's bundle
    pipeline = AnyresPipeline(bundle)
    chosen = get_strategy(strategy)
    pipeline.base.check_strategy(chosen)  # before the encode: a bundle without the probe or text tower refuses
    require_question(chosen, question)
    encoded = pipeline.encode(load_image(image))
    probe = None
    if chosen.needs_probe:
        probe = probe_from_manifest(pipeline.manifest, question or DEFAULT_QUESTION, n_ctx=pipeline.probe_context())
    pruned = pipeline.prune_encoded(encoded, tokens, strategy, tile_budget, question=question, probe=probe)
    pixels, layout = encoded.pixels, pipeline.layout(encoded.pixels)
    pre = pipeline.base.preprocess_config
    rgb = np.stack([display_image(p, pre.image_mean, pre.image_std) for p in pixels.pixel_values])
    side = pipeline.manifest.vision.grid
    kept = kept_per_tile(pruned, layout.num_tiles)
    candidates = tuple(int(layout.candidates(t).shape[0]) for t in range(layout.num_tiles))
    (rows, cols), (height, width) = pixels.grid, pixels.image_size
    titles = [f"base view: {strategy} kept {kept[0].shape[0]} of {candidates[0]}",
              f"{rows}×{cols} grid at {pixels.best_resolution[1]}×{pixels.best_resolution[0]}: kept "
              f"{sum(k.shape[0] for k in kept[1:])} of {sum(candidates[1:])} (light grey: unpadded away)"]
    panels = [kept_overlay(rgb[0], side, kept[0], None), grid_overlay(rgb[1:], kept, layout, pixels.grid, side)]
    head = (f"{width}×{height} photo, K = {pruned.tokens} ({tile_budget} split), {pruned.order.num_rows} rows fed "
            f"with newlines (not drawn)")
    save_png(tiles_figure(panels, titles, f"{caption or bundle_caption(bundle, pipeline.manifest)}\n{head}"), out)
    return TilesOverlay(kept, candidates, pixels.grid, pruned.order.num_rows, Path(out))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/tiles_overlay.py", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="photo to prune")
    parser.add_argument("--model", required=True, help="a LLaVA-NeXT bundle: a directory or a registry alias")
    parser.add_argument("--strategy", default="entropy", help="a strategy the bundle can run (default: entropy)")
    parser.add_argument("--tokens", type=int, default=320, help="image tokens to keep over all tiles, K (default: 320)")
    parser.add_argument("--tile-budget", default="equal", choices=MODES, help="K split across tiles: equal or "
                        "perplexity (default: equal)")
    parser.add_argument("--question", default=None, help="the question cdpruner and dart prune for (and the "
                        "probe strategies' prompt)")
    add_figure_args(parser, "tiles_overlay.png")
    args = parser.parse_args(argv)

    def body() -> int:
        drawn = tiles_overlay(args.model, args.image, args.strategy, args.tokens, args.out, args.tile_budget,
                              args.caption, args.question)
        log(f"wrote {drawn.path}; kept per tile {[int(k.shape[0]) for k in drawn.kept]}, {drawn.rows_fed} rows fed")
        return 0

    return run_cli(body, "tiles_overlay")


if __name__ == "__main__":
    raise SystemExit(main())
