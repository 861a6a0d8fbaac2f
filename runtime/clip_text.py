"""CLIP's joint space for ``cdpruner`` (method.md §7): the question's text embeddings ``T`` and the
vision features' image embeddings ``V``, from the bundle's text tower (``text.<export_id>/``).

``tokenize_question`` is pure (a ``tokenizers.Tokenizer`` in, int64 arrays out); :class:`ClipSpace`
holds the two onnxruntime sessions (``text.onnx``, ``image_projection.onnx``) and the tokenizer,
each checked against the manifest when opened (names, dtypes, widths, export id, file size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from runtime.bundle.entries import TextTowerInfo
from runtime.bundle.manifest import Manifest, bundle_file, text_tower_command
from runtime.encoder import FLOAT, check_finite, fits, open_graph, shape_text
from runtime.errors import BundleError, InputError

INT64 = "tensor(int64)"
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "text_embeds"
IMAGE_INPUT, IMAGE_OUTPUT = "features", "image_embeds"


@dataclass(frozen=True)
class QuestionTokens:
    """A question as M segments of the text tower's positions (method.md §7.3)."""

    input_ids: np.ndarray  # [M, max_positions] int64: start, question, end, then pad_id
    attention_mask: np.ndarray  # [M, max_positions] int64: 1 on tokens, 0 on padding

    @property
    def num_tokens(self) -> int:
        """Tokens of the question with its start and end tokens (the unpadded length)."""
        return int(self.attention_mask.sum())


def load_tokenizer(path: Path, repair: str) -> Tokenizer:
    """``tokenizer.json`` as a ``tokenizers.Tokenizer`` with truncation and padding off (segments are
    cut by :func:`tokenize_question`); an unreadable file is a one-line BundleError."""
    try:
        text = path.read_text(encoding="utf-8")
        tokenizer = Tokenizer.from_str(text)
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"cannot read {path}: {err}; {repair}") from None
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        raise BundleError(f"{path} is not a tokenizers file ({str(err).splitlines()[0][:160]}); {repair}") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def tokenize_question(tokenizer: Tokenizer, question: str, max_positions: int = 77, pad_id: int = 0) -> QuestionTokens:
    """The question alone with the tokenizer's start/end tokens, right-padded with ``pad_id`` (mask 0)
    to a multiple of ``max_positions`` and cut into M segments.

    Example: 80 tokens (start + 78 + end), 77 positions -> input_ids [2, 77]: row 0 the first 77
    tokens, row 1 the last 3 then 74 × pad_id; attention_mask row 1 = [1, 1, 1, 0, ...].
    """
    if not isinstance(question, str) or not question.strip():
        raise InputError("cdpruner needs the question's text, got an empty question")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError("the tokenizer truncates or pads; load it with load_tokenizer")
    ids = tokenizer.encode(question, add_special_tokens=True).ids
    segments = -(-len(ids) // max_positions)
    input_ids = np.full(segments * max_positions, pad_id, dtype=np.int64)
    mask = np.zeros(segments * max_positions, dtype=np.int64)
    input_ids[: len(ids)], mask[: len(ids)] = ids, 1
    return QuestionTokens(input_ids.reshape(segments, max_positions), mask.reshape(segments, max_positions))


def require_text_tower(manifest: Manifest) -> TextTowerInfo:
    """The bundle's text tower, or a one-line BundleError naming the command that adds it."""
    if manifest.text_tower is None:
        raise BundleError(f"bundle {manifest.root} has no CLIP text tower, which cdpruner needs; add it with: "
                          f"{text_tower_command(manifest.data, manifest.root)}")
    return manifest.text_tower


def _check_io(path: Path, nodes: list[ort.NodeArg], kind: str, expected: dict[str, tuple[str, tuple]],
              repair: str) -> None:
    """BundleError unless ``nodes`` are exactly ``expected`` (name -> dtype, dims; None: any size)."""
    if [n.name for n in nodes] != list(expected):
        raise BundleError(f"{path} has {kind}s {[n.name for n in nodes]}, expected {list(expected)}; {repair}")
    for node in nodes:
        dtype, dims = expected[node.name]
        if node.type != dtype or not fits(node.shape, dims):
            raise BundleError(f"{path}: {kind} {node.name!r} is {shape_text(node.shape)} {node.type}, expected "
                              f"{shape_text(dims)} {dtype}; {repair}")


class ClipSpace:
    """``text(question) -> T [M, P]`` and ``image(features [N, D]) -> V [N, P]``, float32.

    ``int8`` runs ``text.int8.onnx`` (written by ``--int8``); the image projection is always fp32.
    """

    def __init__(self, manifest: Manifest, provider: str | None = None, threads: int | None = None,
                 int8: bool = False) -> None:
        self.info = info = require_text_tower(manifest)
        self.repair = f"re-run: {text_tower_command(manifest.data, manifest.root, force=True)}"
        if int8 and "text_int8" not in info.files:
            raise BundleError(f"bundle {manifest.root} has no text.int8.onnx; add it with: "
                              f"{text_tower_command(manifest.data, manifest.root, force=True)} --int8")
        for name in info.files.values():
            bundle_file(manifest.root, name, "text tower", info.sizes[name], self.repair)
        root, text_role = manifest.root, "text_int8" if int8 else "text"
        self.text_path, self.image_path = root / info.files[text_role], root / info.files["image_projection"]
        self.tokenizer = load_tokenizer(root / info.files["tokenizer"], self.repair)
        self.text_session = open_graph(self.text_path, provider, threads, self.repair, info.export_id)
        self.image_session = open_graph(self.image_path, provider, threads, self.repair, info.export_id)
        ids = (INT64, (None, info.max_positions))
        _check_io(self.text_path, self.text_session.get_inputs(), "input", dict.fromkeys(TEXT_INPUTS, ids),
                  self.repair)
        _check_io(self.text_path, self.text_session.get_outputs(), "output",
                  {TEXT_OUTPUT: (FLOAT, (None, info.projection_dim))}, self.repair)
        _check_io(self.image_path, self.image_session.get_inputs(), "input",
                  {IMAGE_INPUT: (FLOAT, (None, info.hidden_size))}, self.repair)
        _check_io(self.image_path, self.image_session.get_outputs(), "output",
                  {IMAGE_OUTPUT: (FLOAT, (None, info.projection_dim))}, self.repair)

    def tokens(self, question: str) -> QuestionTokens:
        """The question's segments (:func:`tokenize_question` with the manifest's length and pad id)."""
        return tokenize_question(self.tokenizer, question, self.info.max_positions, self.info.pad_id)

    def text(self, question: str) -> np.ndarray:
        """``T [M, P]`` float32: CLIP's text embedding of each segment (not normalised)."""
        tokens = self.tokens(question)
        (out,) = self.text_session.run([TEXT_OUTPUT], {"input_ids": tokens.input_ids,
                                                       "attention_mask": tokens.attention_mask})
        self._check(self.text_path, TEXT_OUTPUT, out, tokens.input_ids.shape[0])
        return out

    def image(self, features: np.ndarray) -> np.ndarray:
        """Block f's patch features ``[N, D]`` -> ``V [N, P]`` float32 = visual_projection(post_layernorm(·))."""
        if features.ndim != 2 or features.shape[1] != self.info.hidden_size:
            raise ValueError(f"features must be [N, {self.info.hidden_size}], got {features.shape}")
        (out,) = self.image_session.run([IMAGE_OUTPUT], {IMAGE_INPUT: features.astype(np.float32, copy=False)})
        self._check(self.image_path, IMAGE_OUTPUT, out, features.shape[0])
        return out

    def _check(self, path: Path, name: str, out: np.ndarray, rows: int) -> None:
        if out.shape != (rows, self.info.projection_dim):
            raise BundleError(f"{path} returned {name!r} of shape {out.shape}, expected "
                              f"{(rows, self.info.projection_dim)}; {self.repair}")
        check_finite(path, name, out, self.repair)


def open_clip_space(manifest: Manifest, **options: object) -> ClipSpace:
    """:class:`ClipSpace` of the bundle (options: provider, threads, int8); a bundle without a text
    tower is a one-line BundleError naming ``python -m export.clip ... --text-tower-only``."""
    require_text_tower(manifest)
    return ClipSpace(manifest, **options)  # type: ignore[arg-type]
