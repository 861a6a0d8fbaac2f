"""The bundle manifest (``manifest.json``): what ``export.clip``/``export.llm`` wrote.

The runtime reads only manifests of :data:`SCHEMA`; anything else is refused with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import BundleError
from runtime.registry import PruningDefaults

SCHEMA = "entroprune.bundle/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class VisionInfo:
    """Geometry of the exported encoder."""

    num_layers: int  # L: blocks of the CLIP tower
    feature_layer: int  # f: the graph ends here (1..L)
    heads: int  # H
    hidden_size: int  # D
    head_dim: int  # D / H
    patch_size: int
    image_size: int  # S: the encoder's input side
    grid: int  # patches per side
    num_patches: int  # N = grid²
    projector_dim: int  # E: the projector's (and the language model's) width

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"vision.{name} must be a positive integer, got {value!r}")
        if self.num_patches != self.grid**2 or self.grid * self.patch_size != self.image_size:
            raise ValueError(f"vision geometry does not add up: grid {self.grid}, patch {self.patch_size}, "
                             f"image {self.image_size}, num_patches {self.num_patches}")
        if self.feature_layer > self.num_layers or self.heads * self.head_dim != self.hidden_size:
            raise ValueError(f"vision feature_layer {self.feature_layer} of {self.num_layers} blocks, "
                             f"{self.heads} heads x {self.head_dim} != hidden {self.hidden_size}")


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest; ``root`` is the bundle directory."""

    root: Path
    vision: VisionInfo
    preprocess: dict[str, Any]  # keyword arguments of runtime.preprocess.PreprocessConfig
    pruning: PruningDefaults
    entropyprune_layer: int  # P (method.md §2)
    chat_template: str
    files: dict[str, str]  # role -> file name in the bundle
    llm: dict[str, Any] | None  # written by export.llm; None before it ran
    data: dict[str, Any]  # the whole JSON, for reporting

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
            llm=data.get("llm"), data=data,
        )
        if manifest.llm is not None and not isinstance(manifest.llm, dict):
            raise TypeError(f"llm must be an object, got {type(manifest.llm).__name__}")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{path} is incomplete or malformed ({type(err).__name__}: {err})") from None
    sizes = data.get("sizes") if isinstance(data.get("sizes"), dict) else {}
    for role, name in manifest.files.items():
        bundle_file(root, name, role, sizes.get(name), repair_command(data, root, "export.clip"))
    return manifest


def source_model(data: dict[str, Any]) -> str:
    """The ``--model`` a bundle was exported from (``source.model``), or ``CHECKPOINT`` if unknown."""
    source = data.get("source", {}).get("model") if isinstance(data.get("source"), dict) else None
    return source if isinstance(source, str) and source else "CHECKPOINT"


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
