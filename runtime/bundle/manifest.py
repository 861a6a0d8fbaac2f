"""The bundle manifest (``manifest.json``): what ``export.clip``/``export.llm`` wrote.

The runtime reads only manifests of :data:`SCHEMA`; anything else is refused with one line.

Layout (schema 2): each export writes its files into a folder of its own named after its
export id — ``vision.<id>/`` (export.clip: vision.onnx, projector.onnx, vision.int8.onnx),
``text.<id>/`` (export.clip's text tower for cdpruner: text.onnx, image_projection.onnx,
tokenizer.json) and ``llm.<id>/`` (export.llm: the GGUF, probe.gguf, probe_weights.npz) — and then replaces
``manifest.json``, which names them. The manifest is the bundle's only commit point, so a
reader sees the old bundle or the new one, never a mix (see :mod:`export.bundle_writer`). Every
file carries its export id in its own metadata (ONNX ``metadata_props``, a GGUF key, an npz
array under :data:`EXPORT_ID_KEY`); the runtime compares it and the size with the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle.entries import (
    FAMILIES,
    VALUE_CHECKS,
    AnyresInfo,
    LlmInfo,
    TextTowerInfo,
    VisionInfo,
)
from runtime.errors import BundleError
from runtime.model_registry import PruningDefaults

SCHEMA = "entroprune.bundle/2"
MANIFEST = "manifest.json"
EXPORT_ID_KEY = "entroprune.export_id"  # in every bundle file's own metadata


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest; ``root`` is the bundle directory."""

    root: Path
    vision: VisionInfo
    preprocess: dict[str, Any]  # keyword arguments of runtime.preprocess.PreprocessConfig
    pruning: PruningDefaults
    entropyprune_layer: int  # P (method.md §2)
    chat_template: str
    files: dict[str, str]  # role -> bundle-relative path (inside vision.<export_id>/)
    export_id: str  # export.clip's id, carried by every vision file's metadata
    llm: LlmInfo | None  # written by export.llm; None before it ran
    text_tower: TextTowerInfo | None  # written by export.clip unless --no-text-tower; None when absent
    data: dict[str, Any]  # the whole JSON, for reporting
    family: str = "llava-1.5"  # one of FAMILIES (absent in bundles written before LLaVA-NeXT: 1.5)
    anyres: AnyresInfo | None = None  # LLaVA-NeXT's tiling; None for LLaVA-1.5

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if (self.family == "llava-next") != (self.anyres is not None):
            raise ValueError(f"a {self.family} bundle {'needs' if self.anyres is None else 'has no'} anyres entry")

    def path(self, role: str) -> Path:
        """The bundle file for ``role`` (``vision``, ``vision_int8``, ``projector``)."""
        name = self.files.get(role)
        if not name:
            raise BundleError(f"bundle {self.root} has no {role} file (re-run the export)")
        return self.root / name


def load_manifest(bundle: str | Path) -> Manifest:
    """Read and check ``bundle/manifest.json`` and that the files it names exist."""
    root = Path(bundle).expanduser()
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"no bundle directory at {root} (run: python -m export.clip --model ALIAS --out {root})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root} has no {MANIFEST}; is it a bundle written by export.clip?") from None
    except RecursionError:
        raise BundleError(f"cannot read {path}: nested too deeply to be a manifest") from None
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {path}: {err}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise BundleError(f"{path} has schema {schema!r}; this runtime reads {SCHEMA!r} (re-export the bundle)")
    try:
        manifest = Manifest(
            root=root, vision=VisionInfo(**data["vision"]), preprocess=dict(data["preprocess"]),
            pruning=PruningDefaults.from_json(data["pruning"]),
            entropyprune_layer=int(data["entropyprune_layer"]), chat_template=data["chat_template"],
            files={k: v for k, v in data["files"].items() if isinstance(v, str)},
            export_id=_export_id(data.get("export_id")),
            llm=None if data.get("llm") is None else LlmInfo.from_json(data["llm"]),
            text_tower=None if data.get("text_tower") is None else TextTowerInfo.from_json(data["text_tower"]),
            data=data, family=data.get("family", "llava-1.5"),
            anyres=None if data.get("anyres") is None else AnyresInfo.from_json(data["anyres"]),
        )
        _check_preprocess(manifest)
        sizes = data["sizes"]
        for role, name in manifest.files.items():
            bundle_file(root, name, role, sizes.get(name), repair_command(data, root, "export.clip"))
            if not VALUE_CHECKS["int"](sizes.get(name)):
                raise TypeError(f"sizes[{name!r}] must be an integer >= 0, got {sizes.get(name)!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{path} is incomplete or malformed ({type(err).__name__}: {err})") from None
    return manifest


def _check_preprocess(manifest: Manifest) -> None:
    """``preprocess`` must build a PreprocessConfig (known keys, sane constants) whose crop side is
    the encoder's input side; TypeError/ValueError otherwise."""
    from runtime.preprocess import PreprocessConfig

    if not isinstance(manifest.preprocess, dict):
        raise TypeError("preprocess must be an object")
    try:
        config = PreprocessConfig(**manifest.preprocess)
    except TypeError as err:
        raise TypeError(f"preprocess: {err}".replace("PreprocessConfig.__init__() ", "")) from None
    except ValueError as err:
        raise ValueError(f"preprocess.{err}") from None
    if config.crop_size != manifest.vision.image_size:
        raise ValueError(f"preprocess.crop_size {config.crop_size} is not the encoder's input side "
                         f"vision.image_size {manifest.vision.image_size}")


def _export_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"export_id must be a non-empty string, got {value!r}")
    return value


def check_export_id(path: Path, found: object, expected: str, repair: str) -> None:
    """Refuse (one line) a bundle file whose own export id (``found``, read from its metadata)
    is not the manifest's ``expected``: a file another export left or put there."""
    if found != expected:
        what = "carries no export id" if found is None else f"is from export {found}"
        raise BundleError(f"{path} {what} but the manifest records export {expected} "
                          f"(a file of another export); {repair}")


def source_model(data: dict[str, Any]) -> str:
    """The ``--model`` a bundle was exported from (``source.model``), or ``CHECKPOINT`` if unknown."""
    source = data.get("source", {}).get("model") if isinstance(data.get("source"), dict) else None
    return source if isinstance(source, str) and source else "CHECKPOINT"


def text_tower_command(data: dict[str, Any], root: Path, force: bool = False) -> str:
    """The command that (re)writes only a bundle's text tower: ``python -m export.clip --model M --out
    ROOT --text-tower-only`` (``--force`` to replace an existing one)."""
    return f"python -m export.clip --model {source_model(data)} --out {root} --text-tower-only" + " --force" * force


def repair_command(data: dict[str, Any], root: Path, exporter: str) -> str:
    """The command that rewrites a bundle's files: ``exporter`` with the model it was made from."""
    return f"re-run: python -m {exporter} --model {source_model(data)} --out {root} --force"


def bundle_file(root: Path, name: object, role: str, size: object = None, repair: str = "re-run the export") -> Path:
    """The bundle's file ``name`` (for ``role``): a relative path that resolves inside ``root``, an
    existing file, and — when the manifest recorded one — of the recorded size.

    A path leading outside the bundle is refused before anything is looked up there (the error
    never tells whether such a file exists); a size that differs means another export's file.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise BundleError(f"bundle {root}: the {role} file {name!r} in the manifest is not a name inside the bundle")
    path = root / name
    if root.resolve() not in path.resolve().parents:
        raise BundleError(f"bundle {root}: the {role} file {name!r} leads outside the bundle; refused")
    if not path.is_file():
        raise BundleError(f"bundle {root} is missing {name} ({role}); {repair}")
    actual = path.stat().st_size
    if isinstance(size, int) and not isinstance(size, bool) and actual != size:
        raise BundleError(f"bundle {root}: {name} is {actual} bytes but the manifest records {size} "
                          f"(a file of another export); {repair}")
    return path
