"""Quantise a GGUF with llama.cpp's ``llama_model_quantize``, with a progress bar over tensors."""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
from pathlib import Path

import llama_cpp

from runtime.errors import BundleError
from runtime.llm.backend import set_llama_logging

QUANTS = {"q4_k_m": 15, "q4_0": 2, "q8_0": 7, "f16": 1, "f32": 0}  # llama_ftype values
BITS_PER_WEIGHT = {"q4_k_m": 4.9, "q4_0": 4.5, "q8_0": 8.5, "f16": 16.0, "f32": 32.0}  # for the disk estimate
_QUANT_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0, progress: bool = False) -> None:
    """f32/f16 GGUF ``src`` -> ``dst`` in ``quant`` with llama.cpp's ``llama_model_quantize``
    (``threads=0``: all cores); ``progress`` shows a bar over tensors, read off llama.cpp's log."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads
    with _tensor_progress(progress, f"quantising to {quant}"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise BundleError(f"llama_model_quantize({src.name} -> {quant}) failed with code {rc}")


@contextlib.contextmanager
def _tensor_progress(enabled: bool, label: str):
    """While llama.cpp quantises, turn its "[  i/  n] name ..." log lines into a tqdm bar."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(desc=f"  {label}", unit="tensor", file=sys.stderr, leave=True)

    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        match = _QUANT_LINE.search(text.decode("utf-8", "replace")) if text else None
        if match:
            bar.total = int(match.group(2))
            bar.update(int(match.group(1)) - bar.n)

    callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        set_llama_logging(False)
        bar.close()
