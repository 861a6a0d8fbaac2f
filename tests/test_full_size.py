"""Slow tier: the same export on a full-size (random) ViT-L/14-336 tower, and the prune benchmark.

No size-specific branch exists in the code; this shows the export, validation, int8 report and
benchmark run unchanged at CLIP-L width (1024, 16 heads, 24 blocks, f = 23).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vitl_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.clip import main
    from tools.make_tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("vitl")
    ckpt = build_tiny_llava(root / "ckpt", vision_width=1024, vision_heads=16)
    assert main(["--model", str(ckpt), "--out", str(root / "bundle"), "--int8"]) == 0
    return root / "bundle"


def test_full_size_export_validates(vitl_bundle: Path) -> None:
    manifest = json.loads((vitl_bundle / "manifest.json").read_text())
    assert manifest["vision"]["hidden_size"] == 1024 and manifest["vision"]["heads"] == 16
    assert manifest["vision"]["feature_layer"] == 23 and manifest["vision"]["num_patches"] == 576
    checks = manifest["validation"]["checks"]
    assert checks and all(c["ok"] and c["max_abs_diff"] <= 1e-4 for c in checks)
    int8 = manifest["validation"]["int8"]
    assert int8["feature_cosine"] > 0.99 and int8["cls_topk_overlap"] >= 56


def test_bench_prune_runs_on_full_size(vitl_bundle: Path, capsys) -> None:
    from tools.bench_prune import main

    assert main([str(vitl_bundle), "--tokens", "64", "--repeats", "1", "--images", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[2].strip(): line for line in table[2:]}
    for strategy in ("entropy", "fastervlm", "visionzip", "divprune", "uniform", "none"):
        cells = [c.strip() for c in rows[strategy].split("|")]
        assert float(cells[4]) > 0 and cells[6].endswith("%"), rows[strategy]
    assert "needs export.llm probe" in rows["entropyprune"]
