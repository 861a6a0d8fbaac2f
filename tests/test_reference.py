"""export.reference.pruning (vision side): Hugging Face outputs and every strategy end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from export.reference import vision as rv
from export.reference.pruning import (
    STRATEGIES,
    feature_layer,
    prune_outputs,
    reference_prune,
    vision_outputs,
)
from runtime.errors import InputError

F = 23  # LLaVA-1.5 geometry of the tiny model: vision_feature_layer=-2 of 24 blocks
N = 576
FEATURE_ATOL = 1e-5  # same float32 ops as get_image_features; only summation order may differ
ATTN_ATOL = 1e-6  # softmax rows recomputed from the same float32 projections
PROJECTOR_ATOL = 1e-4  # float32 torch MLP vs float64 NumPy on outputs up to ~17: seen 5e-6; tanh-GELU 1.5e-3


@pytest.fixture(scope="module")
def pixels(tiny_llava_processor, photos) -> dict[str, torch.Tensor]:
    proc = tiny_llava_processor.image_processor
    return {name: proc(img, return_tensors="pt")["pixel_values"] for name, img in photos.items()}


@pytest.fixture(scope="module")
def vision(tiny_llava_model, pixels):
    used = ("astronaut", "coffee", "chelsea", "camera", "rocket")
    return {name: vision_outputs(tiny_llava_model, pixels[name]) for name in used}


# --- Hugging Face outputs -------------------------------------------------------------------------


def test_guard_tower_returns_every_attention_and_hidden_state(tiny_llava_model, pixels) -> None:
    with torch.no_grad():
        out = tiny_llava_model.model.vision_tower(
            pixels["astronaut"], output_attentions=True, output_hidden_states=True
        )
    n_att = 0 if not out.attentions else len(out.attentions)
    n_hid = 0 if not out.hidden_states else len(out.hidden_states)
    assert (n_att, n_hid) == (24, 25), (
        f"transformers changed: CLIP with output_attentions/output_hidden_states returned {n_att} "
        f"attention maps and {n_hid} hidden states, expected 24 and 25 (eager attention)"
    )
    assert feature_layer(tiny_llava_model) == F


def test_guard_raises_without_eager_attention(tiny_llava_dir, pixels) -> None:
    sdpa = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_dir, attn_implementation="sdpa"
    ).eval()
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        vision_outputs(sdpa, pixels["coffee"])


def test_shapes(vision) -> None:
    v = vision["astronaut"]
    assert (v.features.shape, v.cls_attn.shape, v.keys.shape) == (
        (1, N, 64),
        (1, F, 4, N),
        (1, N, 16),
    )
    assert v.feature_layer == F


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_none_embeddings_equal_get_image_features(tiny_llava_model, pixels, vision, name) -> None:
    with torch.no_grad():
        expected = tiny_llava_model.model.get_image_features(
            pixel_values=pixels[name]
        ).pooler_output[0]
        wrong = tiny_llava_model.model.multi_modal_projector(
            tiny_llava_model.model.vision_tower(
                pixels[name], output_hidden_states=True
            ).hidden_states[F + 1][0, 1:]
        )
    got = prune_outputs(tiny_llava_model, vision[name], "none", None)
    assert got.embeddings.shape == expected.shape
    np.testing.assert_allclose(
        got.embeddings.numpy(),
        expected.numpy(),
        rtol=0,
        atol=FEATURE_ATOL,
        err_msg=f"{name}: projector(features) != get_image_features",
    )
    np.testing.assert_array_equal(got.kept.numpy(), np.arange(N))
    # negative control: the last block (vision_feature_layer=-1) must fail the same check
    assert not np.allclose(wrong.numpy(), expected.numpy(), rtol=0, atol=FEATURE_ATOL)


def _cls_row(block, hidden: torch.Tensor) -> torch.Tensor:
    """[CLS] softmax row of ``block`` recomputed from its input hidden state -> [H, N+1]."""
    attn = block.self_attn
    x = block.layer_norm1(hidden)[0]
    q = attn.q_proj(x).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
    return torch.softmax(q[:, :1] @ k.transpose(1, 2) * attn.scale, dim=-1)[:, 0]


def test_block_f_input_is_hidden_states_f_minus_1(tiny_llava_model, pixels, vision) -> None:
    """Keys read hidden_states[f-1] as block f's input; recomputing its attention proves it."""
    block = tiny_llava_model.model.vision_tower.encoder.layers[F - 1]
    with torch.no_grad():
        hs = tiny_llava_model.model.vision_tower(
            pixels["rocket"], output_hidden_states=True
        ).hidden_states
        right, wrong = _cls_row(block, hs[F - 1]), _cls_row(block, hs[F])
    expected = vision["rocket"].cls_attn[0, F - 1].numpy()
    np.testing.assert_allclose(
        right[:, 1:].numpy(), expected, rtol=0, atol=ATTN_ATOL, err_msg="block f"
    )
    assert not np.allclose(wrong[:, 1:].numpy(), expected, rtol=0, atol=ATTN_ATOL)  # off by one


# --- strategies end to end on the tiny model -----------------------------------------------------


def projector_from_weights(model, tokens: np.ndarray) -> np.ndarray:
    """LLaVA's projector written out from its weights: Linear -> GELU(erf) -> Linear, float64."""
    proj = model.model.multi_modal_projector
    w1, b1 = (t.detach().double().numpy() for t in (proj.linear_1.weight, proj.linear_1.bias))
    w2, b2 = (t.detach().double().numpy() for t in (proj.linear_2.weight, proj.linear_2.bias))
    h = np.asarray(tokens, np.float64) @ w1.T + b1
    return (0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))) @ w2.T + b2


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategies_end_to_end(tiny_llava_model, vision, strategy: str, name: str) -> None:
    k = None if strategy == "none" else 64
    got = prune_outputs(tiny_llava_model, vision[name], strategy, k)
    size = N if k is None else k
    assert (
        got.kept.dtype == torch.int64 and got.kept.shape == (size,) and got.counts.shape == (size,)
    )
    assert got.tokens.shape == (size, 64) and got.embeddings.shape == (size, 64)
    assert len(set(got.kept.tolist())) == size
    head = got.kept[: size - 10] if strategy == "visionzip" else got.kept
    assert bool((head[1:] > head[:-1]).all()), "kept indices must ascend"
    merges = strategy == "entropy" or strategy == "visionzip"
    assert int(got.counts.sum()) == (N if merges else size)
    expected = projector_from_weights(tiny_llava_model, got.tokens.numpy())
    np.testing.assert_allclose(got.embeddings.numpy(), expected, rtol=0, atol=PROJECTOR_ATOL,
                               err_msg=f"{strategy}: embeddings != projector(tokens) from the weights")


def test_negative_control_tanh_gelu_projector(tiny_llava_model, vision, monkeypatch) -> None:
    """A tanh-GELU projector inside the reference path fails the check above at its tolerance."""
    proj = tiny_llava_model.model.multi_modal_projector
    monkeypatch.setattr(proj, "act", torch.nn.GELU(approximate="tanh"))
    got = prune_outputs(tiny_llava_model, vision["astronaut"], "entropy", 64)
    expected = projector_from_weights(tiny_llava_model, got.tokens.numpy())
    assert not np.allclose(got.embeddings.numpy(), expected, rtol=0, atol=PROJECTOR_ATOL)


def test_entropy_report_and_merge_before_projector(tiny_llava_model, pixels, vision) -> None:
    got = reference_prune(tiny_llava_model, pixels["astronaut"], "entropy", 64)
    v = vision["astronaut"]
    assert (got.k_s, got.k_d) == (26, 38)
    assert 6 <= got.layers["l_s"] <= 8 and 20 <= got.layers["l_d"] <= 21
    assert got.entropy.shape == (F,) and got.kl.shape == (F - 1,)
    assert int(got.layers["l_s"]) == 6 + int(torch.argmax(got.entropy[5:8]))
    plain = prune_outputs(tiny_llava_model, v, "entropy", 64, merge="none")
    np.testing.assert_array_equal(plain.kept.numpy(), got.kept.numpy())
    # negative control: merging after the projector (mean of embeddings) is a different answer
    proj = tiny_llava_model.model.multi_modal_projector
    with torch.no_grad():
        e_all = proj(v.features[0])
        i = int(torch.argmax(got.counts))
        target = torch.argmax(rv.cosine_matrix(v.features[0], v.features[0][got.kept]), dim=1)
        target[got.kept] = torch.arange(64)
        after = e_all[target == i].mean(0)
    assert int((target == i).sum()) == int(got.counts[i])
    assert not np.allclose(after.numpy(), got.embeddings[i].numpy(), rtol=0, atol=FEATURE_ATOL)
    fixed = prune_outputs(tiny_llava_model, v, "entropy", 64, rule="fixed")
    assert fixed.layers == {"l_s": 6, "l_d": 20}


def test_bad_strategy_option_and_budget(tiny_llava_model, pixels, vision) -> None:
    with pytest.raises(InputError, match="choose one of: none, uniform"):
        reference_prune(tiny_llava_model, pixels["camera"], "random", 64)
    with pytest.raises(InputError, match="it takes: deep, fixed, merge"):
        prune_outputs(tiny_llava_model, vision["camera"], "entropy", 64, depth=3)
    with pytest.raises(InputError, match="1 <= K <= N=576"):
        prune_outputs(tiny_llava_model, vision["camera"], "fastervlm", 577)
    with pytest.raises(InputError, match="deep layer range"):
        prune_outputs(tiny_llava_model, vision["camera"], "entropy", 64, deep=(20, 24))
