"""Image → ONNX → prune → projector → llama.cpp against Hugging Face fed the same embeddings,
and the on-device EntropyPrune/FastV probe against the PyTorch path (all at f32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.reference.pruning import entropyprune_scores, fastv_scores
from runtime.llm.backend import LlamaBackend
from runtime.llm.probe import open_probe
from runtime.llm.probe_scores import fastv_scores as device_fastv_scores
from runtime.llm.probe_scores import probe_queries
from runtime.llm.template import Conversation, conversation_segments, encode_prompt
from runtime.matrix_entropy import head_entropy_scores
from runtime.pipeline import Pipeline
from runtime.selection import top_k
from tests.llm_parity import device_logits, hf_logits

pytestmark = pytest.mark.llm

LOGIT_ATOL = 1e-3  # llama.cpp f32 (f32 KV, no flash attention) vs PyTorch float32, acceptance bound
SCORE_ATOL = 1e-4  # probe hidden states agree to ~1e-6; scores are smooth in them
P = 2


@pytest.fixture(scope="module")
def setup(tiny_llm_bundle: Path, photos) -> dict:
    pipeline = Pipeline(tiny_llm_bundle)
    llm = LlamaBackend(tiny_llm_bundle / pipeline.manifest.llm.gguf, kv_type="f32", flash_attn="off")
    segments = conversation_segments(Conversation().ask("What is in the image?"))
    prompt = encode_prompt(segments, llm)
    yield {"pipeline": pipeline, "llm": llm, "prompt": prompt, "photos": photos}
    llm.close()


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_pruned_image_logits_equal_hf(setup, tiny_llava_model, name: str) -> None:
    pruned = setup["pipeline"].prune(setup["photos"][name], 64, "entropy")
    expected = hf_logits(tiny_llava_model, setup["prompt"], pruned.embeddings)
    got = device_logits(setup["llm"], setup["prompt"], pruned.embeddings)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL)
    assert int(got.argmax()) == int(expected.argmax())
    # negative control: the same embeddings in the wrong order are another prompt
    wrong = device_logits(setup["llm"], setup["prompt"], pruned.embeddings[::-1].copy())
    assert np.abs(wrong - expected).max() > 10 * LOGIT_ATOL


@pytest.fixture(scope="module")
def probe_case(setup, tiny_llm_bundle: Path, tiny_llava_model) -> dict:
    """All N image embeddings of one photo, probed on device and scored by the PyTorch path."""
    pipeline, prompt = setup["pipeline"], setup["prompt"]
    encoded = pipeline.encoder.encode(pipeline.pixel_values(setup["photos"]["coffee"]))
    rows = pipeline.projector(encoded.features)
    with open_probe(tiny_llm_bundle, pipeline.manifest.data, kv_type="f32", flash_attn="off") as probe:
        out = probe.run(prompt.prefix, rows, prompt.suffix)
    embed = tiny_llava_model.get_input_embeddings()
    with torch.no_grad():
        inputs = torch.cat([embed(torch.tensor([prompt.prefix])), torch.from_numpy(rows)[None],
                            embed(torch.tensor([prompt.suffix]))], dim=1)
    start, n = len(prompt.prefix), rows.shape[0]
    return {
        "device": head_entropy_scores(probe_queries(out)),
        "faithful": entropyprune_scores(tiny_llava_model, inputs, start, n, P=P).numpy(),
        "device_fastv": device_fastv_scores(out),
        "faithful_fastv": fastv_scores(tiny_llava_model, inputs, start, n, P=P).numpy(),
        "encoded": encoded,
    }


def test_entropyprune_probe_scores_equal_pytorch(probe_case) -> None:
    np.testing.assert_allclose(probe_case["device"], probe_case["faithful"], rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("k", [29, 64, 128])
def test_entropyprune_kept_sets_identical(probe_case, k: int) -> None:
    device, faithful = probe_case["device"], probe_case["faithful"]
    order = np.sort(faithful)[::-1]
    err = np.abs(device - faithful).max()
    assert order[k - 1] - order[k] > 2 * err, "score margin too small at the K boundary for an index comparison"
    np.testing.assert_array_equal(np.sort(top_k(device, k)), np.sort(top_k(faithful, k)))


def test_entropyprune_negative_control_wrong_layer(probe_case, setup, tiny_llava_model) -> None:
    """Scores of layer P (one too deep) are not the probe's."""
    prompt, pipeline = setup["prompt"], setup["pipeline"]
    rows = pipeline.projector(probe_case["encoded"].features)
    embed = tiny_llava_model.get_input_embeddings()
    with torch.no_grad():
        inputs = torch.cat([embed(torch.tensor([prompt.prefix])), torch.from_numpy(rows)[None],
                            embed(torch.tensor([prompt.suffix]))], dim=1)
    wrong = entropyprune_scores(tiny_llava_model, inputs, len(prompt.prefix), rows.shape[0], P=P + 1).numpy()
    assert np.abs(wrong - probe_case["device"]).max() > 100 * SCORE_ATOL


def test_fastv_probe_scores_equal_pytorch(probe_case) -> None:
    scale = probe_case["faithful_fastv"].max()
    np.testing.assert_allclose(probe_case["device_fastv"], probe_case["faithful_fastv"], rtol=0, atol=1e-4 * scale)


def test_entropyprune_strategy_through_the_pipeline(setup, tiny_llm_bundle: Path, probe_case) -> None:
    """The registered strategy keeps exactly the top-K device scores, and reports probe time apart."""
    pipeline, prompt = setup["pipeline"], setup["prompt"]
    with open_probe(tiny_llm_bundle, pipeline.manifest.data, kv_type="f32", flash_attn="off") as probe:
        result = pipeline.prune_encoded(probe_case["encoded"], 64, "entropyprune",
                                        probe.bind(prompt.prefix, prompt.suffix))
    np.testing.assert_array_equal(result.kept, np.sort(top_k(probe_case["device"], 64)))
    assert result.timings_ms["probe"] > 0 and "project_all" in result.timings_ms
    assert result.report["probe_layer"] == P - 1  # the real probe's layer, not the fake's
