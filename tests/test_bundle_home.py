"""Finding bundles again: the user bundle folder, bundles by name, ``--gguf`` without a checkpoint,
a moved bundle; the exporters' disk chores (free-space check, stale intermediates); the hub error."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BundleError
from runtime.model_registry import BUNDLES_ENV, bundle_path, bundles_home, default_bundle_dir
from tests.bundle_files import member


def test_bundles_home_is_a_user_folder_never_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import models

    monkeypatch.delenv(BUNDLES_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert bundles_home() == tmp_path / "cache" / "entroprune" / "bundles"
    assert Path(models.__file__).parent not in default_bundle_dir("llava-1.5-7b").parents
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path / "mine"))
    assert default_bundle_dir("x") == tmp_path / "mine" / "x"


def test_no_bundle_error_names_the_exact_command(bundles_home: Path) -> None:
    with pytest.raises(BundleError) as err:
        bundle_path("llava-1.5-7b")
    message = str(err.value)
    assert "python -m export.clip --model llava-1.5-7b && python -m export.llm --model llava-1.5-7b" in message
    assert str(bundles_home) in message and "\n" not in message
    with pytest.raises(BundleError, match="no bundle named 'my-ckpt'"):
        bundle_path("my-ckpt")


@pytest.fixture(scope="module")
def named_bundle(tiny_llava_dir: Path, tiny_llm_bundle: Path, bundles_home: Path) -> Path:
    """The tiny LLaVA exported by name: ``export.clip --model CKPT`` with no ``--out``."""
    from export.clip import main

    ckpt = bundles_home.parent / "named-ckpt"
    if not ckpt.exists():
        ckpt.symlink_to(tiny_llava_dir, target_is_directory=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--model", str(ckpt), "--no-validate"]) == 0
    assert "--model named-ckpt" in printed.getvalue(), printed.getvalue()  # the name to use is printed
    return bundles_home / "named-ckpt"


@pytest.mark.llm
def test_bundle_exported_from_a_path_is_found_by_its_name(named_bundle: Path, tiny_llm_bundle: Path) -> None:
    from export.llm import main as llm_main
    from runtime.prune import main as prune_main

    assert bundle_path("named-ckpt") == named_bundle
    gguf = member(tiny_llm_bundle, "llm")
    assert llm_main(["--model", "named-ckpt", "--gguf", str(gguf)]) == 0  # registered by name, no checkpoint
    image = Path(named_bundle.parent / "grey.png")
    _grey_image(image)
    assert prune_main([str(image), "--model", "named-ckpt", "--tokens", "8", "--json"]) == 0


@pytest.mark.llm
def test_gguf_without_model_then_moved_bundle_still_chats(tiny_bundle: Path, tiny_llm_bundle: Path,
                                                          tmp_path: Path) -> None:
    from export.llm import main as llm_main

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    outside = tmp_path / "elsewhere" / "lm.gguf"
    outside.parent.mkdir()
    shutil.copyfile(member(tiny_llm_bundle, "llm"), outside)
    assert llm_main(["--gguf", str(outside), "--out", str(bundle)]) == 0
    moved = tmp_path / "moved" / "bundle"
    moved.parent.mkdir()
    shutil.move(str(bundle), moved)
    outside.unlink()  # the bundle holds its own link to the weights
    image = tmp_path / "grey.png"
    _grey_image(image)
    result = subprocess.run(
        [sys.executable, "-m", "runtime.chat", "--model", str(moved), "--image", str(image), "--prompt", "hi",
         "--max-tokens", "2", "--temperature", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.llm
def test_gguf_is_copied_when_it_cannot_be_linked(tiny_bundle: Path, tiny_llm_bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from export import diskspace
    from export.llm import export_llm

    def no_link(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(diskspace.os, "link", no_link)
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    export_llm(None, out=bundle, gguf_path=member(tiny_llm_bundle, "llm"))
    assert not os.path.samefile(member(bundle, "llm"), member(tiny_llm_bundle, "llm"))
    assert member(bundle, "llm").read_bytes() == member(tiny_llm_bundle, "llm").read_bytes()


def test_gguf_without_model_or_out_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from export.llm import main

    assert main(["--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export.llm: error:") and "--out" in err and len(err.splitlines()) == 1


@pytest.mark.llm
def test_export_llm_refuses_when_the_disk_is_too_small(tiny_llava_dir: Path, tiny_bundle: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from export import diskspace
    from export.llm import main

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = sorted(p.name for p in bundle.iterdir())
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert main(["--model", str(tiny_llava_dir), "--out", str(bundle), "--quant", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs about" in err and "f16 intermediate" in err and "0.0 GB is free" in err, err
    assert sorted(p.name for p in bundle.iterdir()) == before  # nothing written


def test_require_free_adds_up_the_needs(tmp_path: Path) -> None:
    from export.diskspace import require_free

    free = shutil.disk_usage(tmp_path).free
    require_free(tmp_path, {"a": free // 4, "b": free // 4}, "hint")
    with pytest.raises(BundleError, match=r"a .* \+ b .* GB is free; hint"):
        require_free(tmp_path, {"a": free // 2, "b": free // 2 + 10**6}, "hint")


def test_stale_intermediate_of_a_dead_process_is_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.diskspace import clean_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".llm-f16-{int(dead.stdout)}.gguf"
    stale.write_bytes(b"x" * 1000)
    pid = int(dead.stdout)
    half_written = tmp_path / f"..llm-f16-{pid}.gguf.{pid}.k3j2_x.tmp"  # killed while writing it (atomic_path)
    half_written.write_bytes(b"z" * 24)
    alive = tmp_path / f".llm-f16-{os.getppid()}.gguf"  # a running process: kept
    alive.write_bytes(b"y")
    temp = tmp_path / f".manifest.json.{int(dead.stdout)}.ab_12x.tmp"  # runtime.atomic's temporary
    temp.write_bytes(b"t" * 100)
    staging = tmp_path / f".bundle.export-{int(dead.stdout)}-k2j3"  # export.clip's staging folder
    staging.mkdir()
    (staging / "vision.onnx").write_bytes(b"v" * 900)
    keep = tmp_path / ".notes.tmp"  # not ours: no pid in the name
    keep.write_bytes(b"k")
    assert clean_stale(tmp_path) == 2024
    assert not stale.exists() and not half_written.exists() and alive.exists()
    assert not temp.exists() and not staging.exists() and keep.exists()
    assert "left by a killed export" in capsys.readouterr().err


@pytest.mark.llm
def test_sigterm_during_export_llm_removes_the_intermediate(tiny_llava_dir: Path, tiny_bundle: Path,
                                                            tmp_path: Path) -> None:
    """A SIGTERM while quantising unwinds the exporter: no .llm-f16-*.gguf and no llm file is left."""
    import signal
    import time

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    code = (
        "import os, signal, sys, export.llm as m, export.llm_gguf.files as files\n"
        "def slow(*a, **k):\n"
        "    print('quantising', flush=True); signal.pause()\n"
        "files.quantize_gguf = slow\n"
        f"sys.exit(m.main(['--model', {str(tiny_llava_dir)!r}, '--out', {str(bundle)!r}, '--quant', 'q8_0']))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "quantising"
    assert list(bundle.glob("llm.*/.llm-f16-*.gguf"))  # the intermediate exists while quantising
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    time.sleep(0.1)
    assert child.returncode == 143, err
    assert "stopped by SIGTERM" in err
    assert not list(bundle.glob("llm.*")) and not list(bundle.glob("**/*.gguf"))  # its staging folder went


def test_hub_error_keeps_the_whole_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from export.load import resolve_model
    from runtime.errors import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("llava-1.5-7b")
    message = str(err.value)
    assert "\n" not in message and message.endswith("--model /path/to/llava-1.5-7b-hf")
    reason = message[message.index("(") + 1 : message.rindex(")")]
    assert len(reason) > 120 or reason.rstrip().endswith((".", "'", '"', ")")), reason  # not cut mid-sentence


def _grey_image(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(path)


@pytest.mark.parametrize("code", [28, 30, 13])  # ENOSPC, EROFS, EACCES
def test_environment_os_errors_are_one_line(code: int, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import run_cli

    def body() -> int:
        raise OSError(code, os.strerror(code), "/bundle/vision.onnx")

    assert run_cli(body, "export.clip") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"export.clip: error: {os.strerror(code)}: /bundle/vision.onnx"


def test_other_os_errors_still_crash() -> None:
    import errno

    from runtime.cli import run_cli

    def body() -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        run_cli(body, "export.clip")


def test_export_clip_removes_a_killed_exports_staging_folder(tiny_llava_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from export.clip import main

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = tmp_path / f".bundle.export-{int(dead.stdout)}-x1y2"  # what a kill -9 during an export leaves
    staging.mkdir()
    (staging / "vision.onnx.data").write_bytes(b"w" * 4096)
    assert main(["--model", str(tiny_llava_dir), "--out", str(tmp_path / "bundle"), "--no-validate"]) == 0
    assert not staging.exists() and "left by a killed export" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # and this run left nothing behind
