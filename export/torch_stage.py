"""The torch half of ``export.clip``, run in a child process: load the vision tower and projector,
trace both graphs to ONNX and compute Hugging Face's reference outputs for the validation.

Why a child: after ``torch.onnx.export`` the traced program keeps the tower's weights alive from
native code (a freed CLIP-L still held 1.5 GB), and glibc keeps freed heap pages; when the child
exits all of it goes back to the OS before onnxruntime loads the graphs and int8 quantisation
runs. The child gets the same stderr (progress lines) and sends back small arrays only.
"""

from __future__ import annotations

import multiprocessing
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import log
from runtime.errors import ModelNotFoundError, UserError


@dataclass(frozen=True)
class TorchStage:
    """What the child hands back: the config, the files it traced and HF's reference outputs."""

    config: Any  # LlavaConfig
    feature_layer: int  # f, 1..L
    vision_files: tuple[str, ...]  # vision.onnx and its external data, names in the staging folder
    projector_files: tuple[str, ...]  # projector.onnx and its external data
    references: dict[str, dict[str, np.ndarray]]  # case -> output -> array (empty without validation)
    image_newline: np.ndarray | None = None  # [E] float32, LLaVA-NeXT only: the checkpoint's, exactly
    anyres: dict[str, np.ndarray] | None = None  # LLaVA-NeXT: export.llava_next.anyres_reference (validation)


def run_torch_stage(model_dir: Path, staging: Path, opset: int, validate: bool, steps: int) -> TorchStage:
    """Load, trace and (optionally) compute the references; in whatever process calls it."""
    from export.llava_next import anyres_reference
    from export.load import load_vision_half
    from export.onnx_export import export_projector, export_vision
    from export.validate import reference_outputs
    from export.vision import Projector, VisionTowerWithAttention, feature_layer_index

    half = load_vision_half(model_dir)
    config = half.config
    vc = config.vision_config
    f = feature_layer_index(config.vision_feature_layer, vc.num_hidden_layers)
    log(f"[3/{steps}] exporting vision.onnx (blocks 1..{f} of {vc.num_hidden_layers}) and projector.onnx")
    vision_files = export_vision(VisionTowerWithAttention(half.vision_tower, f).eval(),
                                 staging / "vision.onnx", vc.image_size, opset)
    projector_files = export_projector(Projector(half.multi_modal_projector).eval(), staging / "projector.onnx",
                                       vc.hidden_size, opset)
    if validate:
        log(f"       computing Hugging Face's reference outputs ({vc.image_size} px, B=1 and B=3)")
    references = reference_outputs(half, f, vc.image_size) if validate else {}
    anyres = None
    if validate and half.next_model is not None:
        log("       computing LlavaNextModel.get_image_features on a sample image (every anyres tile)")
        anyres = anyres_reference(half, model_dir, f)
    return TorchStage(config, f, tuple(p.name for p in vision_files), tuple(p.name for p in projector_files),
                      references, half.image_newline, anyres)


def _child(conn: Any, args: tuple) -> None:
    try:
        conn.send(("ok", run_torch_stage(*args)))
    except UserError as err:
        conn.send(("user", err))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the child's traceback
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()


def run_in_child(model_dir: Path, staging: Path, opset: int, validate: bool, steps: int) -> TorchStage:
    """:func:`run_torch_stage` in a fresh (spawned) process; its memory is freed when it returns.

    A :class:`UserError` in the child is a one-line error here; a child killed by the kernel
    (out of memory) is a one-line error naming its exit code; a crash re-raises with its traceback.
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child, (model_dir, staging, opset, validate, steps)),
                              name="export.clip-torch", daemon=True)
    process.start()
    child.close()
    try:
        while not parent.poll(0.5):
            if not process.is_alive():
                raise ModelNotFoundError(
                    f"the export process died with exit code {process.exitcode} while loading or tracing "
                    f"{model_dir} (a negative code is a signal: -9 is usually the kernel's out-of-memory killer)"
                )
        kind, payload = parent.recv()
    finally:
        if process.is_alive():
            process.kill()
        process.join()
    if kind == "user":
        raise payload
    if kind == "crash":
        raise RuntimeError(f"the torch export stage crashed:\n{payload}")
    return payload
