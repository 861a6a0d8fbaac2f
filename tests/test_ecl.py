"""tools/ecl.py (EntropyPrune's entropy-collapse curve) and tools/sample_photos.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.matrix_entropy import matrix_entropy
from tools.ecl import collapse_layer, entropy_curve, main
from tools.sample_photos import write_photos


def test_collapse_layer_hand_cases() -> None:
    assert collapse_layer(np.array([5.0, 4.9, 3.0, 2.9])) == 2  # largest drop 4.9 -> 3.0, between 1 and 2
    assert collapse_layer(np.array([1.0, 2.0, 0.5])) == 2
    assert collapse_layer(np.array([3.0, 1.0, 0.0])) == 1  # ties: the first largest drop
    with pytest.raises(ValueError):
        collapse_layer(np.array([1.0]))


def test_entropy_curve_uses_only_the_image_rows() -> None:
    rng = np.random.default_rng(0)
    states = [torch.from_numpy(rng.standard_normal((1, 9, 6))) for _ in range(3)]
    mask = torch.tensor([False, True, True, True, True, False, False, True, False])
    curve = entropy_curve(states, mask)
    expected = [matrix_entropy(s[0, mask].numpy()) for s in states]
    np.testing.assert_allclose(curve, expected, rtol=0, atol=1e-12)
    assert not np.allclose(curve, [matrix_entropy(s[0].numpy()) for s in states])  # all rows is another curve


def test_cli_on_the_tiny_llava(tiny_llava_dir: Path, tmp_path: Path, capsys) -> None:
    photos = write_photos(tmp_path / "photos", ("coffee", "camera"))
    assert [p.name for p in photos] == ["coffee.png", "camera.png"]
    out = tmp_path / "ecl"
    assert main(["--model", str(tiny_llava_dir), *map(str, photos), "--out", str(out)]) == 0
    summary = json.loads((out / "ecl.json").read_text())
    layers = 4 + 1  # the tiny LLaMA's 4 decoder layers plus the input embeddings
    assert set(summary["curves"]) == {"coffee.png", "camera.png"}
    assert all(len(c) == layers for c in summary["curves"].values())
    assert 1 <= summary["ecl_of_mean"] <= layers - 1
    assert summary["ecl_of_mean"] == collapse_layer(np.array(summary["mean_curve"]))
    with open(out / "ecl.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * layers and all(float(r["matrix_entropy"]) >= 0 for r in rows)
    assert (out / "ecl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean curve: ECL = layer" in capsys.readouterr().out


def test_cli_bad_image_is_one_line(tiny_llava_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tiny_llava_dir), str(tmp_path / "none.png"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image not found" in err[0]
