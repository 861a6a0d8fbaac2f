"""Write scikit-image's bundled photographs as PNG files (inputs for the analysis tools).

``python tools/sample_photos.py OUT [--names astronaut coffee ...]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from runtime.atomic import write_atomic
from runtime.cli import OneLineParser, run_cli
from runtime.errors import InputError

DEFAULT_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
                 "coins", "page", "immunohistochemistry", "moon")


def photo(name: str) -> np.ndarray:
    """``H×W×3`` uint8 RGB of a scikit-image sample (grey ones repeated over 3 channels)."""
    from skimage import data

    if not callable(getattr(data, name, None)):
        raise InputError(f"scikit-image has no sample photo {name!r}")
    array = getattr(data, name)()
    array = np.stack([array] * 3, axis=-1) if array.ndim == 2 else array[..., :3]
    return np.ascontiguousarray(array.astype(np.uint8))


def write_photos(out: Path, names: tuple[str, ...] = DEFAULT_NAMES) -> list[Path]:
    """Save each photo as ``out/<name>.png``; returns the paths."""
    import io

    from PIL import Image

    paths = []
    for name in names:
        buffer = io.BytesIO()
        Image.fromarray(photo(name)).save(buffer, format="PNG")
        paths.append(write_atomic(out / f"{name}.png", lambda f, b=buffer: f.write(b.getvalue())))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/sample_photos.py", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the PNG files into")
    parser.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES), help="photos (default: 10 of them)")
    args = parser.parse_args(argv)

    def body() -> int:
        for path in write_photos(args.out, tuple(args.names)):
            print(path)
        return 0

    return run_cli(body, "sample_photos")


if __name__ == "__main__":
    sys.exit(main())
