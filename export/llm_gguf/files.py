"""The files ``export.llm`` writes into a bundle's staging folder: the language model converted
(checkpoint -> GGUF, quantised through an f16 intermediate) or registered (an existing GGUF,
linked or copied), the probes cut from it, their facts, and the check that llama.cpp loads them.

Each step refuses what cannot work before writing (type, width, P, free disk); the staging folder
is committed or dropped by :mod:`export.bundle_writer`, so nothing here is ever half-visible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from export.bundle_writer import BundleUpdate
from export.diskspace import link_or_copy, require_free
from export.llm_gguf.converter import CheckpointTensors, LlamaHParams, read_hparams, tensor_plan, write_llama_gguf
from export.llm_gguf.probe import read_probe_weights, save_probe_weights, write_final_probe_gguf, write_probe_gguf
from export.llm_gguf.quantize import BITS_PER_WEIGHT, QUANTS, quantize_gguf
from runtime.atomic import atomic_path
from runtime.bundle.check import file_sha256
from runtime.cli import log
from runtime.errors import BundleError, InputError
from runtime.llm.backend import LlamaBackend, projector_out_dim
from runtime.llm.probe import FINAL_PROBE as FINAL_PROBE_GGUF

PROBE_GGUF, PROBE_WEIGHTS = "probe.gguf", "probe_weights.npz"


@dataclass(frozen=True)
class LlmFiles:
    """The language model and its probes, written into the staging folder."""

    gguf: Path  # llm-<quant>.gguf
    probe: dict[str, Any]  # manifest["llm"]["probe"]


def check_width(n_embd: int, manifest: dict[str, Any]) -> None:
    """Refuse a language model whose width is not the projector's output (a mixed-up bundle)."""
    expected = projector_out_dim(manifest)
    if expected is None:
        log("  note: the manifest names no projector width; n_embd check skipped")
    elif expected != n_embd:
        raise BundleError(
            f"the language model has n_embd {n_embd} but the bundle's projector outputs "
            f"{expected}; export both from the same LLaVA checkpoint"
        )


def gguf_facts(path: Path) -> dict[str, Any]:
    """n_embd, n_vocab and file type of a GGUF, read with gguf.GGUFReader."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read GGUF {path}: {err}") from None
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch.contents() if arch is not None else "?"
    n_embd, tokens = reader.get_field(f"{arch}.embedding_length"), reader.get_field("tokenizer.ggml.tokens")
    file_type = reader.get_field(gguf.Keys.General.FILE_TYPE)
    if n_embd is None or tokens is None:
        raise BundleError(f"{path} lacks {arch}.embedding_length or a tokenizer; not a usable LLM GGUF")
    quant = gguf.LlamaFileType(int(file_type.contents())).name.lower() if file_type else "unknown"
    return {
        "arch": arch,
        "n_embd": int(n_embd.contents()),
        "n_vocab": len(tokens.data),
        "quant": quant.removeprefix("mostly_").removeprefix("all_"),
    }


def write_probes(src: Path, update: BundleUpdate, p: int) -> dict[str, Any]:
    """Write probe.gguf + probe_weights.npz cut from ``src`` at layer P-1 into the staging folder;
    their manifest entry."""
    log(f"  probe: blocks 0..{p - 2}, output_norm = blk.{p - 1}.attn_norm; final probe: blocks 0..{p - 1}")
    probe, weights = update.folder / PROBE_GGUF, update.folder / PROBE_WEIGHTS
    final = update.folder / FINAL_PROBE_GGUF
    write_probe_gguf(src, probe, p - 1, update.export_id)
    save_probe_weights(weights, read_probe_weights(src, p - 1), update.export_id)
    write_final_probe_gguf(src, final, p, update.export_id)
    return {
        "gguf": update.name(probe),
        "weights": update.name(weights),
        "entropyprune_layer": p,
        "layer": p - 1,
        "dtype": gguf_facts(probe)["quant"],
        "size": probe.stat().st_size,
        "weights_size": weights.stat().st_size,
        "sha256": file_sha256(probe),
        "weights_sha256": file_sha256(weights),
        "final": {"gguf": update.name(final), "size": final.stat().st_size, "sha256": file_sha256(final)},
    }


def disk_needs(model_dir: Path, hp: LlamaHParams, quant: str, p: int) -> dict[str, int]:
    """Bytes the conversion will hold on disk at its peak, by file (read from tensor shapes only)."""
    tensors = CheckpointTensors(model_dir)
    sizes = [int(np.prod(tensors.shape(key))) for _, key, _ in tensor_plan(tensors, hp)]
    params, embd = sum(sizes), hp.n_vocab * hp.n_embd
    per_layer = (params - embd * (1 if hp.tie_embeddings else 2)) / hp.n_layer
    needs = {f"llm-{quant}.gguf": int(params * BITS_PER_WEIGHT[quant] / 8)}
    if quant not in ("f32", "f16"):
        needs = {"f16 intermediate": 2 * params, **needs}
    probe_bytes = 4 if quant == "f32" else 2
    needs["probe"] = int(probe_bytes * (embd + (p - 1) * per_layer))
    needs["final probe"] = int(probe_bytes * (embd + p * per_layer))
    return needs


def convert(model_dir: Path, update: BundleUpdate, quant: str, p: int, progress: bool) -> LlmFiles:
    """Checkpoint -> llm-<quant>.gguf (via an f16 intermediate when quantising) and the probe,
    all in the staging folder.

    The intermediate is deleted when done, when anything fails and on SIGTERM (the CLI turns
    it into KeyboardInterrupt); one left by a kill -9 goes with its staging folder on the next run.
    """
    target = update.folder / f"llm-{quant}.gguf"
    if quant in ("f32", "f16"):
        log(f"[1/3] converting {model_dir} -> {target.name}")
        write_llama_gguf(model_dir, target, quant, progress=progress, export_id=update.export_id)
        return LlmFiles(target, write_probes(target, update, p))
    middle = update.folder / f".llm-f16-{os.getpid()}.gguf"
    try:
        log(f"[1/3] converting {model_dir} -> f16 intermediate")
        write_llama_gguf(model_dir, middle, "f16", progress=progress, export_id=update.export_id)
        probe = write_probes(middle, update, p)
        log(f"[2/3] quantising -> {target.name}")
        with atomic_path(target) as tmp:
            quantize_gguf(middle, tmp, quant, progress=progress)
    finally:
        middle.unlink(missing_ok=True)
    return LlmFiles(target, probe)


def validate_in_llama(llm: Path, probe: Path, n_embd: int) -> str:
    """Load both files in llama.cpp; a markdown table of the checks.

    The language model is memory-mapped without repacking, so checking a 7B file costs no
    anonymous memory (repacking would copy all weights: ~4 GB for a Q4 7B).
    """
    rows = []
    with LlamaBackend(llm, n_ctx=64, load="mmap", repack=False) as backend:
        rows.append(("llm loads in llama.cpp", True, f"n_embd {backend.n_embd}, n_vocab {backend.n_vocab}"))
        rows.append(("llm n_embd = projector width", backend.n_embd == n_embd, str(n_embd)))
        ids = backend.tokenize("USER: hello ASSISTANT:")
    for name, path in (("probe", probe), ("final probe", probe.with_name(FINAL_PROBE_GGUF))):
        with LlamaBackend(path, n_ctx=64, embeddings=True, load="mmap", repack=False) as probe_backend:
            probe_backend.eval_tokens(ids, output_all=True)
            shape = probe_backend.hidden_states().shape
            rows.append((f"{name} runs (hidden states)", shape == (len(ids), n_embd), str(shape)))
    failed = [f"{name} ({value})" for name, ok, value in rows if not ok]
    if failed:
        raise BundleError(f"export validation failed: {'; '.join(failed)}")
    lines = ["| check | ok | value |", "|---|---|---|"]
    return "\n".join(lines + [f"| {name} | ✓ | {value} |" for name, _, value in rows])


def convert_checked(model_dir: Path, update: BundleUpdate, quant: str, p: int, manifest: dict[str, Any],
                     progress: bool) -> LlmFiles:
    """Refuse what cannot work before writing anything (type, width, P, free disk)."""
    if quant not in QUANTS:
        raise InputError(f"unknown --quant {quant!r}; choose from {', '.join(QUANTS)}")
    hp = read_hparams(model_dir)
    check_width(hp.n_embd, manifest)
    if not 2 <= p <= hp.n_layer:
        raise InputError(f"entropyprune_layer P={p} must be in 2..{hp.n_layer} (the probe keeps P-1 >= 1 layers)")
    require_free(update.out, disk_needs(model_dir, hp, quant, p), "free some space or pass --out on a larger disk")
    return convert(model_dir, update, quant, p, progress)


def register_gguf(path: Path, update: BundleUpdate, manifest: dict[str, Any], p: int) -> LlmFiles:
    """An existing GGUF: check it, put it into the bundle (hard link, else copy) so that the
    bundle can be moved, and cut the probe from it as stored. The user's file is never
    modified, so it carries no export id (the manifest says ``registered``; its size is
    checked on load and its sha256 by ``runtime.prune --check``)."""
    if not path.is_file():
        raise BundleError(f"no GGUF file at {path}")
    facts = gguf_facts(path)
    if facts["arch"] != "llama":
        raise BundleError(f"{path} has architecture {facts['arch']!r}; only 'llama' GGUFs are supported")
    check_width(facts["n_embd"], manifest)
    target = update.folder / f"llm-{facts['quant']}.gguf"
    log(f"[1/3] registering {path} as {target.name}")
    how = link_or_copy(path, target)
    log(f"  {how} into {update.out}")
    return LlmFiles(target, write_probes(target, update, p))

