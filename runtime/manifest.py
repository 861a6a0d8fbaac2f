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
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from runtime.errors import BundleError
from runtime.model_registry import PruningDefaults

SCHEMA = "entroprune.bundle/2"
MANIFEST = "manifest.json"
EXPORT_ID_KEY = "entroprune.export_id"  # in every bundle file's own metadata


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


def _typed(cls: type, data: object, where: str, **nested: Callable[[object], Any]) -> Any:
    """``cls(**data)`` after checking that ``data`` has exactly ``cls``'s fields (those with a default
    may be absent: entries older exports wrote), each of its declared type (``int``: an integer >= 0,
    never a boolean; ``str``: non-empty). Fields in ``nested`` are parsed by their function instead.
    Raises TypeError naming the field."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be an object, got {type(data).__name__}")
    kinds = {f.name: f.type for f in fields(cls)}
    optional = {f.name for f in fields(cls) if f.default is not MISSING}
    unknown, missing = sorted(set(data) - set(kinds)), sorted(set(kinds) - set(data) - optional)
    if unknown or missing:
        raise TypeError(f"{where}: unknown fields {unknown}" if unknown else f"{where}: missing fields {missing}")
    values = {}
    for name, kind in kinds.items():
        if name not in data:
            continue
        value = data[name]
        if name in nested:
            values[name] = nested[name](value)
            continue
        if not _CHECKS[kind](value):
            raise TypeError(f"{where}.{name} must be {_WANTED[kind]}, got {value!r}")
        values[name] = value
    return cls(**values)


_CHECKS: dict[str, Callable[[object], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "str": lambda v: isinstance(v, str) and bool(v),
    "bool": lambda v: isinstance(v, bool),
    "any": lambda v: True,
}
_WANTED = {"int": "an integer >= 0", "str": "a non-empty string", "bool": "true or false", "any": "any value"}


@dataclass(frozen=True)
class FinalProbeInfo:
    """``manifest["llm"]["probe"]["final"]``: blocks 0..P-1 with the model's final norm (DART's H)."""

    gguf: str  # probe_final.gguf (bundle-relative path)
    size: int  # bytes
    sha256: str


@dataclass(frozen=True)
class ProbeInfo:
    """``manifest["llm"]["probe"]``: the EntropyPrune/FastV probe export.llm cut from the GGUF."""

    gguf: str  # probe.gguf: blocks 0..P-2 (bundle-relative path)
    weights: str  # probe_weights.npz: W_q/W_k of block P-1
    entropyprune_layer: int  # P
    layer: int  # P - 1
    dtype: str
    size: int  # bytes of gguf
    weights_size: int  # bytes of weights
    sha256: str
    weights_sha256: str
    final: FinalProbeInfo | None = None  # absent in bundles exported before DART (re-run export.llm)

    def __post_init__(self) -> None:
        if self.layer != self.entropyprune_layer - 1 or self.layer < 1:
            raise ValueError(f"llm.probe.layer {self.layer} must be entropyprune_layer - 1 "
                             f"({self.entropyprune_layer} - 1) and >= 1")


@dataclass(frozen=True)
class LlmInfo:
    """``manifest["llm"]``: the language model export.llm wrote (or registered)."""

    gguf: str  # bundle-relative path of the GGUF
    quant: str
    size: int  # bytes
    sha256: str
    n_embd: int
    n_vocab: int
    source: str  # the --model it was converted from, or the registered file's path
    export_id: str  # carried by probe.gguf, probe_weights.npz and (unless registered) the GGUF
    registered: bool  # True: --gguf linked a user's file, which carries no export id
    probe: ProbeInfo

    @classmethod
    def from_json(cls, data: object) -> LlmInfo:
        """The typed entry; TypeError/ValueError name the first bad field."""
        def final(entry: object) -> FinalProbeInfo:
            return _typed(FinalProbeInfo, entry, "llm.probe.final")

        return _typed(cls, data, "llm", probe=lambda probe: _typed(ProbeInfo, probe, "llm.probe", final=final))


TEXT_ROLES = ("text", "image_projection", "tokenizer")  # files every text tower has ("text_int8": --int8)


def _mapping(where: str, kind: str) -> Callable[[object], dict[str, Any]]:
    """Parser of a JSON object whose keys are non-empty strings and values of ``kind`` (see _CHECKS)."""
    def parse(value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be an object, got {type(value).__name__}")
        for key, item in value.items():
            if not _CHECKS["str"](key) or not _CHECKS[kind](item):
                raise TypeError(f"{where}[{key!r}] must be {_WANTED[kind]}, got {item!r}")
        return dict(value)

    return parse


@dataclass(frozen=True)
class TextTowerInfo:
    """``manifest["text_tower"]``: the CLIP text side of ``cdpruner`` (method.md §7) that
    ``export.clip`` wrote into ``text.<export_id>/``; None in the Manifest when absent."""

    source: str  # the CLIP checkpoint (hub id or local path) it was exported from
    export_id: str  # carried by its ONNX graphs' metadata_props
    files: dict[str, str]  # role (TEXT_ROLES, text_int8, external data) -> bundle-relative path
    sizes: dict[str, int]  # bundle-relative path -> bytes
    sha256: dict[str, str]  # bundle-relative path -> hex digest
    max_positions: int  # the text tower's positions (77): the length of one question segment
    projection_dim: int  # P: width of CLIP's joint space
    hidden_size: int  # D: width of the vision features image_projection.onnx takes
    pad_id: int  # right-padding id of question segments (method.md §7.3: 0)
    vision_sha256: str  # the LLaVA vision weights the CLIP checkpoint's were checked equal to
    validation: dict[str, Any]

    def __post_init__(self) -> None:
        missing = [role for role in TEXT_ROLES if role not in self.files]
        unrecorded = [n for n in self.files.values() if n not in self.sizes or n not in self.sha256]
        if missing or unrecorded:
            raise ValueError(f"text_tower.files lacks roles {missing}" if missing
                             else f"text_tower records no size/sha256 of {unrecorded}")
        if min(self.max_positions, self.projection_dim, self.hidden_size) < 1:
            raise ValueError("text_tower.max_positions, projection_dim and hidden_size must be >= 1")

    @classmethod
    def from_json(cls, data: object) -> TextTowerInfo:
        """The typed entry; TypeError/ValueError name the first bad field."""
        return _typed(cls, data, "text_tower", files=_mapping("text_tower.files", "str"),
                      sizes=_mapping("text_tower.sizes", "int"), sha256=_mapping("text_tower.sha256", "str"),
                      validation=_mapping("text_tower.validation", "any"))


FAMILIES = ("llava-1.5", "llava-next")


@dataclass(frozen=True)
class AnyresInfo:
    """``manifest["anyres"]`` (LLaVA-NeXT, method.md §5): how an image becomes tiles."""

    image_grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) resolutions in pixels
    crop_size: int  # S: a tile's side, the encoder's input side
    patch_size: int
    shortest_edge: int

    @classmethod
    def from_json(cls, data: object) -> AnyresInfo:
        """The typed entry; TypeError/ValueError name the first bad field."""
        def pinpoints(value: object) -> tuple[tuple[int, int], ...]:
            ok = isinstance(value, list) and value and all(
                isinstance(p, list) and len(p) == 2 and all(_CHECKS["int"](v) and v > 0 for v in p) for p in value)
            if not ok:
                raise TypeError(f"anyres.image_grid_pinpoints must be a list of [height, width] pairs, got {value!r}")
            return tuple((int(h), int(w)) for h, w in value)

        info = _typed(cls, data, "anyres", image_grid_pinpoints=pinpoints)
        if min(info.crop_size, info.patch_size, info.shortest_edge) < 1 or info.crop_size % info.patch_size:
            raise ValueError(f"anyres: crop_size {info.crop_size} must be a positive multiple of patch_size "
                             f"{info.patch_size}, shortest_edge >= 1")
        return info


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
            if not _CHECKS["int"](sizes.get(name)):
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
