"""Figures of ``tools/analyze_entropy.py``: layer curves, CLS heat maps, layer histograms, kept tokens.

Matplotlib through its object API with the Agg canvas (no pyplot, no global backend switch), so the
figures render headless and in parallel tests. Pure array helpers (``display_image``,
``kept_overlay``) are separate from the figure builders so that they can be tested on their own.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure

from runtime.atomic import write_atomic

DPI = 100
DIM = 0.3  # brightness of a patch that was dropped (neither kept nor merged)
TINT = 0.35  # opacity of a merge group's colour over its member patches
SATURATION = 0.75  # of the group colours
EDGE = 0.15  # brightness factor of the line between neighbouring patches of different groups
BORDER = 2  # pixels of the coloured frame drawn inside each kept patch
GOLDEN = 0.6180339887498949  # hue step: consecutive groups get well-separated hues


def display_image(pixel_values: np.ndarray, image_mean: Sequence[float], image_std: Sequence[float]) -> np.ndarray:
    """``[3, S, S]`` normalised pixels -> ``[S, S, 3]`` float32 RGB in [0, 1] (the encoder's view).

    Example: a pixel equal to ``-mean / std`` in every channel becomes black ``[0, 0, 0]``.
    """
    x = np.asarray(pixel_values, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"pixel_values must be [3, S, S], got shape {x.shape}")
    mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image_std, dtype=np.float32)[:, None, None]
    return np.clip(x * std + mean, 0.0, 1.0).transpose(1, 2, 0)


def group_colors(count: int) -> np.ndarray:
    """``[count, 3]`` float RGB, hue ``i * golden ratio`` (mod 1), saturation ``SATURATION``, value 1.

    Example: ``group_colors(1)`` -> ``[[1, 0.25, 0.25]]`` (hue 0 is red).
    """
    hue = (np.arange(count) * GOLDEN) % 1.0
    hsv = np.stack([hue, np.full(count, SATURATION), np.ones(count)], axis=1)
    return hsv_to_rgb(hsv[None])[0]


def kept_overlay(rgb: np.ndarray, grid: int, kept: np.ndarray, assignment: np.ndarray | None) -> np.ndarray:
    """``[S, S, 3]`` image -> ``[S, S, 3]``: dropped patches dimmed, groups tinted and outlined, kept framed.

    ``kept [K]`` patch indices (raster order on a ``grid x grid`` layout); ``assignment [N]``: the
    position in ``kept`` of the token each patch went into, ``-1`` for a dropped patch (``None``:
    only the kept patches are known, everything else is drawn as dropped). Group ``i`` has colour
    ``group_colors(K)[i]``: members get a ``TINT`` wash, the kept patch keeps its pixels inside a
    ``BORDER``-pixel frame, and a dark line separates neighbouring patches of different groups.
    Example: grid 2, kept [0], assignment [0, 0, -1, -1]: the top row is tinted red and framed at
    patch 0, the bottom row is dimmed.
    """
    img = np.asarray(rgb, dtype=np.float32)
    side = img.shape[0]
    if img.shape != (side, side, 3) or side % grid:
        raise ValueError(f"rgb must be [S, S, 3] with S a multiple of grid={grid}, got {img.shape}")
    n, patch = grid * grid, side // grid
    kept = np.asarray(kept, dtype=np.int64)
    if assignment is None:
        assignment = np.full(n, -1, np.int64)
        assignment[kept] = np.arange(kept.shape[0])
    if assignment.shape != (n,):
        raise ValueError(f"assignment must be [{n}], got {assignment.shape}")
    colors = group_colors(kept.shape[0]).astype(np.float32)
    member = assignment >= 0
    wash = np.where(member[:, None], colors[np.maximum(assignment, 0)], 0.0).astype(np.float32)
    alpha = np.where(member, TINT, 0.0).astype(np.float32)
    alpha[kept] = 0.0  # a kept patch shows its own pixels, framed
    scale = np.where(member, 1.0, DIM).astype(np.float32)

    def up(values: np.ndarray) -> np.ndarray:  # [N, ...] per patch -> [S, S, ...] per pixel
        return np.repeat(np.repeat(values.reshape(grid, grid, -1), patch, 0), patch, 1)

    out = img * up(scale) * (1 - up(alpha)) + up(wash) * up(alpha)
    label = up(assignment)[..., 0]
    edge = np.zeros((side, side), bool)
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    out[edge] *= EDGE
    frame = np.ones((patch, patch), bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    for pos, j in enumerate(kept):
        r, c = divmod(int(j), grid)
        out[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch][frame] = colors[pos]
    return np.clip(out, 0.0, 1.0)


def bundle_caption(bundle: Path, manifest: Any) -> str:
    """The default caption of a kept-token figure: the bundle's folder and the model it was exported from."""
    source = manifest.data.get("source", {}).get("model", "?")
    return f"bundle {bundle.resolve().parent.name}/{bundle.name} (exported from {source})"


def add_figure_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """A figure tool's ``--caption`` (default: :func:`bundle_caption`) and ``--out`` PNG arguments."""
    parser.add_argument("--caption", default=None,
                        help="figure caption (default: the bundle and the model it was exported from)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"PNG to write (default: {default_out})")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return write_atomic(path, lambda handle: handle.write(buffer.getvalue()))


def _band(ax, x: np.ndarray, curves: np.ndarray, color: str, label: str) -> None:
    """Mean line, ± std band and dashed min / max of ``curves [I, len(x)]``."""
    mean, std = curves.mean(axis=0), curves.std(axis=0)
    ax.plot(x, mean, color=color, marker="o", markersize=3, label=f"{label}: mean")
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25, label="± std")
    ax.plot(x, curves.min(axis=0), color=color, linestyle="--", linewidth=0.8, label="min / max")
    ax.plot(x, curves.max(axis=0), color=color, linestyle="--", linewidth=0.8)


def _shade_ranges(ax, shallow: tuple[int, int], deep: tuple[int, int]) -> None:
    """Shade the inclusive layer ranges (bars centred on integer layers)."""
    for (lo, hi), color, name in ((shallow, "tab:green", "shallow"), (deep, "tab:purple", "deep")):
        ax.axvspan(lo - 0.5, hi + 0.5, color=color, alpha=0.12, label=f"{name} range {lo}-{hi}")


def entropy_kl_figure(entropy: np.ndarray, kl: np.ndarray, shallow: tuple[int, int], deep: tuple[int, int],
                      num_patches: int) -> Figure:
    """H(l) over ``entropy [I, f]`` and KL(l‖l+1) over ``kl [I, f-1]``, layers 1..f, ranges shaded."""
    images, f = entropy.shape
    fig = _new_figure(9, 7)
    ax_h, ax_kl = fig.subplots(2, 1, sharex=True)
    layers = np.arange(1, f + 1)
    _band(ax_h, layers, entropy, "tab:blue", "H(l)")
    ax_h.axhline(np.log(num_patches), color="grey", linewidth=0.8, label=f"ln N = {np.log(num_patches):.2f}")
    _shade_ranges(ax_h, shallow, deep)
    ax_h.set_ylabel("H(l) [nats]")
    ax_h.set_title(f"Entropy of the [CLS] attention per layer ({images} image{'s' * (images != 1)})")
    ax_h.legend(fontsize=7, loc="best")
    if f > 1:
        _band(ax_kl, layers[:-1], kl, "tab:red", "KL(l‖l+1)")
    _shade_ranges(ax_kl, shallow, deep)
    ax_kl.set_ylabel("KL(l ‖ l+1) [nats]")
    ax_kl.set_xlabel("vision layer l")
    ax_kl.set_xticks(layers)
    ax_kl.legend(fontsize=7, loc="best")
    return fig


def heatmaps_figure(rgb: np.ndarray, maps: dict[str, np.ndarray], grid: int, title: str) -> Figure:
    """The image and one ``[N]`` attention map per entry of ``maps`` (label -> S^l) over it."""
    side = rgb.shape[0]
    fig = _new_figure(4 * (1 + len(maps)), 4.4)
    axes = fig.subplots(1, 1 + len(maps))
    axes[0].imshow(rgb)
    axes[0].set_title("preprocessed image")
    for ax, (label, scores) in zip(axes[1:], maps.items(), strict=True):
        ax.imshow(rgb)
        shown = ax.imshow(np.asarray(scores).reshape(grid, grid), cmap="inferno", alpha=0.6,
                          extent=(0, side, side, 0), interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(label)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def layer_histogram_figure(chosen: dict[str, list[int]], free: dict[str, list[int]], f: int,
                           shallow: tuple[int, int], deep: tuple[int, int]) -> Figure:
    """Counts over images of the layers picked within the ranges (``chosen``) and over 1..f (``free``)."""
    fig = _new_figure(9, 6)
    layers = np.arange(1, f + 1)
    for ax, groups, title in zip(fig.subplots(2, 1, sharex=True), (chosen, free),
                                 ("within the default ranges", "unconstrained, over all layers"), strict=True):
        width = 0.8 / max(1, len(groups))
        for i, (label, picks) in enumerate(groups.items()):
            counts = np.bincount(np.asarray(picks, np.int64), minlength=f + 1)[1:]
            ax.bar(layers - 0.4 + width * (i + 0.5), counts, width=width, label=label)
        _shade_ranges(ax, shallow, deep)
        ax.set_ylabel("images")
        ax.set_title(f"layer chosen per image, {title}")
        ax.legend(fontsize=7)
        ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("vision layer l")
    ax.set_xticks(layers)
    return fig


def kept_panels_figure(overlays: Sequence[np.ndarray], titles: Sequence[str], caption: str) -> Figure:
    """Overlays from :func:`kept_overlay` side by side, each with its title, above a caption."""
    fig = _new_figure(4.6 * len(overlays), 5.2)
    for ax, overlay, title in zip(fig.subplots(1, len(overlays), squeeze=False)[0], overlays, titles, strict=True):
        ax.imshow(overlay, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=9, wrap=True)
    fig.suptitle(caption, fontsize=9)
    return fig


def kept_figure(overlay: np.ndarray, title: str) -> Figure:
    """One overlay image from :func:`kept_overlay` with a title."""
    fig = _new_figure(5.5, 5.9)
    ax = fig.subplots()
    ax.imshow(overlay, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return fig
