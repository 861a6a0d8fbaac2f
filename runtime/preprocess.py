"""Image loading and LLaVA preprocessing with Pillow and NumPy only.

:func:`preprocess` reproduces Hugging Face's ``LlavaImageProcessorPil`` (transformers 5.x) pixel for
pixel: RGB conversion, LLaVA-1.5 pad-to-square (``do_pad=True``, mode "pad") or none (mode
"crop"), shortest-edge resize through ``PIL.Image.resize``, centre crop, rescale, normalise.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import InputError
from runtime.model_registry import IMAGE_MODES

# Refuse shortest-edge resizes larger than this (about 400 MB as RGB): only "crop" mode on an
# extreme aspect ratio gets there (beyond about 1:1189 at image_size 336).
MAX_RESIZED_PIXELS = 1 << 27
# LLaVA-1.5 pads to a square before resizing: a 1x40000 image becomes 40000x40000x3 bytes (4.8 GB).
# Pillow's bomb guard sees only the 40000 pixels; this limit (Pillow's default MAX_IMAGE_PIXELS,
# ~0.27 GB as a padded RGB square) is checked on the padded square, before anything is allocated.
MAX_PADDED_PIXELS = 89_478_485

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """The image processor's constants (Hugging Face names; sizes in pixels, S = crop_size)."""

    image_size: int  # the shortest edge is resized to this (HF size["shortest_edge"])
    crop_size: int  # side S of the square centre crop (HF crop_size["height"] == ["width"])
    mode: str  # "pad": pad to square with the mean colour first (LLaVA-1.5); "crop": no padding
    image_mean: tuple[float, float, float]  # per RGB channel, on the [0, 1] scale
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"  # a key of RESAMPLE

    def __post_init__(self) -> None:
        for name in ("image_size", "crop_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"mode must be one of {', '.join(IMAGE_MODES)}, got {self.mode!r}")
        for name in ("image_mean", "image_std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
            object.__setattr__(self, name, values)
        if not all(0.0 <= m <= 1.0 for m in self.image_mean):
            raise ValueError(f"image_mean must lie in [0, 1], got {self.image_mean!r}")
        if not all(s > 0.0 for s in self.image_std):
            raise ValueError(f"image_std must be > 0, got {self.image_std!r}")
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise ValueError(f"rescale_factor must be finite and > 0, got {self.rescale_factor!r}")
        if self.resample not in RESAMPLE:
            names = ", ".join(RESAMPLE)
            raise ValueError(f"resample must be one of {names}, got {self.resample!r}")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The pad-to-square background, int(mean * 255) per channel as in LLaVA-1.5 and HF."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open, fully decode and EXIF-orient an image file; any unusable file is an InputError.

    The mode is kept (RGB conversion happens in :func:`preprocess`, like the HF processor given
    a PIL image). The EXIF orientation is applied as ``transformers.image_utils.load_image`` does.
    Pillow's decompression-bomb warning (more than ``Image.MAX_IMAGE_PIXELS`` pixels) is an
    error here; truncated files fail unless ``ImageFile.LOAD_TRUNCATED_IMAGES`` was set globally.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise InputError(f"image not found: {name}")
    if not os.path.isfile(name):
        raise InputError(f"not a file: {name}")
    return decode_image(name, name)


def decode_image(source: str | BinaryIO, name: str) -> Image.Image:
    """Fully decode and EXIF-orient ``source`` (a path or an open binary file, e.g. an HTTP
    request's bytes); ``name`` is how errors call it. Bombs and broken data are an InputError."""
    try:
        with warnings.catch_warnings():  # process-wide filter for this call (not thread-safe)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                return ImageOps.exif_transpose(image)  # a loaded copy, also without a tag
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        detail = " ".join(str(err).split())
        raise InputError(f"image refused as a decompression bomb: {name}: {detail}") from None
    except UnidentifiedImageError:
        raise InputError(f"not an image file Pillow can read: {name}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise InputError(f"cannot decode image {name}: {detail}") from None


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """PIL image (any mode) -> [3, S, S] float32 ``pixel_values``, S = ``config.crop_size``.

    Equal, bit for bit, to ``LlavaImageProcessorPil(do_pad=config.mode == "pad", ...)``. Note that
    16-bit and 32-bit grey modes (I;16, I, F) are clipped to 0..255 by Pillow's RGB conversion,
    not rescaled, exactly as in Hugging Face.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess needs a PIL.Image.Image, got {type(image).__name__}")
    if config.mode == "pad" and max(image.size) ** 2 > MAX_PADDED_PIXELS:  # before allocating anything
        side = max(image.size)
        raise InputError(
            f"image of {image.width}x{image.height} pixels would be padded to {side}x{side} "
            f"({side * side} pixels, limit {MAX_PADDED_PIXELS}); crop or resize it first"
        )
    rgb = to_rgb(image)  # [h, w, 3] uint8
    if config.mode == "pad":
        rgb = pad_to_square(rgb, config.pad_color)
    height, width = _shortest_edge_size(rgb.shape[0], rgb.shape[1], config.image_size)
    if height * width > MAX_RESIZED_PIXELS:
        raise InputError(
            f"image of {image.width}x{image.height} pixels is too elongated: its resize would "
            f"hold {height}x{width} pixels (limit {MAX_RESIZED_PIXELS}); use mode 'pad'"
        )
    resample = RESAMPLE[config.resample]
    resized = np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))
    cropped = center_crop(resized, config.crop_size)
    return rescale_and_normalize(cropped, config.rescale_factor, config.image_mean, config.image_std)


def rescale_and_normalize(
    pixels: np.ndarray,
    rescale_factor: float,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
) -> np.ndarray:
    """[..., h, w, 3] uint8 -> [..., 3, h, w] float32 ``(pixels * rescale_factor - mean) / std``.

    HF's arithmetic exactly: the rescale in float64 then cast to float32 (``image_transforms.rescale``),
    mean and std subtracted/divided in float32 (``normalize``). Example: 255 with mean 0.5, std 0.5 -> 1.0.
    """
    scaled = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis((scaled - mean) / std, -1, -3))


def to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image -> [h, w, 3] uint8; transparency is composited onto white (HF convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def pad_to_square(rgb: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """[h, w, 3] uint8 -> [m, m, 3], m = max(h, w), image centred (offset floored) on ``color``.

    Example: a 1x3 image becomes 3x3 with the image in row 1.
    """
    h, w, c = rgb.shape
    if h == w:
        return rgb
    side = max(h, w)
    out = np.empty((side, side, c), dtype=rgb.dtype)
    out[...] = np.asarray(color, dtype=rgb.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """[h, w, C] -> [size, size, C]; sides shorter than ``size`` are zero-padded first (as HF).

    Example: a 4x6 image cropped to 4 keeps columns 1..4.
    """
    h, w = rgb.shape[:2]
    new_h, new_w = max(size, h), max(size, w)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    if (new_h, new_w) != (h, w):
        padded = np.zeros((new_h, new_w) + rgb.shape[2:], dtype=rgb.dtype)
        padded[pad_top : pad_top + h, pad_left : pad_left + w] = rgb
        rgb = padded
    top = pad_top + (h - size) // 2
    left = pad_left + (w - size) // 2
    return rgb[max(0, top) : top + size, max(0, left) : left + size]


def _shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``shortest``; long side truncated.

    Same float expression as HF ``get_resize_output_image_size``. Example: (37, 91), 336 ->
    (336, 826).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)
