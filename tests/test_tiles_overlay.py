"""tools/tiles_overlay.py: kept tokens of a LLaVA-NeXT bundle drawn on the base view and the grid tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.anyres.pack import NEWLINE_SOURCE, PackedOrder, packed_layout
from tools.entropy_plots import BORDER, DIM, group_colors
from tools.tiles_overlay import PADDING, grid_overlay, kept_per_tile

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # llava-hf v1.6
SIDE, PATCH = 24, 14


class _Pruned:
    def __init__(self, order: PackedOrder) -> None:
        self.order = order


def test_kept_per_tile_hand_case() -> None:
    order = PackedOrder(np.array([0, 0, 1, NEWLINE_SOURCE]), np.array([5, 3, 2, NEWLINE_SOURCE]),
                        np.array([False, False, False, True]), np.array([3, 5, 576, 600]))
    kept = kept_per_tile(_Pruned(order), 3)
    assert [k.tolist() for k in kept] == [[3, 5], [2], []] and all(k.dtype == np.int64 for k in kept)


def test_grid_overlay_paints_padding_and_frames_kept_patches() -> None:
    layout = packed_layout((300, 451), PINPOINTS)  # chelsea's size: grid 1×2, columns unpadded away
    assert layout.geometry.grid_shape == (1, 2)
    tiles = np.full((2, SIDE * PATCH, SIDE * PATCH, 3), 0.5, np.float32)
    right = layout.candidates(2)
    kept = (np.zeros(0, np.int64), layout.candidates(1)[-1:], right[:1])  # two different patches
    out = grid_overlay(tiles, kept, layout, (1, 2), SIDE)
    assert out.shape == (SIDE * PATCH, 2 * SIDE * PATCH, 3)
    removed = np.flatnonzero(layout.position[2] < 0)
    assert removed.size and np.flatnonzero(layout.position[1] < 0).size  # unpadding removed patches of both tiles
    r, c = divmod(int(removed[-1]), SIDE)
    centre = out[r * PATCH + PATCH // 2, SIDE * PATCH + c * PATCH + PATCH // 2]
    np.testing.assert_array_equal(centre, np.float32(PADDING))
    frame = group_colors(1)[0].astype(np.float32)
    r, c = divmod(int(right[0]), SIDE)
    np.testing.assert_allclose(out[r * PATCH + BORDER // 2, SIDE * PATCH + c * PATCH + PATCH // 2], frame, atol=1e-6)
    # negative control: tile 2's kept patch drawn on tile 1 (tiles swapped) leaves tile 2's place dimmed
    swapped = grid_overlay(tiles, (kept[0], kept[2], kept[1]), layout, (1, 2), SIDE)
    np.testing.assert_allclose(swapped[r * PATCH + BORDER // 2, SIDE * PATCH + c * PATCH + PATCH // 2],
                               [0.5 * DIM] * 3, atol=1e-6)


def test_tiles_overlay_on_the_tiny_next_bundle(tiny_next_bundle: Path, photos, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from runtime.anyres.pipeline import AnyresPipeline
    from tools.tiles_overlay import main, tiles_overlay

    photo = tmp_path / "chelsea.png"
    photos["chelsea"].save(photo)
    out = tmp_path / "figures" / "tiles.png"
    drawn = tiles_overlay(tiny_next_bundle, photo, "entropy", 160, out, "perplexity", caption="random weights")
    expected = AnyresPipeline(tiny_next_bundle).prune(Image.open(photo), 160, "entropy", "perplexity")
    assert drawn.grid == expected.grid and drawn.grid != (2, 2)  # a non-square photo: unpadding happens
    assert [k.shape[0] for k in drawn.kept] == [t.kept for t in expected.tiles]
    assert drawn.candidates == tuple(t.candidates for t in expected.tiles) and sum(drawn.candidates[1:]) < 2 * 576
    assert sum(k.shape[0] for k in drawn.kept) == expected.tokens == 160
    assert drawn.rows_fed == expected.embeddings.shape[0] > 160  # newline rows fed, not drawn
    order, loop = expected.order, [[] for _ in drawn.kept]  # a plain loop over the rows fed
    for tile, patch, newline in zip(order.source_tile, order.source_patch, order.is_newline, strict=True):
        if not newline:
            loop[tile].append(int(patch))
    assert [k.tolist() for k in drawn.kept] == [sorted(x) for x in loop]
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 600 and png.size[1] > 300
        png.verify()
    assert not list(out.parent.glob(".*.tmp"))
    assert main([str(photo), "--model", str(tiny_next_bundle), "--tokens", "0", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tokens must be in 1.." in err and len(err.splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_a_15_bundle_is_refused_in_one_line(tiny_bundle: Path, photos, tmp_path: Path, capsys) -> None:
    from tools.tiles_overlay import main

    photo = tmp_path / "p.png"
    photos["chelsea"].save(photo)
    assert main([str(photo), "--model", str(tiny_bundle), "--out", str(tmp_path / "x.png")]) == 2
    assert "not LLaVA-NeXT" in capsys.readouterr().err


def _kept_sets(result) -> list[list[int]]:
    """Each tile's kept patches, sorted, from the rows a pipeline feeds."""
    order = result.order
    return [sorted(order.source_patch[(order.source_tile == t) & ~order.is_newline].tolist())
            for t in range(len(result.tiles))]


def test_tiles_overlay_draws_a_question_aware_strategy(tiny_next_bundle: Path, photos, tmp_path: Path) -> None:
    """cdpruner prunes for --question: the drawn sets are the pipeline's for that question."""
    from PIL import Image

    from runtime.anyres.pipeline import AnyresPipeline
    from runtime.errors import SettingError
    from tools.tiles_overlay import tiles_overlay

    photo = tmp_path / "chelsea.png"
    photos["chelsea"].save(photo)
    pipeline, drawn = AnyresPipeline(tiny_next_bundle), {}
    for question in ("What colour is the cat?", "Is there a window?"):
        drawn[question] = tiles_overlay(tiny_next_bundle, photo, "cdpruner", 120, tmp_path / "q.png",
                                        question=question)
        expected = pipeline.prune(Image.open(photo), 120, "cdpruner", question=question)
        assert [k.tolist() for k in drawn[question].kept] == _kept_sets(expected)
    first, second = drawn.values()
    with pytest.raises(SettingError, match="question"):  # before the tiles are encoded
        tiles_overlay(tiny_next_bundle, photo, "cdpruner", 120, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert any(a.tolist() != b.tolist() for a, b in zip(first.kept, second.kept, strict=True))  # the question counts


@pytest.mark.llm
def test_tiles_overlay_runs_the_probe_once_over_all_rows(tiny_next_llm_bundle: Path, tiny_next_bundle: Path,
                                                         photos, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from runtime.anyres.pipeline import AnyresPipeline
    from runtime.llm.probe import DEFAULT_QUESTION, probe_from_manifest
    from tools.tiles_overlay import main, tiles_overlay

    photo = tmp_path / "chelsea.png"
    photos["chelsea"].save(photo)
    drawn = tiles_overlay(tiny_next_llm_bundle, photo, "fastv", 120, tmp_path / "f.png")
    pipeline = AnyresPipeline(tiny_next_llm_bundle)
    probe = probe_from_manifest(pipeline.manifest, DEFAULT_QUESTION, n_ctx=pipeline.probe_context())
    assert [k.tolist() for k in drawn.kept] == _kept_sets(pipeline.prune(Image.open(photo), 120, "fastv", probe=probe))
    out = tmp_path / "none.png"  # the bundle without a language model refuses fastv in one line, before encoding
    assert main([str(photo), "--model", str(tiny_next_bundle), "--strategy", "fastv", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "export.llm" in err and len(err.splitlines()) == 1 and not out.exists()
