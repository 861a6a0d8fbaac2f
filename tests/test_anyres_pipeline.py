"""LLaVA-NeXT through the product (anyres tiles → ONNX encoder → per-tile pruning → projector →
packed rows with newlines) against Hugging Face's LlavaNextModel and the PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import runtime.anyres.pack as anyres_pack
from export.reference.pruning import reference_prune
from runtime.anyres.pipeline import AnyresPipeline
from runtime.errors import BundleError, InputError, SettingError
from runtime.prune import main

ROWS_ATOL = 1e-4  # ONNX tower + projector vs PyTorch float32 (the 1.5 bound)
SIZES = {"exact 336x672": (336, 672), "photo": None, "wide 40x320": (40, 320), "tall 500x200": (500, 200)}


def _image(photos, name: str) -> Image.Image:
    size = SIZES[name]
    photo = photos["chelsea"]
    return photo if size is None else photo.resize((size[1], size[0]), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def pipeline(tiny_next_bundle: Path) -> AnyresPipeline:
    return AnyresPipeline(tiny_next_bundle)


@torch.no_grad()
def _hf_packed(model, pixels) -> np.ndarray:
    """HF's rows for one image: ``get_image_features`` (transformers 5 returns them packed, newlines in)."""
    out = model.model.get_image_features(pixel_values=torch.from_numpy(pixels.pixel_values)[None],
                                         image_sizes=torch.tensor([pixels.image_size]))
    return out.pooler_output[0].numpy()


@pytest.mark.parametrize("name", list(SIZES))
def test_none_equals_hf_pack_image_features(pipeline: AnyresPipeline, tiny_next_model, photos, name: str) -> None:
    image = _image(photos, name)
    result = pipeline.prune(image, strategy="none")
    expected = _hf_packed(tiny_next_model, pipeline.pixels(image))
    assert result.embeddings.shape == expected.shape and result.order.num_rows == result.total_rows
    np.testing.assert_allclose(result.embeddings, expected, rtol=0, atol=ROWS_ATOL, err_msg=name)
    # negative control: no newline rows is another sequence
    flat = pipeline.prune(image, strategy="none", newline="none")
    assert flat.embeddings.shape[0] < expected.shape[0]


@pytest.mark.parametrize("strategy", ["entropy", "fastervlm", "visionzip", "divprune"])
def test_per_tile_strategies_equal_the_reference(pipeline: AnyresPipeline, tiny_next_model, photos,
                                                 strategy: str) -> None:
    """On an image that fills its best resolution (no padding: every patch is a candidate), each
    tile's kept patches and rows equal the PyTorch reference run on that tile with its k_t."""
    image = _image(photos, "exact 336x672")
    result = pipeline.prune(image, 96, strategy)
    pixels = pipeline.pixels(image)
    assert result.tokens == 96 and [t.kept for t in result.tiles] == [32, 32, 32]
    order = result.order
    for tile in result.tiles:
        tile_pixels = torch.from_numpy(pixels.pixel_values[tile.tile])[None]
        ref = reference_prune(tiny_next_model, tile_pixels, strategy, tile.kept)
        rows = np.flatnonzero(order.source_tile == tile.tile)
        got = dict(zip(order.source_patch[rows].tolist(), rows.tolist(), strict=True))
        assert sorted(got) == sorted(ref.kept.tolist()), (strategy, tile.tile)
        for patch, embedding in zip(ref.kept.tolist(), ref.embeddings.detach().numpy(), strict=True):
            np.testing.assert_allclose(result.embeddings[got[patch]], embedding, rtol=0, atol=ROWS_ATOL)
        if strategy == "entropy":  # each tile picks its own layers
            assert tile.report["layers"] == {"shallow": ref.layers["l_s"], "deep": ref.layers["l_d"]}


def test_padding_patches_are_never_candidates(pipeline: AnyresPipeline, photos, monkeypatch) -> None:
    """An image with padding: nothing kept lies in the padded area; a layout that leaves the padding
    patches as candidates (the plausible bug) is refused when their kept patches are packed."""
    image = _image(photos, "wide 40x320")
    result = pipeline.prune(image, 200, "fastervlm")
    layout = pipeline.layout(pipeline.pixels(image))
    for tile in range(1, layout.num_tiles):
        kept = result.order.source_patch[result.order.source_tile == tile]
        assert set(kept.tolist()) <= set(layout.candidates(tile).tolist())
    monkeypatch.setattr(anyres_pack.PackedLayout, "candidates",
                        lambda self, t: np.arange(self.patches_per_tile, dtype=np.int64))
    with pytest.raises(InputError, match="candidate|unpad"):
        pipeline.prune(image, 200, "fastervlm")


def test_budgets_and_newlines(pipeline: AnyresPipeline, photos) -> None:
    image = _image(photos, "photo")
    for mode in ("equal", "perplexity"):
        result = pipeline.prune(image, 160, "entropy", tile_budget=mode)
        assert result.tokens == 160 == sum(t.kept for t in result.tiles)
        assert all(0 <= t.kept <= t.candidates for t in result.tiles)
        packed_rows = {int(p) for p in result.order.original_position[result.order.is_newline]}
        assert len(packed_rows) == int(result.order.is_newline.sum())  # one newline per row that kept a token
    with pytest.raises(SettingError, match="tokens"):
        pipeline.prune(image, 10**6, "entropy")
    with pytest.raises(SettingError, match="tile_budget"):
        pipeline.prune(image, 64, "entropy", tile_budget="busy")
    with pytest.raises(BundleError, match="needs the language-model probe"):  # with one: tests/test_anyres_probe.py
        pipeline.prune(image, 64, "fastv")


def test_prune_cli_json_reports_tiles(tiny_next_bundle: Path, photos, tmp_path: Path, capsys) -> None:
    path = tmp_path / "photo.png"
    photos["chelsea"].save(path)
    assert main([str(path), "--model", str(tiny_next_bundle), "--tokens", "128", "--tile-budget", "perplexity",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "llava-next" and out["tokens"] == 128 and sum(t["kept"] for t in out["tiles"]) == 128
    assert out["rows"] == 128 + out["newline_rows"] and "layers" in out["tiles"][0]
    assert main([str(path), "--model", str(tiny_next_bundle), "--tokens", "0"]) == 2
    assert "--tokens must be in 1.." in capsys.readouterr().err


def test_a_15_bundle_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="not LLaVA-NeXT"):
        AnyresPipeline(tiny_bundle)


@pytest.mark.llm
def test_chat_answers_about_a_next_image(tiny_next_llm_bundle: Path, tmp_path_factory, photos, capsys) -> None:
    """export.llm on the NeXT checkpoint, then runtime.chat feeds the packed rows (newlines included)
    to llama.cpp; the pruned rows are what AnyresPipeline gives."""
    from runtime.assistant import Assistant
    from runtime.chat import main as chat
    from runtime.turn import Settings

    bundle = tiny_next_llm_bundle
    photo = tmp_path_factory.mktemp("next_photo") / "chelsea.png"
    photos["chelsea"].save(photo)
    argv = ["--model", str(bundle), "--image", str(photo), "--prompt", "What is shown?", "--max-tokens", "3",
            "--temperature", "0", "--timings", "--tokens", "200", "--tile-budget", "perplexity"]
    assert chat(argv) == 0
    assert "image tokens kept: 200/" in capsys.readouterr().err
    engine = Assistant.open(bundle, Settings(temperature=0, max_tokens=3, tokens=200, newline="none"), n_ctx=1024)
    try:
        engine.set_image(photos["chelsea"])
        "".join(engine.respond("What is shown?"))
        pruned = engine._pruned[1]
        expected = AnyresPipeline(bundle).prune(photos["chelsea"], 200, "entropy", newline="none")
        np.testing.assert_array_equal(pruned.embeddings, expected.embeddings)
        assert engine.last_stats.kept == 200 and pruned.embeddings.shape[0] == 200  # newline="none": no extra rows
        with pytest.raises(SettingError, match="tile_budget"):
            engine.update(tile_budget="busy")
        assert "encode" in engine.last_stats.vision_ms and engine.last_stats.image_ms > 0  # the first turn
        engine.update(strategy="cdpruner", options={}, reprune=True)  # pruned again per question
        for question in ("Is it a cat?", "Is there a window?"):
            "".join(engine.respond(question))
            assert "prune" in engine.last_stats.vision_ms
        assert engine.notice.startswith("re-pruned")
        assert "encode" not in engine.last_stats.vision_ms and engine.last_stats.image_ms == 0  # paid once
    finally:
        engine.close()


def test_bench_anyres_prints_the_stage_table(tiny_next_bundle: Path, capsys) -> None:
    from tools.bench_anyres import main as bench

    assert bench(["--model", str(tiny_next_bundle), "--strategies", "none", "fastervlm", "--tokens", "64",
                  "--repeats", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| none | 2880 | 48 | 2928 |") and lines[2].startswith("| fastervlm | 64 |")
