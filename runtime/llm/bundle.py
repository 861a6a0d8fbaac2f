"""Open a bundle's language model from ``manifest["llm"]`` (written by export.llm).

It is checked against the projector's output width, so a GGUF of another model is refused
with one line before anything is evaluated (``runtime.llm.probe.open_probe`` does the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle.entries import LlmInfo
from runtime.bundle.manifest import EXPORT_ID_KEY, MANIFEST, bundle_file, check_export_id, repair_command, source_model
from runtime.errors import BundleError
from runtime.llm.backend import LlamaBackend, projector_out_dim
from runtime.llm.gguf_header import check_hparams


def llm_info(root: Path, manifest: dict[str, Any]) -> LlmInfo:
    """``manifest["llm"]``, typed; a bundle without one, or with a malformed one, is a one-line
    BundleError naming the command that (re)writes it."""
    entry = manifest.get("llm")
    if entry is None:
        raise BundleError(f"bundle {root} has no language model; run: python -m export.llm "
                          f"--model {source_model(manifest)} --out {root}")
    try:
        return LlmInfo.from_json(entry)
    except (TypeError, ValueError) as err:
        raise BundleError(f"{root / MANIFEST}: the language model entry is malformed ({err}); "
                          f"{repair_command(manifest, root, 'export.llm')}") from None


def checked_gguf(root: Path, name: str, role: str, size: int, export_id: str | None,
                 manifest: dict[str, Any]) -> Path:
    """The bundle's GGUF ``name``: inside the bundle, of the recorded ``size`` and — unless
    ``export_id`` is None (a registered file) — carrying that export id in its header."""
    repair = repair_command(manifest, root, "export.llm")
    path = bundle_file(root, name, role, size, repair)
    if export_id is not None:
        check_export_id(path, check_hparams(path).get(EXPORT_ID_KEY), export_id, repair)
    return path


def checked_npz(root: Path, name: str, role: str, size: int, export_id: str, manifest: dict[str, Any],
                exporter: str = "export.llm") -> Path:
    """The bundle's ``.npz`` ``name``: inside the bundle, of the recorded ``size``, and holding
    ``export_id`` as its ``export_id`` member (read without unpickling anything); errors name
    ``exporter``'s command."""
    repair = repair_command(manifest, root, exporter)
    path = bundle_file(root, name, role, size, repair)
    try:
        with np.load(path, allow_pickle=False) as data:
            found = str(data["export_id"]) if "export_id" in data.files else None
    except (OSError, ValueError, EOFError) as err:
        raise BundleError(f"{path} is not a readable .npz ({err}); {repair}") from None
    check_export_id(path, found, export_id, repair)
    return path


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
    info = llm_info(root, manifest)
    path = checked_gguf(root, info.gguf, "llm", info.size, None if info.registered else info.export_id, manifest)
    return checked_width(LlamaBackend(path, **options), manifest)
