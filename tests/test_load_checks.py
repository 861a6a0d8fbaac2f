"""Bad bundle files are refused at load (or at run time) with one-line BundleErrors, never tracebacks.

Covers ``probe_weights.npz`` (runtime.llm.probe), ``vision.onnx`` (runtime.encoder), ``projector.onnx``
(runtime.projector) and image paths that start with ``-`` on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.errors import BundleError

# ---------------------------------------------------------------- probe_weights.npz


def _good_weights() -> dict[str, Any]:
    """A valid probe: 2 query heads, 1 kv head of width 4, n_embd 16."""
    return {"q_weight": np.ones((8, 16), np.float32), "k_weight": np.ones((4, 16), np.float32),
            "n_head": np.int64(2), "n_head_kv": np.int64(1), "rope_theta": np.float64(1e4), "layer": np.int64(1)}


class _Marker:
    """Unpickling it would create a file: proves that np.load never unpickles."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return open, (str(self.path), "w")


BAD_WEIGHTS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "n_head-zero": (lambda w: w.update(n_head=np.int64(0)), "n_head must be a positive integer, got 0"),
    "n_head-negative": (lambda w: w.update(n_head=np.int64(-2)), "n_head must be a positive integer, got -2"),
    "n_head-array": (lambda w: w.update(n_head=np.array([2, 2])), "n_head must be a single number, got shape (2,)"),
    "n_head-float": (lambda w: w.update(n_head=np.float64(2.5)), "n_head must be an integer"),
    "n_head_kv-zero": (lambda w: w.update(n_head_kv=np.int64(0)), "n_head_kv must be a positive integer"),
    "layer-negative": (lambda w: w.update(layer=np.int64(-1)), "layer must be an integer >= 0"),
    "rope_theta-nan": (lambda w: w.update(rope_theta=np.float64(np.nan)), "rope_theta must be a positive"),
    "q-1d": (lambda w: w.update(q_weight=np.ones(128, np.float32)), "q_weight must be 2-D"),
    "k-3d": (lambda w: w.update(k_weight=np.ones((2, 2, 16), np.float32)), "k_weight must be 2-D"),
    "k-width": (lambda w: w.update(k_weight=np.ones((4, 8), np.float32)), "n_embd"),
    "q-heads": (lambda w: w.update(q_weight=np.ones((9, 16), np.float32)), "not a multiple of n_head=2"),
    "k-heads": (lambda w: w.update(k_weight=np.ones((6, 16), np.float32)), "expected (4, 16)"),
    "gqa": (lambda w: w.update(n_head_kv=np.int64(3), k_weight=np.ones((12, 16), np.float32)),
            "multiple of n_head_kv=3"),
    "odd-head-dim": (lambda w: w.update(q_weight=np.ones((6, 16), np.float32), k_weight=np.ones((3, 16), np.float32)),
                     "even"),
    "q-nan": (lambda w: w["q_weight"].__setitem__((0, 0), np.nan), "q_weight holds NaN"),
    "k-inf": (lambda w: w["k_weight"].__setitem__((1, 2), np.inf), "k_weight holds inf"),
    "q-text": (lambda w: w.update(q_weight=np.array([["a"] * 16] * 8)), "q_weight must be floating point"),
    "missing": (lambda w: w.pop("layer"), "lacks layer"),
    "object-array": (lambda w: w.update(q_weight=np.array([None, 1], dtype=object)), "pickled"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_probe_weights_are_one_line(tmp_path: Path, case: str) -> None:
    from runtime.llm.probe import load_probe_weights

    change, words = BAD_WEIGHTS[case]
    weights = _good_weights()
    change(weights)
    path = tmp_path / "probe_weights.npz"
    np.savez(path, **weights)
    with pytest.raises(BundleError) as err:
        load_probe_weights(path)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message, message


def _not_npz_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.npz"
    np.savez(good, **_good_weights())
    files = {"empty": b"", "text": b"not an npz file\n", "truncated": good.read_bytes()[:300]}
    out = {name: tmp_path / f"{name}.npz" for name in files}
    for name, data in files.items():
        out[name].write_bytes(data)
    out["npy"] = tmp_path / "npy.npz"
    with out["npy"].open("wb") as handle:
        np.save(handle, np.ones((8, 16), np.float32))  # an .npy array, not an archive
    out["pickle"] = tmp_path / "pickle.npz"
    out["pickle"].write_bytes(pickle.dumps({"q_weight": _Marker(tmp_path / "unpickled")}))
    return out


@pytest.mark.parametrize("case", ["empty", "text", "truncated", "npy", "pickle"])
def test_a_file_that_is_not_an_npz_archive_is_one_line(tmp_path: Path, case: str) -> None:
    from runtime.llm.probe import load_probe_weights

    path = _not_npz_files(tmp_path)[case]
    with pytest.raises(BundleError) as err:
        load_probe_weights(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    assert not (tmp_path / "unpickled").exists(), "np.load must keep allow_pickle=False"


def test_valid_probe_weights_load_and_extra_members_are_ignored(tmp_path: Path) -> None:
    from runtime.llm.probe import load_probe_weights

    path = tmp_path / "probe_weights.npz"
    np.savez(path, **_good_weights(), export_id=np.array("abc"))  # export.llm adds it
    weights = load_probe_weights(path)
    assert (weights.n_head, weights.n_head_kv, weights.layer, weights.rope_theta) == (2, 1, 1, 1e4)
    assert weights.q_weight.dtype == np.float32 and weights.q_weight.shape == (8, 16)


# ---------------------------------------------------------------- bundle helpers


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _member(bundle: Path, role: str) -> Path:
    """The bundle's file of ``role`` (``vision``, ``projector``), wherever the manifest puts it."""
    return bundle / json.loads((bundle / "manifest.json").read_text())["files"][role]


def _edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _replace(bundle: Path, role: str, model: Any) -> Path:
    """Save the ONNX ``model`` as the bundle's ``role`` file (its recorded size updated, metadata kept)."""
    import onnx

    manifest = json.loads((bundle / "manifest.json").read_text())
    path = _member(bundle, role)
    original = onnx.load(str(path), load_external_data=False)
    if not model.metadata_props:
        model.metadata_props.extend(original.metadata_props)
    onnx.save(model, str(path))
    sizes = manifest.get("sizes")
    if isinstance(sizes, dict) and manifest["files"][role] in sizes:
        sizes[manifest["files"][role]] = path.stat().st_size
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    return path


def _matmul_projector(in_dim: int, out_dim: int, fill: float = 0.01) -> Any:
    """``features [batch, tokens, in_dim] -> embeddings [batch, tokens, out_dim]`` (one MatMul)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((in_dim, out_dim), fill, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["embeddings"])], "projector",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "tokens", in_dim])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", "tokens", out_dim])],
        [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _garbage_files(tmp_path: Path) -> dict[str, Path]:
    files = {"empty": b"", "garbage": b"\x08\x07garbage" * 100, "text": b"not an onnx graph\n" * 10}
    out = {name: tmp_path / f"{name}.onnx" for name in files}
    for name, data in files.items():
        out[name].write_bytes(data)
    return out


def _one_line(err: pytest.ExceptionInfo[BundleError], *words: str) -> str:
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# ---------------------------------------------------------------- vision.onnx


@pytest.mark.parametrize("case", ["empty", "garbage", "text"])
def test_encoder_refuses_an_empty_or_garbage_graph(tmp_path: Path, case: str) -> None:
    from runtime.encoder import Encoder

    path = _garbage_files(tmp_path)[case]
    with pytest.raises(BundleError) as err:
        Encoder(path)
    _one_line(err, str(path))


def test_encoder_refuses_an_input_not_named_pixel_values(tiny_bundle: Path, tmp_path: Path) -> None:
    import onnx

    from runtime.pipeline import Pipeline

    bundle = _copy(tiny_bundle, tmp_path)
    model = onnx.load(str(_member(bundle, "vision")))
    old = model.graph.input[0].name
    model.graph.input[0].name = "image"
    for node in model.graph.node:
        node.input[:] = ["image" if name == old else name for name in node.input]
    _replace(bundle, "vision", model)
    with pytest.raises(BundleError) as err:
        Pipeline(bundle)
    _one_line(err, "vision.onnx", "'image'", "pixel_values", "python -m export.clip")


GEOMETRY: dict[str, tuple[dict[str, int], str]] = {
    "image-size": ({"image_size": 168, "grid": 12, "num_patches": 144}, "pixel_values"),
    "num-patches": ({"patch_size": 28, "grid": 12, "num_patches": 144}, "features"),
    "hidden-size": ({"hidden_size": 128, "head_dim": 32}, "features"),
    "feature-layer": ({"feature_layer": 22}, "cls_attn"),
    "heads": ({"heads": 8, "head_dim": 8}, "cls_attn"),
}


@pytest.mark.parametrize("case", sorted(GEOMETRY))
def test_encoder_refuses_a_graph_of_another_geometry(tiny_bundle: Path, tmp_path: Path, case: str) -> None:
    from runtime.pipeline import Pipeline

    changes, words = GEOMETRY[case]
    bundle = _copy(tiny_bundle, tmp_path)
    _edit_manifest(bundle, lambda m: m["vision"].update(changes))
    if "image_size" in changes:  # the preprocessing agrees with the manifest: only the graph differs
        _edit_manifest(bundle, lambda m: m["preprocess"].update(crop_size=changes["image_size"]))
    with pytest.raises(BundleError) as err:
        Pipeline(bundle)
    _one_line(err, "vision.onnx", words, "expected", "python -m export.clip")


def test_encoder_refuses_nan_outputs_at_run_time(tiny_bundle: Path, photos, tmp_path: Path, capsys) -> None:
    import onnx
    from onnx import numpy_helper

    from runtime.prune import main

    bundle = _copy(tiny_bundle, tmp_path)
    model = onnx.load(str(_member(bundle, "vision")))
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype == np.float32 and values.size > 1:
            init.CopyFrom(numpy_helper.from_array(np.full_like(values, np.nan), init.name))
    _replace(bundle, "vision", model)
    image = tmp_path / "chelsea.png"
    photos["chelsea"].save(image)
    assert main([str(image), "--model", str(bundle), "--json"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and "NaN" in err[0] and "vision.onnx" in err[0], err


# ---------------------------------------------------------------- projector.onnx


@pytest.mark.parametrize("case", ["empty", "garbage", "text"])
def test_projector_refuses_an_empty_or_garbage_graph(tmp_path: Path, case: str) -> None:
    from runtime.projector import Projector

    path = _garbage_files(tmp_path)[case]
    with pytest.raises(BundleError) as err:
        Projector(path)
    _one_line(err, str(path))


def test_projector_exposes_its_real_widths(tiny_bundle: Path) -> None:
    from runtime.pipeline import Pipeline

    pipeline = Pipeline(tiny_bundle)
    vision = pipeline.manifest.vision
    assert (pipeline.projector.in_dim, pipeline.projector.out_dim) == (vision.hidden_size, vision.projector_dim)


def test_projector_refuses_an_input_width_other_than_the_vision_hidden_size(tiny_bundle: Path) -> None:
    from runtime.bundle.manifest import load_manifest
    from runtime.projector import Projector

    vision = load_manifest(tiny_bundle).vision
    wider = dataclasses.replace(vision, hidden_size=128, head_dim=32)
    with pytest.raises(BundleError) as err:
        Projector(_member(tiny_bundle, "projector"), vision=wider)
    _one_line(err, "projector.onnx", "64", "128", "hidden_size")


def test_the_vision_graph_as_projector_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.pipeline import Pipeline

    bundle = _copy(tiny_bundle, tmp_path)
    _edit_manifest(bundle, lambda m: m["files"].update(projector=m["files"]["vision"]))
    with pytest.raises(BundleError) as err:
        Pipeline(bundle)
    _one_line(err, "'pixel_values'", "features")


def test_a_projector_of_another_output_width_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.pipeline import Pipeline

    bundle = _copy(tiny_bundle, tmp_path)
    _replace(bundle, "projector", _matmul_projector(64, 128))
    with pytest.raises(BundleError) as err:
        Pipeline(bundle)
    _one_line(err, "projector.onnx", "128", "projector_dim 64", "python -m export.clip")


def test_a_manifest_projector_dim_other_than_the_graph_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.pipeline import Pipeline

    bundle = _copy(tiny_bundle, tmp_path)
    _edit_manifest(bundle, lambda m: m["vision"].update(projector_dim=128))
    with pytest.raises(BundleError) as err:
        Pipeline(bundle)
    _one_line(err, "projector.onnx", "64", "projector_dim 128")


def test_projector_refuses_nan_outputs(tmp_path: Path) -> None:
    import onnx

    from runtime.projector import Projector

    path = tmp_path / "projector.onnx"
    onnx.save(_matmul_projector(4, 6, fill=np.nan), str(path))
    projector = Projector(path)
    assert projector.out_dim == 6
    with pytest.raises(BundleError) as err:
        projector(np.ones((3, 4), np.float32))
    _one_line(err, "projector.onnx", "NaN")


# ---------------------------------------------------------------- image paths starting with "-"


def _usage_error(main: Callable[[list[str]], int], argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_prune_says_how_to_pass_an_image_named_like_an_option(tmp_path: Path, monkeypatch, capsys) -> None:
    from runtime.prune import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "-photo.jpg").write_bytes(b"")
    line = _usage_error(main, ["-photo.jpg", "--model", "bundle"], capsys)
    assert "./-photo.jpg" in line and "after --" in line, line
    line = _usage_error(main, ["--model", "bundle", "--tokens", "x", "--", "-photo.jpg"], capsys)
    assert "./-photo.jpg" not in line, line  # after -- it is a path already


def test_chat_says_how_to_pass_an_image_named_like_an_option(tmp_path: Path, monkeypatch, capsys) -> None:
    from runtime.chat import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "-photo.jpg").write_bytes(b"")
    line = _usage_error(main, ["--model", "bundle", "--image", "-photo.jpg"], capsys)
    assert "./-photo.jpg" in line, line


@pytest.mark.parametrize("spelling", [["--", "-photo.png"], ["./-photo.png"]])
def test_prune_reads_an_image_named_like_an_option(tiny_bundle: Path, photos, tmp_path: Path, monkeypatch, capsys,
                                                    spelling: list[str]) -> None:
    from runtime.prune import main

    monkeypatch.chdir(tmp_path)
    photos["chelsea"].save(tmp_path / "-photo.png")
    assert main(["--model", str(tiny_bundle), "--tokens", "16", "--json", *spelling]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 16


def test_chat_reads_an_image_named_like_an_option(photos, tmp_path: Path, monkeypatch, capsys) -> None:
    from runtime.chat import main

    monkeypatch.chdir(tmp_path)
    photos["chelsea"].save(tmp_path / "-photo.png")
    assert main(["--model", str(tmp_path / "nowhere"), "--image", "./-photo.png", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no bundle" in err[-1], err  # the image was read; the missing bundle stopped it
