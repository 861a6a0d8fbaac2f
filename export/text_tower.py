"""The torch half of the text-tower export (cdpruner, method.md §7): load the CLIP checkpoint, check
its vision weights are LLaVA's, trace ``text.onnx`` and ``image_projection.onnx``, write
``tokenizer.json`` and compute Hugging Face's reference outputs.

Run in the exporting process (not a child as the vision half): it holds the CLIP model only
(CLIP-L/14-336: 428 M parameters, 1.7 GB in float32), which is released before onnxruntime loads
the graphs. References come from ``CLIPModel.get_text_features`` and the model's own
``post_layernorm``/``visual_projection``, never from the wrappers that are traced.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.clip_source import compare_vision
from export.onnx_export import EXAMPLE_BATCH, EXAMPLE_TOKENS, _export, _quiet
from runtime.cli import log
from runtime.errors import ModelNotFoundError

TEXT_ONNX, IMAGE_ONNX, TOKENIZER = "text.onnx", "image_projection.onnx", "tokenizer.json"
# What the validation feeds the text tower: punctuation alone, accents, an emoji, whitespace runs, and a
# question longer than the 77 positions (two segments; the first has no end token).
VALIDATION_QUESTIONS = {
    "short": "What is in the image?",
    "mark": "?",
    "mixed": "Describe the CAFÉ's sign:   3 words, 2 colours & 1 emoji 😀!",
    "long": " ".join(["What colour is the small red car left of the tree?"] * 9),
}


class TextFeatures(nn.Module):
    """``input_ids [B, 77], attention_mask [B, 77] (int64) -> text_embeds [B, P]``:
    ``CLIPModel.get_text_features`` (text model, pooled at its end token, then ``text_projection``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text_model, self.text_projection = clip.text_model, clip.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)


class ImageProjection(nn.Module):
    """``features [N, D] -> image_embeds [N, P]``: ``visual_projection(post_layernorm(features))``,
    method.md §7.2's V from block f's patch features (what ``vision.onnx`` outputs)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.post_layernorm, self.visual_projection = clip.vision_model.post_layernorm, clip.visual_projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.post_layernorm(features))


@dataclass(frozen=True)
class TextStage:
    """What the torch half leaves: the files it wrote, the geometry, and the references."""

    text_files: tuple[str, ...]  # text.onnx and its external data (names in the staging folder)
    image_files: tuple[str, ...]  # image_projection.onnx and its external data
    max_positions: int  # the text tower's positions (77)
    projection_dim: int  # P
    hidden_size: int  # D: the vision width
    vision_check: dict[str, Any]  # compare_vision's report
    references: dict[str, dict[str, np.ndarray]]  # case -> input_ids [M,77], attention_mask, text_embeds [M,P]
    image_references: dict[str, dict[str, np.ndarray]]  # case -> features [N,D], image_embeds [N,P]


def load_clip(clip_dir: Path) -> Any:
    """``CLIPModel`` in float32 with eager attention (evaluation mode); one-line error otherwise."""
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot load a CLIP model from {clip_dir}: {str(err).splitlines()[0]}") from None
    return model.eval()


def write_tokenizer(clip_dir: Path, target: Path) -> Any:
    """Save the checkpoint's ``CLIPTokenizerFast`` pipeline (truncation and padding off) as
    ``tokenizer.json``; returns the transformers tokenizer."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizerFast

    try:
        hf = CLIPTokenizerFast.from_pretrained(clip_dir)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot load CLIP's tokenizer from {clip_dir}: {str(err).splitlines()[0]}") from None
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(target))
    return hf


def segments(ids: list[int], positions: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The released CDPruner's cut: ``[1, L]`` ids, right-padded with ``pad_id`` (mask 0) to a multiple of
    ``positions`` and reshaped to ``[M, positions]``."""
    input_ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    count = (input_ids.shape[1] - 1) // positions + 1
    padding = positions * count - input_ids.shape[1]
    return {"input_ids": torch.cat([input_ids, input_ids.new_full((1, padding), pad_id)], 1).reshape(-1, positions),
            "attention_mask": torch.cat([mask, mask.new_zeros((1, padding))], 1).reshape(-1, positions)}


def _features(output: Any) -> torch.Tensor:
    """``get_text_features``' tensor (transformers 5 returns an output object with pooler_output)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def run_text_stage(clip_dir: Path, llava_dir: Path, folder: Path, opset: int, pad_id: int, validate: bool,
                   image_features: dict[str, np.ndarray]) -> TextStage:
    """Load, check and trace; with ``validate`` also the references of VALIDATION_QUESTIONS and of
    ``image_features`` (case -> [N, D])."""
    clip = load_clip(clip_dir)
    log("  checking the CLIP checkpoint's vision weights against LLaVA's")
    vision_check = compare_vision({k: v.numpy() for k, v in clip.vision_model.state_dict().items()}, llava_dir)
    hf = write_tokenizer(clip_dir, folder / TOKENIZER)
    positions = int(clip.config.text_config.max_position_embeddings)
    hidden, projection = int(clip.config.vision_config.hidden_size), int(clip.config.projection_dim)
    log(f"  exporting {TEXT_ONNX} ({clip.config.text_config.num_hidden_layers} blocks, {positions} positions) "
        f"and {IMAGE_ONNX} ({hidden} -> {projection})")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(clip.config.text_config.vocab_size), (EXAMPLE_BATCH, positions), generator=gen)
    batch = torch.export.Dim("batch", min=1, max=1024)
    text_files = _export(TextFeatures(clip).eval(), (ids, torch.ones_like(ids)), folder / TEXT_ONNX, opset,
                         ["input_ids", "attention_mask"], ["text_embeds"],
                         {"input_ids": {0: batch}, "attention_mask": {0: batch}})
    example = torch.randn(EXAMPLE_TOKENS, hidden, generator=gen)
    tokens = torch.export.Dim("tokens", min=1, max=65536)
    image_files = _export(ImageProjection(clip).eval(), (example,), folder / IMAGE_ONNX, opset, ["features"],
                          ["image_embeds"], {"features": {0: tokens}})
    references, image_references = {}, {}
    with torch.no_grad(), _quiet("transformers"):  # not the "longer than 77 tokens" warning: segments are cut
        for case, question in VALIDATION_QUESTIONS.items() if validate else ():
            feeds = segments(hf(question).input_ids, positions, pad_id)
            embeds = _features(clip.get_text_features(**feeds))
            references[case] = {**{k: v.numpy() for k, v in feeds.items()}, "text_embeds": embeds.numpy()}
        for case, features in image_features.items() if validate else ():
            embeds = clip.visual_projection(clip.vision_model.post_layernorm(torch.from_numpy(features)))
            image_references[case] = {"features": features, "image_embeds": embeds.numpy()}
    del clip
    gc.collect()
    return TextStage(tuple(p.name for p in text_files), tuple(p.name for p in image_files), positions, projection,
                     hidden, vision_check, references, image_references)
