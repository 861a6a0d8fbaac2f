"""Build the bundle manifest (schema :data:`runtime.bundle.manifest.SCHEMA`) from an export."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from export.load import ResolvedModel, image_processor_config
from export.vision_family import VisionFamily, family_for
from runtime.bundle.manifest import SCHEMA

_ONNX_TYPES = {1: "float32", 7: "int64", 10: "float16", 11: "float64"}
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced (and validated) the bundle."""
    names = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (symbolic axes as strings) and dtypes of an ONNX graph's inputs/outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values) -> list[dict[str, Any]]:
        rows = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = _ONNX_TYPES.get(tensor.elem_type, str(tensor.elem_type))
            rows.append({"name": value.name, "shape": shape, "dtype": dtype})
        return rows

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def preprocess_constants(resolved: ResolvedModel, image_size: int) -> dict[str, Any]:
    """The processor constants of the checkpoint, in runtime.preprocess.PreprocessConfig's names."""
    cfg = image_processor_config(resolved.path)
    size = cfg.get("size", {})
    crop = cfg.get("crop_size", {})
    shortest = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
    crop_side = crop.get("height", image_size) if isinstance(crop, dict) else crop
    return {
        "mode": resolved.spec.image_mode,
        "image_size": int(shortest),
        "crop_size": int(crop_side),
        "resample": _PIL_RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic"),
        "rescale_factor": float(cfg.get("rescale_factor", 1 / 255)),
        "image_mean": [float(x) for x in cfg["image_mean"]],
        "image_std": [float(x) for x in cfg["image_std"]],
    }


def vision_entry(vision_config: Any, feature_layer: int, image_size: int, projector_dim: int) -> dict[str, Any]:
    """``manifest["vision"]``: the tower's geometry (``vision_config``: its HF config) at ``image_size``."""
    vc = vision_config
    grid = image_size // vc.patch_size
    return {
        "num_layers": vc.num_hidden_layers, "feature_layer": feature_layer,
        "heads": vc.num_attention_heads, "hidden_size": vc.hidden_size,
        "head_dim": vc.hidden_size // vc.num_attention_heads, "patch_size": vc.patch_size,
        "image_size": image_size, "grid": grid, "num_patches": grid * grid,
        "projector_dim": projector_dim,
    }


def vision_manifest(family: VisionFamily, source: dict[str, Any], graphs: dict[str, Any], vision: dict[str, Any],
                    preprocess: dict[str, Any], details: dict[str, Any], validation: dict[str, Any],
                    anyres: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of any vision family's export, as a JSON-able dict.

    ``graphs``: ``opset``, ``files`` and ``io``; ``details``: what the model adds between the
    preprocessing and the validation (chat template, image token, pruning defaults, notes), in order.
    ``family.bundle_family`` becomes ``family`` (none for a family without one) and a tiled family's
    ``anyres`` follows it.
    """
    if family.tiles != (anyres is not None):
        raise ValueError(f"the {family.name} vision family {'needs' if family.tiles else 'takes no'} anyres constants")
    named = {"family": family.bundle_family} if family.bundle_family is not None else {}
    tiled = {"anyres": anyres} if anyres is not None else {}
    return {"schema": SCHEMA, "source": source, **named, **tiled, "libraries": library_versions(),
            "opset": graphs["opset"], "files": graphs["files"], "io": graphs["io"], "vision": vision,
            "preprocess": preprocess, **details, "validation": validation}


def build_manifest(resolved: ResolvedModel, config: Any, feature_layer: int, opset: int,
                   files: dict[str, str | None], io: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a LLaVA export (``config``: the checkpoint's LlavaConfig or LlavaNextConfig; its
    ``model_type`` names the family, and a tiled one's adds ``anyres``: grid pinpoints, tile side,
    patch size and base-view side)."""
    from export.llava_next import anyres_entry

    vc = config.vision_config
    spec = resolved.spec
    family = family_for(config.model_type)
    anyres = anyres_entry(config, image_processor_config(resolved.path)) if family.tiles else None
    details = {"chat_template": spec.chat_template, "image_token_index": int(config.image_token_index),
               "pruning": spec.pruning.to_json(), "entropyprune_layer": spec.entropyprune_layer}
    return vision_manifest(
        family, {"model": resolved.source, "repo_id": spec.repo_id, "revision": spec.revision},
        {"opset": opset, "files": files, "io": io},
        vision_entry(vc, feature_layer, vc.image_size, config.text_config.hidden_size),
        preprocess_constants(resolved, vc.image_size), details, validation, anyres)
