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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.bundle_writer import bundle_update
from export.llm_gguf import files
from export.llm_gguf.quantize import QUANTS
from runtime.bundle.check import file_sha256
from runtime.bundle.manifest import SCHEMA
from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import BundleError, InputError
from runtime.llm.backend import set_llama_logging
from runtime.model_registry import default_bundle_dir, is_local_path, known_aliases, load_spec

MANIFEST = "manifest.json"
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
            registered = Path(gguf_path).expanduser()
            written = files.register_gguf(registered, update, manifest, p)
            source = str(registered.resolve())
        else:
            written = files.convert_checked(model_dir, update, quant or _default_quant(model), p, manifest, progress)
            source = model
        target = written.gguf
        facts = files.gguf_facts(target)
        log("[3/3] validating in llama.cpp and writing the manifest")
        table = files.validate_in_llama(target, update.folder / files.PROBE_GGUF, facts["n_embd"])
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
            "probe": written.probe,
        }
        manifest["llm"] = entry
        update.commit(manifest)
    return LlmExport(out, entry, table)


def _default_quant(model: str) -> str:
    return load_spec(model).gguf_quant if model in known_aliases() else "q4_k_m"


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
