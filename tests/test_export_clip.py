"""export.clip: ONNX graphs equal the Hugging Face model; the bundle is complete; errors are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.clip import main
from export.load import VisionHalf
from export.reference.vision import check_outputs
from export.validate import hf_vision_reference, run_onnx, validation_inputs
from runtime.bundle.manifest import EXPORT_ID_KEY, SCHEMA, load_manifest
from tests.bundle_files import member

# acceptance bound of the export issue: float32 ORT vs PyTorch on identical inputs
MAX_ABS = 1e-4
F = 23  # LLaVA-1.5: vision_feature_layer=-2 of 24 blocks


@pytest.fixture(scope="module")
def pixels() -> dict[str, np.ndarray]:
    cases = validation_inputs(336)
    return {"b1": cases["pattern-b1"], "b3": cases["noise-b3"]}


@pytest.mark.parametrize("case", ["b1", "b3"])
def test_vision_onnx_equals_hf(tiny_bundle: Path, tiny_llava_model, pixels, case: str) -> None:
    expected = hf_vision_reference(VisionHalf.of(tiny_llava_model), torch.from_numpy(pixels[case]), F)
    actual = run_onnx(member(tiny_bundle, "vision"), {"pixel_values": pixels[case]})
    assert sorted(actual) == sorted(expected)  # names first
    for name, ref in expected.items():
        assert actual[name].shape == ref.shape, name  # then shapes
        np.testing.assert_allclose(actual[name], ref, rtol=0, atol=MAX_ABS, err_msg=name)  # then values


@pytest.mark.parametrize("wrong_layer", [F - 1, F + 1])
def test_negative_control_neighbouring_block_fails(
    tiny_bundle: Path, tiny_llava_model, pixels, wrong_layer: int
) -> None:
    """The features of block f±1 must not pass the same check (the test can fail)."""
    with torch.no_grad():
        out = tiny_llava_model.model.vision_tower(torch.from_numpy(pixels["b1"]), output_hidden_states=True)
    wrong = out.hidden_states[wrong_layer][:, 1:].numpy()
    actual = run_onnx(member(tiny_bundle, "vision"), {"pixel_values": pixels["b1"]})["features"]
    assert np.abs(actual - wrong).max() > 100 * MAX_ABS


def test_projector_onnx_equals_hf(tiny_bundle: Path, tiny_llava_model) -> None:
    features = np.random.default_rng(1).standard_normal((2, 37, 64)).astype(np.float32)
    with torch.no_grad():
        ref = tiny_llava_model.model.multi_modal_projector(torch.from_numpy(features)).numpy()
        proj = tiny_llava_model.model.multi_modal_projector
        tanh = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(torch.from_numpy(features)), approximate="tanh"))
    got = run_onnx(member(tiny_bundle, "projector"), {"features": features})["embeddings"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=MAX_ABS)
    # negative control: the tanh approximation of GELU is a different function here
    assert np.abs(got - tanh.numpy()).max() > MAX_ABS


def test_projector_of_features_equals_get_image_features(tiny_bundle: Path, tiny_llava_model, pixels) -> None:
    with torch.no_grad():
        ref = tiny_llava_model.model.get_image_features(
            pixel_values=torch.from_numpy(pixels["b1"]), vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    ref = ref.pooler_output[0] if hasattr(ref, "pooler_output") else ref[0]
    features = run_onnx(member(tiny_bundle, "vision"), {"pixel_values": pixels["b1"]})["features"]
    got = run_onnx(member(tiny_bundle, "projector"), {"features": features})["embeddings"][0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=MAX_ABS)


def test_graph_has_no_square_map_and_ends_at_block_f(tiny_bundle: Path) -> None:
    model = onnx.load(str(member(tiny_bundle, "vision")), load_external_data=False)
    n = 576
    for output in model.graph.output:
        dims = [d.dim_value for d in output.type.tensor_type.shape.dim]
        assert dims.count(n) + dims.count(n + 1) <= 1, f"{output.name} looks like an N×N map: {dims}"
    assert [o.name for o in model.graph.output] == ["features", "cls_attn", "keys"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "batch axis must be dynamic"
    names = [i.name for i in model.graph.initializer]
    blocks = {int(name.split(".")[1]) for name in names if name.startswith("blocks.")}
    assert blocks == set(range(F)), f"graph must hold blocks 0..{F - 1} only, found {sorted(blocks)}"
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    assert len(softmaxes) == F


def test_transformers_still_returns_attentions_and_hidden_states(tiny_llava_model) -> None:
    """Guard: if a transformers upgrade stops returning them, this fails loudly."""
    with torch.no_grad():
        out = tiny_llava_model.model.vision_tower(torch.zeros(1, 3, 336, 336), output_attentions=True,
                                                  output_hidden_states=True)
    check_outputs(out, F)
    assert len(out.attentions) == 24 and len(out.hidden_states) == 25
    assert out.attentions[0].shape == (1, 4, 577, 577)

    class Empty:
        attentions = None
        hidden_states = None

    with pytest.raises(RuntimeError, match="did not return CLIP attentions"):
        check_outputs(Empty(), F)


def test_bundle_is_complete(tiny_bundle: Path) -> None:
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    assert data["schema"] == SCHEMA
    for key in ("source", "libraries", "opset", "files", "io", "vision", "preprocess", "chat_template",
                "pruning", "validation", "entropyprune_layer"):
        assert key in data, key
    assert data["vision"] == {"num_layers": 24, "feature_layer": F, "heads": 4, "hidden_size": 64, "head_dim": 16,
                              "patch_size": 14, "image_size": 336, "grid": 24, "num_patches": 576, "projector_dim": 64}
    outputs = {o["name"]: o for o in data["io"]["vision"]["outputs"]}
    assert outputs["cls_attn"]["shape"][1:] == [F, 4, 576] and outputs["cls_attn"]["dtype"] == "float32"
    checks = data["validation"]["checks"]
    assert checks and all(c["ok"] for c in checks)
    assert {c["output"] for c in checks} == {"features", "cls_attn", "keys", "embeddings"}
    assert data["validation"]["int8"]["feature_cosine"] > 0.99
    assert data["preprocess"]["mode"] == "pad" and data["pruning"]["p_shallow"] == 0.4
    manifest = load_manifest(tiny_bundle)
    assert manifest.files["vision_int8"] == f"vision.{manifest.export_id}/vision.int8.onnx"
    for role in ("vision", "projector", "vision_int8"):  # every graph carries the export id
        props = onnx.load(str(member(tiny_bundle, role)), load_external_data=False).metadata_props
        assert {p.key: p.value for p in props}[EXPORT_ID_KEY] == manifest.export_id, role
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.startswith(".")], "staging left behind"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


def test_unknown_alias_lists_known_ones(capsys) -> None:
    assert main(["--model", "llava-9b"]) == 2
    line = _error_line(capsys)
    assert "unknown model 'llava-9b'" in line and "llava-1.5-7b" in line and "llava-1.5-13b" in line


def test_unreadable_path(tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tmp_path / "nothing-here")]) == 2
    assert "cannot read a Hugging Face LLaVA checkpoint" in _error_line(capsys)


def test_a_clip_checkpoint_alone_is_not_a_llava(tiny_clip_dir: Path, tiny_llava_dir: Path, tmp_path: Path,
                                                capsys) -> None:
    """A CLIPModel's config has a vision_config too, and CLIP is a registered vision family."""
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    shutil.copy(tiny_llava_dir / "processor_config.json", clip)  # real CLIP checkpoints ship a processor config
    assert main(["--model", str(clip), "--out", str(tmp_path / "b")]) == 2
    line = _error_line(capsys)
    assert "is not a LLaVA checkpoint (config.json model_type 'clip')" in line, line
    assert not (tmp_path / "b").exists()


def test_existing_out_needs_force(tmp_path: Path, tiny_llava_dir: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["--model", str(tiny_llava_dir), "--out", str(tmp_path)]) == 2
    assert "--force" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_offline_hub_is_one_actionable_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["--model", "llava-1.5-7b", "--out", str(tmp_path / "b")]) == 2
    line = _error_line(capsys)
    assert "llava-hf/llava-1.5-7b-hf" in line and "--model /path/to/" in line
