"""All-or-nothing bundle updates: stage one half of a bundle in its own folder, then commit by
replacing ``manifest.json``.

A bundle has three halves, each written by one update: ``vision`` and ``text`` (export.clip; the
text tower of cdpruner in an update of its own, so that ``--text-tower-only`` can add or replace it
alone) and ``llm`` (export.llm). An update of one half

1. takes the bundle's writer lock (``.export.lock``, held by the OS: released when the process
   dies, even by kill -9), so a second export into the same bundle is refused with one line;
2. removes what killed exports left (half folders the manifest does not name, temporaries);
3. writes every new file into ``<half>.<export_id>/``, a folder nothing refers to yet;
4. commits by atomically replacing ``manifest.json`` with one that names the new folder;
5. then deletes the files the new manifest no longer names (the previous folder of that half,
   and files of the older flat layout).

Before step 4 the bundle is the old one, untouched; from step 4 on it is the new one. A kill
at any moment therefore leaves the old bundle or the new one, and step 2 of the next run
cleans up after it, saying how much it freed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from export.diskspace import clean_stale, remove_path
from runtime.atomic import write_json_atomic
from runtime.bundle.manifest import EXPORT_ID_KEY, MANIFEST
from runtime.cli import log
from runtime.errors import InputError

LOCK = ".export.lock"
HALVES = ("vision", "text", "llm")
_HALF_FOLDER = re.compile(r"^(vision|text|llm)\.\d{8}T\d{6}Z-[0-9a-f]{6}$")
# files of the flat layout written before export ids (schema 1); removed once nothing names them
_FLAT_FILES = re.compile(r"^(vision(\.int8)?|projector)\.onnx.*$|"
                         r"^llm-[a-z0-9_]+\.gguf$|^probe\.gguf$|^probe_weights\.npz$")


def new_export_id() -> str:
    """``YYYYMMDDTHHMMSSZ-xxxxxx``: UTC time of the export plus 24 random bits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class BundleUpdate:
    """One half being written: its export id and the staging folder inside the bundle."""

    out: Path  # the bundle directory
    half: str  # one of HALVES
    export_id: str

    @property
    def folder(self) -> Path:
        """``out/<half>.<export_id>``: where every new file of this half is written."""
        return self.out / f"{self.half}.{self.export_id}"

    def name(self, path: Path) -> str:
        """The manifest's (bundle-relative, '/'-separated) name of a file in :attr:`folder`."""
        return path.relative_to(self.out).as_posix()

    def commit(self, manifest: dict[str, Any]) -> None:
        """Replace ``manifest.json`` (the commit point), then delete what it no longer names."""
        write_json_atomic(self.out / MANIFEST, manifest)
        remove_unreferenced(self.out, manifest)


@contextmanager
def bundle_update(out: Path, half: str) -> Iterator[BundleUpdate]:
    """Hold ``out``'s writer lock and a fresh staging folder for ``half``; the folder is removed
    unless :meth:`BundleUpdate.commit` made the manifest name it."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"another export is writing {out} right now (it holds {out / LOCK}); "
                         "wait for it to finish, or use another --out") from None
    try:
        current = read_manifest(out)
        if current is None:  # unreadable: nothing can be told unused, so nothing is removed now
            log(f"  note: {out / MANIFEST} is unreadable; old files are removed only once this export commits")
        else:
            remove_unreferenced(out, current)
        update = BundleUpdate(out, half, new_export_id())
        update.folder.mkdir()
        try:
            yield update
        finally:
            if update.folder.name not in referenced_folders(read_manifest(out) or {}):
                shutil.rmtree(update.folder, ignore_errors=True)
    finally:
        lock.release()


def read_manifest(out: Path) -> dict[str, Any] | None:
    """``out/manifest.json`` as a dict: {} when there is none (nothing is referenced), None when
    it exists but cannot be read as a JSON object (what it references is unknown)."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def referenced_names(manifest: dict[str, Any]) -> set[str]:
    """Every bundle-relative file name the manifest refers to (every half)."""
    files = manifest.get("files")
    names = {v for v in files.values() if isinstance(v, str)} if isinstance(files, dict) else set()
    llm = manifest.get("llm")
    if isinstance(llm, dict):
        names.add(llm.get("gguf"))
        probe = llm.get("probe")
        if isinstance(probe, dict):
            names.update((probe.get("gguf"), probe.get("weights")))
    text = manifest.get("text_tower")
    if isinstance(text, dict) and isinstance(text.get("files"), dict):
        names.update(text["files"].values())
    return {n for n in names if isinstance(n, str)}


def referenced_folders(manifest: dict[str, Any]) -> set[str]:
    """First path components of :func:`referenced_names` (the half folders in use)."""
    return {name.split("/", 1)[0] for name in referenced_names(manifest)}


def remove_unreferenced(out: Path, manifest: dict[str, Any]) -> int:
    """Delete half folders and flat-layout files of ``out`` that ``manifest`` does not name, and
    temporaries of dead processes; say what was freed. Call only while holding the lock."""
    in_use = referenced_folders(manifest)
    freed = clean_stale(out)
    for path in sorted(out.iterdir()):
        kept = path.name in in_use
        ours = (_HALF_FOLDER.match(path.name) and path.is_dir()) or (_FLAT_FILES.match(path.name) and path.is_file())
        if not kept and ours:
            freed += remove_path(path, "that is no longer part of the bundle")
    return freed


def stamp_onnx(path: Path, export_id: str) -> None:
    """Record ``export_id`` in the ONNX graph's ``metadata_props`` (external data untouched)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != EXPORT_ID_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=EXPORT_ID_KEY, value=export_id)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.stamp.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
