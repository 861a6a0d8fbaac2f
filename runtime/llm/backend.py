"""The language model in llama.cpp, fed token ids or (pruned) image embedding rows directly.

llama-cpp-python's ``Llava15ChatHandler`` encodes the image itself; we use the low-level API
instead (``llama_batch_init(n, n_embd, 1)`` and ``batch.embd``) so that any ``[M, n_embd]`` rows
can be injected. The layer follows llama.cpp's native handles — :class:`runtime.llm.model.LlamaModel`
(weights, vocabulary), :class:`runtime.llm.context.LlamaContext` (KV cache, batches, evaluation,
prefill with cache reuse) and :class:`runtime.llm.generation.Generation` (the sampling loop and its
result); :class:`LlamaBackend` is one model with one context, what most callers want.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BundleError
from runtime.llm.context import DEFAULT_N_CTX, FLASH_ATTN, KV_TYPES, QUANT_BLOCK, LlamaContext
from runtime.llm.generation import Generation
from runtime.llm.model import LOAD_MODES, LlamaModel, set_llama_logging
from runtime.llm.prompt_cache import Prefill, PromptPiece

__all__ = ["DEFAULT_N_CTX", "FLASH_ATTN", "KV_TYPES", "LOAD_MODES", "QUANT_BLOCK", "LlamaBackend",
           "projector_out_dim", "set_llama_logging"]


def projector_out_dim(manifest: dict[str, Any]) -> int | None:
    """The projector's output width E from a manifest dict (``projector.out_dim``, else
    ``vision.projector_dim``), or None when it names neither."""
    for section, key in (("projector", "out_dim"), ("vision", "projector_dim")):
        value = manifest.get(section, {}).get(key) if isinstance(manifest.get(section), dict) else None
        if value is not None:
            return int(value)
    return None


class LlamaBackend:
    """One llama.cpp model with one context (one sequence). ``embeddings=True`` gives hidden
    states (pooling NONE) instead of logits: the probe mode. ``kv_type="f32", flash_attn="off"``
    keeps activations in float32 (parity with PyTorch to ~1e-5); the defaults round K/V to f16.
    ``load``/``repack``: see :class:`runtime.llm.model.LlamaModel`. Both handles are freed by
    :meth:`close` (or ``with``), also when the context cannot be created."""

    def __init__(self, path: str | Path, *, n_ctx: int | None = None, n_batch: int = 512,
                 n_threads: int | None = None, embeddings: bool = False, kv_type: str = "f16",
                 flash_attn: str = "auto", n_gpu_layers: int = 0, load: str = "read", repack: bool = True,
                 verbose: bool = False) -> None:
        if verbose:
            set_llama_logging(True)
        self.model = LlamaModel(path, n_gpu_layers=n_gpu_layers, load=load, repack=repack)
        try:
            self.context = LlamaContext(self.model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                        embeddings=embeddings, kv_type=kv_type, flash_attn=flash_attn)
        except BaseException:
            self.model.close()
            raise
        self.path, self.n_embd, self.n_vocab = self.model.path, self.model.n_embd, self.model.n_vocab
        self.n_ctx, self.n_batch = self.context.n_ctx, self.context.n_batch
        self.embeddings_mode = embeddings
        self._rng = np.random.default_rng()
        self.last_generation: Generation | None = None

    def close(self) -> None:
        """Free the context, then the model (idempotent)."""
        self.context.close()
        self.model.close()

    def __enter__(self) -> LlamaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_n_embd(self, expected: int) -> None:
        """Refuse a GGUF whose width differs from the projector's output width ``expected``."""
        if expected != self.n_embd:
            raise BundleError(
                f"{self.path.name} has n_embd {self.n_embd} but the projector outputs "
                f"{expected}; export the language model of the same LLaVA checkpoint"
            )

    # --- the model's vocabulary -------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos, special)

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        return self.model.token_to_piece(token, special)

    @property
    def bos_token(self) -> int:
        return self.model.bos_token

    @property
    def eos_token(self) -> int:
        return self.model.eos_token

    def is_end(self, token: int) -> bool:
        return self.model.is_end(token)

    # --- the context ----------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self.context.n_past

    def reset(self) -> None:
        self.context.reset()

    def eval_tokens(self, ids: Sequence[int], output_all: bool = False) -> np.ndarray:
        return self.context.eval_tokens(ids, output_all)

    def eval_embeddings(self, rows: np.ndarray, output_all: bool = False, key: Hashable | None = None) -> np.ndarray:
        return self.context.eval_embeddings(rows, output_all, key)

    def prefill(self, pieces: Sequence[PromptPiece], output_all: bool = False) -> Prefill:
        return self.context.prefill(pieces, output_all)

    def truncate(self, n_keep: int) -> None:
        self.context.truncate(n_keep)

    def logits(self, all_positions: bool = False) -> np.ndarray:
        return self.context.logits(all_positions)

    def hidden_states(self) -> np.ndarray:
        return self.context.hidden_states()

    # --- generation -------------------------------------------------------------------------
    def sample(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> int:
        """Next token from the last logits (greedy at temperature 0); ``seed`` reseeds the RNG."""
        from runtime.llm.sampling import sample_token

        if seed is not None:
            self._rng = np.random.default_rng(seed)
        return sample_token(self.logits(), temperature, top_p, self._rng)

    def generate(self, max_tokens: int = 512, stop: Sequence[str] = (), temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> Generation:
        """A :class:`Generation` after the evaluated prompt (iterate it for text pieces)."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.last_generation = Generation(self.context, max_tokens, stop, temperature, top_p, self._rng)
        return self.last_generation

    @property
    def finish_reason(self) -> str | None:
        """Why the last generation ended: ``stop``, ``length`` or ``context``."""
        return self.last_generation.finish_reason if self.last_generation else None
