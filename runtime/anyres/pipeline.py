"""LLaVA-NeXT (method.md §5): image → tiles → encoder → per-tile pruning → packed rows with newlines.

``AnyresPipeline(bundle).prune(image, tokens=320, strategy="entropy") -> PrunedAnyres``. The
tiles (base view first, then the grid row-major) go through the bundle's ONNX encoder as one
batch; K is split across tiles (``tile_budget``: ``equal`` or ``perplexity``, ``runtime.anyres.tile_budget``);
each tile is pruned on its own candidates with its own distributions; the kept tokens are
projected and laid out in the packed order with ``image_newline`` rows (``runtime.anyres.pack``).
Choices where method.md is silent:

- A tile's candidates are its patches that unpadding keeps; the strategy sees the tile's encoder
  outputs restricted to them (``features``, ``keys`` and the ``cls_attn`` columns; the [CLS]
  distributions are renormalised over the candidates by ``runtime.scoring``), so a padding patch
  is never kept, a merge target or a member.
- ``perplexity`` weighs tile t by ``exp(H_t(l_d))`` with ``l_d`` the tile's own deep layer, chosen
  by the bundle's entropy defaults (rule and ranges) unless the options give others.
- Probe strategies (entropyprune, fastv, dart): the probe runs once, on the prompt with every packed
  row of the image (strategy ``none``'s rows, newlines included); each tile's strategy reads that run's
  scores at its own candidates and keeps its k_t (``runtime.anyres.probe`` says how). ``cdpruner``
  runs per tile with the one question.
- A tile whose share is 0 keeps nothing (the strategies need K >= 1, so they are not run on it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime.anyres.pack import PackedLayout, PackedOrder, gather_rows, image_positions, pack_kept, packed_layout
from runtime.anyres.preprocess import AnyresConfig, AnyresPixels, preprocess_anyres
from runtime.anyres.probe import ProbeFn, SharedProbe, probe_context, probe_rows
from runtime.anyres.tile_budget import MODES, split_tile_budget
from runtime.bundle.manifest import Manifest, load_manifest, repair_command
from runtime.errors import BundleError, InputError, SettingError
from runtime.llm.bundle import checked_npz
from runtime.llm.prompt_cache import ImageRows, check_positions
from runtime.pipeline import Pipeline, require_question
from runtime.preprocess import load_image
from runtime.scoring import layer_distributions, layer_entropy
from runtime.selection import choose_layers
from runtime.strategies.registry import TEXT_TOWER, get_strategy
from runtime.types import EncoderOutput, EncoderTiles, PruneInputs, Selection

NEWLINE_MODES = ("rows", "none")


@dataclass(frozen=True)
class TileReport:
    """What one tile kept (tile 0 = base view)."""

    tile: int
    candidates: int  # patches left after unpadding
    kept: int  # k_t
    report: Mapping[str, Any]  # the strategy's own report on this tile (layers, ...)
    counts: tuple[int, ...] = ()  # [k_t] patches each kept token stands for, by ascending patch index


@dataclass(frozen=True)
class AnyresEncoded:
    """One image's tiles and what the encoder made of them (the input of every strategy)."""

    pixels: AnyresPixels
    tiles: EncoderTiles  # T tiles, base view first (``tiles[t]``: one tile's EncoderOutput)
    timings_ms: Mapping[str, float]  # preprocess, encode


@dataclass(frozen=True)
class PrunedAnyres:
    """One LLaVA-NeXT image as rows for the language model."""

    embeddings: np.ndarray  # [R, E] float32: kept tokens and newline rows in packed order
    order: PackedOrder  # where each row comes from (tile, patch) and its position in the full pack
    tiles: tuple[TileReport, ...]  # per tile, base first
    strategy: str
    total_rows: int  # rows of the unpruned pack (newlines included): `none` feeds all of them
    image_size: tuple[int, int]  # (height, width)
    grid: tuple[int, int]  # (rows, cols) of grid tiles
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Image tokens fed (newline rows excluded): what the budget K counts."""
        return self.order.num_tokens

    @property
    def num_patches(self) -> int:
        """Candidate patches over all tiles (unpadded ones excluded): the most K can be."""
        return sum(t.candidates for t in self.tiles)

    def image_rows(self, key: Hashable, positions: str = "packed") -> ImageRows:
        """The rows as the language model is fed them (method.md §6): ``packed`` consecutive,
        ``original`` each row at its place in the full pack (newlines included), the text after
        the image at ``total_rows`` (:func:`runtime.anyres.pack.image_positions`)."""
        if check_positions(positions) == "packed":
            return ImageRows(key, self.embeddings)
        placed = image_positions(0, self.order, self.total_rows, positions)
        return ImageRows(key, self.embeddings, placed.image, placed.text_start)


class AnyresPipeline:
    """A LLaVA-NeXT bundle's encoder, projector and ``image_newline`` (see the module docstring)."""

    def __init__(self, bundle: str | Path | Manifest, provider: str | None = None, threads: int | None = None,
                 int8: bool = False) -> None:
        manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle)
        if manifest.anyres is None:
            raise BundleError(f"bundle {manifest.root} is {manifest.family}, not LLaVA-NeXT; use runtime.pipeline")
        self.base = Pipeline(manifest, provider, threads, int8)
        self.manifest, anyres = manifest, manifest.anyres
        pre = manifest.preprocess
        self.config = AnyresConfig(anyres.image_grid_pinpoints, anyres.crop_size, anyres.shortest_edge,
                                   tuple(pre["image_mean"]), tuple(pre["image_std"]))
        self.newline = _load_newline(manifest)

    def pixels(self, image: Image.Image | str | Path) -> AnyresPixels:
        return preprocess_anyres(image if isinstance(image, Image.Image) else load_image(image), self.config)

    def layout(self, pixels: AnyresPixels) -> PackedLayout:
        anyres = self.manifest.anyres
        return packed_layout(pixels.image_size, anyres.image_grid_pinpoints, anyres.crop_size, anyres.patch_size)

    def probe_context(self) -> int:
        """Context positions the language-model probe needs for any image of this bundle."""
        anyres = self.manifest.anyres
        return probe_context(anyres.image_grid_pinpoints, anyres.crop_size, anyres.patch_size)

    def encode(self, image: Image.Image | str | Path | AnyresPixels) -> AnyresEncoded:
        """Tiles of ``image`` (or its already computed pixels) through the encoder as one batch."""
        start = time.perf_counter()
        pixels = image if isinstance(image, AnyresPixels) else self.pixels(image)
        middle = time.perf_counter()
        encoded = self.base.encoder.encode_batch(pixels.pixel_values)
        timings = {"preprocess": 1000 * (middle - start), "encode": 1000 * (time.perf_counter() - middle)}
        return AnyresEncoded(pixels, encoded, timings)

    def prune(self, image: Image.Image | str | Path, tokens: int = 320, strategy: str = "entropy",
              tile_budget: str = "equal", newline: str = "rows", question: str | None = None,
              probe: ProbeFn | None = None, **options: Any) -> PrunedAnyres:
        """Every stage on one image; ``options`` are the strategy's keyword options."""
        return self.prune_encoded(self.encode(image), tokens, strategy, tile_budget, newline, question, probe,
                                  **options)

    def prune_encoded(self, encoded: AnyresEncoded, tokens: int = 320, strategy: str = "entropy",
                      tile_budget: str = "equal", newline: str = "rows", question: str | None = None,
                      probe: ProbeFn | None = None, probe_scope: str = "image", **options: Any) -> PrunedAnyres:
        """Split K, prune each tile, project and pack an encoded image. ``probe``: the bound probe
        (``LlamaProbe.bind``) the probe strategies need; ``probe_scope="tile"`` is the wrong variant
        kept for negative controls (see ``runtime.anyres.probe``)."""
        chosen = get_strategy(strategy)
        if probe is None:  # a caller's own probe stands in for the bundle's (the references do)
            self.base.check_strategy(chosen)
        if chosen.needs_probe and probe is None:
            raise InputError(f"strategy {strategy!r} needs the language-model probe: run "
                             f"python -m export.llm --model ALIAS --out {self.manifest.root}")
        if tile_budget not in MODES:
            raise SettingError("tile_budget", f"must be one of {', '.join(MODES)}, got {tile_budget!r}")
        if newline not in NEWLINE_MODES:
            raise SettingError("newline", f"must be one of {', '.join(NEWLINE_MODES)}, got {newline!r}")
        require_question(chosen, question)
        opts = self.base.options_for(strategy, options)
        pixels, timings = encoded.pixels, dict(encoded.timings_ms)
        layout = self.layout(pixels)
        cands = [layout.candidates(t) for t in range(layout.num_tiles)]
        caps = np.array([c.shape[0] for c in cands], np.int64)
        start = time.perf_counter()
        if chosen.keeps_all:
            budgets = caps
        else:
            if not 1 <= tokens <= int(caps.sum()):
                raise SettingError("tokens", f"must be in 1..{int(caps.sum())} (the image's candidate patches over "
                                             f"{layout.num_tiles} tiles), got {tokens}")
            entropy = (_deep_entropy(encoded.tiles, cands, self._layer_rule(opts)) if tile_budget == "perplexity"
                       else None)
            budgets = split_tile_budget(tokens, caps, tile_budget, entropy)
        clip = None
        if TEXT_TOWER in chosen.needs:  # the question's text embeddings once per image, V per tile
            space = self.base.clip_space()
            text = space.text(question)
            clip = (lambda _question: text, space.image)
        shared, projected = None, None
        if chosen.needs_probe:
            shared, projected = self._shared_probe(encoded, cands, layout, probe, probe_scope, timings)
        kept, selections = [], []
        for tile, k in enumerate(budgets):
            inputs = _tile_inputs(encoded.tiles[tile], cands[tile], tile, question, self.base, clip, shared,
                                  projected)
            selection = chosen.run(inputs, int(k), opts) if k else None  # the strategies need K >= 1
            kept.append(cands[tile][selection.kept] if selection is not None else np.zeros(0, np.int64))
            selections.append(selection)
        order = pack_kept(kept[0], kept[1:], layout, newline)
        timings["prune"] = 1000 * (time.perf_counter() - start) - timings.get("project_all", 0.0)
        if shared is not None:
            timings["probe"] = shared.ms
            timings["prune"] -= shared.ms
        start = time.perf_counter()
        rows = self._rows(selections, kept, layout, order)
        timings["project"] = 1000 * (time.perf_counter() - start)
        reports = tuple(TileReport(t, int(caps[t]), int(kept[t].shape[0]), _tile_report(s, shared, int(caps[t])),
                                   tuple(s.counts[np.argsort(kept[t])].tolist()) if s else ())
                        for t, s in enumerate(selections))
        return PrunedAnyres(rows, order, reports, strategy, layout.total_rows, pixels.image_size, pixels.grid, timings)

    def _layer_rule(self, options: Any) -> dict[str, Any]:
        """The entropy layer rule ``perplexity`` weighs tiles with: the bundle's pruning defaults (rule,
        ranges), each replaced by the strategy's option of that name where it has one (``entropy``'s)."""
        pruning = self.manifest.pruning
        rule: dict[str, Any] = {"rule": pruning.rule, "shallow": tuple(pruning.shallow), "deep": tuple(pruning.deep)}
        fields = {f.name for f in dataclasses.fields(options)}
        rule.update({k: getattr(options, k) for k in ("rule", "shallow", "deep", "fixed") if k in fields})
        return rule

    def _shared_probe(self, encoded: AnyresEncoded, cands: list[np.ndarray], layout: PackedLayout, probe: ProbeFn,
                      scope: str, timings: dict[str, float]) -> tuple[SharedProbe, np.ndarray]:
        """Every candidate projected once ([T, N, E]; the tiles' strategies reuse it) and the probe
        over the image's packed rows (run when a tile first asks)."""
        start = time.perf_counter()
        width = int(self.newline.shape[0])
        projected = np.zeros((layout.num_tiles, layout.patches_per_tile, width), np.float32)
        for tile, cand in enumerate(cands):
            if cand.size:
                projected[tile, cand] = self.base.projector(encoded.tiles[tile].features[cand])
        timings["project_all"] = 1000 * (time.perf_counter() - start)
        return SharedProbe(probe, probe_rows(projected, self.newline, layout), scope), projected

    def _rows(self, selections: list[Selection | None], kept: list[np.ndarray], layout: PackedLayout,
              order: PackedOrder) -> np.ndarray:
        """Project every kept token once and lay the rows out in ``order`` (newlines included)."""
        n, width = layout.patches_per_tile, int(self.newline.shape[0])
        projected = np.zeros((layout.num_tiles, n, width), np.float32)
        for tile, selection in enumerate(selections):
            if selection is not None:
                projected[tile, kept[tile]] = self.base.projector(selection.tokens)
        return gather_rows(projected[0], projected[1:], self.newline, order, layout)


def _restricted(encoded: EncoderOutput, candidates: np.ndarray) -> EncoderOutput:
    """A tile's encoder outputs on its candidate patches only."""
    return EncoderOutput(encoded.features[candidates], encoded.cls_attn[:, :, candidates], encoded.keys[candidates])


def _tile_inputs(encoded: EncoderOutput, candidates: np.ndarray, tile: int, question: str | None, base: Pipeline,
                 clip: tuple[Any, Any] | None, shared: SharedProbe | None, projected: np.ndarray | None) -> PruneInputs:
    """What the strategy sees on one tile: its candidates (indices into ``candidates``), the projector,
    ``clip`` (question -> T, features -> V; cdpruner) and the tile's view of the shared probe."""
    restricted = _restricted(encoded, candidates)
    if shared is None:
        return PruneInputs(restricted, base.projector, None, question, *(clip or (None, None)))
    cached = projected[tile, candidates]

    def project(features: np.ndarray) -> np.ndarray:  # the tile's candidates were projected already
        return cached if features is restricted.features else base.projector(features)

    return PruneInputs(restricted, project, shared.for_tile(tile, candidates), question, *(clip or (None, None)))


def _tile_report(selection: Selection | None, shared: SharedProbe | None, candidates: int) -> dict[str, Any]:
    """The strategy's report on a tile, plus ``probe_rows`` (the rows its probe saw) for a probe strategy."""
    if selection is None:
        return {}
    if shared is None:
        return dict(selection.report)
    return {**selection.report, "probe_rows": shared.rows.num_rows if shared.scope == "image" else candidates}


def _deep_entropy(encoded: EncoderTiles, candidates: list[np.ndarray],
                  rule: Mapping[str, Any]) -> np.ndarray:
    """``H_t(l_d)`` [T]: each tile's [CLS] entropy over its candidates at its own deep layer, the layer
    ``choose_layers(**rule)`` picks."""
    out = []
    for tile, cand in zip(encoded, candidates, strict=True):
        if not cand.size:  # a tile unpadding removed entirely: its cap is 0 anyway
            out.append(0.0)
            continue
        entropy = layer_entropy(layer_distributions(tile.cls_attn[:, :, cand]))
        out.append(float(entropy[choose_layers(entropy, **rule).deep - 1]))
    return np.asarray(out, np.float64)


def _load_newline(manifest: Manifest) -> np.ndarray:
    """``image_newline`` [E] float32 from ``image_newline.npz`` (checked: inside the bundle, size, export id)."""
    name = manifest.files.get("image_newline")
    if name is None:
        raise BundleError(f"bundle {manifest.root} has no image_newline; "
                          f"{repair_command(manifest.data, manifest.root, 'export.clip')}")
    path = checked_npz(manifest.root, name, "image_newline", manifest.data["sizes"][name], manifest.export_id,
                       manifest.data, exporter="export.clip")
    with np.load(path, allow_pickle=False) as data:
        newline = np.asarray(data["image_newline"], np.float32)
    if newline.ndim != 1 or newline.shape[0] != manifest.vision.projector_dim or not np.isfinite(newline).all():
        raise BundleError(f"{path}: image_newline must be [{manifest.vision.projector_dim}] finite floats, got "
                          f"{newline.shape}; {repair_command(manifest.data, manifest.root, 'export.clip')}")
    return newline
