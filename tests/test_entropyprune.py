"""EntropyPrune: the layer-averaged budget and the probe-based ``entropyprune`` strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import InputError
from runtime.llm.probe_scores import probe_queries, rope
from runtime.matrix_entropy import head_entropy_scores
from runtime.strategies.entropyprune import entropyprune_budget
from runtime.strategies.registry import get_strategy
from runtime.types import PruneInputs
from tests.strategy_fakes import make_inputs

EXACT_TOL = 1e-9  # same maths in float64, only summation order differs


def _scores_loop(inputs: PruneInputs) -> np.ndarray:
    """Slow reference: per image row, q = W_q h, per-head centring, h×h Gram, clipped entropy."""
    probe = inputs.probe(inputs.project(inputs.encoded.features))
    h, d_h = probe.n_head, probe.q_weight.shape[0] // probe.n_head
    out = []
    for row in range(probe.image_start, probe.image_start + probe.num_image):
        q = (probe.q_weight.astype(np.float64) @ probe.hidden[row].astype(np.float64))
        z = q.reshape(h, d_h)
        z = z - z.mean(axis=0)
        lams = np.maximum(np.linalg.eigvalsh(z @ z.T / h), 1e-10)
        out.append(-sum(lam * math.log(lam) for lam in lams) / math.log(h))
    return np.array(out)


def test_budget_hand_numbers() -> None:
    # LLaVA-1.5-7B: Lm = 32, P = 2, N = 576.
    assert entropyprune_budget(64, 32, 2, 576) == 29  # floor((2048 − 1152) / 30)
    assert entropyprune_budget(128, 32, 2, 576) == 98  # floor((4096 − 1152) / 30) = 98.13
    assert entropyprune_budget(192, 32, 2, 576) == 166  # floor((6144 − 1152) / 30) = 166.4
    assert entropyprune_budget(576, 32, 2, 576) == 576  # no pruning at all
    assert entropyprune_budget(64, 40, 2, 576) == 37  # 13B: floor((2560 − 1152) / 38) = 37.05


def test_budget_rejects_impossible_values() -> None:
    with pytest.raises(InputError, match=r"leaves -5 .* layer 2; use an average in \[37, 576\]"):
        entropyprune_budget(32, 32, 2, 576)  # floor(−128 / 30): 2 layers of 576 exceed it
    assert entropyprune_budget(37, 32, 2, 576) == 1  # the smallest valid average
    with pytest.raises(InputError, match="1 <= P < 32"):
        entropyprune_budget(64, 32, 32, 576)
    with pytest.raises(InputError, match="leaves 601 image tokens"):  # floor(18048 / 30)
        entropyprune_budget(600, 32, 2, 576)


def test_entropyprune_keeps_top_k_head_entropy_sorted() -> None:
    strategy = get_strategy("entropyprune")
    assert strategy.needs_probe
    inputs = make_inputs(n=40)
    sel = strategy.run(inputs, 9, strategy.make_options())
    scores = _scores_loop(inputs)
    expected = np.sort(np.argsort(-scores, kind="stable")[:9])
    np.testing.assert_array_equal(sel.kept, expected)
    assert sel.kept.dtype == np.int64 and sel.counts.tolist() == [1] * 9
    np.testing.assert_array_equal(sel.tokens, inputs.encoded.features[expected])
    assert sel.report["probe_layer"] == 1
    assert sel.report["scores"]["min"] == pytest.approx(scores.min(), abs=EXACT_TOL)
    assert sel.report["scores"]["max"] == pytest.approx(scores.max(), abs=EXACT_TOL)
    # Negative control: keeping the lowest entropies is another set.
    assert not np.array_equal(sel.kept, np.sort(np.argsort(scores, kind="stable")[:9]))


def test_entropyprune_scores_from_pre_rope_queries_equal_post_rope() -> None:
    inputs = make_inputs(n=30)
    probe = inputs.probe(inputs.project(inputs.encoded.features))
    q = probe_queries(probe)
    positions = np.arange(probe.image_start, probe.image_start + probe.num_image)
    np.testing.assert_allclose(head_entropy_scores(rope(q, positions, probe.rope_theta)),
                               head_entropy_scores(q), atol=1e-6,
                               err_msg="RoPE is one orthogonal map shared by every head")
    np.testing.assert_allclose(head_entropy_scores(q), _scores_loop(inputs), atol=EXACT_TOL)


def test_entropyprune_without_probe_is_an_input_error() -> None:
    strategy = get_strategy("entropyprune")
    message = "strategy 'entropyprune' needs the language model probe (run export.llm)"
    with pytest.raises(InputError) as info:
        strategy.run(make_inputs(probe=False), 4, strategy.make_options())
    assert str(info.value) == message
    with pytest.raises(InputError, match="1 <= K <= N=36"):
        strategy.run(make_inputs(), 0, strategy.make_options())
    with pytest.raises(InputError, match="takes no option"):
        strategy.make_options(layer=3)


def test_entropyprune_rejects_a_probe_with_other_image_rows() -> None:
    base = make_inputs(n=12)
    short = PruneInputs(encoded=base.encoded, project=base.project,
                        probe=lambda embeds: base.probe(embeds[:-1]))
    strategy = get_strategy("entropyprune")
    with pytest.raises(ValueError, match="probe returned 11 image rows, expected 12"):
        strategy.run(short, 3, strategy.make_options())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 20), st.integers(0, 1000))
def test_entropyprune_properties(budget: int, seed: int) -> None:
    strategy = get_strategy("entropyprune")
    sel = strategy.run(make_inputs(n=20, seed=seed), budget, strategy.make_options())
    assert sel.kept.shape == (budget,) and len(set(sel.kept.tolist())) == budget
    assert np.all(np.diff(sel.kept) > 0) and sel.kept.min() >= 0 and sel.kept.max() < 20


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64), st.integers(3, 80), st.integers(1, 4), st.integers(1, 2000))
def test_budget_properties(avg_frac: int, n_layers: int, p: int, n_image: int) -> None:
    p = min(p, n_layers - 1)
    avg = max(1, n_image * avg_frac // 64)
    exact = (n_layers * avg - p * n_image) / (n_layers - p)
    if not 1 <= math.floor(exact) <= n_image:
        with pytest.raises(InputError):
            entropyprune_budget(avg, n_layers, p, n_image)
        return
    kept = entropyprune_budget(avg, n_layers, p, n_image)
    assert kept == math.floor(exact)
    # The layer-averaged token count never exceeds the requested average.
    assert (p * n_image + (n_layers - p) * kept) / n_layers <= avg
