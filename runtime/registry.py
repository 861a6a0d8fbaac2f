"""The model registry: one JSON spec per alias in ``models/`` (data, not code).

Torch-free so that both the exporter and the runtime can resolve an alias.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from runtime.errors import ModelNotFoundError

IMAGE_MODES = ("pad", "crop")


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

    def __post_init__(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        if self.entropyprune_layer < 1:
            raise ValueError(f"entropyprune_layer must be >= 1, got {self.entropyprune_layer}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            alias=data["alias"], repo_id=data["repo_id"], revision=data["revision"],
            vision_feature_layer=int(data["vision_feature_layer"]), image_mode=data["image_mode"],
            chat_template=data["chat_template"], pruning=PruningDefaults.from_json(data["pruning"]),
            entropyprune_layer=int(data["entropyprune_layer"]),
            gguf_quant=data.get("gguf", {}).get("quant", "q4_k_m"),
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


def default_bundle_dir(alias: str) -> Path:
    """Where the exporters write an alias's bundle by default: ``models/<alias>/`` (git-ignored)."""
    return Path(str(resources.files("models"))) / alias


def bundle_path(model: str) -> Path:
    """A bundle directory from ``--model``: an alias means ``models/<alias>/``, else a path."""
    return default_bundle_dir(model) if model in known_aliases() else Path(model).expanduser()
