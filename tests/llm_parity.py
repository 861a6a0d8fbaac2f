"""Last-position logits of the same prompt + image rows through Hugging Face and llama.cpp (parity tests)."""

from __future__ import annotations

import numpy as np
import torch

from runtime.llm import LlamaBackend
from runtime.template import PromptTokens


def hf_logits(model, prompt: PromptTokens, rows: np.ndarray) -> np.ndarray:
    """A Hugging Face LLaVA model (1.5 or NeXT) on prefix + rows [R, E] + suffix as inputs_embeds."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        parts = [embed(torch.tensor([prompt.prefix])), torch.from_numpy(rows)[None],
                 embed(torch.tensor([prompt.suffix]))]
        return model(inputs_embeds=torch.cat(parts, dim=1)).logits[0, -1].numpy()


def device_logits(llm: LlamaBackend, prompt: PromptTokens, rows: np.ndarray) -> np.ndarray:
    """llama.cpp on the same sequence, from an empty context, rows injected as embeddings."""
    llm.reset()
    llm.eval_tokens(prompt.prefix)
    llm.eval_embeddings(rows)
    llm.eval_tokens(prompt.suffix)
    return llm.logits()
