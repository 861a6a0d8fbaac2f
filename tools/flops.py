"""Theoretical FLOPs per strategy and budget: vision encoder, projector, probe, selection, LLM prefill.

``python tools/flops.py [--models llava-1.5-7b llava-1.5-13b llava-v1.6-vicuna-7b llava-v1.6-mistral-7b]
[--tokens 192 128 64] [--next-tokens 640 320 160] [--grid 2 2] [--prompt-tokens 60] [--mlp fastv swiglu]
[--strategies ...] [--probe-layer P] [--json]``

Counting convention (FastV's, used by the seed paper's Table 4): one multiply-accumulate is one
FLOP; biases, norms, softmax, activations, RoPE and the LM head of the single last position are
ignored. With n tokens, width d and MLP width m:

- LLM decoder layer, FastV: ``4nd² + 2n²d + 2ndm`` (Q, K, V, O projections; QKᵀ and AV; up and
  down). SwiGLU variant (LLaMA's gate, up and down): ``4nd² + 2n²d + 3ndm``. With grouped-query
  attention (Mistral: 8 kv heads of 32) K and V project to ``c = n_kv·d_head`` columns only:
  ``2nd² + 2ndc`` replaces ``4nd²`` (``c = d`` for LLaMA/Vicuna, so their counts are unchanged).
  Prefill = L layers over ``n = prompt text tokens + K image tokens`` (+ newline rows, LLaVA-NeXT).
- Vision encoder (CLIP ViT-L/14-336, computed up to block f = 23, GELU MLP): patch embedding
  ``N·3p²·D`` plus ``f · (4n D² + 2n² D + 2n D M)`` with ``n = N + 1`` tokens ([CLS] included).
  Every strategy runs the whole encoder.
- Projector (1024 → E → E, E = the LLM width): ``rows · (D·E + E·E)``. As the runtime runs it:
  K rows for the LLM, plus all N rows first for the strategies that look at projected embeddings
  (divprune selects on them, entropyprune and fastv feed them to the probe).
- Probe (entropyprune, fastv; method.md §2, on-device path): P−1 decoder layers over the prompt
  plus all N image tokens, plus layer P−1's projections the scores read: entropyprune ``N·d²``
  (W_q on the image rows), fastv ``T·d·d_kv + d²`` (W_k on all T rows, W_q on the last one).
  The full model then runs all L layers on prompt + K, so the probe's layers are extra.
  dart runs the probe's P−1 layers and the final-norm probe's P layers, plus W_k on all T rows.
- Text tower (cdpruner): CLIP's text transformer (12 layers, width 768, GELU MLP 3072) on one
  77-position segment, its 768² projection, and ``N·D·P`` for the features' visual projection.
- Selection arithmetic beyond O(f·H·N) scoring: entropy (merge "mean") ``N·K·D`` cosines;
  visionzip ``R·C·D/H`` key cosines (C = round(5K/32), R = N − K + C); divprune ``N²·E``
  cosines; entropyprune ``N·(h²·d_h + h³)`` (h×h Gram and its eigen-solve); fastv ``T·d`` (the
  last query against T keys); cdpruner ``N²·E + N·P + K²·N`` (kernel, relevance, greedy MAP);
  dart ``T·d_kv + 8·N·d`` (key norms, 8 pivots' cosines); 0 for none, uniform and fastervlm.

Percentages are of the unpruned baseline (strategy ``none``, all N = 576 tokens) of the same model
and formula. Pruning strategies are listed at every ``--tokens`` budget below N.

LLaVA-NeXT / 1.6 (method.md §5; ``llava-v1.6-vicuna-7b``: LLaMA-7B shape, ``llava-v1.6-mistral-7b``:
Mistral-7B, m = 14336, 8 kv heads). One image of a ``gh × gw`` grid (``--grid``, default 2 2: a
672×672 image, the most common case) sized exactly ``gh·336 × gw·336``, so unpadding removes no
patch: T = 1 + gh·gw tiles (base view first), N_t = 576 candidates per tile, T·576 candidates in
all, and ``gh·24`` packed grid rows, each followed by one ``image_newline`` row. Budgets are
``--next-tokens`` (default 640 320 160), K over all tiles, split as the runtime's default
``tile_budget="equal"`` (``runtime.anyres.tile_budget.split_tile_budget``: 128 per tile at K = 640).

- Vision: the encoder runs T times (T × the single-view count). Projector: K rows, plus all
  T·576 for the strategies that project everything (the ``image_newline`` rows are a stored vector).
- LLM prefill over ``prompt + K + newline rows``. ``none``: 576 + gh·gw·576 + gh·24 rows (2928 for
  2×2). Pruned: the exact newline count is one per packed grid row that kept a token, which depends
  on the picks; the table uses the upper bound ``min(gh·24, grid tokens kept)`` (48 for 2×2 at every
  default budget).
- Vision strategies and cdpruner run per tile as the runtime does (``runtime.anyres.pipeline``):
  select = the sum over tiles with k_t > 0 of the single-view formula at (N_t = 576, k_t), e.g.
  divprune ``Σ_t N_t²·E`` and cdpruner ``Σ_t (N_t²·E + N_t·P + k_t²·N_t)``, not ``(T·576)²·E``;
  cdpruner's text tower runs once per image (the runtime reuses T for every tile), V = T·576·D·P.
- Probe strategies (entropyprune, fastv, dart; ``runtime.anyres.probe``): one
  probe over ``prompt +`` all image rows (2928, newlines included), scores on the T·576 image rows;
  their selection formulas above with N = T·576 and T = prompt + 2928.

Percentages for a NeXT model are of its own ``none`` row (all 2928 rows) under the same formula.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError
from runtime.model_registry import load_spec
from runtime.strategies.registry import available, get_strategy
from tools.benchkit.flops_model import (
    COST_MODELS,
    LLAVA_15,
    MLP_FORMULAS,
    NEXT_GRIDS,
    SHAPES,
    TERA,
    Cost,
    CostTable,
    cost_table,
    with_grid,
)


def markdown(table: CostTable) -> str:
    """The table in TFLOPs (10¹² multiply-accumulates) with percentages of the baseline row."""
    if table.model.grid is not None:
        return _markdown_next(table)
    model, llm, base = table.model, table.model.llm, table.rows[0]
    n = model.vision.num_patches
    lines = [
        f"### {model.alias}: L={llm.layers}, d={llm.width}, m={llm.mlp}; LLM layer = {MLP_FORMULAS[table.mlp]} "
        f"({table.mlp}); n = {table.prompt} prompt + K image tokens; vision: f={model.vision.blocks} blocks over "
        f"N+1={n + 1} tokens; probe: P-1={table.probe_layer - 1} layer(s) over {table.prompt}+{n}; "
        "TFLOPs, 1 FLOP = 1 multiply-accumulate",
        "",
        f"Formulas: LLM prefill = L·({MLP_FORMULAS[table.mlp]}) with n = prompt + K; vision = N·3p²·D + "
        "f·(4nD² + 2n²D + 2nDM) with n = N+1; projector = rows·(D·E + E²) (rows = K, + N for divprune, "
        "entropyprune, fastv, cdpruner, dart); text tower (cdpruner) = 12·layer(77) of CLIP's text width 768 + "
        "768² + N·D·768; probe = (P-1)·layer(prompt + N) + layer P-1's W_q (entropyprune: N·d²) or "
        "W_k/W_q (fastv: T·d·d_kv + d²), dart: (2P-1)·layer(prompt + N) + T·d·d_kv; "
        "select = the strategy's cosine/Gram products.",
        "",
        f"| strategy | K | vision | projector | text tower | probe | select | LLM prefill | total | LLM % of {n} "
        f"| total % of {n} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.strategy} | {r.tokens} | {_cost_cells(r, base)} |" for r in table.rows]
    return "\n".join(lines)


def _cost_cells(row: Cost, base: Cost) -> str:
    """A table row's stage TFLOPs, total and the LLM/total percentages of ``base``, as markdown cells."""
    stages = " | ".join(f"{v / TERA:.4f}" for v in (row.vision, row.projector, row.text, row.probe, row.select,
                                                    row.llm, row.total))
    return f"{stages} | {100 * row.llm / base.llm:.1f} % | {100 * row.total / base.total:.1f} %"


def layer_formula(table: CostTable) -> str:
    """The LLM layer formula as the table uses it: GQA writes the K/V projections with c = n_kv·d_head."""
    llm = table.model.llm
    if llm.kv_width == llm.width:
        return MLP_FORMULAS[table.mlp]
    return MLP_FORMULAS[table.mlp].replace("4nd²", f"2nd² + 2ndc (GQA, c = {llm.kv_heads}·{llm.head_dim} = "
                                                   f"{llm.kv_width})")


def _markdown_next(table: CostTable) -> str:
    """A LLaVA-NeXT table: T tiles, newline rows (an upper bound when pruned), % of the model's own none row."""
    model, llm, base = table.model, table.model.llm, table.rows[0]
    (gh, gw), n_t, side = model.grid, model.vision.num_patches, model.vision.image
    lines = [
        f"### {model.alias}: L={llm.layers}, d={llm.width}, m={llm.mlp}, heads {llm.heads}/{llm.kv_heads} kv; "
        f"LLM layer = {layer_formula(table)} ({table.mlp}); LLaVA-NeXT {gh}×{gw} grid ({gh * side}×{gw * side} "
        f"image, no unpadding): T={model.tiles} tiles × N_t={n_t} = {model.candidates} candidates, "
        f"none feeds {n_t} + {gh * gw * n_t} + {model.newline_rows} newline = {model.image_rows} rows; "
        f"n = {table.prompt} prompt + K + newline rows (pruned: upper bound, one per packed grid row, "
        f"≤ {model.newline_rows}); probe: P-1={table.probe_layer - 1} layer(s) over "
        f"{table.prompt}+{model.image_rows}; TFLOPs, 1 FLOP = 1 multiply-accumulate",
        "",
        f"Formulas: vision = T·(N·3p²·D + f·(4nD² + 2n²D + 2nDM)), n = N+1 per tile; LLM prefill = "
        f"L·layer(prompt + K + newlines); K split over tiles as tile_budget=equal; projector = rows·(D·E + E²) "
        f"(rows = K, + {model.candidates} for divprune, entropyprune, fastv, cdpruner, dart); vision strategies "
        f"and cdpruner select per tile, Σ_t over the T tiles with N_t = {n_t} (divprune Σ N_t²·E, cdpruner "
        f"Σ N_t²·E + N_t·768 + k_t²·N_t), cdpruner's text tower once per image; probe strategies "
        f"one probe over prompt + {model.image_rows} rows, scores on "
        f"{model.candidates} image rows.",
        "",
        "| strategy | K | newline rows (≤) | vision | projector | text tower | probe | select | LLM prefill | total "
        "| LLM % of none | total % of none |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.strategy} | {r.tokens} | {r.newlines} | {_cost_cells(r, base)} |" for r in table.rows]
    return "\n".join(lines)


def report(models: Sequence[str], strategies: Sequence[str], budgets: Sequence[int], prompt: int,
           mlps: Sequence[str], probe_layer: int | None, next_budgets: Sequence[int] = (640, 320, 160),
           grid: Sequence[int] = (2, 2)) -> list[CostTable]:
    """Every (model, formula) table; LLaVA-NeXT models use ``next_budgets`` on a ``grid`` image;
    bad arguments are one-line InputErrors."""
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise InputError(f"no shapes for model(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    for name in strategies:
        get_strategy(name)  # an unknown name lists the registered ones
    missing = [s for s in strategies if s not in COST_MODELS]
    if missing:
        raise InputError(f"no cost model for strategy(ies) {', '.join(missing)}; known: {', '.join(COST_MODELS)}")
    if prompt < 0 or any(k < 1 for k in [*budgets, *next_budgets]) or (probe_layer is not None and probe_layer < 1):
        raise InputError(f"need --prompt-tokens >= 0, --tokens and --next-tokens >= 1 and --probe-layer >= 1; "
                         f"got {prompt}, {list(budgets)}, {list(next_budgets)}, {probe_layer}")
    if tuple(grid) not in NEXT_GRIDS:
        raise InputError(f"--grid must be one of LLaVA-1.6's grids {', '.join(f'{r} {c}' for r, c in NEXT_GRIDS)}; "
                         f"got {' '.join(map(str, grid))}")
    shapes = {alias: with_grid(alias, grid) for alias in models}
    chosen = {alias: (budgets if m.grid is None else next_budgets) for alias, m in shapes.items()}
    too_big = [(m, k) for m in models for k in chosen[m] if k > shapes[m].candidates]
    if too_big:
        flag = "--tokens" if shapes[too_big[0][0]].grid is None else "--next-tokens"
        raise InputError(f"{flag} must not exceed the image tokens N: {too_big[0][1]} > "
                         f"{shapes[too_big[0][0]].candidates} ({too_big[0][0]})")
    tables = []
    for alias in models:
        p = probe_layer if probe_layer is not None else load_spec(alias).entropyprune_layer
        tables += [cost_table(shapes[alias], strategies, chosen[alias], prompt, p, mlp) for mlp in mlps]
    return tables


def default_strategies() -> list[str]:
    """Registered strategies with a cost model, in COST_MODELS order; the others noted on stderr."""
    registered = available()
    for name in registered:
        if name not in COST_MODELS:
            log(f"note: strategy {name!r} has no cost model here; left out")
    return [name for name in COST_MODELS if name in registered]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/flops.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(LLAVA_15),
                        help=f"of {', '.join(SHAPES)} (default: {' '.join(LLAVA_15)})")
    parser.add_argument("--tokens", type=int, nargs="+", default=[192, 128, 64],
                        help="LLaVA-1.5 budgets K; the 576-token baseline is always listed (default: 192 128 64)")
    parser.add_argument("--next-tokens", type=int, nargs="+", default=[640, 320, 160],
                        help="LLaVA-NeXT budgets K over all tiles (newlines excluded); the unpruned pack is "
                             "always listed (default: 640 320 160)")
    parser.add_argument("--grid", type=int, nargs=2, default=[2, 2], metavar=("ROWS", "COLS"),
                        help="LLaVA-NeXT grid tiles besides the base view, image exactly ROWS·336 × COLS·336 "
                             "(default: 2 2, a 672×672 image: 5 tiles, 2928 rows)")
    parser.add_argument("--prompt-tokens", type=int, default=60, help="text tokens of the prompt (default: 60)")
    parser.add_argument("--mlp", nargs="+", choices=list(MLP_FORMULAS), default=list(MLP_FORMULAS),
                        help="LLM layer formula(s): fastv 2ndm, swiglu 3ndm (default: both)")
    parser.add_argument("--strategies", nargs="+", default=None,
                        help="strategies (default: every registered one with a cost model)")
    parser.add_argument("--probe-layer", type=int, default=None,
                        help="EntropyPrune/FastV layer P; the probe runs P-1 layers (default: the registry's, 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of markdown tables")
    args = parser.parse_args(argv)

    def body() -> int:
        strategies = args.strategies or default_strategies()
        tables = report(args.models, strategies, args.tokens, args.prompt_tokens, args.mlp, args.probe_layer,
                        args.next_tokens, args.grid)
        if args.json:
            print(json.dumps({"tables": [t.to_json() for t in tables]}))
        else:
            print("\n\n".join(markdown(t) for t in tables))
        return 0

    return run_cli(body, "flops")


if __name__ == "__main__":
    raise SystemExit(main())
