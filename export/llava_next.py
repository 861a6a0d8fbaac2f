"""The LLaVA-NeXT (1.6, "anyres") part of ``export.clip`` (method.md §5).

A LLaVA-NeXT runs LLaVA-1.5's CLIP tower on ``T`` tiles of one image (the batch axis of
``vision.onnx``) and the same Linear-GELU-Linear projector; what it adds is ``image_newline``
(``[E]``, LLM space), written as ``image_newline.npz`` beside the graphs, and the anyres constants
the runtime tiles and packs with (``manifest["anyres"]``).

Validation on one sample image: Hugging Face's own ``LlavaNextModel.get_image_features`` (its
processor's tiles; a language model of no layers, so a 7B's weights are never allocated) gives the
per-tile features it selects (its hidden states) and the packed, projected rows. The sample is the
largest pinpoint exactly, so nothing is padded or unpadded and the packing is undone exactly into
per-tile embeddings and the ``image_newline`` column; the ONNX graphs and the exported
``image_newline`` are compared with those.

torch and transformers are imported inside the functions: :func:`family_of` and
:func:`anyres_entry` also serve the torch-free manifest builder. The family itself is the registry's
``clip-tiles`` entry (:data:`export.vision_family.CLIP_TILES`): CLIP's spec with ``tiles``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import write_atomic
from runtime.errors import ModelNotFoundError

NEWLINE_FILE = "image_newline.npz"
NEWLINE_KEYS = ("image_newline", "model.image_newline")  # llava-hf's files / transformers 5 in memory


def family_of(model_type: object) -> str:
    """The registry family of a LLaVA config's ``model_type``: its vision family's bundle family
    (:mod:`export.vision_family`: ``llava-next`` for ``"llava_next"``), ``llava-1.5`` for any other."""
    from export.vision_family import FAMILIES

    named = [f.bundle_family for f in FAMILIES if model_type in f.model_types and f.bundle_family is not None]
    return named[0] if named else "llava-1.5"


def vision_model(config: Any) -> Any:
    """A ``LlavaNextModel`` of ``config`` whose language model has no layers and a one-token vocabulary
    (``get_image_features`` reads only the tower, the projector, ``image_newline`` and the config);
    its tensors are random until filled from the checkpoint."""
    import torch
    from transformers import LlavaNextModel

    stub = copy.deepcopy(config)
    stub.text_config.num_hidden_layers = 0
    stub.text_config.vocab_size = 1
    stub.text_config.pad_token_id = None
    with torch.device("cpu"):
        return LlavaNextModel(stub)


def read_image_newline(checkpoint: Any, width: int) -> np.ndarray:
    """``image_newline [E]`` (float32) from a checkpoint in either key layout."""
    keys = [key for key in NEWLINE_KEYS if key in checkpoint]
    if not keys:
        raise ModelNotFoundError(f"{checkpoint.model_dir}: a LLaVA-NeXT checkpoint needs a tensor "
                                 f"{' or '.join(NEWLINE_KEYS)}; found neither")
    value = checkpoint.load(keys[0])
    if value.shape != (width,):
        raise ModelNotFoundError(f"{checkpoint.model_dir}: {keys[0]} has shape {value.shape}, the config "
                                 f"needs ({width},) (text_config.hidden_size)")
    return value


def save_image_newline(path: Path, image_newline: np.ndarray, export_id: str) -> None:
    """Write ``image_newline.npz`` atomically (members: ``image_newline`` [E] float32 and
    ``export_id``, a 0-d unicode array, as probe_weights.npz)."""
    arrays = {"image_newline": np.asarray(image_newline, dtype=np.float32), "export_id": np.array(export_id)}
    write_atomic(path, lambda handle: np.savez(handle, **arrays))


def anyres_entry(config: Any, processor: dict[str, Any]) -> dict[str, Any]:
    """``manifest["anyres"]``: the grid pinpoints ((h, w) pixels), tile side, patch size and base-view
    side; the model's and the processor's pinpoints must agree (HF tiles with one and packs with the other)."""
    vc = config.vision_config
    pinpoints = [[int(h), int(w)] for h, w in config.image_grid_pinpoints]
    tiled = [[int(h), int(w)] for h, w in processor.get("image_grid_pinpoints", pinpoints)]
    if tiled != pinpoints:
        raise ModelNotFoundError(f"the checkpoint's image processor tiles with image_grid_pinpoints {tiled} but "
                                 f"its config packs with {pinpoints}")
    size, crop = processor.get("size", {}), processor.get("crop_size", {})
    shortest = size.get("shortest_edge", vc.image_size) if isinstance(size, dict) else size
    crop_side = crop.get("height", vc.image_size) if isinstance(crop, dict) else crop
    return {"image_grid_pinpoints": pinpoints, "crop_size": int(crop_side), "patch_size": int(vc.patch_size),
            "shortest_edge": int(shortest)}


def sample_image(pinpoints: list[list[int]]) -> Any:
    """A deterministic RGB picture exactly the size of the largest pinpoint (first among equals),
    every tile of it different."""
    from PIL import Image

    h, w = max(pinpoints, key=lambda p: p[0] * p[1])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    noise = np.random.default_rng(0).integers(0, 40, (h, w, 3))
    rgb = np.stack([128 + 90 * np.sin(xs / 37 + ys / 91), 230 * ys / h, (xs * ys / 97) % 200], axis=-1)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8), mode="RGB")


def anyres_reference(half: Any, model_dir: Path, feature_layer: int) -> dict[str, np.ndarray]:
    """Hugging Face's outputs on :func:`sample_image`: ``pixel_values [T,3,S,S]`` (its processor's tiles),
    ``features [T,N,D]`` (the hidden states get_image_features selects), ``embeddings [T,N,E]`` and
    ``newline_rows [gh·g,E]`` (its packed output, unpacked)."""
    import torch
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config, model = half.config, half.next_model
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    processor = LlavaNextImageProcessorPil.from_pretrained(model_dir)
    inputs = processor(images=sample_image(pinpoints), return_tensors="pt")
    with torch.no_grad():
        out = model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, output_hidden_states=True,
        )
    pixels = inputs["pixel_values"][0].numpy()
    height, width = (int(v) for v in inputs["image_sizes"][0])
    grid = config.vision_config.image_size // config.vision_config.patch_size
    embeddings, newline_rows = unpack(out.pooler_output[0].numpy(), height // pixels.shape[-2],
                                      width // pixels.shape[-1], grid)
    return {"pixel_values": pixels, "features": out.hidden_states[feature_layer][:, 1:].numpy(),
            "embeddings": embeddings, "newline_rows": newline_rows}


def unpack(packed: np.ndarray, gh: int, gw: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Undo HF's ``pack_image_features`` of an image that needed no unpadding: ``packed [N + gh·g·(gw·g+1), E]``
    -> (per-tile rows ``[1 + gh·gw, N, E]``, base tile first; the newline column ``[gh·g, E]``).

    Example: gh=1, gw=2, g=1: rows [b, t1, t2, nl] -> tiles [[b], [t1], [t2]], newline [[nl]].
    """
    n, width = grid * grid, packed.shape[-1]
    expected = n + gh * grid * (gw * grid + 1)
    if packed.shape[0] != expected:
        raise RuntimeError(f"Hugging Face packed {packed.shape[0]} rows for a {gh}x{gw} grid of {grid}x{grid} "
                           f"patches, expected {expected} (base + rows with a newline each): has "
                           "pack_image_features changed?")
    rows = packed[n:].reshape(gh * grid, gw * grid + 1, width)
    tiles = rows[:, :-1].reshape(gh, grid, gw, grid, width).transpose(0, 2, 1, 3, 4).reshape(gh * gw, n, width)
    return np.concatenate([packed[None, :n], tiles]), rows[:, -1].copy()


def check_anyres(reference: dict[str, np.ndarray], vision_path: Path, projector_path: Path,
                 newline_path: Path) -> list[Any]:
    """Per tile: vision.onnx's features and projector.onnx's embeddings (of HF's features) against
    :func:`anyres_reference`; the written ``image_newline.npz`` against HF's packed newline rows (exact)."""
    from export.validate import compare, run_onnx

    features = run_onnx(vision_path, {"pixel_values": reference["pixel_values"]})["features"]
    embeddings = run_onnx(projector_path, {"features": reference["features"]})["embeddings"]
    checks = []
    for t in range(reference["features"].shape[0]):
        checks += compare("vision", f"anyres-t{t}", {"features": reference["features"][t]}, {"features": features[t]})
        checks += compare("projector", f"anyres-t{t}", {"embeddings": reference["embeddings"][t]},
                          {"embeddings": embeddings[t]})
    with np.load(newline_path, allow_pickle=False) as data:
        written = np.broadcast_to(data["image_newline"], reference["newline_rows"].shape)
    return checks + compare("newline", "anyres", {"image_newline": reference["newline_rows"]},
                            {"image_newline": written})

