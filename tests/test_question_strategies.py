"""The ``cdpruner`` and ``dart`` strategies on synthetic inputs against the independent PyTorch
reference (export/reference/question.py), with negative controls through the product's code."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.dart as dart_core
import runtime.dpp as dpp_core
import runtime.strategies.cdpruner as cdpruner_module
from export.reference.question import DartStates, cdpruner_relevance, dart_select, dpp_select
from runtime.errors import InputError
from runtime.llm.probe_scores import probe_keys
from runtime.strategies.registry import get_strategy
from runtime.types import PruneInputs
from tests.strategy_fakes import make_inputs

RELEVANCE_ATOL = 1e-5  # issue 14: relevance equal to the reference within 1e-5 (both float32)
N, D, E, P = 36, 40, 48, 8  # D, E > N: full-rank kernel (past its rank, picks follow round-off)


def _clip(seed: int = 3):
    """Random CLIP-space maps: features [N, D] -> V [N, P]; question -> T [M, P] (M by its length)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((D, P)).astype(np.float32)

    def text(question: str) -> np.ndarray:
        local = np.random.default_rng(sum(map(ord, question)))
        return local.standard_normal((1 + len(question) // 40, P)).astype(np.float32)

    return text, (lambda x: np.asarray(x, np.float32) @ w)


def _cd_inputs(question: str = "what is on the table?", seed: int = 0) -> PruneInputs:
    text, image = _clip()
    return dataclasses.replace(make_inputs(n=N, d=D, e=E, probe=False, seed=seed), question=question,
                               clip_text=text, clip_image=image)


def _cd_reference(inputs: PruneInputs, budget: int, weight: float | None = None) -> np.ndarray:
    features = inputs.encoded.features
    r = cdpruner_relevance(torch.from_numpy(inputs.clip_image(features)),
                           torch.from_numpy(inputs.clip_text(inputs.question)), weight)
    return dpp_select(torch.from_numpy(inputs.project(features)), r, budget).numpy()


def _run(name: str, inputs: PruneInputs, budget: int, **options):
    chosen = get_strategy(name)
    return chosen.run(inputs, budget, chosen.make_options(**options))


@pytest.mark.parametrize("budget", [1, 5, 16, 30, N])
@pytest.mark.parametrize("seed", [0, 1])
def test_cdpruner_equals_reference(budget: int, seed: int) -> None:
    inputs = _cd_inputs(seed=seed)
    result = _run("cdpruner", inputs, budget)
    np.testing.assert_array_equal(result.kept, _cd_reference(inputs, budget))
    assert result.tokens.shape == (budget, D) and (result.counts == 1).all()
    assert result.report["dpp_picks"] <= budget


@pytest.mark.parametrize("weight", [0.3, 0.5, 0.9])  # not 0: r = 1, the first pick follows round-off
def test_cdpruner_relevance_weight_equals_reference(weight: float) -> None:
    inputs = _cd_inputs()
    result = _run("cdpruner", inputs, 12, relevance_weight=weight)
    np.testing.assert_array_equal(result.kept, _cd_reference(inputs, 12, weight))


def test_cdpruner_relevance_equals_reference() -> None:
    inputs = _cd_inputs("a much longer question " * 5)
    features = inputs.encoded.features
    got = dpp_core.relevance(inputs.clip_image(features), inputs.clip_text(inputs.question))
    expected = cdpruner_relevance(torch.from_numpy(inputs.clip_image(features)),
                                  torch.from_numpy(inputs.clip_text(inputs.question))).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=RELEVANCE_ATOL)


def test_cdpruner_question_changes_selection() -> None:
    kept = {q: tuple(_run("cdpruner", _cd_inputs(q), 10).kept) for q in ("what colour is the cat?", "count the cars")}
    assert len(set(kept.values())) == 2


def test_cdpruner_negative_control_cosine_sign(monkeypatch) -> None:
    """Dropping the released code's minus sign (relevance = +cos) must fail the equality."""
    inputs = _cd_inputs()
    expected = _cd_reference(inputs, 10)
    monkeypatch.setattr(dpp_core, "_mean_cosine", lambda v, t: -(dpp_core._unit_rows(v) @ dpp_core._unit_rows(t).T)
                        .mean(axis=1))
    assert not np.array_equal(_run("cdpruner", inputs, 10).kept, expected)


def test_cdpruner_negative_control_unweighted_kernel(monkeypatch) -> None:
    """An unweighted kernel (r = 1: plain similarity DPP) must fail the equality."""
    inputs = _cd_inputs()
    expected = _cd_reference(inputs, 10)
    monkeypatch.setattr(cdpruner_module, "relevance", lambda v, t, w=None: np.ones(v.shape[0], np.float32))
    assert not np.array_equal(_run("cdpruner", inputs, 10).kept, expected)


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(1, N), seed=st.integers(0, 50))
def test_cdpruner_exact_budget_property(budget: int, seed: int) -> None:
    kept = _run("cdpruner", _cd_inputs(seed=seed % 5), budget).kept
    assert kept.shape == (budget,) and kept.dtype == np.int64
    assert (np.diff(kept) > 0).all() and 0 <= kept[0] and kept[-1] < N


def _dart_reference(inputs: PruneInputs, budget: int, p_img: int = 4, p_txt: int = 4) -> np.ndarray:
    probe = inputs.probe(inputs.project(inputs.encoded.features), final=True)
    states = DartStates(keys=torch.from_numpy(probe_keys(probe)), hidden=torch.from_numpy(probe.final_hidden))
    return dart_select(states, probe.image_start, probe.num_image, budget, p_img, p_txt).numpy()


def _dart_inputs(seed: int = 0) -> PruneInputs:
    return dataclasses.replace(make_inputs(n=N, d=D, e=E, seed=seed), question="what is it?")


@pytest.mark.parametrize("budget", [1, 4, 5, 13, 30, N])
@pytest.mark.parametrize("pivots", [(4, 4), (1, 0), (0, 2), (6, 1)])
def test_dart_equals_reference(budget: int, pivots: tuple[int, int]) -> None:
    inputs = _dart_inputs()
    result = _run("dart", inputs, budget, pivots_image=pivots[0], pivots_text=pivots[1])
    np.testing.assert_array_equal(result.kept, _dart_reference(inputs, budget, *pivots))
    assert len(result.report["pivots_text"]) <= 2  # the fake prompt has 2 tokens after the image


def test_dart_negative_control_l2_pivots(monkeypatch) -> None:
    """Pivots by the keys' L2 norm instead of L1 must fail the equality (on some budget)."""
    inputs = _dart_inputs()
    expected = {k: _dart_reference(inputs, k) for k in (4, 8, 16)}
    monkeypatch.setattr(dart_core, "_key_norms", lambda keys: np.sqrt((keys * keys).sum(axis=1)))
    assert any(not np.array_equal(_run("dart", inputs, k).kept, expected[k]) for k in expected)


def test_dart_options_checked() -> None:
    strategy = get_strategy("dart")
    with pytest.raises(InputError, match="pivots_image"):
        strategy.make_options(pivots_image=-1)
    with pytest.raises(InputError, match="at least 1"):
        strategy.make_options(pivots_image=0, pivots_text=0)
    with pytest.raises(InputError, match="layer 3.*P=2"):
        _run("dart", _dart_inputs(), 8, layer=3)


def test_question_strategies_declare_their_needs() -> None:
    assert get_strategy("cdpruner").needs == {"question", "text_tower", "projector"}
    assert get_strategy("dart").needs == {"probe", "probe_final", "question", "projector"}
    assert get_strategy("entropy").needs == {"cls_attn"}
