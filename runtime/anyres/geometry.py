"""LLaVA-NeXT "anyres" geometry in pure Python: best resolution, tile grid, unpadding, row count.

Integer for integer the same as Hugging Face transformers 5.x: ``select_best_resolution``
(``image_processing_utils``), ``get_anyres_image_grid_shape`` and ``unpad_image``
(``models/llava_next/modeling_llava_next.py``) and the row count of
``LlavaNextModel.pack_image_features``. Sizes are ``(height, width)`` pairs throughout, as HF's
``image_sizes`` are; pixels for images and pinpoints, patches for feature grids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Unpad:
    """The part of a padded ``(H, W)`` patch grid that covers the image: rows, then columns."""

    top: int  # first kept row; rows top : top + height are kept
    left: int  # first kept column; columns left : left + width are kept
    height: int  # kept rows (0 for an extreme aspect ratio: HF keeps none either)
    width: int  # kept columns

    @property
    def rows(self) -> slice:
        """The kept rows as a slice of the padded grid's first axis."""
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        """The kept columns as a slice of the padded grid's second axis."""
        return slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's feature rows come from in LLaVA-NeXT's packed sequence (strategy none)."""

    best_resolution: Size  # (height, width) in pixels the image is resized and padded to
    grid_shape: Size  # (gh, gw) tiles of the grid, row-major after the base tile
    patches_per_side: int  # P = tile_size // patch_size (24 for CLIP ViT-L/14-336)
    unpad: Unpad  # kept part of the (gh * P, gw * P) patch grid
    newline: bool  # one image_newline row after every kept grid row

    @property
    def base_rows(self) -> int:
        """Rows of the base tile: P * P (576)."""
        return self.patches_per_side**2

    @property
    def grid_rows(self) -> int:
        """Image rows of the unpadded grid, newlines excluded."""
        return self.unpad.height * self.unpad.width

    @property
    def newline_rows(self) -> int:
        """image_newline rows: one per kept grid row, or none."""
        return self.unpad.height if self.newline else 0

    @property
    def num_rows(self) -> int:
        """All rows the packed image feeds to the LLM: base + grid + newlines."""
        return self.base_rows + self.grid_rows + self.newline_rows


def _size(value: Sequence[int], name: str) -> Size:
    """``value`` as a (height, width) pair of ints >= 1, or an InputError saying what it got."""
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise InputError(f"{name} must be (height, width) integers >= 1, got {value!r}")
    return int(pair[0]), int(pair[1])


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _better(effective: int, wasted: int, best_effective: int, best_wasted: float) -> bool:
    """HF's order: more effective pixels, then less waste; a full tie keeps the earlier pinpoint."""
    return effective > best_effective or (effective == best_effective and wasted < best_wasted)


def select_best_resolution(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]]) -> Size:
    """The (height, width) pinpoint an image is resized and padded to, as LLaVA-NeXT picks it.

    Example (LLaVA-NeXT pinpoints): ``(500, 1000) -> (336, 672)``; ``(10, 10) -> (336, 672)``
    (every pinpoint keeps all 100 pixels; the two least wasteful tie and the first wins).
    """
    height, width = _size(image_size, "image_size")
    pinpoints = [_size(p, "each grid pinpoint") for p in grid_pinpoints]
    if not pinpoints:
        raise InputError("grid_pinpoints must hold at least one (height, width), got none")
    best, best_effective, best_wasted = pinpoints[0], 0, math.inf
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        downscaled = int(width * scale) * int(height * scale)  # int(): HF truncates each side
        effective = min(downscaled, width * height)
        wasted = pin_width * pin_height - effective
        if _better(effective, wasted, best_effective, best_wasted):
            best, best_effective, best_wasted = (pin_height, pin_width), effective, wasted
    return best


def anyres_grid_shape(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int) -> Size:
    """(gh, gw) tiles of side ``tile_size`` pixels (HF's ``patch_size`` argument, which LLaVA-NeXT
    passes ``vision_config.image_size``) covering the best resolution, floor-divided as in HF.

    Example: ``((500, 1000), LLaVA-NeXT pinpoints, 336) -> (1, 2)``.
    """
    tile_size = _positive(tile_size, "tile_size")
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return height // tile_size, width // tile_size


def _scaled_length(length: int, scale: float) -> int:
    """HF's ``int(round(length * scale, 7))``: truncation that forgives float noise (47.999…→48)."""
    return int(round(length * scale, 7))


def unpad_shape(current: Sequence[int], original_size: Sequence[int]) -> Unpad:
    """The rows/columns of a padded ``current`` (H, W) patch grid that HF ``unpad_image`` keeps.

    The padding is split evenly ((H - new) // 2 each side), so an odd remainder keeps one extra
    row. Example: ``((24, 48), (500, 1000)) -> Unpad(top=0, left=0, height=24, width=48)``;
    ``((24, 48), (330, 1000)) -> Unpad(top=4, left=0, height=16, width=48)`` (new height
    15.84 truncates to 15, padding (24 - 15) // 2 = 4 each side, so 16 rows stay).
    """
    current_height, current_width = _size(current, "current")
    original_height, original_width = _size(original_size, "original_size")
    if original_width / original_height > current_width / current_height:
        new_height = _scaled_length(original_height, current_width / original_width)
        padding = (current_height - new_height) // 2
        return Unpad(padding, 0, current_height - 2 * padding, current_width)
    new_width = _scaled_length(original_width, current_height / original_height)
    padding = (current_width - new_width) // 2
    return Unpad(0, padding, current_height, current_width - 2 * padding)


def anyres_layout(
    image_size: Sequence[int],
    grid_pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    patch_size: int,
    newline: bool = True,
) -> AnyresLayout:
    """The packed layout of one image: best resolution, tile grid, unpadding, newline rows.

    ``tile_size`` and ``patch_size`` are HF's ``vision_config.image_size`` and ``.patch_size``.
    Example: ``((500, 1000), LLaVA-NeXT pinpoints, 336, 14).num_rows == 576 + 24 * 48 + 24``.
    """
    tile_size = _positive(tile_size, "tile_size")
    patch_size = _positive(patch_size, "patch_size")
    per_side = tile_size // patch_size
    if per_side < 1:
        raise InputError(f"patch_size must be <= tile_size ({tile_size}), got {patch_size}")
    best = select_best_resolution(image_size, grid_pinpoints)
    grid = (best[0] // tile_size, best[1] // tile_size)
    unpad = unpad_shape((grid[0] * per_side, grid[1] * per_side), image_size)
    return AnyresLayout(best, grid, per_side, unpad, bool(newline))


def num_feature_rows(
    image_size: Sequence[int],
    grid_pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    patch_size: int,
    newline: bool = True,
) -> int:
    """Rows HF ``pack_image_features`` makes for one image: P*P base + unpadded grid + newlines.

    Example: ``((500, 1000), LLaVA-NeXT pinpoints, 336, 14) -> 576 + 1152 + 24 = 1752``.
    """
    return anyres_layout(image_size, grid_pinpoints, tile_size, patch_size, newline).num_rows


def patch_output_size(image_size: Sequence[int], target: Sequence[int]) -> Size:
    """(height, width) an image is resized to inside ``target`` keeping its aspect, as HF
    ``get_patch_output_size``: the tighter side fills ``target``, the other is ceil-ed and capped.

    Example: ``((500, 1000), (336, 672)) -> (336, 672)``; ``((330, 1000), (336, 672)) -> (222, 672)``
    (330 * 0.672 = 221.76 rounds up to 222).
    """
    height, width = _size(image_size, "image_size")
    target_height, target_width = _size(target, "target")
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)
