"""The runtime refuses bundle files that lead outside the bundle or belong to another export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.errors import BundleError
from tests.bundle_files import member


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


def _edit(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("name", "words"), [("../x.onnx", "leads outside the bundle"),
                                              ("/etc/passwd", "not a name inside the bundle"),
                                              ("sub/../../y.onnx", "leads outside the bundle")])
def test_manifest_paths_outside_the_bundle_are_refused(tiny_bundle: Path, tmp_path: Path, name: str,
                                                       words: str) -> None:
    from runtime.bundle.manifest import load_manifest

    bundle = _copy(tiny_bundle, tmp_path)
    (tmp_path / "x.onnx").write_bytes(member(bundle, "vision").read_bytes())  # exists: must not matter
    _edit(bundle, lambda m: m["files"].update(vision=name))
    with pytest.raises(BundleError, match=words):
        load_manifest(bundle)


def test_a_file_of_another_export_is_refused_with_the_repair_command(tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.bundle.manifest import load_manifest

    bundle = _copy(tiny_bundle, tmp_path)
    load_manifest(bundle)  # as exported: fine
    with member(bundle, "projector").open("ab") as handle:
        handle.write(b"\0" * 16)  # another export's graph: another size
    with pytest.raises(BundleError) as err:
        load_manifest(bundle)
    message = str(err.value)
    assert "projector.onnx is" in message and "another export" in message
    assert "python -m export.clip --model" in message and "--force" in message and "\n" not in message


@pytest.mark.llm
def test_llm_gguf_outside_or_of_another_size_is_refused(tiny_llm_bundle: Path, tmp_path: Path) -> None:
    from runtime.llm.bundle import open_language_model

    bundle = _copy(tiny_llm_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    outside = dict(manifest, llm={**manifest["llm"], "gguf": "../../w.gguf"})
    with pytest.raises(BundleError, match="leads outside the bundle"):
        open_language_model(bundle, outside)
    resized = dict(manifest, llm={**manifest["llm"], "size": manifest["llm"]["size"] + 1})
    with pytest.raises(BundleError, match="python -m export.llm --model .* --force"):
        open_language_model(bundle, resized)
    open_language_model(bundle, manifest, n_ctx=64).close()  # as exported: loads


@pytest.mark.parametrize(("change", "words"), [
    (lambda m: m.update(files=["vision.onnx"]), "AttributeError"),
    (lambda m: m.update(files="vision.onnx"), "AttributeError"),
    (lambda m: m["vision"].update(projector_dim="abc"), "projector_dim must be a positive integer"),
    (lambda m: m["vision"].update(num_patches=1000), "geometry does not add up"),
    (lambda m: m.update(llm="llm.gguf"), "llm must be an object"),
    (lambda m: m.update(llm={"gguf": 3}), "llm: unknown fields|llm: missing fields"),
    (lambda m: m["preprocess"].update(image_std=[0, 1, 1]), "preprocess.image_std must be > 0"),
    (lambda m: m["preprocess"].update(bogus=1), "preprocess: got an unexpected keyword argument 'bogus'"),
    (lambda m: m["preprocess"].update(crop_size=0), "preprocess.crop_size must be an integer >= 1"),
    (lambda m: m["preprocess"].update(crop_size=300), "crop_size 300 is not the encoder's input side"),
    (lambda m: m["preprocess"].update(image_mean=[2, 2, 2]), r"image_mean must lie in \[0, 1\]"),
])
def test_malformed_manifest_fields_are_one_line(tiny_bundle: Path, tmp_path: Path, change, words: str) -> None:
    from runtime.bundle.manifest import load_manifest

    bundle = _copy(tiny_bundle, tmp_path)
    _edit(bundle, change)
    with pytest.raises(BundleError, match=words) as err:
        load_manifest(bundle)
    assert "\n" not in str(err.value)


def test_deeply_nested_manifest_is_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.bundle.manifest import load_manifest

    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deeply"):
        load_manifest(bundle)


@pytest.mark.parametrize("opset", ["5", "99", "-1"])
def test_export_clip_refuses_opsets_it_cannot_write(opset: str, capsys: pytest.CaptureFixture[str]) -> None:
    from export.clip import main

    with pytest.raises(SystemExit) as stop:
        main(["--model", "llava-1.5-7b", "--opset", opset])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "must be in 18..23" in err and len(err.splitlines()) == 1


def test_remote_code_in_a_checkpoint_is_said_to_be_ignored(tiny_llava_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from export.clip import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.Model"}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert main(["--model", str(ckpt), "--out", str(tmp_path / "bundle"), "--no-validate"]) == 0
    assert "auto_map" in capsys.readouterr().err


@pytest.mark.llm
def test_probe_files_outside_or_of_another_size_are_refused(tiny_llm_bundle: Path, tmp_path: Path) -> None:
    from runtime.llm.probe import open_probe

    bundle = _copy(tiny_llm_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    probe = manifest["llm"]["probe"]
    for change, words in (({"gguf": "../p.gguf"}, "leads outside the bundle"),
                          ({"weights_size": probe["weights_size"] - 1}, "another export")):
        edited = dict(manifest, llm={**manifest["llm"], "probe": {**probe, **change}})
        with pytest.raises(BundleError, match=words):
            open_probe(bundle, edited)
    open_probe(bundle, manifest, n_ctx=64).close()


@pytest.mark.llm
@pytest.mark.parametrize(("change", "words"), [
    ({"gguf": 3}, "llm.gguf must be a non-empty string, got 3"),
    ({"probe": ["probe.gguf"]}, "llm.probe must be an object, got list"),
    ({"registered": "no"}, "llm.registered must be true or false"),
    ({"n_embd": -64}, "llm.n_embd must be an integer >= 0"),
    ({"extra": 1}, r"llm: unknown fields \['extra'\]"),
])
def test_the_language_model_entry_is_typed(tiny_llm_bundle: Path, change: dict, words: str) -> None:
    from runtime.bundle.manifest import load_manifest
    from runtime.llm.bundle import open_language_model
    from runtime.llm.probe import open_probe

    manifest = json.loads((tiny_llm_bundle / "manifest.json").read_text())
    edited = dict(manifest, llm={**manifest["llm"], **change})
    for opener in (open_language_model, open_probe):
        with pytest.raises(BundleError, match=words + ".*python -m export.llm"):
            opener(tiny_llm_bundle, edited)
    without = {k: v for k, v in manifest["llm"].items() if k != "probe"}
    with pytest.raises(BundleError, match=r"llm: missing fields \['probe'\]"):
        open_language_model(tiny_llm_bundle, dict(manifest, llm=without))
    assert load_manifest(tiny_llm_bundle).llm is not None  # the bundle itself was not touched
