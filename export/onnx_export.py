"""Trace the wrapped vision tower and the projector to ONNX with ``torch.onnx.export``.

We call the exporter directly (dynamo-based, ``torch.export`` + onnxscript) rather than
optimum: optimum-onnx 0.1.0 requires transformers<4.58, and our wrappers are plain modules.
The example batch is 2 so that the batch axis stays dynamic (a batch-1 example specialises it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from export.vision_family import VisionFamily

EXAMPLE_BATCH = 2  # a batch-1 example silently produces a static batch axis
EXAMPLE_TOKENS = 7  # projector example length; K is dynamic
# Bytes of weights above which the graph keeps its weights in a ``.data`` file beside it. ONNX caps
# one protobuf at 2 GB, and — what matters on a laptop — saving inline first builds the whole
# model proto plus its serialised copy in memory (+3.5 GB for CLIP-L), while external data is
# written straight from the tensors.
EXTERNAL_DATA_BYTES = 64_000_000


def _weights_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def _quiet(name: str):
    """Silence a library logger (the exporter warns about optional torchvision ops)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int,
            input_names: list[str], output_names: list[str], dynamic_shapes: dict) -> list[Path]:
    """Export ``module`` to ``path``; returns the files written (model and external data)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), _quiet("torch.onnx"):
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
        )
        external = _weights_bytes(module) > EXTERNAL_DATA_BYTES
        program.save(str(path), external_data=external)
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def export_vision(wrapper: nn.Module, path: Path, image_size: int, opset: int) -> list[Path]:
    """``pixel_values [B,3,S,S] -> features [B,N,D], cls_attn [B,f,H,N], keys [B,N,D/H]``."""
    example = torch.randn(EXAMPLE_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1024)
    return _export(wrapper, (example,), path, opset, ["pixel_values"], ["features", "cls_attn", "keys"],
                   {"pixel_values": {0: batch}})


def export_projector(projector: nn.Module, path: Path, in_dim: int, opset: int) -> list[Path]:
    """``features [B,K,D] -> embeddings [B,K,E]`` with dynamic B and K."""
    example = torch.randn(EXAMPLE_BATCH, EXAMPLE_TOKENS, in_dim, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1024)
    tokens = torch.export.Dim("tokens", min=1, max=65536)
    return _export(projector, (example,), path, opset, ["features"], ["embeddings"],
                   {"features": {0: batch, 1: tokens}})


def export_tower(tower: nn.Module, projector: nn.Module, feature_layer: int, image_size: int, in_dim: int,
                 folder: Path, opset: int, family: VisionFamily | None = None) -> tuple[list[Path], list[Path]]:
    """``folder``/vision.onnx (:class:`export.vision.VisionTowerWithAttention` of ``tower`` to block
    ``feature_layer``, ``family`` as there) and ``folder``/projector.onnx (``projector``, input width
    ``in_dim``); the files written for each."""
    from export.vision import VisionTowerWithAttention

    wrapper = VisionTowerWithAttention(tower, feature_layer, family).eval()
    vision = export_vision(wrapper, folder / "vision.onnx", image_size, opset)
    return vision, export_projector(projector.eval(), folder / "projector.onnx", in_dim, opset)


def quantize_int8(source: Path, target: Path) -> Path:
    """onnxruntime dynamic quantisation (int8 weights of MatMul/Gemm) of the vision graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = any(p.name != source.name for p in source.parent.iterdir() if p.name.startswith(source.name))
    with _quiet("root"):  # "consider pre-processing": shape inference that our traced graph does not need
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=external)
    return target
