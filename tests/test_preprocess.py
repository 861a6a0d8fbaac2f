"""Image loading and preprocessing: pixel parity with Hugging Face's LlavaImageProcessorPil."""

from __future__ import annotations

import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InputError
from runtime.preprocess import (
    PreprocessConfig,
    center_crop,
    load_image,
    pad_to_square,
    preprocess,
    to_rgb,
)

PIXEL_ATOL = 1e-6  # the spec's tolerance; on top of it every test demands identical pixels
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZES = [(37, 91), (500, 333), (1, 700), (700, 1), (336, 336), (20, 20)]  # (height, width)
MODES = ["RGB", "RGBA", "LA", "P", "PA", "CMYK", "I;16", "I", "F", "L", "1"]


@cache
def hf_processor(mode: str, image_size: int = 336, crop_size: int = 336):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": crop_size, "width": crop_size},
        do_pad=mode == "pad", image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )


def config(mode: str, image_size: int = 336, crop_size: int = 336) -> PreprocessConfig:
    return PreprocessConfig(image_size, crop_size, mode, CLIP_MEAN, CLIP_STD)


def reference(image: Image.Image, mode: str, image_size: int = 336, crop_size: int = 336):
    return hf_processor(mode, image_size, crop_size)(image)["pixel_values"][0]


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.float32, what
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PIXEL_ATOL, err_msg=what)
    np.testing.assert_array_equal(actual, expected, err_msg=f"{what}: not the same pixels")


def synthetic(mode: str, height: int, width: int, seed: int = 0) -> Image.Image:
    """A random image in ``mode``; RGBA-derived modes get varied (partial) transparency."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 700, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-50, 700, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(120, 90, (height, width)).astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
    if mode == "P":  # a palette image with a transparent index, read through info["transparency"]
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 3
        return image
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_matches_hf_on_odd_sizes(mode: str, height: int, width: int) -> None:
    # "crop" on a 1-pixel side resizes to 336 x 235200 (seconds); a 48-pixel target keeps the
    # same code path fast. The full-size case is the slow test below.
    side = 48 if mode == "crop" and min(height, width) == 1 else 336
    image = synthetic("RGB", height, width)
    actual = preprocess(image, config(mode, side, side))
    assert_same_pixels(actual, reference(image, mode, side, side), f"{height}x{width}")


@pytest.mark.slow
@pytest.mark.parametrize(("height", "width"), [(1, 700), (700, 1)])
def test_matches_hf_on_one_pixel_side_in_crop_mode_full_size(height: int, width: int) -> None:
    image = synthetic("RGB", height, width)
    assert_same_pixels(preprocess(image, config("crop")), reference(image, "crop"), "1-pixel side")


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("image_mode", MODES)
def test_matches_hf_for_every_pil_mode(mode: str, image_mode: str) -> None:
    image = synthetic(image_mode, 45, 71, seed=len(image_mode))
    assert image.mode == image_mode
    assert_same_pixels(preprocess(image, config(mode)), reference(image, mode), image_mode)


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_matches_hf_when_crop_exceeds_the_resized_image(mode: str) -> None:
    image = synthetic("RGB", 30, 17)
    actual = preprocess(image, config(mode, image_size=20, crop_size=25))
    assert_same_pixels(actual, reference(image, mode, 20, 25), "zero-padded centre crop")


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "logo"]


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_matches_hf_on_real_photos_through_load_image(tmp_path: Path, name: str,
                                                      suffix: str) -> None:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if suffix == "jpg" and pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[..., :3]  # JPEG has no alpha
    path = tmp_path / f"{name}.{suffix}"
    Image.fromarray(pixels).save(path)
    image = load_image(path)
    for mode in ("pad", "crop"):
        expected = reference(image, mode)
        assert_same_pixels(preprocess(image, config(mode)), expected, f"{name} {mode}")


def test_negative_controls_fail_at_the_same_tolerance() -> None:
    """Plausible reimplementation slips must not reach the HF pixels."""
    wide = synthetic("RGB", 37, 91)
    expected = reference(wide, "pad")
    bilinear = PreprocessConfig(336, 336, "pad", CLIP_MEAN, CLIP_STD, resample="bilinear")
    assert not np.allclose(preprocess(wide, bilinear), expected, rtol=0, atol=PIXEL_ATOL)
    black_pad = preprocess_by_hand(wide, pad_color=(0, 0, 0), size=(336, 336))
    assert not np.allclose(black_pad, expected, rtol=0, atol=PIXEL_ATOL)

    tall = synthetic("RGB", 500, 333)  # 336 * 500 / 333 = 504.5: rounding gives 505, HF truncates
    rounded = preprocess_by_hand(tall, pad_color=None, size=(505, 336))
    assert not np.allclose(rounded, reference(tall, "crop"), rtol=0, atol=PIXEL_ATOL)

    rgba = synthetic("RGBA", 45, 71)
    no_composite = preprocess(rgba.convert("RGB"), config("pad"))  # alpha dropped, not on white
    assert not np.allclose(no_composite, reference(rgba, "pad"), rtol=0, atol=PIXEL_ATOL)

    deep = synthetic("I;16", 45, 71)
    scaled = Image.fromarray((np.asarray(deep) >> 8).astype(np.uint8))  # 16 -> 8 bit rescale
    assert not np.allclose(preprocess(scaled, config("crop")), reference(deep, "crop"),
                           rtol=0, atol=PIXEL_ATOL)


def preprocess_by_hand(image: Image.Image, pad_color: tuple[int, int, int] | None,
                       size: tuple[int, int]) -> np.ndarray:
    """The pipeline with a chosen pad colour and resize (height, width), for the controls."""
    rgb = to_rgb(image)
    if pad_color is not None:
        rgb = pad_to_square(rgb, pad_color)
    resized = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.Resampling.BICUBIC))
    x = (center_crop(resized, 336).astype(np.float64) / 255).astype(np.float32)
    return ((x - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)


def test_helpers_hand_cases() -> None:
    row = np.arange(9, dtype=np.uint8).reshape(1, 3, 3)
    padded = pad_to_square(row, (7, 8, 9))
    assert padded.shape == (3, 3, 3)
    np.testing.assert_array_equal(padded[1], row[0])
    np.testing.assert_array_equal(padded[0], [[7, 8, 9]] * 3)
    image = np.arange(24, dtype=np.uint8).reshape(4, 6, 1)
    np.testing.assert_array_equal(center_crop(image, 4)[..., 0], image[:, 1:5, 0])
    small = np.ones((1, 2, 1), dtype=np.uint8)
    padded_crop = center_crop(small, 3)[..., 0]  # HF pads ceil((3 - 2) / 2) = 1 column on the left
    np.testing.assert_array_equal(padded_crop, [[0, 0, 0], [0, 1, 1], [0, 0, 0]])
    assert config("pad").pad_color == (122, 116, 104)


def test_extreme_aspect_ratio_in_crop_mode_is_refused() -> None:
    thin = Image.new("RGB", (2000, 1))
    with pytest.raises(InputError, match="2000x1 pixels is too elongated.*use mode 'pad'"):
        preprocess(thin, config("crop"))
    assert preprocess(thin, config("pad")).shape == (3, 336, 336)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 0}, "image_size"),
        ({"crop_size": 33.5}, "crop_size"),
        ({"mode": "stretch"}, "mode must be one of pad, crop"),
        ({"image_mean": (0.5, 0.5)}, "3 finite numbers"),
        ({"image_mean": (0.5, 0.5, 1.5)}, r"\[0, 1\]"),
        ({"image_std": (0.2, 0.0, 0.2)}, "> 0"),
        ({"rescale_factor": 0.0}, "rescale_factor"),
        ({"resample": "cubic"}, "resample must be one of"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    args = {"image_size": 336, "crop_size": 336, "mode": "pad",
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, **changes}
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**args)


def test_config_accepts_manifest_lists() -> None:
    cfg = PreprocessConfig(image_size=336, crop_size=336, mode="crop",
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    assert cfg.image_mean == CLIP_MEAN and isinstance(cfg.image_std, tuple)


# ----------------------------------------------------------------------------- load_image


def one_line_input_error(path: Path, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        load_image(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_image_missing_and_directory(tmp_path: Path) -> None:
    one_line_input_error(tmp_path / "nope.png", "image not found")
    one_line_input_error(tmp_path, "not a file")


def test_load_image_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    one_line_input_error(path, "not an image file")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_load_image_truncated(tmp_path: Path, suffix: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole.{suffix}"
    Image.fromarray(noise).save(whole)
    data = whole.read_bytes()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) * 6 // 10])
    one_line_input_error(path, "cannot decode image")
    assert load_image(whole).size == (64, 64)  # control: the intact file loads


@pytest.mark.parametrize("side", [40, 50])  # 1600 px: Pillow only warns; 2500 px: Pillow raises
def test_load_image_decompression_bomb_with_small_limit(tmp_path: Path, side: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    one_line_input_error(path, "decompression bomb")


def test_load_image_huge_header_png(tmp_path: Path) -> None:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
            ">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 1e10 grey pixels
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    one_line_input_error(path, "decompression bomb")


def test_load_image_applies_exif_orientation_and_keeps_mode(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (5, 3), (1, 2, 3, 4)).save(rgba)
    loaded = load_image(rgba)
    assert loaded.mode == "RGBA" and loaded.size == (5, 3)
    rgba.unlink()  # fully loaded: no lazy read from the file afterwards
    assert loaded.getpixel((0, 0)) == (1, 2, 3, 4)



def test_padded_square_over_the_limit_is_refused_before_allocating() -> None:
    import tracemalloc

    from runtime.preprocess import MAX_PADDED_PIXELS

    thin = Image.new("RGB", (1, 40000))  # Pillow's guard: 40,000 pixels, fine; padded: 1.6e9 pixels
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"1x40000 pixels would be padded to 40000x40000"):
            preprocess(thin, config("pad"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000  # refused before the 4.8 GB square exists
    side = int(MAX_PADDED_PIXELS**0.5)
    assert preprocess(Image.new("RGB", (1, side)), config("pad")).shape == (3, 336, 336)  # at the limit: fine
