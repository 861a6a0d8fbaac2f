"""LLaVA-NeXT end to end: tiles → ONNX → per-tile pruning → projector → packed rows with newlines →
llama.cpp (f32) against LlavaNextForConditionalGeneration fed the same rows (last-position logits)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.anyres_pipeline import AnyresPipeline
from runtime.llm_bundle import open_language_model
from runtime.template import Conversation, conversation_segments, encode_prompt
from tests.llm_parity import device_logits, hf_logits

pytestmark = pytest.mark.llm

LOGIT_ATOL = 1e-3  # llama.cpp f32 (f32 KV, no flash attention) vs PyTorch float32, as for LLaVA-1.5


@pytest.fixture(scope="module")
def setup(tiny_next_bundle: Path, tiny_next_dir: Path, tmp_path_factory) -> dict:
    from transformers import LlavaNextForConditionalGeneration

    from export.llm import main as export_llm

    bundle = tmp_path_factory.mktemp("next_e2e") / "bundle"
    shutil.copytree(tiny_next_bundle, bundle)
    assert export_llm(["--model", str(tiny_next_dir), "--out", str(bundle), "--quant", "f32"]) == 0
    pipeline = AnyresPipeline(bundle)
    llm = open_language_model(bundle, pipeline.manifest.data, kv_type="f32", flash_attn="off", n_ctx=4096)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_next_dir, dtype=torch.float32).eval()
    prompt = encode_prompt(conversation_segments(Conversation().ask("What is in the image?")), llm)
    yield {"pipeline": pipeline, "llm": llm, "model": model, "prompt": prompt}
    llm.close()


@pytest.mark.parametrize(("strategy", "tokens"), [("none", 0), ("entropy", 200), ("divprune", 120)])
def test_next_rows_logits_equal_hf(setup, photos, strategy: str, tokens: int) -> None:
    result = setup["pipeline"].prune(photos["chelsea"], tokens, strategy)
    rows = result.embeddings
    assert rows.shape[0] == result.order.num_rows and result.order.is_newline.any()
    expected = hf_logits(setup["model"], setup["prompt"], rows)
    got = device_logits(setup["llm"], setup["prompt"], rows)
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL, err_msg=strategy)
    # negative control: the same rows without their newline rows are another prompt
    image_rows = rows[~result.order.is_newline]
    assert np.abs(device_logits(setup["llm"], setup["prompt"], image_rows) - expected).max() > 10 * LOGIT_ATOL
