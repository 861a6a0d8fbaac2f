"""DivPrune: max-min diversity on the projected embeddings."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import InputError
from runtime.strategies.divprune import cosine_distance, divprune_indices
from runtime.strategies.registry import get_strategy
from tests.strategy_fakes import make_inputs

EXACT_TOL = 1e-12  # float64 dot products of unit vectors
EMBED_TOL = 1e-5  # the ONNX float32 projector on 576 rows vs on the 64 kept rows: row-wise, same ops


def _greedy_loop(dist: np.ndarray, k: int) -> list[int]:
    """Slow reference of the selection: min over the picked set recomputed at every step."""
    n = dist.shape[0]
    nearest_other = [min((dist[i][j] for j in range(n) if j != i), default=math.inf)
                     for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest_other[i], -i))]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(dist[i][p] for p in picked), -i)))
    return sorted(picked)


def _divprune_loop(embeds: np.ndarray, k: int) -> list[int]:
    """Slow reference: explicit cosine distances, then :func:`_greedy_loop`."""
    e = embeds.astype(np.float64)
    n = e.shape[0]
    norms = [max(math.sqrt(float(e[i] @ e[i])), 1e-6) for i in range(n)]
    dist = [[1.0 - float(e[i] @ e[j]) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]
    return _greedy_loop(np.array(dist), k)


def _circle(degrees: list[float]) -> np.ndarray:
    return np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def test_cosine_distance_hand_case() -> None:
    dist = cosine_distance(np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]))
    np.testing.assert_allclose(dist, [[0, 1, 2], [1, 0, 1], [2, 1, 0]], atol=EXACT_TOL)


def test_divprune_hand_case() -> None:
    # 0°, 10°, 180°: nearest-other distances 0.015, 0.015, 1.985 -> 180° first; then 0° (2.0).
    dist = cosine_distance(_circle([0, 10, 180]))
    np.testing.assert_array_equal(divprune_indices(dist, 1), [2])
    np.testing.assert_array_equal(divprune_indices(dist, 2), [0, 2])
    np.testing.assert_array_equal(divprune_indices(dist, 3), [0, 1, 2])
    # Ties go to the smaller index: 0°, 90°, 180°, 270° all have nearest distance 1.
    square = cosine_distance(_circle([0, 90, 180, 270]))
    np.testing.assert_array_equal(divprune_indices(square, 2), [0, 2])


def test_divprune_duplicates_never_repeat_an_index() -> None:
    dist = cosine_distance(np.ones((5, 3)))  # all distances 0
    np.testing.assert_array_equal(divprune_indices(dist, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(divprune_indices(cosine_distance(np.ones((1, 3))), 1), [0])


@pytest.mark.parametrize("n, k", [(50, 1), (50, 10), (120, 40), (200, 64), (30, 30)])
def test_divprune_matches_loop_reference(n: int, k: int) -> None:
    embeds = np.random.default_rng(n + k).standard_normal((n, 6)).astype(np.float32)
    got = divprune_indices(cosine_distance(embeds), k)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _divprune_loop(embeds, k), err_msg=f"N={n} K={k}")
    # Negative control: starting from token 0 (a common shortcut) gives another set.
    if 1 < k < n:
        dist = cosine_distance(embeds)
        picked = [0]
        while len(picked) < k:
            nearest = dist[picked].min(axis=0)
            nearest[picked] = -np.inf
            picked.append(int(np.argmax(nearest)))
        assert not np.array_equal(np.sort(picked), got)


def test_divprune_strategy_selects_on_projected_embeddings() -> None:
    strategy = get_strategy("divprune")
    inputs = make_inputs(n=60, d=12, e=5)
    sel = strategy.run(inputs, 15, strategy.make_options())
    embeds = inputs.project(inputs.encoded.features)
    np.testing.assert_array_equal(sel.kept, _divprune_loop(embeds, 15))
    np.testing.assert_array_equal(sel.tokens, inputs.encoded.features[sel.kept])
    assert sel.counts.tolist() == [1] * 15
    # Negative control: selecting on the raw features is a different set.
    assert not np.array_equal(sel.kept, _divprune_loop(inputs.encoded.features, 15))
    with pytest.raises(InputError, match="1 <= K <= N=60"):
        strategy.run(inputs, 61, strategy.make_options())


@pytest.fixture(scope="module")
def divprune_case(tiny_bundle, photos) -> dict:
    """The tiny bundle's pipeline on one photo: encoder output, E = projector(all features), result."""
    from runtime.pipeline import Pipeline

    pipeline = Pipeline(tiny_bundle)
    encoded = pipeline.encoder.encode(pipeline.pixel_values(photos["coffee"]))
    return {"pipeline": pipeline, "encoded": encoded, "all": pipeline.projector(encoded.features),
            "result": pipeline.prune_encoded(encoded, 64, "divprune")}


def test_divprune_through_the_pipeline_feeds_the_rows_it_selected_on(divprune_case) -> None:
    """The LLM gets exactly the projected rows DivPrune measured diversity on: E[kept], kept = DivPrune(E)."""
    result, embeds = divprune_case["result"], divprune_case["all"]
    assert result.embeddings.shape == (64, embeds.shape[1]) and result.counts.tolist() == [1] * 64
    np.testing.assert_array_equal(result.kept, _greedy_loop(cosine_distance(embeds), 64))
    np.testing.assert_allclose(result.embeddings, embeds[result.kept], rtol=0, atol=EMBED_TOL,
                               err_msg="pipeline embeddings != projector(all features)[kept]")


def test_divprune_negative_control_projected_twice(divprune_case, monkeypatch) -> None:
    """A strategy that hands the pipeline E[kept] instead of the features gets projected twice and fails."""
    from runtime.strategies import registry

    strategy = get_strategy("divprune")

    def projected_tokens(inputs, budget, options):
        sel = strategy.run(inputs, budget, options)
        return dataclasses.replace(sel, tokens=inputs.project(inputs.encoded.features)[sel.kept])

    monkeypatch.setitem(registry._REGISTRY, "divprune", dataclasses.replace(strategy, run=projected_tokens))
    bad = divprune_case["pipeline"].prune_encoded(divprune_case["encoded"], 64, "divprune")
    np.testing.assert_array_equal(bad.kept, divprune_case["result"].kept)
    assert not np.allclose(bad.embeddings, divprune_case["all"][bad.kept], rtol=0, atol=EMBED_TOL)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.data())
def test_divprune_properties(n: int, data: st.DataObject) -> None:
    budget = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 10_000))
    embeds = np.random.default_rng(seed).integers(-2, 3, size=(n, 3)).astype(np.float32)
    dist = cosine_distance(embeds)  # small integer vectors: many exact ties
    kept = divprune_indices(dist, budget)
    assert kept.shape == (budget,) and len(set(kept.tolist())) == budget
    assert np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(kept, _greedy_loop(dist, budget))  # same distances, same ties
    if budget < n:  # greedy: each budget's picks contain the smaller budget's
        assert set(kept.tolist()) <= set(divprune_indices(dist, budget + 1).tolist())
