"""A llama.cpp context handle: the KV cache of one sequence, its batches, evaluation and reuse.

``eval_tokens``/``eval_embeddings`` append positions and return their outputs (logits, or hidden
states in embeddings mode); image rows go in through ``batch.embd`` with one ``memmove``.
``prefill`` makes the sequence equal a prompt of token ids and image rows, evaluating only from
the first position where it differs from what the cache holds (see :mod:`runtime.llm.prompt_cache`).

**Positions with gaps** (method.md §6, ``positions="original"``: image rows fed with
:attr:`ImageRows.positions`). llama.cpp wants every batch of a RoPE model to start right after
the highest position the sequence holds and to be continuous, so a gap cannot be given directly;
shifting the cached cells (``llama_memory_seq_add``) would not help either, because the new
token's nearest cached cell stays one position away. What is done instead: every cell is decoded
at its true position (Hugging Face's ``position_ids``), so its keys are rotated there and RoPE
sees the true distances; before a run that follows a gap, the *bookkeeping* position of the last
cached cell alone is moved to just before the run, its keys and values untouched (its state is
read out through sequence 1, the position field rewritten, written back: ``_move_last``). The
attention mask only compares positions, and every cached cell stays below the run, so the run
sees exactly the cells HF's does at the distances HF's RoPE does. Cost of ``original``: one
``llama_decode`` per run of consecutive positions (then chunked by ``n_batch``) plus, per gap,
one cell's keys and values copied out and back (2 x n_layer x n_embd_k values; no K-shift, no
recomputation). Identities carry the position (:mod:`runtime.llm.prompt_cache`), so a cache built
with packed positions is never reused for original ones past the first differing position.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Hashable, Sequence

import llama_cpp
import numpy as np

from runtime.errors import BundleError, ContextOverflowError
from runtime.llm.model import LlamaModel
from runtime.llm.prompt_cache import (
    ImageRows,
    Prefill,
    PromptPiece,
    common_prefix,
    identities,
    position_runs,
    virtual_positions,
)

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type of the KV cache
QUANT_BLOCK = 32  # values per q8_0 block: a quantised cache needs head sizes divisible by it
FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
# LLaVA-1.5 was fine-tuned at 2048 positions (its config allows 4096); at 7B an f16 KV cache
# costs 0.5 MB per position, so 2048 holds a chat of several turns with 64-576 image rows for 1 GB.
DEFAULT_N_CTX = 2048
OVERFLOW_HINT = "keep fewer image tokens, shorten the chat or raise n_ctx"
SEQ, SCRATCH = 0, 1  # the sequence, and the one a cell passes through when its position is moved
CELL_HEADER = 6  # 32-bit fields that open a one-cell sequence state: magic, seq id, n_stream, cell_count, pos, n_seq_id
CELL_POS = 4  # the field holding the cell's position


class LlamaContext:
    """One sequence over a :class:`LlamaModel` (``llama_context`` + a token and an embedding batch)."""

    def __init__(self, model: LlamaModel, *, n_ctx: int | None = None, n_batch: int = 512,
                 n_threads: int | None = None, embeddings: bool = False, kv_type: str = "f16",
                 flash_attn: str = "auto") -> None:
        if kv_type not in KV_TYPES or flash_attn not in FLASH_ATTN or n_batch < 1:
            raise ValueError(f"need kv_type in {sorted(KV_TYPES)}, flash_attn in {sorted(FLASH_ATTN)} and "
                             f"n_batch >= 1; got {kv_type!r}, {flash_attn!r}, {n_batch}")
        if kv_type not in ("f32", "f16") and model.head_dim % QUANT_BLOCK:
            raise BundleError(f"a {kv_type} KV cache needs a head size divisible by {QUANT_BLOCK}; "
                              f"{model.path.name} has {model.head_dim}: use --kv-type f16")
        self.model = model
        self.n_ctx = int(n_ctx or min(DEFAULT_N_CTX, model.n_ctx_train))
        self.n_batch = min(n_batch, self.n_ctx)
        self.embeddings_mode = embeddings
        self._stack = contextlib.ExitStack()
        handle = llama_cpp.llama_init_from_model(model.handle, self._params(n_threads, kv_type, flash_attn))
        if not handle:
            raise BundleError(f"llama.cpp cannot create a context of {self.n_ctx} for {model.path}")
        self._stack.callback(llama_cpp.llama_free, handle)
        self.handle = handle
        self._tok_batch = self._new_batch(0)
        self._emb_batch = self._new_batch(model.n_embd)
        self._n_past = 0
        self._cached: list[Hashable] = []  # what the KV cache holds, one identity per position
        self._virtual: list[int] = []  # each cell's position as HF's position_ids (its keys are rotated there)
        self._pos: list[int] = []  # each cell's position in llama.cpp's bookkeeping (see the module doc)
        self._outputs = np.zeros((0, model.n_embd if embeddings else model.n_vocab), np.float32)

    def _params(self, n_threads: int | None, kv_type: str, flash_attn: str) -> llama_cpp.llama_context_params:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_seq_max, params.kv_unified = 2, True  # SCRATCH shares the cells of SEQ (see _move_last)
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
        self._stack.callback(llama_cpp.llama_batch_free, batch)
        for i in range(self.n_batch):  # one sequence: seq id 0 everywhere
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        return batch

    def close(self) -> None:
        """Free the batches and the context (idempotent)."""
        self._stack.close()
        self.handle = None

    @property
    def n_past(self) -> int:
        """Cells the sequence holds (with gaps in its positions, fewer than its last position + 1)."""
        return self._n_past

    @property
    def positions(self) -> np.ndarray:
        """[n_past] int64: each cached cell's position as Hugging Face's ``position_ids``."""
        return np.asarray(self._virtual, dtype=np.int64)

    def reset(self) -> None:
        """Forget the sequence: clear the KV cache, ``n_past = 0``."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.handle), True)
        self._n_past = 0
        self._cached, self._virtual, self._pos = [], [], []

    def truncate(self, n_keep: int) -> None:
        """Drop every cached cell from the ``n_keep``-th on (``llama_memory_seq_rm`` from its position)."""
        if n_keep >= self._n_past:
            return
        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.handle), SEQ, self._pos[n_keep], -1):
            self.reset()  # a cache that cannot be cut partially is cleared whole
            return
        self._n_past = n_keep
        for kept in (self._cached, self._virtual, self._pos):
            del kept[n_keep:]

    # --- evaluation ------------------------------------------------------------------------
    def eval_tokens(self, ids: Sequence[int], output_all: bool = False) -> np.ndarray:
        """Append token ids; returns the outputs of the last position (every position when ``output_all``)."""
        arr = self._token_ids(ids)
        start = self._virtual[-1] + 1 if self._virtual else 0
        return self._eval(arr, False, output_all, identities([arr], start), start + np.arange(arr.size))

    def eval_embeddings(self, rows: np.ndarray, output_all: bool = False, key: Hashable | None = None,
                        start: int = 0) -> np.ndarray:
        """Append embedding rows ``[M, n_embd]`` from row ``start`` on; ``key`` names them for
        KV-cache reuse (None: never reused). Returns the outputs as :meth:`eval_tokens`."""
        if rows.ndim != 2 or rows.shape[1] != self.model.n_embd:
            raise ValueError(f"embedding rows must be [M, {self.model.n_embd}], got {rows.shape}")
        ident: Hashable = object() if key is None else key
        data = np.ascontiguousarray(rows[start:], dtype=np.float32)
        first = (self._virtual[-1] + 1 if self._virtual else 0) - start
        return self._eval(data, True, output_all, identities([ImageRows(ident, rows)], first)[start:],
                          first + np.arange(start, rows.shape[0]))

    def prefill(self, pieces: Sequence[PromptPiece], output_all: bool = False) -> Prefill:
        """Make the sequence equal ``pieces`` (token ids and image rows, in order), evaluating
        only from the first position where it differs from what the KV cache holds.

        The cache after the common prefix is removed; at least the last position is evaluated so
        that its logits are fresh. A prompt longer than the context is refused before anything is
        removed or evaluated. ``output_all`` evaluates everything from position 0 and keeps the
        outputs of every position (the probe's hidden states). Image rows with ``positions`` are
        fed at those positions (see the module doc for how and what it costs).
        """
        for piece in pieces:
            if isinstance(piece, ImageRows) and (piece.rows.ndim != 2 or piece.rows.shape[1] != self.model.n_embd):
                raise ValueError(f"embedding rows must be [M, {self.model.n_embd}], got {piece.rows.shape}")
        wanted, where = identities(pieces), virtual_positions(pieces)
        if not wanted:
            raise ValueError("nothing to evaluate: got 0 tokens/rows")
        if len(wanted) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {len(wanted)} positions but the context holds {self.n_ctx}; {OVERFLOW_HINT}"
            )
        keep = 0 if output_all else min(common_prefix(self._cached, wanted), len(wanted) - 1, self._n_past)
        self.truncate(keep)
        offset, outputs = 0, []
        for piece in pieces:
            image = isinstance(piece, ImageRows)
            size = piece.rows.shape[0] if image else len(piece)
            start = max(0, keep - offset)
            if start < size:
                data = (np.ascontiguousarray(piece.rows[start:], dtype=np.float32) if image
                        else self._token_ids(list(piece)[start:]))
                span = slice(offset + start, offset + size)
                outputs.append(self._eval(data, image, output_all, wanted[span], where[span]))
            offset += size
        if output_all:
            self._outputs = np.concatenate(outputs)
        return Prefill(evaluated=len(wanted) - keep, reused=keep)

    def _token_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int32).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.model.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.model.n_vocab}), got [{arr.min()}, {arr.max()}]")
        return arr

    def _eval(self, data: np.ndarray, embd: bool, output_all: bool, idents: list[Hashable],
              where: np.ndarray) -> np.ndarray:
        """Append ``data`` [n] ids or [n, n_embd] rows at the strictly increasing positions ``where``
        [n] (after the cached ones): one decode per run of consecutive positions, chunked by n_batch."""
        n = data.shape[0]
        if n == 0:
            raise ValueError("nothing to evaluate: got 0 tokens/rows")
        if self._n_past + n > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {self._n_past + n} positions ({self._n_past} used + {n} new) but the "
                f"context holds {self.n_ctx}; {OVERFLOW_HINT}"
            )
        where = np.asarray(where, dtype=np.int64)
        outputs = []
        for begin, end, _gap in position_runs(where, self._virtual[-1] if self._virtual else -1):
            if self._n_past and self._pos[-1] != where[begin] - 1:
                self._move_last(int(where[begin]) - 1)
            for start in range(begin, end, self.n_batch):
                stop = min(start + self.n_batch, end)
                outputs.append(self._decode(data[start:stop], embd, where[start:stop], output_all, stop == n))
                self._n_past += stop - start
                self._cached += idents[start:stop]
                self._virtual += where[start:stop].tolist()
                self._pos += where[start:stop].tolist()
        self._outputs = np.concatenate(outputs)
        return self._outputs.copy()

    def _decode(self, chunk: np.ndarray, embd: bool, pos: np.ndarray, output_all: bool, last: bool) -> np.ndarray:
        """One ``llama_decode`` of ``chunk`` at positions ``pos`` [m] (consecutive); its outputs."""
        batch, m = (self._emb_batch if embd else self._tok_batch), chunk.shape[0]
        ctypes.memmove(batch.embd if embd else batch.token, chunk.ctypes.data, chunk.nbytes)
        pos32 = np.ascontiguousarray(pos, dtype=np.int32)
        ctypes.memmove(batch.pos, pos32.ctypes.data, pos32.nbytes)
        flags = np.full(m, 1 if output_all else 0, dtype=np.int8)
        flags[-1] = 1 if (output_all or last) else 0
        ctypes.memmove(batch.logits, flags.ctypes.data, flags.nbytes)
        batch.n_tokens = m
        rc = llama_cpp.llama_decode(self.handle, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at n_past={self._n_past}")
        return self._read_outputs(int(flags.sum()))

    def _move_last(self, new_pos: int) -> None:
        """Give the last cached cell the bookkeeping position ``new_pos`` (keys and values as they
        are): out through SCRATCH as a one-cell state, position field rewritten, back into SEQ."""
        mem, old = llama_cpp.llama_get_memory(self.handle), self._pos[-1]
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, SEQ, SCRATCH, old, old + 1)
        size = llama_cpp.llama_state_seq_get_size(self.handle, SCRATCH)
        state = (ctypes.c_uint8 * size)()
        got = llama_cpp.llama_state_seq_get_data(self.handle, state, size, SCRATCH)
        header = np.frombuffer(state, dtype=np.int32, count=CELL_HEADER)  # a view: rewritten in place
        if got != size or header[1:].tolist() != [SCRATCH, 1, 1, old, 1]:
            raise RuntimeError(f"llama.cpp's one-cell state of position {old} is not laid out as expected "
                               f"(seq id, n_stream, cell_count, pos, n_seq_id = {header[1:].tolist()})")
        if not llama_cpp.llama_memory_seq_rm(mem, SEQ, old, old + 1):  # false: this memory cannot drop one cell
            raise RuntimeError(f"llama.cpp could not free the cell of position {old} to move it to {new_pos}")
        header[CELL_POS] = new_pos
        if llama_cpp.llama_state_seq_set_data(self.handle, state, size, SCRATCH) != size:
            raise RuntimeError(f"llama.cpp could not restore the cell of position {old} at {new_pos}")
        llama_cpp.llama_memory_seq_cp(mem, SCRATCH, SEQ, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH, -1, -1)
        self._pos[-1] = new_pos

    def _read_outputs(self, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros((0, self._outputs.shape[1]), np.float32)
        if self.embeddings_mode:
            ptr, width = llama_cpp.llama_get_embeddings(self.handle), self.model.n_embd
        else:
            ptr, width = llama_cpp.llama_get_logits(self.handle), self.model.n_vocab
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
