"""Open a bundle's language model from ``manifest["llm"]`` (written by export.llm).

It is checked against the projector's output width, so a GGUF of another model is refused
with one line before anything is evaluated (``runtime.probe.open_probe`` does the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.errors import BundleError
from runtime.llm import LlamaBackend, projector_out_dim
from runtime.manifest import bundle_file, repair_command, source_model


def llm_entry(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest["llm"]``; a bundle without one is a one-line BundleError."""
    entry = manifest.get("llm")
    if not isinstance(entry, dict) or "gguf" not in entry:
        raise BundleError(f"bundle {root} has no language model; run: python -m export.llm "
                          f"--model {source_model(manifest)} --out {root}")
    return entry


def checked_width(backend: LlamaBackend, manifest: dict[str, Any]) -> LlamaBackend:
    """``backend`` if its n_embd equals the manifest's projector width (closed and refused if not)."""
    width = projector_out_dim(manifest)
    if width is not None:
        try:
            backend.check_n_embd(width)
        except BundleError:
            backend.close()
            raise
    return backend


def open_language_model(root: str | Path, manifest: dict[str, Any], **options: Any) -> LlamaBackend:
    """The bundle's GGUF in a :class:`LlamaBackend` (``options``: its keyword arguments)."""
    root = Path(root)
    entry = llm_entry(root, manifest)
    path = bundle_file(root, entry["gguf"], "llm", entry.get("size"), repair_command(manifest, root, "export.llm"))
    return checked_width(LlamaBackend(path, **options), manifest)
