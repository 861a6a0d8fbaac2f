"""Matrix entropy (dual vs direct), per-token head entropy, RoPE and probe queries."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.llm.probe_scores import probe_queries, rope
from runtime.matrix_entropy import (
    EIG_FLOOR,
    head_entropy_scores,
    matrix_entropy,
    matrix_entropy_direct,
    normalised_spectrum,
    spectrum_entropy,
)
from runtime.types import ProbeOutput
from tools import bench_matrix_entropy

SPECTRUM_TOL = 1e-6  # dual and direct share the non-zero spectrum; float64 round-off is ~1e-15
EXACT_TOL = 1e-9  # same maths in float64, only summation order differs
HAND_TOL = 1e-8  # hand values; the 1e-10 eigenvalue floor adds ~3e-9 per clipped eigenvalue
ROPE_INVARIANCE_TOL = 1e-6  # the spec's bound: RoPE is one orthogonal map shared by all heads
HF_ROPE_ATOL = 1e-4  # Hugging Face computes the angles in float32 (positions up to ~600)
THETA = 10000.0

finite = st.floats(-10, 10, allow_nan=False, width=64)


# ---- matrix entropy -------------------------------------------------------------------------

def _entropy_loop(z: np.ndarray) -> float:
    """Slow reference: explicit centring, covariance by outer products, Shannon sum."""
    n, d = z.shape
    mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
    cov = np.zeros((d, d))
    for i in range(n):
        row = np.array([z[i, j] - mean[j] for j in range(d)])
        cov += np.outer(row, row)
    if np.trace(cov) == 0.0:
        return 0.0  # one row, or all rows equal: nothing to spread
    cov /= np.trace(cov)
    return -sum(lam * math.log(lam) for lam in np.linalg.eigvalsh(cov) if lam > 0)


def test_matrix_entropy_hand_cases() -> None:
    plus = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=np.float32)
    np.testing.assert_allclose(normalised_spectrum(plus), [0.5, 0.5], atol=EXACT_TOL)
    assert matrix_entropy(plus) == pytest.approx(math.log(2), abs=EXACT_TOL)
    assert spectrum_entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(math.log(2), abs=EXACT_TOL)
    wide = np.zeros((6, 8), np.float32)  # ±e1, ±e2, ±e3 in 8 dims: n < d takes the dual side
    for i in range(3):
        wide[2 * i, i], wide[2 * i + 1, i] = 1.0, -1.0
    assert matrix_entropy(wide) == pytest.approx(math.log(3), abs=EXACT_TOL)
    assert matrix_entropy_direct(wide) == pytest.approx(math.log(3), abs=EXACT_TOL)
    rank_one = np.array([[1, 0, 0], [0, 1, 0]], np.float32)  # centred: ±(0.5, −0.5, 0)
    assert matrix_entropy(rank_one) == pytest.approx(0.0, abs=EXACT_TOL)
    assert matrix_entropy(np.ones((4, 3))) == 0.0  # zero trace: no spread at all


@pytest.mark.parametrize("n, d", [(5, 3), (3, 7), (12, 12), (1, 4), (9, 30)])
def test_matrix_entropy_matches_loop_reference(n: int, d: int) -> None:
    z = np.random.default_rng(n * 100 + d).standard_normal((n, d)).astype(np.float32)
    expected = _entropy_loop(z.astype(np.float64))
    np.testing.assert_allclose(matrix_entropy(z), expected, atol=EXACT_TOL, err_msg=f"{n}x{d}")
    np.testing.assert_allclose(matrix_entropy_direct(z), expected, atol=EXACT_TOL)


@pytest.mark.parametrize("n, d", [(16, 64), (40, 512), (200, 50), (30, 31)])
def test_dual_equals_direct_spectrum_and_entropy(n: int, d: int) -> None:
    z = np.random.default_rng(7).standard_normal((n, d)).astype(np.float32) * 3.0 + 1.0
    m = min(n, d)
    gram = normalised_spectrum(z, side="gram")
    cov = normalised_spectrum(z, side="covariance")
    assert gram.shape == (n,) and cov.shape == (d,)
    np.testing.assert_allclose(gram[:m], cov[:m], atol=SPECTRUM_TOL, err_msg="top spectra")
    assert np.all(np.abs(gram[m:]) <= SPECTRUM_TOL) and np.all(np.abs(cov[m:]) <= SPECTRUM_TOL)
    np.testing.assert_allclose(matrix_entropy(z), matrix_entropy_direct(z), atol=SPECTRUM_TOL)
    # Negative control: forgetting to centre the rows changes the spectrum (the offset is 1.0).
    raw = z.astype(np.float64)
    raw_eig = np.sort(np.linalg.eigvalsh(raw @ raw.T if n < d else raw.T @ raw))[::-1]
    raw_eig = raw_eig / raw_eig.sum()
    assert not np.allclose(raw_eig[:m], cov[:m], atol=SPECTRUM_TOL)


def test_normalised_spectrum_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[n >= 1, d >= 1\].*\(3,\)"):
        matrix_entropy(np.zeros(3))
    with pytest.raises(ValueError, match="side"):
        normalised_spectrum(np.zeros((2, 2)), side="dual")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=9),
                  elements=finite), st.floats(0.1, 10.0))
@example(np.array([[1.5e-71, 0.0], [0.0, 1.5e-71], [0.0, 0.0]]), 1.0)  # once found: + 3.0 swamps 1e-71
def test_matrix_entropy_properties(z: np.ndarray, scale: float) -> None:
    n, d = z.shape
    value = matrix_entropy(z)
    assert -EXACT_TOL <= value <= math.log(max(1, min(n - 1, d))) + EXACT_TOL  # rank <= n−1, d
    np.testing.assert_allclose(value, matrix_entropy_direct(z), atol=SPECTRUM_TOL)
    # Invariant to row order, scale and a shift — checked on values a shift by 3.0 cannot swamp
    # (multiples of 1/64: exact after the shift; a spread of 1e-71 would vanish in 3.0's ulp).
    grid = np.round(z * 64) / 64
    np.testing.assert_allclose(matrix_entropy(grid[::-1] * scale + 3.0), matrix_entropy(grid), atol=SPECTRUM_TOL)


# ---- per-token head entropy -----------------------------------------------------------------

def _head_entropy_loop(q: np.ndarray) -> np.ndarray:
    """Slow reference: one token at a time, explicit mean over heads and Gram entries."""
    t, h, d_h = q.shape
    out = np.zeros(t)
    for i in range(t):
        mean = [sum(q[i, a, c] for a in range(h)) / h for c in range(d_h)]
        z = [[q[i, a, c] - mean[c] for c in range(d_h)] for a in range(h)]
        gram = np.array([[sum(z[a][c] * z[b][c] for c in range(d_h)) / h for b in range(h)]
                         for a in range(h)])
        lams = [max(lam, EIG_FLOOR) for lam in np.linalg.eigvalsh(gram)]
        out[i] = -sum(lam * math.log(lam) for lam in lams) / math.log(h)
    return out


def test_head_entropy_hand_cases() -> None:
    # Heads 1 and 0: centred ±0.5, G eigenvalues 0.25 and 0 -> −0.25 ln 0.25 / ln 2 = 0.5.
    q = np.array([[[1.0], [0.0]]])
    np.testing.assert_allclose(head_entropy_scores(q), [0.5], atol=HAND_TOL)
    # Heads ±e1: G eigenvalues 1 and 0 -> 1 ln 1 = 0.
    q = np.array([[[1.0, 0.0], [-1.0, 0.0]]])
    np.testing.assert_allclose(head_entropy_scores(q), [0.0], atol=HAND_TOL)
    assert head_entropy_scores(np.zeros((0, 3, 4))).shape == (0,)


def test_head_entropy_is_not_confined_to_unit_interval() -> None:
    """No trace normalisation (as released): large queries go negative, spread ones exceed 1."""
    assert head_entropy_scores(np.array([[[3.0], [0.0]]]))[0] < 0.0  # λ = 2.25 > 1
    h = 8  # h−1 eigenvalues of 1/e each -> (h−1) / (e ln h) ≈ 1.24
    z = np.eye(h) - 1.0 / h  # centred simplex: G = z zᵀ / h has eigenvalues 1/h (h−1 times)
    q = (z * math.sqrt(h / math.e))[None]
    np.testing.assert_allclose(head_entropy_scores(q), [(h - 1) / (math.e * math.log(h))],
                               atol=HAND_TOL)


@pytest.mark.parametrize("t, h, d_h", [(5, 4, 8), (3, 8, 4), (4, 2, 6)])
def test_head_entropy_matches_loop_reference(t: int, h: int, d_h: int) -> None:
    q = np.random.default_rng(t * h * d_h).standard_normal((t, h, d_h)).astype(np.float32)
    np.testing.assert_allclose(head_entropy_scores(q), _head_entropy_loop(q.astype(np.float64)),
                               atol=EXACT_TOL, err_msg=f"T={t} h={h} d_h={d_h}")


def test_head_entropy_rope_invariance_and_negative_control() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((40, 8, 16)).astype(np.float32)
    positions = rng.integers(0, 600, size=40)
    before = head_entropy_scores(q)
    after = head_entropy_scores(rope(q, positions, THETA))
    np.testing.assert_allclose(after, before, atol=ROPE_INVARIANCE_TOL, err_msg="RoPE invariance")
    # Negative control: rotating each head by a different angle is not one shared orthogonal map.
    per_head = np.stack([rope(q[:, i : i + 1], positions + 7 * i, THETA)[:, 0]
                         for i in range(q.shape[1])], axis=1)
    assert not np.allclose(head_entropy_scores(per_head), before, atol=ROPE_INVARIANCE_TOL)


def test_head_entropy_dual_matches_covariance_side() -> None:
    """G = Z Zᵀ / h (h×h) has the non-zero spectrum of Zᵀ Z / h (d_h×d_h)."""
    q = np.random.default_rng(11).standard_normal((6, 4, 16))
    z = q - q.mean(axis=1, keepdims=True)
    lam = np.maximum(np.linalg.eigvalsh(z.transpose(0, 2, 1) @ z / 4), EIG_FLOOR)
    direct = -(lam * np.log(lam)).sum(axis=1) / math.log(4)
    np.testing.assert_allclose(head_entropy_scores(q), direct, atol=SPECTRUM_TOL)


def test_head_entropy_rejects_one_head() -> None:
    with pytest.raises(ValueError, match=r"h >= 2.*\(3, 1, 4\)"):
        head_entropy_scores(np.zeros((3, 1, 4)))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 6), st.integers(1, 5)),
                  elements=finite), st.randoms(use_true_random=False))
def test_head_entropy_properties(q: np.ndarray, rnd) -> None:
    h = q.shape[1]
    scores = head_entropy_scores(q)
    assert scores.shape == (q.shape[0],) and scores.dtype == np.float64
    assert np.all(scores <= h / (math.e * math.log(h)) + EXACT_TOL)  # −λ ln λ <= 1/e
    perm = list(range(h))
    rnd.shuffle(perm)
    shift = np.arange(q.shape[2], dtype=np.float64)
    np.testing.assert_allclose(head_entropy_scores(q[:, perm] + shift), scores, atol=SPECTRUM_TOL,
                               err_msg="head order and a shared shift must not matter")


# ---- RoPE and probe queries -----------------------------------------------------------------

def test_rope_hand_case_and_identity_at_zero() -> None:
    x = np.array([[[1.0, 2.0]]])
    c, s = math.cos(1.0), math.sin(1.0)
    np.testing.assert_allclose(rope(x, np.array([1]), THETA), [[[c - 2 * s, 2 * c + s]]],
                               atol=EXACT_TOL)
    y = np.random.default_rng(0).standard_normal((3, 2, 8)).astype(np.float32)
    out = rope(y, np.zeros(3, np.int64), THETA)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, y)


def test_rope_matches_hugging_face() -> None:
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": THETA})
    t, h, d_h = 10, 4, 16
    x = np.random.default_rng(1).standard_normal((t, h, d_h)).astype(np.float32)
    positions = np.array([0, 1, 2, 3, 50, 100, 200, 300, 500, 599])
    xt = torch.from_numpy(x).transpose(0, 1)[None]  # [1, h, T, d_h]
    cos, sin = llama.LlamaRotaryEmbedding(config)(xt, torch.from_numpy(positions)[None])
    expected, _ = llama.apply_rotary_pos_emb(xt, xt, cos, sin)
    expected = expected[0].transpose(0, 1).numpy()
    np.testing.assert_allclose(rope(x, positions, THETA), expected, atol=HF_ROPE_ATOL)
    # Negative control: GPT-J style interleaved pairs (2i, 2i+1) instead of rotate-half.
    xi = x.reshape(t, h, d_h // 2, 2).transpose(0, 1, 3, 2).reshape(t, h, d_h)
    wrong = rope(xi, positions, THETA).reshape(t, h, 2, d_h // 2).transpose(0, 1, 3, 2)
    assert not np.allclose(wrong.reshape(t, h, d_h), expected, atol=HF_ROPE_ATOL)


def test_probe_queries_head_major_layout() -> None:
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((7, 6)).astype(np.float32)
    wq = rng.standard_normal((3 * 4, 6)).astype(np.float32)
    probe = ProbeOutput(hidden=hidden, image_start=2, num_image=4, q_weight=wq,
                        k_weight=wq[:4], n_head=3, n_head_kv=1, rope_theta=THETA)
    q = probe_queries(probe)
    assert q.shape == (4, 3, 4) and q.dtype == np.float64
    for head in range(3):  # head `head` is rows head*4 .. head*4+3 of W_q
        np.testing.assert_allclose(q[:, head], hidden[2:6].astype(np.float64)
                                   @ wq[head * 4 : head * 4 + 4].T.astype(np.float64),
                                   atol=EXACT_TOL, err_msg=f"head {head}")


# ---- boundaries -----------------------------------------------------------------------------

def test_runtime_modules_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import runtime.matrix_entropy, runtime.strategies.builtin")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_tool_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_matrix_entropy.main(["--n", "4", "12", "--d", "3", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["n", "d"] and len(out) == 5
