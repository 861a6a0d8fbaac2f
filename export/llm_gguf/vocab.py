"""The LLaMA SentencePiece tokenizer of a Hugging Face checkpoint, as GGUF metadata.

Follows llama.cpp's ``convert_hf_to_gguf.py`` (``_create_vocab_sentencepiece``): the pieces of
``tokenizer.model`` with their scores and types, then the added tokens of ``tokenizer.json`` /
``tokenizer_config.json`` (``<image>``, ``<pad>``: CONTROL when special, else USER_DEFINED),
then ``[PAD{i}]`` UNUSED entries up to the model's vocabulary size (llava-1.5 pads to 32064).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from runtime.errors import ModelNotFoundError

ADDED_TOKEN_SCORE = -1000.0  # as convert_hf_to_gguf.py
PAD_TOKEN_SCORE = -10000.0


@dataclass(frozen=True)
class SpmVocab:
    """Everything ``tokenizer.ggml.*`` holds for a SentencePiece ("llama") vocabulary."""

    tokens: tuple[bytes, ...]  # [n_vocab] UTF-8 pieces ("▁" kept as in the SP model)
    scores: tuple[float, ...]  # [n_vocab]
    types: tuple[int, ...]  # [n_vocab] gguf.TokenType values
    special_ids: dict[str, int]  # bos/eos/unk/pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool  # SentencePiece add_dummy_prefix
    chat_template: str | None

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.scores) == len(self.types):
            raise ValueError(f"vocab lists differ in length: {len(self.tokens)}, {len(self.scores)}, {len(self.types)}")

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Write the vocabulary into ``writer``'s key/value section."""
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(self.tokens))
        writer.add_token_scores(list(self.scores))
        writer.add_token_types(list(self.types))
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _sentencepiece(path: Path) -> tuple[list[bytes], list[float], list[int], bool]:
    """Pieces, scores, types and add_dummy_prefix of ``tokenizer.model``."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        types.append(int(kind))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


def _added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer.json's added_tokens and tokenizer_config's decoder."""
    added: dict[int, tuple[str, bool]] = {}
    for entry in _json(model_dir / "tokenizer.json").get("added_tokens", []):
        added[int(entry["id"])] = (entry["content"], bool(entry.get("special", False)))
    for key, entry in _json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        added.setdefault(int(key), (entry["content"], bool(entry.get("special", False))))
    return added


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The chat template from tokenizer_config, chat_template.jinja or chat_template.json."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        return template
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = _json(model_dir / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(tokens: list[bytes], tok_config: dict[str, Any], text_config: dict[str, Any]) -> dict[str, int]:
    """bos/eos/unk/pad ids: the tokenizer_config names looked up in the vocab, else config ids."""
    index = {piece: i for i, piece in enumerate(tokens)}
    ids: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        name = _token_name(tok_config.get(f"{kind}_token"))
        if name is not None and name.encode("utf-8") in index:
            ids[kind] = index[name.encode("utf-8")]
        elif isinstance(text_config.get(f"{kind}_token_id"), int):
            ids[kind] = int(text_config[f"{kind}_token_id"])
    return ids


def read_spm_vocab(model_dir: Path, n_vocab: int, text_config: dict[str, Any]) -> SpmVocab:
    """Build the GGUF vocabulary of ``n_vocab`` entries from a checkpoint directory."""
    sp_path = model_dir / "tokenizer.model"
    if not sp_path.is_file():
        raise ModelNotFoundError(
            f"{model_dir} has no tokenizer.model; only SentencePiece (LLaMA/Vicuna) tokenizers are supported"
        )
    tokens, scores, types, dummy_prefix = _sentencepiece(sp_path)
    for token_id, (content, special) in sorted(_added_tokens(model_dir).items()):
        if token_id < len(tokens) and types[token_id] != gguf.TokenType.UNUSED:
            continue  # already a SentencePiece piece (<unk>, <s>, </s>)
        if token_id >= n_vocab:
            raise ModelNotFoundError(f"added token {content!r} has id {token_id} >= vocab size {n_vocab}")
        while len(tokens) <= token_id:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(PAD_TOKEN_SCORE)
            types.append(int(gguf.TokenType.UNUSED))
        kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        tokens[token_id] = (content if special else content.replace("\u2581", " ")).encode("utf-8")
        scores[token_id] = ADDED_TOKEN_SCORE
        types[token_id] = int(kind)
    if len(tokens) > n_vocab:
        raise ModelNotFoundError(f"tokenizer has {len(tokens)} tokens but the model's vocab size is {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(PAD_TOKEN_SCORE)
        types.append(int(gguf.TokenType.UNUSED))
    tok_config = _json(model_dir / "tokenizer_config.json")
    return SpmVocab(
        tokens=tuple(tokens),
        scores=tuple(scores),
        types=tuple(types),
        special_ids=_special_ids(tokens, tok_config, text_config),
        add_bos=bool(tok_config.get("add_bos_token", True)),
        add_eos=bool(tok_config.get("add_eos_token", False)),
        add_space_prefix=dummy_prefix,
        chat_template=_chat_template(model_dir, tok_config),
    )
