"""The vision encoder stage: an onnxruntime session over ``vision.onnx`` (or the int8 one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import BundleError
from runtime.session import open_session
from runtime.types import EncoderOutput

OUTPUTS = ("features", "cls_attn", "keys")


class Encoder:
    """``pixel_values [3,S,S] -> EncoderOutput`` (features, CLS rows of blocks 1..f, keys)."""

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None) -> None:
        self.session = open_session(path, provider, threads)
        names = [o.name for o in self.session.get_outputs()]
        if tuple(names) != OUTPUTS:
            raise BundleError(f"{path} has outputs {names}, expected {list(OUTPUTS)} (re-export the bundle)")
        self.provider = self.session.get_providers()[0]

    def encode_batch(self, pixel_values: np.ndarray) -> list[EncoderOutput]:
        """``[B,3,S,S] float32 -> B EncoderOutputs``."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, S, S], got {pixel_values.shape}")
        features, cls_attn, keys = self.session.run(list(OUTPUTS), {"pixel_values": pixel_values.astype(np.float32)})
        return [EncoderOutput(features[i], cls_attn[i], keys[i]) for i in range(pixel_values.shape[0])]

    def encode(self, pixel_values: np.ndarray) -> EncoderOutput:
        """``[3,S,S] float32 -> EncoderOutput``."""
        return self.encode_batch(pixel_values[None])[0]
