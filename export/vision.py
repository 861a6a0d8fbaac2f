"""Wrappers (never patches) around Hugging Face modules that the ONNX export traces.

``VisionTowerWithAttention`` composes a vision tower's own submodules (found through its
:class:`export.vision_family.VisionFamily`) up to the feature layer ``f`` and returns only what the
runtime needs: patch features of block ``f``, the [CLS]→patch attention rows of blocks ``1..f``
and the head-mean keys of block ``f``. No ``N×N`` tensor is an output, and blocks after ``f`` are
not part of the module at all.
"""

from __future__ import annotations

import torch
from torch import nn

from export.vision_family import VisionFamily, family_of_tower


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """``f`` in 1..L from LLaVA's ``vision_feature_layer`` (−2 with L=24 gives 23)."""
    f = num_layers + 1 + vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer
    if not 1 <= f <= num_layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} gives f={f}, outside 1..{num_layers}")
    return f


class VisionTowerWithAttention(nn.Module):
    """``pixel_values [B,3,S,S] -> (features [B,N,D], cls_attn [B,f,H,N], keys [B,N,D/H])``.

    Each block is run through its own submodules (``norm1 → attention → (layer scale) → residual →
    norm2 → mlp → (layer scale) → residual``) so that the eager attention probabilities are at
    hand; only their [CLS] row over the patch keys leaves the module. ``family``: from the tower's
    ``config.model_type`` when None.
    """

    def __init__(self, tower: nn.Module, feature_layer: int, family: VisionFamily | None = None) -> None:
        super().__init__()
        self.family = family or family_of_tower(tower)
        if not self.family.has_cls:
            raise RuntimeError(f"the {self.family.name} vision family has no [CLS] token: the encoder's cls_attn "
                               "output is undefined for it (method.md §0)")
        parts = self.family.parts(tower)
        if not 1 <= feature_layer <= len(parts.blocks):
            raise ValueError(f"feature_layer must be in 1..{len(parts.blocks)}, got {feature_layer}")
        self.embeddings = parts.embeddings
        # named as CLIP's: the graph's initialiser names stay those of earlier exports; Identity adds no node
        self.pre_layrnorm = parts.pre_norm if parts.pre_norm is not None else nn.Identity()
        self.blocks = nn.ModuleList(parts.blocks[:feature_layer])
        attn = self.family.attention_of(self.blocks[-1])
        self.num_heads = self.family.head_count(attn)
        self.head_dim = int(attn.head_dim)

    def _block(self, block: nn.Module, hidden: torch.Tensor, last: bool):
        """One block: (new hidden [B,T,D], [CLS]→patch rows [B,H,N], block keys [B,T,D] or None)."""
        family = self.family
        norm1, norm2 = family.norms_of(block)
        scales = family.scales_of(block)
        attn = family.attention_of(block)
        normed = norm1(hidden)
        attn_out, weights = attn(normed, attention_mask=None)
        if weights is None:
            raise RuntimeError(f"{family.label} attention returned no probabilities: load with "
                               "attn_implementation='eager'")
        row = weights[:, :, 0, 1:]  # [B, H, N]: the [CLS] query over patch keys
        keys = family.key_of(attn)(normed) if last else None
        hidden = hidden + (attn_out if scales is None else scales[0](attn_out))
        mlp_out = family.mlp_of(block)(norm2(hidden))
        hidden = hidden + (mlp_out if scales is None else scales[1](mlp_out))
        return hidden, row, keys

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        rows = []
        keys = hidden  # replaced in the last block
        for index, block in enumerate(self.blocks):
            hidden, row, block_keys = self._block(block, hidden, index == len(self.blocks) - 1)
            rows.append(row)
            keys = keys if block_keys is None else block_keys
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


class IdentityProjector(nn.Module):
    """``features [B,K,D] -> embeddings [B,K,D]`` unchanged (a bundle without a language model)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.clone()  # a real node, so the graph's output is not its input
