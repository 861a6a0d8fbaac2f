"""The language-model probes (method.md §2, §7): the first decoder layers of a LLaMA GGUF.

``probe.gguf`` copies a full GGUF's metadata and tokenizer, keeps blocks ``0..P-2`` and
``token_embd``, and uses block ``P-1``'s ``attn_norm.weight`` as ``output_norm.weight``. With
embeddings enabled, llama.cpp's output of that file is ``RMSNorm_{P-1}(h_{P-1})``: the input of
layer P-1's attention. It has no ``output.weight``, so llama.cpp ties the (unused) head to
``token_embd``. Tensors are copied byte for byte, so the probe has the dtype of its source (the
exporter builds it from the f32/f16 intermediate, before quantisation). ``probe_weights.npz``
holds ``W_q``/``W_k`` of layer P-1 in Hugging Face row layout (un-permuted), float32.
``probe_final.gguf`` keeps blocks ``0..P-1`` with the model's own final norm: DART's ``H``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from export.llm_gguf.converter import unpermute_qk
from runtime.atomic import atomic_path, write_atomic
from runtime.bundle.manifest import EXPORT_ID_KEY
from runtime.errors import BundleError
from runtime.llm.probe import ProbeWeights

ARCH = "llama"


def _field_value(field: gguf.ReaderField) -> Any:
    """A reader field's value in the form GGUFWriter.add_key_value takes (strings as bytes)."""
    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data]
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]])
    return field.contents()


def _int_field(reader: gguf.GGUFReader, key: str) -> int:
    field = reader.get_field(key)
    if field is None:
        raise BundleError(f"{reader.path} has no {key}")
    return int(field.contents())


def _check_arch(reader: gguf.GGUFReader) -> None:
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None or arch.contents() != ARCH:
        found = arch.contents() if arch is not None else None
        raise BundleError(f"{reader.path}: architecture {found!r}; the probe needs a {ARCH!r} GGUF")


def write_probe_gguf(src: Path, out: Path, layer: int, export_id: str) -> None:
    """Write blocks ``0..layer-1`` of ``src`` with ``blk.{layer}.attn_norm`` as output_norm, and
    ``export_id`` under ``runtime.bundle.manifest.EXPORT_ID_KEY`` (whatever id ``src`` carries)."""
    _write_cut(src, out, layer, f"blk.{layer}.attn_norm.weight", export_id)


def write_final_probe_gguf(src: Path, out: Path, layers: int, export_id: str) -> None:
    """Write blocks ``0..layers-1`` of ``src`` with the model's own ``output_norm``: llama.cpp's
    embeddings output is then ``norm(h_layers)``, DART's ``H`` at ``P = layers`` (method.md §7)."""
    _write_cut(src, out, layers, "output_norm.weight", export_id)


def _write_cut(src: Path, out: Path, blocks: int, norm: str, export_id: str) -> None:
    """Blocks ``0..blocks-1`` and ``token_embd`` of ``src`` (bytes as stored), tensor ``norm`` as
    ``output_norm.weight``, the source's metadata with the block count and export id replaced."""
    reader = gguf.GGUFReader(src)
    _check_arch(reader)
    block_count = f"{ARCH}.block_count"
    n_layer = _int_field(reader, block_count)
    most = n_layer if norm == "output_norm.weight" else n_layer - 1  # block `blocks` must exist for its norm
    if not 1 <= blocks <= most:
        raise BundleError(
            f"a probe of {blocks} blocks must keep 1..{most} of the {n_layer} blocks of {src} "
            "(llama.cpp cannot load a GGUF with 0 blocks, so P=1 has no probe)"
        )
    tensors = {t.name: t for t in reader.tensors}
    if norm not in tensors:
        raise BundleError(f"{src} has no tensor {norm}")
    keep = [
        t
        for t in reader.tensors
        if t.name == "token_embd.weight" or (t.name.startswith("blk.") and int(t.name.split(".")[1]) < blocks)
    ]
    keep.append(tensors[norm])
    names = [t.name for t in keep[:-1]] + ["output_norm.weight"]

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in (gguf.Keys.General.ARCHITECTURE, block_count, EXPORT_ID_KEY):
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, _field_value(field), field.types[0], sub_type=sub)
        writer.add_block_count(blocks)
        writer.add_string(EXPORT_ID_KEY, export_id)
        for name, tensor in zip(names, keep, strict=True):
            writer.add_tensor_info(
                name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, raw_dtype=tensor.tensor_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in keep:
            writer.write_tensor_data(tensor.data)
        writer.close()


def _dequantized(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    tensor = next((t for t in reader.tensors if t.name == name), None)
    if tensor is None:
        raise BundleError(f"{reader.path} has no tensor {name}")
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def read_probe_weights(src: Path, layer: int) -> ProbeWeights:
    """W_q, W_k of ``layer`` from a llama GGUF, dequantised and un-permuted to HF layout."""
    reader = gguf.GGUFReader(src)
    _check_arch(reader)
    n_head = _int_field(reader, f"{ARCH}.attention.head_count")
    n_head_kv = _int_field(reader, f"{ARCH}.attention.head_count_kv")
    theta_field = reader.get_field(f"{ARCH}.rope.freq_base")
    rope_theta = float(theta_field.contents()) if theta_field is not None else 10000.0
    q = unpermute_qk(_dequantized(reader, f"blk.{layer}.attn_q.weight"), n_head)
    k = unpermute_qk(_dequantized(reader, f"blk.{layer}.attn_k.weight"), n_head_kv)
    return ProbeWeights(q, k, n_head, n_head_kv, rope_theta, layer)


def save_probe_weights(path: Path, weights: ProbeWeights, export_id: str) -> None:
    """Write ``probe_weights.npz`` atomically (members: :meth:`ProbeWeights.arrays` and
    ``export_id``, a 0-d unicode array)."""
    arrays = {**weights.arrays(), "export_id": np.array(export_id)}
    write_atomic(path, lambda handle: np.savez(handle, **arrays))
