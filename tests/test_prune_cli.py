"""runtime.prune: the JSON contract, --save, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from runtime.prune import main
from tests.bundle_files import member

F, N = 23, 576


@pytest.fixture(scope="module")
def photo_path(photos, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    photos["chelsea"].save(path)
    return path


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv) + ["--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, "--json prints exactly one line"
    return json.loads(out[0])


def test_json_contract(tiny_bundle: Path, photo_path: Path, capsys) -> None:
    result = run_json(capsys, str(photo_path), "--model", str(tiny_bundle), "--tokens", "64")
    assert {"kept", "layers", "entropy", "kl", "tokens", "strategy", "timings_ms"} <= set(result)
    assert result["strategy"] == "entropy" and result["tokens"] == 64
    kept = result["kept"]
    assert len(kept) == 64 and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < N
    assert 6 <= result["layers"]["shallow"] <= 8 and 20 <= result["layers"]["deep"] <= 21
    assert len(result["entropy"]) == F and len(result["kl"]) == F - 1
    assert result["k_s"] == 26 and result["k_d"] == 38
    assert sum(result["counts"]) == N  # every patch is represented exactly once after merging
    assert {"preprocess", "encode", "prune", "project"} <= set(result["timings_ms"])


@pytest.mark.parametrize("strategy", ["none", "uniform", "fastervlm", "visionzip", "divprune"])
def test_every_vision_strategy_runs(tiny_bundle: Path, photo_path: Path, capsys, strategy: str) -> None:
    result = run_json(capsys, str(photo_path), "--model", str(tiny_bundle), "--tokens", "128", "--strategy", strategy)
    assert result["tokens"] == (N if strategy == "none" else 128)
    assert len(set(result["kept"])) == result["tokens"]


def test_save_npz(tiny_bundle: Path, photo_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned.npz"
    assert main([str(photo_path), "--model", str(tiny_bundle), "--tokens", "32", "--save", str(out)]) == 0
    assert "strategy entropy: kept 32/576" in capsys.readouterr().out
    with np.load(out) as data:
        assert data["embeddings"].shape == (32, 64) and data["embeddings"].dtype == np.float32
        assert data["kept"].dtype == np.int64 and data["kept"].shape == (32,)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (no pixel data needed to trip the bomb check)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def bad_images(tmp: Path, photo_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp / "notes.png"
    text.write_text("not an image")
    truncated = tmp / "cut.png"
    truncated.write_bytes(photo_path.read_bytes()[:2000])
    bomb = tmp / "bomb.png"
    bomb.write_bytes(_png_header(40000, 40000))
    return {
        "missing": (tmp / "absent.jpg", "not found"),
        "not-an-image": (text, "not an image"),
        "truncated": (truncated, "truncated"),
        "bomb": (bomb, "decompression bomb"),
    }


@pytest.mark.parametrize("case", ["missing", "not-an-image", "truncated", "bomb"])
def test_bad_image_is_one_line(tiny_bundle: Path, photo_path: Path, tmp_path: Path, capsys, case: str) -> None:
    path, words = bad_images(tmp_path, photo_path)[case]
    assert main([str(path), "--model", str(tiny_bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert words in err.lower(), err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--tokens", "0"], "--tokens must be in 1..576"),
        (["--tokens", "577"], "--tokens must be in 1..576"),
        (["--p-shallow", "1.5"], "p_shallow"),
        (["--p-shallow", "-0.1"], "p_shallow"),
        (["--shallow", "0-3"], "numbered from 1"),
        (["--deep", "20-24"], "1..23"),
        (["--rule", "fixed", "--fixed", "6,30"], "1..23"),
        (["--rule", "median"], "rule"),
        (["--merge", "sum"], "merge"),
        (["--strategy", "magic"], "unknown strategy 'magic'"),
        (["--shallow", "six"], "layer range"),
        (["--provider", "NoSuchExecutionProvider"], "not available"),
        (["--strategy", "dart"], "--question is required by strategy 'dart'"),
        (["--strategy", "cdpruner", "--question", "  "], "--question is required by strategy 'cdpruner'"),
        (["--strategy", "cdpruner", "--question", "why?", "--relevance-weight", "1"], "relevance_weight must lie"),
        (["--strategy", "entropy", "--pivots-text", "2"], "takes no option(s) pivots_text"),
    ],
)
def test_bad_arguments_are_one_line(tiny_bundle: Path, photo_path: Path, capsys, flags: list[str], words: str) -> None:
    try:
        code = main([str(photo_path), "--model", str(tiny_bundle), *flags])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err


def test_bad_bundles_are_one_line(tiny_bundle: Path, photo_path: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other-schema"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["schema"] = "entroprune.bundle/0"
    (other / "manifest.json").write_text(json.dumps(manifest))
    missing = tmp_path / "missing-file"
    shutil.copytree(tiny_bundle, missing)
    member(missing, "projector").unlink()
    cases = {other: "schema", missing: "/projector.onnx (projector)", tmp_path / "nowhere": "no bundle directory"}
    for bundle, words in cases.items():
        assert main([str(photo_path), "--model", str(bundle)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


@pytest.mark.llm
@pytest.mark.parametrize("strategy", ["entropyprune", "fastv"])
def test_probe_strategies_use_the_bundle_probe(tiny_llm_bundle: Path, photo_path: Path, capsys, strategy: str) -> None:
    result = run_json(capsys, str(photo_path), "--model", str(tiny_llm_bundle), "--strategy", strategy)
    assert result["strategy"] == strategy and len(result["kept"]) == 64 and result["kept"] == sorted(result["kept"])
    assert result["timings_ms"]["probe"] > 0 and "project_all" in result["timings_ms"]
    # the real probe reports the decoder layer it read: P-1, as export.llm recorded it
    recorded = json.loads((tiny_llm_bundle / "manifest.json").read_text())["llm"]["probe"]
    assert result["probe_layer"] == recorded["layer"] == recorded["entropyprune_layer"] - 1


def test_probe_strategy_without_language_model_is_one_line(tiny_bundle: Path, photo_path: Path, capsys) -> None:
    assert main([str(photo_path), "--model", str(tiny_bundle), "--strategy", "entropyprune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the language-model probe" in err[0] and "export.llm" in err[0], err


@pytest.mark.llm
def test_dart_reports_pivots_and_quotas(tiny_llm_bundle: Path, photo_path: Path, capsys) -> None:
    result = run_json(capsys, str(photo_path), "--model", str(tiny_llm_bundle), "--strategy", "dart", "--tokens",
                      "20", "--question", "What is on the table?", "--pivots-image", "2", "--pivots-text", "3")
    assert len(result["kept"]) == 20 and result["kept"] == sorted(set(result["kept"]))
    assert len(result["pivots_image"]) == 2 and set(result["pivots_image"]) <= set(result["kept"])
    assert len(result["pivots_text"]) == 3 and result["quotas"] == [4, 4, 4, 3, 3]
    assert result["timings_ms"]["probe"] > 0
    other = run_json(capsys, str(photo_path), "--model", str(tiny_llm_bundle), "--strategy", "dart", "--tokens",
                     "20", "--question", "Which colour has the wall behind the cups?", "--pivots-image", "2",
                     "--pivots-text", "3")
    assert other["kept"] != result["kept"]  # the question's tokens are pivots: another question, other rows
    assert main([str(photo_path), "--model", str(tiny_llm_bundle), "--strategy", "dart", "--question", "why?",
                 "--layer", "3"]) == 2
    assert "this bundle's probe is cut at P=2" in capsys.readouterr().err
