"""export.vision_family: the registry, and a family added as a spec exporting through the shared path.

Tiny towers built from configs (no weights downloaded). The made-up ViT entry is passed to the
product functions explicitly, never registered. Negative controls: specs that name the wrong
attention module, key projection, layer scales or [CLS] flag fail loudly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx_export import export_tower
from export.reference.vision import tower_outputs
from export.validate import ValidationFailed, checked_table, run_onnx, validate_tower, validation_inputs
from export.vision import IdentityProjector, VisionTowerWithAttention
from export.vision_family import (
    CLIP,
    CLIP_TILES,
    DINOV2,
    FAMILIES,
    VisionFamily,
    family_for,
    family_of_tower,
    registered_model_types,
)
from runtime.errors import ModelNotFoundError

SIZE, PATCH = 28, 14  # a 2×2 patch grid: N = 4
VIT = VisionFamily(  # transformers' ViTModel: flat layers, no pre-norm, [CLS]; fits without special code
    name="vit", model_types=("vit",), label="ViT", root=None, blocks="layers", attention="attention",
    norms=("layernorm_before", "layernorm_after"), heads="num_attention_heads", feature_layer=-1,
)
F = 3  # all blocks of the tiny towers
MAX_ABS = 1e-4  # the export's acceptance bound (export.validate.TOLERANCES)


def _config(cls, **extra):
    config = cls(hidden_size=32, num_hidden_layers=F, num_attention_heads=2, intermediate_size=64,
                 image_size=SIZE, patch_size=PATCH, **extra)
    config._attn_implementation = "eager"  # the attention probabilities are exported
    return config


def _randomise(model: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module:
    """Parameters whose name holds one of ``names`` drawn away from their initial 1 or 0, so that
    two norms (or a layer scale and none) are different functions."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names):
                param.uniform_(0.2, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return _randomise(ViTModel(_config(ViTConfig), add_pooling_layer=False), ("layernorm",))


@pytest.fixture(scope="module")
def dinov2() -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = _config(Dinov2Config)
    config.mlp_ratio = 2
    return _randomise(Dinov2Model(config), ("layer_scale", "norm"))


def test_registry_covers_clip_next_tiles_and_dinov2() -> None:
    assert family_for("clip_vision_model") is CLIP and family_for("clip") is CLIP and family_for("llava") is CLIP
    assert family_for("llava_next") is CLIP_TILES and family_for("dinov2") is DINOV2
    assert CLIP_TILES.tiles and not CLIP.tiles and (CLIP.bundle_family, CLIP_TILES.bundle_family) == (
        "llava-1.5", "llava-next")
    # the tile entry is CLIP's spec, not a copy that could drift
    same = {f.name for f in dataclasses.fields(VisionFamily)} - {"name", "model_types", "tiles", "bundle_family"}
    assert all(getattr(CLIP, n) == getattr(CLIP_TILES, n) for n in same)
    types = [t for family in FAMILIES for t in family.model_types]
    assert len(types) == len(set(types)), "a model_type registered twice"


def test_unknown_model_type_is_one_line_listing_registered() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        family_for("siglip_vision_model")
    message = str(err.value)
    assert "\n" not in message and "'siglip_vision_model'" in message
    assert all(t in message for t in registered_model_types())


def test_registered_entries_find_their_towers(dinov2) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(_config(CLIPVisionConfig)).eval()
    for tower, family, heads in ((clip, CLIP, "num_heads"), (dinov2, DINOV2, "num_attention_heads")):
        assert family_of_tower(tower) is family
        parts = family.parts(tower)
        assert len(parts.blocks) == F and (parts.pre_norm is None) == (family is DINOV2)
        assert family.head_count(family.attention_of(parts.blocks[0])) == 2 == getattr(
            family.attention_of(parts.blocks[0]), heads)


def test_made_up_vit_family_exports_and_validates(vit, tmp_path: Path) -> None:
    vision_files, projector_files = export_tower(vit, IdentityProjector(), F, SIZE, 32, tmp_path, 18, VIT)
    assert [p.name for p in vision_files] == ["vision.onnx"] and [p.name for p in projector_files] == ["projector.onnx"]
    checks = validate_tower(vit, IdentityProjector(), F, SIZE, tmp_path, VIT)
    checked_table(checks)  # raises ValidationFailed on any ✗
    assert {c.output for c in checks if c.graph == "vision"} == {"features", "cls_attn", "keys"}
    got = run_onnx(tmp_path / "vision.onnx", {"pixel_values": validation_inputs(SIZE)["noise-b3"]})
    assert {k: v.shape for k, v in got.items()} == {"features": (3, 4, 32), "cls_attn": (3, F, 2, 4),
                                                    "keys": (3, 4, 16)}
    # negative control: a mismatching reference (the neighbouring block's) fails the same validation
    with pytest.raises(ValidationFailed, match="vision.features"):
        checked_table(validate_tower(vit, IdentityProjector(), F - 1, SIZE, tmp_path, VIT))


@pytest.mark.parametrize("wrong", [{"pre_norm": "layernorm"}, {"norms": ("layernorm_before", "layernorm_before")}])
def test_vit_wrapper_with_a_wrong_norm_is_far_from_hf(vit, wrong: dict) -> None:
    """Negative control in PyTorch (no export): the final LayerNorm taken for a pre-norm, or the
    attention's norm before the MLP, moves the features far beyond the bound."""
    pixels = torch.from_numpy(validation_inputs(SIZE)["pattern-b1"])
    expected = tower_outputs(vit, pixels, F, VIT)["features"]
    with torch.no_grad():
        right = VisionTowerWithAttention(vit, F, VIT)(pixels)[0]
        bad = VisionTowerWithAttention(vit, F, dataclasses.replace(VIT, **wrong))(pixels)[0]
    np.testing.assert_allclose(right.numpy(), expected.numpy(), rtol=0, atol=MAX_ABS)
    assert (bad - expected).abs().max().item() > 100 * MAX_ABS


def test_dinov2_entry_equals_hf_and_needs_its_layer_scales(dinov2) -> None:
    """The wrapper (in PyTorch) against the reference; without the layer scales it is off by far more."""
    pixels = torch.from_numpy(validation_inputs(SIZE)["noise-b3"])
    expected = tower_outputs(dinov2, pixels, F, DINOV2)
    with torch.no_grad():
        got = dict(zip(("features", "cls_attn", "keys"), VisionTowerWithAttention(dinov2, F, DINOV2)(pixels),
                       strict=True))
        plain = VisionTowerWithAttention(dinov2, F, dataclasses.replace(DINOV2, layer_scales=None))(pixels)[0]
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name].numpy(), ref.numpy(), rtol=0, atol=MAX_ABS, err_msg=name)
    assert (plain - expected["features"]).abs().max().item() > 100 * MAX_ABS


def test_wrong_attention_submodule_fails_loudly(vit) -> None:
    with pytest.raises(RuntimeError, match="the vit vision family expects ViTLayer.self_attn"):
        VisionTowerWithAttention(vit, F, dataclasses.replace(VIT, attention="self_attn"))


def test_wrong_key_projection_fails_the_reference(vit) -> None:
    pixels = torch.from_numpy(validation_inputs(SIZE)["pattern-b1"])
    assert set(tower_outputs(vit, pixels, F, VIT)) == {"features", "cls_attn", "keys"}
    with pytest.raises(RuntimeError, match="do not reproduce the tower's attention"):
        tower_outputs(vit, pixels, F, dataclasses.replace(VIT, key="v_proj"))


def test_wrong_cls_flag_fails_loudly(vit) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    no_cls = dataclasses.replace(VIT, has_cls=False)
    with pytest.raises(RuntimeError, match="has no \\[CLS\\] token"):
        VisionTowerWithAttention(vit, F, no_cls)
    with pytest.raises(RuntimeError, match="has no \\[CLS\\] token"):
        tower_outputs(vit, torch.zeros(1, 3, SIZE, SIZE), F, no_cls)
    # SigLIP has no [CLS]: a CLIP-shaped spec claiming one is caught by the token count
    siglip = SiglipVisionModel(_config(SiglipVisionConfig)).eval()
    claims_cls = dataclasses.replace(CLIP, name="siglip", model_types=("siglip_vision_model",), pre_norm=None)
    with pytest.raises(RuntimeError, match="the spec's has_cls is wrong"):
        tower_outputs(siglip, torch.zeros(1, 3, SIZE, SIZE), F, claims_cls)
