"""LLaVA-NeXT Mistral's language model through export.llm: a tiny MistralConfig text model (GQA, RoPE base 1e6)
converts to llama.cpp's ``llama`` GGUF and its logits on a mistral-instruct prompt with image rows equal
LlavaNextForConditionalGeneration's; its prompt tokens equal the Hugging Face processor's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.llm_gguf.converter import read_hparams, write_llama_gguf
from runtime.errors import ModelNotFoundError
from runtime.llm.template import MISTRAL_INSTRUCT, Conversation, conversation_segments, encode_prompt

LOGIT_ATOL = 1e-3  # llama.cpp f32 (f32 KV, no flash attention) vs PyTorch float32, as for LLaVA-1.5 and Vicuna NeXT
TWO_TURNS = Conversation().ask("What is in the image?").answered("A cat.").ask("What colour is it?")


def test_mistral_hparams_are_read(tiny_mistral_next_dir: Path) -> None:
    hp = read_hparams(tiny_mistral_next_dir)
    assert (hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_embd) == (8, 2, 8, 64)
    assert hp.rope_theta == 1e6 and hp.n_ctx_train == 32768
    assert hp.n_vocab % 64 == 0 and hp.pad_token_id is not None and hp.pad_token_id < hp.n_vocab - 1  # padded rows


def test_local_mistral_checkpoint_gets_the_mistral_template(tiny_mistral_next_dir: Path, tiny_next_dir: Path) -> None:
    from export.load import spec_for_checkpoint
    from runtime.model_registry import load_spec

    assert spec_for_checkpoint(tiny_mistral_next_dir).chat_template == "mistral-instruct"
    assert spec_for_checkpoint(tiny_next_dir).chat_template == "llava-1.5"
    assert load_spec("llava-v1.6-mistral-7b").chat_template == "mistral-instruct"


def test_sliding_window_is_refused(tiny_mistral_next_dir: Path, tmp_path: Path) -> None:
    """Mistral-7B v0.1's 4096-position window: llama.cpp's llama architecture cannot honour it."""
    config = json.loads((tiny_mistral_next_dir / "config.json").read_text(encoding="utf-8"))
    config["text_config"]["sliding_window"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelNotFoundError, match="sliding-window attention"):
        read_hparams(tmp_path)


@pytest.fixture(scope="module")
def mistral(tiny_mistral_next_dir: Path, tiny_next_bundle: Path, tmp_path_factory) -> dict[str, Any]:
    """``python -m export.llm --quant f32`` of the Mistral checkpoint, HF's model and processor, and HF's packed
    rows of a photo. The bundle is a copy of the tiny Vicuna NeXT's (export.llm needs export.clip's manifest;
    the projector width is the same 64): only its language model is used here, and the rows fed to both
    sides come from the Mistral checkpoint's own vision tower in Hugging Face."""
    import torch
    from PIL import Image
    from skimage import data
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from export.llm import main as export_llm
    from runtime.llm.backend import LlamaBackend

    bundle = tmp_path_factory.mktemp("mistral_llm") / "bundle"
    shutil.copytree(tiny_next_bundle, bundle)
    assert export_llm(["--model", str(tiny_mistral_next_dir), "--out", str(bundle), "--quant", "f32"]) == 0
    gguf = bundle / json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["llm"]["gguf"]
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_mistral_next_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_mistral_next_dir)
    image = Image.fromarray(data.chelsea())
    pixels = processor.image_processor(image, return_tensors="pt")
    with torch.no_grad():  # transformers 5 returns the rows packed, newlines in
        rows = model.model.get_image_features(pixel_values=pixels["pixel_values"],
                                              image_sizes=pixels["image_sizes"]).pooler_output[0].numpy()
    llm = LlamaBackend(gguf, n_ctx=4096, kv_type="f32", flash_attn="off")
    yield {"gguf": gguf, "model": model, "processor": processor, "image": image, "rows": rows, "llm": llm}
    llm.close()


def _open(path: Path) -> Any:
    from runtime.llm.backend import LlamaBackend

    return LlamaBackend(path, n_ctx=4096, kv_type="f32", flash_attn="off")


@pytest.mark.llm
def test_gguf_is_llama_with_mistrals_attention(mistral: dict[str, Any]) -> None:
    import gguf

    reader = gguf.GGUFReader(mistral["gguf"])
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (8, 2)
    assert field("llama.rope.freq_base") == pytest.approx(1e6)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == (64, 64) and shapes["blk.0.attn_k.weight"] == (64, 16)  # [in, out]


@pytest.mark.llm
@pytest.mark.parametrize("turns", [1, 2])
def test_mistral_logits_equal_hf(mistral: dict[str, Any], turns: int) -> None:
    from tests.llm_parity import device_logits, hf_logits

    chat = Conversation().ask("What is in the image?") if turns == 1 else TWO_TURNS
    prompt = encode_prompt(conversation_segments(chat, MISTRAL_INSTRUCT), mistral["llm"])
    rows = mistral["rows"]
    assert rows.shape[0] > 1000 and prompt.has_image
    expected = hf_logits(mistral["model"], prompt, rows)
    got = device_logits(mistral["llm"], prompt, rows)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL, err_msg=f"{turns} turn(s)")


@pytest.mark.llm
@pytest.mark.parametrize("bug", ["LLaMA's RoPE base 1e4", "no q/k permutation"])
def test_negative_control_wrong_conversion_differs(mistral: dict[str, Any], tiny_mistral_next_dir: Path,
                                                   tmp_path: Path, bug: str) -> None:
    """The same converter with a plausible bug (RoPE base left at LLaMA's default, rotate-half rows kept)
    gives logits outside the tolerance."""
    from tests.llm_parity import device_logits, hf_logits

    hp = read_hparams(tiny_mistral_next_dir)
    wrong = tmp_path / "wrong.gguf"
    if bug.startswith("LLaMA"):
        write_llama_gguf(tiny_mistral_next_dir, wrong, "f32", hparams=dataclasses.replace(hp, rope_theta=10000.0))
    else:
        write_llama_gguf(tiny_mistral_next_dir, wrong, "f32", permute=False)
    prompt = encode_prompt(conversation_segments(TWO_TURNS, MISTRAL_INSTRUCT), mistral["llm"])
    expected = hf_logits(mistral["model"], prompt, mistral["rows"])
    with _open(wrong) as llm:
        assert np.abs(device_logits(llm, prompt, mistral["rows"]) - expected).max() > 10 * LOGIT_ATOL


@pytest.mark.llm
def test_prompt_tokens_equal_the_hf_processors(mistral: dict[str, Any]) -> None:
    """Hugging Face's processor on the checkpoint's chat template (two turns, an answer closed by ``</s>``)
    gives our ids around the image, except the lone ``▁`` that starts our text after the image: LLaVA's
    ``tokenizer_image_token`` tokenizes the text after ``<image>`` with SentencePiece's dummy prefix (we keep
    LLaVA's training tokens there, as for LLaVA-1.5)."""
    from tests.test_template import HF_LLAVA_MISTRAL_TEMPLATE

    processor, model = mistral["processor"], mistral["model"]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
    ]
    text = processor.apply_chat_template(messages, chat_template=HF_LLAVA_MISTRAL_TEMPLATE, tokenize=False)
    ids = processor(text=text, images=mistral["image"], return_tensors="np")["input_ids"][0].tolist()
    image_id = model.config.image_token_index
    first, count = ids.index(image_id), ids.count(image_id)
    assert count == mistral["rows"].shape[0]
    ours = encode_prompt(conversation_segments(TWO_TURNS, MISTRAL_INSTRUCT), mistral["llm"])
    assert list(ours.prefix) == ids[:first]
    assert ours.suffix[0] == processor.tokenizer.convert_tokens_to_ids("\u2581")
    assert list(ours.suffix[1:]) == ids[first + count:]
    assert ids[first + count:].count(model.config.text_config.eos_token_id) == 1
