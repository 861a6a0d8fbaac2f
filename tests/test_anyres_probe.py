"""LLaVA-NeXT probe strategies (fastv, entropyprune, dart) per tile through one probe of every packed
row (runtime.anyres.probe), and per-tile pruning against the padding-aware PyTorch reference
(export.reference.anyres) on several image sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.reference.anyres import deep_entropies, equal_budgets, packed_ids, perplexity_budgets, reference_anyres
from export.reference.pruning import EntropyOptions, vision_outputs
from runtime.anyres.pack import pack_all, packed_layout
from runtime.anyres.pipeline import AnyresPipeline
from runtime.anyres.probe import SharedProbe, probe_context, probe_rows
from runtime.errors import BundleError
from runtime.llm.probe_scores import fastv_scores
from runtime.types import ProbeOutput
from tests.strategy_fakes import make_probe

ROWS_ATOL = 1e-4  # ONNX tower + projector vs PyTorch float32 (the 1.5 bound)
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-hf v1.6
P = 2  # the probe's pruning layer (the registry's default)
PREFIX, SUFFIX = [1, 5, 6, 7], [8, 9, 10, 11, 12, 13]  # prompt ids around the image (any in-vocab ids)
SIZES = {"tall 500x200": (500, 200), "wide 40x320": (40, 320)}  # both padded: grid patches unpadded away


class TorchProbe:
    """A ``PruneInputs.probe`` computed by the Hugging Face language model (what probe.gguf computes in
    llama.cpp): ``hidden`` = layer P−1's input_layernorm of hidden_states[P−1], ``final_hidden`` =
    the final norm of hidden_states[P]."""

    def __init__(self, model) -> None:
        self.lm = model.model.language_model
        self.layer = self.lm.layers[P - 1].self_attn
        self.config = model.config.text_config

    @torch.no_grad()
    def __call__(self, rows: np.ndarray, final: bool = False) -> ProbeOutput:
        embed = self.lm.embed_tokens
        embeds = torch.cat([embed(torch.tensor([PREFIX])), torch.from_numpy(rows)[None],
                            embed(torch.tensor([SUFFIX]))], 1)
        out = self.lm(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
        hidden = self.lm.layers[P - 1].input_layernorm(out.hidden_states[P - 1])[0].numpy()
        theta = (getattr(self.config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return ProbeOutput(hidden, len(PREFIX), rows.shape[0], self.layer.q_proj.weight.numpy(),
                           self.layer.k_proj.weight.numpy(), self.config.num_attention_heads,
                           self.config.num_key_value_heads, float(theta), P - 1,
                           self.lm.norm(out.hidden_states[P])[0].numpy() if final else None)


@pytest.fixture(scope="module")
def pipeline(tiny_next_bundle: Path) -> AnyresPipeline:
    return AnyresPipeline(tiny_next_bundle)


@pytest.fixture(scope="module")
def encoded(pipeline: AnyresPipeline, photos) -> dict:
    """Each size's tiles through the ONNX encoder once."""
    photo = photos["chelsea"]
    return {name: pipeline.encode(photo.resize((w, h), Image.Resampling.BICUBIC)) for name, (h, w) in SIZES.items()}


def _check_against_reference(result, ref, name: str) -> None:
    """Per tile k_t, kept patches and member counts exactly; the rows fed in the same order within ROWS_ATOL."""
    assert [t.kept for t in result.tiles] == list(ref.budgets), name
    for tile, expected in zip(result.tiles, ref.tiles, strict=True):
        kept = result.order.source_patch[result.order.source_tile == tile.tile]
        np.testing.assert_array_equal(kept, expected.kept.numpy(), err_msg=f"{name} tile {tile.tile}")
        assert list(tile.counts) == expected.counts.tolist(), f"{name} tile {tile.tile}"
    source = np.stack([result.order.source_tile, result.order.source_patch], axis=1)
    np.testing.assert_array_equal(source, ref.source.numpy(), err_msg=name)
    np.testing.assert_allclose(result.embeddings, ref.rows.numpy(), rtol=0, atol=ROWS_ATOL, err_msg=name)


# --- pure parts ----------------------------------------------------------------------------------
def test_probe_rows_are_the_unpruned_pack_and_map_back() -> None:
    layout = packed_layout((500, 1000), PINPOINTS)
    projected = np.random.default_rng(0).standard_normal((3, 576, 8)).astype(np.float32)
    newline = np.full(8, 7.0, np.float32)
    rows = probe_rows(projected, newline, layout)
    np.testing.assert_array_equal(rows.rows, pack_all(projected[0], projected[1:], newline, layout))
    assert rows.row_of[0, 5] == 5 and rows.row_of[2, 0] == 576 + 24  # tile 2 starts mid packed row 0
    fed = rows.row_of >= 0
    np.testing.assert_array_equal(rows.rows[rows.row_of[fed]], projected[fed])
    assert not np.isin(np.flatnonzero((rows.rows == 7.0).all(axis=1)), rows.row_of).any()  # newlines: no patch
    padded = packed_layout((40, 320), PINPOINTS)  # grid patches removed by unpadding have no row
    assert (probe_rows(np.zeros((padded.num_tiles, 576, 8), np.float32), newline, padded).row_of[1] < 0).any()


def test_tiles_read_one_cached_run() -> None:
    layout = packed_layout((500, 1000), PINPOINTS)
    projected = np.random.default_rng(1).standard_normal((3, 576, 16)).astype(np.float32)
    fake = make_probe(16)
    shared = SharedProbe(fake, probe_rows(projected, np.ones(16, np.float32), layout))
    full = fastv_scores(shared.run())
    for t in range(3):
        cand = layout.candidates(t)
        out = shared.for_tile(t, cand)(projected[t, cand])
        np.testing.assert_allclose(fastv_scores(out), full[shared.rows.row_of[t, cand]], rtol=0, atol=1e-12)
    assert shared.runs == 1
    assert shared.for_tile(1, layout.candidates(1))(projected[1], final=True).final_hidden is not None
    assert shared.runs == 2  # the final-norm probe once more, then cached
    # negative control: a tile probed on its own rows sees other scores (a shorter softmax, other context)
    alone = SharedProbe(fake, shared.rows, scope="tile").for_tile(1, layout.candidates(1))(projected[1])
    assert not np.allclose(fastv_scores(alone), full[shared.rows.row_of[1]], rtol=0, atol=1e-6)


def test_probe_context_fits_the_largest_pack() -> None:
    assert probe_context(PINPOINTS, 336, 14) == 576 + 48 * 49 + 2048


def test_reference_pack_order_equals_runtime_layout(tiny_next_model) -> None:
    """HF's pack_image_features on identity features names the same (tile, patch) per row as the runtime."""
    for size in [(40, 320), (500, 200), (4000, 1)]:
        layout = packed_layout(size, PINPOINTS)
        ids = packed_ids(tiny_next_model, layout.num_tiles, size).numpy()
        assert ids.shape[0] == layout.total_rows, size
        grid = ids[576:][ids[576:, 0] >= 0]
        np.testing.assert_array_equal(grid, np.stack([layout.tile.ravel(), layout.patch.ravel()], 1))


# --- against the PyTorch reference ---------------------------------------------------------------
@pytest.mark.parametrize(("strategy", "name"), [("fastv", "tall 500x200"), ("fastv", "wide 40x320"),
                                              ("entropyprune", "wide 40x320"), ("dart", "wide 40x320")])
def test_probe_strategies_equal_the_reference(pipeline, tiny_next_model, encoded, name: str, strategy: str) -> None:
    enc = encoded[name]
    question = "What is it?" if strategy == "dart" else None
    result = pipeline.prune_encoded(enc, 150, strategy, question=question, probe=TorchProbe(tiny_next_model))
    ref = reference_anyres(tiny_next_model, torch.from_numpy(enc.pixels.pixel_values), enc.pixels.image_size,
                           strategy, 150, prompt=(PREFIX, SUFFIX), P=P)
    _check_against_reference(result, ref, f"{strategy} {name}")
    assert all(t.report["probe_layer"] == P - 1 and t.report["probe_rows"] == result.total_rows
               for t in result.tiles if t.kept)
    assert result.timings_ms["probe"] > 0


@pytest.mark.parametrize("name", ["tall 500x200", "wide 40x320"])  # exact sizes: test_anyres_pipeline
def test_merge_strategy_equals_the_padding_aware_reference(pipeline, tiny_next_model, encoded, name: str) -> None:
    """``entropy`` (per-tile layers, mean merge inside a tile) on images whose grid tiles hold padding."""
    enc = encoded[name]
    result = pipeline.prune_encoded(enc, 120, "entropy")
    pixels = torch.from_numpy(enc.pixels.pixel_values)
    vision = vision_outputs(tiny_next_model, pixels)  # the tiles' tower outputs, shared by both reference runs
    ref = reference_anyres(tiny_next_model, pixels, enc.pixels.image_size, "entropy", 120, vision=vision)
    _check_against_reference(result, ref, name)
    for tile, expected in zip(result.tiles, ref.tiles, strict=True):
        if tile.kept:
            assert tile.report["layers"] == {"shallow": expected.layers["l_s"], "deep": expected.layers["l_d"]}
    # negative control: padding patches left as candidates keep another set
    wrong = reference_anyres(tiny_next_model, pixels, enc.pixels.image_size, "entropy", 120, unpad=False, vision=vision)
    assert any(not np.array_equal(w.kept.numpy(), r.kept.numpy()) for w, r in zip(wrong.tiles, ref.tiles, strict=True))


def test_vision_strategies_equal_the_padding_aware_reference(pipeline, tiny_next_model, encoded) -> None:
    """The other vision strategies (visionzip merges into contextual tokens) on a padded image."""
    enc = encoded["wide 40x320"]
    pixels = torch.from_numpy(enc.pixels.pixel_values)
    vision = vision_outputs(tiny_next_model, pixels)
    for strategy in ("fastervlm", "visionzip", "divprune", "uniform"):
        result = pipeline.prune_encoded(enc, 100, strategy)
        ref = reference_anyres(tiny_next_model, pixels, enc.pixels.image_size, strategy, 100, vision=vision)
        _check_against_reference(result, ref, strategy)


@pytest.mark.parametrize("strategy", ["entropy", "fastervlm", "fastv"])
def test_perplexity_budget_equals_the_reference(pipeline, tiny_next_model, encoded, strategy: str) -> None:
    """``tile_budget="perplexity"`` on an image whose grid tiles hold padding: each tile's k_t, kept
    patches and rows equal the reference (weights exp H_t(l_d) over the tile's candidates, exact quotas)."""
    enc = encoded["tall 500x200"]
    pixels = torch.from_numpy(enc.pixels.pixel_values)
    probe = TorchProbe(tiny_next_model) if strategy == "fastv" else None
    result = pipeline.prune_encoded(enc, 150, strategy, probe=probe, tile_budget="perplexity")
    ref = reference_anyres(tiny_next_model, pixels, enc.pixels.image_size, strategy, 150, prompt=(PREFIX, SUFFIX),
                           P=P, tile_budget="perplexity")
    assert [t.kept for t in result.tiles] == list(ref.budgets), strategy
    caps = [int(t.candidates.shape[0]) for t in ref.tiles]
    assert list(ref.budgets) != equal_budgets(150, caps)  # the tiles' entropies differ: not the equal split
    _check_against_reference(result, ref, f"perplexity {strategy}")
    # negative control: weights from each tile's entropy over all its patches (padding included)
    everything = [torch.arange(576)] * len(caps)
    wrong = perplexity_budgets(150, caps, deep_entropies(vision_outputs(tiny_next_model, pixels), everything,
                                                         EntropyOptions()))
    assert wrong != list(ref.budgets)


def test_probe_of_one_tiles_rows_is_another_answer(pipeline, tiny_next_model, encoded) -> None:
    """Negative control through the product: each tile probed on its own rows keeps another set."""
    enc = encoded["tall 500x200"]
    ref = reference_anyres(tiny_next_model, torch.from_numpy(enc.pixels.pixel_values), enc.pixels.image_size,
                           "fastv", 150, prompt=(PREFIX, SUFFIX), P=P)
    wrong = pipeline.prune_encoded(enc, 150, "fastv", probe=TorchProbe(tiny_next_model), probe_scope="tile")
    kept = [wrong.order.source_patch[wrong.order.source_tile == t] for t in range(len(ref.tiles))]
    assert any(not np.array_equal(k, r.kept.numpy()) for k, r in zip(kept, ref.tiles, strict=True))
    assert wrong.tiles[0].report["probe_rows"] == wrong.tiles[0].candidates


def test_probe_strategy_without_probe_is_one_line(pipeline, encoded) -> None:
    with pytest.raises(BundleError, match="needs the language-model probe: run python -m export.llm"):
        pipeline.prune_encoded(encoded["wide 40x320"], 64, "fastv")


# --- llama.cpp -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def next_llm_bundle(tiny_next_llm_bundle: Path) -> Path:
    return tiny_next_llm_bundle


@pytest.mark.llm
@pytest.mark.parametrize("strategy", ["fastv", "entropyprune", "dart"])
def test_prune_cli_runs_probe_strategies_on_next(next_llm_bundle: Path, photos, tmp_path: Path, capsys,
                                                 strategy: str) -> None:
    """``runtime.prune --json`` probes every packed row once (2,928 for a square photo's 2 x 2 grid,
    beyond the tiny model's 2,048 training context) and reports each tile's layer, k_t and rows."""
    from runtime.prune import main

    path = tmp_path / "photo.png"
    photos["chelsea"].resize((600, 600)).save(path)
    argv = [str(path), "--model", str(next_llm_bundle), "--tokens", "200", "--strategy", strategy, "--json",
            "--question", "What is in the image?"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 200 and sum(t["kept"] for t in out["tiles"]) == 200
    assert out["rows"] == 200 + out["newline_rows"] and out["total_rows"] == 576 + 48 * 49
    for tile in out["tiles"]:
        assert tile["probe_layer"] == P - 1 and tile["probe_rows"] == out["total_rows"]
    assert out["timings_ms"]["probe"] > 0


@pytest.mark.llm
def test_llama_probe_picks_the_reference_rows(next_llm_bundle: Path, tiny_next_model, encoded) -> None:
    """On device (f32 probe of every packed row) each tile keeps the reference's fastv / entropyprune rows."""
    from runtime.llm.probe import open_probe
    from runtime.llm.template import Conversation, conversation_segments, encode_prompt

    pipeline = AnyresPipeline(next_llm_bundle)
    enc = encoded["tall 500x200"]
    pixels = torch.from_numpy(enc.pixels.pixel_values)
    with open_probe(next_llm_bundle, pipeline.manifest.data, kv_type="f32", flash_attn="off",
                    n_ctx=pipeline.probe_context()) as probe:
        prompt = encode_prompt(conversation_segments(Conversation().ask("What is in the image?")), probe.backend)
        for strategy in ("fastv", "entropyprune"):
            result = pipeline.prune_encoded(enc, 150, strategy, probe=probe.bind(prompt.prefix, prompt.suffix))
            ref = reference_anyres(tiny_next_model, pixels, enc.pixels.image_size, strategy, 150,
                                   prompt=(prompt.prefix, prompt.suffix), P=P)
            _check_against_reference(result, ref, f"llama.cpp {strategy}")


@pytest.mark.llm
def test_chat_prunes_a_next_image_with_the_probe(next_llm_bundle: Path, photos) -> None:
    """The Assistant binds its probe for NeXT bundles too: fastv per tile over every packed row."""
    from runtime.assistant import Assistant
    from runtime.turn import Settings

    engine = Assistant.open(next_llm_bundle, Settings(temperature=0, max_tokens=2, tokens=100, strategy="fastv"),
                            n_ctx=2048)
    try:
        engine.set_image(photos["chelsea"])
        "".join(engine.respond("What is shown?"))
        pruned = engine._pruned[1]
        assert pruned.tokens == 100 and engine.last_stats.kept == 100
        assert all(t.report["probe_rows"] == pruned.total_rows for t in pruned.tiles if t.kept)
    finally:
        engine.close()
