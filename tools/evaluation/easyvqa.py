"""easy-VQA (``easy-vqa==1.0`` on PyPI): shapes and colours, read straight from the wheel zip.

The wheel bundles ``easy_vqa/data/{train,test}/questions.json`` (``[question, answer, image_id]``
triples) and ``images/<image_id>.png``; it is fetched once with ``pip download --no-deps`` into
the cache (``$ENTROPRUNE_CACHE``, default ``~/.cache/entroprune``), so an evaluation can always run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from runtime.cli import log
from runtime.errors import InputError
from tools.evaluation.datasets import Dataset, Item

REQUIREMENT = "easy-vqa==1.0"
WHEEL = "easy_vqa-1.0-py3-none-any.whl"
DATA = "easy_vqa/data"
SPLIT = "test"
SHAPES = frozenset({"circle", "rectangle", "triangle"})


def default_cache() -> Path:
    """``$ENTROPRUNE_CACHE`` or ``~/.cache/entroprune``."""
    return Path(os.environ.get("ENTROPRUNE_CACHE", Path.home() / ".cache" / "entroprune")).expanduser()


def pip_download(folder: Path) -> None:
    """``pip download --no-deps easy-vqa==1.0 -d folder`` (one-line InputError on failure)."""
    log(f"downloading {REQUIREMENT} into {folder} (pip download --no-deps)")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                             REQUIREMENT, "-d", str(folder)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"pip download {REQUIREMENT} failed: {tail}")


def easyvqa_wheel(data: Path | None, download: Callable[[Path], None] = pip_download) -> Path:
    """The wheel: ``data`` itself when it is a file; else ``<dir>/easy_vqa-1.0-…whl`` in
    ``data`` (or the default cache when None), downloaded there when missing."""
    if data is not None and data.is_file():
        return data
    if data is not None and not data.is_dir():
        raise InputError(f"no easy-VQA data at {data} (give the wheel, a folder to cache it in, or no --data)")
    folder = data if data is not None else default_cache()
    wheel = folder / WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        download(folder)
        if not wheel.is_file():
            raise InputError(f"pip download did not produce {wheel}")
    return wheel


def answer_group(answer: str) -> str:
    """``yes/no``, ``shape`` or ``color``. Example: "triangle" -> "shape", "teal" -> "color"."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def read_easyvqa(path: Path | None, images: Path | None = None,
                 download: Callable[[Path], None] = pip_download) -> Dataset:
    """easy-VQA's test split from the wheel; question ids ``test/<index>``."""
    if images is not None:
        raise InputError("--images does not apply to easyvqa (images live inside the wheel)")
    wheel = easyvqa_wheel(path, download)
    try:
        archive = zipfile.ZipFile(wheel)
        triples = json.loads(archive.read(f"{DATA}/{SPLIT}/questions.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot read easy-VQA questions from {wheel}: {err}") from None
    items = []
    for i, triple in enumerate(triples):
        if not (isinstance(triple, list) and len(triple) == 3):
            raise InputError(f"{wheel}: question {i} is not [question, answer, image_id]: {str(triple)[:80]}")
        question, answer, image_id = triple
        items.append(Item(f"{SPLIT}/{i}", f"{SPLIT}/{image_id}", f"{DATA}/{SPLIT}/images/{image_id}.png",
                          str(question), (str(answer),), answer_group(str(answer))))

    def open_image(item: Item) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(archive.read(item.image)))
            image.load()
            return image
        except KeyError:
            raise InputError(f"{wheel} has no image {item.image}") from None

    return Dataset(tuple(items), open_image, on_disk=False)
