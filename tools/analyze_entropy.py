"""Layer-wise [CLS]-attention entropy analysis of a bundle over a set of images.

``python tools/analyze_entropy.py --model BUNDLE IMAGES... --out DIR [--tokens 64] [--strategies ...]``

Writes to DIR: ``entropy_kl.png`` (H(l) and KL(l‖l+1), mean ± std and min/max over the images,
the manifest's default shallow/deep ranges shaded), ``heatmaps_<image>.png`` (S^l over the patch
grid for the chosen l_s and l_d), ``layer_histogram.png`` (layers chosen within the ranges and
unconstrained argmax/argmin H over 1..f), ``kept_<image>_<strategy>.png`` (kept patches framed,
merge groups tinted, dropped patches dimmed), ``entropy.csv`` (image, layer, H, KL; KL is empty
for layer f) and ``summary.json``. Layers are numbered 1..f (method.md §0). The chosen layers are
the runtime's own: the ``entropy`` strategy with the bundle's defaults. Strategies that need the
language-model probe run only when the bundle has one (``export.llm``), else they are skipped with
a note; the probe sees the LLaVA prompt of ``--question``.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from runtime.atomic import write_atomic, write_json_atomic
from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError
from runtime.llm.probe import DEFAULT_QUESTION, probe_from_manifest
from runtime.model_registry import bundle_path
from runtime.pipeline import Pipeline
from runtime.preprocess import load_image
from runtime.scoring import layer_distributions, layer_entropy, layer_kl
from runtime.strategies.registry import available, get_strategy
from runtime.types import ProbeOutput
from tools import entropy_plots as plots

ProbeFn = Callable[..., ProbeOutput]  # (image rows [N, E], final=False) -> ProbeOutput
BAR = 20  # width of the progress bar in characters


@dataclass(frozen=True)
class ImageAnalysis:
    """Per-image numbers of ``summary.json`` (layers 1-based)."""

    name: str  # file-name-safe, unique among the analysed images
    source: str  # the image path as given
    shallow: int  # l_s chosen by the runtime within the shallow range
    deep: int  # l_d chosen within the deep range
    argmax_all: int  # argmax_l H(l) over 1..f (ties: smaller layer)
    argmin_all: int  # argmin_l H(l) over 1..f
    max_kl_layer: int | None  # l of the largest KL(l‖l+1); None when f = 1
    entropy: list[float]  # H(1..f)
    kl: list[float]  # KL(1..f-1)
    figures: dict[str, str] = field(default_factory=dict)  # what -> file name in the output directory


def rank_average(values: np.ndarray) -> np.ndarray:
    """[n] values -> [n] float64 ranks 1..n, tied values sharing their mean rank.

    Example: ``[10, 30, 20, 20]`` -> ``[1, 4, 2.5, 2.5]``.
    """
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.shape[0], np.float64)
    ranks[order] = np.arange(1, x.shape[0] + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when undefined (n < 2 or constant).

    Example: ``spearman_rho([1, 2, 3], [3, 2, 1])`` -> ``-1.0``.
    """
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be [n] vectors of one length, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        return None
    ra, rb = rank_average(a) - (a.shape[0] + 1) / 2, rank_average(b) - (b.shape[0] + 1) / 2
    denom = np.sqrt((ra @ ra) * (rb @ rb))
    return None if denom == 0 else float(np.clip((ra @ rb) / denom, -1.0, 1.0))


def image_names(paths: Sequence[Path]) -> list[str]:
    """File stems made file-name-safe (``[A-Za-z0-9_.-]``) and unique by ``-2``, ``-3``, ... suffixes.

    Example: ``[a/x.png, b/x.jpg, "y z.png"]`` -> ``["x", "x-2", "y_z"]``.
    """
    names: list[str] = []
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem) or "image"
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}-{i}"
        names.append(name)
    return names


def progress(items: Sequence[Any], labels: Sequence[str], stream: TextIO | None = None) -> Iterator[Any]:
    """Yield ``items`` while drawing ``[####------] i/n label`` on stderr (one line per step off a tty)."""
    stream = stream or sys.stderr
    start, end = ("\r", "") if stream.isatty() else ("", "\n")
    total = len(items)
    for i, (item, label) in enumerate(zip(items, labels, strict=True)):
        filled = BAR * i // max(total, 1)
        stream.write(f"{start}[{'#' * filled}{'-' * (BAR - filled)}] {i}/{total} {label}{end}")
        stream.flush()
        yield item
    stream.write(f"{start}[{'#' * BAR}] {total}/{total} done{' ' * 20}\n")
    stream.flush()


def analyze_image(pipeline: Pipeline, name: str, path: Path, tokens: int, strategies: Sequence[str],
                  probe: ProbeFn | None, out: Path) -> ImageAnalysis:
    """Encode one image, write its heat-map and kept-token figures; its numbers."""
    pixels = pipeline.pixel_values(load_image(path))
    encoded = pipeline.encoder.encode(pixels)
    dists = layer_distributions(encoded.cls_attn)  # [f, N]
    entropy, kl = layer_entropy(dists), layer_kl(dists)
    chosen = pipeline.prune_encoded(encoded, tokens, "entropy")
    l_s, l_d = chosen.report["layers"]["shallow"], chosen.report["layers"]["deep"]
    config = pipeline.preprocess_config
    rgb = plots.display_image(pixels, config.image_mean, config.image_std)
    grid = pipeline.manifest.vision.grid
    figures = {"heatmaps": f"heatmaps_{name}.png"}
    maps = {f"shallow l_s = {l_s}": dists[l_s - 1], f"deep l_d = {l_d}": dists[l_d - 1]}
    title = f"{name}: head-mean [CLS] attention S^l (H = {entropy[l_s - 1]:.3f} / {entropy[l_d - 1]:.3f} nats)"
    plots.save_png(plots.heatmaps_figure(rgb, maps, grid, title), out / figures["heatmaps"])
    for strategy in strategies:
        result = chosen if strategy == "entropy" else pipeline.prune_encoded(encoded, tokens, strategy, probe)
        merged = int((result.counts > 1).sum())
        caption = f"{name} · {strategy}: {result.tokens}/{result.num_patches} kept, {merged} merge groups"
        figures[f"kept_{strategy}"] = f"kept_{name}_{strategy}.png"
        overlay = plots.kept_overlay(rgb, grid, result.kept, result.assignment)
        plots.save_png(plots.kept_figure(overlay, caption), out / figures[f"kept_{strategy}"])
    return ImageAnalysis(
        name=name, source=str(path), shallow=int(l_s), deep=int(l_d),
        argmax_all=int(np.argmax(entropy)) + 1, argmin_all=int(np.argmin(entropy)) + 1,
        max_kl_layer=int(np.argmax(kl)) + 1 if kl.size else None,
        entropy=[float(v) for v in entropy], kl=[float(v) for v in kl], figures=figures)


def aggregate(analyses: Sequence[ImageAnalysis], f: int) -> dict[str, Any]:
    """Mean curves, the layer of largest mean KL, Spearman rho of mean H vs layer, layer histograms."""
    entropy = np.asarray([a.entropy for a in analyses], np.float64)  # [I, f]
    kl = np.asarray([a.kl for a in analyses], np.float64).reshape(len(analyses), f - 1)
    mean_kl = kl.mean(axis=0)
    rho = spearman_rho(np.arange(1, f + 1), entropy.mean(axis=0))

    def histogram(picks: list[int]) -> dict[str, int]:
        return {str(layer): picks.count(layer) for layer in sorted(set(picks))}

    return {
        "images": len(analyses),
        "mean_entropy": entropy.mean(axis=0).tolist(), "std_entropy": entropy.std(axis=0).tolist(),
        "mean_kl": mean_kl.tolist(), "std_kl": kl.std(axis=0).tolist(),
        "max_kl_layer": int(np.argmax(mean_kl)) + 1 if mean_kl.size else None,
        "spearman_rho_entropy_vs_layer": rho,
        "entropy_falls_with_depth": None if rho is None else rho < 0,
        "histogram": {key: histogram([getattr(a, key) for a in analyses])
                      for key in ("shallow", "deep", "argmax_all", "argmin_all")},
    }


def write_csv(path: Path, analyses: Sequence[ImageAnalysis]) -> Path:
    """``image,layer,H,KL`` with f rows per image; KL(l‖l+1) is empty on the last layer."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "layer", "H", "KL"])
    for a in analyses:
        for layer, h in enumerate(a.entropy, start=1):
            writer.writerow([a.name, layer, repr(h), repr(a.kl[layer - 1]) if layer <= len(a.kl) else ""])
    data = buffer.getvalue().encode("utf-8")
    return write_atomic(path, lambda handle: handle.write(data))


def check_strategies(names: Sequence[str], has_probe: bool) -> tuple[list[str], list[str]]:
    """(strategies to run, notes on skipped ones); an unknown name is an InputError listing the valid."""
    run, notes = [], []
    for name in dict.fromkeys(names):
        if get_strategy(name).needs_probe and not has_probe:
            notes.append(f"{name}: skipped, it needs the language-model probe (the bundle has none; run export.llm)")
        else:
            run.append(name)
    return run, notes


def run_analysis(bundle: Path, images: Sequence[Path], out: Path, tokens: int = 64,
                 strategies: Sequence[str] | None = None, question: str = DEFAULT_QUESTION) -> dict[str, Any]:
    """Analyse ``images`` with ``bundle``, write every figure and table into ``out``; the summary."""
    if not images:
        raise InputError("no images given")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise InputError(f"image not found: {', '.join(missing)}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    pipeline = Pipeline(bundle)
    tokens = pipeline.check_budget(tokens)
    wanted = list(strategies) if strategies is not None else [s for s in available() if not get_strategy(s).keeps_all]
    needs_probe = any(get_strategy(s).needs_probe for s in wanted)
    probe = probe_from_manifest(pipeline.manifest, question) if needs_probe else None
    run, notes = check_strategies(wanted, probe is not None)
    for note in notes:
        log(f"note: {note}")
    names = image_names(images)
    analyses = [analyze_image(pipeline, name, Path(path), tokens, run, probe, out)
                for name, path in progress(list(zip(names, images, strict=True)), names)]
    return write_outputs(pipeline, analyses, out, tokens, run, notes)


def write_outputs(pipeline: Pipeline, analyses: Sequence[ImageAnalysis], out: Path, tokens: int,
                  strategies: Sequence[str], notes: Sequence[str]) -> dict[str, Any]:
    """The figures over all images, ``entropy.csv`` and ``summary.json``; the summary."""
    defaults, f = pipeline.manifest.pruning, len(analyses[0].entropy)
    shallow, deep = tuple(defaults.shallow), tuple(defaults.deep)
    entropy = np.asarray([a.entropy for a in analyses])
    kl = np.asarray([a.kl for a in analyses]).reshape(len(analyses), f - 1)
    plots.save_png(plots.entropy_kl_figure(entropy, kl, shallow, deep, pipeline.num_patches), out / "entropy_kl.png")
    chosen = {f"l_s = argmax H in {shallow[0]}-{shallow[1]}": [a.shallow for a in analyses],
              f"l_d = argmin H in {deep[0]}-{deep[1]}": [a.deep for a in analyses]}
    free = {"argmax H over 1..f": [a.argmax_all for a in analyses],
            "argmin H over 1..f": [a.argmin_all for a in analyses]}
    plots.save_png(plots.layer_histogram_figure(chosen, free, f, shallow, deep), out / "layer_histogram.png")
    write_csv(out / "entropy.csv", analyses)
    summary = {
        "bundle": str(pipeline.manifest.root), "tokens": tokens, "num_patches": pipeline.num_patches,
        "layers": f, "ranges": {"shallow": list(shallow), "deep": list(deep)}, "rule": defaults.rule,
        "strategies": list(strategies), "skipped": list(notes),
        "images": [asdict(a) for a in analyses], "aggregate": aggregate(analyses, f),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/analyze_entropy.py", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (any format Pillow reads)")
    parser.add_argument("--model", required=True, help="bundle directory written by export.clip (or a registry alias)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; files are overwritten)")
    parser.add_argument("--tokens", type=int, default=64, help="visual tokens kept, K (default: 64)")
    parser.add_argument("--strategies", nargs="+", default=None,
                        help=f"strategies for the kept-token figures, of {', '.join(available())} "
                             "(default: all but none)")
    parser.add_argument("--question", default=DEFAULT_QUESTION,
                        help=f"prompt the probe strategies see (default: {DEFAULT_QUESTION!r})")
    args = parser.parse_args(argv)

    def body() -> int:
        summary = run_analysis(bundle_path(args.model), args.images, args.out, args.tokens, args.strategies,
                               args.question)
        agg = summary["aggregate"]
        rho = agg["spearman_rho_entropy_vs_layer"]
        print(f"{agg['images']} images, f = {summary['layers']}: largest mean KL at l = {agg['max_kl_layer']}, "
              f"Spearman rho(H, l) = {'n/a' if rho is None else f'{rho:.3f}'}; outputs in {args.out}")
        return 0

    return run_cli(body, "analyze_entropy")


if __name__ == "__main__":
    raise SystemExit(main())
