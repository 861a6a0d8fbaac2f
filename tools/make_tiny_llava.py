"""Write a tiny random LLaVA-1.5 (or LLaVA-NeXT) checkpoint that Hugging Face loads like the real one.

``python tools/make_tiny_llava.py OUT [--family llava-next [--lm mistral]] [--seed S] [--vision-layers 24]
[--full-vision]``
``python tools/make_tiny_llava.py OUT --shape llava-1.5-7b [--layout hub] [--text-layers N] [--shard-gb 2.0]``

The vision tower has LLaVA-1.5's geometry (image 336, patch 14, 576 patches, 24 blocks,
``vision_feature_layer=-2``) at a small width; the text model is a 4-layer LLaMA; the
tokenizer is a byte-fallback SentencePiece BPE trained here on a generated corpus (the same
kind of model as LLaMA's), with ``<image>`` and ``<pad>`` added as LLaVA-hf does. ``OUT/clip`` is
the CLIP checkpoint of the same vision tower with a small text tower and a CLIP BPE tokenizer
(``tools/modelkit/tiny_clip.py``), as ``openai/clip-vit-large-patch14-336`` is to LLaVA-1.5.
``--family llava-next`` writes a ``LlavaNextForConditionalGeneration`` with the same towers and tokenizer,
llava-hf v1.6's ``image_grid_pinpoints``, a random O(1) ``image_newline`` and a ``LlavaNextProcessor``
(PIL image processor: shortest edge and crop 336). ``--lm mistral`` gives it LLaVA-NeXT Mistral's kind of
language model instead of the LLaMA (Vicuna): a ``MistralConfig`` text model (``model_type`` "mistral",
grouped-query attention with 4 query heads per key/value head as Mistral-7B's 32/8, RoPE base 1e6,
``sliding_window`` None, 32k positions, embedding rows padded to a multiple of 64 as llava-hf's 32064).

Peaky attention: with default initialisation every block's [CLS] attention is almost uniform
(entropy ≈ ln 576), so rankings would be decided by noise. We scale the query/key weights of
each block by a depth-dependent factor (``qk_gain``) so that attention sharpens with depth, as
in trained CLIP, and rankings have clear margins (the tests assert the margins they rely on).
``--full-vision`` gives the ViT-L/14-336 width (1024, 16 heads) and CLIP-L's text tower (12 layers,
width 768) in ``OUT/clip`` for benchmarks.
``--shape`` instead writes random weights with the real llava-1.5-7b/13b configs, tensor names and
tokenizer layout, shard by shard (see ``tools/modelkit/shape_checkpoint.py``).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.anyres.preprocess import LLAVA_NEXT_PINPOINTS
from tools.modelkit.llava_parts import (
    IMAGE,
    PATCH,
    QK_GAIN,
    llava_tokenizer,
    sharpen_attention,
    write_next_processor,
    write_processor,
)
from tools.modelkit.tiny_clip import CLIP_L_TEXT, TextTowerShape, build_tiny_clip

CLIP_FOLDER = "clip"  # OUT/clip: the CLIP checkpoint the vision tower came from (cdpruner's text side)

_WORDS = (
    "the a an cat dog bird sits on under mat table red blue green yellow black white image "
    "picture photo shows what is in this describe color shape circle square triangle big small "
    "left right top bottom yes no there are two three one how many person man woman car tree "
    "sky water road house sign text reads says answer question USER ASSISTANT"
).split()


def _train_tokenizer(workdir: Path, vocab_size: int, seed: int) -> Path:
    """Train a byte-fallback SentencePiece BPE model (LLaMA's kind) on a generated corpus."""
    import sentencepiece as spm

    rng = random.Random(seed)
    corpus = workdir / "corpus.txt"
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(3000)]
    lines += ["USER: <image>\nWhat is shown? ASSISTANT: A picture.", "0123456789 .,:;!?'\"()-"]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(workdir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", minloglevel=2, num_threads=1,
    )
    return workdir / "tokenizer.model"


@dataclass(frozen=True)
class TinyParts:
    """What both families share: the tokenizer (saved into OUT) and the tower configs."""

    tokenizer: Any  # LlamaTokenizer with <image> and <pad>
    vision: Any  # CLIPVisionConfig: 336 px, patch 14
    text: Any  # LlamaConfig or MistralConfig
    image_token_index: int


LANGUAGE_MODELS = ("vicuna", "mistral")


def _text_config(lm: str, n_tokens: int, width: int, layers: int) -> Any:
    """The tiny language model's config: LLaMA (Vicuna) or Mistral (``n_tokens``: the tokenizer's size)."""
    from transformers import LlamaConfig, MistralConfig

    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=n_tokens - 1, tie_word_embeddings=False)
    if lm == "vicuna":
        return LlamaConfig(
            vocab_size=n_tokens, hidden_size=width, intermediate_size=2 * width + 32, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=10000.0, **special,
        )
    if lm == "mistral":
        return MistralConfig(
            vocab_size=-(-n_tokens // 64) * 64, hidden_size=width, intermediate_size=2 * width + 32,
            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=width // 8,
            max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, **special,
        )
    raise ValueError(f"unknown language model {lm!r}; choose from {', '.join(LANGUAGE_MODELS)}")


def _tiny_parts(out: Path, seed: int, vision_layers: int, vision_width: int, vision_heads: int,
                text_layers: int, text_width: int, lm: str = "vicuna") -> TinyParts:
    """Seed torch, train and save the tokenizer, and describe the CLIP tower and the language model."""
    import torch
    from transformers import CLIPVisionConfig

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = _train_tokenizer(Path(tmp), vocab_size=512, seed=seed)
        (out / "tokenizer.model").write_bytes(sp_model.read_bytes())
    tokenizer = llava_tokenizer(out)
    vision = CLIPVisionConfig(
        hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=IMAGE, patch_size=PATCH, projection_dim=vision_width,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = _text_config(lm, len(tokenizer), text_width, text_layers)
    return TinyParts(tokenizer, vision, text, tokenizer.convert_tokens_to_ids("<image>"))


def _llava_config_args(parts: TinyParts) -> dict[str, Any]:
    """The LlavaConfig / LlavaNextConfig arguments both families share."""
    return dict(
        vision_config=parts.vision, text_config=parts.text, image_token_index=parts.image_token_index,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(IMAGE // PATCH) ** 2, pad_token_id=len(parts.tokenizer) - 1,
    )


def _randomise(model: Any, qk_gain: tuple[float, float], seed: int) -> None:
    """Peaky CLIP attention, and O(1) activations so that numeric bugs (e.g. tanh GELU) show up."""
    import torch

    sharpen_attention(model.model.vision_tower, qk_gain, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5, generator=gen)
        for linear in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            linear.weight.normal_(0.0, 2.0 / linear.in_features**0.5, generator=gen)


def build_tiny_llava(
    out: str | Path,
    seed: int = 0,
    vision_layers: int = 24,
    vision_width: int = 64,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_width: int = 64,
    qk_gain: tuple[float, float] = QK_GAIN,
    clip_text: TextTowerShape | None = None,
) -> Path:
    """Write the LLaVA-1.5 checkpoint to ``out`` and return the path (``clip_text``: the size of OUT/clip's
    text tower)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = Path(out)
    parts = _tiny_parts(out, seed, vision_layers, vision_width, vision_heads, text_layers, text_width)
    model = LlavaForConditionalGeneration(LlavaConfig(**_llava_config_args(parts))).eval()
    _randomise(model, qk_gain, seed)
    model.save_pretrained(out)
    write_processor(out, parts.tokenizer)
    build_tiny_clip(out / CLIP_FOLDER, model.model.vision_tower, _WORDS, seed, clip_text or TextTowerShape())
    return out


def build_tiny_llava_next(
    out: str | Path,
    seed: int = 0,
    vision_layers: int = 24,
    vision_width: int = 64,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_width: int = 64,
    qk_gain: tuple[float, float] = QK_GAIN,
    clip_text: TextTowerShape | None = None,
    lm: str = "vicuna",
) -> Path:
    """Write a LLaVA-NeXT (1.6, anyres) checkpoint to ``out``: the 1.5 towers plus llava-hf v1.6's
    ``image_grid_pinpoints`` and a random O(1) ``image_newline``, with a LLaMA (``lm="vicuna"``) or
    Mistral (``lm="mistral"``) language model; returns the path."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    out = Path(out)
    parts = _tiny_parts(out, seed, vision_layers, vision_width, vision_heads, text_layers, text_width, lm)
    pinpoints = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    config = LlavaNextConfig(**_llava_config_args(parts), image_grid_pinpoints=pinpoints)
    model = LlavaNextForConditionalGeneration(config).eval()
    _randomise(model, qk_gain, seed)
    with torch.no_grad():  # HF draws it at 1/sqrt(E); O(1) makes a misplaced newline row stand out
        model.model.image_newline.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 2))
    model.save_pretrained(out)
    write_next_processor(out, parts.tokenizer, pinpoints)
    build_tiny_clip(out / CLIP_FOLDER, model.model.vision_tower, _WORDS, seed, clip_text or TextTowerShape())
    return out


BUILDERS = {"llava-1.5": build_tiny_llava, "llava-next": build_tiny_llava_next}


def _positive(kind: type) -> Any:
    """argparse type: a number of ``kind`` greater than zero."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    from runtime.cli import OneLineParser
    from tools.modelkit.shape_checkpoint import LAYOUTS, SHAPE_NAMES

    parser = OneLineParser(prog="make_tiny_llava", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write the checkpoint into")
    parser.add_argument("--family", choices=tuple(BUILDERS), default="llava-1.5",
                        help="llava-1.5, or llava-next: LLaVA-NeXT (1.6) anyres, image_newline and "
                             "image_grid_pinpoints (default: llava-1.5)")
    parser.add_argument("--lm", choices=LANGUAGE_MODELS, default=None,
                        help="language model of a llava-next checkpoint: vicuna (LLaMA) or mistral "
                             "(LLaVA-NeXT Mistral's GQA, RoPE base 1e6) (default: vicuna)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--vision-layers", type=_positive(int), default=None,
                        help="CLIP blocks of the tiny model (default: 24)")
    parser.add_argument("--full-vision", action="store_true",
                        help="ViT-L/14-336 width (1024, 16 heads) instead of the tiny one")
    shape = parser.add_argument_group("full-size-shaped checkpoint (tools/modelkit/shape_checkpoint.py)")
    shape.add_argument("--shape", choices=SHAPE_NAMES, default=None,
                       help="write random weights with this model's real configs and tokenizer layout")
    shape.add_argument("--layout", choices=LAYOUTS, default=None,
                       help="tensor names: hub (as llava-hf's files) or transformers5 (default: hub)")
    shape.add_argument("--text-layers", type=_positive(int), default=None,
                       help="override the language model's depth (default: the real one)")
    shape.add_argument("--shard-gb", type=_positive(float), default=None,
                       help="largest safetensors shard, in GB of 1e9 bytes (default: 2.0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from runtime.cli import run_cli

    parser = _parser()
    args = parser.parse_args(argv)
    shape_only = {"--layout": args.layout, "--text-layers": args.text_layers, "--shard-gb": args.shard_gb}
    if args.shape is None and any(value is not None for value in shape_only.values()):
        parser.error(f"{', '.join(k for k, v in shape_only.items() if v is not None)} only with --shape")
    if args.shape is not None and (args.full_vision or args.vision_layers is not None):
        parser.error("--full-vision and --vision-layers are for the tiny model, not with --shape")
    if args.shape is not None and args.family != "llava-1.5":
        parser.error("--shape writes llava-1.5 checkpoints only, not with --family llava-next")
    if args.lm is not None and args.family != "llava-next":
        parser.error("--lm only with --family llava-next (LLaVA-1.5 has a Vicuna language model)")

    def body() -> int:
        if args.shape is None:
            width, heads = (1024, 16) if args.full_vision else (64, 4)
            lm = {} if args.lm is None else {"lm": args.lm}
            path = BUILDERS[args.family](args.out, seed=args.seed, vision_layers=args.vision_layers or 24,
                                         vision_width=width, vision_heads=heads,
                                         clip_text=CLIP_L_TEXT if args.full_vision else None, **lm)
        else:
            from tools.modelkit.shape_checkpoint import write_shape_checkpoint

            path = write_shape_checkpoint(
                args.out, args.shape, layout=args.layout or "hub", text_layers=args.text_layers,
                shard_bytes=int((args.shard_gb or 2.0) * 1e9), seed=args.seed,
            )
        print(path)
        return 0

    return run_cli(body, "make_tiny_llava")


if __name__ == "__main__":
    sys.exit(main())
