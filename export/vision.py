"""Wrappers (never patches) around Hugging Face modules that the ONNX export traces.

``VisionTowerWithAttention`` composes the CLIP tower's own submodules up to the feature layer
``f`` and returns only what the runtime needs: patch features of block ``f``, the [CLS]→patch
attention rows of blocks ``1..f`` and the head-mean keys of block ``f``. No ``N×N`` tensor is an
output, and blocks after ``f`` are not part of the module at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VisionParts:
    """The pieces of a CLIP vision tower, whichever layout transformers uses."""

    embeddings: nn.Module
    pre_layrnorm: nn.Module
    layers: nn.ModuleList


def vision_parts(tower: nn.Module) -> VisionParts:
    """Find embeddings, pre-norm and blocks in ``CLIPVisionModel`` (flat or ``.vision_model``)."""
    inner = getattr(tower, "vision_model", tower)
    try:
        return VisionParts(inner.embeddings, inner.pre_layrnorm, inner.encoder.layers)
    except AttributeError as err:
        raise RuntimeError(
            f"unsupported vision tower {type(tower).__name__}: expected CLIP's embeddings, "
            f"pre_layrnorm and encoder.layers ({err})"
        ) from None


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """``f`` in 1..L from LLaVA's ``vision_feature_layer`` (−2 with L=24 gives 23)."""
    f = num_layers + 1 + vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer
    if not 1 <= f <= num_layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} gives f={f}, outside 1..{num_layers}")
    return f


class VisionTowerWithAttention(nn.Module):
    """``pixel_values [B,3,S,S] -> (features [B,N,D], cls_attn [B,f,H,N], keys [B,N,D/H])``.

    Each block is run through its own submodules (``layer_norm1 → self_attn → residual →
    layer_norm2 → mlp → residual``, the CLIP block) so that the eager attention probabilities
    are at hand; only their [CLS] row over the patch keys leaves the module.
    """

    def __init__(self, tower: nn.Module, feature_layer: int) -> None:
        super().__init__()
        parts = vision_parts(tower)
        if not 1 <= feature_layer <= len(parts.layers):
            raise ValueError(f"feature_layer must be in 1..{len(parts.layers)}, got {feature_layer}")
        self.embeddings = parts.embeddings
        self.pre_layrnorm = parts.pre_layrnorm
        self.blocks = nn.ModuleList(parts.layers[:feature_layer])
        attn = self.blocks[-1].self_attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        rows = []
        keys = hidden  # replaced in the last block
        for index, block in enumerate(self.blocks):
            normed = block.layer_norm1(hidden)
            attn_out, weights = block.self_attn(hidden_states=normed, attention_mask=None)
            if weights is None:
                raise RuntimeError("CLIP attention returned no probabilities: load with attn_implementation='eager'")
            rows.append(weights[:, :, 0, 1:])  # [B, H, N]: the [CLS] query over patch keys
            if index == len(self.blocks) - 1:
                keys = block.self_attn.k_proj(normed)
            hidden = hidden + attn_out
            hidden = hidden + block.mlp(block.layer_norm2(hidden))
        batch, tokens, _ = keys.shape
        head_mean_keys = keys.view(batch, tokens, self.num_heads, self.head_dim).mean(dim=2)
        return hidden[:, 1:], torch.stack(rows, dim=1), head_mean_keys[:, 1:]


class Projector(nn.Module):
    """``features [B,K,D] -> embeddings [B,K,E]``: LLaVA's ``multi_modal_projector`` as is."""

    def __init__(self, projector: nn.Module) -> None:
        super().__init__()
        self.projector = projector

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)
