"""DART on device (llama.cpp probes, f32) against the PyTorch reference on the tiny LLaVA: the
layer-P−1 keys, the final-norm hidden states and the kept rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import runtime.dart as dart_core
from export.reference.question import dart_select, dart_states
from runtime.llm.probe import open_probe
from runtime.llm.probe_scores import probe_keys
from runtime.llm.template import Conversation, conversation_segments, encode_prompt
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.llm

STATE_ATOL = 1e-4  # llama.cpp f32 vs PyTorch float32 hidden states agree to ~1e-6 (scaled by magnitudes)
P = 2
QUESTIONS = ("What is in the image?", "How many cats are on the mat, and what colour is the sky at the top left?")


@pytest.fixture(scope="module", params=QUESTIONS)
def case(request, tiny_llm_bundle: Path, tiny_llava_model, photos) -> dict:
    pipeline = Pipeline(tiny_llm_bundle)
    encoded = pipeline.encoder.encode(pipeline.pixel_values(photos["coffee"]))
    rows = pipeline.projector(encoded.features)
    with open_probe(tiny_llm_bundle, pipeline.manifest.data, kv_type="f32", flash_attn="off") as probe:
        prompt = encode_prompt(conversation_segments(Conversation().ask(request.param)), probe.backend)
        out = probe.run(prompt.prefix, rows, prompt.suffix, final=True)
        bound = probe.bind(prompt.prefix, prompt.suffix)
        results = {k: pipeline.prune_encoded(encoded, k, "dart", bound, request.param) for k in (3, 16, 40, 100)}
    embed = tiny_llava_model.get_input_embeddings()
    with torch.no_grad():
        inputs = torch.cat([embed(torch.tensor([prompt.prefix])), torch.from_numpy(rows)[None],
                            embed(torch.tensor([prompt.suffix]))], dim=1)
    return {"out": out, "states": dart_states(tiny_llava_model, inputs, P), "results": results,
            "start": len(prompt.prefix), "n": rows.shape[0]}


def test_keys_and_hidden_equal_pytorch(case) -> None:
    out, states = case["out"], case["states"]
    keys = probe_keys(out)
    assert keys.shape == tuple(states.keys.shape) and out.final_hidden.shape == tuple(states.hidden.shape)
    np.testing.assert_allclose(keys, states.keys.numpy(), rtol=0, atol=STATE_ATOL * np.abs(keys).max())
    np.testing.assert_allclose(out.final_hidden, states.hidden.numpy(), rtol=0, atol=STATE_ATOL * 10)
    # negative control: the probe's own output (layer P−1's attn_norm input) is not H
    assert np.abs(out.hidden - states.hidden.numpy()).max() > 100 * STATE_ATOL


@pytest.mark.parametrize("budget", [3, 16, 40, 100])
def test_kept_rows_equal_pytorch(case, budget: int) -> None:
    expected = dart_select(case["states"], case["start"], case["n"], budget).numpy()
    result = case["results"][budget]
    np.testing.assert_array_equal(result.kept, expected)
    assert result.report["probe_layer"] == P - 1 and sum(result.report["quotas"]) == max(budget - 4, 0)


def test_negative_control_l2_pivots(case, monkeypatch) -> None:
    """Through the product's code: pivots by L2 norm instead of L1 pick other rows (on some budget)."""
    out = case["out"]
    keys, img = probe_keys(out), slice(case["start"], case["start"] + case["n"])
    text = slice(img.stop, keys.shape[0])
    monkeypatch.setattr(dart_core, "_key_norms", lambda k: np.sqrt((k * k).sum(axis=1)))
    wrong = {k: dart_core.dart_indices(keys[img], keys[text], out.final_hidden[img], out.final_hidden[text], k)
             for k in (16, 40, 100)}
    assert any(not np.array_equal(wrong[k], case["results"][k].kept) for k in wrong)


def test_bundle_without_final_probe_names_the_command(tiny_llm_bundle: Path, tmp_path: Path, photos) -> None:
    """A bundle exported before probe_final.gguf existed loads; dart alone says how to add it."""
    import json
    import shutil

    from runtime.bundle.manifest import load_manifest
    from runtime.errors import BundleError
    from runtime.llm.probe import probe_from_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_llm_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["llm"]["probe"]["final"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipeline = Pipeline(old)
    probe = probe_from_manifest(load_manifest(old), "What is it?")
    assert pipeline.prune(photos["coffee"], 16, "fastv", probe).tokens == 16  # the other probe strategies work
    with pytest.raises(BundleError, match=r"probe_final\.gguf.*python -m export\.llm"):
        pipeline.prune(photos["coffee"], 16, "dart", probe, "What is it?")
