"""LLaVA-NeXT packing of per-tile features (method §5) and the positions of the rows fed (§6).

:func:`pack_all` equals Hugging Face's ``LlavaNextModel.pack_image_features`` (transformers 5.x,
``vision_feature_select_strategy="default"``) for one image: the base tile's N rows, then the grid
tiles laid out as one ``(gh*g) x (gw*g)`` patch grid (g = crop // patch), unpadded as HF
``unpad_image`` (:func:`runtime.anyres.geometry.unpad_shape`), row-major, ``image_newline`` after each row.
:func:`pack_kept` gives the §5 output order of a pruned image and :func:`image_positions` its §6
positions. Tile 0 is the base tile, tiles 1..T-1 the grid row-major (as
:mod:`runtime.anyres.preprocess` emits them); patches are row-major inside a tile (0..N-1).

Choices where method.md is silent:

- **Empty packed rows.** An extreme aspect ratio can unpad every *column* away (a 4000x1 image:
  24 rows of width 0). HF still appends ``image_newline`` to each of those rows (600 rows, no grid
  token), and :func:`pack_all` does the same. :func:`pack_kept` follows §5 literally, "a newline
  after every packed row that kept at least one token", so a width-0 row never gets one: with
  every candidate kept its order equals :func:`pack_all` except that it lacks those newline-only
  rows (600 vs 576 for 4000x1). Such an image carries no grid token, so nothing is lost. When
  every *row* is unpadded away (1x4000) HF emits no grid row and no newline; so do both.
- **Original positions** (``positions="original"``) always refer to the strategy-``none``
  sequence, newlines included (HF's packing), even with ``newline="none"``: a dropped newline
  leaves a gap, and the text after the image starts at ``prefix_len + total_rows`` with
  ``total_rows = PackedLayout.total_rows`` (HF's row count, the 4000x1 newline-only rows included).
- **Kept indices** are sets: any order is accepted (the layout fixes the output order);
  duplicates, out-of-range indices and non-candidates (removed by unpadding) are refused.
- **pack_all without newline** (``newline=None``) equals HF with ``image_newline=None``.
- **Pinpoints** smaller than one tile (a 0-tile grid) are refused: HF cannot pack them either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.anyres.geometry import AnyresLayout, anyres_layout, select_best_resolution
from runtime.errors import InputError
from runtime.llm.prompt_cache import POSITION_MODES

NEWLINE_MODES = ("rows", "none")
NEWLINE_SOURCE = -1  # tile and patch of an image_newline row in PackedOrder.source_*


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Where every patch of one image goes in HF's packed sequence (strategy none)."""

    geometry: AnyresLayout  # best resolution, grid (gh, gw), patches per side g, unpad, newline=True
    tile: np.ndarray  # [R, W] int64: grid tile (1..T-1) of each packed grid patch, row-major
    patch: np.ndarray  # [R, W] int64: patch index (0..N-1) inside that tile
    position: np.ndarray  # [T, N] int64: 0-based row in pack_all's output, -1 = removed by unpadding

    @property
    def num_tiles(self) -> int:
        """T: base tile plus gh * gw grid tiles."""
        return int(self.position.shape[0])

    @property
    def patches_per_tile(self) -> int:
        """N = g * g (576 for CLIP ViT-L/14-336)."""
        return int(self.position.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(R, W): packed grid rows and columns after unpadding (W may be 0, see module doc)."""
        return int(self.tile.shape[0]), int(self.tile.shape[1])

    @property
    def total_rows(self) -> int:
        """Rows of pack_all with image_newline: N + R * (W + 1)."""
        rows, cols = self.grid_shape
        return self.patches_per_tile + rows * (cols + 1)

    def candidates(self, t: int) -> np.ndarray:
        """[n_t] int64 ascending: tile t's patches that unpadding keeps (all N for the base tile)."""
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.num_tiles:
            raise InputError(f"tile must be an integer in 0..{self.num_tiles - 1}, got {t!r}")
        return np.flatnonzero(self.position[t] >= 0).astype(np.int64)


def packed_layout(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], crop: int = 336,
                  patch: int = 14) -> PackedLayout:
    """(h, w) pixels -> the PackedLayout of HF's packing (crop = vision image_size, patch = patch_size).

    Example: ``(500, 1000)``, v1.6 pinpoints -> grid (1, 2), ``grid_shape == (24, 48)``, tile[0, 24]
    == 2, patch[0, 24] == 0, ``total_rows == 576 + 24 * 49``.
    """
    best = select_best_resolution(image_size, pinpoints)
    if isinstance(crop, (int, np.integer)) and not isinstance(crop, bool) and min(best) < crop:
        raise InputError(f"grid pinpoints must be at least {crop} pixels per side, got best resolution {best}")
    geometry = anyres_layout(image_size, pinpoints, crop, patch, newline=True)
    (gh, gw), g = geometry.grid_shape, geometry.patches_per_side
    y, x = np.meshgrid(np.arange(gh * g), np.arange(gw * g), indexing="ij")
    unpad = geometry.unpad
    tile = (1 + (y // g) * gw + x // g)[unpad.rows, unpad.cols].astype(np.int64)
    within = ((y % g) * g + x % g)[unpad.rows, unpad.cols].astype(np.int64)
    rows, cols = tile.shape
    position = np.full((1 + gh * gw, g * g), -1, dtype=np.int64)
    position[0] = np.arange(g * g)
    position[tile, within] = g * g + np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]
    return PackedLayout(geometry, _frozen(tile), _frozen(within), _frozen(position))


def _features(base: np.ndarray, tiles: np.ndarray, newline: np.ndarray | None, layout: PackedLayout) -> int:
    """Check base [N, E], tiles [T-1, N, E], newline [E] | None against the layout; return E."""
    n, grid = layout.patches_per_tile, layout.num_tiles - 1
    base, tiles = np.asarray(base), np.asarray(tiles)
    if base.ndim != 2 or base.shape[0] != n:
        raise InputError(f"base must be [{n}, E], got {list(base.shape)}")
    e = base.shape[1]
    if tiles.shape != (grid, n, e):
        raise InputError(f"tiles must be [{grid}, {n}, {e}], got {list(tiles.shape)}")
    if newline is not None and np.shape(newline) != (e,):
        raise InputError(f"newline must be [{e}], got {list(np.shape(newline))}")
    return e


def pack_all(base: np.ndarray, tiles: np.ndarray, newline: np.ndarray | None,
             layout: PackedLayout) -> np.ndarray:
    """base [N, E], tiles [T-1, N, E], newline [E] -> [N + R*(W+1), E] float32, as HF packs it.

    Example: ``(500, 1000)`` image, E = 8 -> [576 + 24 * 49, 8]; row 576 is tiles[0, 0], row 576+48
    the newline. ``newline=None`` drops the newline rows (HF ``image_newline=None``).
    """
    e = _features(base, tiles, newline, layout)
    grid = np.asarray(tiles, dtype=np.float32)[layout.tile - 1, layout.patch]  # [R, W, E]
    if newline is not None:
        column = np.broadcast_to(np.asarray(newline, dtype=np.float32), (grid.shape[0], 1, e))
        grid = np.concatenate([grid, column], axis=1)  # [R, W + 1, E]
    return np.concatenate([np.asarray(base, dtype=np.float32), grid.reshape(-1, e)], axis=0)


@dataclass(frozen=True, eq=False)
class PackedOrder:
    """The rows one pruned image feeds to the LLM, in §5 order, and where each comes from."""

    source_tile: np.ndarray  # [R] int64: tile of each row (0 = base), NEWLINE_SOURCE for a newline
    source_patch: np.ndarray  # [R] int64: patch inside that tile, NEWLINE_SOURCE for a newline
    is_newline: np.ndarray  # [R] bool: the row is image_newline
    original_position: np.ndarray  # [R] int64 strictly increasing: row in the full pack_all output

    @property
    def num_rows(self) -> int:
        """R: rows fed, newlines included."""
        return int(self.is_newline.shape[0])

    @property
    def num_tokens(self) -> int:
        """Kept image tokens, newlines excluded (what the budget K counts)."""
        return int(self.num_rows - np.count_nonzero(self.is_newline))


def _kept_mask(kept_base: np.ndarray, kept_tiles: Sequence[np.ndarray], layout: PackedLayout) -> np.ndarray:
    """[T, N] bool of kept patches; InputError for a bad index, a duplicate or a non-candidate."""
    t_count, n = layout.num_tiles, layout.patches_per_tile
    if len(kept_tiles) != t_count - 1:
        raise InputError(f"kept_tiles must hold {t_count - 1} arrays (one per grid tile), got {len(kept_tiles)}")
    mask = np.zeros((t_count, n), dtype=bool)
    for t, kept in enumerate([kept_base, *kept_tiles]):
        kept = np.asarray(kept)
        name = "kept_base" if t == 0 else f"kept_tiles[{t - 1}]"
        if kept.ndim != 1 or (kept.size and kept.dtype.kind not in "iu"):
            raise InputError(f"{name} must be a 1-D integer array, got {kept.dtype} {list(kept.shape)}")
        if kept.size and (kept.min() < 0 or kept.max() >= n):
            raise InputError(f"{name} must hold patch indices in 0..{n - 1}, got {kept.min()}..{kept.max()}")
        if np.unique(kept).size != kept.size:
            raise InputError(f"{name} must not repeat a patch index, got {kept.size - np.unique(kept).size} repeats")
        kept = kept.astype(np.int64)
        removed = kept[layout.position[t, kept] < 0]
        if removed.size:
            raise InputError(f"{name} keeps patch {int(removed[0])} of tile {t}, which unpadding removes")
        mask[t, kept] = True
    return mask


def pack_kept(kept_base: np.ndarray, kept_tiles: Sequence[np.ndarray], layout: PackedLayout,
              newline: str = "rows") -> PackedOrder:
    """kept_base [k0], kept_tiles T-1 x [k_t] int64 -> the §5 PackedOrder of the rows fed.

    Base tile's kept patches ascending, then the grid's kept patches in packed (unpadded,
    row-major) order; ``"rows"``: a newline after every packed row that kept a token, ``"none"``:
    none. Example: ``(500, 1000)`` (grid 1 x 2, R = 24, W = 48), kept_base [3], tiles 1 and 2 keep
    [0] -> tiles (0, 1, 2, -1), patches (3, 0, 0, -1), original positions (3, 576, 600, 624).
    """
    if newline not in NEWLINE_MODES:
        raise InputError(f"newline must be one of {', '.join(NEWLINE_MODES)}, got {newline!r}")
    mask = _kept_mask(kept_base, kept_tiles, layout)
    n, rows = layout.patches_per_tile, layout.grid_shape[0]
    kept_grid = mask[layout.tile, layout.patch]  # [R, W]
    row_newline = kept_grid.any(axis=1, keepdims=True) & (newline == "rows")  # [R, 1]
    keep = np.concatenate([kept_grid, row_newline], axis=1).ravel()  # pack_all order after the base
    sentinel = np.full((rows, 1), NEWLINE_SOURCE, dtype=np.int64)
    grid_tile = np.concatenate([layout.tile, sentinel], axis=1).ravel()[keep]
    grid_patch = np.concatenate([layout.patch, sentinel], axis=1).ravel()[keep]
    base = np.flatnonzero(mask[0]).astype(np.int64)
    tile = np.concatenate([np.zeros_like(base), grid_tile])
    return PackedOrder(
        source_tile=_frozen(tile),
        source_patch=_frozen(np.concatenate([base, grid_patch])),
        is_newline=_frozen(tile == NEWLINE_SOURCE),
        original_position=_frozen(np.concatenate([base, n + np.flatnonzero(keep)]).astype(np.int64)),
    )


def gather_rows(base: np.ndarray, tiles: np.ndarray, newline: np.ndarray | None, order: PackedOrder,
                layout: PackedLayout) -> np.ndarray:
    """base [N, E], tiles [T-1, N, E], newline [E] -> [R, E] float32: the rows ``order`` feeds.

    Example: with every candidate kept and newline="rows" this is :func:`pack_all`'s output
    (less HF's newline-only rows of a width-0 grid, see the module doc).
    """
    e = _features(base, tiles, newline, layout)
    if newline is None and order.is_newline.any():
        raise InputError(f"newline must be [{e}] when the order holds {int(order.is_newline.sum())} newline rows")
    stacked = np.concatenate([np.asarray(base, np.float32)[None], np.asarray(tiles, np.float32)], axis=0)
    rows = np.empty((order.num_rows, e), dtype=np.float32)
    image = ~order.is_newline
    rows[image] = stacked[order.source_tile[image], order.source_patch[image]]
    if newline is not None:
        rows[order.is_newline] = np.asarray(newline, dtype=np.float32)
    return rows


@dataclass(frozen=True, eq=False)
class ImagePositions:
    """§6 positions of one image's fed rows and of the text that follows it."""

    image: np.ndarray  # [R] int64 strictly increasing: position_ids of the fed image rows
    text_start: int  # position of the first text token after the image


def image_positions(prefix_len: int, order: PackedOrder, total_rows: int, mode: str = "packed") -> ImagePositions:
    """Positions of the fed rows after ``prefix_len`` earlier tokens (§6).

    ``"packed"``: consecutive, text after at prefix_len + R. ``"original"``: prefix_len +
    original_position, text after at prefix_len + total_rows (the unpruned pack's rows, newlines
    included). Example: prefix 5, original positions (3, 576, 600, 624), total 1752 -> packed
    (5, 6, 7, 8) then 9; original (8, 581, 605, 629) then 1757.
    """
    if mode not in POSITION_MODES:
        raise InputError(f"positions must be one of {', '.join(POSITION_MODES)}, got {mode!r}")
    for name, value in (("prefix_len", prefix_len), ("total_rows", total_rows)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{name} must be an integer >= 0, got {value!r}")
    last = int(order.original_position[-1]) if order.num_rows else -1
    if total_rows <= last:
        raise InputError(f"total_rows must exceed the last original position {last}, got {total_rows}")
    if mode == "packed":
        image = prefix_len + np.arange(order.num_rows, dtype=np.int64)
        return ImagePositions(_frozen(image), int(prefix_len + order.num_rows))
    image = prefix_len + order.original_position.astype(np.int64)
    return ImagePositions(_frozen(image), int(prefix_len + total_rows))
