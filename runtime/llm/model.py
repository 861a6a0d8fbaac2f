"""A llama.cpp model handle: loading, the vocabulary, tokenising and detokenising.

One small class per native handle, as llama-cpp-python's ``_internals.py`` does; the handle is
freed through an ``ExitStack`` registered as soon as it exists, so a half-built object releases
what it took. Logging is process-wide and set by the CLIs (:func:`set_llama_logging`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from pathlib import Path

import llama_cpp

from runtime.errors import BundleError
from runtime.llm.gguf_header import check_hparams

LOAD_MODES = {  # how llama.cpp reads the weights
    "read": llama_cpp.LLAMA_LOAD_MODE_NONE,  # read into memory: one copy (repacked in place)
    "mmap": llama_cpp.LLAMA_LOAD_MODE_MMAP,  # map the file: with repacking both copies stay resident
}
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


set_llama_logging(False)  # quiet from the start; a CLI's --verbose turns llama.cpp's log on


def check_gguf(path: Path) -> None:
    """A one-line error for a missing file or one without the GGUF magic."""
    if not path.is_file():
        raise BundleError(f"no GGUF file at {path} (run: python -m export.llm --model ALIAS --out BUNDLE)")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise BundleError(f"{path} is not a GGUF file (bad magic); re-run export.llm")


class LlamaModel:
    """The weights and vocabulary of one GGUF (``llama_model``).

    Memory: ``load="read"`` (default) reads the weights into memory once; llama.cpp repacks
    Q4/Q8 weights for its CPU kernels (``repack``), and with ``load="mmap"`` the mapped file pages
    stay resident next to the repacked copy (llama.cpp issue #16761: ~2x the file). ``repack=False``
    with ``mmap`` holds no anonymous copy at all (slower matmuls): what the exporter's load check uses.
    """

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0, load: str = "read", repack: bool = True) -> None:
        self.path = Path(path).expanduser()
        check_gguf(self.path)
        check_hparams(self.path)  # llama.cpp aborts the process on absurd metadata
        if load not in LOAD_MODES:
            raise ValueError(f"load must be one of {sorted(LOAD_MODES)}, got {load!r}")
        _backend_init()
        self._stack = contextlib.ExitStack()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.load_mode = LOAD_MODES[load]
        params.use_extra_bufts = repack
        handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise BundleError(f"llama.cpp cannot load {self.path} (corrupt or unsupported GGUF; "
                              "--verbose shows llama.cpp's log)")
        self._stack.callback(llama_cpp.llama_model_free, handle)
        self.handle = handle
        self._vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_embd = int(llama_cpp.llama_model_n_embd(handle))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(handle))
        self.head_dim = self.n_embd // max(1, int(llama_cpp.llama_model_n_head(handle)))

    def close(self) -> None:
        """Free the model (idempotent)."""
        self._stack.close()
        self.handle = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
