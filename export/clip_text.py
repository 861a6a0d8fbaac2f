"""The text tower of a bundle (cdpruner, method.md §7): ``text.<export_id>/`` with ``text.onnx``,
``image_projection.onnx``, ``tokenizer.json`` (and ``text.int8.onnx`` with ``--int8``), validated
against PyTorch and committed as the manifest's ``text_tower`` in a bundle update of its own.

``export.clip`` runs it after the vision half is committed (so a failed CLIP download never loses
the vision export), and alone with ``--text-tower-only``. The CLIP checkpoint must be the one the
bundle's vision tower came from: its vision weights are compared with the LLaVA checkpoint's, and
the LLaVA's vision fingerprint with the one the bundle's vision export recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle_writer import BundleUpdate, bundle_update, read_manifest, stamp_onnx
from export.clip_source import resolve_clip, vision_fingerprint
from export.load import ResolvedModel
from runtime.bundle.check import file_sha256
from runtime.bundle.manifest import load_manifest
from runtime.cli import log
from runtime.errors import BundleError, InputError

PAD_ID = 0  # method.md §7.3 and the released CDPruner: question segments are right-padded with id 0
STEPS = 4
INT8_TEXT = "text.int8.onnx"
# text.int8.onnx is flagged (validation.int8.ok = false, one warning line) below this mean cosine to fp32
INT8_MIN_COSINE = 0.99


@dataclass(frozen=True)
class TextExport:
    """A committed text tower: the bundle, its manifest entry and the validation table."""

    out: Path
    entry: dict[str, Any]  # manifest["text_tower"]
    table: str


def export_text_tower(resolved: ResolvedModel, out: Path, source: str, opset: int, int8: bool = False,
                      validate: bool = True, force: bool = False) -> TextExport:
    """Export the CLIP checkpoint ``source`` (hub id or directory) as ``out``'s text tower.

    ``out`` must hold a vision export of ``resolved``'s weights; an existing text tower is replaced
    only with ``force``. The CLIP checkpoint is resolved (downloaded) before the bundle is locked.
    """
    manifest = _bundle_manifest(out, resolved.source)
    if manifest.get("text_tower") is not None and not force:
        raise InputError(f"{out} already has a text tower ({manifest['text_tower'].get('source')}); "
                         "pass --force to replace it")
    fingerprint = vision_fingerprint(resolved.path)
    _check_same_vision(manifest, fingerprint, resolved.source, out)
    log(f"[text 1/{STEPS}] resolving the CLIP checkpoint {source}")
    clip_dir = resolve_clip(source)
    with bundle_update(out, "text") as update:
        manifest = _bundle_manifest(out, resolved.source)  # as it is now that no one else writes
        _check_same_vision(manifest, fingerprint, resolved.source, out)
        origin = str(clip_dir.resolve()) if Path(source).expanduser().is_dir() else source
        entry, table = _build(update, resolved, clip_dir, opset, int8, validate)
        entry = {"source": origin, **entry, "vision_sha256": fingerprint}  # the manifest's field order
        manifest["text_tower"] = entry
        log(f"[text 4/{STEPS}] writing {out}")
        update.commit(manifest)
    return TextExport(out, entry, table)


def _bundle_manifest(out: Path, model: str) -> dict[str, Any]:
    """``out``'s manifest as a dict, after the runtime's own checks (a one-line BundleError when
    there is no bundle: the vision half is exported first)."""
    if not (out / "manifest.json").is_file():
        raise BundleError(f"no bundle at {out} to add a text tower to; export it first: "
                          f"python -m export.clip --model {model} --out {out}")
    load_manifest(out)
    data = read_manifest(out)
    if not data:
        raise BundleError(f"cannot read {out / 'manifest.json'}")
    return data


def _check_same_vision(manifest: dict[str, Any], fingerprint: str, model: str, out: Path) -> None:
    """Refuse a bundle whose vision export recorded other (or no) vision weights than ``model``'s."""
    recorded = manifest.get("vision_sha256")
    if recorded != fingerprint:
        why = ("records no fingerprint of its vision weights (exported before text towers, or not with a "
               "CLIP tower)" if recorded is None else f"was exported from other vision weights than {model}'s")
        raise InputError(f"bundle {out} {why}; re-export it: python -m export.clip --model {model} --out {out} --force")


def _vision_features(out: Path) -> dict[str, np.ndarray]:
    """Validation inputs of image_projection.onnx: block f's features of the bundle's own vision.onnx
    on a smooth pattern ([N, D]) and a few seeded noise rows at 3× scale."""
    from export.validate import run_onnx, validation_inputs

    manifest = load_manifest(out)
    pixels = validation_inputs(manifest.vision.image_size)["pattern-b1"]
    features = run_onnx(manifest.path("vision"), {"pixel_values": pixels})["features"][0]
    noise = 3 * np.random.default_rng(0).standard_normal((5, manifest.vision.hidden_size)).astype(np.float32)
    return {"vision-pattern": features, "noise-5": noise}


def _build(update: BundleUpdate, resolved: ResolvedModel, clip_dir: Path, opset: int, int8: bool,
           validate: bool) -> tuple[dict[str, Any], str]:
    """Trace, validate, (int8), stamp and describe the staged files: the manifest entry (all but
    ``source`` and ``vision_sha256``) and the table."""
    from export.text_tower import IMAGE_ONNX, TEXT_ONNX, TOKENIZER, run_text_stage
    from export.validate import checked_table

    log(f"[text 2/{STEPS}] loading {clip_dir}")
    features = _vision_features(update.out) if validate else {}
    stage = run_text_stage(clip_dir, resolved.path, update.folder, opset, PAD_ID, validate, features)
    validation: dict[str, Any] = {"performed": validate, "checks": [], "vision_weights": stage.vision_check}
    table = ""
    if validate:
        log(f"[text 3/{STEPS}] validating onnxruntime against PyTorch")
        checks = check_text_graphs(stage, update.folder)
        validation["checks"] = [c.to_json() for c in checks]
        table = checked_table(checks, "text tower validation")
    else:
        log(f"[text 3/{STEPS}] validation skipped (--no-validate)")
    files = {"text": TEXT_ONNX, "image_projection": IMAGE_ONNX, "tokenizer": TOKENIZER}
    files.update({f"text_data_{i}": n for i, n in enumerate(stage.text_files) if n != TEXT_ONNX})
    files.update({f"image_projection_data_{i}": n for i, n in enumerate(stage.image_files) if n != IMAGE_ONNX})
    if int8:
        validation["int8"] = _quantize(update.folder, stage, files)
    names = {role: update.name(update.folder / name) for role, name in files.items()}
    for name in names.values():
        if name.endswith(".onnx"):
            stamp_onnx(update.out / name, update.export_id)
    entry = {
        "export_id": update.export_id, "files": names,
        "sizes": {n: (update.out / n).stat().st_size for n in names.values()},
        "sha256": {n: file_sha256(update.out / n) for n in names.values()},
        "max_positions": stage.max_positions, "projection_dim": stage.projection_dim,
        "hidden_size": stage.hidden_size, "pad_id": PAD_ID, "validation": validation,
    }
    return entry, table


def check_text_graphs(stage: Any, folder: Path) -> list[Any]:
    """The runtime's tokens and both graphs against the references of :func:`run_text_stage`
    (token ids exactly; embeddings within export.validate.TOLERANCES), one session at a time."""
    from export.text_tower import IMAGE_ONNX, TEXT_ONNX, TOKENIZER, VALIDATION_QUESTIONS
    from export.validate import Check, compare, onnx_session, run_session
    from runtime.clip_text import load_tokenizer, tokenize_question

    tokenizer = load_tokenizer(folder / TOKENIZER, "re-run the export")
    checks: list[Check] = []
    text = onnx_session(folder / TEXT_ONNX)
    for case, ref in stage.references.items():
        tokens = tokenize_question(tokenizer, VALIDATION_QUESTIONS[case], stage.max_positions, PAD_ID)
        same = tokens.input_ids.shape == ref["input_ids"].shape
        wrong = int((tokens.input_ids != ref["input_ids"]).sum() + (tokens.attention_mask != ref["attention_mask"])
                    .sum()) if same else None
        checks.append(Check("tokenizer", case, "input_ids", list(ref["input_ids"].shape),
                            list(tokens.input_ids.shape), None if wrong is None else float(wrong), 0.0, wrong == 0))
        feeds = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
        checks += compare("text", case, {"text_embeds": ref["text_embeds"]}, run_session(text, feeds))
    del text
    image = onnx_session(folder / IMAGE_ONNX)
    for case, ref in stage.image_references.items():
        got = run_session(image, {"features": ref["features"]})
        checks += compare("image_proj", case, {"image_embeds": ref["image_embeds"]}, got)
    return checks


def _quantize(folder: Path, stage: Any, files: dict[str, str]) -> dict[str, Any]:
    """Write text.int8.onnx (dynamic int8) into ``files``; its mean cosine to fp32 on the validation
    questions, flagged below INT8_MIN_COSINE (one warning line)."""
    from export.onnx_export import quantize_int8
    from export.text_tower import TEXT_ONNX, TOKENIZER, VALIDATION_QUESTIONS
    from export.validate import run_onnx
    from runtime.clip_text import load_tokenizer, tokenize_question

    log(f"       quantising {INT8_TEXT} (dynamic int8)")
    quantize_int8(folder / TEXT_ONNX, folder / INT8_TEXT)
    files["text_int8"] = INT8_TEXT
    files.update({f"text_int8_data_{i}": p.name for i, p in enumerate(sorted(folder.glob(f"{INT8_TEXT}?*")))})
    tokenizer = load_tokenizer(folder / TOKENIZER, "re-run the export")
    cosines = []
    for question in VALIDATION_QUESTIONS.values():
        tokens = tokenize_question(tokenizer, question, stage.max_positions, PAD_ID)
        feeds = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        a = run_onnx(folder / TEXT_ONNX, feeds)["text_embeds"].astype(np.float64)
        b = run_onnx(folder / INT8_TEXT, feeds)["text_embeds"].astype(np.float64)
        norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
        cosines += list((a * b).sum(-1) / norms)
    cosine = float(np.mean(cosines))
    ok = cosine >= INT8_MIN_COSINE
    if not ok:
        log(f"WARNING: {INT8_TEXT} is not a faithful int8 copy of {TEXT_ONNX}: mean text-embedding cosine "
            f"{cosine:.4f} (need >= {INT8_MIN_COSINE}); use the fp32 graph")
    return {"text_cosine": cosine, "min_text_cosine": INT8_MIN_COSINE, "ok": ok}
