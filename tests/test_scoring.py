"""Layer distributions, entropies and KL (method.md §1.1-2): hand cases, loops, controls."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from runtime.scoring import KL_FLOOR, layer_distributions, layer_entropy, layer_kl

EXACT = 1e-12  # float64 closed forms and loop references differ only in summation order
RANDOM_SHAPE = (7, 4, 50)  # f, H, N of the seeded random comparisons


def random_attention(seed: int, shape: tuple[int, int, int] = RANDOM_SHAPE) -> np.ndarray:
    """Softmax-like [f, H, N] rows with some exact zeros and mass left for [CLS]."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=shape)
    rows = np.exp(logits) * (rng.random(shape) > 0.1)
    return (0.9 * rows / rows.sum(axis=2, keepdims=True)).astype(np.float32)


def loop_distributions(cls_attn: np.ndarray) -> list[list[float]]:
    f, h, n = cls_attn.shape
    out = []
    for layer in range(f):
        mean = [sum(float(cls_attn[layer, head, j]) for head in range(h)) / h for j in range(n)]
        total = sum(mean)
        out.append([m / total for m in mean])
    return out


def loop_entropy(dists: list[list[float]]) -> list[float]:
    return [-sum(p * math.log(p) for p in row if p > 0) for row in dists]


def loop_kl(dists: list[list[float]]) -> list[float]:
    out = []
    for a, b in zip(dists[:-1], dists[1:], strict=True):
        total = 0.0
        for p, q in zip(a, b, strict=True):
            p, q = max(p, KL_FLOOR), max(q, KL_FLOOR)
            total += p * math.log(p / q)
        out.append(total)
    return out


def test_hand_computed_distribution_entropy_kl() -> None:
    attn = np.array([[[0.2, 0.6], [0.4, 0.4]], [[0.1, 0.3], [0.1, 0.3]]], dtype=np.float32)
    dists = layer_distributions(attn)
    assert dists.dtype == np.float64 and dists.shape == (2, 2)
    np.testing.assert_allclose(dists, [[0.375, 0.625], [0.25, 0.75]], rtol=1e-7,
                               err_msg="head mean renormalised over patches")  # float32 input
    entropy = layer_entropy(np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(entropy, [math.log(2), 0.0], atol=EXACT, err_msg="0 ln 0 = 0")
    kl = layer_kl(np.array([[0.5, 0.5], [0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    np.testing.assert_allclose(kl, [expected], rtol=EXACT, err_msg="KL(l || l+1)")


def test_uniform_distribution_has_entropy_ln_n_and_zero_kl() -> None:
    dists = np.full((3, 9), 1 / 9)
    np.testing.assert_allclose(layer_entropy(dists), [math.log(9)] * 3, rtol=EXACT)
    np.testing.assert_allclose(layer_kl(dists), [0.0, 0.0], atol=EXACT)


def test_kl_clips_zeros_instead_of_returning_inf() -> None:
    kl = layer_kl(np.array([[1.0, 0.0], [0.0, 1.0]]))
    expected = math.log(1.0 / KL_FLOOR) + KL_FLOOR * math.log(KL_FLOOR)
    assert np.isfinite(kl).all()
    np.testing.assert_allclose(kl, [expected], rtol=EXACT, err_msg="1e-12 floor on both sides")


def test_single_layer_has_empty_kl() -> None:
    kl = layer_kl(np.array([[0.5, 0.5]]))
    assert kl.shape == (0,) and kl.dtype == np.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(seed: int) -> None:
    attn = random_attention(seed)
    ref = loop_distributions(attn)
    dists = layer_distributions(attn)
    np.testing.assert_allclose(dists, ref, rtol=EXACT, err_msg="distributions vs loop")
    np.testing.assert_allclose(layer_entropy(dists), loop_entropy(ref), rtol=EXACT,
                               err_msg="entropy vs loop")
    np.testing.assert_allclose(layer_kl(dists), loop_kl(ref), rtol=1e-10, atol=EXACT,
                               err_msg="KL vs loop")


def test_negative_controls_fail_at_the_same_tolerance() -> None:
    attn = random_attention(3)
    ref = loop_distributions(attn)
    dists = layer_distributions(attn)
    unnormalised = attn.astype(np.float64).mean(axis=1)  # forgot to drop the [CLS] mass
    assert not np.allclose(layer_entropy(unnormalised), loop_entropy(ref), rtol=EXACT)
    base2 = -(dists * np.log2(np.where(dists > 0, dists, 1.0))).sum(axis=1)  # bits, not nats
    assert not np.allclose(base2, loop_entropy(ref), rtol=EXACT)
    reversed_kl = layer_kl(dists[::-1])[::-1]  # KL(l+1 || l)
    assert not np.allclose(reversed_kl, loop_kl(ref), rtol=1e-10, atol=EXACT)


@pytest.mark.parametrize("shape", [(4, 5), (0, 2, 3), (2, 0, 3), (1, 2, 3, 4)])
def test_bad_attention_shapes_name_expected_and_actual(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\[f, H, N\].*" + re.escape(str(shape))):
        layer_distributions(np.ones(shape))


def test_attention_without_patch_mass_is_rejected() -> None:
    attn = np.ones((3, 2, 4))
    attn[1] = 0.0
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\]"):
        layer_distributions(attn)
    with pytest.raises(ValueError, match="finite"):
        layer_distributions(np.full((1, 1, 2), np.nan))


def test_bad_distribution_shape() -> None:
    with pytest.raises(ValueError, match=r"\[f, N\].*\(3,\)"):
        layer_entropy(np.ones(3))
