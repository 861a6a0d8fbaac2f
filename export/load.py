"""Resolve ``--model`` (registry alias or local checkpoint) and load the Hugging Face LLaVA.

An alias is downloaded with ``huggingface_hub`` (progress bar on stderr, cached); when the hub
is unreachable the error is one line that says how to pass a local path instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ModelNotFoundError
from runtime.registry import ModelSpec, PruningDefaults, is_local_path, known_aliases, load_spec


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint directory on disk and the registry facts that go with it."""

    path: Path  # directory with config.json and the weights
    spec: ModelSpec  # registry entry, or one derived from the checkpoint for a local path
    source: str  # what the user passed (alias or path)


def resolve_model(model: str) -> ResolvedModel:
    """Turn an alias or a local path into a checkpoint directory (downloading an alias)."""
    if model in known_aliases():
        spec = load_spec(model)
        return ResolvedModel(_download(spec), spec, model)
    if not is_local_path(model):
        load_spec(model)  # raises the one-line "unknown model" error listing the aliases
    path = Path(model).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"cannot read a Hugging Face LLaVA checkpoint at {str(path)!r}: "
            "expected a directory with config.json and the weights"
        )
    return ResolvedModel(path, spec_for_checkpoint(path), model)


def _download(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.repo_id, revision=spec.revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ModelNotFoundError(
            f"cannot download {spec.repo_id}@{spec.revision} from the Hugging Face hub ({reason}); "
            f"download it elsewhere and pass the local directory: --model /path/to/{spec.repo_id.split('/')[-1]}"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file of a checkpoint; an unreadable one is a one-line ModelNotFoundError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read {path}: {err}") from None


def image_processor_config(path: Path) -> dict[str, Any]:
    """The checkpoint's image-processor settings (``preprocessor_config.json`` or nested)."""
    if (path / "preprocessor_config.json").is_file():
        return read_json(path / "preprocessor_config.json")
    if (path / "processor_config.json").is_file():
        data = read_json(path / "processor_config.json")
        return data.get("image_processor", data)
    raise ModelNotFoundError(f"{path} has no preprocessor_config.json or processor_config.json")


def spec_for_checkpoint(path: Path) -> ModelSpec:
    """A registry-like spec for a local checkpoint: feature layer from config, pad mode from
    the processor (``do_pad``), the method's default pruning settings."""
    config = read_json(path / "config.json")
    if "vision_config" not in config or "text_config" not in config:
        raise ModelNotFoundError(f"{path}/config.json is not a LLaVA config (no vision_config/text_config)")
    mode = "pad" if image_processor_config(path).get("do_pad", False) else "crop"
    return ModelSpec(
        alias=path.name, repo_id=str(path), revision="local",
        vision_feature_layer=int(config.get("vision_feature_layer", -2)), image_mode=mode,
        chat_template="llava-1.5", pruning=PruningDefaults(), entropyprune_layer=2,
    )


def load_llava(path: Path):  # -> LlavaForConditionalGeneration
    """Load the checkpoint in float32 with eager attention (the attention rows are needed)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot load LLaVA from {path}: {str(err).splitlines()[0]}") from None
    return model.eval()
