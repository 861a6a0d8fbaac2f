"""LLaVA-NeXT packing (§5) and positions (§6): hand cases, HF parity, loop reference, properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.anyres import pack as anyres_pack
from runtime.anyres.geometry import Unpad, anyres_layout
from runtime.anyres.pack import (
    gather_rows,
    image_positions,
    pack_all,
    pack_kept,
    packed_layout,
)
from runtime.errors import InputError

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-hf v1.6, (h, w)
CROP, PATCH = 336, 14
EMBED = 16  # LLM hidden size of the tiny HF model (E)
PINPOINT_SIZES = [tuple(p) for p in PINPOINTS] + [(500, 1000), (1000, 500), (1000, 1000), (1000, 300), (300, 1000)]
EXTREME = [(40, 320), (320, 40), (1, 4000), (4000, 1)]
ODD = [(5, 7), (333, 517), (517, 333), (1001, 999), (7, 1234), (2992, 1408), (1384, 2941)]
SIZES = PINPOINT_SIZES + EXTREME + ODD
sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@pytest.fixture(scope="module")
def hf_model():
    """A tiny random ``LlavaNextModel`` with the llava-hf v1.6 pinpoints (CLIP 336/14, E = 16)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextModel

    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=CROP, patch_size=PATCH, hidden_size=8, intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2)
    text = LlamaConfig(vocab_size=64, hidden_size=EMBED, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=63)
    return LlavaNextModel(config).eval()


def hf_pack(model, size, features: np.ndarray, newline: bool = True) -> np.ndarray:
    """HF ``LlavaNextModel.pack_image_features([features [T, N, E]], image_sizes, "default",
    image_newline)`` for one image -> [rows, E]."""
    import torch

    with torch.no_grad():
        newline_vector = model.image_newline.detach() if newline else None
        packed, lens = model.pack_image_features(
            [torch.from_numpy(features)], torch.tensor([size]), "default", image_newline=newline_vector
        )
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0].numpy()


def random_features(layout, seed: int = 0) -> np.ndarray:
    """[T, N, E] float32 projected features, distinct per row."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((layout.num_tiles, layout.patches_per_tile, EMBED)).astype(np.float32)


def all_kept(layout):
    return layout.candidates(0), [layout.candidates(t) for t in range(1, layout.num_tiles)]


def random_kept(layout, rng: np.random.Generator, fraction: float):
    kept = [c[rng.random(c.size) < fraction] for c in (layout.candidates(t) for t in range(layout.num_tiles))]
    return kept[0], kept[1:]


def loop_order(size, kept_base, kept_tiles, newline: str, every_row: bool = False, crop=CROP, patch=PATCH,
               pinpoints=PINPOINTS):
    """Slow reference: walk the padded patch grid cell by cell -> [(tile, patch, original position)]."""
    geometry = anyres_layout(size, pinpoints, crop, patch)
    g, gw, cut = geometry.patches_per_side, geometry.grid_shape[1], geometry.unpad
    kept = [set(kept_base.tolist())] + [set(k.tolist()) for k in kept_tiles]
    rows = [(0, p, p) for p in range(g * g) if p in kept[0]]
    position = g * g
    for y in range(cut.top, cut.top + cut.height):
        any_kept = False
        for x in range(cut.left, cut.left + cut.width):
            t, p = 1 + (y // g) * gw + x // g, (y % g) * g + x % g
            if p in kept[t]:
                rows.append((t, p, position))
                any_kept = True
            position += 1
        if newline == "rows" and (any_kept or every_row):
            rows.append((-1, -1, position))
        position += 1
    return rows


def as_rows(order):
    columns = (order.source_tile, order.source_patch, order.original_position)
    return list(zip(*(c.tolist() for c in columns), strict=True))


# ---------------------------------------------------------------- hand-computed tiny case
def test_hand_computed_tiny_case() -> None:
    """crop 4, patch 1 (g = 4, N = 16), pinpoint 4x8 (grid 1 x 2), image 2x8: rows 1..2 survive."""
    layout = packed_layout((2, 8), [[4, 8]], crop=4, patch=1)
    assert layout.geometry.unpad == Unpad(top=1, left=0, height=2, width=8)
    np.testing.assert_array_equal(layout.tile, [[1, 1, 1, 1, 2, 2, 2, 2]] * 2)
    np.testing.assert_array_equal(layout.patch, [[4, 5, 6, 7, 4, 5, 6, 7], [8, 9, 10, 11, 8, 9, 10, 11]])
    assert (layout.num_tiles, layout.patches_per_tile, layout.total_rows) == (3, 16, 16 + 2 * 9)
    np.testing.assert_array_equal(layout.candidates(0), np.arange(16))
    np.testing.assert_array_equal(layout.candidates(2), np.arange(4, 12))
    assert layout.candidates(1).dtype == np.int64

    base = np.arange(16, dtype=np.float32)[:, None]
    tiles = np.stack([100 * t + np.arange(16, dtype=np.float32) for t in (1, 2)])[:, :, None]
    packed = pack_all(base, tiles, np.array([-1.0], np.float32), layout)[:, 0]
    expected = list(range(16)) + [104, 105, 106, 107, 204, 205, 206, 207, -1,
                                  108, 109, 110, 111, 208, 209, 210, 211, -1]
    np.testing.assert_array_equal(packed, expected)

    order = pack_kept(np.array([15, 0]), [np.array([9]), np.array([5])], layout)
    assert as_rows(order) == [(0, 0, 0), (0, 15, 15), (2, 5, 21), (-1, -1, 24), (1, 9, 26), (-1, -1, 33)]
    assert (order.num_rows, order.num_tokens) == (6, 4)
    np.testing.assert_array_equal(order.is_newline, [False, False, False, True, False, True])
    np.testing.assert_array_equal(gather_rows(base, tiles, np.array([-1.0]), order, layout)[:, 0],
                                  [0, 15, 205, -1, 109, -1])
    assert as_rows(pack_kept(np.array([15, 0]), [np.array([9]), np.array([5])], layout, "none")) == [
        (0, 0, 0), (0, 15, 15), (2, 5, 21), (1, 9, 26)]

    original = image_positions(3, order, layout.total_rows, "original")
    np.testing.assert_array_equal(original.image, [3, 18, 24, 27, 29, 36])
    assert original.text_start == 37 and original.image.dtype == np.int64
    packed_pos = image_positions(3, order, layout.total_rows, "packed")
    np.testing.assert_array_equal(packed_pos.image, [3, 4, 5, 6, 7, 8])
    assert packed_pos.text_start == 9


def test_docstring_example() -> None:
    layout = packed_layout((500, 1000), PINPOINTS)
    assert layout.grid_shape == (24, 48) and layout.total_rows == 576 + 24 * 49
    order = pack_kept(np.array([3]), [np.array([0]), np.array([0])], layout)
    assert as_rows(order) == [(0, 3, 3), (1, 0, 576), (2, 0, 600), (-1, -1, 624)]


# ---------------------------------------------------------------- parity with Hugging Face
def test_sizes_cover_every_pinpoint() -> None:
    chosen = {packed_layout(size, PINPOINTS).geometry.best_resolution for size in SIZES}
    assert chosen == {tuple(p) for p in PINPOINTS}


@pytest.mark.parametrize("newline", [True, False])
def test_pack_all_equals_hf_pack_image_features(hf_model, newline: bool) -> None:
    vector = hf_model.image_newline.detach().numpy() if newline else None
    for seed, size in enumerate(SIZES):
        layout = packed_layout(size, PINPOINTS)
        features = random_features(layout, seed)
        expected = hf_pack(hf_model, size, features, newline)
        actual = pack_all(features[0], features[1:], vector, layout)
        assert actual.shape == expected.shape and actual.dtype == np.float32, size
        np.testing.assert_array_equal(actual, expected, err_msg=str(size))  # a gather copies values exactly
        if newline:
            assert expected.shape[0] == layout.total_rows, size


def test_pruned_rows_are_hf_rows_at_original_positions(hf_model) -> None:
    """Each fed row (image or newline) equals HF's full pack at its original position."""
    rng = np.random.default_rng(1)
    vector = hf_model.image_newline.detach().numpy()
    for seed, size in enumerate(SIZES):
        layout = packed_layout(size, PINPOINTS)
        features = random_features(layout, seed)
        expected = hf_pack(hf_model, size, features)
        for fraction in (0.0, 0.1, 0.7, 1.0):
            order = pack_kept(*random_kept(layout, rng, fraction), layout)
            actual = gather_rows(features[0], features[1:], vector, order, layout)
            np.testing.assert_array_equal(actual, expected[order.original_position], err_msg=f"{size} {fraction}")


def test_all_kept_reproduces_hf_except_width_zero_newlines(hf_model) -> None:
    """Keeping every candidate with newline="rows" feeds HF's rows; a width-0 grid (4000x1) lacks
    only HF's newline-only rows (600 vs 576), as documented."""
    vector = hf_model.image_newline.detach().numpy()
    for seed, size in enumerate(SIZES):
        layout = packed_layout(size, PINPOINTS)
        features = random_features(layout, seed)
        expected = hf_pack(hf_model, size, features)
        actual = gather_rows(features[0], features[1:], vector, pack_kept(*all_kept(layout), layout), layout)
        rows, cols = layout.grid_shape
        if cols == 0:
            assert expected.shape[0] == actual.shape[0] + rows, size
            expected = expected[: layout.patches_per_tile]
        np.testing.assert_array_equal(actual, expected, err_msg=str(size))
    assert packed_layout((4000, 1), PINPOINTS).total_rows == 600


def test_negative_control_plausible_wrong_layouts_break_hf_parity(hf_model) -> None:
    """Transposed patches inside a tile, or column-major tiles (2x2 grid), must not equal HF."""
    layout = packed_layout((1000, 1000), PINPOINTS)
    assert layout.geometry.grid_shape == (2, 2)
    features = random_features(layout)
    expected = hf_pack(hf_model, (1000, 1000), features)
    vector = hf_model.image_newline.detach().numpy()
    g = layout.geometry.patches_per_side
    transposed = (layout.patch % g) * g + layout.patch // g
    column_major = 1 + ((layout.tile - 1) % 2) * 2 + (layout.tile - 1) // 2
    for tile, patch in ((layout.tile, transposed), (column_major, layout.patch)):
        wrong = anyres_pack.PackedLayout(layout.geometry, tile, patch, layout.position)
        actual = pack_all(features[0], features[1:], vector, wrong)
        assert actual.shape == expected.shape
        assert not np.array_equal(actual, expected)


# ---------------------------------------------------------------- loop reference and controls
def test_pack_kept_equals_loop_reference() -> None:
    rng = np.random.default_rng(2)
    for size in SIZES:
        layout = packed_layout(size, PINPOINTS)
        for fraction in (0.0, 0.05, 0.5, 1.0):
            kept_base, kept_tiles = random_kept(layout, rng, fraction)
            for newline in ("rows", "none"):
                order = pack_kept(kept_base, kept_tiles, layout, newline)
                assert as_rows(order) == loop_order(size, kept_base, kept_tiles, newline), (size, fraction)


def test_negative_control_newline_after_every_row_differs() -> None:
    """A newline after every packed row, kept or not, must differ once some row keeps nothing."""
    layout = packed_layout((500, 1000), PINPOINTS)
    kept_tiles = [np.array([0, 1]), np.array([], np.int64)]  # only packed row 0 keeps tokens
    order = pack_kept(np.array([0]), kept_tiles, layout)
    assert as_rows(order) == loop_order((500, 1000), np.array([0]), kept_tiles, "rows")
    wrong = loop_order((500, 1000), np.array([0]), kept_tiles, "rows", every_row=True)
    assert as_rows(order) != wrong and len(wrong) - order.num_rows == 23


def test_negative_control_padding_left_as_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A patch in the padded area is refused; a layout that skips unpadding accepts it."""
    size = (600, 1000)  # 48 x 48 padded grid (2 x 2 tiles), rows 10..37 kept
    layout = packed_layout(size, PINPOINTS)
    assert layout.geometry.unpad.rows == slice(10, 38)
    padded = np.array([0])  # tile 1, patch row 0: padding
    assert 0 not in layout.candidates(1)
    with pytest.raises(InputError, match="unpadding removes"):
        pack_kept(NONE, [padded, NONE, NONE, NONE], layout)

    real = anyres_pack.anyres_layout

    def no_unpad(*args, **kwargs):
        geometry = real(*args, **kwargs)
        g, (gh, gw) = geometry.patches_per_side, geometry.grid_shape
        return type(geometry)(geometry.best_resolution, geometry.grid_shape, g, Unpad(0, 0, gh * g, gw * g), True)

    monkeypatch.setattr(anyres_pack, "anyres_layout", no_unpad)
    wrong = packed_layout(size, PINPOINTS)
    assert pack_kept(NONE, [padded, NONE, NONE, NONE], wrong).num_tokens == 1
    assert wrong.total_rows != layout.total_rows


# ---------------------------------------------------------------- positions
def test_positions_negative_control_packed_differs_from_original_when_pruned() -> None:
    layout = packed_layout((500, 1000), PINPOINTS)
    full = pack_kept(*all_kept(layout), layout)
    same = [image_positions(7, full, layout.total_rows, mode) for mode in ("packed", "original")]
    np.testing.assert_array_equal(same[0].image, same[1].image)
    assert same[0].text_start == same[1].text_start == 7 + layout.total_rows
    kept_base, kept_tiles = all_kept(layout)
    order = pack_kept(kept_base[1:], kept_tiles, layout)  # prune only base patch 0
    packed, original = (image_positions(7, order, layout.total_rows, m) for m in ("packed", "original"))
    assert not np.array_equal(packed.image, original.image)
    assert packed.text_start == 7 + layout.total_rows - 1 and original.text_start == 7 + layout.total_rows


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from([0.0, 0.02, 0.3, 0.9, 1.0]), st.sampled_from(["rows", "none"]),
       st.integers(0, 2**31 - 1), st.integers(0, 4096))
def test_properties_of_pack_kept_and_positions(size, fraction, newline, seed, prefix) -> None:
    layout = packed_layout(size, PINPOINTS)
    kept_base, kept_tiles = random_kept(layout, np.random.default_rng(seed), fraction)
    order = pack_kept(kept_base, kept_tiles, layout, newline)
    kept = kept_base.size + sum(k.size for k in kept_tiles)
    grid_rows_kept = len({(int(p) - layout.patches_per_tile) // (layout.grid_shape[1] + 1)
                          for p in order.original_position[order.source_tile > 0]})
    assert order.num_tokens == kept
    assert order.num_rows == kept + (grid_rows_kept if newline == "rows" else 0)
    pos = order.original_position
    assert np.all(np.diff(pos) > 0) and (pos.size == 0 or (pos[0] >= 0 and pos[-1] < layout.total_rows))
    image = ~order.is_newline
    np.testing.assert_array_equal(layout.position[order.source_tile[image], order.source_patch[image]], pos[image])

    original = image_positions(prefix, order, layout.total_rows, "original")
    packed = image_positions(prefix, order, layout.total_rows, "packed")
    assert np.all(np.diff(original.image) > 0) and original.text_start == prefix + layout.total_rows
    np.testing.assert_array_equal(packed.image, prefix + np.arange(order.num_rows))
    assert packed.text_start == prefix + order.num_rows
    assert original.image.dtype == packed.image.dtype == np.int64
    if order.num_rows < layout.total_rows:  # negative control: packed is not original
        assert packed.text_start != original.text_start


@settings(max_examples=60, deadline=None)
@given(sizes)
def test_all_candidates_kept_gives_pack_all_rows(size) -> None:
    layout = packed_layout(size, PINPOINTS)
    rows, cols = layout.grid_shape
    order = pack_kept(*all_kept(layout), layout)
    assert order.num_rows == layout.total_rows - (rows if cols == 0 else 0)
    assert sum(layout.candidates(t).size for t in range(1, layout.num_tiles)) == rows * cols
    base = np.zeros((layout.patches_per_tile, 2), np.float32)
    tiles = np.zeros((layout.num_tiles - 1, layout.patches_per_tile, 2), np.float32)
    assert pack_all(base, tiles, np.ones(2, np.float32), layout).shape == (layout.total_rows, 2)


# ---------------------------------------------------------------- errors
LAYOUT = packed_layout((500, 1000), PINPOINTS)
NONE = np.array([], np.int64)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pack_kept(NONE, [NONE, NONE], LAYOUT, "every"), "newline must be one of rows, none"),
        (lambda: pack_kept(NONE, [NONE], LAYOUT), "kept_tiles must hold 2"),
        (lambda: pack_kept(np.array([576]), [NONE, NONE], LAYOUT), r"kept_base must hold patch indices in 0\.\.575"),
        (lambda: pack_kept(NONE, [NONE, np.array([-1])], LAYOUT), r"kept_tiles\[1\] must hold"),
        (lambda: pack_kept(np.array([2, 2]), [NONE, NONE], LAYOUT), "must not repeat"),
        (lambda: pack_kept(np.array([1.0]), [NONE, NONE], LAYOUT), "1-D integer array"),
        (lambda: pack_kept(np.array([[1]]), [NONE, NONE], LAYOUT), "1-D integer array"),
        (lambda: LAYOUT.candidates(3), r"tile must be an integer in 0\.\.2"),
        (lambda: packed_layout((500, 1000), [[168, 336]]), "at least 336 pixels"),
        (lambda: pack_all(np.zeros((575, 4)), np.zeros((2, 576, 4)), None, LAYOUT), r"base must be \[576, E\]"),
        (lambda: pack_all(np.zeros((576, 4)), np.zeros((1, 576, 4)), None, LAYOUT), r"tiles must be \[2, 576, 4\]"),
        (lambda: pack_all(np.zeros((576, 4)), np.zeros((2, 576, 4)), np.zeros(3), LAYOUT), r"newline must be \[4\]"),
        (lambda: gather_rows(np.zeros((576, 4)), np.zeros((2, 576, 4)), None,
                             pack_kept(NONE, [np.array([0]), NONE], LAYOUT), LAYOUT), "1 newline rows"),
        (lambda: image_positions(0, pack_kept(np.array([5]), [NONE, NONE], LAYOUT), 5, "original"),
         "total_rows must exceed the last original position 5"),
        (lambda: image_positions(-1, pack_kept(NONE, [NONE, NONE], LAYOUT), 10), "prefix_len must be"),
        (lambda: image_positions(0, pack_kept(NONE, [NONE, NONE], LAYOUT), 10, "shifted"), "positions must be one of"),
    ],
)
def test_bad_input_is_a_one_line_input_error(call, match: str) -> None:
    with pytest.raises(InputError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
