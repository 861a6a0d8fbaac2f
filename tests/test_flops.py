"""tools/flops.py: hand-computed FLOP counts, a matmul-shape loop reference, monotonicity and the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.strategies.registry import available
from runtime.strategies.visionzip import contextual_count
from tools.benchkit import flops_model as flops  # the cost model's module: a monkeypatched count is what runs
from tools.benchkit.flops_model import (
    COST_MODELS,
    SHAPES,
    VisionShape,
    contextual_tokens,
    llm_layer_flops,
    llm_prefill_flops,
    projector_flops,
    strategy_cost,
    vision_flops,
)
from tools.flops import main, report

LLAVA_7B, LLAVA_13B = SHAPES["llava-1.5-7b"], SHAPES["llava-1.5-13b"]
N = 576
BUDGETS = (576, 192, 128, 64)

# One 7B decoder layer over n = 60 prompt + 576 image = 636 tokens, FastV formula, d = 4096, m = 11008:
#   4 n d² = 4 · 636 · 16,777,216           = 42,681,237,504
#   2 n² d = 2 · 404,496 · 4096             =  3,313,631,232
#   2 n d m = 2 · 636 · 4096 · 11008        = 57,352,912,896
#   sum                                     = 103,347,781,632 per layer; × 32 layers = 3,307,129,012,224
LAYER_7B_636 = 103_347_781_632
PREFILL_7B_576 = 3_307_129_012_224
# CLIP-L/14-336 up to block 23: one block over 577 tokens, D = 1024, M = 4096:
#   4·577·1024² + 2·577²·1024 + 2·577·1024·4096 = 2,420,113,408 + 681,838,592 + 4,840,226,816 = 7,942,178,816
#   patch embedding 576 · (3·14·14) · 1024 = 346,816,512;  total 23 · 7,942,178,816 + 346,816,512
VISION = 183_016_929_280
PROJECTOR_7B_PER_TOKEN = 1024 * 4096 + 4096 * 4096  # 20,971,520
PROJECTOR_13B_PER_TOKEN = 1024 * 5120 + 5120 * 5120  # 31,457,280


def layer_loop_reference(n: int, d: int, m: int, swiglu: bool, kv: int | None = None) -> int:
    """Sum of a·b·c over every matmul [a, b] @ [b, c] of one layer, written out one by one
    (``kv``: the K and V projections' width under grouped-query attention; d without)."""
    kv = d if kv is None else kv
    matmuls = [(n, d, d), (n, d, kv), (n, d, kv), (n, d, d)]  # Q, K, V, O projections
    matmuls += [(n, d, n), (n, n, d)]  # Q Kᵀ, then A V
    matmuls += [(n, d, m), (n, m, d)] + ([(n, d, m)] if swiglu else [])  # up, down (+ gate)
    total = 0
    for a, b, c in matmuls:
        total += a * b * c
    return total


def test_layer_hand_cases() -> None:
    assert llm_layer_flops(1, 1, 1) == 4 + 2 + 2
    assert llm_layer_flops(1, 1, 1, swiglu=True) == 4 + 2 + 3
    assert llm_layer_flops(2, 3, 5) == 4 * 2 * 9 + 2 * 4 * 3 + 2 * 2 * 3 * 5 == 156
    assert llm_layer_flops(2, 3, 5, swiglu=True) == 72 + 24 + 90
    assert llm_layer_flops(636, 4096, 11008) == LAYER_7B_636


def layer_mismatches() -> list[tuple[int, int, int, bool]]:
    """Random shapes where tools.flops' layer count, alone or inside the prefill count, differs
    from the matmul loop (looked up on the module, so a monkeypatched variant is what runs)."""
    rng = np.random.default_rng(0)
    bad = []
    for n, d, m in rng.integers(1, 5000, size=(50, 3)).tolist():
        for swiglu in (False, True):
            llm = dataclasses.replace(LLAVA_7B.llm, width=d, mlp=m)
            expected = layer_loop_reference(n, d, m, swiglu)
            if (flops.llm_layer_flops(n, d, m, swiglu) != expected
                    or flops.llm_prefill_flops(n, llm, swiglu) != llm.layers * expected):
                bad.append((n, d, m, swiglu))
    return bad


def test_layer_matches_matmul_loop_on_random_shapes() -> None:
    assert layer_mismatches() == []


def test_layer_negative_control_forgotten_gate(monkeypatch) -> None:
    """A layer count that forgets the SwiGLU gate projection fails the same loop comparison."""
    correct = flops.llm_layer_flops
    monkeypatch.setattr(flops, "llm_layer_flops", lambda n, d, m, swiglu=False, kv=None: correct(n, d, m, kv=kv))
    assert {case[3] for case in layer_mismatches()} == {True}  # every SwiGLU shape, no other


@given(st.integers(0, 4000), st.integers(1, 8192), st.integers(1, 30000))
def test_layer_properties(n: int, d: int, m: int) -> None:
    assert llm_layer_flops(n + 1, d, m) > llm_layer_flops(n, d, m)
    assert llm_layer_flops(n, d, m, swiglu=True) - llm_layer_flops(n, d, m) == n * d * m


def test_7b_and_13b_prefill_of_the_576_baseline() -> None:
    assert llm_prefill_flops(60 + N, LLAVA_7B.llm) == PREFILL_7B_576
    assert strategy_cost("none", N, LLAVA_7B).llm == PREFILL_7B_576
    # 13B: 40 · (4·636·5120² + 2·636²·5120 + 2·636·5120·13824)
    assert llm_prefill_flops(636, LLAVA_13B.llm) == 40 * (66_689_433_600 + 4_142_039_040 + 90_030_735_360)


def test_vision_and_projector_hand_numbers() -> None:
    assert VisionShape().num_patches == N
    assert vision_flops(LLAVA_7B.vision) == VISION
    assert projector_flops(1, 2, 3) == 15
    assert projector_flops(N, 1024, 4096) == N * PROJECTOR_7B_PER_TOKEN
    assert strategy_cost("none", N, LLAVA_13B).projector == N * PROJECTOR_13B_PER_TOKEN


def test_probe_and_project_all_costs() -> None:
    ep = strategy_cost("entropyprune", 64, LLAVA_7B, prompt=60, probe_layer=2)
    assert ep.probe == LAYER_7B_636 + N * 4096 * 4096  # P-1 = 1 layer over 636 tokens + W_q on 576 rows
    fastv = strategy_cost("fastv", 64, LLAVA_7B, prompt=60, probe_layer=2)
    assert fastv.probe == LAYER_7B_636 + 636 * 4096 * 4096 + 4096 * 4096  # W_k on all rows, W_q on the last
    assert strategy_cost("entropyprune", 64, LLAVA_7B, probe_layer=3).probe == 2 * LAYER_7B_636 + N * 4096**2
    for name in ("divprune", "entropyprune", "fastv"):
        assert strategy_cost(name, 64, LLAVA_7B).projector == (N + 64) * PROJECTOR_7B_PER_TOKEN, name
    for name in ("uniform", "fastervlm", "visionzip", "entropy"):
        cost = strategy_cost(name, 64, LLAVA_7B)
        assert cost.projector == 64 * PROJECTOR_7B_PER_TOKEN and cost.probe == 0, name
    assert strategy_cost("divprune", 64, LLAVA_7B).select == N * N * 4096
    assert strategy_cost("entropy", 64, LLAVA_7B).select == N * 64 * 1024


def test_question_aware_costs() -> None:
    # CLIP text tower, one 77-position segment: 12 · (4·77·768² + 2·77²·768 + 2·77·768·3072)
    #   = 12 · (181,665,792 + 9,106,944 + 363,331,584) = 6,649,251,840; + 768² + 576·1024·768
    cd = strategy_cost("cdpruner", 64, LLAVA_7B)
    assert cd.text == 6_649_251_840 + 589_824 + 452_984_832 and cd.probe == 0
    assert cd.select == N * N * 4096 + N * 768 + 64 * 64 * N
    assert cd.projector == (N + 64) * PROJECTOR_7B_PER_TOKEN
    dart = strategy_cost("dart", 64, LLAVA_7B, prompt=60, probe_layer=2)
    # probe.gguf: P-1 = 1 layer; probe_final.gguf: P = 2 layers; W_k on all 636 rows
    assert dart.probe == 3 * LAYER_7B_636 + 636 * 4096 * 4096 and dart.text == 0
    assert dart.select == 636 * 4096 + 8 * N * 4096


@pytest.mark.parametrize("model", [LLAVA_7B, LLAVA_13B], ids=lambda m: m.alias)
@pytest.mark.parametrize("swiglu", [False, True])
def test_smaller_budgets_cost_less(model, swiglu: bool) -> None:
    for name in COST_MODELS[1:]:
        llm = [strategy_cost(name, k, model, swiglu=swiglu).llm for k in BUDGETS]
        total = [strategy_cost(name, k, model, swiglu=swiglu).total for k in BUDGETS]
        assert llm == sorted(llm, reverse=True) and len(set(llm)) == len(llm), name
        assert total == sorted(total, reverse=True) and len(set(total)) == len(total), name
    keep_all = strategy_cost("none", N, model, swiglu=swiglu)
    assert strategy_cost("uniform", N, model, swiglu=swiglu).total == keep_all.total


def test_visionzip_contextual_count_matches_runtime() -> None:
    assert [contextual_tokens(k) for k in (64, 128, 192)] == [10, 20, 30]
    assert all(contextual_tokens(k) == contextual_count(k) for k in range(1, N + 1))


def test_every_registered_strategy_has_a_cost_model() -> None:
    assert set(available()) <= set(COST_MODELS)


def test_report_fractions_and_order() -> None:
    (table,) = report(["llava-1.5-7b"], ["entropy", "none"], [576, 64], 60, ["fastv"], None)
    assert table.probe_layer == 2  # from models/llava-1.5-7b.json
    assert [(r.strategy, r.tokens) for r in table.rows] == [("none", N), ("entropy", 64)]
    rows = table.to_json()["rows"]
    assert rows[0]["total_fraction"] == 1.0 and rows[0]["llm_fraction"] == 1.0
    assert rows[1]["llm_fraction"] == pytest.approx(llm_prefill_flops(124, LLAVA_7B.llm) / PREFILL_7B_576)


def test_cli_markdown(capsys) -> None:
    assert main(["--models", "llava-1.5-7b", "--mlp", "fastv", "swiglu"]) == 0
    out = capsys.readouterr().out
    assert "4nd² + 2n²d + 2ndm" in out and "4nd² + 2n²d + 3ndm" in out
    assert out.count("| none | 576 |") == 2 and "| entropy | 64 |" in out
    assert "| 3.3071 |" in out  # the 576-token 7B prefill, FastV formula, in TFLOPs


def test_cli_json(capsys) -> None:
    assert main(["--json", "--tokens", "64", "--mlp", "fastv", "--strategies", "none", "fastv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    tables = json.loads(lines[0])["tables"]
    assert [t["model"] for t in tables] == ["llava-1.5-7b", "llava-1.5-13b"]
    assert tables[0]["rows"][0]["llm"] == PREFILL_7B_576 and tables[0]["rows"][1]["strategy"] == "fastv"


def exit_code(argv: list[str]) -> int:
    """main's return value, or argparse's SystemExit code."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


@pytest.mark.parametrize("argv", [["--models", "llava-9b"], ["--strategies", "bogus"], ["--tokens", "0"],
                                  ["--prompt-tokens", "-1"], ["--mlp", "relu"]])
def test_cli_errors_are_one_line_exit_2(argv: list[str], capsys) -> None:
    code = exit_code(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error" in err[0], err


# ---- LLaVA-NeXT (method.md §5): 2×2 grid at 672×672 + base view = T = 5 tiles ----------------------------
VICUNA, MISTRAL = SHAPES["llava-v1.6-vicuna-7b"], SHAPES["llava-v1.6-mistral-7b"]
NEXT_ROWS = 576 + 48 * 48 + 48  # base view + packed 2×2 grid + one image_newline per packed row = 2928
NEXT_N = 5 * 576  # 2880 candidates
# Vicuna (LLaMA-7B, MHA) layer over n = 60 + 2928 = 2988, FastV formula:
#   4 n d² = 4 · 2988 · 4096²          = 200,521,285,632
#   2 n² d = 2 · 2988² · 4096          =  73,139,355,648
#   2 n d m = 2 · 2988 · 4096 · 11008  = 269,450,477,568
#   sum 543,111,118,848 per layer; × 32 = 17,379,555,803,136 (SwiGLU: 3ndm = 404,175,716,352, sum 677,836,357,632)
PREFILL_VICUNA_NEXT = 17_379_555_803_136
# Mistral (GQA: 8 kv heads × 128 = 1024 K/V columns, m = 14336) over 2988, SwiGLU:
#   2 n d² (Q, O)      = 2 · 2988 · 4096²         = 100,260,642,816
#   2 n d · 1024 (K, V) = 2 · 2988 · 4096 · 1024  =  25,065,160,704
#   2 n² d                                         =  73,139,355,648
#   3 n d m = 3 · 2988 · 4096 · 14336             = 526,368,374,784
#   sum 724,833,533,952 per layer; × 32 = 23,194,673,086,464
PREFILL_MISTRAL_NEXT_SWIGLU = 23_194_673_086_464


def test_gqa_layer_hand_case_and_loop() -> None:
    assert llm_layer_flops(2, 3, 5, kv=1) == 2 * 2 * 9 + 2 * 2 * 3 * 1 + 2 * 4 * 3 + 2 * 2 * 3 * 5 == 132
    assert llm_layer_flops(2, 3, 5, kv=3) == llm_layer_flops(2, 3, 5)  # kv = d: MHA, unchanged
    for n, d, m, kv in np.random.default_rng(1).integers(1, 3000, size=(30, 4)).tolist():
        for swiglu in (False, True):
            assert llm_layer_flops(n, d, m, swiglu, kv) == layer_loop_reference(n, d, m, swiglu, kv)
    assert MISTRAL.llm.kv_width == 1024 and VICUNA.llm.kv_width == 4096 == LLAVA_7B.llm.kv_width


def test_next_shapes_and_rows() -> None:
    for model in (VICUNA, MISTRAL):
        assert (model.tiles, model.candidates, model.newline_rows, model.image_rows) == (5, NEXT_N, 48, 2928)
        assert model.tile_budgets(640) == [128] * 5 and model.tile_budgets(11) == [3, 2, 2, 2, 2]
    assert NEXT_ROWS == 2928 and LLAVA_7B.image_rows == N and LLAVA_7B.tiles == 1 and LLAVA_7B.kept_newlines(64) == 0
    assert VICUNA.kept_newlines(640) == 48 and VICUNA.kept_newlines(NEXT_N) == 48
    assert VICUNA.kept_newlines(10) == 8  # 2 base + 8 grid tokens: at most 8 packed rows kept one
    assert (MISTRAL.llm.layers, MISTRAL.llm.width, MISTRAL.llm.mlp, MISTRAL.llm.heads) == (32, 4096, 14336, 32)


def test_next_baseline_hand_numbers() -> None:
    base = strategy_cost("none", 1, VICUNA)  # none keeps every candidate whatever the budget
    assert (base.tokens, base.newlines) == (NEXT_N, 48)
    assert base.vision == 5 * VISION == 915_084_646_400
    assert base.projector == NEXT_N * PROJECTOR_7B_PER_TOKEN  # the newline rows are a stored vector
    assert base.llm == PREFILL_VICUNA_NEXT == 32 * 543_111_118_848
    assert strategy_cost("none", 1, VICUNA, swiglu=True).llm == 32 * 677_836_357_632
    assert strategy_cost("none", 1, MISTRAL, swiglu=True).llm == PREFILL_MISTRAL_NEXT_SWIGLU
    assert base.probe == base.select == base.text == 0
    assert base.total == 915_084_646_400 + NEXT_N * PROJECTOR_7B_PER_TOKEN + PREFILL_VICUNA_NEXT


def test_next_pruned_costs_per_tile() -> None:
    # K = 640: 128 per tile; LLM over 60 + 640 + 48 newline rows (the upper bound) = 748
    ent = strategy_cost("entropy", 640, VICUNA)
    assert ent.newlines == 48 and ent.vision == 5 * VISION
    assert ent.llm == 32 * (4 * 748 * 4096**2 + 2 * 748**2 * 4096 + 2 * 748 * 4096 * 11008) == 32 * 122_233_683_968
    assert ent.select == 5 * 576 * 128 * 1024 and ent.projector == 640 * PROJECTOR_7B_PER_TOKEN
    div = strategy_cost("divprune", 640, VICUNA)
    assert div.select == 5 * 576 * 576 * 4096  # per tile, not 2880² · 4096
    assert div.projector == (NEXT_N + 640) * PROJECTOR_7B_PER_TOKEN
    cd = strategy_cost("cdpruner", 320, VICUNA)  # 64 per tile
    assert cd.select == 5 * (576 * 576 * 4096 + 576 * 768 + 64 * 64 * 576)
    assert cd.text == 6_649_251_840 + 589_824 + NEXT_N * 1024 * 768  # the tower once per image, V per patch
    vz = strategy_cost("visionzip", 160, VICUNA)  # 32 per tile, C = 5
    assert vz.select == 5 * (576 - 32 + 5) * 5 * 64
    uneven = strategy_cost("entropy", 11, VICUNA)  # k_t = 3, 2, 2, 2, 2
    assert uneven.select == 576 * 11 * 1024 and uneven.newlines == 8


def test_next_probe_over_every_row() -> None:
    t = 60 + 2928
    layer = llm_layer_flops(t, 4096, 11008)
    fastv = strategy_cost("fastv", 320, VICUNA, prompt=60, probe_layer=2)
    assert fastv.probe == layer + t * 4096 * 4096 + 4096 * 4096 and fastv.select == t * 4096
    ep = strategy_cost("entropyprune", 320, VICUNA)
    assert ep.probe == layer + NEXT_N * 4096**2 and ep.select == NEXT_N * (32**2 * 128 + 32**3)
    dart = strategy_cost("dart", 320, MISTRAL, prompt=60, probe_layer=2)
    layer_m = llm_layer_flops(t, 4096, 14336, kv=1024)
    assert dart.probe == 3 * layer_m + t * 4096 * 1024 and dart.select == t * 1024 + 8 * NEXT_N * 4096


@pytest.mark.parametrize("model", [VICUNA, MISTRAL], ids=lambda m: m.alias)
def test_next_smaller_budgets_cost_less(model) -> None:
    for name in COST_MODELS[1:]:
        total = [strategy_cost(name, k, model, swiglu=True).total for k in (NEXT_N, 640, 320, 160)]
        assert total == sorted(total, reverse=True) and len(set(total)) == len(total), name


def test_next_report_uses_next_budgets_and_own_baseline() -> None:
    tables = report(["llava-1.5-7b", "llava-v1.6-vicuna-7b"], ["none", "entropy"], [64], 60, ["fastv"], None)
    assert [(r.strategy, r.tokens) for r in tables[0].rows] == [("none", N), ("entropy", 64)]
    assert [(r.strategy, r.tokens) for r in tables[1].rows] == [("none", NEXT_N), ("entropy", 640),
                                                                 ("entropy", 320), ("entropy", 160)]
    rows = tables[1].to_json()["rows"]
    assert rows[0]["llm"] == PREFILL_VICUNA_NEXT and rows[0]["total_fraction"] == 1.0
    assert rows[1]["llm_fraction"] == pytest.approx(32 * 122_233_683_968 / PREFILL_VICUNA_NEXT)
    (one_by_two,) = report(["llava-v1.6-vicuna-7b"], ["none"], [64], 60, ["fastv"], None, grid=(1, 2))
    assert one_by_two.model.image_rows == 576 + 24 * 48 + 24 and one_by_two.to_json()["tiles"] == 3


def test_cli_next_markdown(capsys) -> None:
    assert main(["--models", "llava-v1.6-vicuna-7b", "llava-v1.6-mistral-7b", "--mlp", "swiglu",
                 "--strategies", "none", "entropy", "divprune", "cdpruner", "dart"]) == 0
    out = capsys.readouterr().out
    assert out.count("| none | 2880 | 48 |") == 2 and out.count("| entropy | 640 | 48 |") == 2
    assert "| cdpruner | 160 | 48 |" in out and "newline rows (≤)" in out and "% of none" in out
    assert "2nd² + 2ndc (GQA, c = 8·128 = 1024)" in out and "T=5 tiles" in out
    assert f"| {PREFILL_MISTRAL_NEXT_SWIGLU / 1e12:.4f} |" in out and "| 100.0 % | 100.0 % |" in out


def test_cli_next_json_and_budget_errors(capsys) -> None:
    assert main(["--json", "--models", "llava-v1.6-mistral-7b", "--next-tokens", "320", "--mlp", "swiglu",
                 "--strategies", "none"]) == 0
    (table,) = json.loads(capsys.readouterr().out)["tables"]
    assert (table["tiles"], table["image_rows"], table["kv_heads"], table["grid"]) == (5, 2928, 8, [2, 2])
    assert table["rows"][0]["llm"] == PREFILL_MISTRAL_NEXT_SWIGLU
    for argv in (["--models", "llava-v1.6-vicuna-7b", "--next-tokens", "2881"], ["--grid", "3", "3"],
                 ["--next-tokens", "0"]):
        assert exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0], err
