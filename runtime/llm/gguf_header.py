"""Read a GGUF file's metadata (key/value header) and refuse absurd hyper-parameters before
llama.cpp sees the file: llama.cpp aborts the whole process (SIGABRT, no message) on a
``block_count`` of 0, a NaN ``rms_norm_epsilon`` or heads that do not divide the width.

Torch-free and without the ``gguf`` package (an export-side dependency): the header format is
small — magic ``GGUF``, version, tensor and key counts, then typed key/value pairs.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, BinaryIO

from runtime.errors import BundleError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KEYS = 100_000  # more key/value pairs than any model has: a corrupt count
MAX_STRING = 1 << 24  # bytes
MAX_BLOCKS = 1024
MAX_WIDTH = 1 << 17


def _read(handle: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the header ends early")
    return struct.unpack(fmt, data)[0]


def _string(handle: BinaryIO) -> str:
    length = _read(handle, "<Q")
    if length > MAX_STRING:
        raise ValueError(f"a string of {length} bytes")
    return handle.read(length).decode("utf-8", "replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(handle, _SCALARS[kind])
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item, count = _read(handle, "<I"), _read(handle, "<Q")
        if item in _SCALARS:  # numeric arrays are skipped, not read (token scores: 32,000 floats)
            handle.seek(count * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(count):
                _value(handle, item)
        return None
    raise ValueError(f"unknown value type {kind}")


def read_metadata(path: Path) -> dict[str, Any]:
    """Every scalar and string key of the header (arrays as None). Raises ValueError if malformed."""
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError("bad magic")
        version, _tensors, n_keys = _read(handle, "<I"), _read(handle, "<Q"), _read(handle, "<Q")
        if version not in (2, 3) or n_keys > MAX_KEYS:
            raise ValueError(f"version {version} with {n_keys} keys")
        return {_string(handle): _value(handle, _read(handle, "<I")) for _ in range(n_keys)}


def check_hparams(path: Path) -> dict[str, Any]:
    """The header of a llama-family GGUF, refused with one line when llama.cpp could not use it."""
    try:
        meta = read_metadata(path)
    except (OSError, ValueError, struct.error) as err:
        raise BundleError(f"{path} has an unreadable GGUF header ({err}); re-run export.llm") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise BundleError(f"{path} names no general.architecture; not a model GGUF")
    problem = _problem(meta, arch)
    if problem:
        raise BundleError(f"{path}: {problem}; llama.cpp cannot use this file (re-run export.llm)")
    return meta


def _problem(meta: dict[str, Any], arch: str) -> str | None:
    blocks, width = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length")
    heads, heads_kv = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.attention.head_count_kv")
    eps = meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    if not isinstance(blocks, int) or not 1 <= blocks <= MAX_BLOCKS:
        return f"{arch}.block_count is {blocks!r} (1..{MAX_BLOCKS})"
    if not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        return f"{arch}.embedding_length is {width!r} (1..{MAX_WIDTH})"
    if not isinstance(heads, int) or heads < 1 or (f"{arch}.attention.key_length" not in meta and width % heads):
        return f"{arch}.attention.head_count {heads!r} does not divide the width {width}"
    if heads_kv is not None and (not isinstance(heads_kv, int) or heads_kv < 1 or heads % heads_kv):
        return f"{arch}.attention.head_count_kv {heads_kv!r} does not divide head_count {heads}"
    if not isinstance(eps, float) or not math.isfinite(eps) or not 0 < eps < 1:
        return f"{arch}.attention.layer_norm_rms_epsilon is {eps!r} (a small positive number)"
    return None
