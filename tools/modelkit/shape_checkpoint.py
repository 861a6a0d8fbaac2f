"""Random-weight LLaVA-1.5 checkpoints with the real configs, tensor names and tokenizer layout.

``write_shape_checkpoint(out, "llava-1.5-7b")`` writes what llava-hf/llava-1.5-7b-hf holds, with
random values: config.json, fp16 safetensors shards plus ``model.safetensors.index.json``, a
32,000-piece LLaMA-layout tokenizer (``tools/modelkit/llama_tokenizer.py``) with ``<image>`` = 32000 and
``<pad>`` = 32001, and the LLaVA processor. Tensor names and shapes come from transformers itself
(the model instantiated on the meta device); ``layout="hub"`` renames them as llava-hf's files
(``language_model.model.*``, ``vision_tower.vision_model.*``), ``"transformers5"`` keeps them.

Memory: shard membership is planned from the meta shapes, then each shard is generated, written
(temp name + ``os.replace``) and freed, so one shard's arrays plus the fp16 vision tower are held
(safetensors >= 0.8 writes from the arrays' buffers; older ones copy a shard to bytes once). The
index is written last.

Values: the CLIP tower and projector are the real torch modules at full width, with
``sharpen_attention`` as the tiny model, converted to fp16. Language-model norms are 1.0, every
other language-model tensor is N(0, 0.02²) drawn by inverse-CDF lookup: uniform 16-bit integers
index a table of the 65,536 fp16 normal quantiles at (i + 0.5) / 65536, i.e. iid samples of a
normal discretised to equal-probability levels (|x| <= 4.3 sigma; :mod:`tools.modelkit.random_fp16`),
seeded from (seed, tensor index), so the values do not depend on the shard size or the thread count.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import log
from runtime.errors import InputError
from tools.modelkit.llama_tokenizer import IMAGE_TOKEN_INDEX, PAD_TOKEN_ID, write_llava_tokenizer
from tools.modelkit.random_fp16 import normal_fp16, normal_table

SHARD_BYTES = 2_000_000_000
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
LAYOUTS = ("hub", "transformers5")
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2
TEXT_STD = 0.02  # LLaMA's initializer_range
_HEADER_BYTES = 64  # safetensors header: 8-byte length, metadata, padding
_HEADER_BYTES_PER_TENSOR = 128  # + the name: dtype, shape and offsets as JSON, generously
_TEXT_PREFIXES = ("model.language_model.", "lm_head.")  # generated here; the rest comes from torch
# llava-hf's names for transformers-5 prefixes (the vision tower's files keep CLIP's ``vision_model.``)
_HUB_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


@dataclass(frozen=True)
class ShapeSpec:
    """The config numbers of a LLaVA-1.5 model: LLaMA text model, CLIP vision tower, projector."""

    name: str
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int = 32064  # embedding rows: 32,002 tokens padded to a multiple of 64
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vision_hidden: int = 1024  # CLIP ViT-L/14-336
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768
    vision_layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", "float") and not value > 0:
                raise InputError(f"shape {self.name}: {field.name} must be positive, got {value}")
        for width, heads, what in ((self.text_hidden, self.text_heads, "text"),
                                   (self.vision_hidden, self.vision_heads, "vision")):
            if width % heads:
                raise InputError(f"shape {self.name}: {what} width {width} is not divisible by {heads} heads")
        if self.text_heads % self.text_kv_heads:
            raise InputError(f"shape {self.name}: {self.text_heads} heads, not a multiple of {self.text_kv_heads} kv")
        if self.image_size % self.patch_size:
            raise InputError(f"shape {self.name}: image {self.image_size} is not a multiple of patch {self.patch_size}")
        if self.vocab_size <= PAD_TOKEN_ID:
            raise InputError(f"shape {self.name}: vocab_size {self.vocab_size} must exceed <pad> id {PAD_TOKEN_ID}")

    @property
    def image_seq_length(self) -> int:
        """Patches per image (576 for 336 px, patch 14)."""
        return (self.image_size // self.patch_size) ** 2


SHAPES = {
    "llava-1.5-7b": ShapeSpec("llava-1.5-7b", text_hidden=4096, text_intermediate=11008, text_layers=32,
                              text_heads=32, text_kv_heads=32),
    "llava-1.5-13b": ShapeSpec("llava-1.5-13b", text_hidden=5120, text_intermediate=13824, text_layers=40,
                               text_heads=40, text_kv_heads=40),
}
SHAPE_NAMES = tuple(SHAPES)


def resolve_shape(shape: str | ShapeSpec, text_layers: int | None = None) -> ShapeSpec:
    """The spec of a shape name (or the spec itself), with the text depth overridden if given."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise InputError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_NAMES)}")
        shape = SHAPES[shape]
    return shape if text_layers is None else replace(shape, text_layers=text_layers)


def llava_config(spec: ShapeSpec) -> Any:
    """The ``LlavaConfig`` of ``spec``: llava-hf's config.json values (fp16, untied head)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, projection_dim=spec.projection_dim, hidden_act="quick_gelu",
        layer_norm_eps=spec.vision_layer_norm_eps,
    )
    text = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_INDEX, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=spec.image_seq_length,
        pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "float16"
    return config


def meta_tensors(config: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Transformers-5 name -> (shape, fp16 or the buffer's dtype) of ``LlavaForConditionalGeneration``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # state_dict() already leaves out non-persistent buffers (CLIP's position_ids)
    return {name: (tuple(t.shape), np.dtype(np.float16) if t.is_floating_point() else np.dtype(str(t.dtype)[6:]))
            for name, t in model.state_dict().items()}


def tensor_bytes(tensors: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, int]:
    """Name -> bytes on disk of :func:`meta_tensors`' entries."""
    return {name: int(np.prod(shape)) * dtype.itemsize for name, (shape, dtype) in tensors.items()}


def layout_name(name: str, layout: str) -> str:
    """The file name of a transformers-5 tensor name in ``layout`` (hub: as llava-hf's files)."""
    if layout == "transformers5":
        return name
    for prefix, hub in _HUB_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return hub + (rest.removeprefix("vision_model.") if hub.endswith("vision_model.") else rest)
    raise ValueError(f"no hub name for tensor {name!r}")


def plan_shards(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Greedy, in order: names per shard so that each shard file (data + header) fits ``shard_bytes``."""
    shards: list[list[str]] = [[]]
    used = _HEADER_BYTES
    for name, nbytes in sizes.items():
        need = nbytes + _HEADER_BYTES_PER_TENSOR + len(name.encode())
        if need + _HEADER_BYTES > shard_bytes:
            raise InputError(f"tensor {name} needs {need} bytes, more than a {shard_bytes}-byte shard")
        if used + need > shard_bytes:
            shards.append([])
            used = _HEADER_BYTES
        shards[-1].append(name)
        used += need
    return shards


def vision_tensors(config: Any, seed: int) -> dict[str, np.ndarray]:
    """Transformers-5 name -> fp16 array of the real CLIP tower (sharpened) and projector."""
    import torch
    from transformers import CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from tools.modelkit.llava_parts import QK_GAIN, sharpen_attention

    torch.manual_seed(seed)
    tower = CLIPVisionModel(config.vision_config)
    sharpen_attention(tower, QK_GAIN, seed)
    parts = {"model.vision_tower.": tower, "model.multi_modal_projector.": LlavaMultiModalProjector(config)}
    out = {}
    for prefix, module in parts.items():
        for name, tensor in module.state_dict().items():
            array = tensor.detach().numpy()
            out[prefix + name] = array.astype(np.float16) if array.dtype.kind == "f" else array.copy()
    return out


def _text_tensor(name: str, shape: tuple[int, ...], table: np.ndarray, seed: np.random.SeedSequence,
                 pool: ThreadPoolExecutor) -> np.ndarray:
    """A language-model tensor: ones for RMSNorm weights, N(0, 0.02²) (via ``table``) otherwise."""
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float16)
    return normal_fp16(shape, table, seed, pool)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp)`` on a temp name beside ``path``, then rename it into place (mode 644)."""
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    os.chmod(temp, 0o644)  # safetensors creates its files 600
    os.replace(temp, path)


def _shard_arrays(members: list[str], tensors: dict[str, tuple[tuple[int, ...], np.dtype]],
                  vision: dict[str, np.ndarray], seed: int, pool: ThreadPoolExecutor
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of one shard: vision arrays handed over (popped), text tensors generated."""
    order = {name: i for i, name in enumerate(tensors)}
    table = normal_table(TEXT_STD)
    for name in members:
        shape, dtype = tensors[name]
        array = vision.pop(name) if name in vision else _text_tensor(
            name, shape, table, np.random.SeedSequence([seed, order[name]]), pool)
        if array.shape != shape or array.dtype != dtype:
            raise AssertionError(f"{name}: made {array.shape} {array.dtype}, the model wants {shape} {dtype}")
        yield name, array


def write_weights(out: Path, config: Any, layout: str = "hub", shard_bytes: int = SHARD_BYTES, seed: int = 0
                  ) -> dict[str, Any]:
    """Write the fp16 shards and the index (last) into ``out``, one shard in memory; return the index."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    tensors = meta_tensors(config)
    sizes = tensor_bytes(tensors)
    shards = plan_shards(sizes, shard_bytes)
    (out / INDEX_NAME).unlink(missing_ok=True)  # an index marks a complete checkpoint
    log(f"{out}: {len(tensors)} tensors, {sum(sizes.values()) / 1e9:.2f} GB in {len(shards)} shard(s); "
        "building the CLIP tower and projector")
    vision = vision_tensors(config, seed)
    if set(vision) != {name for name in tensors if not name.startswith(_TEXT_PREFIXES)}:
        raise AssertionError(f"vision tensors do not match the model: {sorted(set(vision) ^ set(tensors))[:3]}")
    weight_map: dict[str, str] = {}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, tqdm(
        total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"{out.name} weights", file=sys.stderr
    ) as bar:
        for i, members in enumerate(shards):
            file = SHARD_NAME.format(i + 1, len(shards))
            arrays = {}
            for name, array in _shard_arrays(members, tensors, vision, seed, pool):
                arrays[layout_name(name, layout)] = array
                bar.update(sizes[name])
            _atomic(out / file, lambda temp, arrays=arrays: save_file(arrays, str(temp), metadata={"format": "pt"}))
            del arrays
            weight_map.update({layout_name(name, layout): file for name in members})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    for stale in set(out.glob("model-*-of-*.safetensors")) - {out / f for f in weight_map.values()}:
        stale.unlink()
    _atomic(out / INDEX_NAME, lambda temp: temp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8"))
    return index


def write_shape_checkpoint(
    out: str | Path, shape: str | ShapeSpec, layout: str = "hub", text_layers: int | None = None,
    shard_bytes: int = SHARD_BYTES, seed: int = 0, tokenizer_model: Path | None = None,
) -> Path:
    """Write the random checkpoint of ``shape`` to ``out`` and return the path."""
    from transformers import GenerationConfig

    spec = resolve_shape(shape, text_layers)
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    config = llava_config(spec)
    plan_shards(tensor_bytes(meta_tensors(config)), shard_bytes)  # a too-small shard fails before any write
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_llava_tokenizer(out, spec.image_size, spec.patch_size, tokenizer_model)
    generation = GenerationConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    for name, obj in (("config.json", config), ("generation_config.json", generation)):
        _atomic(out / name, lambda temp, obj=obj: temp.write_text(obj.to_json_string(), encoding="utf-8"))
    write_weights(out, config, layout, shard_bytes, seed)
    return out
