"""The encoder's tile axis: ``Encoder.encode_batch`` returns :class:`EncoderTiles` ([T, ...] arrays)
whose tile t equals encoding that tile on its own; LLaVA-1.5's single view is T = 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.pipeline import Pipeline
from runtime.types import EncoderOutput, EncoderTiles
from tests.strategy_fakes import make_encoded

TOL = 1e-5  # batch vs single run of the same graph (onnxruntime may order reductions differently)


@pytest.fixture(scope="module")
def three_views(tiny_bundle: Path, photos) -> tuple[Pipeline, np.ndarray]:
    pipeline = Pipeline(tiny_bundle)
    views = [pipeline.pixel_values(photos[name]) for name in ("chelsea", "coffee", "astronaut")]
    return pipeline, np.stack(views)


def _assert_same(got: EncoderOutput, want: EncoderOutput, tol: float = TOL) -> None:
    for name in ("features", "cls_attn", "keys"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=0, atol=tol, err_msg=name)


def test_tile_t_equals_encoding_it_alone(three_views) -> None:
    pipeline, pixels = three_views
    tiles = pipeline.encoder.encode_batch(pixels)
    assert isinstance(tiles, EncoderTiles) and len(tiles) == tiles.num_tiles == 3
    n = pipeline.num_patches
    assert tiles.features.shape[:2] == (3, n) and tiles.cls_attn.shape[0] == 3 and tiles.keys.shape[:2] == (3, n)
    for t in range(3):
        _assert_same(tiles[t], pipeline.encoder.encode(pixels[t]))
    # negative control: the tile axis in another order is caught at this tolerance
    with pytest.raises(AssertionError):
        _assert_same(tiles[1], pipeline.encoder.encode(pixels[0]))


def test_single_view_is_one_tile(three_views) -> None:
    pipeline, pixels = three_views
    one = pipeline.encoder.encode(pixels[0])
    tiles = EncoderTiles.single(one)
    assert len(tiles) == 1 and list(tiles.cls_attn.shape) == [1, *one.cls_attn.shape]
    _assert_same(tiles[0], one, tol=0)
    _assert_same(tiles[-1], one, tol=0)


def test_indexing_and_shape_checks() -> None:
    encs = [make_encoded(seed=s) for s in range(4)]
    tiles = EncoderTiles(*(np.stack([getattr(e, k) for e in encs]) for k in ("features", "cls_attn", "keys")))
    assert [t.num_patches for t in tiles] == [36] * 4
    assert len(tiles[1:3]) == 2
    np.testing.assert_array_equal(tiles[1:3][1].keys, encs[2].keys)
    with pytest.raises(IndexError):
        tiles[4]
    with pytest.raises(ValueError, match="cls_attn"):
        EncoderTiles(tiles.features, tiles.cls_attn[:3], tiles.keys)
    with pytest.raises(ValueError, match="keys"):
        EncoderTiles(tiles.features, tiles.cls_attn, tiles.keys[:, :35])
