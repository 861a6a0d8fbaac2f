"""The vision encoder stage: an onnxruntime session over ``vision.onnx`` (or the int8 one).

The graph is checked against the manifest's vision geometry when it is opened (names, ranks, fixed
dims, dtypes) and its outputs when it runs (shapes, NaN/inf), so a graph of another model or a broken
one is a one-line BundleError rather than garbage pruned downstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.bundle.entries import VisionInfo
from runtime.bundle.manifest import EXPORT_ID_KEY, check_export_id
from runtime.errors import BundleError
from runtime.ort_session import open_session
from runtime.types import EncoderOutput, EncoderTiles

INPUT = "pixel_values"
OUTPUTS = ("features", "cls_attn", "keys")
FLOAT = "tensor(float)"
DEFAULT_REPAIR = "re-export the bundle"
Dims = tuple[int | None, ...]  # expected shape; None: any size (the batch axis)
ANY_GEOMETRY: dict[str, Dims] = {INPUT: (None, 3, None, None), "features": (None,) * 3,
                                 "cls_attn": (None,) * 4, "keys": (None,) * 3}  # ranks only


def vision_shapes(vision: VisionInfo) -> dict[str, Dims]:
    """The shapes ``vision.onnx`` has for this geometry (the graph drops [CLS]: N = grid²).

    Example: LLaVA-1.5 -> pixel_values (B, 3, 336, 336), features (B, 576, 1024),
    cls_attn (B, 23, 16, 576), keys (B, 576, 64).
    """
    s, n = vision.image_size, vision.num_patches
    return {INPUT: (None, 3, s, s), "features": (None, n, vision.hidden_size),
            "cls_attn": (None, vision.feature_layer, vision.heads, n), "keys": (None, n, vision.head_dim)}


def open_graph(path: Path, provider: str | None, threads: int | None, repair: str,
               export_id: str | None = None) -> ort.InferenceSession:
    """:func:`runtime.ort_session.open_session` with ``repair`` in its load errors, plus a one-line
    BundleError for an empty file or a protobuf without a graph (onnxruntime's InvalidArgument),
    and — given the manifest's ``export_id`` — for a graph whose ``metadata_props`` carry another."""
    if path.is_file() and path.stat().st_size == 0:
        raise BundleError(f"{path} is empty (0 bytes), not an ONNX graph; {repair}")
    try:
        session = open_session(path, provider, threads)
    except BundleError as err:  # open_session's own one line (a corrupt graph), with the repair added
        raise BundleError(f"{err}; {repair}") from None
    if export_id is not None:
        check_export_id(path, session.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY), export_id, repair)
    return session


def shape_text(shape: Sequence[object]) -> str:
    """``[batch, 3, 336, 336]`` for a graph shape (symbolic dims by name, unknown ones as ``?``)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def fits(shape: Sequence[object], expected: Dims) -> bool:
    """True when the ranks agree and every fixed dim of ``shape`` equals a fixed ``expected`` one."""
    if len(shape) != len(expected):
        return False
    return all(not isinstance(d, int) or e is None or d == e for d, e in zip(shape, expected, strict=True))


def check_node(path: Path, kind: str, node: ort.NodeArg, expected: Dims, why: str, repair: str) -> None:
    """BundleError unless graph ``node`` (an input or output) is float32 and of the ``expected`` shape."""
    if node.type != FLOAT or not fits(node.shape, expected):
        want = shape_text(["batch", *expected[1:]])
        raise BundleError(f"{path}: {kind} {node.name!r} is {shape_text(node.shape)} {node.type}, expected "
                          f"{want} {FLOAT} ({why}); {repair}")


def check_finite(path: Path, name: str, values: np.ndarray, repair: str) -> None:
    """BundleError when a graph output holds NaN or inf (a broken graph: its result is not used)."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = values[~finite]
        kinds = " and ".join(k for k, hit in (("NaN", np.isnan(bad).any()), ("inf", np.isinf(bad).any())) if hit)
        raise BundleError(f"{path} produced {kinds} in {name!r} ({bad.size} of {values.size} values); the graph "
                          f"is broken, its output is not used; {repair}")


class Encoder:
    """``pixel_values [3,S,S] -> EncoderOutput`` (features, CLS rows of blocks 1..f, keys).

    With ``vision`` (the manifest's geometry) the graph's input and outputs must have its shapes.
    """

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None, *,
                 vision: VisionInfo | None = None, repair: str = DEFAULT_REPAIR, export_id: str | None = None) -> None:
        self.path, self.repair = Path(path), repair
        self.session = open_graph(self.path, provider, threads, repair, export_id)
        self.shapes = vision_shapes(vision) if vision is not None else ANY_GEOMETRY
        self.why = "the manifest's vision geometry" if vision is not None else "an encoder graph"
        self._check_graph()
        self.provider = self.session.get_providers()[0]

    def _check_graph(self) -> None:
        """Names, dtypes and (with a geometry) shapes of the graph's input and outputs."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT]:
            raise BundleError(f"{self.path} has inputs {[i.name for i in inputs]}, expected [{INPUT!r}]; {self.repair}")
        names = [o.name for o in outputs]
        if tuple(names) != OUTPUTS:
            raise BundleError(f"{self.path} has outputs {names}, expected {list(OUTPUTS)}; {self.repair}")
        for kind, node in [("input", inputs[0]), *(("output", o) for o in outputs)]:
            check_node(self.path, kind, node, self.shapes[node.name], self.why, self.repair)

    def _check_outputs(self, outputs: Mapping[str, np.ndarray], batch: int) -> None:
        """Shapes (batch ``batch``, the geometry) and finiteness of one run's outputs."""
        for name, values in outputs.items():
            if not fits(values.shape, (batch, *self.shapes[name][1:])):
                raise BundleError(f"{self.path} returned {name!r} of shape {values.shape}, expected "
                                  f"{(batch, *self.shapes[name][1:])}; {self.repair}")
            check_finite(self.path, name, values, self.repair)

    def encode_batch(self, pixel_values: np.ndarray) -> EncoderTiles:
        """``[T,3,S,S] float32 -> EncoderTiles`` (tile axis first; ``[t]`` is one tile's EncoderOutput)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, S, S], got {pixel_values.shape}")
        values = self.session.run(list(OUTPUTS), {INPUT: pixel_values.astype(np.float32)})
        outputs = dict(zip(OUTPUTS, values, strict=True))
        self._check_outputs(outputs, pixel_values.shape[0])
        return EncoderTiles(*values)

    def encode(self, pixel_values: np.ndarray) -> EncoderOutput:
        """``[3,S,S] float32 -> EncoderOutput``."""
        return self.encode_batch(pixel_values[None])[0]
