"""export.clip on a LLaVA-NeXT (1.6 anyres) checkpoint: the same CLIP tower and projector graphs,
``image_newline.npz``, the manifest's ``family``/``anyres``, and per-tile equality with Hugging Face's
``LlavaNextModel.get_image_features``; LLaVA-1.5 bundles only gain ``"family": "llava-1.5"``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from export.clip import main
from export.llava_next import unpack
from runtime.bundle.manifest import load_manifest
from runtime.errors import BundleError
from runtime.llm.bundle import checked_npz
from runtime.model_registry import ModelSpec, known_aliases, load_spec
from runtime.preprocess import PreprocessConfig
from tests.bundle_files import member

MAX_ABS = 1e-4  # acceptance bound of the export: float32 ORT vs PyTorch on identical inputs
F = 23  # vision_feature_layer=-2 of 24 blocks
GRID = 24  # 336 / 14 patches per side
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-hf v1.6, (h, w)
LLAVA_15_KEYS = {"schema", "source", "family", "libraries", "opset", "files", "io", "vision", "preprocess",
                 "chat_template", "image_token_index", "pruning", "entropyprune_layer", "validation",
                 "vision_sha256", "export_id", "sizes", "sha256", "text_tower"}


@pytest.fixture(scope="module")
def photo_tiles(tiny_next_dir: Path, tiny_next_model, photos) -> dict[str, Any]:
    """HF's processor and get_image_features on a 451x300 photo: a grid with unpadded columns."""
    from transformers import AutoProcessor

    inputs = AutoProcessor.from_pretrained(tiny_next_dir).image_processor(images=photos["chelsea"],
                                                                          return_tensors="pt")
    with torch.no_grad():
        out = tiny_next_model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"], output_hidden_states=True)
    return {"pixels": inputs["pixel_values"][0].numpy(), "image_sizes": inputs["image_sizes"],
            "hidden_states": [h.numpy() for h in out.hidden_states], "packed": out.pooler_output[0].numpy()}


def test_hf_loads_the_tiny_checkpoint(tiny_next_dir: Path, tiny_next_model) -> None:
    from transformers import AutoProcessor, LlavaNextProcessor

    config = tiny_next_model.config
    assert config.model_type == "llava_next" and config.image_grid_pinpoints == PINPOINTS
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert (config.vision_config.num_hidden_layers, config.vision_config.hidden_size) == (24, 64)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    newline = tiny_next_model.model.image_newline.detach().numpy()
    assert newline.shape == (64,) and 0.5 < np.abs(newline).mean() < 2.0  # O(1), never zero
    processor = AutoProcessor.from_pretrained(tiny_next_dir)
    assert isinstance(processor, LlavaNextProcessor)
    image_processor = processor.image_processor
    assert type(image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert (image_processor.size["shortest_edge"], image_processor.crop_size["height"]) == (336, 336)
    assert (tiny_next_dir / "clip" / "config.json").is_file()


def test_manifest_records_family_anyres_and_image_newline(tiny_next_bundle: Path) -> None:
    data = json.loads((tiny_next_bundle / "manifest.json").read_text())
    assert data["family"] == "llava-next"
    assert data["anyres"] == {"image_grid_pinpoints": PINPOINTS, "crop_size": 336, "patch_size": 14,
                              "shortest_edge": 336}
    name = data["files"]["image_newline"]
    assert name == f"vision.{data['export_id']}/image_newline.npz"
    assert data["sizes"][name] == (tiny_next_bundle / name).stat().st_size and len(data["sha256"][name]) == 64
    config = PreprocessConfig(**data["preprocess"])
    assert (config.crop_size, config.image_size, config.mode) == (336, 336, "crop")
    anyres = [c for c in data["validation"]["checks"] if c["case"].startswith("anyres")]
    assert len(anyres) == 2 * 5 + 1 and all(c["ok"] for c in anyres)  # 5 tiles x (features, embeddings) + newline
    assert [c["max_abs_diff"] for c in anyres if c["output"] == "image_newline"] == [0.0]
    manifest = load_manifest(tiny_next_bundle)  # the runtime accepts it as it is
    assert manifest.files["image_newline"] == name and manifest.text_tower is not None


def test_image_newline_npz_equals_hf(tiny_next_bundle: Path, tiny_next_model) -> None:
    with np.load(member(tiny_next_bundle, "image_newline"), allow_pickle=False) as data:
        assert sorted(data.files) == ["export_id", "image_newline"]
        newline, export_id = data["image_newline"], data["export_id"]
    assert newline.dtype == np.float32 and newline.shape == (64,)
    np.testing.assert_array_equal(newline, tiny_next_model.model.image_newline.detach().numpy())
    assert export_id.shape == () and str(export_id) == load_manifest(tiny_next_bundle).export_id


def test_onnx_tiles_equal_hf_per_tile(tiny_next_bundle: Path, photo_tiles) -> None:
    from export.validate import run_onnx

    expected = photo_tiles["hidden_states"][F][:, 1:]
    got = run_onnx(member(tiny_next_bundle, "vision"), {"pixel_values": photo_tiles["pixels"]})
    assert sorted(got) == ["cls_attn", "features", "keys"]
    assert got["features"].shape == expected.shape and expected.shape[0] > 2
    for t in range(expected.shape[0]):
        np.testing.assert_allclose(got["features"][t], expected[t], rtol=0, atol=MAX_ABS, err_msg=f"tile {t}")


def test_projected_tiles_packed_with_the_exported_newline_equal_hf(tiny_next_bundle: Path, tiny_next_model,
                                                                    photo_tiles) -> None:
    from export.validate import run_onnx

    features = run_onnx(member(tiny_next_bundle, "vision"), {"pixel_values": photo_tiles["pixels"]})["features"]
    embeddings = run_onnx(member(tiny_next_bundle, "projector"), {"features": features})["embeddings"]
    with np.load(member(tiny_next_bundle, "image_newline")) as data:
        newline = torch.from_numpy(data["image_newline"])
    with torch.no_grad():
        packed, _ = tiny_next_model.model.pack_image_features(
            [torch.from_numpy(embeddings)], photo_tiles["image_sizes"], "default", image_newline=newline
        )
    assert packed[0].shape == photo_tiles["packed"].shape
    np.testing.assert_allclose(packed[0].numpy(), photo_tiles["packed"], rtol=0, atol=MAX_ABS)


@pytest.mark.parametrize("wrong_layer", [F - 1, F + 1])
def test_negative_control_neighbouring_block_fails_per_tile(tiny_next_bundle: Path, photo_tiles,
                                                            wrong_layer: int) -> None:
    from export.validate import run_onnx

    got = run_onnx(member(tiny_next_bundle, "vision"), {"pixel_values": photo_tiles["pixels"]})["features"]
    wrong = photo_tiles["hidden_states"][wrong_layer][:, 1:]
    for t in range(wrong.shape[0]):
        assert np.abs(got[t] - wrong[t]).max() > 100 * MAX_ABS, f"tile {t}"


def test_negative_control_newline_of_another_export_is_refused(tiny_next_bundle: Path) -> None:
    data = json.loads((tiny_next_bundle / "manifest.json").read_text())
    name = data["files"]["image_newline"]
    args = (tiny_next_bundle, name, "image_newline", data["sizes"][name])
    assert checked_npz(*args, data["export_id"], data, "export.clip") == tiny_next_bundle / name
    with pytest.raises(BundleError, match=f"is from export {data['export_id']} but the manifest records export "
                                          "20000101T000000Z-000000"):
        checked_npz(*args, "20000101T000000Z-000000", data, "export.clip")


def test_unpack_hand_case_and_hf_round_trip(tiny_next_model) -> None:
    packed = np.array([[0.0], [1.0], [2.0], [9.0]], dtype=np.float32)  # base, tile 1, tile 2, newline
    tiles, newline = unpack(packed, gh=1, gw=2, grid=1)
    np.testing.assert_array_equal(tiles, [[[0.0]], [[1.0]], [[2.0]]])
    np.testing.assert_array_equal(newline, [[9.0]])
    rng = np.random.default_rng(3)
    tiles = rng.standard_normal((5, GRID * GRID, 64)).astype(np.float32)
    newline = tiny_next_model.model.image_newline.detach()
    with torch.no_grad():  # a 672x672 image: the 2x2 grid, nothing unpadded
        hf, _ = tiny_next_model.model.pack_image_features([torch.from_numpy(tiles)], torch.tensor([[672, 672]]),
                                                     "default", image_newline=newline)
    got, rows = unpack(hf[0].numpy(), 2, 2, GRID)
    np.testing.assert_array_equal(got, tiles)
    np.testing.assert_array_equal(rows, np.broadcast_to(newline.numpy(), (2 * GRID, 64)))
    with pytest.raises(RuntimeError, match="has pack_image_features changed"):
        unpack(hf[0].numpy(), 2, 1, GRID)


def test_llava_15_bundle_unchanged_apart_from_family(tiny_bundle: Path) -> None:
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(data) == LLAVA_15_KEYS and data["family"] == "llava-1.5"
    assert "image_newline" not in data["files"] and data["preprocess"]["mode"] == "pad"
    assert not [c for c in data["validation"]["checks"] if c["case"].startswith("anyres")]


def test_registry_family() -> None:
    assert {a: load_spec(a).family for a in known_aliases()} == {
        "llava-1.5-7b": "llava-1.5", "llava-1.5-13b": "llava-1.5",
        "llava-v1.6-vicuna-7b": "llava-next", "llava-v1.6-mistral-7b": "llava-next"}
    vicuna, mistral = load_spec("llava-v1.6-vicuna-7b"), load_spec("llava-v1.6-mistral-7b")
    assert (vicuna.repo_id, vicuna.chat_template, vicuna.image_mode) == (
        "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-1.5", "crop")
    assert (mistral.repo_id, mistral.chat_template) == ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral-instruct")
    assert vicuna.clip == mistral.clip == "openai/clip-vit-large-patch14-336"
    text = (Path(__file__).resolve().parents[1] / "models" / "llava-1.5-7b.json").read_text()
    spec = {k: v for k, v in json.loads(text).items() if k != "family"}
    assert ModelSpec.from_json(spec).family == "llava-1.5"  # specs without the field are LLaVA-1.5
    with pytest.raises(ValueError, match="family must be one of"):
        ModelSpec.from_json({**spec, "family": "llava-2"})
    with pytest.raises(ValueError, match="image_mode must be 'crop'"):
        ModelSpec.from_json({**spec, "family": "llava-next", "image_mode": "pad"})


def test_family_mismatch_is_one_line(tiny_next_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import export.load
    from export.load import ResolvedModel

    monkeypatch.setattr(export.load, "resolve_model",
                        lambda model: ResolvedModel(tiny_next_dir, load_spec("llava-1.5-7b"), model))
    assert main(["--model", "llava-1.5-7b", "--out", str(tmp_path / "b")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a llava-next checkpoint" in line and "registered as llava-1.5" in line
    assert not (tmp_path / "b").exists()


def test_make_tiny_llava_family_flag(tmp_path: Path, capsys) -> None:
    from tools.make_tiny_llava import main as make_tiny

    for argv, message in ((["--family", "llava-next", "--shape", "llava-1.5-7b"], "--shape writes llava-1.5"),
                          (["--family", "llava-2"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_info:
            make_tiny([str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert not (tmp_path / "out").exists()
