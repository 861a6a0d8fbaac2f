"""llama.cpp's own LLaVA image path (libmtmd) side by side with ours, on the same checkpoint and pixels.

libmtmd is driven through llama-cpp-python's ``llama_cpp.mtmd_cpp`` (``mtmd_init_from_file``,
``mtmd_bitmap_init``, ``mtmd_tokenize``, ``mtmd_encode_chunk``, ``mtmd_get_output_embd``) with an
mmproj GGUF written by our own :func:`export.mmproj.write_mmproj_gguf`. Compared with Hugging
Face's ``get_image_features`` (all N rows, before the LLM): our ONNX tower + projector, libmtmd on
the standard mmproj, and libmtmd on the ``cls-last`` diagnostic mmproj (see export/mmproj.py).
For each, three alignments: row r vs HF patch r ("aligned"), row r vs HF patch r+1 ("shifted",
r < N-1) and the last row vs HF's projected [CLS] ("last vs CLS"). Photos are resized to the
tower's input size first (PIL bicubic) so both pipelines see the same pixels and only the
encoders differ. Timings: ONNX encode and projector of all N rows vs libmtmd's preprocessing
(inside ``mtmd_tokenize``) and ``mtmd_encode_chunk`` (tower + projector), same thread count.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from runtime.errors import UserError
from runtime.llm.backend import set_llama_logging
from runtime.pipeline import Pipeline
from tools.benchkit.common import median, sample_images, timed_ms

MTMD_FUNCTIONS = ("mtmd_context_params_default", "mtmd_init_from_file", "mtmd_free", "mtmd_support_vision",
                  "mtmd_bitmap_init", "mtmd_bitmap_free", "mtmd_input_chunks_init", "mtmd_input_chunks_free",
                  "mtmd_input_chunks_size", "mtmd_input_chunks_get", "mtmd_input_chunk_get_type",
                  "mtmd_input_chunk_get_n_tokens", "mtmd_tokenize", "mtmd_encode_chunk", "mtmd_get_output_embd",
                  "mtmd_default_marker", "mtmd_log_set")
LOG_ERROR = 4  # ggml_log_level GGML_LOG_LEVEL_ERROR
_SILENT = llama_cpp.llama_log_callback(lambda level, text, user_data: None)


class MtmdError(UserError):
    """libmtmd could not be loaded or driven; the message says why (libmtmd's own error lines)."""


@dataclass(frozen=True)
class Agreement:
    """Row-wise agreement of two ``[M, E]`` arrays."""

    rows: int
    cos_min: float
    cos_mean: float
    max_abs: float


def row_agreement(actual: np.ndarray, expected: np.ndarray) -> Agreement:
    """Per-row cosine (float64, norms clipped at 1e-12) and max |Δ| of ``[M, E]`` arrays.

    Example: row_agreement([[1, 0]], [[2, 0]]) -> Agreement(rows=1, cos_min=1.0, cos_mean=1.0, max_abs=1.0).
    """
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two [M, E] arrays of one shape, got {a.shape} and {b.shape}")
    norms = np.maximum(np.linalg.norm(a, axis=1), 1e-12) * np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    cos = (a * b).sum(axis=1) / norms
    return Agreement(int(a.shape[0]), float(cos.min()), float(cos.mean()), float(np.abs(a - b).max()))


def alignments(rows: np.ndarray, patches: np.ndarray, cls: np.ndarray) -> dict[str, Agreement]:
    """``rows`` [N, E] (libmtmd's output) against HF ``patches`` [N, E] and projected ``cls`` [E]."""
    return {
        "aligned": row_agreement(rows, patches),
        "shifted": row_agreement(rows[:-1], patches[1:]),
        "last_vs_cls": row_agreement(rows[-1:], cls[None]),
    }


@dataclass(frozen=True)
class MtmdOutput:
    """libmtmd's image embeddings for one image and what they cost."""

    embeddings: np.ndarray  # [T, E] float32, the rows libmtmd feeds the LLM
    tokenize_ms: float  # mtmd_tokenize: image preprocessing (resize, normalise) + text
    encode_ms: float  # mtmd_encode_chunk: CLIP tower + projector


def _mtmd():
    """``llama_cpp.mtmd_cpp``, checked for every function this module calls."""
    try:
        from llama_cpp import mtmd_cpp
    except (ImportError, OSError) as err:
        raise MtmdError(f"llama_cpp.mtmd_cpp cannot be imported: {err}") from None
    missing = [name for name in MTMD_FUNCTIONS if not hasattr(mtmd_cpp, name)]
    if missing:
        raise MtmdError(f"llama_cpp.mtmd_cpp {llama_cpp.__version__} lacks {', '.join(missing)}")
    return mtmd_cpp


class MtmdEncoder:
    """An mmproj GGUF in a libmtmd context (CPU), next to the bundle's text GGUF it needs."""

    def __init__(self, mmproj: str | Path, text_gguf: str | Path, width: int, threads: int | None = None) -> None:
        self.m, self.width = _mtmd(), width
        self._model = self._ctx = None
        set_llama_logging(False)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), model_params)
        if not self._model:
            raise MtmdError(f"llama.cpp cannot load the text model {text_gguf}")
        params = self.m.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.warmup = False, False, True
        params.n_threads = threads or os.cpu_count() or 1
        errors: list[str] = []

        def keep_errors(level: int, text: bytes, _: Any) -> None:
            if level == LOG_ERROR:
                errors.append(text.decode("utf-8", "replace").strip())

        collect = llama_cpp.llama_log_callback(keep_errors)
        self.m.mtmd_log_set(collect, ctypes.c_void_p(0))
        try:
            self._ctx = self.m.mtmd_init_from_file(str(mmproj).encode(), self._model, params)
        finally:
            self.m.mtmd_log_set(_SILENT, ctypes.c_void_p(0))
        if not self._ctx or not self.m.mtmd_support_vision(self._ctx):
            self.close()
            raise MtmdError(f"libmtmd refused {mmproj}: {' | '.join(e for e in errors if e) or 'no vision encoder'}")

    def encode(self, image: np.ndarray) -> MtmdOutput:
        """``image`` [H, W, 3] uint8 RGB -> libmtmd's embeddings of its one image chunk."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"need an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
        m, data = self.m, np.ascontiguousarray(image)
        bitmap = m.mtmd_bitmap_init(data.shape[1], data.shape[0], data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            marker = m.mtmd_default_marker()
            text = m.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc, tokenize_ms = timed_ms(lambda: m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1))
            images = [m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks))]
            images = [c for c in images if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if rc != 0 or len(images) != 1:
                raise MtmdError(f"mtmd_tokenize returned {rc} with {len(images)} image chunks (expected 0 and 1)")
            rc, encode_ms = timed_ms(lambda: m.mtmd_encode_chunk(self._ctx, images[0]))
            if rc != 0:
                raise MtmdError(f"mtmd_encode_chunk returned {rc}")
            n = m.mtmd_input_chunk_get_n_tokens(images[0])
            out = np.ctypeslib.as_array(m.mtmd_get_output_embd(self._ctx), shape=(n * self.width,))
            return MtmdOutput(out.reshape(n, self.width).astype(np.float32), tokenize_ms, encode_ms)
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if self._ctx:
            self.m.mtmd_free(self._ctx)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._ctx = self._model = None

    def __enter__(self) -> MtmdEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hf_image_features(model: Any, pixel_values: np.ndarray,
                      vision_feature_layer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face ``get_image_features`` of ``[B, 3, S, S]``: projected [CLS] ``[B, E]`` and patches
    ``[B, N, E]`` (strategy "full" keeps [CLS] as row 0; "default" is rows 1..N of the same).
    ``vision_feature_layer`` overrides the config's (negative controls)."""
    import torch

    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(pixel_values),
                                       vision_feature_select_strategy="full", vision_feature_layer=vision_feature_layer)
    rows = np.stack([np.asarray(t, np.float32) for t in out.pooler_output])
    return rows[:, 0], rows[:, 1:]


def square_images(count: int, size: int) -> list[np.ndarray]:
    """``count`` sample photos resized to ``size``×``size`` (PIL bicubic), uint8 RGB."""
    from PIL import Image

    return [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in sample_images(count)]


def _worst(items: list[Agreement]) -> Agreement:
    return Agreement(sum(a.rows for a in items), min(a.cos_min for a in items),
                     float(np.mean([a.cos_mean for a in items])), max(a.max_abs for a in items))


def compare_with_mtmd(bundle: str | Path, model_dir: str | Path, out: str | Path, images: int = 2,
                      repeats: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Write both mmproj files into ``out`` and measure; a JSON-able report (``status`` ok/unavailable)."""
    from export.load import load_llava
    from export.mmproj import write_mmproj_gguf

    pipeline = Pipeline(bundle, threads=threads)
    text_gguf = pipeline.manifest.root / pipeline.manifest.llm.gguf
    infos = {order: write_mmproj_gguf(model_dir, Path(out) / f"mmproj-{order}.gguf", position_order=order)
             for order in ("hf", "cls-last")}
    pictures = square_images(images, pipeline.manifest.vision.image_size)
    pixels = [pipeline.pixel_values(_pil(p)) for p in pictures]
    model = load_llava(Path(model_dir))
    hf = [hf_image_features(model, px[None]) for px in pixels]
    ours = [_ours(pipeline, px, repeats) for px in pixels]
    report: dict[str, Any] = {
        "status": "ok", "images": images, "repeats": repeats, "threads": threads,
        "pixels": f"photos resized to {pictures[0].shape[1]}x{pictures[0].shape[0]} (PIL bicubic): "
                  "both pipelines see the same pixels",
        "mmproj": {order: str(info.path) for order, info in infos.items()},
        "ours_vs_hf": asdict(_worst([row_agreement(o[0], h[1][0]) for o, h in zip(ours, hf, strict=True)])),
        "timings_ms": {"ours_encode": median([t for o in ours for t in o[1]]),
                       "ours_project_all": median([t for o in ours for t in o[2]])},
    }
    try:
        for order, info in infos.items():
            report[f"mtmd_{order}"], timings = _mtmd_variant(info, text_gguf, pictures, hf, repeats, threads)
            if order == "hf":
                report["timings_ms"].update(timings)
    except MtmdError as err:
        report.update(status="unavailable", reason=str(err))
    return report


def _mtmd_variant(info: Any, text_gguf: Path, pictures: list[np.ndarray], hf: list[tuple[np.ndarray, np.ndarray]],
                  repeats: int, threads: int | None) -> tuple[dict[str, Any], dict[str, float]]:
    """One mmproj through libmtmd: agreement with HF (worst over images) and median timings."""
    with MtmdEncoder(info.path, text_gguf, info.projector_dim, threads) as encoder:
        runs = [[encoder.encode(p) for _ in range(repeats + 1)][1:] for p in pictures]  # the first is a warm-up
    per_image = [alignments(r[0].embeddings, h[1][0], h[0][0]) for r, h in zip(runs, hf, strict=True)]
    result: dict[str, Any] = {k: asdict(_worst([a[k] for a in per_image])) for k in per_image[0]}
    result["rows"] = int(runs[0][0].embeddings.shape[0])
    timings = {"mtmd_preprocess": median([o.tokenize_ms for r in runs for o in r]),
               "mtmd_encode": median([o.encode_ms for r in runs for o in r])}
    return result, timings


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)


def _ours(pipeline: Pipeline, pixels: np.ndarray, repeats: int) -> tuple[np.ndarray, list[float], list[float]]:
    """Our projected rows [N, E] of one image, and per-repeat encode / project-all milliseconds."""
    encoded = pipeline.encoder.encode(pixels)  # warm-up
    rows = pipeline.projector(encoded.features)
    encode, project = [], []
    for _ in range(repeats):
        encoded, ms = timed_ms(lambda: pipeline.encoder.encode(pixels))
        encode.append(ms)
        rows, ms = timed_ms(lambda e=encoded: pipeline.projector(e.features))
        project.append(ms)
    return rows, encode, project
