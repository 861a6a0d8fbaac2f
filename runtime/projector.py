"""The projector stage: ``projector.onnx`` maps ``[K, D]`` vision tokens to ``[K, E]`` LLM rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.session import open_session


class Projector:
    """``features [K,D] float32 -> embeddings [K,E] float32`` (LLaVA's two-layer GELU MLP)."""

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None) -> None:
        self.session = open_session(path, provider, threads)
        self.in_dim = int(self.session.get_inputs()[0].shape[-1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features must be [K, {self.in_dim}], got {features.shape}")
        (out,) = self.session.run(None, {"features": features[None].astype(np.float32)})
        return out[0]
