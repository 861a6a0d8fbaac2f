"""Pieces of a LLaVA-1.5 / LLaVA-NeXT Hugging Face checkpoint shared by the tiny builder
(``make_tiny_llava``) and the full-shape one (``shape_checkpoint``): processor constants, chat
template, the tokenizer with ``<image>`` and ``<pad>`` added as llava-hf does, the processors, and
the attention sharpening.

transformers and torch are imported inside the functions (the CLIs' ``--help`` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PATCH = 14
IMAGE = 336
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QK_GAIN = (1.0, 3.0)  # query/key gain of the first and the last CLIP block (see sharpen_attention)


def sharpen_attention(vision_tower, qk_gain: tuple[float, float], seed: int) -> None:
    """Scale each block's q/k projections so [CLS] attention gets peaky, more so with depth."""
    import torch

    layers = vision_tower.encoder.layers
    gen = torch.Generator().manual_seed(seed)
    lo, hi = qk_gain
    with torch.no_grad():
        for i, layer in enumerate(layers):
            depth = i / max(1, len(layers) - 1)
            # gain grows with depth, with a per-block jitter so neighbouring blocks differ
            gain = lo + (hi - lo) * depth + 0.15 * (hi - lo) * float(torch.rand(1, generator=gen) - 0.5)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                std = gain / proj.in_features**0.5
                proj.weight.normal_(0.0, std, generator=gen)
                proj.bias.normal_(0.0, 0.5 * std, generator=gen)
        # visible position structure so that some patches win consistently
        emb = vision_tower.embeddings
        emb.position_embedding.weight.normal_(0.0, 0.5, generator=gen)
        emb.class_embedding.normal_(0.0, 1.0, generator=gen)


def llava_tokenizer(model_dir: Path) -> Any:
    """The ``LlamaTokenizer`` of ``model_dir/tokenizer.model`` with ``<image>`` and ``<pad>`` added as llava-hf."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(model_dir), add_bos_token=True, add_eos_token=False)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_processor(out: Path, tokenizer: Any, image_size: int = IMAGE, patch_size: int = PATCH) -> None:
    """Save llava-1.5's ``LlavaProcessor`` (CLIP image processor, padded to square) into ``out``."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_pad=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)


def write_next_processor(out: Path, tokenizer: Any, pinpoints: list[list[int]], image_size: int = IMAGE,
                         patch_size: int = PATCH) -> None:
    """Save LLaVA-NeXT's ``LlavaNextProcessor`` (anyres tiles of ``image_size``; ``pinpoints``: (h, w)) into ``out``,
    with llava-hf v1.6's constants (shortest edge = crop = 336, CLIP mean/std, bicubic)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, image_grid_pinpoints=pinpoints, do_pad=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
