"""``runtime.prune --check``: every bundle file against the sha256 its export recorded.

Loading a bundle checks what is cheap (each file inside the bundle, its size, the export id in
its metadata); this reads every byte, so a file changed in place — one byte of a GGUF, a graph
edited to the same size — is found too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle.manifest import Manifest, bundle_file, repair_command
from runtime.cli import log
from runtime.errors import BundleError

CHUNK = 1 << 20
TEXT_EXPORTER = "export.clip --text-tower-only"  # rewrites the text tower alone


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """One bundle file: what the manifest recorded and what is on disk."""

    name: str  # bundle-relative path
    role: str  # vision, projector, ..., llm, probe, probe weights
    exporter: str  # the command that rewrites it: export.clip or export.llm
    recorded: str | None  # sha256 in the manifest (None: not recorded)
    actual: str

    @property
    def ok(self) -> bool:
        return self.recorded is not None and self.recorded == self.actual


@dataclass(frozen=True)
class Recorded:
    """What the manifest records of one file."""

    name: str  # bundle-relative path
    role: str
    exporter: str  # the command that rewrites it: export.clip, export.llm or TEXT_EXPORTER
    size: int  # bytes
    sha256: str | None  # None: not recorded


def recorded_files(manifest: Manifest) -> list[Recorded]:
    """Every file the manifest names, with its recorded size and sha256."""
    hashes = manifest.data.get("sha256") if isinstance(manifest.data.get("sha256"), dict) else {}
    rows = [Recorded(name, role, "export.clip", manifest.data["sizes"][name], hashes.get(name))
            for role, name in manifest.files.items()]
    llm = manifest.llm
    if llm is not None:
        probe = llm.probe
        rows += [Recorded(llm.gguf, "llm", "export.llm", llm.size, llm.sha256),
                 Recorded(probe.gguf, "probe", "export.llm", probe.size, probe.sha256),
                 Recorded(probe.weights, "probe weights", "export.llm", probe.weights_size, probe.weights_sha256)]
        if probe.final is not None:
            rows.append(Recorded(probe.final.gguf, "final probe", "export.llm", probe.final.size, probe.final.sha256))
    text = manifest.text_tower
    if text is not None:  # rewritten alone by export.clip --text-tower-only
        rows += [Recorded(name, f"text tower {role}", TEXT_EXPORTER, text.sizes[name], text.sha256[name])
                 for role, name in text.files.items()]
    return rows


def check_bundle(manifest: Manifest) -> list[FileCheck]:
    """Hash every file of the bundle (progress on stderr); the per-file results."""
    checks = []
    for r in recorded_files(manifest):
        repair = repair_command(manifest.data, manifest.root, r.exporter)
        path = bundle_file(manifest.root, r.name, r.role, r.size, repair)
        log(f"  sha256 {r.name} ({r.size / 1e9:.2f} GB)")
        recorded = r.sha256 if isinstance(r.sha256, str) else None
        checks.append(FileCheck(r.name, r.role, r.exporter, recorded, file_sha256(path)))
    return checks


def check_table(checks: list[FileCheck]) -> str:
    """A markdown table: file | role | sha256 | ok."""
    lines = ["| file | role | sha256 | ok |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {c.role} | {c.actual[:16]}… | {'✓' if c.ok else '✗'} |")
    return "\n".join(lines)


def require_intact(manifest: Manifest, checks: list[FileCheck]) -> None:
    """A one-line BundleError naming every file that differs from its export, with the repair."""
    bad = [c for c in checks if not c.ok]
    if not bad:
        return
    names = ", ".join(f"{c.name} ({'no sha256 recorded' if c.recorded is None else 'changed'})" for c in bad)
    repairs = " and ".join(sorted({repair_command(manifest.data, manifest.root, c.exporter) for c in bad}))
    raise BundleError(f"bundle {manifest.root}: {names} differ from what the export wrote; {repairs}")
