"""export.reference.llm: EntropyPrune scores, the faithful cut before layer P, FastV."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from export.reference.pruning import (
    entropyprune_budget,
    entropyprune_faithful,
    entropyprune_scores,
    fastv_faithful,
    fastv_scores,
    head_entropy_scores,
    llava_inputs_embeds,
    run_decoder_layers,
)
from export.reference.vision import rank_descending
from runtime.errors import InputError

P = 2  # EntropyPrune's pruning layer for LLaVA-1.5 (method.md §2)
N = 576
LOGITS_ATOL = 1e-4  # float32 decoder layers, same ops in a different call structure
SCORE_ATOL = 1e-6  # float64 eigen-solves of float32 queries that differ by a rotation's rounding
DUAL_ATOL = 1e-7  # the d_h x d_h side clips (d_h - h) more zero eigenvalues: ~2e-9 each
PROMPT = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"


@pytest.fixture(scope="module")
def prompt(tiny_llava_model, tiny_llava_processor, photos):
    """The chelsea photo in a chat prompt: processor output, LLM input and HF's own last logits."""
    batch = tiny_llava_processor(images=photos["chelsea"], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = tiny_llava_model(**batch).logits[0, -1]
        image = tiny_llava_model.model.get_image_features(pixel_values=batch["pixel_values"])
        inputs = llava_inputs_embeds(tiny_llava_model, batch["input_ids"], image.pooler_output[0])
        hidden = tiny_llava_model.model.language_model(
            inputs_embeds=inputs.inputs_embeds, output_hidden_states=True
        ).hidden_states
    return {"batch": batch, "logits": logits, "inputs": inputs, "hidden": hidden}


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE written out: x [.., T, d_h], cos/sin [T, d_h]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _queries_and_keys(model, hidden: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE [H, T, d_h] queries and [H_kv, T, d_h] keys of decoder ``layer`` (0-based)."""
    block = model.model.language_model.layers[layer]
    x = block.input_layernorm(hidden[0])
    d_h = block.self_attn.head_dim
    q = block.self_attn.q_proj(x).view(x.shape[0], -1, d_h).transpose(0, 1)
    k = block.self_attn.k_proj(x).view(x.shape[0], -1, d_h).transpose(0, 1)
    return q, k


def _cos_sin(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = model.model.language_model.rotary_emb(torch.zeros(1), positions[None])
    return cos[0], sin[0]


# --- the score itself -----------------------------------------------------------------------------


def test_head_entropy_hand_case() -> None:
    # heads (0.5, 0), (-0.5, 0): already centred; G = Z Zᵀ / 2 has eigenvalues 0.25 and 0
    q = torch.tensor([[[0.5, 0.0], [-0.5, 0.0]]])
    floor_term = -1e-10 * math.log(1e-10) / math.log(2)  # the clipped zero eigenvalue
    np.testing.assert_allclose(
        head_entropy_scores(q).numpy(), [0.5 + floor_term], rtol=0, atol=1e-15
    )
    with pytest.raises(ValueError, match="h >= 2"):
        head_entropy_scores(torch.zeros(3, 1, 4))


def _head_entropy_loop(q: np.ndarray) -> np.ndarray:
    """Per token, the d_h x d_h covariance side (the primal of the dual Gram)."""
    out = []
    for z in q.astype(np.float64):
        z = z - z.mean(axis=0)
        lam = np.clip(np.linalg.eigvalsh(z.T @ z / z.shape[0]), 1e-10, None)
        out.append(-(lam * np.log(lam)).sum() / math.log(z.shape[0]))
    return np.array(out)


@pytest.mark.parametrize(("h", "d_h"), [(4, 16), (8, 8), (2, 3)])
def test_head_entropy_matches_loop(h: int, d_h: int) -> None:
    q = np.random.default_rng(h * d_h).standard_normal((20, h, d_h)).astype(np.float32)
    np.testing.assert_allclose(
        head_entropy_scores(torch.from_numpy(q)).numpy(),
        _head_entropy_loop(q),
        rtol=0,
        atol=DUAL_ATOL * d_h,
        err_msg="dual Gram vs covariance side",
    )


@settings(max_examples=30, deadline=None)
@given(h=st.integers(2, 6), d_h=st.integers(2, 8), seed=st.integers(0, 999))
def test_head_entropy_invariances(h: int, d_h: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(5, h, d_h, generator=gen, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(d_h, d_h, generator=gen, dtype=torch.float64))
    base = head_entropy_scores(q)
    for other in (q @ rot, q[:, torch.randperm(h, generator=gen)]):  # shared rotation, head order
        np.testing.assert_allclose(
            head_entropy_scores(other).numpy(), base.numpy(), rtol=0, atol=1e-9
        )


# --- scores on the model --------------------------------------------------------------------------


def test_scores_come_from_layer_p_minus_1_and_ignore_rope(tiny_llava_model, prompt) -> None:
    inp, hidden = prompt["inputs"], prompt["hidden"]
    got = entropyprune_scores(
        tiny_llava_model, inp.inputs_embeds, inp.image_start, inp.num_image, P
    )
    rows = torch.arange(inp.image_start, inp.image_start + N)
    with torch.no_grad():
        q, _ = _queries_and_keys(tiny_llava_model, hidden[P - 1], P - 1)
        q_wrong_layer, _ = _queries_and_keys(tiny_llava_model, hidden[P], P)
        cos, sin = _cos_sin(tiny_llava_model, rows)
        roped = _rope(q[:, rows], cos, sin)  # [H, N, d_h]
        heads = torch.arange(q.shape[0])[:, None]
        cos_h, sin_h = _cos_sin(tiny_llava_model, (rows[None] + 97 * heads).flatten())
        per_head = _rope(q[:, rows], cos_h.view(q.shape[0], N, -1), sin_h.view(q.shape[0], N, -1))
    expected = head_entropy_scores(roped.transpose(0, 1)).numpy()
    assert got.shape == (N,) and got.dtype == torch.float64
    np.testing.assert_allclose(
        got.numpy(), expected, rtol=0, atol=SCORE_ATOL, err_msg="RoPE invariance"
    )
    for wrong in (per_head, q_wrong_layer[:, rows]):  # per-head rotation bug; off-by-one layer
        assert not np.allclose(
            head_entropy_scores(wrong.transpose(0, 1)).numpy(), expected, rtol=0, atol=SCORE_ATOL
        )


def test_fastv_scores_equal_manual_attention(tiny_llava_model, prompt) -> None:
    inp, hidden = prompt["inputs"], prompt["hidden"]
    got = fastv_scores(tiny_llava_model, inp.inputs_embeds, inp.image_start, inp.num_image, P)
    t = inp.inputs_embeds.shape[1]
    with torch.no_grad():
        q, k = _queries_and_keys(tiny_llava_model, hidden[P - 1], P - 1)
        cos, sin = _cos_sin(tiny_llava_model, torch.arange(t))
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        scale = q.shape[-1] ** -0.5

        def last_row(qq: torch.Tensor, kk: torch.Tensor) -> np.ndarray:
            probs = torch.softmax(qq[:, -1:] @ kk.transpose(1, 2) * scale, dim=-1)[:, 0]
            return probs[:, inp.image_start : inp.image_start + N].double().mean(0).numpy()

        expected = last_row(_rope(q, cos, sin), _rope(k, cos, sin))
        no_rope = last_row(q, k)
    np.testing.assert_allclose(
        got.numpy(), expected, rtol=0, atol=SCORE_ATOL, err_msg="FastV attention"
    )
    assert not np.allclose(
        no_rope, expected, rtol=0, atol=SCORE_ATOL
    )  # negative control: RoPE left out


# --- the faithful cut -----------------------------------------------------------------------------


def test_faithful_without_pruning_equals_hf_forward(tiny_llava_model, prompt) -> None:
    inp = prompt["inputs"]
    got = entropyprune_faithful(tiny_llava_model, inp.inputs_embeds, inp.image_start, N, N, P)
    np.testing.assert_array_equal(got.kept.numpy(), np.arange(N))
    np.testing.assert_array_equal(got.position_ids.numpy(), np.arange(inp.inputs_embeds.shape[1]))
    assert got.logits.shape == prompt["logits"].shape
    np.testing.assert_allclose(
        got.logits.numpy(),
        prompt["logits"].numpy(),
        rtol=0,
        atol=LOGITS_ATOL,
        err_msg="K' = N must reproduce LlavaForConditionalGeneration",
    )
    # negative control: resuming from the wrong hidden state (layer P-1's input) must fail
    off = run_decoder_layers(
        tiny_llava_model, prompt["hidden"][P - 1], got.position_ids[None], start=P
    )
    assert not np.allclose(off.numpy(), prompt["logits"].numpy(), rtol=0, atol=LOGITS_ATOL)


def _tail_model(model, start: int) -> LlamaForCausalLM:
    """A separate LlamaForCausalLM holding decoder layers ``start..``, the norm and lm_head."""
    lm = model.model.language_model
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_hidden_layers = len(lm.layers) - start
    tail = LlamaForCausalLM(config).eval()
    state = {
        f"model.layers.{i - start}.{k}": v
        for i in range(start, len(lm.layers))
        for k, v in lm.layers[i].state_dict().items()
    }
    state |= {f"model.norm.{k}": v for k, v in lm.norm.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    missing, _ = tail.load_state_dict(state, strict=False)
    assert missing == ["model.embed_tokens.weight"], missing
    return tail


def test_faithful_pruning_keeps_original_positions(tiny_llava_model, prompt) -> None:
    inp, hidden = prompt["inputs"], prompt["hidden"]
    k = 64
    got = entropyprune_faithful(tiny_llava_model, inp.inputs_embeds, inp.image_start, N, k, P)
    scores = entropyprune_scores(tiny_llava_model, inp.inputs_embeds, inp.image_start, N, P)
    np.testing.assert_array_equal(got.kept.numpy(), np.sort(rank_descending(scores)[:k].numpy()))
    t = inp.inputs_embeds.shape[1]
    rows = np.concatenate(
        [
            np.arange(inp.image_start),
            inp.image_start + got.kept.numpy(),
            np.arange(inp.image_start + N, t),
        ]
    )
    np.testing.assert_array_equal(got.position_ids.numpy(), rows)
    with torch.no_grad():  # Hugging Face's own forward over the tail layers, original position ids
        expected = _tail_model(tiny_llava_model, P)(
            inputs_embeds=hidden[P][:, rows], position_ids=got.position_ids[None]
        ).logits[0, -1]
    np.testing.assert_allclose(
        got.logits.numpy(),
        expected.numpy(),
        rtol=0,
        atol=LOGITS_ATOL,
        err_msg="manual tail layers vs LlamaForCausalLM",
    )
    # negative control: renumbering the kept rows 0..T'-1 changes the logits
    renumbered = run_decoder_layers(
        tiny_llava_model, hidden[P][:, rows], torch.arange(len(rows))[None], start=P
    )
    assert not np.allclose(renumbered.numpy(), got.logits.numpy(), rtol=0, atol=LOGITS_ATOL)


def test_fastv_faithful_and_input_ids_path(tiny_llava_model, prompt) -> None:
    inp = prompt["inputs"]
    got = fastv_faithful(tiny_llava_model, inp.inputs_embeds, inp.image_start, N, 32, P)
    scores = fastv_scores(tiny_llava_model, inp.inputs_embeds, inp.image_start, N, P)
    np.testing.assert_array_equal(got.kept.numpy(), np.sort(rank_descending(scores)[:32].numpy()))
    ids = prompt["batch"]["input_ids"]
    by_ids = entropyprune_faithful(tiny_llava_model, ids, inp.image_start, N, 32, P)
    with torch.no_grad():
        embeds = tiny_llava_model.model.language_model.embed_tokens(ids)
    by_embeds = entropyprune_faithful(tiny_llava_model, embeds, inp.image_start, N, 32, P)
    np.testing.assert_array_equal(by_ids.kept.numpy(), by_embeds.kept.numpy())
    np.testing.assert_array_equal(by_ids.logits.numpy(), by_embeds.logits.numpy())
    with pytest.raises(InputError, match="K' must satisfy"):
        entropyprune_faithful(tiny_llava_model, embeds, inp.image_start, N, N + 1, P)
    with pytest.raises(InputError, match="1 <= P < 4"):
        entropyprune_scores(tiny_llava_model, inp.inputs_embeds, inp.image_start, N, P=4)


def test_llava_inputs_embeds_rows(tiny_llava_model, prompt) -> None:
    inp, ids = prompt["inputs"], prompt["batch"]["input_ids"]
    fake = torch.randn(N, 64)
    built = llava_inputs_embeds(tiny_llava_model, ids, fake)
    assert (built.image_start, built.num_image) == (inp.image_start, N)
    np.testing.assert_array_equal(
        built.inputs_embeds[0, inp.image_start : inp.image_start + N].numpy(), fake.numpy()
    )
    with pytest.raises(ValueError, match="contiguous block of 575 image tokens"):
        llava_inputs_embeds(tiny_llava_model, ids, fake[:-1])


# --- budgets --------------------------------------------------------------------------------------


def test_entropyprune_budget_published_cases() -> None:
    assert [entropyprune_budget(a, 32, 2, N) for a in (64, 128, 192)] == [29, 98, 166]
    with pytest.raises(InputError, match="outside 1..576"):
        entropyprune_budget(32, 32, 2, N)


@given(avg=st.integers(1, 576), lm=st.integers(3, 80), p=st.integers(1, 2))
def test_entropyprune_budget_is_the_largest_fitting(avg: int, lm: int, p: int) -> None:
    k = (lm * avg - p * N) // (lm - p)
    if not 1 <= k <= N:
        with pytest.raises(InputError):
            entropyprune_budget(avg, lm, p, N)
        return
    got = entropyprune_budget(avg, lm, p, N)
    assert p * N + (lm - p) * got <= lm * avg < p * N + (lm - p) * (got + 1)
