"""Matrix entropy (method.md §2), the per-token head entropy of EntropyPrune, RoPE and FastV scores.

Pure NumPy, float64 throughout; the probe's arrays come in as float32 and scores go out float64.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from runtime.types import ProbeOutput

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


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Hugging Face LLaMA rotate-half RoPE of ``x [T, h, d_h]`` at ``positions [T]``; same shape.

    Angles use float64 (HF uses float32: differences ~1e-6 relative at positions in the
    thousands). The result has ``x``'s dtype. Example: d_h = 2, position 1, theta any:
    [a, b] -> [a cos 1 − b sin 1, b cos 1 + a sin 1].
    """
    x = np.asarray(x)
    pos = np.asarray(positions)
    if x.ndim != 3 or x.shape[2] % 2:
        raise ValueError(f"x must be [T, h, d_h] with even d_h, got shape {x.shape}")
    if pos.shape != (x.shape[0],):
        raise ValueError(f"positions must be [{x.shape[0]}], got shape {pos.shape}")
    d_h = x.shape[2]
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, d_h, 2, dtype=np.float64) / d_h))
    angles = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, d_h/2]
    angles = np.concatenate([angles, angles], axis=1)[:, None, :]  # [T, 1, d_h]
    xf = x.astype(np.float64)
    half = d_h // 2
    rotated = np.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * np.cos(angles) + rotated * np.sin(angles)
    return out.astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else out


def _heads(probe: ProbeOutput, rows: np.ndarray, weight: np.ndarray, n_heads: int) -> np.ndarray:
    """``rows [M, d_model] @ weightᵀ`` split head-major into ``[M, n_heads, d_h]`` float64."""
    if weight.ndim != 2 or weight.shape[1] != probe.hidden.shape[1] or weight.shape[0] % n_heads:
        raise ValueError(
            f"weight must be [{n_heads}*d_head, {probe.hidden.shape[1]}], got {weight.shape}"
        )
    out = rows.astype(np.float64) @ weight.astype(np.float64).T
    return out.reshape(rows.shape[0], n_heads, weight.shape[0] // n_heads)


def probe_queries(probe: ProbeOutput) -> np.ndarray:
    """Pre-RoPE queries of the image rows at layer P−1: ``[N, n_head, d_head]`` float64."""
    rows = probe.hidden[probe.image_start : probe.image_start + probe.num_image]
    return _heads(probe, rows, probe.q_weight, probe.n_head)


def fastv_scores(probe: ProbeOutput) -> np.ndarray:
    """FastV scores ``[N]`` float64: head-mean attention of the last position to each image row.

    Layer P−1's q (last position) and k (all T positions), RoPE at positions 0..T−1, logits
    scaled by 1/sqrt(d_head), GQA by HF ``repeat_kv`` (query head i reads kv head
    i // (n_head / n_head_kv)), softmax over all T positions (the last one sees them all),
    mean over heads, then the image columns. Example: identical keys -> every score 1/T.
    """
    if probe.n_head_kv < 1 or probe.n_head % probe.n_head_kv:
        raise ValueError(
            f"n_head ({probe.n_head}) must be a multiple of n_head_kv ({probe.n_head_kv})"
        )
    t = probe.hidden.shape[0]
    positions = np.arange(t)
    q = rope(_heads(probe, probe.hidden[-1:], probe.q_weight, probe.n_head), positions[-1:],
             probe.rope_theta)[0]  # [n_head, d_h]
    k = rope(_heads(probe, probe.hidden, probe.k_weight, probe.n_head_kv), positions,
             probe.rope_theta)  # [T, n_kv, d_h]
    if k.shape[2] != q.shape[1]:
        raise ValueError(f"q and k head sizes differ: {q.shape[1]} vs {k.shape[2]}")
    k = np.repeat(k, probe.n_head // probe.n_head_kv, axis=1)  # [T, n_head, d_h], HF order
    logits = np.einsum("hd,thd->ht", q, k) / np.sqrt(q.shape[1])  # [n_head, T]
    logits -= logits.max(axis=1, keepdims=True)
    attn = np.exp(logits)
    attn /= attn.sum(axis=1, keepdims=True)
    return attn.mean(axis=0)[probe.image_start : probe.image_start + probe.num_image]
