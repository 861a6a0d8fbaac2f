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
from runtime.model_registry import ModelSpec, PruningDefaults, is_local_path, known_aliases, load_spec


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
        reason = " ".join(str(err).split()) or type(err).__name__  # the whole reason, on one line
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
    """A registry-like spec for a local checkpoint: family and feature layer from config, pad mode from
    the processor (``do_pad``; LLaVA-NeXT's tiles are never padded to a square: "crop"), the chat
    template from the language model (Mistral: ``mistral-instruct``, else Vicuna's ``llava-1.5``), the
    method's default pruning settings."""
    from export.llava_next import family_of

    config = read_json(path / "config.json")
    if "vision_config" not in config or "text_config" not in config:
        raise ModelNotFoundError(f"{path}/config.json is not a LLaVA config (no vision_config/text_config)")
    family = family_of(config.get("model_type"))
    pad = family == "llava-1.5" and image_processor_config(path).get("do_pad", False)
    return ModelSpec(
        alias=path.name, repo_id=str(path), revision="local",
        vision_feature_layer=int(config.get("vision_feature_layer", -2)), image_mode="pad" if pad else "crop",
        chat_template="mistral-instruct" if config["text_config"].get("model_type") == "mistral" else "llava-1.5",
        pruning=PruningDefaults(), entropyprune_layer=2, family=family,
    )


@dataclass(frozen=True)
class VisionHalf:
    """What export.clip needs of a LLaVA: its config, the CLIP tower and the projector
    (float32, eager attention) — never the language model."""

    config: Any  # LlavaConfig or LlavaNextConfig
    vision_tower: Any  # CLIPVisionModel
    multi_modal_projector: Any  # LlavaMultiModalProjector (LlavaNextMultiModalProjector: the same layers)
    next_model: Any = None  # LLaVA-NeXT only: the LlavaNextModel holding both (and image_newline)

    @classmethod
    def of(cls, model: Any) -> VisionHalf:
        """The vision half of a whole ``Llava(Next)ForConditionalGeneration`` (tests, the reference path)."""
        inner = model.model
        return cls(model.config, inner.vision_tower, inner.multi_modal_projector,
                   inner if hasattr(inner, "image_newline") else None)

    @property
    def image_newline(self) -> Any:
        """``image_newline [E]`` as float32 numpy (LLaVA-NeXT), else None."""
        return None if self.next_model is None else self.next_model.image_newline.detach().float().numpy().copy()


def load_vision_half(path: Path) -> VisionHalf:
    """Build the CLIP tower and projector from the config and fill them with only their own
    tensors, read one at a time from the shards (either key layout); for a LLaVA-NeXT also
    ``image_newline``, in a ``LlavaNextModel`` whose language model has no layers.

    Peak memory is the float32 tower (~1.2 GB for ViT-L) whatever the language model's size:
    loading the whole LLaVA-1.5-7B in float32 would take ~28 GB.
    """
    import torch
    from transformers import AutoConfig, CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from export.checkpoint import Checkpoint
    from export.llava_next import family_of, read_image_newline, vision_model

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read the config of {path}: {str(err).splitlines()[0]}") from None
    if getattr(config, "vision_config", None) is None or config.vision_config.model_type != "clip_vision_model":
        raise ModelNotFoundError(f"{path} is not a LLaVA with a CLIP vision tower (config.json vision_config)")
    config.vision_config._attn_implementation = "eager"  # the attention probabilities are exported
    checkpoint = Checkpoint(path)
    if family_of(config.model_type) == "llava-next":
        model = vision_model(config)
        tower, projector = model.vision_tower, model.multi_modal_projector
    else:
        model = None
        with torch.device("cpu"):
            tower = CLIPVisionModel(config.vision_config)
            projector = LlavaMultiModalProjector(config)
    _fill(tower, checkpoint, "pre_layrnorm.weight")
    _fill(projector, checkpoint, "linear_1.weight")
    if model is not None:
        newline = read_image_newline(checkpoint, config.text_config.hidden_size)
        with torch.no_grad():
            model.image_newline.copy_(torch.from_numpy(newline))
        model.float().eval()
    return VisionHalf(config, tower.float().eval(), projector.float().eval(), model)


def _fill(module: Any, checkpoint: Any, anchor: str) -> None:
    """Copy the checkpoint's tensors into every parameter/persistent buffer of ``module``.

    ``anchor`` is a name that ends one key of the module and one of the checkpoint; what stands in
    front of it on either side is that side's prefix. This covers llava-hf's files
    (``vision_tower.vision_model.*``), transformers 5's (``vision_tower.*`` saved,
    ``model.vision_tower.*`` in memory) and a nested or flat ``CLIPVisionModel`` in memory.
    """
    import torch

    state = module.state_dict()
    inner = next(name[: -len(anchor)] for name in state if name.endswith(anchor))
    outer = checkpoint.prefix(anchor)
    key_of = {name: outer + name[len(inner):] for name in state if name.startswith(inner)}
    stored = {key for key in checkpoint.under(outer) if not key.endswith("position_ids")}
    missing = sorted(set(state) - set(key_of)) + sorted(set(key_of.values()) - stored)
    unexpected = sorted(stored - set(key_of.values()))
    if missing or unexpected:
        raise ModelNotFoundError(
            f"{checkpoint.model_dir}: tensors under {outer!r} do not match {type(module).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, target in state.items():
            value = torch.from_numpy(checkpoint.load(key_of[name]))
            if tuple(value.shape) != tuple(target.shape):
                raise ModelNotFoundError(
                    f"{checkpoint.model_dir}: {key_of[name]} has shape {tuple(value.shape)}, "
                    f"the config needs {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))


def load_llava(path: Path):  # -> LlavaForConditionalGeneration
    """Load the *whole* checkpoint in float32 with eager attention (the PyTorch reference path and
    tools on small models; export.clip uses :func:`load_vision_half`)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot load LLaVA from {path}: {str(err).splitlines()[0]}") from None
    return model.eval()
