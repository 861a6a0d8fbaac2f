"""export.clip's text tower: only the CLIP the vision tower came from is exported, ``--text-tower-only``
touches nothing else, ``--no-text-tower`` writes none, and a failed text tower keeps the vision export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.clip import _keep_text_tower, main
from export.clip_source import VISION_RTOL, compare_vision, text_source
from runtime.bundle.manifest import load_manifest
from runtime.clip_text import ClipSpace
from runtime.errors import BundleError, InputError

HUB_CLIP = "openai/clip-vit-large-patch14-336"  # unreachable in tests (HF_HUB_OFFLINE=1)
TENSOR = "encoder.layers.5.mlp.fc1.weight"


def _copy(bundle: Path, tmp_path: Path, name: str = "b") -> Path:
    shutil.copytree(bundle, tmp_path / name)
    return tmp_path / name


def _vision_bytes(bundle: Path) -> dict[str, bytes]:
    """Every file of the bundle's vision export, by name."""
    return {name: (bundle / name).read_bytes() for name in load_manifest(bundle).files.values()}


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def _text_only(llava: Path, bundle: Path, *extra: str) -> int:
    return main(["--model", str(llava), "--out", str(bundle), "--text-tower-only", *extra])


@pytest.fixture(scope="module")
def clip_vision_state(tiny_clip_model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in tiny_clip_model.vision_model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compare_vision_accepts_the_storage_rounding(clip_vision_state, tiny_llava_dir: Path, dtype) -> None:
    """openai's CLIP is stored in float32, llava-hf's tower in float16: the same weights, rounded."""
    rounded = {k: torch.from_numpy(v).to(dtype).float().numpy() for k, v in clip_vision_state.items()}
    report = compare_vision(rounded, tiny_llava_dir)
    assert report["tensors"] == len(clip_vision_state) and 0 < report["max_abs_diff"]


def test_negative_control_compare_vision_refuses_other_weights(clip_vision_state, tiny_llava_dir: Path) -> None:
    other = dict(clip_vision_state, **{TENSOR: clip_vision_state[TENSOR] * (1 + 4 * VISION_RTOL)})
    with pytest.raises(InputError, match=f"vision weights differ from LLaVA's \\({TENSOR}"):
        compare_vision(other, tiny_llava_dir)
    fewer = {k: v for k, v in clip_vision_state.items() if not k.startswith("post_layernorm")}
    with pytest.raises(InputError, match="only in LLaVA \\['post_layernorm.bias'"):
        compare_vision(fewer, tiny_llava_dir)


def test_a_clip_of_other_vision_weights_is_refused_at_export(tiny_bundle: Path, tiny_llava_dir: Path,
                                                              tiny_clip_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import CLIPModel

    other = tmp_path / "other_clip"
    shutil.copytree(tiny_clip_dir, other)
    model = CLIPModel.from_pretrained(tiny_clip_dir, dtype=torch.float32)
    with torch.no_grad():
        model.vision_model.encoder.layers[5].mlp.fc1.weight.mul_(1.05)
    model.save_pretrained(other)
    bundle = _copy(tiny_bundle, tmp_path)
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _text_only(tiny_llava_dir, bundle, "--text-tower", str(other), "--force") == 2
    assert _last_line(capsys).startswith(f"export.clip: error: the CLIP checkpoint's vision weights differ "
                                         f"from LLaVA's ({TENSOR}")
    assert {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_text_tower_only_needs_force_over_an_existing_one(tiny_bundle: Path, tiny_llava_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    capsys.readouterr()
    assert _text_only(tiny_llava_dir, bundle) == 2
    last = _last_line(capsys)
    assert "already has a text tower" in last and "--force" in last
    assert (bundle / "manifest.json").read_bytes() == manifest


def test_text_tower_only_replaces_it_and_keeps_every_other_file(tiny_bundle: Path, tiny_llava_dir: Path,
                                                                tmp_path: Path) -> None:
    bundle, old = _copy(tiny_bundle, tmp_path), _copy(tiny_bundle, tmp_path, "old")
    vision, before = _vision_bytes(bundle), json.loads((bundle / "manifest.json").read_text())
    assert _text_only(tiny_llava_dir, bundle, "--force", "--no-validate") == 0
    after = json.loads((bundle / "manifest.json").read_text())
    assert _vision_bytes(bundle) == vision  # byte-identical vision files
    assert {k: v for k, v in after.items() if k != "text_tower"} == \
        {k: v for k, v in before.items() if k != "text_tower"}
    new, previous = after["text_tower"], before["text_tower"]
    assert new["export_id"] != previous["export_id"] and "text_int8" not in new["files"]
    assert [p.name for p in bundle.glob("text.*")] == [f"text.{new['export_id']}"]  # the old one removed
    # negative control: the same graph of another export (same size) is refused by its export id
    replaced = old / previous["files"]["text"]
    assert (bundle / new["files"]["text"]).stat().st_size == replaced.stat().st_size
    shutil.copyfile(bundle / new["files"]["text"], replaced)
    with pytest.raises(BundleError, match=r"is from export \S+ but the manifest records export .*--text-tower-only"):
        ClipSpace(load_manifest(old))


def test_no_text_tower_writes_none_and_text_tower_only_adds_it(tiny_llava_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "fresh"
    assert main(["--model", str(tiny_llava_dir), "--out", str(bundle), "--no-text-tower", "--no-validate"]) == 0
    manifest = load_manifest(bundle)
    assert manifest.text_tower is None and "text_tower" not in manifest.data and not list(bundle.glob("text.*"))
    assert len(manifest.data["vision_sha256"]) == 64
    vision = _vision_bytes(bundle)
    assert _text_only(tiny_llava_dir, bundle) == 0  # validated
    manifest = load_manifest(bundle)
    assert _vision_bytes(bundle) == vision and manifest.text_tower is not None
    assert all(c["ok"] for c in manifest.text_tower.validation["checks"]) and manifest.text_tower.validation["checks"]
    assert manifest.text_tower.source == str((tiny_llava_dir / "clip").resolve())
    assert ClipSpace(manifest).text("what is it?").shape == (1, manifest.text_tower.projection_dim)


def test_a_failed_text_tower_keeps_the_vision_export(tiny_llava_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "offline"
    capsys.readouterr()
    code = main(["--model", str(tiny_llava_dir), "--out", str(bundle), "--no-validate", "--text-tower", HUB_CLIP])
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert code == 2 and f"bundle written to {bundle}" in captured.out
    assert last.startswith(f"export.clip: error: the vision half of {bundle} is written, but its text tower")
    assert f"cannot download the CLIP checkpoint {HUB_CLIP}" in last
    assert f"python -m export.clip --model {tiny_llava_dir} --out {bundle} --text-tower-only" in last
    manifest = load_manifest(bundle)  # the vision export is complete
    assert manifest.text_tower is None and not list(bundle.glob("text.*"))


@pytest.mark.parametrize("recorded, match", [("0" * 64, "was exported from other vision weights"),
                                             (None, "records no fingerprint of its vision weights")])
def test_text_tower_of_a_bundle_of_other_vision_weights_is_refused(
        tiny_bundle: Path, tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        recorded: str | None, match: str) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    data.pop("vision_sha256")
    if recorded is not None:
        data["vision_sha256"] = recorded
    (bundle / "manifest.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert _text_only(tiny_llava_dir, bundle, "--force") == 2
    last = _last_line(capsys)
    assert match in last and "--force" in last


def test_text_tower_only_without_a_bundle_is_one_line(tiny_llava_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _text_only(tiny_llava_dir, tmp_path / "none") == 2
    assert _last_line(capsys).startswith(f"export.clip: error: no bundle at {tmp_path / 'none'}")


@pytest.mark.parametrize("flags", [["--no-text-tower", "--text-tower-only"], ["--no-text-tower", "--text-tower", "x"]])
def test_conflicting_flags_are_one_line(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--model", "llava-1.5-7b", *flags])
    assert info.value.code == 2 and "--no-text-tower does not go with" in _last_line(capsys)


def test_keep_text_tower_only_for_the_same_vision_weights(capsys: pytest.CaptureFixture[str]) -> None:
    text = {"export_id": "x", "vision_sha256": "a" * 64}
    same = {"source": {"model": "m"}, "vision_sha256": "a" * 64}
    _keep_text_tower({"text_tower": text}, same, Path("/b"))
    assert same["text_tower"] is text
    for new in ({"source": {"model": "m"}, "vision_sha256": "b" * 64}, {"source": {"model": "m"}}):  # dinov2: none
        capsys.readouterr()
        _keep_text_tower({"text_tower": text}, new, Path("/b"))
        assert "text_tower" not in new
        assert "--model m --out /b --text-tower-only" in capsys.readouterr().err


def test_text_source_defaults(tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert text_source("llava-1.5-7b", HUB_CLIP, tmp_path, None) == HUB_CLIP
    assert text_source("m", None, tiny_llava_dir, None) == str(tiny_llava_dir / "clip")
    assert text_source("m", HUB_CLIP, tmp_path, "/my/clip") == "/my/clip"
    capsys.readouterr()
    assert text_source("m", None, tmp_path, None) is None
    note = capsys.readouterr().err
    assert "cdpruner will be unavailable" in note and "--text-tower-only" in note


def test_registry_names_the_clip_of_each_alias() -> None:
    from runtime.model_registry import known_aliases, load_spec

    assert {alias: load_spec(alias).clip for alias in known_aliases() if alias.startswith("llava-1.5")} == {
        "llava-1.5-7b": HUB_CLIP, "llava-1.5-13b": HUB_CLIP}


@pytest.mark.slow
def test_a_vision_reexport_keeps_the_text_tower_of_the_same_weights(tiny_bundle: Path, tiny_llava_dir: Path,
                                                                    tmp_path: Path) -> None:
    from export.clip import export_clip

    bundle = _copy(tiny_bundle, tmp_path)
    old = load_manifest(bundle)
    export_clip(str(tiny_llava_dir), bundle, validate=False, force=True, no_text_tower=True)
    manifest = load_manifest(bundle)
    assert manifest.export_id != old.export_id and manifest.text_tower == old.text_tower
    assert ClipSpace(manifest).text("?").shape == (1, old.text_tower.projection_dim)
