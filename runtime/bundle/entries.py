"""The typed entries of a bundle's ``manifest.json`` (:mod:`runtime.bundle.manifest` reads the whole):
the encoder's geometry, the language model and its probes, the CLIP text tower, LLaVA-NeXT's
tiling. Each ``from_json`` checks every field's type and names the first bad one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any


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
        if not VALUE_CHECKS[kind](value):
            raise TypeError(f"{where}.{name} must be {_WANTED[kind]}, got {value!r}")
        values[name] = value
    return cls(**values)


VALUE_CHECKS: dict[str, Callable[[object], bool]] = {
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
    """Parser of a JSON object whose keys are non-empty strings and values of ``kind`` (see VALUE_CHECKS)."""
    def parse(value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be an object, got {type(value).__name__}")
        for key, item in value.items():
            if not VALUE_CHECKS["str"](key) or not VALUE_CHECKS[kind](item):
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
                isinstance(p, list) and len(p) == 2 and all(VALUE_CHECKS["int"](v) and v > 0 for v in p) for p in value)
            if not ok:
                raise TypeError(f"anyres.image_grid_pinpoints must be a list of [height, width] pairs, got {value!r}")
            return tuple((int(h), int(w)) for h, w in value)

        info = _typed(cls, data, "anyres", image_grid_pinpoints=pinpoints)
        if min(info.crop_size, info.patch_size, info.shortest_edge) < 1 or info.crop_size % info.patch_size:
            raise ValueError(f"anyres: crop_size {info.crop_size} must be a positive multiple of patch_size "
                             f"{info.patch_size}, shortest_edge >= 1")
        return info
