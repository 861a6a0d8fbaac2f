"""LLaVA-NeXT anyres preprocessing: pixel parity with Hugging Face's LlavaNextImageProcessorPil."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.anyres.geometry import anyres_grid_shape, patch_output_size
from runtime.anyres.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    LLAVA_NEXT_PINPOINTS,
    AnyresConfig,
    AnyresPixels,
    pad_to_resolution,
    preprocess_anyres,
    split_tiles,
)
from runtime.errors import InputError
from runtime.preprocess import RESAMPLE, rescale_and_normalize, to_rgb
from tests.test_preprocess import MODES, synthetic

PIXEL_ATOL = 1e-6  # the spec's tolerance; on top of it every parity test demands identical pixels
DEFAULT = AnyresConfig()  # llava-hf/llava-v1.6-* constants
# A small config whose views are resized (40 -> 32 needs do_resize) and centre-cropped per view.
SMALL = AnyresConfig(((32, 64), (64, 32), (64, 64)), crop_size=32, shortest_edge=40)
# shortest_edge < crop_size: HF's centre crop zero-pads every view.
PADDED = AnyresConfig(((32, 64), (64, 32)), crop_size=32, shortest_edge=28)
# (height, width) -> the pinpoint LLaVA-NeXT picks; one image per pinpoint aspect.
PER_PINPOINT = {(500, 1000): (336, 672), (1000, 500): (672, 336), (700, 700): (672, 672),
                (1500, 300): (1008, 336), (300, 1500): (336, 1008)}
EXTREME = [(40, 320), (320, 40), (2400, 300), (300, 2400), (1, 4000), (4000, 1)]  # 1:8, 8:1, thin
SMALL_AND_ODD = [(5, 7), (7, 5), (1, 1), (2, 3), (333, 337), (337, 1009), (671, 673)]


@cache
def hf_processor(config: AnyresConfig):
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": config.shortest_edge},
        crop_size={"height": config.crop_size, "width": config.crop_size},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_mean=list(config.image_mean), image_std=list(config.image_std), resample=3,
        rescale_factor=config.rescale_factor, do_pad=True,
    )


def reference(image: Image.Image, config: AnyresConfig = DEFAULT) -> tuple[np.ndarray, tuple[int, int]]:
    """HF's ``pixel_values[0]`` [T, 3, S, S] and ``image_sizes[0]`` (height, width)."""
    out = hf_processor(config)(image)
    return out["pixel_values"][0], tuple(int(v) for v in out["image_sizes"][0])


def assert_matches_hf(image: Image.Image, config: AnyresConfig = DEFAULT) -> AnyresPixels:
    expected, expected_size = reference(image, config)
    actual = preprocess_anyres(image, config)
    what = f"{image.mode} {image.height}x{image.width}"
    assert actual.image_size == expected_size == (image.height, image.width), what
    assert actual.pixel_values.shape == expected.shape, what  # same tile count, S x S
    assert actual.pixel_values.dtype == expected.dtype == np.float32, what
    np.testing.assert_allclose(actual.pixel_values, expected, rtol=0, atol=PIXEL_ATOL, err_msg=what)
    np.testing.assert_array_equal(actual.pixel_values, expected, err_msg=f"{what}: not the same pixels")
    return actual


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("size", "best"), PER_PINPOINT.items(), ids=str)
def test_matches_hf_for_every_pinpoint(size: tuple[int, int], best: tuple[int, int]) -> None:
    actual = assert_matches_hf(noise(*size))
    assert actual.best_resolution == best
    assert actual.grid == (best[0] // 336, best[1] // 336)


@pytest.mark.parametrize("size", EXTREME + SMALL_AND_ODD, ids=str)
def test_matches_hf_on_extreme_tiny_and_odd_sizes(size: tuple[int, int]) -> None:
    assert_matches_hf(noise(*size, seed=sum(size)))


@pytest.mark.parametrize("image_mode", MODES)
def test_matches_hf_for_every_pil_mode(image_mode: str) -> None:
    image = synthetic(image_mode, 45, 71, seed=len(image_mode))
    assert image.mode == image_mode
    assert_matches_hf(image)
    assert_matches_hf(image.transpose(Image.Transpose.ROTATE_90))  # tall: other padding axis


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_matches_hf_on_real_photos(name: str) -> None:
    import skimage.data

    assert_matches_hf(Image.fromarray(getattr(skimage.data, name)()))


@pytest.mark.parametrize("config", [SMALL, PADDED], ids=["resized-views", "zero-padded-crop"])
@pytest.mark.parametrize("size", [(30, 50), (50, 30), (70, 70), (3, 100), (9, 9)], ids=str)
def test_matches_hf_when_views_are_resized_and_cropped(config: AnyresConfig, size: tuple[int, int]) -> None:
    assert_matches_hf(synthetic("RGBA", *size, seed=size[0]), config)


# ------------------------------------------------------------------------- negative controls


def by_hand(image: Image.Image, *, resample: str = "bicubic", column_major: bool = False,
            corner_pad: bool = False, pad_color: int = 0, round_fit: bool = False,
            crop_base: bool = False) -> np.ndarray:
    """The anyres pipeline (default config) with one plausible slip switched on."""
    s, (h, w) = 336, (image.height, image.width)
    best = preprocess_anyres(image, DEFAULT).best_resolution
    rgb, filt = to_rgb(image), RESAMPLE[resample]
    fh, fw = patch_output_size((h, w), best)
    if round_fit:  # round the short side instead of HF's ceil
        scale = min(best[0] / h, best[1] / w)
        fh, fw = min(round(h * scale), best[0]), min(round(w * scale), best[1])
    fitted = np.asarray(Image.fromarray(rgb).resize((fw, fh), filt))
    top, left = (0, 0) if corner_pad else ((best[0] - fh) // 2, (best[1] - fw) // 2)
    padded = np.full((*best, 3), pad_color, np.uint8)
    padded[top : top + fh, left : left + fw] = fitted
    tiles = split_tiles(padded, s)
    if column_major:
        rows, cols = best[0] // s, best[1] // s
        tiles = tiles.reshape(rows, cols, s, s, 3).swapaxes(0, 1).reshape(-1, s, s, 3)
    if crop_base:  # LLaVA-1.5 style: shortest edge to 336, then centre crop
        scale = s / min(h, w)
        resized = Image.fromarray(rgb).resize((max(s, int(w * scale)), max(s, int(h * scale))), filt)
        top, left = (resized.height - s) // 2, (resized.width - s) // 2
        base = np.asarray(resized)[top : top + s, left : left + s]
    else:
        base = np.asarray(Image.fromarray(rgb).resize((s, s), filt))
    return rescale_and_normalize(np.stack([base, *tiles]), 1 / 255, CLIP_MEAN, CLIP_STD)


SLIPS = {
    "bilinear": {"resample": "bilinear"},
    "column-major tiles": {"column_major": True},
    "padding at the corner": {"corner_pad": True},
    "mean-colour padding": {"pad_color": 122},
    "rounded fit size": {"round_fit": True},
    "cropped base view": {"crop_base": True},
}


def test_by_hand_without_slips_matches_hf() -> None:
    """The control's own pipeline is right, so each slip below is the only difference."""
    for size in [(700, 690), (1500, 500), (45, 71)]:
        image = noise(*size, seed=7)
        np.testing.assert_array_equal(by_hand(image), reference(image)[0], err_msg=str(size))


@pytest.mark.parametrize("slip", SLIPS)
def test_negative_controls_fail_at_the_same_tolerance(slip: str) -> None:
    # 700 x 690 -> (672, 672), a 2 x 2 grid: 690 * 0.96 = 662.4 (ceil 663, round 662), 9 columns
    # of padding, and a non-square image whose squashed and cropped base views differ.
    image = noise(700, 690, seed=3)
    expected = reference(image)[0]
    wrong = by_hand(image, **SLIPS[slip])
    assert wrong.shape == expected.shape
    assert not np.allclose(wrong, expected, rtol=0, atol=PIXEL_ATOL), slip


# ---------------------------------------------------------------------- properties and helpers


@st.composite
def configs_and_sizes(draw: st.DrawFn) -> tuple[AnyresConfig, tuple[int, int]]:
    s = draw(st.integers(4, 24))
    multiples = st.tuples(st.integers(1, 3), st.integers(1, 3))
    pins = draw(st.lists(multiples, min_size=1, max_size=4))
    config = AnyresConfig(tuple((a * s, b * s) for a, b in pins), crop_size=s,
                          shortest_edge=draw(st.integers(s - 3, s + 3)))
    return config, (draw(st.integers(1, 120)), draw(st.integers(1, 120)))


@settings(max_examples=60, deadline=None)
@given(configs_and_sizes())
def test_property_base_plus_grid_of_square_tiles(case: tuple[AnyresConfig, tuple[int, int]]) -> None:
    config, (h, w) = case
    out = preprocess_anyres(synthetic("RGB", h, w), config)
    rows, cols = out.grid
    s = config.crop_size
    assert out.pixel_values.shape == (1 + rows * cols, 3, s, s) and out.num_tiles == 1 + rows * cols
    assert out.pixel_values.dtype == np.float32 and np.isfinite(out.pixel_values).all()
    assert out.image_size == (h, w) and out.best_resolution in config.image_grid_pinpoints
    assert out.grid == anyres_grid_shape((h, w), config.image_grid_pinpoints, s)


def test_default_config_is_llava_hf_v16() -> None:
    assert DEFAULT.image_grid_pinpoints == LLAVA_NEXT_PINPOINTS == (
        (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert (DEFAULT.crop_size, DEFAULT.shortest_edge, DEFAULT.resample) == (336, 336, "bicubic")
    assert DEFAULT.rescale_factor == pytest.approx(1 / 255)


def test_padding_and_tiling_hand_cases() -> None:
    one = np.array([[[1], [2]]], dtype=np.uint8)  # 1 x 2
    padded = pad_to_resolution(one, (4, 3))[..., 0]  # divmod(3, 2): 1 row above, 2 below
    np.testing.assert_array_equal(padded, [[0, 0, 0], [1, 2, 0], [0, 0, 0], [0, 0, 0]])
    image = np.arange(8).reshape(2, 4, 1)
    tiles = split_tiles(image, 2)[..., 0]
    np.testing.assert_array_equal(tiles, [[[0, 1], [4, 5]], [[2, 3], [6, 7]]])
    assert patch_output_size((330, 1000), (336, 672)) == (222, 672)
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_resolution(np.zeros((5, 2, 3), np.uint8), (4, 4))
    with pytest.raises(ValueError, match="whole number of 2-pixel tiles"):
        split_tiles(np.zeros((3, 4, 3), np.uint8), 2)


def test_patch_output_size_matches_hf_on_random_sizes() -> None:
    from transformers.image_processing_utils import get_patch_output_size

    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, (2000, 2)):
        target = LLAVA_NEXT_PINPOINTS[int(h + w) % 5]
        expected = get_patch_output_size(np.zeros((1, h, w)), target, "channels_first")
        assert patch_output_size((int(h), int(w)), target) == expected, (h, w, target)


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="needs a PIL.Image.Image, got ndarray"):
        preprocess_anyres(np.zeros((4, 4, 3), np.uint8), DEFAULT)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"image_size must be \(height, width\) integers >= 1"):
        preprocess_anyres(Image.new("RGB", (0, 5)), DEFAULT)
    with pytest.raises(ValueError, match=r"pixel_values must be \[3, 3, S, S\]"):
        AnyresPixels(np.zeros((2, 3, 4, 4), np.float32), (4, 4), (4, 8), (1, 2))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"crop_size": 0}, "crop_size must be an integer >= 1"),
        ({"shortest_edge": 33.5}, "shortest_edge must be an integer >= 1"),
        ({"image_grid_pinpoints": ()}, "at least one"),
        ({"image_grid_pinpoints": ((336, 500),)}, "multiples of crop_size 336"),
        ({"image_grid_pinpoints": ((336,),)}, "multiples of crop_size"),
        ({"image_grid_pinpoints": 5}, "must be .height, width. pairs"),
        ({"image_mean": (0.5, 0.5)}, "3 finite numbers"),
        ({"image_std": (0.2, 0.0, 0.2)}, "> 0"),
        ({"rescale_factor": -1.0}, "rescale_factor"),
        ({"resample": "cubic"}, "resample must be one of"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnyresConfig(**changes)


def test_config_accepts_manifest_lists() -> None:
    config = AnyresConfig(image_grid_pinpoints=[[336, 672], [672, 336]], image_mean=list(CLIP_MEAN))
    assert config.image_grid_pinpoints == ((336, 672), (672, 336)) and config.image_mean == CLIP_MEAN
    hash(config)  # frozen and hashable after normalising lists to tuples
