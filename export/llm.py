"""Export LLaVA's language model to GGUF for llama.cpp, plus the EntropyPrune probe.

``python -m export.llm --model ALIAS_OR_PATH [--quant q4_k_m|q4_0|q8_0|f16|f32] [--out DIR]
[--gguf PATH] [--force]``

Runs after ``export.clip`` (which writes ``DIR/manifest.json``): converts the checkpoint's LLaMA or Mistral
with our own converter (:mod:`export.llm_gguf.converter`) to f32/f16, builds ``probe.gguf`` and
``probe_weights.npz`` (EntropyPrune, FastV, DART's keys) and ``probe_final.gguf`` (DART's ``H``)
from that file (so the probes stay f32/f16: f32 when ``--quant f32``, else
f16), quantises with ``llama_model_quantize`` and records everything under ``manifest["llm"]``.
``--gguf PATH`` registers an existing llama GGUF instead (its probe is cut from it as stored).
Everything is written into the bundle's ``llm.<export_id>/`` folder and committed by replacing the
manifest (all or nothing: :mod:`export.bundle_writer`); a bundle that has a language model keeps
it unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from export.bundle_writer import BundleUpdate, bundle_update
from export.diskspace import link_or_copy, require_free
from export.llm_gguf.converter import CheckpointTensors, LlamaHParams, read_hparams, tensor_plan, write_llama_gguf
from export.llm_gguf.probe import read_probe_weights, save_probe_weights, write_final_probe_gguf, write_probe_gguf
from export.llm_gguf.quantize import BITS_PER_WEIGHT, QUANTS, quantize_gguf
from runtime.atomic import atomic_path
from runtime.bundle.check import file_sha256
from runtime.bundle.manifest import SCHEMA
from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import BundleError, InputError
from runtime.llm.backend import LlamaBackend, projector_out_dim, set_llama_logging
from runtime.llm.probe import FINAL_PROBE as FINAL_PROBE_GGUF
from runtime.model_registry import default_bundle_dir, is_local_path, known_aliases, load_spec

PROBE_GGUF, PROBE_WEIGHTS, MANIFEST = "probe.gguf", "probe_weights.npz", "manifest.json"
DEFAULT_P = 2  # entropyprune_layer for a local checkpoint (the released code's value)


@dataclass(frozen=True)
class LlmExport:
    """What :func:`export_llm` wrote."""

    out: Path  # the bundle directory
    entry: dict[str, Any]  # manifest["llm"]
    table: str  # the validation table (markdown)


def _load_manifest(out: Path, model: str) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{out} has no {MANIFEST}; run export.clip first (python -m export.clip --model {model} --out {out})"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("schema", SCHEMA) != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path} has schema {found!r}, expected {SCHEMA!r}; re-run export.clip")
    return manifest


def _check_width(n_embd: int, manifest: dict[str, Any]) -> None:
    expected = projector_out_dim(manifest)
    if expected is None:
        log("  note: the manifest names no projector width; n_embd check skipped")
    elif expected != n_embd:
        raise BundleError(
            f"the language model has n_embd {n_embd} but the bundle's projector outputs "
            f"{expected}; export both from the same LLaVA checkpoint"
        )


def _gguf_facts(path: Path) -> dict[str, Any]:
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


def _probe(src: Path, update: BundleUpdate, p: int) -> dict[str, Any]:
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
        "dtype": _gguf_facts(probe)["quant"],
        "size": probe.stat().st_size,
        "weights_size": weights.stat().st_size,
        "sha256": file_sha256(probe),
        "weights_sha256": file_sha256(weights),
        "final": {"gguf": update.name(final), "size": final.stat().st_size, "sha256": file_sha256(final)},
    }


def _disk_needs(model_dir: Path, hp: LlamaHParams, quant: str, p: int) -> dict[str, int]:
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


def _convert(model_dir: Path, update: BundleUpdate, quant: str, p: int, progress: bool) -> tuple[Path, dict[str, Any]]:
    """Checkpoint -> llm-<quant>.gguf (via an f16 intermediate when quantising) and the probe,
    all in the staging folder.

    The intermediate is deleted when done, when anything fails and on SIGTERM (the CLI turns
    it into KeyboardInterrupt); one left by a kill -9 goes with its staging folder on the next run.
    """
    target = update.folder / f"llm-{quant}.gguf"
    if quant in ("f32", "f16"):
        log(f"[1/3] converting {model_dir} -> {target.name}")
        write_llama_gguf(model_dir, target, quant, progress=progress, export_id=update.export_id)
        return target, _probe(target, update, p)
    middle = update.folder / f".llm-f16-{os.getpid()}.gguf"
    try:
        log(f"[1/3] converting {model_dir} -> f16 intermediate")
        write_llama_gguf(model_dir, middle, "f16", progress=progress, export_id=update.export_id)
        probe = _probe(middle, update, p)
        log(f"[2/3] quantising -> {target.name}")
        with atomic_path(target) as tmp:
            quantize_gguf(middle, tmp, quant, progress=progress)
    finally:
        middle.unlink(missing_ok=True)
    return target, probe


def _validate(llm: Path, probe: Path, n_embd: int) -> str:
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


def _bundle_for(model: str | None, out: Path | None, convert: bool) -> tuple[Path | None, str | None, Path]:
    """Checkpoint dir (only when converting), the registry alias (if any) and the bundle folder."""
    if model is None:
        if out is None:
            raise InputError("--gguf without --model needs --out BUNDLE (the folder export.clip wrote)")
        return None, None, Path(out)
    if convert:
        from export.load import resolve_model

        resolved = resolve_model(model)
        alias = model if model in known_aliases() else None
        return resolved.path, alias, Path(out) if out is not None else default_bundle_dir(resolved.spec.alias)
    if model in known_aliases():
        return None, model, Path(out) if out is not None else default_bundle_dir(model)
    if not is_local_path(model) and not default_bundle_dir(model).is_dir():
        load_spec(model)  # one-line "unknown model" listing the aliases
    return None, None, Path(out) if out is not None else default_bundle_dir(Path(model).name)


def _entropyprune_layer(alias: str | None, manifest: dict[str, Any]) -> int:
    """P: the registry's for an alias, else the bundle's (export.clip recorded it), else 2."""
    if alias is not None:
        return load_spec(alias).entropyprune_layer
    value = manifest.get("entropyprune_layer", DEFAULT_P)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise BundleError(f"the bundle's entropyprune_layer {value!r} is not an integer >= 2; re-run export.clip")
    return value


def export_llm(
    model: str | None,
    quant: str | None = None,
    out: Path | None = None,
    gguf_path: Path | None = None,
    force: bool = False,
    verbose: bool = False,
    progress: bool = False,
) -> LlmExport:
    """Convert (or register ``gguf_path``) into bundle ``out`` and update its manifest["llm"]."""
    if gguf_path is None and model is None:
        raise InputError("give --model (the checkpoint to convert) or --gguf (an existing GGUF to register)")
    if gguf_path is not None and quant is not None:
        raise InputError("--quant does not apply with --gguf (the registered file's own type is recorded)")
    set_llama_logging(verbose)
    model_dir, alias, out = _bundle_for(model, out, convert=gguf_path is None)
    _load_manifest(out, model or "CHECKPOINT")  # refuse a missing bundle before taking its lock
    with bundle_update(out, "llm") as update:
        manifest = _load_manifest(out, model or "CHECKPOINT")  # as it is now that no one else writes
        p = _entropyprune_layer(alias, manifest)
        existing = manifest.get("llm")
        if isinstance(existing, dict) and not force:
            raise InputError(f"{out} already has a language model ({existing.get('gguf')}); pass --force to replace it")
        if gguf_path is not None:
            target, probe, source = _register(Path(gguf_path).expanduser(), update, manifest, p)
        else:
            target, probe = _convert_checked(model_dir, update, quant or _default_quant(model), p, manifest,
                                             progress)
            source = model
        facts = _gguf_facts(target)
        log("[3/3] validating in llama.cpp and writing the manifest")
        table = _validate(target, update.folder / PROBE_GGUF, facts["n_embd"])
        entry = {
            "gguf": update.name(target),
            "quant": facts["quant"],
            "size": target.stat().st_size,
            "sha256": file_sha256(target),
            "n_embd": facts["n_embd"],
            "n_vocab": facts["n_vocab"],
            "source": source,
            "export_id": update.export_id,
            "registered": gguf_path is not None,
            "probe": probe,
        }
        manifest["llm"] = entry
        update.commit(manifest)
    return LlmExport(out, entry, table)


def _convert_checked(model_dir: Path, update: BundleUpdate, quant: str, p: int, manifest: dict[str, Any],
                     progress: bool) -> tuple[Path, dict[str, Any]]:
    """Refuse what cannot work before writing anything (type, width, P, free disk)."""
    if quant not in QUANTS:
        raise InputError(f"unknown --quant {quant!r}; choose from {', '.join(QUANTS)}")
    hp = read_hparams(model_dir)
    _check_width(hp.n_embd, manifest)
    if not 2 <= p <= hp.n_layer:
        raise InputError(f"entropyprune_layer P={p} must be in 2..{hp.n_layer} (the probe keeps P-1 >= 1 layers)")
    require_free(update.out, _disk_needs(model_dir, hp, quant, p), "free some space or pass --out on a larger disk")
    return _convert(model_dir, update, quant, p, progress)


def _default_quant(model: str) -> str:
    return load_spec(model).gguf_quant if model in known_aliases() else "q4_k_m"


def _register(path: Path, update: BundleUpdate, manifest: dict[str, Any], p: int) -> tuple[Path, dict[str, Any], str]:
    """An existing GGUF: check it, put it into the bundle (hard link, else copy) so that the
    bundle can be moved, and cut the probe from it as stored. The user's file is never
    modified, so it carries no export id (the manifest says ``registered``; its size is
    checked on load and its sha256 by ``runtime.prune --check``)."""
    if not path.is_file():
        raise BundleError(f"no GGUF file at {path}")
    facts = _gguf_facts(path)
    if facts["arch"] != "llama":
        raise BundleError(f"{path} has architecture {facts['arch']!r}; only 'llama' GGUFs are supported")
    _check_width(facts["n_embd"], manifest)
    target = update.folder / f"llm-{facts['quant']}.gguf"
    log(f"[1/3] registering {path} as {target.name}")
    how = link_or_copy(path, target)
    log(f"  {how} into {update.out}")
    return target, _probe(target, update, p), str(path.resolve())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m export.llm", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None,
        help=f"registry alias ({', '.join(known_aliases())}) or a local HF LLaVA checkpoint "
             "(optional with --gguf and --out)",
    )
    parser.add_argument(
        "--quant",
        choices=list(QUANTS),
        default=None,
        help="GGUF type (default: the registry's, q4_k_m for a local path)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="bundle directory holding export.clip's manifest.json (default: the bundle named after --model)",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="register this existing llama GGUF instead of converting (default: convert)",
    )
    parser.add_argument("--force", action="store_true", help="replace the bundle's language model if it has one")
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's log (default: silenced)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        result = export_llm(args.model, args.quant, args.out, args.gguf, args.force, args.verbose, progress=True)
        print(result.table)
        print(f"language model {result.entry['gguf']} ({result.entry['quant']}) and probe written to {result.out}")
        return 0

    return run_cli(body, "export.llm")


if __name__ == "__main__":
    raise SystemExit(main())
