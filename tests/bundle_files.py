"""Where a test finds a bundle's files: they live in per-export folders named by the manifest."""

from __future__ import annotations

import json
from pathlib import Path

LLM_ROLES = {"llm": ("gguf",), "probe": ("probe", "gguf"), "probe_weights": ("probe", "weights")}


def member(bundle: Path, role: str) -> Path:
    """The file of ``role`` in ``bundle``: a ``files`` role of export.clip (``vision``,
    ``projector``, ``vision_int8``) or one of export.llm's (``llm``, ``probe``, ``probe_weights``)."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    if role in LLM_ROLES:
        entry = manifest["llm"]
        for key in LLM_ROLES[role]:
            entry = entry[key]
        return bundle / entry
    return bundle / manifest["files"][role]
