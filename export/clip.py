"""``python -m export.clip``: export LLaVA's CLIP tower and projector to a validated ONNX bundle.

Writes ``vision.onnx`` (features, [CLS]→patch attention rows of blocks 1..f, head-mean keys of
block f; the graph ends at block f), ``projector.onnx`` and ``manifest.json`` (optionally
``vision.int8.onnx``) into the bundle's folder ``vision.<export_id>/``; ``manifest.json`` is
replaced to name them only after validation passed (all or nothing: :mod:`export.bundle_writer`).
A LLaVA-NeXT checkpoint (``model_type`` "llava_next") adds ``image_newline.npz`` there, the manifest's
``anyres`` constants and a per-tile check against ``LlavaNextModel.get_image_features``
(:mod:`export.llava_next`); every manifest names its ``family``.

Then, in a bundle update of its own, the text tower that ``cdpruner`` needs (:mod:`export.clip_text`:
``text.<export_id>/`` with text.onnx, image_projection.onnx, tokenizer.json) from the CLIP checkpoint
the vision tower came from: the registry's ``clip`` for an alias, ``CHECKPOINT/clip`` for a local
checkpoint (skipped with a note when absent), or ``--text-tower ID|PATH``. A failed text tower (say,
the hub is unreachable) leaves the committed vision export as it is and names the ``--text-tower-only``
command that adds the text tower alone; ``--no-text-tower`` skips it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.bundle_writer import LOCK, BundleUpdate, bundle_update, read_manifest, stamp_onnx
from runtime.bundle.check import file_sha256
from runtime.cli import OneLineParser, log, positive_int, run_cli
from runtime.errors import InputError, ModelNotFoundError, UserError
from runtime.model_registry import bundles_home, default_bundle_dir, known_aliases

DEFAULT_OPSET = 18
LLAVA_MODEL_TYPES = ("llava", "llava_next")  # the checkpoints export.clip takes (a CLIP or DINOv2 tower alone: not)
# torch's dynamo exporter writes opset 18 and up (below it, it prints a failed conversion and writes
# 18 anyway); 23 is the newest the exporter and onnxruntime 1.31 were checked with here.
MIN_OPSET, MAX_OPSET = 18, 23
STEPS = 5


@dataclass(frozen=True)
class ExportResult:
    out: Path
    manifest: dict[str, Any]
    table: str
    text: Any = None  # export.clip_text.TextExport, or None when no text tower was exported
    text_error: str | None = None  # why the text tower failed after the vision half was committed


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not force:
        raise InputError(f"--out {out} exists and is not empty; pass --force to replace its export files")


def export_clip(model: str, out: Path | None = None, opset: int = DEFAULT_OPSET, int8: bool = False,
                validate: bool = True, force: bool = False, text_tower: str | None = None,
                no_text_tower: bool = False) -> ExportResult:
    """Export, validate and write the bundle, then its text tower (``text_tower``: the CLIP checkpoint,
    default as in the module doc; ``int8`` applies to both); returns where it went and what it says.

    Memory: only the vision tower and projector are ever loaded (never the language model),
    in a child process that exits before onnxruntime validates and int8 quantisation runs, so
    the peak is the larger of the two halves, not their sum. The text tower comes after, in this
    process (CLIP-L: 1.7 GB in float32, released before its graphs are validated).
    """
    from export.clip_source import text_source, vision_fingerprint
    from export.diskspace import clean_stale
    from export.load import read_json, resolve_model
    from export.vision_family import family_for

    if out is not None:
        _check_out(out, force)
    log(f"[1/{STEPS}] resolving {model}")
    resolved = resolve_model(model)
    config = read_json(resolved.path / "config.json")
    if "auto_map" in config:
        log("  note: the checkpoint's config names remote code (auto_map); it is ignored, never run: "
            "only transformers' own CLIP and LLaVA classes are used")
    family = family_for(config.get("model_type")).bundle_family
    if family is None or config.get("model_type") not in LLAVA_MODEL_TYPES:  # a tower alone (CLIP, DINOv2)
        raise ModelNotFoundError(f"{resolved.path} is not a LLaVA checkpoint (config.json model_type "
                                 f"{config.get('model_type')!r}); export.clip exports LLaVA's CLIP tower")
    if family != resolved.spec.family:
        raise ModelNotFoundError(f"{resolved.path} is a {family} checkpoint (config.json model_type "
                                 f"{config.get('model_type')!r}) but {model} is registered as {resolved.spec.family}")
    out = out or default_bundle_dir(resolved.spec.alias)
    _check_out(out, force)
    source = None if no_text_tower else text_source(model, resolved.spec.clip, resolved.path, text_tower)
    log(f"[2/{STEPS}] loading the vision tower and projector of {resolved.path}")
    clean_stale(out.parent)  # staging folders that killed exports of older versions left beside the bundle
    with bundle_update(out, "vision") as update:
        manifest, table = _build(resolved, update, opset, int8, validate)
        manifest["vision_sha256"] = vision_fingerprint(resolved.path)
        install_vision(update, manifest)
    if source is None:
        return ExportResult(out, manifest, table)
    from export.clip_text import export_text_tower

    try:
        text = export_text_tower(resolved, out, source, opset, int8, validate, force=True)
    except UserError as err:
        retry = (f"python -m export.clip --model {model} --out {out} --text-tower-only"
                 + f" --text-tower {text_tower}" * (text_tower is not None) + " --int8" * int8)
        return ExportResult(out, manifest, table, text_error=f"the vision half of {out} is written, but its text "
                            f"tower (cdpruner) is not: {err}; add it later with: {retry}")
    return ExportResult(out, read_manifest(out) or manifest, table, text=text)


def export_text_only(model: str, out: Path | None = None, opset: int = DEFAULT_OPSET, int8: bool = False,
                     validate: bool = True, force: bool = False, text_tower: str | None = None) -> Any:
    """``--text-tower-only``: add (``force``: replace) the text tower of an existing bundle of ``model``,
    leaving its vision and language-model files as they are; the ``TextExport``. ``model`` is read
    too (its vision tensors only, from the hub cache for an alias): the CLIP checkpoint's vision
    weights are checked against them."""
    from export.clip_source import text_source
    from export.clip_text import export_text_tower
    from export.load import resolve_model

    log(f"resolving {model}")
    resolved = resolve_model(model)
    out = out or default_bundle_dir(resolved.spec.alias)
    source = text_source(model, resolved.spec.clip, resolved.path, text_tower)
    if source is None:
        raise InputError(f"no CLIP checkpoint known for {model}; pass --text-tower ID|PATH (the CLIP checkpoint "
                         "its vision tower came from, e.g. openai/clip-vit-large-patch14-336)")
    return export_text_tower(resolved, out, source, opset, int8, validate, force)


def _build(resolved, update: BundleUpdate, opset: int, int8: bool, validate: bool) -> tuple[dict, str]:
    """Trace (in a child), validate, (int8) and describe the graphs (a LLaVA-NeXT's image_newline.npz too)."""
    from export.llava_next import NEWLINE_FILE, check_anyres, save_image_newline
    from export.manifest import build_manifest, graph_io
    from export.onnx_export import quantize_int8
    from export.torch_stage import run_in_child
    from export.validate import check_graphs, checked_table, int8_report

    staging = update.folder
    traced = run_in_child(resolved.path, staging, opset, validate, STEPS)
    vc = traced.config.vision_config
    files: dict[str, str | None] = {"vision": "vision.onnx", "projector": "projector.onnx"}
    files.update({f"vision_data_{i}": name for i, name in enumerate(traced.vision_files) if name != "vision.onnx"})
    files.update({f"projector_data_{i}": name for i, name in enumerate(traced.projector_files)
                  if name != "projector.onnx"})
    if traced.image_newline is not None:
        save_image_newline(staging / NEWLINE_FILE, traced.image_newline, update.export_id)
        files["image_newline"] = NEWLINE_FILE
    validation: dict[str, Any] = {"performed": validate, "checks": []}
    table = ""
    if validate:
        log(f"[4/{STEPS}] validating onnxruntime against PyTorch")
        checks = check_graphs(traced.references, staging / "vision.onnx", staging / "projector.onnx", vc.image_size)
        if traced.anyres is not None:
            checks += check_anyres(traced.anyres, staging / "vision.onnx", staging / "projector.onnx",
                                   staging / NEWLINE_FILE)
        validation["checks"] = [c.to_json() for c in checks]
        table = checked_table(checks)
    else:
        log(f"[4/{STEPS}] validation skipped (--no-validate)")
    if int8:
        log("       quantising vision.int8.onnx (dynamic int8)")
        quantize_int8(staging / "vision.onnx", staging / "vision.int8.onnx")
        files["vision_int8"] = "vision.int8.onnx"
        files.update({f"vision_int8_data_{i}": p.name for i, p in
                      enumerate(sorted(staging.glob("vision.int8.onnx?*")))})
        validation["int8"] = int8_report(staging / "vision.onnx", staging / "vision.int8.onnx", vc.image_size)
    io = {"vision": graph_io(staging / "vision.onnx"), "projector": graph_io(staging / "projector.onnx")}
    return build_manifest(resolved, traced.config, traced.feature_layer, opset, files, io, validation), table


def install_vision(update: BundleUpdate, manifest: dict[str, Any]) -> None:
    """Commit the vision half staged in ``update.folder``: stamp every ONNX graph with the export
    id, name the files bundle-relative with their sizes, and keep the bundle's language model
    only if it was exported for the same model and width (else it is dropped, with a note)."""
    log(f"[5/{STEPS}] writing {update.out}")
    files = {role: update.name(update.folder / name) for role, name in manifest["files"].items() if name}
    for name in files.values():
        if name.endswith(".onnx"):
            stamp_onnx(update.out / name, update.export_id)
    manifest.update(files=files, export_id=update.export_id,
                    sizes={name: (update.out / name).stat().st_size for name in files.values()},
                    sha256={name: file_sha256(update.out / name) for name in files.values()})
    previous = read_manifest(update.out) or {}
    _keep_text_tower(previous, manifest, update.out)
    if isinstance(previous.get("llm"), dict):
        same = (previous.get("source") == manifest["source"]
                and (previous.get("vision") or {}).get("projector_dim") == manifest["vision"]["projector_dim"])
        if same:
            manifest["llm"] = previous["llm"]
        else:
            log("  note: the bundle's language model was exported for another model; it is removed "
                f"(run: python -m export.llm --model {manifest['source']['model']} --out {update.out})")
    update.commit(manifest)


def _keep_text_tower(previous: dict[str, Any], manifest: dict[str, Any], out: Path) -> None:
    """Carry the bundle's text tower into the new vision manifest when it was checked against the same
    vision weights (``vision_sha256``); otherwise it is dropped, with a note."""
    text = previous.get("text_tower")
    if not isinstance(text, dict):
        return
    fingerprint = manifest.get("vision_sha256")
    if fingerprint is not None and text.get("vision_sha256") == fingerprint:
        manifest["text_tower"] = text
    else:
        log("  note: the bundle's text tower (cdpruner) belongs to other vision weights; it is removed (add one: "
            f"python -m export.clip --model {manifest['source']['model']} --out {out} --text-tower-only)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m export.clip", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help=f"registry alias ({', '.join(known_aliases())}) or a local HF LLaVA checkpoint directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="bundle directory (default: $ENTROPRUNE_BUNDLES/NAME, else "
                             "~/.cache/entroprune/bundles/NAME; NAME = the alias or the checkpoint folder's name)")
    parser.add_argument("--opset", type=positive_int(MIN_OPSET, MAX_OPSET), default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: {DEFAULT_OPSET})")
    parser.add_argument("--int8", action="store_true",
                        help="also write vision.int8.onnx and text.int8.onnx (default: off)")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip the onnxruntime-vs-PyTorch validation (default: validate)")
    parser.add_argument("--force", action="store_true",
                        help="replace the export files in a non-empty --out (with --text-tower-only: its text tower)")
    text = parser.add_argument_group("text tower (the CLIP text side of the cdpruner strategy)")
    text.add_argument("--text-tower", default=None, metavar="ID|PATH",
                      help="CLIP checkpoint the vision tower came from, hub id or directory (default: the "
                           "registry's for an alias, e.g. openai/clip-vit-large-patch14-336; CHECKPOINT/clip for "
                           "a local checkpoint, skipped when absent)")
    text.add_argument("--no-text-tower", action="store_true",
                      help="export no text tower (cdpruner unavailable; default: export it)")
    text.add_argument("--text-tower-only", action="store_true",
                      help="export only the text tower into the existing bundle --out; its vision and language "
                           "model files are kept as they are (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_text_tower and (args.text_tower is not None or args.text_tower_only):
        parser.error("--no-text-tower does not go with --text-tower or --text-tower-only")

    def body() -> int:
        if args.text_tower_only:
            text = export_text_only(args.model, args.out, args.opset, args.int8, args.validate, args.force,
                                    args.text_tower)
            if text.table:
                print(text.table)
            print(f"text tower written to {text.out} (from {text.entry['source']})")
            return 0
        result = export_clip(args.model, args.out, args.opset, args.int8, args.validate, args.force,
                             args.text_tower, args.no_text_tower)
        if result.table:
            print(result.table)
        if result.text is not None and result.text.table:
            print(result.text.table)
        int8 = result.manifest["validation"].get("int8")
        if int8:
            print(f"int8: feature cosine {int8['feature_cosine']:.4f}, "
                  f"top-{int8['top_k']} CLS overlap {int8['cls_topk_overlap']}/{int8['top_k']}")
        name = f" (use --model {result.out.name})" if result.out.parent == bundles_home() else ""
        print(f"bundle written to {result.out}{name}")
        if result.text_error is not None:
            raise UserError(result.text_error)
        return 0

    return run_cli(body, "export.clip")


if __name__ == "__main__":
    raise SystemExit(main())
