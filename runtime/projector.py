"""The projector stage: ``projector.onnx`` maps ``[K, D]`` vision tokens to ``[K, E]`` LLM rows.

Its widths are read from the graph when it is opened: the input's last dim must be the vision
hidden size D and the output's the manifest's ``projector_dim`` E (so a projector of another model
is refused at load); :attr:`Projector.out_dim` is the width the language model must have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.bundle.entries import VisionInfo
from runtime.encoder import DEFAULT_REPAIR, FLOAT, check_finite, open_graph, shape_text
from runtime.errors import BundleError

INPUT = "features"


class Projector:
    """``features [K,D] float32 -> embeddings [K,E] float32`` (LLaVA's two-layer GELU MLP).

    ``in_dim`` (D) and ``out_dim`` (E) are the graph's fixed widths; with ``vision`` (the
    manifest's geometry) they must be its ``hidden_size`` and ``projector_dim``.
    """

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None, *,
                 vision: VisionInfo | None = None, repair: str = DEFAULT_REPAIR, export_id: str | None = None) -> None:
        self.path, self.repair = Path(path), repair
        self.session = open_graph(self.path, provider, threads, repair, export_id)
        self.in_dim = self._width("input", self.session.get_inputs(), INPUT)
        self.out_dim = self._width("output", self.session.get_outputs(), None)
        if vision is not None:
            self._check_widths(vision)

    def _width(self, kind: str, nodes: list[ort.NodeArg], name: str | None) -> int:
        """The fixed last dim of the graph's only ``[batch, tokens, width]`` float input/output."""
        if len(nodes) != 1 or (name is not None and nodes[0].name != name):
            wanted = f"one named {name!r}" if name else "one"
            raise BundleError(f"{self.path} has {kind}s {[n.name for n in nodes]}, expected {wanted} "
                              f"(a projector graph); {self.repair}")
        node = nodes[0]
        if node.type != FLOAT or len(node.shape) != 3 or not isinstance(node.shape[-1], int):
            raise BundleError(f"{self.path}: {kind} {node.name!r} is {shape_text(node.shape)} {node.type}, expected "
                              f"[batch, tokens, WIDTH] {FLOAT} with a fixed WIDTH; {self.repair}")
        return node.shape[-1]

    def _check_widths(self, vision: VisionInfo) -> None:
        """BundleError unless D and E equal the manifest's hidden_size and projector_dim."""
        if self.in_dim != vision.hidden_size:
            raise BundleError(f"{self.path} takes features {self.in_dim} wide, but the vision encoder's "
                              f"hidden_size is {vision.hidden_size} (a projector of another model); {self.repair}")
        if self.out_dim != vision.projector_dim:
            raise BundleError(f"{self.path} writes rows {self.out_dim} wide, but the manifest records "
                              f"projector_dim {vision.projector_dim} (the language model's n_embd); {self.repair}")

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """``[K, D] -> [K, E]`` float32; NaN/inf in the result is a BundleError."""
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features must be [K, {self.in_dim}], got {features.shape}")
        (out,) = self.session.run(None, {INPUT: features[None].astype(np.float32)})
        if out.shape != (1, features.shape[0], self.out_dim):
            raise BundleError(f"{self.path} returned shape {out.shape}, expected "
                              f"{(1, features.shape[0], self.out_dim)}; {self.repair}")
        check_finite(self.path, "embeddings", out, self.repair)
        return out[0]
