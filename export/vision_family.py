"""Vision families: where a Hugging Face vision tower keeps what the export needs, one small spec each.

The tower wrapper (:class:`export.vision.VisionTowerWithAttention`), the Hugging Face reference
(:func:`export.reference.vision.tower_outputs`), the export-and-validate path
(:func:`export.onnx_export.export_tower`, :func:`export.validate.validate_tower`) and the manifest
builder (:func:`export.manifest.vision_manifest`) take a :class:`VisionFamily` instead of naming
CLIP's or DINOv2's submodules. Families are registered by the ``model_type`` of a Hugging Face
config, as optimum's exporter registers its ONNX configs; adding one is an entry here, not a copy
of the export.

Every family is a pre-norm ViT block ``h += ls1(attn(norm1(h))); h += ls2(mlp(norm2(h)))`` (``ls``:
DINOv2's layer scale, absent elsewhere) whose attention module takes the normed states and returns
``(output, probabilities)`` with eager attention, softmax(q·kᵀ/√d) of its query and key projections.

Decisions (method.md is written for CLIP):
- A family without a [CLS] token (SigLIP) is refused: the encoder's ``cls_attn`` output is the
  [CLS] query's softmax row, and method.md defines no stand-in for it.
- The tower's own ``model_type`` names its family (``clip_vision_model``, ``dinov2``); a LLaVA's
  (``llava``, ``llava_next``) names the family of its tower *and* how the bundle uses it: the
  LLaVA-NeXT entry is CLIP's spec with ``tiles`` (T anyres tiles per image on the batch axis) and
  the manifest's ``family`` "llava-next".
- Unknown model types fail with one line naming the registered ones (no fallback to CLIP).

Torch-free: the torch-free manifest builder reads the registry too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from runtime.errors import ModelNotFoundError


@dataclass(frozen=True)
class VisionParts:
    """The pieces of a vision tower that the wrapper composes."""

    embeddings: Any  # nn.Module: pixel_values [B,3,S,S] -> tokens [B,1+N,D]
    pre_norm: Any  # nn.Module or None (CLIP's pre_layrnorm; DINOv2 and ViT have none)
    blocks: Any  # nn.ModuleList of the L blocks


@dataclass(frozen=True)
class VisionFamily:
    """Where a family's tower keeps its parts; paths are dotted attribute names (``"encoder.layers"``)."""

    name: str  # registry name, e.g. "clip"
    model_types: tuple[str, ...]  # Hugging Face config.model_type values this entry answers for
    label: str  # the family in messages, e.g. "CLIP"
    root: str | None  # submodule of the loaded model holding the tower ("vision_model"; used when present)
    blocks: str  # under the root: the ModuleList of blocks
    attention: str  # in a block: the self-attention module
    norms: tuple[str, str]  # in a block: the norms before attention and before the MLP
    heads: str  # attribute of the attention module holding the head count
    pre_norm: str | None = None  # under the root: the norm applied to the embeddings, if any
    embeddings: str = "embeddings"  # under the root
    mlp: str = "mlp"  # in a block
    layer_scales: tuple[str, str] | None = None  # in a block: scales after attention and after the MLP
    query: str = "q_proj"  # in the attention module
    key: str = "k_proj"  # in the attention module
    has_cls: bool = True  # token 0 is [CLS]; patches follow
    feature_layer: int = -2  # default vision_feature_layer (negative: counted from the end, -1 = block L)
    tiles: bool = False  # LLaVA-NeXT: T anyres tiles per image on the batch axis (manifest "anyres")
    bundle_family: str | None = None  # the manifest's "family" (runtime.bundle.entries.FAMILIES), None: no entry

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ValueError(f"vision family {self.name!r} answers for no model_type")
        if self.tiles and self.bundle_family is None:
            raise ValueError(f"vision family {self.name!r} has tiles but no bundle family")

    def parts(self, tower: Any) -> VisionParts:
        """Embeddings, pre-norm (or None) and blocks of ``tower`` (the model or its ``root`` submodule)."""
        inner = getattr(tower, self.root, tower) if self.root else tower
        pre_norm = None if self.pre_norm is None else self._get(inner, self.pre_norm)
        return VisionParts(self._get(inner, self.embeddings), pre_norm, self._get(inner, self.blocks))

    def attention_of(self, block: Any) -> Any:
        """The self-attention module of ``block``."""
        return self._get(block, self.attention)

    def norms_of(self, block: Any) -> tuple[Any, Any]:
        """The norms before attention and before the MLP of ``block``."""
        return self._get(block, self.norms[0]), self._get(block, self.norms[1])

    def mlp_of(self, block: Any) -> Any:
        return self._get(block, self.mlp)

    def scales_of(self, block: Any) -> tuple[Any, Any] | None:
        """The layer scales after attention and after the MLP, or None for families without them."""
        if self.layer_scales is None:
            return None
        return self._get(block, self.layer_scales[0]), self._get(block, self.layer_scales[1])

    def query_of(self, attention: Any) -> Any:
        return self._get(attention, self.query)

    def key_of(self, attention: Any) -> Any:
        return self._get(attention, self.key)

    def head_count(self, attention: Any) -> int:
        return int(self._get(attention, self.heads))

    def _get(self, module: Any, path: str) -> Any:
        """``module.<path>``; a missing name is one line naming the family, the path and what is there."""
        value = module
        for name in path.split("."):
            if not hasattr(value, name):
                children = ", ".join(n for n, _ in value.named_children()) if hasattr(value, "named_children") else ""
                raise RuntimeError(f"the {self.name} vision family expects {type(module).__name__}.{path}, but "
                                   f"{type(value).__name__} has no {name!r} (submodules: {children or 'none'})")
            value = getattr(value, name)
        return value


CLIP = VisionFamily(
    name="clip", model_types=("clip_vision_model", "clip", "llava"), label="CLIP", root="vision_model",
    pre_norm="pre_layrnorm", blocks="encoder.layers", attention="self_attn",
    norms=("layer_norm1", "layer_norm2"), heads="num_heads", feature_layer=-2, bundle_family="llava-1.5",
)
CLIP_TILES = dataclasses.replace(CLIP, name="clip-tiles", model_types=("llava_next",), tiles=True,
                                 bundle_family="llava-next")
DINOV2 = VisionFamily(
    name="dinov2", model_types=("dinov2",), label="DINOv2", root=None, blocks="encoder.layer",
    attention="attention", norms=("norm1", "norm2"), heads="num_attention_heads",
    layer_scales=("layer_scale1", "layer_scale2"), feature_layer=-1,
)
FAMILIES: tuple[VisionFamily, ...] = (CLIP, CLIP_TILES, DINOV2)


def registered_model_types(families: tuple[VisionFamily, ...] = FAMILIES) -> tuple[str, ...]:
    """Every model_type with an entry, sorted."""
    return tuple(sorted(t for family in families for t in family.model_types))


def family_for(model_type: object, families: tuple[VisionFamily, ...] = FAMILIES) -> VisionFamily:
    """The entry registered for ``model_type``; unknown ones fail with one line listing the registered.

    Example: ``family_for("dinov2").has_cls is True``; ``family_for("llava_next").tiles is True``.
    """
    for family in families:
        if model_type in family.model_types:
            return family
    raise ModelNotFoundError(f"no vision family is registered for model_type {model_type!r}; registered: "
                             f"{', '.join(registered_model_types(families))}")


def family_of_tower(tower: Any) -> VisionFamily:
    """The entry of a loaded tower, from its ``config.model_type``."""
    return family_for(getattr(getattr(tower, "config", None), "model_type", None))
