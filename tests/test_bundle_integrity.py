"""The runtime refuses bundle files that lead outside the bundle or belong to another export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.errors import BundleError


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
    from runtime.manifest import load_manifest

    bundle = _copy(tiny_bundle, tmp_path)
    (tmp_path / "x.onnx").write_bytes((bundle / "vision.onnx").read_bytes())  # exists: must not matter
    _edit(bundle, lambda m: m["files"].update(vision=name))
    with pytest.raises(BundleError, match=words):
        load_manifest(bundle)


def test_a_file_of_another_export_is_refused_with_the_repair_command(tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.manifest import load_manifest

    bundle = _copy(tiny_bundle, tmp_path)
    load_manifest(bundle)  # as exported: fine
    with (bundle / "projector.onnx").open("ab") as handle:
        handle.write(b"\0" * 16)  # another export's graph: another size
    with pytest.raises(BundleError) as err:
        load_manifest(bundle)
    message = str(err.value)
    assert "projector.onnx is" in message and "another export" in message
    assert "python -m export.clip --model" in message and "--force" in message and "\n" not in message


@pytest.mark.llm
def test_llm_gguf_outside_or_of_another_size_is_refused(tiny_llm_bundle: Path, tmp_path: Path) -> None:
    from runtime.llm_bundle import open_language_model

    bundle = _copy(tiny_llm_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    outside = dict(manifest, llm={**manifest["llm"], "gguf": "../../w.gguf"})
    with pytest.raises(BundleError, match="leads outside the bundle"):
        open_language_model(bundle, outside)
    resized = dict(manifest, llm={**manifest["llm"], "size": manifest["llm"]["size"] + 1})
    with pytest.raises(BundleError, match="python -m export.llm --model .* --force"):
        open_language_model(bundle, resized)
    open_language_model(bundle, manifest, n_ctx=64).close()  # as exported: loads
