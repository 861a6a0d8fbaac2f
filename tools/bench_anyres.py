"""Stage times of a LLaVA-NeXT bundle's vision side: tiles, encoder, per-tile pruning, projection.

``python tools/bench_anyres.py --model BUNDLE [--size 672 672] [--strategies none entropy ...]
[--tokens 640 320 160] [--repeats 3] [--threads N]``

One photo (scikit-image's cat) resized to ``--size`` (height, width; 672×672 gives the 2×2 grid
with nothing unpadded) is preprocessed and encoded ``--repeats`` times (all T tiles as one batch),
then each strategy prunes it at each K. Prints a markdown table of medians: rows fed (newlines
included) next to the time of each stage. The language model's prefill of those rows is measured
by ``tools/bench_llm.py --rows``; ``tools/bench.py`` measures the whole chain, prefill included.
"""

from __future__ import annotations

from pathlib import Path

from runtime.anyres.pipeline import AnyresPipeline
from runtime.cli import OneLineParser, log, run_cli
from tools.benchkit.common import TiledVision, markdown_table, median


def bench_anyres(bundle: Path, size: tuple[int, int], strategies: list[str], budgets: list[int], repeats: int,
                 threads: int | None) -> str:
    """The markdown table (see the module docstring)."""
    from PIL import Image
    from skimage import data

    vision = TiledVision(AnyresPipeline(bundle, threads=threads))
    image = Image.fromarray(data.chelsea()).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    encoded = [vision.encode(image) for _ in range(repeats)]
    pre, enc = median([e[1] for e in encoded]), median([e[2] for e in encoded])
    tiles = len(encoded[0][0].tiles)
    log(f"{tiles} tiles: preprocess {pre:.1f} ms, encode {enc:.1f} ms")
    cells = []
    for name in strategies:
        for k in vision.budgets(name, budgets):
            runs = [vision.prune(encoded[0][0], k, name) for _ in range(repeats)]
            first, times = runs[0], (median([r.stages_ms[s] for r in runs]) for s in ("prune", "projector"))
            cells.append([name, first.tokens, first.newline_rows, first.embeddings.shape[0], f"{pre:.1f}",
                          f"{enc:.1f}", *(f"{t:.1f}" for t in times)])
    header = ["strategy", "K", "newline rows", "rows fed", "preprocess ms", f"encode ms ({tiles} tiles)", "prune ms",
              "project ms"]
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/bench_anyres.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a LLaVA-NeXT bundle directory")
    parser.add_argument("--size", type=int, nargs=2, default=[672, 672], metavar=("H", "W"),
                        help="photo size in pixels (default: 672 672, the 2x2 grid)")
    parser.add_argument("--strategies", nargs="+", default=["none", "entropy"],
                        help="strategies (default: none entropy)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[640, 320, 160],
                        help="budgets K (default: 640 320 160)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats, medians taken (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    args = parser.parse_args(argv)

    def body() -> int:
        print(bench_anyres(args.model, tuple(args.size), args.strategies, args.tokens, args.repeats, args.threads))
        return 0

    return run_cli(body, "bench_anyres")


if __name__ == "__main__":
    raise SystemExit(main())
