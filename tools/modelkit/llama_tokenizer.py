"""A SentencePiece tokenizer with LLaMA's layout, trained offline on real English text.

Layout as LLaMA's ``tokenizer.model``: BPE with byte fallback, exactly 32,000 pieces, ids 0..2 =
``<unk>``, ``<s>``, ``</s>``, ids 3..258 = the 256 byte pieces ``<0x00>``..``<0xFF>``, then the
learned merges and characters. The corpus is the docstrings, triple-quoted strings and comments
of the Python standard library (found via ``sysconfig``, capped at ``CORPUS_CHARS``) plus
LLaVA-style prompts, so a LLaVA prompt tokenizes to about LLaMA's length (~20-25 tokens).
Training takes about two seconds on 2 cores. ``write_llava_tokenizer`` then adds ``<image>`` (32000)
and ``<pad>`` (32001) as llava-hf does and saves the HF tokenizer files and the LLaVA processor.

If BPE stops short of the requested size (a small corpus has too few merges), the model proto is
padded with NORMAL filler pieces of three private-use-area (PUA) characters and lower scores than
any learned piece. The corpus holds no PUA character, so no single PUA character and no PUA pair
is a piece; SentencePiece only merges adjacent pieces, and HF's BPE only applies merges of two
known pieces, so neither can ever produce a filler.
"""

from __future__ import annotations

import os
import re
import sysconfig
import tempfile
from pathlib import Path

LLAMA_PIECES = 32000
IMAGE_TOKEN_INDEX = LLAMA_PIECES  # <image>, added by llava-hf after the pieces
PAD_TOKEN_ID = LLAMA_PIECES + 1  # <pad>
CORPUS_CHARS = 3_000_000
_PUA = 0xE000  # start of the BMP private-use area (U+E000..U+F8FF, 6,400 characters)
_PUA_SIZE = 6400
_PUA_CHARS = re.compile("[\ue000-\uf8ff]")
_STRINGS = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_COMMENTS = re.compile(r"^[ \t]*#[ \t]?(.*)$", re.M)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
_QUESTIONS = (
    "What is shown in this image? Describe it in detail.", "What color is the car?",
    "How many people are in the picture?", "Is there a dog in the image?", "What does the sign say?",
    "Where was this photo taken?", "Describe the scene.", "What is the man holding?",
    "Answer the question using a single word or phrase.", "What is on the table?",
)
_ANSWERS = (
    "The image shows a cat sitting on a red mat next to a window.", "Two.", "Yes.", "No.",
    "It is a busy street with cars, buses and people walking on the sidewalk.", "A cup of coffee.",
)


def stdlib_corpus(max_chars: int = CORPUS_CHARS) -> list[str]:
    """Non-empty lines of the standard library's docstrings and comments, up to ``max_chars`` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        text = _PUA_CHARS.sub("", path.read_text(encoding="utf-8", errors="replace"))
        chunks = [m.group(1) or m.group(2) or "" for m in _STRINGS.finditer(text)] + _COMMENTS.findall(text)
        for line in (line.strip() for chunk in chunks for line in chunk.splitlines()):
            if any(ch.isalpha() for ch in line):
                lines.append(line)
                total += len(line)
        if total >= max_chars:
            break
    return lines


def llava_prompts() -> list[str]:
    """LLaVA-1.5 conversation lines (every question with every answer), as the model sees them."""
    return [f"USER: {q} ASSISTANT: {a}" for q in _QUESTIONS for a in _ANSWERS]


def train_llama_spm(workdir: Path, pieces: int = LLAMA_PIECES, max_chars: int = CORPUS_CHARS) -> Path:
    """Train the BPE model into ``workdir/tokenizer.model`` (padded to ``pieces``) and return its path."""
    import sentencepiece as spm

    corpus = workdir / "corpus.txt"
    lines = stdlib_corpus(max_chars) + llava_prompts() * 20
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(workdir / "tokenizer"), vocab_size=pieces, model_type="bpe",
        byte_fallback=True, character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        minloglevel=2, num_threads=2,
    )
    model = workdir / "tokenizer.model"
    pad_pieces(model, pieces)
    return model


def filler_piece(k: int) -> str:
    """The ``k``-th filler: three PUA characters, unique for ``k`` < 6,400²."""
    if not 0 <= k < _PUA_SIZE**2:
        raise ValueError(f"filler index must be in [0, {_PUA_SIZE**2}), got {k}")
    return chr(_PUA) + chr(_PUA + k // _PUA_SIZE) + chr(_PUA + k % _PUA_SIZE)


def pad_pieces(model: Path, pieces: int) -> int:
    """Append NORMAL filler pieces to the SentencePiece model file up to ``pieces``; return how many."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    missing = pieces - len(proto.pieces)
    if missing < 0:
        raise ValueError(f"{model} already has {len(proto.pieces)} pieces, more than {pieces}")
    known = {p.piece for p in proto.pieces}
    if any(_PUA_CHARS.search(piece) for piece in known):
        raise ValueError(f"{model} has private-use-area pieces; fillers could collide with them")
    normal = proto.SentencePiece.Type.NORMAL
    lowest = min((p.score for p in proto.pieces if p.type == normal), default=0.0)
    for k in range(missing):
        proto.pieces.add(piece=filler_piece(k), score=lowest - 1.0 - k, type=normal)
    proto.trainer_spec.vocab_size = pieces
    model.write_bytes(proto.SerializeToString())
    return missing


def write_llava_tokenizer(out: Path, image_size: int, patch_size: int, tokenizer_model: Path | None = None) -> None:
    """tokenizer.model (trained, or copied from ``tokenizer_model``), HF tokenizer files and the processor."""
    from runtime.cli import log
    from tools.modelkit.llava_parts import llava_tokenizer, write_processor

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        staging = Path(tmp)
        if tokenizer_model is None:
            log("training the 32,000-piece SentencePiece tokenizer on the standard library's docstrings")
        model = tokenizer_model or train_llama_spm(staging)
        (staging / "tokenizer.model").write_bytes(Path(model).read_bytes())
        tokenizer = llava_tokenizer(staging)
        if tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) != [IMAGE_TOKEN_INDEX, PAD_TOKEN_ID]:
            raise AssertionError(f"<image>, <pad> got ids {tokenizer.convert_tokens_to_ids(['<image>', '<pad>'])}")
        write_processor(staging, tokenizer, image_size=image_size, patch_size=patch_size)
        for path in staging.iterdir():  # each file renamed into place: never a half-written file
            if path.is_file() and path.name not in ("corpus.txt", "tokenizer.vocab"):
                os.replace(path, out / path.name)
