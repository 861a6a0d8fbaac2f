"""The model registry: one JSON spec per alias in ``models/`` (data, not code).

Torch-free so that both the exporter and the runtime can resolve an alias.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from runtime.errors import BundleError, ModelNotFoundError

IMAGE_MODES = ("pad", "crop")
FAMILIES = ("llava-1.5", "llava-next")  # llava-next: LLaVA-NeXT / 1.6 "anyres" tiles (method.md §5)


@dataclass(frozen=True)
class PruningDefaults:
    """Defaults of the entropy-adaptive method (method.md §1), layers numbered 1..L."""

    shallow: tuple[int, int] = (6, 8)  # inclusive range searched for argmax H
    deep: tuple[int, int] = (20, 21)  # inclusive range searched for argmin H
    p_shallow: float = 0.4
    rule: str = "max-min"
    merge: str = "mean"

    def __post_init__(self) -> None:
        for name in ("shallow", "deep"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} range must satisfy 1 <= lo <= hi, got {(lo, hi)}")
        if not 0.0 <= self.p_shallow <= 1.0:
            raise ValueError(f"p_shallow must be in [0, 1], got {self.p_shallow}")

    def to_json(self) -> dict[str, Any]:
        return {"shallow": list(self.shallow), "deep": list(self.deep),
                "p_shallow": self.p_shallow, "rule": self.rule, "merge": self.merge}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruningDefaults:
        return cls(shallow=tuple(data["shallow"]), deep=tuple(data["deep"]),
                   p_shallow=float(data["p_shallow"]), rule=data["rule"], merge=data["merge"])


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry (``models/<alias>.json``)."""

    alias: str
    repo_id: str
    revision: str
    vision_feature_layer: int
    image_mode: str
    chat_template: str
    pruning: PruningDefaults
    entropyprune_layer: int  # P: image tokens are cut before LLM layer P (method.md §2)
    gguf_quant: str = "q4_k_m"
    clip: str | None = None  # hub id of the CLIP checkpoint the vision tower came from (cdpruner's text side)
    family: str = "llava-1.5"  # one of FAMILIES; specs written before LLaVA-NeXT have no "family"

    def __post_init__(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "llava-next" and self.image_mode != "crop":
            raise ValueError(f"llava-next tiles are never padded to a square: image_mode must be 'crop', "
                             f"got {self.image_mode!r}")
        if self.entropyprune_layer < 1:
            raise ValueError(f"entropyprune_layer must be >= 1, got {self.entropyprune_layer}")
        if self.clip is not None and (not isinstance(self.clip, str) or not self.clip):
            raise ValueError(f"clip must be a hub id or null, got {self.clip!r}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            alias=data["alias"], repo_id=data["repo_id"], revision=data["revision"],
            vision_feature_layer=int(data["vision_feature_layer"]), image_mode=data["image_mode"],
            chat_template=data["chat_template"], pruning=PruningDefaults.from_json(data["pruning"]),
            entropyprune_layer=int(data["entropyprune_layer"]),
            gguf_quant=data.get("gguf", {}).get("quant", "q4_k_m"), clip=data.get("clip"),
            family=data.get("family", "llava-1.5"),
        )


def known_aliases() -> list[str]:
    """Every alias with a spec in ``models/``, sorted."""
    return sorted(p.name[:-5] for p in resources.files("models").iterdir() if p.name.endswith(".json"))


def load_spec(alias: str) -> ModelSpec:
    """The spec of ``alias``; an unknown alias names the known ones in one line."""
    if alias not in known_aliases():
        raise ModelNotFoundError(
            f"unknown model {alias!r}; known aliases: {', '.join(known_aliases())} "
            "(or pass a local path to a Hugging Face LLaVA checkpoint)"
        )
    text = resources.files("models").joinpath(f"{alias}.json").read_text(encoding="utf-8")
    return ModelSpec.from_json(json.loads(text))


def is_local_path(model: str) -> bool:
    """True when ``model`` names something on disk rather than a registry alias."""
    return Path(model).expanduser().exists() or "/" in model or model.startswith(".")


BUNDLES_ENV = "ENTROPRUNE_BUNDLES"  # overrides where bundles are written and found by name
MANIFEST_NAME = "manifest.json"


def bundles_home() -> Path:
    """The user data folder holding bundles by name: ``$ENTROPRUNE_BUNDLES``, else
    ``$XDG_CACHE_HOME/entroprune/bundles`` (``~/.cache/entroprune/bundles``) — never inside
    site-packages, so an installed package stays read-only and bundles survive upgrades."""
    override = os.environ.get(BUNDLES_ENV)
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "entroprune" / "bundles"


def default_bundle_dir(name: str) -> Path:
    """Where the exporters write the bundle of ``name`` (an alias, or a local checkpoint's folder name)."""
    return bundles_home() / name


def is_bundle_name(model: str) -> bool:
    """True when ``model`` can be a bundle name (no path separators, not ``.``/``~``-relative)."""
    return bool(model) and "/" not in model and "\\" not in model and not model.startswith((".", "~"))


def bundle_path(model: str) -> Path:
    """The bundle directory for the runtime's ``--model``: a directory holding a manifest, else
    a bundle of that name in :func:`bundles_home`; neither is a one-line error naming the command
    that makes it."""
    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return path
    named = default_bundle_dir(model) if is_bundle_name(model) else None
    if named is not None and named.is_dir():
        return named
    if path.is_dir() or named is None:
        return path  # load_manifest says what is wrong with it
    if model in known_aliases():
        command = f"python -m export.clip --model {model} && python -m export.llm --model {model}"
    else:
        command = f"python -m export.clip --model /path/to/{model} (the checkpoint folder named {model!r})"
    found = sorted(p.name for p in bundles_home().iterdir() if p.is_dir()) if bundles_home().is_dir() else []
    raise BundleError(
        f"no bundle named {model!r} in {bundles_home()} (found: {', '.join(found) or 'none'}); make it with: {command}"
    )
