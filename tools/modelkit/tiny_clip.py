"""The tiny LLaVA's CLIP: a ``CLIPModel`` checkpoint whose vision tower *is* the LLaVA's (as
``openai/clip-vit-large-patch14-336`` is LLaVA-1.5's), for the question-aware ``cdpruner``
(method.md §7).

``build_tiny_clip(out, vision_tower, words)`` writes ``out`` (usually ``TINY_LLAVA/clip``):

- ``config.json`` / ``model.safetensors``: the vision config and every vision weight copied from
  the LLaVA's tower (``post_layernorm`` included), a random ``visual_projection``, a small random
  text tower (77 positions) and ``text_projection``. ``text_config.eos_token_id`` is 2, as in the
  released OpenAI configs: transformers then pools the text at the *largest* token id of each row
  (the legacy argmax, what the released CDPruner ran), so ``<|endoftext|>`` is the last id here
  as in the real vocabulary (49407).
- ``vocab.json`` / ``merges.txt``: a byte-level BPE with CLIP's ``</w>`` end-of-word suffix,
  trained here with ``tokenizers`` on a generated text after CLIP's normalisation (NFC,
  whitespace runs → one space, lower case) and pre-tokenisation; the vocabulary is laid out as
  CLIP's (256 byte symbols, the same with ``</w>``, one entry per merge, then
  ``<|startoftext|>``, ``<|endoftext|>``).
- ``tokenizer.json`` and the tokenizer configs: ``CLIPTokenizerFast`` loaded from those two files
  (transformers' own CLIP pipeline) and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_POSITIONS = 77  # CLIP's text context
START, END = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
# CLIP's pre-tokeniser (transformers' CLIPTokenizer): specials, contractions, letters, single digits, other runs
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_EXTRA = ("what's", "it's", "don't", "they're", "we've", "i'm", "you'll", "he'd", "café", "naïve", "über",
          "?", "!", ",", ".", "...", "(", ")", "-", "2024", "17", "3.5")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character map, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _corpus(words: Sequence[str], seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    pool = [*words, *_EXTRA]
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(3, 12))) for _ in range(lines)]


def train_clip_bpe(words: Sequence[str], seed: int, vocab_size: int = 900) -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)`` of a CLIP-layout byte-level BPE trained on a generated text (see module doc)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=SUFFIX))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix=SUFFIX)
    tokenizer.train_from_iterator(_corpus(words, seed), trainer)
    pairs = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(p) if isinstance(p, list) else p for p in pairs]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + SUFFIX for s in symbols]
    seen = set(vocab_list)
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in seen:
            seen.add(token)
            vocab_list.append(token)
    vocab_list += [START, END]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def write_clip_tokenizer(out: Path, words: Sequence[str], seed: int) -> Any:
    """Train the BPE, write vocab.json + merges.txt, load them with ``CLIPTokenizerFast`` and
    ``save_pretrained`` it into ``out`` (adds tokenizer.json); returns the tokenizer."""
    from transformers import CLIPTokenizerFast

    vocab, merges = train_clip_bpe(words, seed)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizerFast.from_pretrained(out, model_max_length=MAX_POSITIONS)
    tokenizer.save_pretrained(out)
    return tokenizer


@dataclass(frozen=True)
class TextTowerShape:
    """The text tower's size: tiny by default; :data:`CLIP_L_TEXT` is CLIP ViT-L/14-336's (benchmarks)."""

    width: int = 32
    layers: int = 2
    heads: int = 2
    mlp: int = 64
    projection_dim: int = 32


CLIP_L_TEXT = TextTowerShape(width=768, layers=12, heads=12, mlp=3072, projection_dim=768)


def build_tiny_clip(out: str | Path, vision_tower: Any, words: Sequence[str], seed: int = 0,
                    shape: TextTowerShape = TextTowerShape()) -> Path:
    """Write the CLIP checkpoint of ``vision_tower`` (the LLaVA's ``CLIPVisionModel``) into ``out``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = write_clip_tokenizer(out, words, seed)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=shape.width, intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, max_position_embeddings=MAX_POSITIONS,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=shape.projection_dim,
        bos_token_id=0, pad_token_id=1, eos_token_id=2,  # the released configs' (legacy argmax pooling)
    )
    if tokenizer.convert_tokens_to_ids(END) != len(tokenizer) - 1:
        raise RuntimeError(f"{END} must be the largest id for CLIP's argmax pooling")
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision_tower.config.to_dict(),
                        projection_dim=shape.projection_dim)
    torch.manual_seed(seed + 7)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        source = getattr(vision_tower, "vision_model", vision_tower)  # transformers 5: flat CLIPVisionModel
        model.vision_model.load_state_dict(source.state_dict(), strict=True)
    model.save_pretrained(out)
    return out
