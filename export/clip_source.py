"""Where cdpruner's CLIP checkpoint comes from, and whether it is the one LLaVA's vision tower came from.

- :func:`text_source`: which CLIP checkpoint ``export.clip`` uses for a ``--model`` (the registry's
  ``clip`` hub id for an alias, ``CHECKPOINT/clip`` for a local checkpoint, or ``--text-tower``).
- :func:`resolve_clip`: that checkpoint as a local directory (a hub id is downloaded and cached).
- :func:`vision_fingerprint`: sha256 of a LLaVA checkpoint's vision tensors as stored; the manifest
  records it (``vision_sha256``) so that a vision re-export keeps a text tower only for the same weights.
- :func:`compare_vision`: the CLIP checkpoint's vision weights against the LLaVA's, tensor by tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from export.checkpoint import Checkpoint
from runtime.cli import log
from runtime.errors import InputError, ModelNotFoundError

ANCHOR = "pre_layrnorm.weight"  # ends exactly one key of a CLIP vision tower, whatever the prefix
CLIP_FOLDER = "clip"  # a local LLaVA checkpoint's CLIP: CHECKPOINT/clip
# CLIP and LLaVA vision weights are the same numbers stored in different dtypes (openai's CLIP in float32,
# llava-hf's in float16; bf16 is the coarsest a checkpoint is stored in): |a - b| <= RTOL·|a| + ATOL.
VISION_RTOL = 2.0**-8  # bf16 keeps 8 significant bits: one rounding of float32 weights stays within 2^-9
VISION_ATOL = 1e-6  # float16 subnormals (|w| < 6.1e-5) are rounded to a multiple of 6e-8
_WEIGHT_FILES = ["*.json", "*.txt", "*.safetensors"]  # the checkpoint, its configs and tokenizer files


def text_source(model: str, alias_clip: str | None, checkpoint: Path, override: str | None) -> str | None:
    """The CLIP checkpoint to export (hub id or directory), or None (logged: cdpruner unavailable).

    ``alias_clip`` is the registry's ``clip`` for an alias (None for a local checkpoint), whose
    ``checkpoint/clip`` is used when it exists.
    """
    if override is not None:
        return override
    if alias_clip is not None:
        return alias_clip
    local = checkpoint / CLIP_FOLDER
    if (local / "config.json").is_file():
        return str(local)
    log(f"  note: {local} does not exist, so no text tower is exported and cdpruner will be unavailable; "
        f"add one later with: python -m export.clip --model {model} --out BUNDLE --text-tower-only "
        "--text-tower ID|PATH (the CLIP checkpoint the vision tower came from)")
    return None


def resolve_clip(source: str) -> Path:
    """A CLIP checkpoint directory: ``source`` itself when it is one, else a hub id downloaded with
    ``huggingface_hub`` (safetensors weights, else ``pytorch_model.bin``); offline, one line."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a CLIP checkpoint (no config.json)")
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"--text-tower {source!r} is neither a CLIP checkpoint directory nor a hub id "
                                 "(owner/name, e.g. openai/clip-vit-large-patch14-336)")
    folder = _download(source, _WEIGHT_FILES)
    if not any(folder.glob("*.safetensors")):
        folder = _download(source, ["pytorch_model*.bin*"])
    return folder


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ModelNotFoundError(
            f"cannot download the CLIP checkpoint {repo_id} from the Hugging Face hub ({reason[:300]}); download "
            f"it elsewhere and pass the directory: --text-tower /path/to/{repo_id.split('/')[-1]} (or --no-text-tower)"
        ) from None


def _vision_keys(checkpoint: Checkpoint) -> dict[str, str]:
    """Tower-relative name (``encoder.layers.0.mlp.fc1.weight``) -> checkpoint key, position_ids left out."""
    prefix = checkpoint.prefix(ANCHOR)
    return {key[len(prefix):]: key for key in checkpoint.under(prefix) if not key.endswith("position_ids")}


def vision_fingerprint(llava_dir: Path) -> str:
    """Hex sha256 over the LLaVA checkpoint's vision tensors (tower-relative name, dtype, shape and
    stored bytes, in name order); read one tensor at a time."""
    checkpoint = Checkpoint(llava_dir)
    digest = hashlib.sha256()
    for name, key in sorted(_vision_keys(checkpoint).items()):
        info = checkpoint.info(key)
        digest.update(f"{name}|{info.dtype}|{list(info.shape)}|".encode())
        digest.update(np.ascontiguousarray(checkpoint.raw(key)).tobytes())
    return digest.hexdigest()


def compare_vision(clip_vision: dict[str, Any], llava_dir: Path) -> dict[str, Any]:
    """Check ``clip_vision`` (the CLIP vision model's float32 state dict: name -> array) equal to the
    LLaVA checkpoint's vision tensors within the storage dtypes' rounding; the report for the manifest.

    Raises a one-line InputError naming the first tensor that differs (another CLIP).
    """
    checkpoint = Checkpoint(llava_dir)
    keys = _vision_keys(checkpoint)
    ours = {name: value for name, value in clip_vision.items() if not name.endswith("position_ids")}
    if set(ours) != set(keys):
        only_clip, only_llava = sorted(set(ours) - set(keys)), sorted(set(keys) - set(ours))
        raise InputError(f"the CLIP checkpoint's vision tower is not LLaVA's: tensors only in CLIP "
                                 f"{only_clip[:3]}, only in LLaVA {only_llava[:3]}")
    worst = 0.0
    for name in sorted(keys):
        a, b = np.asarray(ours[name], dtype=np.float32), checkpoint.load(keys[name])
        if a.shape != b.shape:
            raise InputError(f"the CLIP checkpoint's vision tower is not LLaVA's: {name} is {a.shape} "
                                     f"in CLIP, {b.shape} in LLaVA")
        excess = np.abs(a - b) - (VISION_RTOL * np.abs(a) + VISION_ATOL)
        if (excess > 0).any():
            raise InputError(
                f"the CLIP checkpoint's vision weights differ from LLaVA's ({name}: max |Δ| "
                f"{float(np.abs(a - b).max()):.3g}); cdpruner needs the CLIP the vision tower came from "
                "(--text-tower ID|PATH)")
        worst = max(worst, float(np.abs(a - b).max()))
    return {"tensors": len(keys), "max_abs_diff": worst, "rtol": VISION_RTOL, "atol": VISION_ATOL}
