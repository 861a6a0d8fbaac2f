"""The language-model probe for LLaVA-NeXT (method.md §5 with §2, §3, §7): one probe run over every
packed row of the image, read by each tile through its own candidates.

``SharedProbe(probe, probe_rows(projected, newline, layout))`` wraps a ``PruneInputs.probe`` callable
(``runtime.llm.probe.LlamaProbe.bind``: the prompt around the image); ``shared.for_tile(t, candidates)``
is the probe callable tile t's strategy (entropyprune, fastv, dart) receives. Design, where method.md
is silent:

- **All rows, once.** The probe runs once per image, on the prompt with strategy ``none``'s rows: the
  base tile's N rows, then the unpadded grid rows, each followed by ``image_newline``
  (``runtime.anyres.pack``): what the language model would see unpruned, so every score (FastV's
  attention of the last position, whose softmax spans all rows; EntropyPrune's layer-(P−1) queries;
  DART's keys and final-norm states) is that of the whole image in context. The probe sees the
  newline rows even when the output asks ``newline="none"``. The run is lazy (the first tile that
  asks) and cached; a later ``final=True`` (DART's final-norm probe) runs it once more with both.
- **Mapped back per tile.** Tile t's probe returns that run with ``ProbeOutput.candidates`` = the
  positions of t's candidate patches (unpadded ones have no row), in t's candidate order; the
  strategy then selects its k_t (``runtime.anyres.tile_budget``) among them exactly as on LLaVA-1.5
  (``runtime.llm.probe_scores`` and ``runtime.strategies.dart`` read ``ProbeOutput.image_rows``).
- **Newline rows are never candidates**: never kept and, for DART, never image pivots: they are the
  learned row separator, not image tokens (their keys still sit in FastV's softmax and in every
  row's context). DART's text pivots are the tokens after the whole image (after its last newline
  row), the same for every tile; each tile draws its own ``pivots_image`` pivots among its
  candidates and splits its k_t over its pivots as 1.5 splits K.
- **EntropyPrune** per tile as on 1.5: the k_t candidates of highest head entropy (the score of a
  row depends on the others only through the probe's context, which is the whole image).
- Indices in a strategy's report (DART's ``pivots_image``) refer to the tile's candidates.
- ``scope="tile"`` is the plausible wrong variant kept for negative controls: each tile's probe sees
  only that tile's candidate rows (the 1.5 code called per tile).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.anyres.pack import PackedLayout, gather_rows, pack_kept
from runtime.errors import InputError
from runtime.types import ProbeOutput

ProbeFn = Callable[..., ProbeOutput]
SCOPES = ("image", "tile")  # "tile": the negative control (a tile's probe sees its own rows only)
TEXT_ROOM = 2048  # probe context positions for the prompt's text around the image rows


@dataclass(frozen=True, eq=False)
class ProbeRows:
    """The rows one LLaVA-NeXT image feeds the probe, and where each patch sits among them."""

    rows: np.ndarray  # [R, E] float32: strategy none's rows (newlines included), packed order
    row_of: np.ndarray  # [T, N] int64: index in ``rows`` of each (tile, patch), -1 = not fed (unpadded)

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])


def probe_rows(projected: np.ndarray, newline: np.ndarray, layout: PackedLayout) -> ProbeRows:
    """projected [T, N, E] (a padding patch's row may hold anything), newline [E] -> ProbeRows.

    Example: a (500, 1000) image (grid 1 x 2, 24 packed rows of 48) -> rows [576 + 24 * 49, E],
    ``row_of[0, 5] == 5``, ``row_of[2, 0] == 576 + 24`` (tile 2 starts mid packed row 0).
    """
    t_count, n = layout.num_tiles, layout.patches_per_tile
    if projected.ndim != 3 or projected.shape[:2] != (t_count, n):
        raise InputError(f"projected must be [{t_count}, {n}, E], got {list(projected.shape)}")
    cands = [layout.candidates(t) for t in range(t_count)]
    order = pack_kept(cands[0], cands[1:], layout, "rows")
    rows = gather_rows(projected[0], projected[1:], newline, order, layout)
    row_of = np.full((t_count, n), -1, np.int64)
    image = np.flatnonzero(~order.is_newline)
    row_of[order.source_tile[image], order.source_patch[image]] = image
    return ProbeRows(rows, row_of)


class SharedProbe:
    """One image's probe run over all its packed rows (lazy, cached) and each tile's view of it."""

    def __init__(self, probe: ProbeFn, rows: ProbeRows, scope: str = "image") -> None:
        if scope not in SCOPES:
            raise InputError(f"probe scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self._probe, self.rows, self.scope = probe, rows, scope
        self._out: ProbeOutput | None = None
        self.runs, self.ms = 0, 0.0  # probe calls made and their time (reported apart from pruning)

    def run(self, final: bool = False) -> ProbeOutput:
        """The probe of every packed row (``final``: with the final-norm states), computed once."""
        if self._out is None or (final and self._out.final_hidden is None):
            out = self._call(self.rows.rows, final)
            if out.num_image != self.rows.num_rows:
                raise ValueError(f"probe returned {out.num_image} image rows, expected {self.rows.num_rows}")
            self._out = out
        return self._out

    def for_tile(self, tile: int, candidates: np.ndarray) -> ProbeFn:
        """Tile ``tile``'s probe: ``(its candidate rows [n, E], final=False)`` -> ProbeOutput whose
        ``image_rows`` are those candidates' positions (``scope="tile"``: a probe of those rows alone)."""
        where = self.rows.row_of[tile, candidates]
        if (where < 0).any():
            raise InputError(f"tile {tile}: patch {int(candidates[where < 0][0])} is not fed (unpadding removes it)")

        def tile_probe(rows: np.ndarray, final: bool = False) -> ProbeOutput:
            if rows.shape[0] != candidates.shape[0]:
                raise ValueError(f"tile {tile} has {candidates.shape[0]} candidates, got {rows.shape[0]} rows")
            if self.scope == "tile":
                return self._call(rows, final)
            out = self.run(final)
            return dataclasses.replace(out, candidates=out.image_start + where)

        return tile_probe

    def _call(self, rows: np.ndarray, final: bool) -> ProbeOutput:
        start = time.perf_counter()
        out = self._probe(rows, final=True) if final else self._probe(rows)
        self.runs, self.ms = self.runs + 1, self.ms + 1000 * (time.perf_counter() - start)
        return out


def probe_context(pinpoints: Sequence[Sequence[int]], crop: int, patch: int) -> int:
    """Probe context positions for any image of a bundle: the most packed rows a pinpoint can give
    (before unpadding, newlines included) plus ``TEXT_ROOM``.

    Example: v1.6 pinpoints, crop 336, patch 14 -> 576 + 48 * 49 + 2048 = 4976 (the 672 x 672 grid).
    """
    g = crop // patch
    most = max(g * g + (h // crop) * g * ((w // crop) * g + 1) for h, w in pinpoints)
    return int(most + TEXT_ROOM)
