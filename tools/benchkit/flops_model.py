"""The FLOP cost model behind ``tools/flops.py`` (its docstring states the counting convention and
every formula): model shapes, per-stage counts per strategy and budget, and the table of one model
under one LLM layer formula. Pure integer arithmetic."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from runtime.anyres.tile_budget import split_tile_budget
from runtime.errors import InputError
from runtime.strategies.registry import get_strategy

COST_MODELS = ("none", "uniform", "fastervlm", "visionzip", "entropy", "divprune", "entropyprune", "fastv",
               "cdpruner", "dart")
MLP_FORMULAS = {"fastv": "4nd² + 2n²d + 2ndm", "swiglu": "4nd² + 2n²d + 3ndm"}
TERA = 1e12
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # (rows, cols): LLaVA-1.6 pinpoints / 336


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

    @property
    def kv_width(self) -> int:
        """c = n_kv · d_head: the K and V projections' output width (exactly d without GQA)."""
        return self.width if self.kv_heads == self.heads else self.kv_heads * self.head_dim


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
    grid: tuple[int, int] | None = None  # LLaVA-NeXT: (gh, gw) grid tiles besides the base view; None = 1.5

    @property
    def tiles(self) -> int:
        """T: encoder passes per image (1 for LLaVA-1.5; base view + gh·gw for NeXT)."""
        return 1 if self.grid is None else 1 + self.grid[0] * self.grid[1]

    @property
    def candidates(self) -> int:
        """Image tokens over all tiles (no unpadding: the image is exactly the grid's size)."""
        return self.tiles * self.vision.num_patches

    @property
    def newline_rows(self) -> int:
        """``image_newline`` rows of the full pack: one per packed grid row (gh · S/p); 0 for 1.5."""
        return 0 if self.grid is None else self.grid[0] * (self.vision.image // self.vision.patch)

    @property
    def image_rows(self) -> int:
        """Rows the unpruned image feeds the LLM: 576 for 1.5, 576 + 2304 + 48 = 2928 for NeXT 2×2."""
        return self.candidates + self.newline_rows

    def tile_budgets(self, budget: int) -> list[int]:
        """k_t per tile as the runtime splits K (``tile_budget="equal"``); [K] for 1.5.
        Example (2×2): 640 -> [128] * 5; 11 -> [3, 2, 2, 2, 2]."""
        return [int(k) for k in split_tile_budget(budget, [self.vision.num_patches] * self.tiles, "equal")]

    def kept_newlines(self, budget: int) -> int:
        """Newline rows fed with K kept tokens: all of them for K = every candidate, else the upper bound
        ``min(gh·24, grid tokens kept)`` (one per packed grid row that kept a token)."""
        if self.grid is None:
            return 0
        return min(self.newline_rows, budget - self.tile_budgets(budget)[0])


LLAMA_7B, MISTRAL_7B = LlmShape(32, 4096, 11008, 32, 32), LlmShape(32, 4096, 14336, 32, 8)
SHAPES = {
    "llava-1.5-7b": ModelShape("llava-1.5-7b", VisionShape(), LLAMA_7B),
    "llava-1.5-13b": ModelShape("llava-1.5-13b", VisionShape(), LlmShape(40, 5120, 13824, 40, 40)),
    "llava-v1.6-vicuna-7b": ModelShape("llava-v1.6-vicuna-7b", VisionShape(), LLAMA_7B, grid=(2, 2)),
    "llava-v1.6-mistral-7b": ModelShape("llava-v1.6-mistral-7b", VisionShape(), MISTRAL_7B, grid=(2, 2)),
}
LLAVA_15 = tuple(a for a, m in SHAPES.items() if m.grid is None)  # --models' default


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
    newlines: int = 0  # LLaVA-NeXT: image_newline rows fed with the K tokens (an upper bound when pruned)

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.probe + self.select + self.llm + self.text


def llm_layer_flops(n: int, d: int, m: int, swiglu: bool = False, kv: int | None = None) -> int:
    """One transformer layer over n tokens: ``4nd² + 2n²d + 2ndm`` (``3ndm`` with swiglu); with
    grouped-query attention (K, V project to ``kv = n_kv·d_head`` columns) ``2nd² + 2nd·kv`` replaces ``4nd²``.

    Example: ``llm_layer_flops(1, 1, 1)`` -> 8; ``llm_layer_flops(2, 3, 5)`` -> 72 + 24 + 60 = 156;
    ``llm_layer_flops(2, 3, 5, kv=1)`` -> 36 + 12 + 24 + 60 = 132.
    """
    kv = d if kv is None else kv
    if min(n, d, m, kv) < 0:
        raise ValueError(f"n, d, m, kv must be >= 0, got {n}, {d}, {m}, {kv}")
    return 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + (3 if swiglu else 2) * n * d * m


def llm_prefill_flops(n: int, llm: LlmShape, swiglu: bool = False) -> int:
    """All L layers over n tokens (GQA-aware). Example: L=2, d=m=1, n=1 -> 16."""
    return llm.layers * llm_layer_flops(n, llm.width, llm.mlp, swiglu, llm.kv_width)


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
    """P−1 layers over prompt + all image rows (N; NeXT: 2928, newlines included), plus layer P−1's
    projections the strategy's scores read; 0 if no probe. dart runs the final-norm probe too (P more
    layers) and W_k on all T rows."""
    if not get_strategy(strategy).needs_probe:
        return 0
    llm, t = model.llm, prompt + model.image_rows
    layer = llm_layer_flops(t, llm.width, llm.mlp, swiglu, llm.kv_width)
    layers = (probe_layer - 1) * layer
    keys = t * llm.width * llm.kv_width  # W_k on all T rows
    if strategy == "dart":
        return layers + probe_layer * layer + keys
    if strategy == "fastv":
        return layers + keys + llm.width * llm.width
    return layers + model.candidates * llm.width * llm.width  # entropyprune: W_q on the image rows


PER_TILE = ("entropy", "visionzip", "divprune", "cdpruner", "none", "uniform", "fastervlm")


def tile_select_flops(strategy: str, n: int, budget: int, model: ModelShape) -> int:
    """A per-tile strategy's own matrix products on one tile of n candidates keeping ``budget``."""
    vision, llm = model.vision, model.llm
    if strategy == "entropy":
        return n * budget * vision.width
    if strategy == "visionzip":
        c = contextual_tokens(budget)
        return (n - budget + c) * c * (vision.width // vision.heads)
    if strategy == "divprune":
        return n * n * llm.width
    if strategy == "cdpruner":  # the N×N kernel on E, N·M·P relevance cosines, the greedy loop's K²·N
        return n * n * llm.width + n * model.text.projection + budget * budget * n
    return 0  # none, uniform, fastervlm


def select_flops(strategy: str, budget: int, prompt: int, model: ModelShape) -> int:
    """The strategy's own matrix products (see the module docstring); 0 for the cheap ones. Vision
    strategies and cdpruner: summed over the tiles with k_t > 0 (one tile for LLaVA-1.5); probe
    strategies: once over all N = T·576 image rows and the probe's prompt + 2928 (NeXT) rows."""
    n, llm, t = model.candidates, model.llm, prompt + model.image_rows
    if strategy in PER_TILE:
        per = model.vision.num_patches
        return sum(tile_select_flops(strategy, per, k, model) for k in model.tile_budgets(budget) if k > 0)
    if strategy == "entropyprune":
        return n * (llm.heads**2 * llm.head_dim + llm.heads**3)
    if strategy == "fastv":
        return t * llm.width
    if strategy == "dart":  # key L1 norms, then each of the 8 pivots' cosines against the N rows
        return t * llm.kv_width + 8 * n * llm.width
    raise InputError(f"no cost model for strategy {strategy!r}; known: {', '.join(COST_MODELS)}")


def strategy_cost(strategy: str, budget: int, model: ModelShape, prompt: int = 60, probe_layer: int = 2,
                  swiglu: bool = False) -> Cost:
    """Every stage's FLOPs for ``strategy`` keeping K = ``budget`` image tokens (``none``: K = N, all
    T·576 for NeXT); NeXT adds T encoder passes and the newline rows to the LLM's n."""
    n, d_in, width = model.candidates, model.vision.width, model.llm.width
    k = n if strategy == "none" else budget
    if not 1 <= k <= n:
        raise InputError(f"budget K must be in 1..{n}, got {k}")
    projected_all = strategy in ("divprune", "entropyprune", "fastv", "cdpruner", "dart")
    newlines = model.kept_newlines(k)
    return Cost(
        strategy=strategy, tokens=k, vision=model.tiles * vision_flops(model.vision),
        projector=projector_flops(k + (n if projected_all else 0), d_in, width),
        probe=probe_flops(strategy, prompt, model, probe_layer, swiglu),
        select=select_flops(strategy, k, prompt, model),
        llm=llm_prefill_flops(prompt + k + newlines, model.llm, swiglu),
        text=text_flops(model) if strategy == "cdpruner" else 0,
        newlines=newlines,
    )


def text_flops(model: ModelShape, segments: int = 1) -> int:
    """cdpruner's CLIP side: the text tower on ``segments`` × 77 positions (GELU MLP) and its
    projection, plus V = visual_projection of the N features (D·P each; the layer norm ignored).
    NeXT: the runtime runs the text tower once per image and V on all T·576 features.

    Example (CLIP-L/14-336, one segment): 12 · 554,104,320 + 768² + 576 · 1024 · 768 = 7,102,826,496.
    """
    t, v = model.text, model.vision
    tower = segments * t.layers * llm_layer_flops(t.positions, t.width, t.mlp)
    return tower + t.width * t.projection + model.candidates * v.width * t.projection


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
        model = self.model
        return {"model": model.alias, "mlp": self.mlp, "layer_formula": MLP_FORMULAS[self.mlp],
                "prompt_tokens": self.prompt, "probe_layer": self.probe_layer, "kv_heads": model.llm.kv_heads,
                "tiles": model.tiles, "grid": list(model.grid) if model.grid else None,
                "candidates": model.candidates, "image_rows": model.image_rows,
                "rows": [{**asdict(r), "total": r.total, "llm_fraction": r.llm / base.llm,
                          "total_fraction": r.total / base.total} for r in self.rows]}


def cost_table(model: ModelShape, strategies: Sequence[str], budgets: Sequence[int], prompt: int,
               probe_layer: int, mlp: str) -> CostTable:
    """The baseline (none, K = N) first, then each other strategy at each budget below N (T·576 for NeXT)."""
    n, swiglu = model.candidates, mlp == "swiglu"
    rows = [strategy_cost("none", n, model, prompt, probe_layer, swiglu)]
    for name in strategies:
        if name != "none":
            rows += [strategy_cost(name, k, model, prompt, probe_layer, swiglu) for k in budgets if k < n]
    return CostTable(model, mlp, prompt, probe_layer, tuple(rows))


def with_grid(alias: str, grid: Sequence[int]) -> ModelShape:
    """SHAPES[alias], a NeXT shape on ``grid`` (rows, cols: one of NEXT_GRIDS); 1.5 shapes unchanged."""
    model = SHAPES[alias]
    return model if model.grid is None else dataclasses.replace(model, grid=(int(grid[0]), int(grid[1])))
