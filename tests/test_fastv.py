"""FastV scores (attention of the last position at layer P−1) and the ``fastv`` strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import InputError
from runtime.llm.probe_scores import fastv_scores, rope
from runtime.strategies.registry import get_strategy
from runtime.types import ProbeOutput
from tests.strategy_fakes import THETA, make_inputs, make_probe

EXACT_TOL = 1e-9  # same maths in float64, only summation order differs
HF_ATOL = 2e-6  # Hugging Face runs the attention and the RoPE angles in float32


def _fastv_loop(probe: ProbeOutput, use_rope: bool = True, gqa: str = "repeat") -> np.ndarray:
    """Slow reference, one head and one key position at a time; the flags build wrong variants."""
    t = probe.hidden.shape[0]
    d_h = probe.q_weight.shape[0] // probe.n_head
    hidden = probe.hidden.astype(np.float64)
    groups = probe.n_head // probe.n_head_kv
    mean = np.zeros(t)
    for head in range(probe.n_head):
        kv = head // groups if gqa == "repeat" else head % probe.n_head_kv
        wq = probe.q_weight[head * d_h : (head + 1) * d_h].astype(np.float64)
        wk = probe.k_weight[kv * d_h : (kv + 1) * d_h].astype(np.float64)
        q = (wq @ hidden[-1])[None, None]
        if use_rope:
            q = rope(q, np.array([t - 1]), probe.rope_theta)
        logits = []
        for pos in range(t):
            k = (wk @ hidden[pos])[None, None]
            if use_rope:
                k = rope(k, np.array([pos]), probe.rope_theta)
            logits.append(float(q.ravel() @ k.ravel()) / math.sqrt(d_h))
        weights = np.exp(np.array(logits) - max(logits))
        mean += weights / weights.sum() / probe.n_head
    return mean[probe.image_start : probe.image_start + probe.num_image]


def _probe(hidden: np.ndarray, image_start: int, num_image: int, wq: np.ndarray, wk: np.ndarray,
           n_head: int = 1, n_head_kv: int = 1) -> ProbeOutput:
    return ProbeOutput(hidden=hidden.astype(np.float32), image_start=image_start,
                       num_image=num_image, q_weight=wq.astype(np.float32),
                       k_weight=wk.astype(np.float32), n_head=n_head, n_head_kv=n_head_kv,
                       rope_theta=THETA)


def test_fastv_hand_cases() -> None:
    eye = np.eye(2)
    # Position 0 holds [1, 0]; position 1 (last) holds [1, 0] too, so q = k1 = (cos 1, sin 1)
    # after RoPE and k0 = (1, 0): logits cos(1)/√2 and 1/√2.
    probe = _probe(np.array([[1.0, 0.0], [1.0, 0.0]]), 0, 1, eye, eye)
    expected = 1.0 / (1.0 + math.exp((1.0 - math.cos(1.0)) / math.sqrt(2.0)))
    np.testing.assert_allclose(fastv_scores(probe), [expected], atol=EXACT_TOL)
    assert not np.isclose(expected, 0.5, atol=1e-3)  # without RoPE both logits tie: 0.5
    # Identical keys everywhere (W_k = 0): uniform attention 1/T.
    probe = _probe(np.ones((5, 2)), 1, 3, eye, np.zeros((2, 2)))
    np.testing.assert_allclose(fastv_scores(probe), [0.2, 0.2, 0.2], atol=EXACT_TOL)


@pytest.mark.parametrize("n_head, n_head_kv", [(4, 2), (4, 4), (6, 2), (2, 1)])
def test_fastv_matches_loop_reference(n_head: int, n_head_kv: int) -> None:
    fake = make_probe(e=16, n_head=n_head, n_head_kv=n_head_kv, seed=n_head * 10 + n_head_kv)
    probe = fake(np.random.default_rng(5).standard_normal((9, 16)).astype(np.float32))
    scores = fastv_scores(probe)
    assert scores.shape == (9,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, _fastv_loop(probe), atol=EXACT_TOL)


def test_fastv_matches_hugging_face_llama_attention() -> None:
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, attention_bias=False,
                         rope_parameters={"rope_type": "default", "rope_theta": THETA})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = llama.LlamaAttention(config, layer_idx=1).eval()
    for linear in (attention.q_proj, attention.k_proj):  # peaky attention, not near-uniform
        torch.nn.init.normal_(linear.weight, std=0.3)
    fake = make_probe(e=32, n_head=4, n_head_kv=2, d_head=8)
    fake = type(fake)(prefix=fake.prefix, suffix=fake.suffix, n_head=4, n_head_kv=2,
                      q_weight=attention.q_proj.weight.detach().numpy().copy(),
                      k_weight=attention.k_proj.weight.detach().numpy().copy())
    probe = fake(np.random.default_rng(6).standard_normal((12, 32)).astype(np.float32))
    hidden = torch.from_numpy(probe.hidden)[None]
    positions = torch.arange(hidden.shape[1])[None]
    with torch.no_grad():
        cos_sin = llama.LlamaRotaryEmbedding(config)(hidden, positions)
        _, weights = attention(hidden, position_embeddings=cos_sin, attention_mask=None)
    # The last row of an unmasked attention equals the causal one: the last token sees all.
    expected = weights[0, :, -1, :].mean(0).numpy()[probe.image_start : probe.image_start + 12]
    np.testing.assert_allclose(fastv_scores(probe), expected, atol=HF_ATOL, err_msg="vs HF")
    # Negative controls: no RoPE, and GQA heads tiled (i % n_kv) instead of repeated (i // rep).
    for kwargs in ({"use_rope": False}, {"gqa": "tile"}):
        assert not np.allclose(_fastv_loop(probe, **kwargs), expected, atol=HF_ATOL), kwargs


def test_fastv_rejects_bad_gqa() -> None:
    probe = _probe(np.ones((3, 4)), 0, 2, np.eye(6, 4), np.eye(4), n_head=3, n_head_kv=2)
    with pytest.raises(ValueError, match=r"n_head \(3\) must be a multiple of n_head_kv \(2\)"):
        fastv_scores(probe)


def test_fastv_strategy_keeps_top_k_sorted() -> None:
    strategy = get_strategy("fastv")
    assert strategy.needs_probe
    inputs = make_inputs(n=30)
    sel = strategy.run(inputs, 7, strategy.make_options())
    scores = _fastv_loop(inputs.probe(inputs.project(inputs.encoded.features)))
    expected = np.sort(np.argsort(-scores, kind="stable")[:7])
    np.testing.assert_array_equal(sel.kept, expected)
    assert sel.kept.dtype == np.int64 and sel.counts.tolist() == [1] * 7
    np.testing.assert_array_equal(sel.tokens, inputs.encoded.features[expected])
    assert sel.report["probe_layer"] == 1
    assert sel.report["scores"]["max"] == pytest.approx(scores.max(), abs=EXACT_TOL)
    # Negative control: the lowest-attention tokens are a different set.
    assert not np.array_equal(sel.kept, np.sort(np.argsort(scores, kind="stable")[:7]))


def test_fastv_strategy_without_probe_is_an_input_error() -> None:
    strategy = get_strategy("fastv")
    with pytest.raises(InputError, match="needs the language model probe"):
        strategy.run(make_inputs(probe=False), 4, strategy.make_options())
    with pytest.raises(InputError, match="1 <= K <= N=36"):
        strategy.run(make_inputs(), 37, strategy.make_options())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 20), st.integers(0, 1000))
def test_fastv_strategy_properties(budget: int, seed: int) -> None:
    strategy = get_strategy("fastv")
    inputs = make_inputs(n=20, seed=seed)
    sel = strategy.run(inputs, budget, strategy.make_options())
    assert sel.kept.shape == (budget,) and len(set(sel.kept.tolist())) == budget
    assert np.all(np.diff(sel.kept) > 0)
    scores = fastv_scores(inputs.probe(inputs.project(inputs.encoded.features)))
    assert np.all(scores >= 0.0) and scores.sum() <= 1.0 + EXACT_TOL  # image part of a softmax
