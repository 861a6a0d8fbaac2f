"""Logits of the same prompt + image rows through Hugging Face and llama.cpp (parity tests).

``offsets``/``span``: the image rows' positions (method.md §6, ``positions="original"``): row i
sits at ``len(prefix) + offsets[i]`` and the suffix starts at ``len(prefix) + span``; None:
consecutive (packed). The Hugging Face side builds its ``position_ids`` here, independently of
:mod:`runtime.llm.prompt_cache`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from runtime.llm.backend import LlamaBackend
from runtime.llm.prompt_cache import ImageRows
from runtime.llm.template import PromptTokens


def hf_position_ids(prompt: PromptTokens, rows: int, offsets: np.ndarray | None, span: int | None) -> torch.Tensor:
    """[1, P] int64: prefix 0..p-1, rows at p + offsets, suffix from p + span."""
    p, s = len(prompt.prefix), len(prompt.suffix)
    image = np.arange(rows) if offsets is None else np.asarray(offsets)
    after = p + (rows if span is None else span)
    ids = [list(range(p)), [p + int(o) for o in image], list(range(after, after + s))]
    return torch.tensor([sum(ids, [])], dtype=torch.long)


def hf_logits(model, prompt: PromptTokens, rows: np.ndarray, offsets: np.ndarray | None = None,
              span: int | None = None, suffix_all: bool = False) -> np.ndarray:
    """A Hugging Face LLaVA model (1.5 or NeXT) on prefix + rows [R, E] + suffix as inputs_embeds:
    the last position's logits [V], or with ``suffix_all`` every suffix position's [S, V]."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        parts = [embed(torch.tensor([prompt.prefix])), torch.from_numpy(rows)[None],
                 embed(torch.tensor([prompt.suffix]))]
        position_ids = hf_position_ids(prompt, rows.shape[0], offsets, span)
        logits = model(inputs_embeds=torch.cat(parts, dim=1), position_ids=position_ids).logits[0]
    return logits[-len(prompt.suffix):].numpy() if suffix_all else logits[-1].numpy()


def device_logits(llm: LlamaBackend, prompt: PromptTokens, rows: np.ndarray, offsets: np.ndarray | None = None,
                  span: int | None = None, suffix_all: bool = False) -> np.ndarray:
    """llama.cpp on the same sequence, from an empty context, rows injected as embeddings."""
    llm.reset()
    llm.prefill([prompt.prefix, ImageRows(object(), rows, offsets, span), prompt.suffix], output_all=suffix_all)
    return llm.logits(all_positions=True)[-len(prompt.suffix):] if suffix_all else llm.logits()


@contextmanager
def next_parity_setup(bundle: Path, next_dir: Path) -> Iterator[dict]:
    """The NeXT bundle's pipeline, its f32 llama.cpp model (f32 KV, no flash attention), the HF
    ``LlavaNextForConditionalGeneration`` in float32 and a one-question prompt, as a dict."""
    from transformers import LlavaNextForConditionalGeneration

    from runtime.anyres.pipeline import AnyresPipeline
    from runtime.llm.bundle import open_language_model
    from runtime.llm.template import Conversation, conversation_segments, encode_prompt

    pipeline = AnyresPipeline(bundle)
    llm = open_language_model(bundle, pipeline.manifest.data, kv_type="f32", flash_attn="off", n_ctx=4096)
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(next_dir, dtype=torch.float32).eval()
        prompt = encode_prompt(conversation_segments(Conversation().ask("What is in the image?")), llm)
        yield {"pipeline": pipeline, "llm": llm, "model": model, "prompt": prompt}
    finally:
        llm.close()
