"""Shared fixtures: a tiny random LLaVA checkpoint (built once per session) and test photos.

torch and transformers are imported inside the fixtures so that collecting the runtime's
torch-free tests never imports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


@pytest.fixture(scope="session", autouse=True)
def bundles_home(tmp_path_factory: pytest.TempPathFactory):
    """Bundles found by name live in a temporary folder during tests, never in ~/.cache."""
    from runtime.model_registry import BUNDLES_ENV

    home = tmp_path_factory.mktemp("bundles")
    previous = os.environ.get(BUNDLES_ENV)
    os.environ[BUNDLES_ENV] = str(home)
    yield home
    if previous is None:
        os.environ.pop(BUNDLES_ENV, None)
    else:
        os.environ[BUNDLES_ENV] = previous


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5-shaped checkpoint (CLIP 24 blocks, N=576, f=23; LLaMA 4 layers)."""
    from tools.make_tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_llava_model(tiny_llava_dir: Path) -> Any:
    """The tiny checkpoint as ``LlavaForConditionalGeneration``: eager attention, eval, float32."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_dir, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llava_processor(tiny_llava_dir: Path) -> Any:
    """The tiny checkpoint's ``LlavaProcessor`` (image processor + tokenizer)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_llava_dir: Path) -> Path:
    """The tiny checkpoint's CLIP (``OUT/clip``): the same vision tower, a small text tower, a CLIP BPE tokenizer."""
    return tiny_llava_dir / "clip"


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip_dir: Path) -> Any:
    """The tiny ``CLIPModel``: eager attention, eval, float32."""
    import torch
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported by the CLI ``python -m export.clip ... --int8`` (validated); it has a
    text tower (text.int8.onnx too) because the checkpoint has ``OUT/clip``."""
    from export.clip import main

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    assert main(["--model", str(tiny_llava_dir), "--out", str(out), "--int8"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-NeXT (1.6 anyres) checkpoint: the towers and tokenizer of ``tiny_llava_dir``,
    llava-hf v1.6's image_grid_pinpoints, a random O(1) image_newline, ``OUT/clip``."""
    from tools.make_tiny_llava import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny_next"))


@pytest.fixture(scope="session")
def tiny_mistral_next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_next_dir`` with LLaVA-NeXT Mistral's kind of language model: a tiny ``MistralConfig`` (GQA 8/2
    heads, RoPE base 1e6, no sliding window, embedding rows padded to a multiple of 64)."""
    from tools.make_tiny_llava import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny_mistral_next"), lm="mistral")


@pytest.fixture(scope="session")
def tiny_next_model(tiny_next_dir: Path) -> Any:
    """The tiny NeXT checkpoint as ``LlavaNextForConditionalGeneration``: eager attention, eval, float32."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(
        tiny_next_dir, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_next_bundle(tiny_next_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA-NeXT exported by the CLI ``python -m export.clip`` (validated, with its text tower)."""
    from export.clip import main

    out = tmp_path_factory.mktemp("tiny_next_bundle") / "bundle"
    assert main(["--model", str(tiny_next_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_next_llm_bundle(tiny_next_bundle: Path, tiny_next_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny NeXT bundle plus ``export.llm --quant f32``; read-only for tests."""
    import shutil

    from export.llm import main

    out = tmp_path_factory.mktemp("tiny_next_llm_bundle") / "bundle"
    shutil.copytree(tiny_next_bundle, out)
    assert main(["--model", str(tiny_next_dir), "--out", str(out), "--quant", "f32"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_llm_bundle(tiny_bundle: Path, tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle plus ``export.llm --quant f32`` (GGUF, probe, probe weights)."""
    import shutil

    from export.llm import main

    out = tmp_path_factory.mktemp("tiny_llm_bundle") / "bundle"
    shutil.copytree(tiny_bundle, out)
    assert main(["--model", str(tiny_llava_dir), "--out", str(out), "--quant", "f32"]) == 0
    return out


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Six scikit-image photos as RGB PIL images (grey ``camera`` made RGB); don't mutate."""
    from skimage import data

    out = {}
    for name in PHOTO_NAMES:
        pixels = getattr(data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        out[name] = Image.fromarray(np.ascontiguousarray(pixels[..., :3]), mode="RGB")
    return out
