"""tools/analyze_entropy.py: a smoke run on the tiny bundle, its tables against the runtime, pure helpers."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from runtime.pipeline import Pipeline
from tools.analyze_entropy import image_names, main, progress, rank_average, spearman_rho
from tools.entropy_plots import BORDER, DIM, EDGE, TINT, display_image, group_colors, kept_overlay

F, N = 23, 576
SHOWN = ("astronaut", "coffee", "camera")
STRATEGIES = ("entropy", "visionzip", "fastervlm", "entropyprune")
DRAWN = ("entropy", "visionzip", "fastervlm")  # entropyprune needs the probe the tiny bundle lacks
CURVE_TOL = 1e-12  # the tool and the runtime run the same float64 code on the same encoder output
RHO_TOL = 1e-12  # two float64 computations of one correlation


@pytest.fixture(scope="module")
def image_dir(photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis_images")
    for name in SHOWN:
        photos[name].save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def analysis(tiny_bundle: Path, image_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "out"
    argv = ["--model", str(tiny_bundle), *(str(image_dir / f"{n}.png") for n in SHOWN), "--out", str(out),
            "--tokens", "64", "--strategies", *STRATEGIES]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def summary(analysis: Path) -> dict:
    return json.loads((analysis / "summary.json").read_text(encoding="utf-8"))


def test_figures_are_valid_pngs_of_sensible_size(analysis: Path) -> None:
    names = ["entropy_kl.png", "layer_histogram.png"] + [f"heatmaps_{n}.png" for n in SHOWN]
    names += [f"kept_{n}_{s}.png" for n in SHOWN for s in DRAWN]
    for name in names:
        with Image.open(analysis / name) as image:
            assert image.format == "PNG", name
            image.verify()
        with Image.open(analysis / name) as image:
            width, height = image.size
            assert 300 <= width <= 3000 and 300 <= height <= 3000, (name, image.size)
            extrema = image.convert("L").getextrema()
            assert extrema[1] - extrema[0] > 50, f"{name} looks blank: {extrema}"
    assert not list(analysis.glob("kept_*_entropyprune.png"))
    assert not list(analysis.glob(".*.tmp")), "no temporary files left behind"


def test_csv_has_f_rows_per_image_with_valid_entropies(analysis: Path, summary: dict) -> None:
    with open(analysis / "entropy.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "layer", "H", "KL"]
    for record in summary["images"]:
        mine = [r for r in rows if r["image"] == record["name"]]
        assert [int(r["layer"]) for r in mine] == list(range(1, F + 1))
        h = np.array([float(r["H"]) for r in mine])
        assert np.all((h >= 0) & (h <= math.log(N))), h
        assert [r["KL"] for r in mine][-1] == "" and all(r["KL"] for r in mine[:-1])
        np.testing.assert_array_equal(h, record["entropy"], err_msg="CSV and JSON disagree")
    assert len(rows) == F * len(SHOWN)


def test_summary_matches_the_runtime(tiny_bundle: Path, photos, summary: dict) -> None:
    pipeline = Pipeline(tiny_bundle)
    assert summary["ranges"] == {"shallow": [6, 8], "deep": [20, 21]} and summary["layers"] == F
    for name, record in zip(SHOWN, summary["images"], strict=True):
        assert record["name"] == name and len(record["entropy"]) == F and len(record["kl"]) == F - 1
        assert 6 <= record["shallow"] <= 8 and 20 <= record["deep"] <= 21
        report = pipeline.prune(photos[name], 64, "entropy").report
        assert (record["shallow"], record["deep"]) == (report["layers"]["shallow"], report["layers"]["deep"])
        np.testing.assert_allclose(record["entropy"], report["entropy"], rtol=0, atol=CURVE_TOL, err_msg=name)
        np.testing.assert_allclose(record["kl"], report["kl"], rtol=0, atol=CURVE_TOL, err_msg=name)
        # negative control: an off-by-one layer numbering must not pass at the same tolerance
        assert not np.allclose(record["entropy"][1:], report["entropy"][:-1], rtol=0, atol=CURVE_TOL)
        h = np.asarray(record["entropy"])
        assert record["argmax_all"] == int(np.argmax(h)) + 1 and record["argmin_all"] == int(np.argmin(h)) + 1
        assert set(record["figures"]) == {"heatmaps"} | {f"kept_{s}" for s in DRAWN}


def test_summary_aggregate_and_notes(summary: dict) -> None:
    entropy = np.array([r["entropy"] for r in summary["images"]])
    kl = np.array([r["kl"] for r in summary["images"]])
    agg = summary["aggregate"]
    np.testing.assert_allclose(agg["mean_entropy"], entropy.mean(axis=0), rtol=0, atol=CURVE_TOL)
    assert agg["max_kl_layer"] == int(np.argmax(kl.mean(axis=0))) + 1
    rho = agg["spearman_rho_entropy_vs_layer"]
    from scipy.stats import spearmanr

    np.testing.assert_allclose(rho, spearmanr(np.arange(1, F + 1), entropy.mean(axis=0))[0], atol=RHO_TOL)
    assert agg["entropy_falls_with_depth"] == (rho < 0)
    for key in ("shallow", "deep", "argmax_all", "argmin_all"):
        assert sum(agg["histogram"][key].values()) == len(SHOWN), key
    assert summary["strategies"] == list(DRAWN)
    assert len(summary["skipped"]) == 1 and summary["skipped"][0].startswith("entropyprune: skipped")


def test_every_result_carries_its_merge_groups(tiny_bundle: Path, photos) -> None:
    """The pipeline's ``assignment`` (no tool re-derives merge groups) fits kept and counts for every
    strategy, and equals the groups each merging rule gives."""
    from runtime.merging import merge_tokens
    from runtime.strategies.visionzip import contextual_count, contextual_groups

    pipeline = Pipeline(tiny_bundle)
    encoded = pipeline.encoder.encode(pipeline.pixel_values(photos["chelsea"]))
    results = {s: pipeline.prune_encoded(encoded, 64, s) for s in ("entropy", "visionzip", "fastervlm", "divprune")}
    for strategy, result in results.items():
        assignment = result.assignment
        np.testing.assert_array_equal(assignment[result.kept], np.arange(64), err_msg=strategy)
        members = np.bincount(assignment[assignment >= 0], minlength=64)
        np.testing.assert_array_equal(members, result.counts, err_msg=strategy)
    entropy, visionzip = results["entropy"], results["visionzip"]
    np.testing.assert_array_equal(entropy.assignment, merge_tokens(encoded.features, entropy.kept).assignment)
    dominant = 64 - contextual_count(64)
    remaining = np.setdiff1d(np.arange(encoded.num_patches), visionzip.kept[:dominant])
    _, joined = contextual_groups(encoded.keys, remaining, 64 - dominant)
    np.testing.assert_array_equal(visionzip.assignment[remaining[joined >= 0]], dominant + joined[joined >= 0])
    assert (results["fastervlm"].assignment >= 0).sum() == 64  # nothing merged: the rest dropped
    # negative control: VisionZip's groups redone by the entropy rule (feature cosine) are other groups
    assert not np.array_equal(merge_tokens(encoded.features, visionzip.kept).assignment, visionzip.assignment)


@pytest.mark.llm
def test_probe_strategies_run_when_the_bundle_has_a_probe(tiny_bundle: Path, tiny_llava_dir: Path, image_dir: Path,
                                                          tmp_path: Path) -> None:
    from export.llm import export_llm

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    export_llm(str(tiny_llava_dir), quant="f32", out=bundle)
    out = tmp_path / "out"
    argv = ["--model", str(bundle), str(image_dir / "coffee.png"), "--out", str(out), "--tokens", "32",
            "--strategies", "entropyprune", "fastv"]
    assert main(argv) == 0
    result = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert result["skipped"] == [] and result["strategies"] == ["entropyprune", "fastv"]
    for strategy in ("entropyprune", "fastv"):
        with Image.open(out / f"kept_coffee_{strategy}.png") as image:
            image.verify()


@pytest.mark.parametrize("case", ["missing-image", "bad-bundle", "unknown-strategy", "bad-tokens"])
def test_bad_input_is_one_line_exit_2(case: str, tiny_bundle: Path, image_dir: Path, tmp_path: Path, capsys) -> None:
    image, bundle = str(image_dir / "coffee.png"), str(tiny_bundle)
    extra: list[str] = []
    if case == "missing-image":
        image = str(tmp_path / "nope.png")
    elif case == "bad-bundle":
        bundle = str(tmp_path)
    elif case == "unknown-strategy":
        extra = ["--strategies", "bogus"]
    else:
        extra = ["--tokens", "0"]
    code = main(["--model", bundle, image, "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("analyze_entropy: error:"), err
    assert not (tmp_path / "out").exists()


def test_rank_average_and_spearman_hand_cases() -> None:
    np.testing.assert_array_equal(rank_average(np.array([10, 30, 20, 20])), [1, 4, 2.5, 2.5])
    assert spearman_rho([1, 2, 3], [3, 2, 1]) == -1.0
    assert spearman_rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6·2 / (4·15)
    assert spearman_rho([1], [5]) is None and spearman_rho([1, 2], [3, 3]) is None


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 40))
        x, y = rng.integers(0, 6, n).astype(float), rng.normal(size=n)
        if np.ptp(x) == 0:
            continue
        np.testing.assert_allclose(spearman_rho(x, y), spearmanr(x, y)[0], atol=RHO_TOL)


@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=30), st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=30))
def test_spearman_properties(a: list[float], b: list[float]) -> None:
    n = min(len(a), len(b))
    rho = spearman_rho(a[:n], b[:n])
    if rho is not None:
        assert -1.0 <= rho <= 1.0 and rho == pytest.approx(spearman_rho(b[:n], a[:n]))
    if len(set(a[:n])) == n:
        assert spearman_rho(a[:n], [-v for v in a[:n]]) == pytest.approx(-1.0)


def test_image_names_are_safe_and_unique() -> None:
    assert image_names([Path("a/x.png"), Path("b/x.jpg"), Path("y z.png"), Path("x-2.png")]) == [
        "x", "x-2", "y_z", "x-2-2"]


def test_display_image_inverts_normalisation() -> None:
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    rgb = np.random.default_rng(1).random((4, 4, 3), dtype=np.float32)
    pixels = ((rgb - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(display_image(pixels, mean, std), rgb, atol=1e-6, err_msg="round trip")


def test_kept_overlay_hand_case() -> None:
    grey = np.full((12, 12, 3), 0.5, np.float32)  # grid 2 -> 6x6-pixel patches
    out = kept_overlay(grey, 2, np.array([0]), np.array([0, 0, -1, -1]))
    red = group_colors(1)[0]
    np.testing.assert_allclose(out[BORDER + 1, BORDER + 1], grey[0, 0], err_msg="kept patch interior unchanged")
    np.testing.assert_allclose(out[0, 0], red, err_msg="kept patch framed in its group colour")
    np.testing.assert_allclose(out[2, 8], 0.5 * (1 - TINT) + red * TINT, rtol=1e-6, err_msg="member tinted")
    np.testing.assert_allclose(out[8, 8], 0.5 * DIM, rtol=1e-6, err_msg="dropped patch dimmed")
    np.testing.assert_allclose(out[5, 8], 0.5 * (1 - TINT) * EDGE + red * TINT * EDGE, rtol=1e-6,
                               err_msg="group boundary line")


def test_progress_writes_one_line_per_step_off_a_tty() -> None:
    stream = io.StringIO()
    assert list(progress([1, 2], ["a", "b"], stream)) == [1, 2]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].endswith("0/2 a") and "2/2 done" in lines[-1]
