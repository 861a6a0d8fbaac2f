"""Readers of the benchmarks' standard local formats into one list of questions.

TextVQA val JSON + ``train_images/``, MME's folder layout (both variants), VizWiz val JSON +
``val/``, and easy-VQA straight from the ``easy-vqa==1.0`` wheel (downloaded once with pip).
Bad input (missing path, malformed JSON, missing image) is a one-line :class:`InputError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.errors import InputError
from runtime.preprocess import load_image

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
MME_QA_DIR = "questions_answers_YN"


@dataclass(frozen=True)
class Item:
    """One question of a benchmark."""

    question_id: str  # unique within the benchmark
    image_id: str  # questions on the same image share it (MME acc+)
    image: str  # file path, or member name inside the easy-VQA wheel
    question: str  # as in the dataset, without the task's prompt suffix
    answers: tuple[str, ...]  # human answers (VQA: 10) or the single ground truth
    group: str = ""  # MME subtask, VizWiz answerable/unanswerable, easy-VQA answer type


@dataclass(frozen=True)
class Dataset:
    """Questions plus the way to open their images."""

    items: tuple[Item, ...]
    open_image: Callable[[Item], Image.Image] = field(compare=False)
    on_disk: bool = True  # ``Item.image`` is a file path (checked up front by :meth:`check_images`)

    def limited(self, limit: int | None) -> Dataset:
        """The first ``limit`` questions (all when None)."""
        return self if limit is None else Dataset(self.items[:limit], self.open_image, self.on_disk)

    def check_images(self) -> None:
        """A one-line InputError naming the first question whose image file is missing."""
        if not self.on_disk:
            return
        for item in self.items:
            if not Path(item.image).is_file():
                raise InputError(f"image {item.image} of question {item.question_id} not found "
                                 "(wrong --data or --images?)")


def open_file_image(item: Item) -> Image.Image:
    """An item whose ``image`` is a file path, decoded (RGB conversion is the pipeline's)."""
    return load_image(item.image)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"no data file at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"cannot parse {path} as JSON: {err}") from None


def _images_dir(json_path: Path, images: Path | None, candidates: Sequence[str]) -> Path:
    """``images`` if given, else the first of ``candidates`` beside the JSON that exists."""
    if images is not None:
        if not images.is_dir():
            raise InputError(f"no images directory at {images}")
        return images
    for name in candidates:
        if (json_path.parent / name).is_dir():
            return json_path.parent / name
    raise InputError(f"no images directory beside {json_path} (looked for {', '.join(candidates)}); "
                     "pass --images DIR")


def _strings(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: {what} must be a non-empty list of strings, got {str(value)[:80]}")
    return tuple(value)


def _field(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise InputError(f"{where} lacks {key!r}")
    return entry[key]


def read_textvqa(path: Path, images: Path | None = None) -> Dataset:
    """TextVQA JSON ``{"data": [{"question_id", "image_id", "question", "answers": [10]}]}``;
    images ``<images>/<image_id>.jpg`` (default: ``train_images/`` beside the JSON)."""
    data = _read_json(path)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InputError(f"{path} is not a TextVQA file: expected {{\"data\": [...]}}")
    root = _images_dir(path, images, ("train_images", "images"))
    items = []
    for i, entry in enumerate(entries):
        where = f"{path.name} entry {i}"
        image_id = str(_field(entry, "image_id", where))
        items.append(Item(str(_field(entry, "question_id", where)), image_id, str(root / f"{image_id}.jpg"),
                          str(_field(entry, "question", where)), _strings(_field(entry, "answers", where),
                                                                          where, "answers")))
    return Dataset(tuple(items), open_file_image)


def read_vizwiz(path: Path, images: Path | None = None) -> Dataset:
    """VizWiz JSON ``[{"image", "question", "answers": [{"answer", "answer_confidence"}],
    "answerable"}]``; images by file name (default: ``val/`` beside the JSON, or ``../val``)."""
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise InputError(f"{path} is not a VizWiz file: expected a JSON list of questions")
    root = _images_dir(path, images, ("val", "images", "../val"))
    items = []
    for i, entry in enumerate(entries):
        where = f"{path.name} entry {i}"
        name = str(_field(entry, "image", where))
        answers = _field(entry, "answers", where)
        texts = [a.get("answer") if isinstance(a, dict) else None for a in answers] if isinstance(answers, list) \
            else answers
        if entry.get("answerable", 1) not in (0, 1):
            raise InputError(f"{where}: 'answerable' must be 0 or 1, got {entry.get('answerable')!r}")
        group = "answerable" if entry.get("answerable", 1) else "unanswerable"
        items.append(Item(name, name, str(root / name), str(_field(entry, "question", where)),
                          _strings(texts, where, "answers[].answer"), group))
    return Dataset(tuple(items), open_file_image)


def _find_image(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def _mme_layout(task: Path) -> tuple[Path, Path] | None:
    """(questions dir, images dir) of an MME subtask folder, or None when it is not one."""
    if (task / MME_QA_DIR).is_dir():
        return task / MME_QA_DIR, (task / "images" if (task / "images").is_dir() else task)
    if any(task.glob("*.txt")):
        return task, (task / "images" if (task / "images").is_dir() else task)
    return None


def _mme_subtask(task: Path, questions: Path, images: Path) -> list[Item]:
    items = []
    for txt in sorted(questions.glob("*.txt")):
        image = _find_image(images, txt.stem)
        if image is None:
            raise InputError(f"MME {task.name}: no image {txt.stem}.jpg/.png in {images} for {txt.name}")
        try:
            lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read {txt}: {err}") from None
        for i, line in enumerate(lines):
            question, tab, answer = line.rpartition("\t")
            if not tab or not question.strip() or answer.strip().lower() not in ("yes", "no"):
                raise InputError(f"{txt}: line {i + 1} is not 'question<TAB>Yes|No': {line[:80]!r}")
            items.append(Item(f"{task.name}/{txt.stem}/{i}", f"{task.name}/{txt.stem}", str(image),
                              question.strip(), (answer.strip(),), task.name))
    return items


def read_mme(path: Path, images: Path | None = None) -> Dataset:
    """MME: subtask folders under ``path`` (or ``path`` itself being one), each either
    ``images/`` + ``questions_answers_YN/*.txt`` or images and ``*.txt`` side by side (the
    ``images/`` folder is optional there too); each txt holds ``question<TAB>Yes|No`` lines."""
    if images is not None:
        raise InputError("--images does not apply to MME (images live in each subtask folder)")
    if not path.is_dir():
        raise InputError(f"no MME directory at {path}")
    own = _mme_layout(path)
    tasks = [(path, own)] if own else [(d, _mme_layout(d)) for d in sorted(path.iterdir()) if d.is_dir()]
    items = [item for task, layout in tasks if layout for item in _mme_subtask(task, *layout)]
    if not items:
        raise InputError(f"no MME subtask folders with questions under {path}")
    return Dataset(tuple(items), open_file_image)
