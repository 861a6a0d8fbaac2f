"""Validate exported ONNX files against the Hugging Face model itself.

References come from the HF module's own outputs (``output_attentions``/``output_hidden_states``),
not from our wrapper, so a wrapper bug cannot validate itself. Order of checks per output:
names, then shapes, then values.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.reference.vision import tower_outputs
from export.vision_family import VisionFamily
from runtime.errors import UserError

# (atol, rtol): float32 graphs re-associate sums; 1e-4 absolute is the acceptance bound, the
# relative part covers CLIP's few large-magnitude activations in real checkpoints.
TOLERANCES = {
    "features": (1e-4, 1e-4),
    "cls_attn": (1e-5, 1e-4),
    "keys": (1e-4, 1e-4),
    "embeddings": (1e-4, 1e-4),
    # the text tower (export.clip_text): small graphs (12 blocks at most), so the 1e-5 bound is absolute
    "text_embeds": (1e-5, 0.0),
    "image_embeds": (1e-5, 0.0),
    # LLaVA-NeXT's image_newline: HF concatenates the parameter itself, so the exported copy is bit-equal
    "image_newline": (0.0, 0.0),
}
# The int8 vision graph is flagged (manifest validation.int8.ok = false, one warning line on stderr)
# below either bound; dynamic int8 measured 0.9996 / 63 of 64 on ViT-L/14-336, 0.9998 / 62 on the tiny model.
INT8_MIN_COSINE = 0.99  # mean per-token feature cosine to fp32: below it the features are another model's
INT8_TOP = 64  # the [CLS]-attention ranking compared: the smallest budget the runtime is used with
INT8_MIN_OVERLAP = 48  # of INT8_TOP: fewer shared top patches and int8 prunes visibly other tokens


@dataclass(frozen=True)
class Check:
    """One row of the validation table."""

    graph: str
    case: str
    output: str
    expected_shape: list[int]
    actual_shape: list[int]
    max_abs_diff: float | None  # None when names or shapes already failed
    bound: float
    ok: bool

    def to_json(self) -> dict:
        return asdict(self)


def hf_vision_reference(half, pixel_values: torch.Tensor, feature_layer: int) -> dict[str, np.ndarray]:
    """The three encoder outputs of a LLaVA's tower (``half``: a :class:`export.load.VisionHalf`):
    :func:`tower_reference` of ``half.vision_tower``."""
    return tower_reference(half.vision_tower, pixel_values, feature_layer)


def tower_reference(tower, pixel_values: torch.Tensor, feature_layer: int,
                    family: VisionFamily | None = None) -> dict[str, np.ndarray]:
    """:func:`export.reference.vision.tower_outputs` as NumPy, one image at a time so that only one
    image's N×N attention maps are alive (511 MB for CLIP-L)."""
    rows = [{k: v.numpy() for k, v in tower_outputs(tower, pixel_values[i : i + 1], feature_layer, family).items()}
            for i in range(pixel_values.shape[0])]
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}


def compare(graph: str, case: str, expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> list[Check]:
    """Names, then shapes, then values of every expected output."""
    checks = []
    for name, ref in expected.items():
        atol, rtol = TOLERANCES[name]
        bound = atol + rtol * float(np.abs(ref).max())
        got = actual.get(name)
        if got is None or got.shape != ref.shape:
            shape = [] if got is None else list(got.shape)
            checks.append(Check(graph, case, name, list(ref.shape), shape, None, bound, False))
            continue
        diff = float(np.abs(got.astype(np.float64) - ref).max())
        checks.append(Check(graph, case, name, list(ref.shape), list(got.shape), diff, bound, diff <= bound))
    return checks


def validation_inputs(image_size: int) -> dict[str, np.ndarray]:
    """A few pixel batches: seeded noise at B=1 and B=3 and a smooth pattern (normalised range)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:image_size, 0:image_size] / image_size
    pattern = np.stack([np.sin(6 * xs), np.cos(4 * ys), xs * ys - 0.5])[None] * 1.5
    return {
        "noise-b1": rng.standard_normal((1, 3, image_size, image_size)).astype(np.float32),
        "noise-b3": rng.standard_normal((3, 3, image_size, image_size)).astype(np.float32),
        "pattern-b1": pattern.astype(np.float32),
    }


def onnx_session(path: Path):  # -> onnxruntime.InferenceSession
    """An onnxruntime CPU session at basic graph optimisation with the runtime's low-memory options
    (:func:`runtime.ort_session.low_memory_options`)."""
    import onnxruntime as ort

    from runtime.ort_session import low_memory_options

    options = low_memory_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``session`` by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX file once with :func:`onnx_session`."""
    return run_session(onnx_session(path), feeds)


def reference_outputs(half, feature_layer: int, image_size: int) -> dict[str, dict[str, np.ndarray]]:
    """:func:`tower_references` of a LLaVA's tower and projector (``half``: a :class:`export.load.VisionHalf`)."""
    return tower_references(half.vision_tower, half.multi_modal_projector, feature_layer, image_size)


def tower_references(tower, projector, feature_layer: int, image_size: int,
                     family: VisionFamily | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Hugging Face's outputs on every :func:`validation_inputs` case: the three vision outputs
    and ``embeddings`` (``projector`` of those features). Small arrays: once they exist, the
    torch model can be released before onnxruntime loads the graphs."""
    references = {}
    for case, pixels in validation_inputs(image_size).items():
        expected = tower_reference(tower, torch.from_numpy(pixels), feature_layer, family)
        with torch.no_grad():
            expected["embeddings"] = projector(torch.from_numpy(expected["features"])).numpy()
        references[case] = expected
    return references


def validate_tower(tower, projector, feature_layer: int, image_size: int, folder: Path,
                   family: VisionFamily | None = None) -> list[Check]:
    """``folder``'s vision.onnx and projector.onnx (:func:`export.onnx_export.export_tower`) against
    :func:`tower_references`, in this process."""
    references = tower_references(tower, projector, feature_layer, image_size, family)
    return check_graphs(references, folder / "vision.onnx", folder / "projector.onnx", image_size)


def check_graphs(references: dict[str, dict[str, np.ndarray]], vision_path: Path, projector_path: Path,
                 image_size: int) -> list[Check]:
    """Both graphs against :func:`reference_outputs`, one onnxruntime session alive at a time."""
    checks: list[Check] = []
    vision = onnx_session(vision_path)
    got = {case: run_session(vision, {"pixel_values": pixels})
           for case, pixels in validation_inputs(image_size).items() if case in references}
    del vision
    projector = onnx_session(projector_path)
    for case, expected in references.items():
        vision_expected = {k: v for k, v in expected.items() if k != "embeddings"}
        checks += compare("vision", case, vision_expected, got[case])
        embeddings = run_session(projector, {"features": expected["features"]})
        checks += compare("projector", case, {"embeddings": expected["embeddings"]}, embeddings)
    return checks


class ValidationFailed(UserError):
    """An exported graph disagrees with PyTorch beyond tolerance."""


def checked_table(checks: list[Check], what: str = "validation") -> str:
    """The ✓/✗ table of ``checks``; when any failed, it is printed and ValidationFailed names the
    failed outputs (``what`` starts the message: "validation failed for vision.features; ...")."""
    table = format_table(checks)
    if not all(c.ok for c in checks):
        print(table)
        failed = sorted({f"{c.graph}.{c.output}" for c in checks if not c.ok})
        raise ValidationFailed(f"{what} failed for {', '.join(failed)}; nothing was written")
    return table


def format_table(checks: list[Check]) -> str:
    """The ✓/✗ table printed after export."""
    lines = [f"{'':2}{'graph':11}{'input':15}{'output':14}{'shape':22}{'max |Δ|':>12}{'tolerance':>12}"]
    for c in checks:
        diff = "—" if c.max_abs_diff is None else f"{c.max_abs_diff:.2e}"
        shape = "x".join(map(str, c.actual_shape)) or "missing"
        mark = "✓" if c.ok else "✗"
        lines.append(f"{mark:2}{c.graph:11}{c.case:15}{c.output:14}{shape:22}{diff:>12}{c.bound:>12.2e}")
    return "\n".join(lines)


def int8_report(fp32_path: Path, int8_path: Path, image_size: int, top: int = INT8_TOP) -> dict[str, Any]:
    """Mean per-token cosine of int8 vs fp32 features, top-``top`` overlap of S^f, and ``ok``: both
    at least INT8_MIN_COSINE / INT8_MIN_OVERLAP (scaled to ``top``). Not ok: one warning line on stderr."""
    pixels = validation_inputs(image_size)["pattern-b1"]
    ref = run_onnx(fp32_path, {"pixel_values": pixels})  # one session alive at a time
    got = run_onnx(int8_path, {"pixel_values": pixels})
    a, b = ref["features"][0].astype(np.float64), got["features"][0].astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    k = min(top, a.shape[0])
    top_ref = np.argsort(-ref["cls_attn"][0, -1].mean(0), kind="stable")[:k]
    top_got = np.argsort(-got["cls_attn"][0, -1].mean(0), kind="stable")[:k]
    cosine, overlap = float(cos.mean()), int(len(np.intersect1d(top_ref, top_got)))
    min_overlap = math.ceil(INT8_MIN_OVERLAP * k / INT8_TOP)
    ok = cosine >= INT8_MIN_COSINE and overlap >= min_overlap
    if not ok:
        print(f"WARNING: {int8_path.name} is not a faithful int8 copy of {fp32_path.name}: feature cosine "
              f"{cosine:.4f} (need >= {INT8_MIN_COSINE}), top-{k} [CLS] overlap {overlap}/{k} (need >= "
              f"{min_overlap}); --int8 will prune other tokens than fp32, use the fp32 graph",
              file=sys.stderr, flush=True)
    return {"feature_cosine": cosine, "top_k": k, "cls_topk_overlap": overlap, "ok": ok,
            "min_feature_cosine": INT8_MIN_COSINE, "min_overlap": min_overlap}
