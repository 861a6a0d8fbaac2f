"""The int8 vision graph: export's check (export.validate.int8_report) and the runtime's --int8 path.

``Pipeline(int8=True)``, ``runtime.prune --int8`` and ``runtime.chat --int8`` run ``vision.int8.onnx``
and keep nearly the fp32 tokens; a graph quantised to 4 bits in its place keeps visibly other ones
and makes the export's report warn (negative controls through the same code).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.validate import INT8_MIN_COSINE, INT8_MIN_OVERLAP, INT8_TOP, int8_report
from runtime.pipeline import Pipeline
from tests.bundle_files import member

K = INT8_TOP  # the budget compared: the export's own top-64 check
# Kept-set overlap bound for the attention-ranked strategies (dynamic int8 on the tiny model: 60..64
# of 64): the export's INT8_MIN_OVERLAP, so a graph export.clip accepts is one the runtime may use.
MIN_KEPT = INT8_MIN_OVERLAP
STRATEGIES = ("entropy", "fastervlm")  # DivPrune's greedy chain amplifies any change: not bounded
NAMES = ("astronaut", "coffee", "chelsea")
IMAGE_SIZE = 336


def int4_graph(source: Path, target: Path) -> Path:
    """A deliberately bad quantiser: every MatMul weight rounded to 4 bits (15 levels, per tensor)."""
    model = onnx.load(source)
    weights = {name for node in model.graph.node if node.op_type == "MatMul" for name in node.input}
    for init in model.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            step = np.abs(w).max() / 7
            init.CopyFrom(numpy_helper.from_array((np.clip(np.round(w / step), -7, 7) * step).astype(w.dtype),
                                                  init.name))
    onnx.save(model, target)
    return target


@pytest.fixture(scope="module")
def int4_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle whose vision.int8.onnx is the 4-bit graph (manifest sizes updated)."""
    out = tmp_path_factory.mktemp("int4") / "bundle"
    shutil.copytree(tiny_bundle, out)
    int4_graph(member(tiny_bundle, "vision"), member(out, "vision_int8"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sizes"][manifest["files"]["vision_int8"]] = member(out, "vision_int8").stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def kept_overlaps(bundle: Path, photos) -> dict[tuple[str, str], int]:
    """|kept(fp32) ∩ kept(int8)| at K = 64 per (photo, strategy), and check that int8 ran another graph."""
    fp32, int8 = Pipeline(bundle), Pipeline(bundle, int8=True)
    out = {}
    for name in NAMES:
        pixels = fp32.pixel_values(photos[name])
        a, b = fp32.encoder.encode(pixels), int8.encoder.encode(pixels)
        same_graph = np.array_equal(a.features, b.features)
        assert not same_graph, "Pipeline(int8=True) ran the fp32 graph"
        for strategy in STRATEGIES:
            kept_a, kept_b = fp32.prune_encoded(a, K, strategy).kept, int8.prune_encoded(b, K, strategy).kept
            out[name, strategy] = len(np.intersect1d(kept_a, kept_b))
    return out


# --- export: int8_report ---------------------------------------------------------------------
def test_export_records_ok_for_the_dynamic_int8_graph(tiny_bundle: Path, capsys) -> None:
    recorded = json.loads((tiny_bundle / "manifest.json").read_text())["validation"]["int8"]
    assert recorded["ok"] is True and recorded["top_k"] == INT8_TOP
    assert recorded["feature_cosine"] >= INT8_MIN_COSINE and recorded["cls_topk_overlap"] >= INT8_MIN_OVERLAP
    again = int8_report(member(tiny_bundle, "vision"), member(tiny_bundle, "vision_int8"), IMAGE_SIZE)
    assert again["ok"] is True and capsys.readouterr().err == ""


def test_export_warns_loudly_on_a_bad_quantiser(int4_bundle: Path, capsys) -> None:
    report = int8_report(member(int4_bundle, "vision"), member(int4_bundle, "vision_int8"), IMAGE_SIZE)
    assert report["ok"] is False
    assert report["feature_cosine"] < INT8_MIN_COSINE and report["cls_topk_overlap"] < INT8_MIN_OVERLAP
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("WARNING: vision.int8.onnx is not a faithful int8 copy"), err
    assert f"{report['cls_topk_overlap']}/64 (need >= 48)" in err[0]


@pytest.mark.parametrize("broken", ["features", "ranking"])
def test_export_flags_either_bound_alone(tiny_bundle: Path, monkeypatch, capsys, broken: str) -> None:
    """An 'int8' output that fails only one bound (noisy features, or a reversed [CLS] ranking) is not ok."""
    import export.validate as validate

    real = validate.run_onnx

    def distorted(path: Path, feeds: dict) -> dict:
        out = real(member(tiny_bundle, "vision"), feeds)
        if path.name == "vision.int8.onnx" and broken == "features":
            noise = np.random.default_rng(0).standard_normal(out["features"].shape).astype(np.float32)
            out["features"] = out["features"] + 0.3 * np.abs(out["features"]).mean() * noise
        if path.name == "vision.int8.onnx" and broken == "ranking":
            out["cls_attn"] = out["cls_attn"].max() - out["cls_attn"]
        return out

    monkeypatch.setattr(validate, "run_onnx", distorted)
    report = int8_report(member(tiny_bundle, "vision"), member(tiny_bundle, "vision_int8"), IMAGE_SIZE)
    cosine_ok = report["feature_cosine"] >= INT8_MIN_COSINE
    overlap_ok = report["cls_topk_overlap"] >= INT8_MIN_OVERLAP
    assert (cosine_ok, overlap_ok) == ((False, True) if broken == "features" else (True, False)), report
    assert report["ok"] is False and capsys.readouterr().err.startswith("WARNING: vision.int8.onnx")


# --- runtime: Pipeline(int8=True), runtime.prune --int8, runtime.chat --int8 ------------------
def test_int8_pipeline_keeps_nearly_the_fp32_tokens(tiny_bundle: Path, photos) -> None:
    overlaps = kept_overlaps(tiny_bundle, photos)
    assert min(overlaps.values()) >= MIN_KEPT, overlaps


def test_negative_control_int4_graph_keeps_other_tokens(int4_bundle: Path, photos) -> None:
    overlaps = kept_overlaps(int4_bundle, photos)
    assert max(overlaps.values()) < MIN_KEPT, overlaps


@pytest.fixture()
def encoder_paths(monkeypatch) -> list[str]:
    """The vision graphs the runtime opens (a spy on runtime.pipeline.Encoder)."""
    import runtime.pipeline

    opened: list[str] = []
    real = runtime.pipeline.Encoder

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runtime.pipeline, "Encoder", spy)
    return opened


def test_prune_cli_int8(tiny_bundle: Path, photos, tmp_path: Path, capsys, encoder_paths: list[str]) -> None:
    from runtime.prune import main

    image = tmp_path / "chelsea.png"
    photos["chelsea"].save(image)
    kept = {}
    for flags in ([], ["--int8"]):
        assert main([str(image), "--model", str(tiny_bundle), "--tokens", str(K), "--json", *flags]) == 0
        kept[bool(flags)] = json.loads(capsys.readouterr().out)["kept"]
    assert encoder_paths == ["vision.onnx", "vision.int8.onnx"]
    assert len(set(kept[False]) & set(kept[True])) >= MIN_KEPT, kept


@pytest.mark.llm
def test_chat_int8_answers(tiny_llm_bundle: Path, photos, tmp_path: Path, capsys, encoder_paths: list[str]) -> None:
    from runtime.chat import main

    image = tmp_path / "coffee.png"
    photos["coffee"].save(image)
    argv = ["--model", str(tiny_llm_bundle), "--image", str(image), "--prompt", "What is shown?", "--int8",
            "--max-tokens", "3", "--temperature", "0", "--timings"]
    assert main(argv) == 0
    assert encoder_paths == ["vision.int8.onnx"]
    assert "image tokens kept: 64/576" in capsys.readouterr().err
