"""LLaVA-NeXT end to end: tiles → ONNX → per-tile pruning → projector → packed rows with newlines →
llama.cpp (f32) against LlavaNextForConditionalGeneration fed the same rows (last-position logits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.llm_parity import device_logits, hf_logits, next_parity_setup

pytestmark = pytest.mark.llm

LOGIT_ATOL = 1e-3  # llama.cpp f32 (f32 KV, no flash attention) vs PyTorch float32, as for LLaVA-1.5


@pytest.fixture(scope="module")
def setup(tiny_next_llm_bundle: Path, tiny_next_dir: Path) -> dict:
    with next_parity_setup(tiny_next_llm_bundle, tiny_next_dir) as parts:
        yield parts


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
