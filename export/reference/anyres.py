"""PyTorch reference of LLaVA-NeXT per-tile pruning (method.md §5), padding-aware, on a Hugging Face
``LlavaNextForConditionalGeneration`` (loaded with ``attn_implementation="eager"``).

A second implementation of the runtime's ``AnyresPipeline`` that never imports the runtime's numeric
modules (only its error type):

- **Packed order and candidates from Hugging Face itself**: ``pack_image_features`` is run on
  *identity features* (each patch's row holds ``(tile, patch, 0)``, the newline ``(-1, -1, 1)``), so
  every row of HF's unpruned pack names its patch; a tile's candidates are its patches present in
  that pack (``unpad=False``, the plausible bug, keeps every patch as a candidate instead).
- **Budget**: ``equal`` split (method.md §5) dealt one token at a time (a plain loop); ``perplexity``
  in exact rationals (``fractions.Fraction``), each tile weighted by ``exp`` of its head-mean [CLS]
  entropy over its candidates at the deep layer the entropy rule picks for that tile.
- **Vision strategies** (``export.reference.pruning.STRATEGIES``): each tile's tower outputs restricted to its
  candidates, then :func:`export.reference.pruning.prune_outputs` with its k_t (merging stays in the tile).
- **Probe strategies** (``fastv``, ``entropyprune``, ``dart``): the language model runs once on
  ``prefix ids + get_image_features' rows (all of them, newlines included) + suffix ids``; the
  layer-(P−1) scores of every row come from :mod:`export.reference.llm` (FastV: eager attention
  probabilities of the last row; EntropyPrune: head entropy of the queries) or
  :mod:`export.reference.question` (DART's keys and final-norm states); each tile keeps the top k_t
  of its candidates' scores (DART: its own image pivots among its candidates, the text after the
  image as text pivots). Newline rows are never candidates.
- **Rows fed**: the kept patches in HF's pack order, each grid row that kept a token followed by
  ``image_newline`` (``newline="rows"``); kept tokens are ``multi_modal_projector`` of the (merged)
  features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn

from export.reference.llm import entropyprune_scores, fastv_scores
from export.reference.pruning import STRATEGIES, EntropyOptions, ReferenceVision, prune_outputs, vision_outputs
from export.reference.question import DartStates, dart_select, dart_states
from export.reference.vision import attention_entropy, choose_layers, head_mean_distribution, rank_descending
from runtime.errors import InputError

PROBE_STRATEGIES = ("fastv", "entropyprune", "dart")
NEWLINE = -1  # tile and patch of a newline row in AnyresReference.source


@dataclass(frozen=True)
class TileResult:
    """What one tile kept (tile 0 = base view)."""

    candidates: Tensor  # [n_t] int64 patches the tile may keep, ascending
    kept: Tensor  # [k_t] int64 patch indices (in the tile), ascending
    counts: Tensor  # [k_t] int64 patches each kept token stands for
    embeddings: Tensor  # [k_t, E] projected (merged) tokens, in ``kept`` order
    layers: dict[str, int] | None  # {"l_s", "l_d"} for ``entropy``


@dataclass(frozen=True)
class AnyresReference:
    """One LLaVA-NeXT image pruned per tile, and the rows it feeds the language model."""

    tiles: tuple[TileResult, ...]  # base first
    budgets: tuple[int, ...]  # k_t
    source: Tensor  # [R, 2] int64 (tile, patch) of each row fed, (-1, -1) for a newline
    rows: Tensor  # [R, E] the rows fed


def packed_ids(model: nn.Module, num_tiles: int, image_size: Sequence[int]) -> Tensor:
    """[R, 2] int64 (tile, patch) of every row of HF's unpruned pack, (-1, -1) for a newline row."""
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    ids = torch.zeros(num_tiles, n, 3)
    ids[:, :, 0] = torch.arange(num_tiles)[:, None]
    ids[:, :, 1] = torch.arange(n)[None, :]
    newline = torch.tensor([float(NEWLINE), float(NEWLINE), 1.0])
    packed, _ = model.model.pack_image_features([ids], torch.tensor([list(image_size)]), "default", newline)
    return packed[0][:, :2].round().to(torch.int64)


def equal_budgets(budget: int, caps: Sequence[int]) -> list[int]:
    """method.md §5 ``equal``, one token at a time: each to the open tile (below its cap) holding the
    fewest so far, ties to the smaller tile index. Example: K = 10, caps (1, 576, 576) -> [1, 5, 4]."""
    if not 1 <= budget <= sum(caps):
        raise InputError(f"budget K must satisfy 1 <= K <= {sum(caps)}, got {budget}")
    out = [0] * len(caps)
    for _ in range(budget):
        t = min((t for t in range(len(caps)) if out[t] < caps[t]), key=lambda t: (out[t], t))
        out[t] += 1
    return out


def perplexity_budgets(budget: int, caps: Sequence[int], entropy: Sequence[float]) -> list[int]:
    """method.md §5 ``perplexity`` in exact rationals: quotas K·w_t/Σw over w = exp(H_t), tiles whose
    quota reaches their cap fixed at it and the rest recomputed until none does; then every tile gets
    floor(quota) and the largest fractional parts one more, ties to the smaller tile index."""
    if not 1 <= budget <= sum(caps):
        raise InputError(f"budget K must satisfy 1 <= K <= {sum(caps)}, got {budget}")
    weight = [Fraction(math.exp(h)) for h in entropy]
    capped = {t for t in range(len(caps)) if caps[t] == 0}
    while True:
        free = budget - sum(caps[t] for t in capped)
        open_tiles = [t for t in range(len(caps)) if t not in capped]
        total = sum(weight[t] for t in open_tiles)
        quota = {t: free * weight[t] / total for t in open_tiles}
        full = {t for t in open_tiles if quota[t] >= caps[t]}
        if not full:
            break
        capped |= full
    quota.update({t: Fraction(caps[t]) for t in capped})
    counts = [math.floor(quota[t]) for t in range(len(caps))]
    order = sorted(range(len(caps)), key=lambda t: (-(quota[t] - counts[t]), t))
    for t in order[: budget - sum(counts)]:
        counts[t] += 1
    return counts


def deep_entropies(vision: ReferenceVision, cands: Sequence[Tensor], rule: EntropyOptions) -> list[float]:
    """H_t(l_d) per tile: the head-mean [CLS] distribution over the tile's candidates (renormalised),
    its entropy per layer, read at the deep layer ``rule`` picks for that tile; 0 for a tile without
    candidates (its cap is 0)."""
    out = []
    for t, cand in enumerate(cands):
        if cand.numel() == 0:
            out.append(0.0)
            continue
        entropy = attention_entropy(head_mean_distribution(vision.cls_attn[t][:, :, cand]))
        out.append(float(entropy[choose_layers(entropy, rule.rule, rule.shallow, rule.deep, rule.fixed).l_d - 1]))
    return out


@torch.no_grad()
def reference_anyres(model: nn.Module, pixel_values: Tensor, image_size: Sequence[int], strategy: str, budget: int,
                     prompt: tuple[Sequence[int], Sequence[int]] | None = None, P: int = 2, unpad: bool = True,
                     vision: ReferenceVision | None = None, tile_budget: str = "equal",
                     **options: object) -> AnyresReference:
    """[T, 3, S, S] tiles (base first) of an image of ``image_size`` (h, w) -> per-tile results and rows.

    ``prompt`` (prefix ids, suffix ids) around the image is needed by the probe strategies; ``P`` is
    their pruning layer; ``options`` go to the vision strategy (``export.reference.pruning.make_options``);
    ``vision``: the tiles' :func:`export.reference.pruning.vision_outputs` (B = T) when already computed;
    ``tile_budget``: ``equal`` or ``perplexity`` (its layer rule: the entropy options in ``options``,
    else their defaults).
    """
    ids = packed_ids(model, pixel_values.shape[0], image_size)
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    cands = [torch.sort(ids[ids[:, 0] == t, 1]).values if unpad else torch.arange(n)
             for t in range(pixel_values.shape[0])]
    caps = [int(c.shape[0]) for c in cands]
    if tile_budget == "perplexity":
        vision = vision_outputs(model, pixel_values) if vision is None else vision
        rule = EntropyOptions(**{k: v for k, v in options.items() if k in ("rule", "shallow", "deep", "fixed")})
        budgets = perplexity_budgets(budget, caps, deep_entropies(vision, cands, rule))
    elif tile_budget == "equal":
        budgets = equal_budgets(budget, caps)
    else:
        raise InputError(f"unknown tile_budget {tile_budget!r}; choose equal or perplexity")
    if strategy in PROBE_STRATEGIES:
        if prompt is None or not unpad:
            raise InputError("the probe strategies need the prompt, and only unpadded patches have rows")
        tiles = _probe_tiles(model, pixel_values, image_size, strategy, ids, cands, budgets, prompt, P)
    elif strategy in STRATEGIES:
        vision = vision_outputs(model, pixel_values) if vision is None else vision
        tiles = _vision_tiles(model, vision, strategy, cands, budgets, options)
    else:
        raise InputError(f"unknown strategy {strategy!r}; choose one of: {', '.join([*STRATEGIES, *PROBE_STRATEGIES])}")
    source, rows = _rows_fed(ids, tiles, model.model.image_newline)
    return AnyresReference(tuple(tiles), tuple(budgets), source, rows)


def _vision_tiles(model: nn.Module, v: ReferenceVision, strategy: str, cands: list[Tensor], budgets: list[int],
                  options: dict) -> list[TileResult]:
    out = []
    for t, (cand, k) in enumerate(zip(cands, budgets, strict=True)):
        if k == 0:
            out.append(_empty(cand, model))
            continue
        tile = ReferenceVision(v.features[t : t + 1, cand], v.cls_attn[t : t + 1, :, :, cand], v.keys[t : t + 1, cand],
                               v.feature_layer)
        result = prune_outputs(model, tile, strategy, k, **options)
        order = torch.argsort(cand[result.kept])  # LLM order inside a tile is the packed order
        out.append(TileResult(cand, cand[result.kept][order], result.counts[order], result.embeddings[order],
                              None if result.layers is None else dict(result.layers)))
    return out


def _probe_tiles(model: nn.Module, pixel_values: Tensor, image_size: Sequence[int], strategy: str, ids: Tensor,
                 cands: list[Tensor], budgets: list[int], prompt: tuple[Sequence[int], Sequence[int]],
                 P: int) -> list[TileResult]:
    image = model.model.get_image_features(pixel_values=pixel_values[None],
                                           image_sizes=torch.tensor([list(image_size)])).pooler_output
    rows = image[0] if isinstance(image, (list, tuple)) else image
    embed = model.model.language_model.embed_tokens
    prefix, suffix = (torch.tensor([list(p)], dtype=torch.int64) for p in prompt)
    embeds = torch.cat([embed(prefix), rows[None], embed(suffix)], dim=1)
    start, total = prefix.shape[1], rows.shape[0]
    if strategy == "dart":
        states = dart_states(model, embeds, P)
    else:
        score = fastv_scores if strategy == "fastv" else entropyprune_scores
        scores = score(model, embeds, start, total, P=P)  # [R] over every packed row
    patches = torch.nonzero(ids[:, 0] != NEWLINE)[:, 0]
    row_of = {(t, p): r for (t, p), r in zip(ids[patches].tolist(), patches.tolist(), strict=True)}
    out = []
    for t, (cand, k) in enumerate(zip(cands, budgets, strict=True)):
        where = torch.tensor([row_of[(t, p)] for p in cand.tolist()], dtype=torch.int64)  # rows of the pack
        if k == 0:
            out.append(_empty(cand, model))
            continue
        if strategy == "dart":
            text = slice(start + total, embeds.shape[1])
            tile = DartStates(torch.cat([states.keys[start + where], states.keys[text]]),
                              torch.cat([states.hidden[start + where], states.hidden[text]]))
            kept = dart_select(tile, 0, cand.shape[0], k)
        else:
            kept = torch.sort(rank_descending(scores[where])[:k]).values
        out.append(TileResult(cand, cand[kept], torch.ones_like(kept), rows[where[kept]], None))
    return out


def _empty(cand: Tensor, model: nn.Module) -> TileResult:
    width = model.model.image_newline.shape[0]
    none = torch.zeros(0, dtype=torch.int64)
    return TileResult(cand, none, none, torch.zeros(0, width), None)


def _rows_fed(ids: Tensor, tiles: list[TileResult], newline: Tensor) -> tuple[Tensor, Tensor]:
    """The kept tokens in HF's pack order, a newline after every grid row that kept one."""
    token = {(t, int(p)): e for t, tile in enumerate(tiles) for p, e in zip(tile.kept, tile.embeddings, strict=True)}
    source, rows, row_has_token = [], [], False
    for tile, patch in ids.tolist():
        if tile == NEWLINE:
            if row_has_token:
                source.append((NEWLINE, NEWLINE))
                rows.append(newline)
            row_has_token = False
        elif (tile, patch) in token:
            source.append((tile, patch))
            rows.append(token[(tile, patch)])
            row_has_token = tile > 0
    width = newline.shape[0]
    return torch.tensor(source, dtype=torch.int64).reshape(-1, 2), torch.stack(rows) if rows else torch.zeros(0, width)
