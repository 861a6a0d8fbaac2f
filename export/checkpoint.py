"""Tensor-by-tensor reading of a (sharded) safetensors checkpoint, without memory maps.

Only the JSON headers are read up front; a tensor's bytes are read with one positioned read
when it is asked for. Nothing is memory-mapped, so the pages of a 14 GB checkpoint never count
as this process's resident memory (``safe_open`` maps whole shards: converting a 7B model that
way showed 12.5 GB resident), and the exporters never hold more than the tensor at hand.
Key layouts differ between checkpoints (llava-hf's files: ``vision_tower.vision_model.*``,
``language_model.model.*``; transformers 5: ``vision_tower.*`` / ``model.language_model.*``),
so callers look keys up by suffix or prefix.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import ModelNotFoundError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # BF16 widened on load
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset, stored dtype and shape."""

    path: Path
    offset: int  # bytes from the start of the file
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_DTYPES[self.dtype]).itemsize


def shard_names(model_dir: Path) -> list[str]:
    """The shard files of a checkpoint (from its index, else the single ``model.safetensors``)."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelNotFoundError(f"cannot read {index}: {type(err).__name__}: {err}") from None
    if (model_dir / SINGLE).is_file():
        return [SINGLE]
    raise ModelNotFoundError(f"{model_dir} has no {SINGLE} or {INDEX}")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file; a truncated or foreign file is a one-line error."""
    try:
        with path.open("rb") as handle:
            size, first = path.stat().st_size, handle.read(8)
            if len(first) < 8:
                raise ValueError(f"only {len(first)} bytes")
            (length,) = struct.unpack("<Q", first)
            if not 2 <= length <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(handle.read(length).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as err:
        raise ModelNotFoundError(f"{path} is not a readable safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ModelNotFoundError(f"{path} is not a readable safetensors file (header is not an object)")
    start, tensors = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            info = TensorInfo(path, start + begin, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            if info.dtype not in _DTYPES or end - begin != info.nbytes or start + end > size:
                raise ValueError(f"{info.dtype} {info.shape} at [{begin}, {end})")
        except (KeyError, TypeError, ValueError) as err:
            raise ModelNotFoundError(f"{path}: tensor {name!r} has a bad header entry ({err})") from None
        tensors[name] = info
    return tensors


class Checkpoint:
    """The tensors of a safetensors checkpoint, read on demand (headers only up front)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._info: dict[str, TensorInfo] = {}
        for name in shard_names(self.model_dir):
            self._info.update(read_header(self.model_dir / name))

    def keys(self) -> Iterator[str]:
        return iter(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def prefix(self, suffix: str) -> str:
        """The key prefix in front of ``suffix`` (e.g. ``vision_tower.`` or ``model.vision_tower.``)."""
        found = sorted(key[: -len(suffix)] for key in self._info if key.endswith(suffix))
        if not found:
            raise ModelNotFoundError(f"the checkpoint has no tensor ending in {suffix!r}; is it a LLaVA-1.5?")
        return found[0]

    def under(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``, sorted."""
        return sorted(key for key in self._info if key.startswith(prefix))

    def info(self, key: str) -> TensorInfo:
        try:
            return self._info[key]
        except KeyError:
            raise ModelNotFoundError(f"{self.model_dir}: no tensor {key!r} in the checkpoint") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def raw(self, key: str) -> np.ndarray:
        """One tensor in its stored dtype (BF16 as its uint16 bit patterns), read from disk now."""
        info = self.info(key)
        count = int(np.prod(info.shape, dtype=np.int64))
        with info.path.open("rb") as handle:
            data = np.fromfile(handle, dtype=_DTYPES[info.dtype], count=count, offset=info.offset)
        if data.size != count:
            raise ModelNotFoundError(f"{info.path} is truncated: {key} ends past the end of the file")
        return data.reshape(info.shape)

    def load(self, key: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16/f16 upcast). Example: an F16 ``[4096, 4096]`` -> float32."""
        data = self.raw(key)
        if self.info(key).dtype == "BF16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32, copy=False)
