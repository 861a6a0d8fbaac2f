"""LLaVA-NeXT ("anyres") image preprocessing with Pillow and NumPy only.

:func:`preprocess_anyres` reproduces Hugging Face's ``LlavaNextImageProcessorPil`` (transformers
5.x, ``models/llava_next/image_processing_pil_llava_next.py``) pixel for pixel. transformers 5.x
has two LLaVA-NeXT processors with the same steps: ``LlavaNextImageProcessorPil`` (PIL/NumPy
backend) and ``LlavaNextImageProcessor`` (torchvision backend; what ``AutoImageProcessor`` picks for
llava-hf's ``"image_processor_type": "LlavaNextImageProcessor"`` when torchvision is installed).
We match the PIL one because its resizes are ``PIL.Image.resize`` with ``BICUBIC`` (resample 3),
the same resampler as the LLaVA-1.5 path (:mod:`runtime.preprocess`, matched against
``LlavaImageProcessorPil``) and the one the original LLaVA code used. The torchvision one resizes
uint8 tensors with torchvision's antialiased bicubic kernel, which rounds differently. Measured
against this module (transformers 5.23, torchvision 0.28): on skimage photos and random-noise
images up to 2 uint8 levels (max |Δ| 0.03 after normalising) on under 0.5 % of the values; on
noise squashed 3x (a 300x1000 base view) up to 10 levels (0.15) on 7 % of them.

HF's steps, each reproduced here (sizes are ``(height, width)``):

1. RGB conversion as :func:`runtime.preprocess.to_rgb` (transparency composited onto white).
2. ``best_resolution = select_best_resolution(image_size, image_grid_pinpoints)``.
3. Resize keeping aspect to :func:`runtime.anyres.geometry.patch_output_size` (``get_patch_output_size``:
   ceil-ed short side) and pad to ``best_resolution`` with **black** (uint8 0, before rescaling,
   so a padded pixel normalises to ``-mean / std``; unlike LLaVA-1.5's mean-colour square), the
   image centred with the odd pixel of padding at the bottom/right (``divmod(diff, 2)``).
4. Cut into ``crop_size`` tiles, row-major (HF ``divide_to_patches``: rows outer, columns inner).
5. The base view: the *whole* image resized to ``shortest_edge × shortest_edge`` (squashed, not
   aspect-preserving and not centre-cropped; HF ``get_image_patches``), prepended as tile 0.
6. Every view then goes through ``do_resize`` (shortest edge to ``shortest_edge``) and
   ``do_center_crop`` (``crop_size``); both are identities when ``shortest_edge == crop_size``, as
   in every llava-hf v1.6 config (Pillow returns a copy for a same-size resize).
7. Rescale (float64, then float32) and normalise (float32): :func:`rescale_and_normalize`.

HF's ``do_pad`` pads a *batch* to its largest tile count with zero tiles; one image needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.anyres.geometry import Size, patch_output_size, select_best_resolution
from runtime.preprocess import RESAMPLE, PreprocessConfig, center_crop, rescale_and_normalize, to_rgb

# llava-hf/llava-v1.6-* preprocessor_config.json values (HF's class defaults say 224; the repos 336).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (h, w)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD
PAD_VALUE = 0  # HF pads the resized image with uint8 zeros (np.pad / tvF.pad defaults)


@dataclass(frozen=True)
class AnyresConfig:
    """LLaVA-NeXT image-processor constants (HF names; pixels; defaults = llava-hf v1.6 repos)."""

    image_grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS  # (h, w), multiples of S
    crop_size: int = 336  # S: tile side (HF crop_size["height"] == ["width"], also the patch size)
    shortest_edge: int = 336  # base-view side and per-view resize (HF size["shortest_edge"])
    image_mean: tuple[float, float, float] = CLIP_MEAN  # per RGB channel, on the [0, 1] scale
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"  # a key of runtime.preprocess.RESAMPLE (HF resample=3)

    def __post_init__(self) -> None:
        for name in ("crop_size", "shortest_edge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        shared = self.view_config  # validates mean, std, rescale_factor and resample
        object.__setattr__(self, "image_mean", shared.image_mean)
        object.__setattr__(self, "image_std", shared.image_std)
        object.__setattr__(self, "image_grid_pinpoints", _pinpoints(self.image_grid_pinpoints, self.crop_size))

    @property
    def view_config(self) -> PreprocessConfig:
        """The per-view constants as a LLaVA-1.5 config (no pad-to-square: mode "crop")."""
        return PreprocessConfig(self.shortest_edge, self.crop_size, "crop", self.image_mean,
                                self.image_std, self.rescale_factor, self.resample)


def _pinpoints(value: Sequence[Sequence[int]], crop_size: int) -> tuple[tuple[int, int], ...]:
    """``value`` as (h, w) int pairs, each side a positive multiple of ``crop_size``, or a ValueError."""
    try:
        pairs = tuple(tuple(p) for p in value)
    except TypeError:
        raise ValueError(f"image_grid_pinpoints must be (height, width) pairs, got {value!r}") from None
    if not pairs:
        raise ValueError("image_grid_pinpoints must hold at least one (height, width), got none")
    for pair in pairs:
        ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair)
        if len(pair) != 2 or not ints or not all(v >= crop_size and v % crop_size == 0 for v in pair):
            raise ValueError(
                f"each grid pinpoint must be (height, width) multiples of crop_size {crop_size}, got {pair!r}"
            )
    return tuple((int(h), int(w)) for h, w in pairs)


@dataclass(frozen=True)
class AnyresPixels:
    """One image preprocessed for LLaVA-NeXT: the base view, then the grid tiles row-major."""

    pixel_values: np.ndarray  # [T, 3, S, S] float32, T = 1 + rows * cols; tile 0 = base view
    image_size: Size  # (height, width) of the original image (HF image_sizes)
    best_resolution: Size  # (height, width) pinpoint the image was resized and padded to
    grid: Size  # (rows, cols) of crop_size tiles covering best_resolution

    def __post_init__(self) -> None:
        tiles = 1 + self.grid[0] * self.grid[1]
        shape = self.pixel_values.shape
        if len(shape) != 4 or shape[0] != tiles or shape[1] != 3 or shape[2] != shape[3]:
            raise ValueError(f"pixel_values must be [{tiles}, 3, S, S] for grid {self.grid}, got {list(shape)}")

    @property
    def num_tiles(self) -> int:
        """T: the base view plus rows * cols grid tiles."""
        return self.pixel_values.shape[0]


def preprocess_anyres(image: Image.Image, config: AnyresConfig) -> AnyresPixels:
    """PIL image (any mode) -> [1 + rows * cols, 3, S, S] float32 ``pixel_values`` and its geometry.

    Equal, bit for bit, to ``LlavaNextImageProcessorPil(...)(image)["pixel_values"][0]`` with the
    same constants. Example: a 1000x500 (w x h) image -> best resolution (336, 672), grid (1, 2),
    pixel_values [3, 3, 336, 336].
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_anyres needs a PIL.Image.Image, got {type(image).__name__}")
    image_size = (image.height, image.width)
    best = select_best_resolution(image_size, config.image_grid_pinpoints)  # InputError on a 0-pixel side
    rgb = to_rgb(image)  # [h, w, 3] uint8
    resample = RESAMPLE[config.resample]
    fitted = _resize(rgb, patch_output_size(image_size, best), resample)
    grid = (best[0] // config.crop_size, best[1] // config.crop_size)
    tiles = split_tiles(pad_to_resolution(fitted, best), config.crop_size)
    base = _resize(rgb, (config.shortest_edge, config.shortest_edge), resample)
    views = [_view(v, config, resample) for v in (base, *tiles)]
    pixel_values = rescale_and_normalize(np.stack(views), config.rescale_factor,
                                         config.image_mean, config.image_std)
    return AnyresPixels(pixel_values, image_size, best, grid)


def pad_to_resolution(rgb: np.ndarray, target: Sequence[int]) -> np.ndarray:
    """[h, w, C] -> [H, W, C] = ``target``, centred on ``PAD_VALUE``; an odd remainder goes to the
    bottom/right (HF ``_get_padding_size``: ``divmod(H - h, 2)``).

    Example: a 1x2 image padded to (4, 3) sits in row 1, column 0 (1 row above, 2 below).
    """
    h, w = rgb.shape[:2]
    height, width = int(target[0]), int(target[1])
    if h > height or w > width:
        raise ValueError(f"image of {h}x{w} (h x w) does not fit into {height}x{width}")
    top, left = (height - h) // 2, (width - w) // 2
    out = np.full((height, width) + rgb.shape[2:], PAD_VALUE, dtype=rgb.dtype)
    out[top : top + h, left : left + w] = rgb
    return out


def split_tiles(rgb: np.ndarray, size: int) -> np.ndarray:
    """[rows * S, cols * S, C] -> [rows * cols, S, S, C] tiles, row-major (S = ``size``).

    Example: a 2x4 image with size 2 gives tiles [:, 0:2], then [:, 2:4].
    """
    h, w = rgb.shape[:2]
    if h % size or w % size:
        raise ValueError(f"image of {h}x{w} (h x w) is not a whole number of {size}-pixel tiles")
    rows, cols = h // size, w // size
    grid = rgb.reshape(rows, size, cols, size, *rgb.shape[2:]).swapaxes(1, 2)
    return grid.reshape(rows * cols, size, size, *rgb.shape[2:])


def _resize(rgb: np.ndarray, size: Size, resample: Image.Resampling) -> np.ndarray:
    """[h, w, 3] uint8 -> [size[0], size[1], 3] through ``PIL.Image.resize`` (as HF's PIL backend)."""
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample=resample))


def _view(rgb: np.ndarray, config: AnyresConfig, resample: Image.Resampling) -> np.ndarray:
    """HF's per-view ``do_resize`` (square views: to ``shortest_edge`` square) + ``do_center_crop``."""
    side = config.shortest_edge
    if rgb.shape[:2] != (side, side):  # tiles are S x S; identity when S == shortest_edge
        rgb = _resize(rgb, (side, side), resample)
    return center_crop(rgb, config.crop_size)
