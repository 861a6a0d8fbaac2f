"""The language model in llama.cpp, fed token ids or (pruned) image embedding rows directly.

llama-cpp-python's ``Llava15ChatHandler`` encodes the image itself; we use the low-level API
instead (``llama_batch_init(n, n_embd, 1)`` and ``batch.embd``) so that any ``[M, n_embd]`` rows
can be injected. Positions continue ``n_past``; batches are chunked by ``n_batch``. llama.cpp's
own logging is silenced (process-wide) unless ``verbose``.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from runtime.errors import BundleError, ContextOverflowError
from runtime.sampling import StopScanner, sample_token

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type of the KV cache
QUANT_BLOCK = 32  # values per q8_0 block: a quantised cache needs head sizes divisible by it
LOAD_MODES = {  # how llama.cpp reads the weights
    "read": llama_cpp.LLAMA_LOAD_MODE_NONE,  # read into memory: one copy (repacked in place)
    "mmap": llama_cpp.LLAMA_LOAD_MODE_MMAP,  # map the file: with repacking both copies stay resident
}
FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
# LLaVA-1.5 was fine-tuned at 2048 positions (its config allows 4096); at 7B an f16 KV cache
# costs 0.5 MB per position, so 2048 holds a chat of several turns with 64-576 image rows for 1 GB.
DEFAULT_N_CTX = 2048
_SILENT = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
_STDERR = llama_cpp.llama_log_callback(
    lambda level, text, user_data: sys.stderr.write(text.decode("utf-8", "replace")) if text else None
)


@functools.cache
def _backend_init() -> None:
    llama_cpp.llama_backend_init()


def set_llama_logging(verbose: bool) -> None:
    """Route llama.cpp's log to stderr (``verbose``) or nowhere; the setting is process-wide."""
    llama_cpp.llama_log_set(_STDERR if verbose else _SILENT, ctypes.c_void_p(0))


def projector_out_dim(manifest: dict[str, Any]) -> int | None:
    """The projector's output width E from a manifest dict (``projector.out_dim``, else
    ``vision.projector_dim``), or None when it names neither."""
    for section, key in (("projector", "out_dim"), ("vision", "projector_dim")):
        value = manifest.get(section, {}).get(key) if isinstance(manifest.get(section), dict) else None
        if value is not None:
            return int(value)
    return None


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise BundleError(f"no GGUF file at {path} (run: python -m export.llm --model ALIAS --out BUNDLE)")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise BundleError(f"{path} is not a GGUF file (bad magic); re-run export.llm")


class LlamaBackend:
    """One llama.cpp model + context (one sequence). ``embeddings=True`` gives hidden states
    (pooling NONE) instead of logits: the probe mode. ``kv_type="f32", flash_attn="off"`` keeps
    activations in float32 (parity with PyTorch to ~1e-5); the defaults round K/V to f16.

    Memory: ``load="read"`` (default) reads the weights into memory once; llama.cpp repacks
    Q4/Q8 weights for its CPU kernels (``repack``), and with ``load="mmap"`` the mapped file pages
    stay resident next to the repacked copy (llama.cpp issue #16761: ~2x the file). ``repack=False``
    with ``mmap`` holds no anonymous copy at all (slower matmuls): what the exporter's load check uses.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int | None = None,
        n_batch: int = 512,
        n_threads: int | None = None,
        embeddings: bool = False,
        kv_type: str = "f16",
        flash_attn: str = "auto",
        n_gpu_layers: int = 0,
        load: str = "read",
        repack: bool = True,
        verbose: bool = False,
    ) -> None:
        self.path = Path(path).expanduser()
        _check_gguf(self.path)
        if kv_type not in KV_TYPES or flash_attn not in FLASH_ATTN or load not in LOAD_MODES or n_batch < 1:
            raise ValueError(
                f"need kv_type in {sorted(KV_TYPES)}, flash_attn in {sorted(FLASH_ATTN)}, load in "
                f"{sorted(LOAD_MODES)} and n_batch >= 1; got {kv_type!r}, {flash_attn!r}, {load!r}, {n_batch}"
            )
        set_llama_logging(verbose)
        _backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.load_mode = LOAD_MODES[load]
        mparams.use_extra_bufts = repack
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        self._ctx = self._tok_batch = self._emb_batch = None
        if not self._model:
            raise BundleError(
                f"llama.cpp cannot load {self.path} (corrupt or unsupported GGUF; retry with verbose=True for its log)"
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(n_ctx or min(DEFAULT_N_CTX, llama_cpp.llama_model_n_ctx_train(self._model)))
        self.n_batch = min(n_batch, self.n_ctx)
        self.embeddings_mode = embeddings
        head_dim = self.n_embd // max(1, int(llama_cpp.llama_model_n_head(self._model)))
        if kv_type not in ("f32", "f16") and head_dim % QUANT_BLOCK:
            self.close()
            raise BundleError(f"a {kv_type} KV cache needs a head size divisible by {QUANT_BLOCK}; "
                              f"{self.path.name} has {head_dim}: use --kv-type f16")
        self._ctx = llama_cpp.llama_init_from_model(self._model, self._context_params(n_threads, kv_type, flash_attn))
        if not self._ctx:
            self.close()
            raise BundleError(f"llama.cpp cannot create a context of {self.n_ctx} for {self.path}")
        self._tok_batch = self._new_batch(0)
        self._emb_batch = self._new_batch(self.n_embd)
        self._n_past = 0
        self._outputs = np.zeros((0, self.n_embd if embeddings else self.n_vocab), np.float32)
        self._rng = np.random.default_rng()
        self.finish_reason: str | None = None  # of the last generate(): stop, length or context

    def _context_params(self, n_threads: int | None, kv_type: str, flash_attn: str) -> llama_cpp.llama_context_params:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        threads = n_threads or os.cpu_count() or 1  # llama.cpp's own default is 4, whatever the machine
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.embeddings = self.embeddings_mode
        if self.embeddings_mode:
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.no_perf = True
        return params

    def _new_batch(self, n_embd: int) -> llama_cpp.llama_batch:
        batch = llama_cpp.llama_batch_init(self.n_batch, n_embd, 1)
        for i in range(self.n_batch):  # one sequence: seq id 0 everywhere
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        return batch

    # --- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Free the native handles (idempotent)."""
        for batch in (self._tok_batch, self._emb_batch):
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
        self._tok_batch = self._emb_batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._ctx = self._model = None

    def __enter__(self) -> LlamaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_model", None) is not None:
            self.close()

    def reset(self) -> None:
        """Forget the sequence: clear the KV cache, ``n_past = 0``."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past = 0

    @property
    def n_past(self) -> int:
        return self._n_past

    def check_n_embd(self, expected: int) -> None:
        """Refuse a GGUF whose width differs from the projector's output width ``expected``."""
        if expected != self.n_embd:
            raise BundleError(
                f"{self.path.name} has n_embd {self.n_embd} but the projector outputs "
                f"{expected}; export the language model of the same LLaVA checkpoint"
            )

    # --- text ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos`` prepends BOS, ``special`` parses "</s>", "<image>"."""
        data = text.encode("utf-8")
        buf = (llama_cpp.llama_token * (len(data) + 2))()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, special)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        return ([int(bos)] if add_bos and bos >= 0 else []) + list(buf[:n])

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (SentencePiece "▁" becomes a space)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    @property
    def bos_token(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self._vocab))

    @property
    def eos_token(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self._vocab))

    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # --- evaluation ------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
        if self._n_past + n > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {self._n_past + n} positions ({self._n_past} used + {n} new) but the "
                f"context holds {self.n_ctx}; keep fewer image tokens, shorten the chat or raise n_ctx"
            )

    def eval_tokens(self, ids: Sequence[int], output_all: bool = False) -> None:
        """Append token ids to the sequence (outputs of every position when ``output_all``)."""
        arr = np.asarray(ids, dtype=np.int32).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.n_vocab}), got [{arr.min()}, {arr.max()}]")
        self._eval(arr, False, output_all)

    def eval_embeddings(self, rows: np.ndarray, output_all: bool = False) -> None:
        """Append embedding rows ``[M, n_embd]`` float32 (e.g. projected image tokens)."""
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise ValueError(f"embedding rows must be [M, {self.n_embd}], got {rows.shape}")
        self._eval(np.ascontiguousarray(rows, dtype=np.float32), True, output_all)

    def _eval(self, data: np.ndarray, embd: bool, output_all: bool) -> None:
        n = data.shape[0]
        batch = self._emb_batch if embd else self._tok_batch
        if n == 0:
            raise ValueError("nothing to evaluate: got 0 tokens/rows")
        self._check_room(n)
        outputs = []
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            chunk = data[start : start + m]
            target = batch.embd if embd else batch.token
            ctypes.memmove(target, chunk.ctypes.data, chunk.nbytes)
            pos = np.arange(self._n_past, self._n_past + m, dtype=np.int32)
            ctypes.memmove(batch.pos, pos.ctypes.data, pos.nbytes)
            flags = np.full(m, 1 if output_all else 0, dtype=np.int8)
            flags[-1] = 1 if (output_all or start + m == n) else 0
            ctypes.memmove(batch.logits, flags.ctypes.data, flags.nbytes)
            batch.n_tokens = m
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at n_past={self._n_past}")
            outputs.append(self._read_outputs(int(flags.sum())))
            self._n_past += m
        self._outputs = np.concatenate(outputs)

    def _read_outputs(self, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros((0, self._outputs.shape[1]), np.float32)
        if self.embeddings_mode:
            ptr, width = llama_cpp.llama_get_embeddings(self._ctx), self.n_embd
        else:
            ptr, width = llama_cpp.llama_get_logits(self._ctx), self.n_vocab
        return np.ctypeslib.as_array(ptr, shape=(count * width,)).reshape(count, width).copy()

    def logits(self, all_positions: bool = False) -> np.ndarray:
        """Logits of the last evaluated position ``[n_vocab]``, or ``[M, n_vocab]`` of the last
        eval call's positions (that call needs ``output_all=True``)."""
        if self.embeddings_mode:
            raise ValueError("this backend was opened with embeddings=True; it has no logits")
        if self._outputs.shape[0] == 0:
            raise ValueError("no logits yet: evaluate tokens or embeddings first")
        return self._outputs.copy() if all_positions else self._outputs[-1].copy()

    def hidden_states(self) -> np.ndarray:
        """Embeddings mode: the final-norm hidden states ``[M, n_embd]`` of the last eval call."""
        if not self.embeddings_mode:
            raise ValueError("hidden states need a backend opened with embeddings=True")
        return self._outputs.copy()

    # --- generation ------------------------------------------------------------------------
    def sample(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> int:
        """Next token from the last logits (greedy at temperature 0); ``seed`` reseeds the RNG."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        return sample_token(self.logits(), temperature, top_p, self._rng)

    def generate(
        self,
        max_tokens: int = 512,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Stream text pieces after the evaluated prompt; ends at EOS, a stop string (not
        emitted), ``max_tokens`` or a full context. ``finish_reason`` says which."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        scanner, decoder = StopScanner(stop), codecs.getincrementaldecoder("utf-8")("replace")
        self.finish_reason = "length"
        for step in range(max_tokens):
            token = self.sample(temperature, top_p)
            if self.is_end(token):
                self.finish_reason = "stop"
                break
            scan = scanner.feed(decoder.decode(self.token_to_piece(token)))
            if scan.text:
                yield scan.text
            if scan.stopped:
                self.finish_reason = "stop"
                return
            if step + 1 == max_tokens:
                break
            if self._n_past + 1 > self.n_ctx:
                self.finish_reason = "context"
                break
            self.eval_tokens([token])
        tail = scanner.feed(decoder.decode(b"", final=True)).text + scanner.flush()
        if tail:
            yield tail
