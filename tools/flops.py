"""Theoretical FLOPs per strategy and budget: vision encoder, projector, probe, selection, LLM prefill.

``python tools/flops.py [--models llava-1.5-7b llava-1.5-13b] [--tokens 192 128 64] [--prompt-tokens 60]
[--mlp fastv swiglu] [--strategies ...] [--probe-layer P] [--json]``

Counting convention (FastV's, used by the seed paper's Table 4): one multiply-accumulate is one
FLOP; biases, norms, softmax, activations, RoPE and the LM head of the single last position are
ignored. With n tokens, width d and MLP width m:

- LLM decoder layer, FastV: ``4nd² + 2n²d + 2ndm`` (Q, K, V, O projections; QKᵀ and AV; up and
  down). SwiGLU variant (LLaMA's gate, up and down): ``4nd² + 2n²d + 3ndm``. Prefill = L layers
  over ``n = prompt text tokens + K image tokens``.
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
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError
from runtime.model_registry import load_spec
from runtime.strategies.registry import available, get_strategy

COST_MODELS = ("none", "uniform", "fastervlm", "visionzip", "entropy", "divprune", "entropyprune", "fastv",
               "cdpruner", "dart")
MLP_FORMULAS = {"fastv": "4nd² + 2n²d + 2ndm", "swiglu": "4nd² + 2n²d + 3ndm"}
TERA = 1e12


@dataclass(frozen=True)
class VisionShape:
    """CLIP ViT-L/14-336 as LLaVA-1.5 runs it."""

    blocks: int = 23  # f: blocks computed (vision_feature_layer = -2 of 24)
    width: int = 1024  # D
    mlp: int = 4096  # M
    heads: int = 16  # H
    patch: int = 14  # p
    image: int = 336  # S

    @property
    def num_patches(self) -> int:
        """N = (S / p)²."""
        return (self.image // self.patch) ** 2


@dataclass(frozen=True)
class LlmShape:
    """A LLaMA decoder stack."""

    layers: int  # L
    width: int  # d
    mlp: int  # m
    heads: int  # h
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class TextShape:
    """CLIP ViT-L/14-336's text tower (cdpruner, method.md §7): 77 positions per segment."""

    layers: int = 12
    width: int = 768
    mlp: int = 3072
    positions: int = 77
    projection: int = 768  # P: CLIP's joint embedding width


@dataclass(frozen=True)
class ModelShape:
    alias: str
    vision: VisionShape
    llm: LlmShape  # the projector maps D -> llm.width -> llm.width
    text: TextShape = TextShape()


SHAPES = {
    "llava-1.5-7b": ModelShape("llava-1.5-7b", VisionShape(), LlmShape(32, 4096, 11008, 32, 32)),
    "llava-1.5-13b": ModelShape("llava-1.5-13b", VisionShape(), LlmShape(40, 5120, 13824, 40, 40)),
}


@dataclass(frozen=True)
class Cost:
    """FLOPs of one strategy at one budget, per stage."""

    strategy: str
    tokens: int  # K image tokens fed to the LLM
    vision: int
    projector: int
    probe: int
    select: int
    llm: int
    text: int = 0  # cdpruner: the CLIP text tower on the question and V = projection of the N features

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.probe + self.select + self.llm + self.text


def llm_layer_flops(n: int, d: int, m: int, swiglu: bool = False) -> int:
    """One transformer layer over n tokens: ``4nd² + 2n²d + 2ndm`` (``3ndm`` with swiglu).

    Example: ``llm_layer_flops(1, 1, 1)`` -> 8; ``llm_layer_flops(2, 3, 5)`` -> 72 + 24 + 60 = 156.
    """
    if min(n, d, m) < 0:
        raise ValueError(f"n, d, m must be >= 0, got {n}, {d}, {m}")
    return 4 * n * d * d + 2 * n * n * d + (3 if swiglu else 2) * n * d * m


def llm_prefill_flops(n: int, llm: LlmShape, swiglu: bool = False) -> int:
    """All L layers over n tokens. Example: L=2, d=m=1, n=1 -> 16."""
    return llm.layers * llm_layer_flops(n, llm.width, llm.mlp, swiglu)


def vision_flops(vision: VisionShape) -> int:
    """Patch embedding ``N·3p²·D`` plus f blocks over N + 1 tokens (GELU MLP: ``2nDM``).

    Example: CLIP-L/14-336, f = 23 -> 346,816,512 + 23 · 7,942,178,816 = 183,016,929,280.
    """
    n = vision.num_patches
    embed = n * 3 * vision.patch**2 * vision.width
    return embed + vision.blocks * llm_layer_flops(n + 1, vision.width, vision.mlp, swiglu=False)


def projector_flops(rows: int, d_in: int, width: int) -> int:
    """Two-layer MLP ``d_in -> width -> width`` on ``rows`` tokens. Example: (1, 2, 3) -> 6 + 9 = 15."""
    return rows * (d_in * width + width * width)


def contextual_tokens(budget: int) -> int:
    """VisionZip's C = round(5K/32), halves up (as the runtime). Example: 64 -> 10, 192 -> 30."""
    return math.floor(5 * budget / 32 + 0.5)


def probe_flops(strategy: str, prompt: int, model: ModelShape, probe_layer: int, swiglu: bool) -> int:
    """P−1 layers over prompt + N, plus layer P−1's projections the strategy's scores read; 0 if no probe.
    dart runs the final-norm probe too (P more layers) and W_k on all T rows."""
    if not get_strategy(strategy).needs_probe:
        return 0
    llm, t = model.llm, prompt + model.vision.num_patches
    layers = (probe_layer - 1) * llm_layer_flops(t, llm.width, llm.mlp, swiglu)
    keys = t * llm.width * llm.kv_heads * llm.head_dim  # W_k on all T rows
    if strategy == "dart":
        return layers + probe_layer * llm_layer_flops(t, llm.width, llm.mlp, swiglu) + keys
    if strategy == "fastv":
        return layers + keys + llm.width * llm.width
    return layers + model.vision.num_patches * llm.width * llm.width  # entropyprune: W_q on the image rows


def select_flops(strategy: str, budget: int, prompt: int, model: ModelShape) -> int:
    """The strategy's own matrix products (see the module docstring); 0 for the cheap ones."""
    n, vision, llm = model.vision.num_patches, model.vision, model.llm
    if strategy == "entropy":
        return n * budget * vision.width
    if strategy == "visionzip":
        c = contextual_tokens(budget)
        return (n - budget + c) * c * (vision.width // vision.heads)
    if strategy == "divprune":
        return n * n * llm.width
    if strategy == "entropyprune":
        return n * (llm.heads**2 * llm.head_dim + llm.heads**3)
    if strategy == "fastv":
        return (prompt + n) * llm.width
    if strategy == "cdpruner":  # the N×N kernel on E, N·M·P relevance cosines, the greedy loop's K²·N
        return n * n * llm.width + n * model.text.projection + budget * budget * n
    if strategy == "dart":  # key L1 norms, then each of the 8 pivots' cosines against the N rows
        return (prompt + n) * llm.kv_heads * llm.head_dim + 8 * n * llm.width
    if strategy in ("none", "uniform", "fastervlm"):
        return 0
    raise InputError(f"no cost model for strategy {strategy!r}; known: {', '.join(COST_MODELS)}")


def strategy_cost(strategy: str, budget: int, model: ModelShape, prompt: int = 60, probe_layer: int = 2,
                  swiglu: bool = False) -> Cost:
    """Every stage's FLOPs for ``strategy`` keeping K = ``budget`` image tokens (``none``: K = N)."""
    n, d_in, width = model.vision.num_patches, model.vision.width, model.llm.width
    k = n if strategy == "none" else budget
    if not 1 <= k <= n:
        raise InputError(f"budget K must be in 1..{n}, got {k}")
    projected_all = strategy in ("divprune", "entropyprune", "fastv", "cdpruner", "dart")
    return Cost(
        strategy=strategy, tokens=k, vision=vision_flops(model.vision),
        projector=projector_flops(k + (n if projected_all else 0), d_in, width),
        probe=probe_flops(strategy, prompt, model, probe_layer, swiglu),
        select=select_flops(strategy, k, prompt, model),
        llm=llm_prefill_flops(prompt + k, model.llm, swiglu),
        text=text_flops(model) if strategy == "cdpruner" else 0,
    )


def text_flops(model: ModelShape, segments: int = 1) -> int:
    """cdpruner's CLIP side: the text tower on ``segments`` × 77 positions (GELU MLP) and its
    projection, plus V = visual_projection of the N features (D·P each; the layer norm ignored).

    Example (CLIP-L/14-336, one segment): 12 · 554,104,320 + 768² + 576 · 1024 · 768 = 7,102,826,496.
    """
    t, v = model.text, model.vision
    tower = segments * t.layers * llm_layer_flops(t.positions, t.width, t.mlp)
    return tower + t.width * t.projection + v.num_patches * v.width * t.projection


@dataclass(frozen=True)
class CostTable:
    """One model under one layer formula: the baseline row first."""

    model: ModelShape
    mlp: str  # a key of MLP_FORMULAS
    prompt: int  # prompt text tokens
    probe_layer: int  # P
    rows: tuple[Cost, ...]

    def to_json(self) -> dict[str, Any]:
        """FLOPs as exact integers, fractions of the baseline as floats."""
        base = self.rows[0]
        return {"model": self.model.alias, "mlp": self.mlp, "layer_formula": MLP_FORMULAS[self.mlp],
                "prompt_tokens": self.prompt, "probe_layer": self.probe_layer,
                "rows": [{**asdict(r), "total": r.total, "llm_fraction": r.llm / base.llm,
                          "total_fraction": r.total / base.total} for r in self.rows]}


def cost_table(model: ModelShape, strategies: Sequence[str], budgets: Sequence[int], prompt: int,
               probe_layer: int, mlp: str) -> CostTable:
    """The baseline (none, K = N) first, then each other strategy at each budget below N."""
    n, swiglu = model.vision.num_patches, mlp == "swiglu"
    rows = [strategy_cost("none", n, model, prompt, probe_layer, swiglu)]
    for name in strategies:
        if name != "none":
            rows += [strategy_cost(name, k, model, prompt, probe_layer, swiglu) for k in budgets if k < n]
    return CostTable(model, mlp, prompt, probe_layer, tuple(rows))


def markdown(table: CostTable) -> str:
    """The table in TFLOPs (10¹² multiply-accumulates) with percentages of the baseline row."""
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
    for r in table.rows:
        stages = " | ".join(f"{v / TERA:.4f}" for v in (r.vision, r.projector, r.text, r.probe, r.select, r.llm,
                                                          r.total))
        lines.append(f"| {r.strategy} | {r.tokens} | {stages} | {100 * r.llm / base.llm:.1f} % "
                     f"| {100 * r.total / base.total:.1f} % |")
    return "\n".join(lines)


def report(models: Sequence[str], strategies: Sequence[str], budgets: Sequence[int], prompt: int,
           mlps: Sequence[str], probe_layer: int | None) -> list[CostTable]:
    """Every (model, formula) table; bad arguments are one-line InputErrors."""
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise InputError(f"no shapes for model(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    for name in strategies:
        get_strategy(name)  # an unknown name lists the registered ones
    missing = [s for s in strategies if s not in COST_MODELS]
    if missing:
        raise InputError(f"no cost model for strategy(ies) {', '.join(missing)}; known: {', '.join(COST_MODELS)}")
    if prompt < 0 or any(k < 1 for k in budgets) or (probe_layer is not None and probe_layer < 1):
        raise InputError(f"need --prompt-tokens >= 0, --tokens >= 1 and --probe-layer >= 1; "
                         f"got {prompt}, {list(budgets)}, {probe_layer}")
    too_big = [(m, k) for m in models for k in budgets if k > SHAPES[m].vision.num_patches]
    if too_big:
        raise InputError(f"--tokens must not exceed the image tokens N: {too_big[0][1]} > "
                         f"{SHAPES[too_big[0][0]].vision.num_patches} ({too_big[0][0]})")
    tables = []
    for alias in models:
        p = probe_layer if probe_layer is not None else load_spec(alias).entropyprune_layer
        tables += [cost_table(SHAPES[alias], strategies, budgets, prompt, p, mlp) for mlp in mlps]
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
    parser.add_argument("--models", nargs="+", default=list(SHAPES), help=f"of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[192, 128, 64],
                        help="budgets K; the 576-token baseline is always listed (default: 192 128 64)")
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
        tables = report(args.models, strategies, args.tokens, args.prompt_tokens, args.mlp, args.probe_layer)
        if args.json:
            print(json.dumps({"tables": [t.to_json() for t in tables]}))
        else:
            print("\n\n".join(markdown(t) for t in tables))
        return 0

    return run_cli(body, "flops")


if __name__ == "__main__":
    raise SystemExit(main())
