"""Matrix entropy (method.md §2) and the per-token head entropy of EntropyPrune.

Pure NumPy, float64 throughout; the probe's arrays come in as float32 and scores go out float64.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

EIG_FLOOR = 1e-10  # per-token head Gram eigenvalues are clipped below here (as released)
Side = Literal["auto", "gram", "covariance"]


def _as_matrix(z: np.ndarray) -> np.ndarray:
    """Check ``z`` is a non-empty ``[n, d]`` matrix and return it as float64."""
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"expected a token matrix [n >= 1, d >= 1], got shape {z.shape}")
    return z.astype(np.float64)


def normalised_spectrum(z: np.ndarray, side: Side = "auto") -> np.ndarray:
    """Eigenvalues of Σ = ZcᵀZc / tr(ZcᵀZc) (Zc: row-centred ``z [n, d]``), descending, float64.

    ``side="covariance"`` diagonalises the d×d matrix (d values), ``"gram"`` the n×n dual ZcZcᵀ
    (n values), ``"auto"`` the smaller one (the Gram when n < d). Both share the non-zero spectrum.
    Tiny negative round-off is clipped to 0. A zero trace (all rows equal) gives all zeros.
    Example: z = [[1, 0], [-1, 0], [0, 1], [0, -1]] -> [0.5, 0.5].
    """
    if side not in ("auto", "gram", "covariance"):
        raise ValueError(f"side must be 'auto', 'gram' or 'covariance', got {side!r}")
    zc = _as_matrix(z)
    zc = zc - zc.mean(axis=0)
    n, d = zc.shape
    use_gram = side == "gram" or (side == "auto" and n < d)
    m = zc @ zc.T if use_gram else zc.T @ zc
    trace = float(np.trace(m))
    if trace <= 0.0:
        return np.zeros(m.shape[0])
    eig = np.linalg.eigvalsh(m / trace)
    return np.maximum(eig, 0.0)[::-1].copy()


def spectrum_entropy(eig: np.ndarray) -> float:
    """−Σ λ ln λ of a spectrum ``[m]`` over its positive entries (0·ln 0 = 0).

    Example: [0.5, 0.5, 0.0] -> ln 2 ≈ 0.6931.
    """
    pos = eig[eig > 0.0]
    return float(-(pos * np.log(pos)).sum())


def matrix_entropy(z: np.ndarray) -> float:
    """Matrix entropy M(Z) = −Σ λ ln λ of ``z [n, d]``, on the smaller side (dual Gram when n < d).

    Example: z = [[1, 0], [-1, 0], [0, 1], [0, -1]] -> ln 2 ≈ 0.6931.
    """
    return spectrum_entropy(normalised_spectrum(z, side="auto"))


def matrix_entropy_direct(z: np.ndarray) -> float:
    """Matrix entropy of ``z [n, d]`` always through the d×d covariance (reference and benchmark).

    Example: z = [[1, 0], [-1, 0], [0, 1], [0, -1]] -> ln 2 ≈ 0.6931.
    """
    return spectrum_entropy(normalised_spectrum(z, side="covariance"))


def head_entropy_scores(queries: np.ndarray) -> np.ndarray:
    """EntropyPrune token scores ``[T]`` float64 from per-head queries ``[T, h, d_h]`` (h >= 2).

    Per token: Z = q − mean over heads, G = Z Zᵀ / h, λ = max(eig(G), 1e-10),
    score = −Σ λ ln λ / ln h. No trace normalisation (as released), so a score is not confined
    to [0, 1]: each term −λ ln λ is at most 1/e, hence score <= h / (e ln h), and it goes
    negative when an eigenvalue exceeds 1. Example: q = [[[1.0], [0.0]]] -> [0.5] (λ = 0.25, 0).
    The rows of Z are the model's own attention heads (d_h = its head size, method.md's
    Z_t ∈ R^{h×d_h}). The released code instead groups the query's dimensions in 128s: the same
    for LLaVA-1.5 (7B and 13B have d_h = 128), different elsewhere. We keep the head because the
    method defines Z_t per head (h rows, normalised by ln h), and a fixed 128 would be a magic
    width: it cannot split SmolLM2-135M's 576-wide query (9 heads of 64) or the tiny test LLaMA's
    64-wide one (4 heads of 16) at all.
    """
    q = np.asarray(queries)
    if q.ndim != 3 or q.shape[1] < 2 or q.shape[2] < 1:
        raise ValueError(f"queries must be [T, h >= 2, d_h >= 1], got shape {q.shape}")
    h = q.shape[1]
    z = q.astype(np.float64)
    z = z - z.mean(axis=1, keepdims=True)
    gram = z @ z.transpose(0, 2, 1) / h
    eig = np.maximum(np.linalg.eigvalsh(gram), EIG_FLOOR)
    return -(eig * np.log(eig)).sum(axis=1) / np.log(h)
