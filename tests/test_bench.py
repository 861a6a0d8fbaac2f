"""tools/bench.py (stage breakdown), export/mmproj.py (our mmproj writer) and tools/bench_mtmd.py (libmtmd).

Default tier: the mmproj writer read back with gguf's reader, the pure helpers. ``llm`` tier:
the benchmark on the tiny bundle (content of table, CSV, JSON and PNG), a swapped GGUF of
another width, and libmtmd loading our mmproj next to Hugging Face.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from export.mmproj import read_mmproj_keys, write_mmproj_gguf
from tests.bundle_files import member
from tools.bench_mtmd import alignments, row_agreement
from tools.benchkit.common import markdown_table

F = 23  # tiny LLaVA: vision_feature_layer -2 of 24 blocks
COS_TOL = 1e-12  # cosines are computed in float64
MTMD_COS = 0.99999  # README: cls-last rows = HF to cosine 0.999999; tanh- vs erf-GELU projector: measured 0.9999993
ONNX_COS = 0.9999  # our ONNX tower + projector vs HF (max |Δ| ~2e-5 on O(10) values)
STANDARD_COS_MIN_BELOW = 0.5  # README: libmtmd on the standard mmproj, row r vs HF patch r: min -0.06
STANDARD_COS_MEAN_BELOW = 0.95  # ... and mean 0.81 (a [CLS]-first clip.cpp would give >= MTMD_COS)


# --- pure helpers ----------------------------------------------------------------------------
def test_row_agreement_hand_case() -> None:
    a = row_agreement(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[2.0, 0.0], [0.0, -1.0]]))
    assert a.rows == 2
    assert math.isclose(a.cos_min, -1.0, abs_tol=COS_TOL) and math.isclose(a.cos_mean, 0.0, abs_tol=COS_TOL)
    assert a.max_abs == 3.0


def test_row_agreement_matches_loop_reference() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)
    cos = [float(np.dot(p, q)) / (math.sqrt(float(np.dot(p, p))) * math.sqrt(float(np.dot(q, q))))
           for p, q in zip(x.astype(np.float64), y.astype(np.float64), strict=True)]
    got = row_agreement(x, y)
    np.testing.assert_allclose([got.cos_min, got.cos_mean], [min(cos), sum(cos) / 7], atol=COS_TOL,
                               err_msg="row_agreement differs from the loop reference")
    assert got.max_abs == float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())
    with pytest.raises(ValueError, match=r"\[M, E\]"):
        row_agreement(x, y[:6])


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, (4, 3), elements=st.floats(-100, 100, width=32)),
       arrays(np.float32, (4, 3), elements=st.floats(-100, 100, width=32)))
def test_row_agreement_cosines_are_bounded(x: np.ndarray, y: np.ndarray) -> None:
    a = row_agreement(x, y)
    assert -1 - COS_TOL <= a.cos_min <= a.cos_mean <= 1 + COS_TOL and a.max_abs >= 0


def test_alignments_find_a_shift_by_one() -> None:
    rng = np.random.default_rng(0)
    patches, cls = rng.normal(size=(6, 4)), rng.normal(size=4)
    rows = np.concatenate([patches[1:], cls[None]])  # clip.cpp's order: patches 1..N-1, then [CLS]
    found = alignments(rows, patches, cls)
    assert found["shifted"].cos_min > 1 - COS_TOL and found["last_vs_cls"].cos_min > 1 - COS_TOL
    assert found["aligned"].cos_min < 0.99  # negative control: the aligned comparison must not pass


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [[1, "x"]], "lr") == "| a | b |\n|---|---:|\n| 1 | x |"
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a"], [[1, 2]])


# --- the mmproj writer (no llama.cpp) ----------------------------------------------------------
def expected_tensor_names() -> set[str]:
    parts = ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")
    names = {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias"}
    names |= {f"v.blk.{i}.{p}.{w}" for i in range(F) for p in parts for w in ("weight", "bias")}
    return names | {f"mm.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}


@pytest.fixture(scope="module")
def mmproj(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmproj_gguf(tiny_llava_dir, tmp_path_factory.mktemp("mmproj") / "mmproj.gguf").path


def test_mmproj_keys(mmproj: Path) -> None:
    keys = read_mmproj_keys(mmproj)
    expected = {
        "general.architecture": "clip", "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
        "clip.projector_type": "mlp", "clip.vision.image_size": 336, "clip.vision.patch_size": 14,
        "clip.vision.embedding_length": 64, "clip.vision.feed_forward_length": 256,
        "clip.vision.block_count": F, "clip.vision.attention.head_count": 4, "clip.vision.projection_dim": 64,
        "clip.use_gelu": False, "clip.vision.feature_layer": [F],
    }
    assert {k: keys.get(k) for k in expected} == expected
    np.testing.assert_allclose(keys["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073], rtol=1e-6,
                               err_msg="image_mean")
    np.testing.assert_allclose(keys["clip.vision.image_std"], [0.26862954, 0.26130258, 0.27577711], rtol=1e-6,
                               err_msg="image_std")
    assert math.isclose(keys["clip.vision.attention.layer_norm_epsilon"], 1e-5, rel_tol=1e-6)


def test_mmproj_tensors_names_shapes_values(mmproj: Path, tiny_llava_model) -> None:
    tensors = {t.name: t for t in gguf.GGUFReader(mmproj).tensors}
    assert set(tensors) == expected_tensor_names()  # blocks 1..f only; no post_ln
    shapes = {"v.patch_embd.weight": (64, 3, 14, 14), "v.position_embd.weight": (577, 64), "v.class_embd": (64,),
              "v.blk.0.ffn_up.weight": (256, 64), "v.blk.0.ffn_down.weight": (64, 256), "mm.0.weight": (64, 64)}
    assert {n: tuple(tensors[n].data.shape) for n in shapes} == shapes
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    tower = tiny_llava_model.model.vision_tower
    state = {k: v.numpy() for k, v in tower.state_dict().items()}
    layer = f"encoder.layers.{F - 1}"
    np.testing.assert_array_equal(tensors[f"v.blk.{F - 1}.ffn_down.weight"].data, state[f"{layer}.mlp.fc2.weight"])
    np.testing.assert_array_equal(tensors["v.position_embd.weight"].data, state["embeddings.position_embedding.weight"])
    proj = tiny_llava_model.model.multi_modal_projector
    np.testing.assert_array_equal(tensors["mm.2.bias"].data, proj.linear_2.bias.detach().numpy())
    # negative control: the last block written is block f, not f+1
    assert not np.allclose(tensors[f"v.blk.{F - 1}.attn_q.weight"].data,
                           state[f"encoder.layers.{F}.self_attn.q_proj.weight"])


def test_mmproj_variants_and_errors(tiny_llava_dir: Path, mmproj: Path, tmp_path: Path) -> None:
    info = write_mmproj_gguf(tiny_llava_dir, tmp_path / "m16.gguf", dtype="f16", position_order="cls-last")
    assert (info.block_count, info.projector_dim, info.num_patches) == (F, 64, 576)
    tensors = {t.name: t for t in gguf.GGUFReader(info.path).tensors}
    standard = {t.name: t for t in gguf.GGUFReader(mmproj).tensors}
    assert tensors["mm.0.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["v.pre_ln.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    pos = standard["v.position_embd.weight"].data
    np.testing.assert_allclose(tensors["v.position_embd.weight"].data, np.concatenate([pos[1:], pos[:1]]),
                               rtol=1e-3, err_msg="cls-last moves the [CLS] position row to the end (f16)")
    with pytest.raises(ValueError, match="position_order"):
        write_mmproj_gguf(tiny_llava_dir, tmp_path / "x.gguf", position_order="cls-first")
    assert not (tmp_path / "x.gguf").exists()


# --- libmtmd (llama.cpp) -----------------------------------------------------------------------
@pytest.mark.llm
def test_libmtmd_reads_our_mmproj(tiny_llm_bundle: Path, tiny_llava_dir: Path, tiny_llava_model,
                                  tmp_path: Path) -> None:
    from PIL import Image

    from runtime.pipeline import Pipeline
    from tools.bench_mtmd import MtmdEncoder, hf_image_features, square_images

    image = square_images(1, 336)[0]
    pixels = Pipeline(tiny_llm_bundle).pixel_values(Image.fromarray(image))[None]
    cls, patches = hf_image_features(tiny_llava_model, pixels)
    wrong_cls, wrong = hf_image_features(tiny_llava_model, pixels, vision_feature_layer=-3)  # block f-1
    found, controls = {}, {}
    for order in ("hf", "cls-last"):
        info = write_mmproj_gguf(tiny_llava_dir, tmp_path / f"{order}.gguf", position_order=order)
        with MtmdEncoder(info.path, member(tiny_llm_bundle, "llm"), info.projector_dim, threads=2) as encoder:
            out = encoder.encode(image)
        assert out.embeddings.shape == (576, 64) and out.encode_ms > 0
        found[order] = alignments(out.embeddings, patches[0], cls[0])
        controls[order] = alignments(out.embeddings, wrong[0], wrong_cls[0])
        assert all(-1 - COS_TOL <= a.cos_min <= 1 + COS_TOL for a in found[order].values())  # numbers
    # The README's finding for this llama.cpp (llama-cpp-python 0.3.36): clip.cpp appends [CLS] after
    # the patches and returns patches 2..N plus [CLS]. With the position table reordered to match
    # (cls-last) its rows are HF's patch r+1 and the last row HF's [CLS]; one block too few fails.
    last, standard = found["cls-last"], found["hf"]
    assert min(last["shifted"].cos_min, last["last_vs_cls"].cos_min) >= MTMD_COS, last
    assert controls["cls-last"]["shifted"].cos_min < MTMD_COS, controls["cls-last"]
    # ... and the standard layout does NOT match HF row for row (README: cosine min -0.06, mean 0.81).
    # A llama.cpp that puts [CLS] first turns this red: update the README's libmtmd section then.
    aligned = standard["aligned"]
    assert aligned.cos_min < STANDARD_COS_MIN_BELOW and aligned.cos_mean < STANDARD_COS_MEAN_BELOW, (
        f"libmtmd now agrees with HF on the standard mmproj ({aligned}): update the README's libmtmd section")


@pytest.mark.llm
def test_compare_with_mtmd_report(tiny_llm_bundle: Path, tiny_llava_dir: Path, tmp_path: Path) -> None:
    from tools.bench_mtmd import compare_with_mtmd
    from tools.benchkit.report import mtmd_markdown

    report = compare_with_mtmd(tiny_llm_bundle, tiny_llava_dir, tmp_path, images=1, repeats=1, threads=2)
    assert report["status"] == "ok", report.get("reason")
    assert report["ours_vs_hf"]["cos_min"] >= ONNX_COS and report["ours_vs_hf"]["rows"] == 576
    for key in ("mtmd_hf", "mtmd_cls-last"):
        assert report[key]["rows"] == 576
        for alignment in ("aligned", "shifted", "last_vs_cls"):
            assert -1 - COS_TOL <= report[key][alignment]["cos_min"] <= 1 + COS_TOL
    assert all(v > 0 for v in report["timings_ms"].values()) and len(report["timings_ms"]) == 4
    text = mtmd_markdown(report)
    assert f"{report['mtmd_hf']['aligned']['cos_min']:.6f}" in text and "cls-last" in text


# --- the benchmark -----------------------------------------------------------------------------
def table_rows(stdout: str) -> dict[tuple[str, int], dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    return {(r["strategy"], int(r["K"])): r for r in rows}


@pytest.mark.llm
def test_bench_smoke_on_tiny_bundle(tiny_llm_bundle: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from runtime.strategies.registry import available, get_strategy
    from tools.bench import STAGES, main

    out = tmp_path / "out"
    args = ["--model", str(tiny_llm_bundle), "--tokens", "32", "64", "--images", "1", "--repeats", "1",
            "--decode-tokens", "2", "--threads", "2", "--out", str(out)]
    assert main(args) == 0
    table = table_rows(capsys.readouterr().out)
    expected = {(s, k) for s in available() if s != "none" for k in (32, 64)} | {("none", 576)}
    assert set(table) == expected
    data = json.loads((out / "bench.json").read_text())
    assert data["llm"]["random_rows"] is False and len(data["rows"]) == len(expected)
    with (out / "bench.csv").open() as handle:
        csv_rows = {(r["strategy"], int(r["tokens"])): r for r in csv.DictReader(handle)}
    for row in data["rows"]:
        key, stages = (row["strategy"], row["tokens"]), row["stages_ms"]
        runs_probe = get_strategy(row["strategy"]).needs_probe
        runs_text = "text_tower" in get_strategy(row["strategy"]).needs
        positive = [s for s in STAGES if s not in ("probe", "text_tower")] + (["probe"] if runs_probe else []) + (
            ["text_tower"] if runs_text else [])
        assert all(stages[s] > 0 for s in positive), (key, stages)
        assert (stages["probe"] > 0) == runs_probe and row["decode_tokens_per_s"] > 0
        assert (stages["text_tower"] > 0) == runs_text
        assert math.isclose(row["ttft_ms"], sum(stages.values()), rel_tol=1e-12)
        positions = (int(table[key]["prefill positions"]), int(csv_rows[key]["prefill_positions"]))
        assert positions == (row["prefill_positions"], row["prefill_positions"])
        for s in STAGES:  # the three outputs carry the same numbers
            assert float(csv_rows[key][f"{s}_ms"]) == stages[s]
            assert table[key][s] == f"{stages[s]:.2f}"
        assert float(csv_rows[key]["ttft_ms"]) == row["ttft_ms"] and table[key]["TTFT"] == f"{row['ttft_ms']:.2f}"
    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and png.size[0] > 400 and png.size[1] > 300
        png.verify()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.llm
def test_bench_with_a_gguf_of_another_width(tiny_llm_bundle: Path, tmp_path: Path) -> None:
    from tools.bench import BenchConfig, run_bench
    from tools.benchkit.report import result_markdown
    from tools.make_random_gguf import Shape, make_random_gguf

    other = make_random_gguf(tmp_path / "wide.gguf", Shape(layers=2, embd=128, ff=256, heads=4, kv_heads=2,
                                                            vocab=300, ctx=2048), quant="f32")
    config = BenchConfig(tiny_llm_bundle, gguf=other, strategies=("entropy", "entropyprune"), tokens=(32,),
                         images=1, repeats=1, decode_tokens=2, threads=2)
    result = run_bench(config)
    assert result.llm.random_rows and result.llm.n_embd == 128 and result.llm.projector_dim == 64
    assert [(r.strategy, r.tokens) for r in result.rows] == [("entropy", 32), ("entropyprune", 32)]
    assert result.rows[1].stages_ms["probe"] > 0 and all(r.stages_ms["prefill"] > 0 for r in result.rows)
    text = result_markdown(result)
    assert "random rows" in text and "n_embd 128 ≠ projector width 64" in text


@pytest.mark.llm
def test_bench_feeds_original_positions(tiny_llm_bundle: Path) -> None:
    """``positions="original"``: the K rows sit at their patch indices, so the prompt spans all N image
    positions (packed: K); the run decodes the gaps (one llama_decode per run of kept rows)."""
    from tools.bench import BenchConfig, run_bench
    from tools.benchkit.report import result_markdown

    spans = {}
    for positions in ("packed", "original"):
        result = run_bench(BenchConfig(tiny_llm_bundle, strategies=("entropy",), tokens=(32,), images=1, repeats=1,
                                       decode_tokens=2, threads=2, positions=positions))
        (row,) = result.rows
        assert row.rows_fed == 32 and row.stages_ms["prefill"] > 0
        spans[positions] = row.prefill_positions
        assert f"image rows at {positions} positions" in result_markdown(result)
    assert spans["original"] - spans["packed"] == 576 - 32
    # where the kernel keeps its high-water mark, the table says its peak column is not per run
    assert ("not per run here" in result_markdown(result)) is not result.rss_per_run
    assert "not per run here" in result_markdown(dataclasses.replace(result, rss_per_run=False))


def test_tiled_bench_rows_carry_the_pack_positions(tiny_next_bundle: Path, photos) -> None:
    """LLaVA-NeXT: ``original`` gives each fed row (newlines included) its place in the full pack."""
    from runtime.anyres.pipeline import AnyresPipeline
    from tools.benchkit.common import TiledVision

    vision = TiledVision(AnyresPipeline(tiny_next_bundle))
    encoded = vision.encode(photos["chelsea"])[0]
    packed = vision.prune(encoded, 160, "entropy")
    original = vision.prune(encoded, 160, "entropy", positions="original")
    assert packed.positions is None and packed.span is None
    np.testing.assert_array_equal(original.embeddings, packed.embeddings)
    expected = vision.pipeline.prune_encoded(encoded, 160, "entropy").image_rows(None, "original")
    np.testing.assert_array_equal(original.positions, expected.positions)
    assert original.span == expected.span > original.positions[-1] >= packed.embeddings.shape[0]


@pytest.mark.llm
@pytest.mark.parametrize("extra, message", [(["--strategies", "nope"], "unknown strategy 'nope'"),
                                            (["--tokens", "0"], "--tokens must be in 1..576"),
                                            (["--positions", "scattered"], "--positions")])
def test_bench_bad_inputs_are_one_line_errors(tiny_llm_bundle: Path, tmp_path: Path, capsys, extra: list[str],
                                              message: str) -> None:
    from tools.bench import main

    assert main(["--model", str(tiny_llm_bundle), "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# --- peak memory and LLaVA-NeXT ------------------------------------------------------------------
ALLOC_MB = 200  # an allocation far above the interpreter's own noise
RSS_SLACK_MB = 40  # page-size rounding, allocator arenas, numpy's temporaries


PEAK_SPANS = """
import json, sys
import numpy as np
from tools.benchkit.common import PeakRss, _status_mb
memory = PeakRss()
memory.start()
big = np.ones(int(sys.argv[1]) * 2**20 // 8)  # touched: resident
held = memory.stop()
del big
resident = _status_mb("VmRSS")
memory.start()
after = memory.stop()
print(json.dumps({"held": held, "resident": resident, "after": after, "overall": memory.overall,
                  "separable": memory.separable}))
"""


def test_peak_rss_per_span() -> None:
    """In a fresh interpreter (a long test process's allocator may keep freed pages resident): a span
    started after a large allocation was freed reports the RSS left, not the earlier peak."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", PEAK_SPANS, str(ALLOC_MB)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    m = json.loads(run.stdout)
    if not m["separable"]:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    if m["resident"] is None or m["held"] - m["resident"] < ALLOC_MB - RSS_SLACK_MB:
        pytest.skip(f"freed memory stays resident here: {m}")
    assert m["after"] < m["resident"] + RSS_SLACK_MB, m  # a span forgets the previous one's peak
    assert m["overall"] >= m["held"] > ALLOC_MB, m


def test_family_defaults_and_budgets(tiny_bundle: Path) -> None:
    from runtime.errors import SettingError
    from tools.benchkit.common import FlatVision, TiledVision, open_vision

    flat = open_vision(tiny_bundle)
    assert isinstance(flat, FlatVision) and flat.default_tokens == (64, 128, 192)
    assert flat.budgets("none", (64,)) == (576,) and flat.budgets("entropy", (64, 32)) == (64, 32)
    with pytest.raises(SettingError, match="tokens must be in 1..576"):
        flat.budgets("entropy", (577,))
    assert TiledVision.default_tokens == (640, 320, 160)


def _tiny_gguf(path: Path, width: int) -> Path:
    from tools.make_random_gguf import Shape, make_random_gguf

    return make_random_gguf(path, Shape(layers=2, embd=width, ff=2 * width, heads=4, kv_heads=2, vocab=300,
                                        ctx=4096), quant="f32")


@pytest.mark.llm
def test_bench_on_a_llava_next_bundle(tiny_next_bundle: Path, tmp_path: Path, capsys) -> None:
    """Every K of the NeXT defaults plus all rows; rows fed = what AnyresPipeline feeds (newlines included)."""
    from PIL import Image

    from runtime.anyres.pipeline import AnyresPipeline
    from tools.bench import main
    from tools.benchkit.common import sample_images

    gguf_path = _tiny_gguf(tmp_path / "next.gguf", 64)  # the tiny projector's width: the real rows are fed
    out = tmp_path / "out"
    assert main(["--model", str(tiny_next_bundle), "--gguf", str(gguf_path), "--strategies", "none", "entropy",
                 "entropyprune", "--images", "1", "--repeats", "1", "--decode-tokens", "2", "--threads", "2",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    table = table_rows(stdout)
    pipeline = AnyresPipeline(tiny_next_bundle)
    image = Image.fromarray(sample_images(1)[0])
    expected = {("none", 0): pipeline.prune(image, 1, "none")} | {
        ("entropy", k): pipeline.prune(image, k, "entropy") for k in (640, 320, 160)}
    assert set(table) == {(s, p.tokens) for (s, _), p in expected.items()}
    assert "skipped entropyprune: strategy 'entropyprune' needs" in stdout and "LLaVA-NeXT" in stdout  # no export.llm
    data = json.loads((out / "bench.json").read_text())
    assert data["family"] == "llava-next" and data["llm"]["random_rows"] is False and data["peak_rss_mb"] > 0
    assert isinstance(data["rss_per_run"], bool)
    with (out / "bench.csv").open() as handle:
        csv_rows = {(r["strategy"], int(r["tokens"])): r for r in csv.DictReader(handle)}
    prompt = {row["prefill_positions"] - row["rows_fed"] for row in data["rows"]}
    assert len(prompt) == 1 and prompt.pop() > 0  # prompt tokens + the rows fed, whatever K
    for (strategy, _), pruned in expected.items():
        key = (strategy, pruned.tokens)
        row = next(r for r in data["rows"] if (r["strategy"], r["tokens"]) == key)
        rows_fed, newlines = pruned.embeddings.shape[0], int(pruned.order.is_newline.sum())
        assert (row["rows_fed"], row["newline_rows"]) == (rows_fed, newlines), key
        assert (int(table[key]["rows fed"]), int(table[key]["newline rows"])) == (rows_fed, newlines)
        assert (int(csv_rows[key]["rows_fed"]), int(csv_rows[key]["newline_rows"])) == (rows_fed, newlines)
        assert float(csv_rows[key]["peak_rss_mb"]) == row["peak_rss_mb"] > 0
        assert all(row["stages_ms"][s] > 0 for s in ("preprocess", "encode", "prune", "projector", "prefill"))
        assert row["stages_ms"]["probe"] == 0 and math.isclose(row["ttft_ms"], sum(row["stages_ms"].values()))
    assert expected[("none", 0)].embeddings.shape[0] == expected[("none", 0)].total_rows  # all rows
    # negative control: a bench that fed (or counted) no newline rows would not match
    bare = pipeline.prune(image, 320, "entropy", newline="none")
    assert bare.embeddings.shape[0] != data["rows"][[r["tokens"] for r in data["rows"]].index(320)]["rows_fed"]
    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and png.size[0] > 400


@pytest.mark.llm
def test_bench_runs_a_probe_strategy_on_a_llava_next_bundle(tiny_next_llm_bundle: Path) -> None:
    """The bundle's own GGUF and probe: fastv's one probe of every packed row is timed apart, and the rows
    fed are what AnyresPipeline feeds with that probe."""
    from PIL import Image

    from runtime.anyres.pipeline import AnyresPipeline
    from runtime.llm.probe import DEFAULT_QUESTION, probe_from_manifest
    from tools.bench import BenchConfig, run_bench
    from tools.benchkit.common import sample_images

    bundle = tiny_next_llm_bundle
    result = run_bench(BenchConfig(bundle, strategies=("fastv",), tokens=(64,), images=1, repeats=1, decode_tokens=2,
                                   threads=2))
    (row,) = result.rows
    assert (row.strategy, row.tokens) == ("fastv", 64) and row.stages_ms["probe"] > 0 and not result.skipped
    pipeline = AnyresPipeline(bundle)
    probe = probe_from_manifest(pipeline.manifest, DEFAULT_QUESTION, n_threads=2, n_ctx=pipeline.probe_context())
    expected = pipeline.prune(Image.fromarray(sample_images(1)[0]), 64, "fastv", probe=probe)
    assert (row.rows_fed, row.newline_rows) == (expected.embeddings.shape[0], int(expected.order.is_newline.sum()))
