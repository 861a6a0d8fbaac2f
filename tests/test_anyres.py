"""LLaVA-NeXT anyres geometry: integer-exact parity with transformers' own functions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime.anyres import geometry as anyres
from runtime.anyres.geometry import (
    Unpad,
    anyres_grid_shape,
    anyres_layout,
    num_feature_rows,
    select_best_resolution,
    unpad_shape,
)
from runtime.errors import InputError

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's (h, w)
TILE, PATCH = 336, 14  # vision_config.image_size, .patch_size of CLIP ViT-L/14-336
# Float-noise cases: the scaled side is 50.999… where HF's round(…, 7) gives 51 and a floor 50,
# and the padding (current - new) is odd, so the kept grid differs.
NOISE = [(2992, 1408), (1384, 2941)]
SIZES = (
    [(1, 1), (2, 3), (10, 10), (20, 7), (7, 20)]  # tiny
    + [(336, 336), (1000, 1000), (4000, 4000), (6000, 6000)]  # squares
    + [(1, 4000), (4000, 1), (2, 4000), (4000, 2), (4, 4000), (4000, 4), (1, 1000), (1000, 1)]
    + [tuple(p) for p in PINPOINTS]
    + [(p[0] + 1, p[1]) for p in PINPOINTS]
    + [(p[0], p[1] - 1) for p in PINPOINTS]
    + [(500, 1000), (330, 1000), (480, 640), (1080, 1920), (3024, 4032)]
    + NOISE
)


def random_sizes(count: int = 300, seed: int = 0) -> list[tuple[int, int]]:
    """Seeded sizes, log-uniform from 1 to 5000 per side (covers every aspect regime)."""
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(0, np.log(5000), size=(count, 2))).astype(np.int64) + 1
    return [(int(h), int(w)) for h, w in sides]


ALL_SIZES = SIZES + random_sizes()


def hf_select(size):
    from transformers.models.llava_next.modeling_llava_next import select_best_resolution as hf

    return tuple(hf(list(size), PINPOINTS))


def hf_grid(size):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return tuple(get_anyres_image_grid_shape(tuple(size), PINPOINTS, TILE))


def hf_unpad(current, size):
    """HF ``unpad_image`` on a (1, H, W) grid of distinct values: the kept values, row-major."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    grid = torch.arange(current[0] * current[1]).view(1, *current)
    return unpad_image(grid, list(size))[0].numpy()


def hf_packed_rows(size, newline: bool = True) -> int:
    """Rows out of HF ``LlavaNextModel.pack_image_features`` for one image (feature dim 1)."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=TILE, patch_size=PATCH), image_grid_pinpoints=PINPOINTS
    )
    gh, gw = hf_grid(size)
    features = torch.zeros(1 + gh * gw, (TILE // PATCH) ** 2, 1)
    packed, lens = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config),
        [features],
        torch.tensor([size]),
        "default",
        image_newline=torch.ones(1) if newline else None,
    )
    assert int(lens[0]) == packed[0].shape[0]
    return int(lens[0])


def ours_unpad(current, size) -> np.ndarray:
    cut = unpad_shape(current, size)
    return np.arange(current[0] * current[1]).reshape(current)[cut.rows, cut.cols]


def assert_select_matches(sizes) -> None:
    for size in sizes:
        assert select_best_resolution(size, PINPOINTS) == hf_select(size), size


def assert_unpad_matches(sizes) -> None:
    for size in sizes:
        gh, gw = hf_grid(size)
        current = (gh * (TILE // PATCH), gw * (TILE // PATCH))
        np.testing.assert_array_equal(ours_unpad(current, size), hf_unpad(current, size), err_msg=str(size))


def test_hand_computed_cases() -> None:
    assert select_best_resolution((500, 1000), PINPOINTS) == (336, 672)
    assert select_best_resolution((10, 10), PINPOINTS) == (336, 672)  # tie: first pinpoint wins
    assert select_best_resolution((1000, 1000), PINPOINTS) == (672, 672)
    assert anyres_grid_shape((500, 1000), PINPOINTS, TILE) == (1, 2)
    assert unpad_shape((24, 48), (330, 1000)) == Unpad(top=4, left=0, height=16, width=48)
    layout = anyres_layout((500, 1000), PINPOINTS, TILE, PATCH)
    assert (layout.base_rows, layout.grid_rows, layout.newline_rows) == (576, 24 * 48, 24)
    assert num_feature_rows((500, 1000), PINPOINTS, TILE, PATCH) == 1752


def test_select_best_resolution_matches_hf() -> None:
    assert_select_matches(ALL_SIZES)


def test_grid_shape_matches_hf() -> None:
    for size in ALL_SIZES:
        assert anyres_grid_shape(size, PINPOINTS, TILE) == hf_grid(size), size


def test_unpad_matches_hf() -> None:
    assert_unpad_matches(ALL_SIZES)


@pytest.mark.parametrize("newline", [True, False])
def test_feature_rows_match_hf_pack_image_features(newline: bool) -> None:
    for size in SIZES + random_sizes(60, seed=1):
        assert num_feature_rows(size, PINPOINTS, TILE, PATCH, newline) == hf_packed_rows(size, newline), size


def test_feature_rows_match_hf_processor_placeholders() -> None:
    """The processor's placeholder count (CLS dropped for "default") agrees with the packing."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    fake = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS),
        patch_size=PATCH,
        num_additional_image_tokens=1,
    )
    fake._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(fake, *a)
    for size in SIZES:
        expected = LlavaNextProcessor._get_number_of_features(fake, *size, TILE, TILE) - 1
        assert num_feature_rows(size, PINPOINTS, TILE, PATCH) == expected, size


def test_extreme_aspect_keeps_no_grid_rows_like_hf() -> None:
    """1x4000: every pinpoint keeps 0 effective pixels, so the first wins and no grid row stays."""
    layout = anyres_layout((1, 4000), PINPOINTS, TILE, PATCH)
    assert layout.best_resolution == hf_select((1, 4000)) == (336, 672)
    assert layout.grid_rows == 0 and layout.num_rows == 576 == hf_packed_rows((1, 4000))


def test_negative_control_tie_break_to_last_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Letting a full tie go to the later pinpoint (>=) must break parity on tiny images."""
    monkeypatch.setattr(anyres, "_better", lambda e, w, be, bw: e > be or (e == be and w <= bw))
    with pytest.raises(AssertionError):
        assert_select_matches(SIZES)


def test_negative_control_floor_in_unpad_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flooring instead of HF's round(…, 7) loses a row on float-noise sizes and must fail."""
    assert_unpad_matches(NOISE)
    monkeypatch.setattr(anyres, "_scaled_length", lambda length, scale: int(length * scale))
    with pytest.raises(AssertionError):
        assert_unpad_matches(NOISE)


@pytest.mark.parametrize(
    "call",
    [
        lambda: select_best_resolution((0, 5), PINPOINTS),
        lambda: select_best_resolution((5, 5), []),
        lambda: select_best_resolution((5, 5), [[336]]),
        lambda: select_best_resolution((True, 5), PINPOINTS),
        lambda: anyres_grid_shape((5, 5), PINPOINTS, 0),
        lambda: unpad_shape((24,), (5, 5)),
        lambda: anyres_layout((5, 5), PINPOINTS, 14, 336),
    ],
)
def test_bad_input_is_an_input_error(call) -> None:
    with pytest.raises(InputError, match="must"):
        call()
