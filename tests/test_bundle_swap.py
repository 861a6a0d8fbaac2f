"""A bundle changes all or nothing: a kill -9 at any moment of an export leaves the old bundle or
the new one, a second writer is refused, nothing of a replaced export stays behind, and the
runtime refuses a file whose export id is not the manifest's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

import export.bundle_writer as bundle_writer
from export.bundle_writer import LOCK
from runtime.bundle.manifest import load_manifest
from runtime.errors import BundleError, InputError
from tests.bundle_files import member


def _copy(bundle: Path, tmp_path: Path, name: str = "b") -> Path:
    out = tmp_path / name
    shutil.copytree(bundle, out)
    return out


def _killed_at(point: str, run) -> int:
    """Run ``run()`` in a forked child that dies by ``os._exit(137)`` (as under kill -9: no
    ``finally``, no cleanup) when it reaches ``point`` of the bundle update; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real_stamp, real_write, real_remove = (bundle_writer.stamp_onnx, bundle_writer.write_json_atomic,
                                                   bundle_writer.remove_unreferenced)
            calls = {"remove": 0}

            def stamp(path, export_id):
                real_stamp(path, export_id)
                if point == "staging":  # half the new files written and stamped
                    os._exit(137)

            def write(path, obj):
                if point == "before-commit":
                    os._exit(137)
                real_write(path, obj)

            def remove(out, manifest):
                calls["remove"] += 1
                if point == "after-commit" and calls["remove"] == 2:  # the commit's clean-up, not the entry's
                    os._exit(137)
                return real_remove(out, manifest)

            bundle_writer.stamp_onnx, bundle_writer.write_json_atomic = stamp, write
            bundle_writer.remove_unreferenced = remove
            import export.clip

            export.clip.stamp_onnx = stamp
            run()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a child must never return into pytest
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("point", [pytest.param("staging", marks=pytest.mark.slow), "before-commit",
                                   pytest.param("after-commit", marks=pytest.mark.slow)])
def test_a_kill_during_export_clip_force_leaves_the_old_or_the_new_bundle(
    tiny_bundle: Path, tiny_llava_dir: Path, tmp_path: Path, point: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.clip import export_clip

    bundle = _copy(tiny_bundle, tmp_path)
    old = load_manifest(bundle)
    old_files = {name: (bundle / name).read_bytes() for name in old.files.values()}
    code = _killed_at(point, lambda: export_clip(str(tiny_llava_dir), bundle, validate=False, force=True))
    assert code == 137
    after = load_manifest(bundle)  # loads: the old bundle or the new one, never a mix
    if point == "after-commit":
        assert after.export_id != old.export_id and "vision_int8" not in after.files  # the new one
    else:
        assert after.export_id == old.export_id  # the old one, every file as it was
        assert {name: (bundle / name).read_bytes() for name in after.files.values()} == old_files
    assert len(list(bundle.glob("vision.*"))) == 2  # the kill left a staging or an old folder behind
    # The next export into the bundle first removes what the killed one left, and says so.
    capsys.readouterr()
    with bundle_writer.bundle_update(bundle, "vision") as update:
        assert sorted(p.name for p in bundle.glob("vision.*")) == sorted([f"vision.{after.export_id}",
                                                                         update.folder.name])
    assert "no longer part of the bundle" in capsys.readouterr().err
    assert [p.name for p in bundle.glob("vision.*")] == [f"vision.{after.export_id}"]  # nothing committed


@pytest.mark.llm
def test_force_without_int8_removes_the_old_int8_graph_and_keeps_the_language_model(
    tiny_llm_bundle: Path, tiny_llava_dir: Path, tmp_path: Path
) -> None:
    from export.clip import export_clip

    bundle = _copy(tiny_llm_bundle, tmp_path)
    old_int8, old_llm = member(bundle, "vision_int8"), load_manifest(bundle).llm
    export_clip(str(tiny_llava_dir), bundle, validate=False, force=True)
    manifest = load_manifest(bundle)
    assert "vision_int8" not in manifest.files and not old_int8.exists()
    assert not list(bundle.rglob("vision.int8.onnx*"))  # nothing left for --int8 to pick up
    with pytest.raises(BundleError, match="no vision_int8 file"):
        manifest.path("vision_int8")
    assert manifest.llm == old_llm and member(bundle, "llm").is_file()  # the same model: kept


@pytest.mark.llm
@pytest.mark.slow
def test_export_clip_of_another_model_drops_the_language_model(tiny_llm_bundle: Path, tiny_llava_dir: Path,
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from export.clip import export_clip

    other = _copy(tiny_llm_bundle, tmp_path, "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"]["model"] = "/elsewhere/another-llava"  # as if exported from another checkpoint
    (other / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    export_clip(str(tiny_llava_dir), other, validate=False, force=True)
    assert "exported for another model; it is removed" in capsys.readouterr().err
    assert load_manifest(other).llm is None and not list(other.glob("llm.*"))


@pytest.mark.parametrize("exporter", ["export.clip", "export.llm"])
def test_a_second_writer_is_refused_with_one_line(exporter: str, tiny_bundle: Path, tiny_llava_dir: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    bundle = _copy(tiny_bundle, tmp_path)
    before = sorted(p.name for p in bundle.rglob("*"))
    with FileLock(bundle / LOCK, timeout=0):  # another export holds the bundle
        code = importlib.import_module(exporter).main(
            ["--model", str(tiny_llava_dir), "--out", str(bundle), "--force", *(["--quant", "f32"] * (
                exporter == "export.llm"))])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines: one error line
    assert code == 2 and last.startswith(f"{exporter}: error: another export is writing")
    assert sorted(p.name for p in bundle.rglob("*")) == before  # nothing written


@pytest.mark.llm
@pytest.mark.parametrize("role", ["llm", "probe", "probe_weights"])
def test_a_language_model_file_of_another_export_is_refused(role: str, tiny_llm_bundle: Path, tiny_llava_dir: Path,
                                                             tmp_path: Path) -> None:
    """Same size, same model, another export: only the export id tells them apart."""
    from export.llm import export_llm
    from runtime.llm.bundle import open_language_model
    from runtime.llm.probe import open_probe

    bundle, other = _copy(tiny_llm_bundle, tmp_path, "b"), _copy(tiny_llm_bundle, tmp_path, "other")
    export_llm(str(tiny_llava_dir), quant="f32", out=other, force=True)
    assert member(other, role).stat().st_size == member(bundle, role).stat().st_size
    shutil.copyfile(member(other, role), member(bundle, role))
    manifest = json.loads((bundle / "manifest.json").read_text())
    opener = open_language_model if role == "llm" else open_probe
    with pytest.raises(BundleError, match=r"is from export \S+ but the manifest records export .*python -m export.llm"):
        opener(bundle, manifest, n_ctx=64)


def test_bundle_update_refuses_an_unknown_half(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="half must be one of"), bundle_writer.bundle_update(tmp_path, "other"):
        pass
    with pytest.raises(InputError, match="another export is writing"), FileLock(tmp_path / LOCK, timeout=0), \
            bundle_writer.bundle_update(tmp_path, "vision"):
        pass


@pytest.fixture(scope="module")
def other_export(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second export of the tiny checkpoint (another export id, files of the same sizes); its text
    tower is not needed (tests/test_text_export.py checks the text graphs' export ids)."""
    from export.clip import export_clip

    out = tmp_path_factory.mktemp("other_export") / "bundle"
    export_clip(str(tiny_llava_dir), out, int8=True, validate=False, no_text_tower=True)
    return out


@pytest.mark.parametrize("role", ["vision", "projector", "vision_int8"])
def test_a_graph_of_another_export_is_refused(role: str, tiny_bundle: Path, other_export: Path,
                                              tmp_path: Path) -> None:
    """Same checkpoint, same size, another export: the graph's metadata_props tell them apart."""
    from runtime.pipeline import Pipeline

    bundle, other = _copy(tiny_bundle, tmp_path, "b"), other_export
    Pipeline(bundle, int8=role == "vision_int8")  # as exported: loads
    assert member(other, role).stat().st_size == member(bundle, role).stat().st_size
    shutil.copyfile(member(other, role), member(bundle, role))
    another = r"is from export \S+ but the manifest records export .*python -m export.clip"
    with pytest.raises(BundleError, match=another):
        Pipeline(bundle, int8=role == "vision_int8")


@pytest.mark.llm
def test_prune_check_hashes_every_file(tiny_llm_bundle: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``runtime.prune --check`` finds a GGUF with one byte changed in place (same size, same id)."""
    from runtime.prune import main

    bundle = _copy(tiny_llm_bundle, tmp_path)
    from runtime.bundle.check import recorded_files

    assert main(["--check", "--model", str(bundle)]) == 0
    out = capsys.readouterr().out
    count = len(recorded_files(load_manifest(bundle)))  # vision, text tower, language model and probes
    assert count >= 10 and f"all {count} files are as exported" in out and "✗" not in out
    gguf = member(bundle, "llm")
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF  # a weight byte: header (and so the export id) untouched
    gguf.write_bytes(bytes(data))
    assert main(["--check", "--model", str(bundle)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert f"{load_manifest(bundle).llm.gguf} (changed)" in err and "python -m export.llm" in err
    assert "✗" in captured.out
    assert main(["--model", str(bundle)]) == 2  # no image and no --check
    assert "give an IMAGE" in capsys.readouterr().err


def test_an_unreadable_manifest_removes_nothing_until_the_new_one_commits(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "llm.20261203T000000Z-abcdef"
    old.mkdir()
    (old / "llm-q4_k_m.gguf").write_bytes(b"g" * 10)
    (tmp_path / "manifest.json").write_text("{not json")
    with bundle_writer.bundle_update(tmp_path, "vision") as update:
        assert old.is_dir()  # unknown whether the manifest names it: kept
        (update.folder / "vision.onnx").write_bytes(b"v")
        update.commit({"files": {"vision": update.name(update.folder / "vision.onnx")}})
    assert "is unreadable" in capsys.readouterr().err
    assert not old.exists() and (update.folder / "vision.onnx").is_file()  # the new manifest decides
