"""What the probe's layer-P−1 states give the strategies: RoPE, per-head queries (EntropyPrune),
FastV's last-position attention scores and DART's keys.

Pure NumPy, float64 throughout; the probe's arrays come in as float32 and scores go out float64.
"""

from __future__ import annotations

import numpy as np

from runtime.types import ProbeOutput


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
    """Pre-RoPE queries of the image rows (``probe.image_rows``) at layer P−1: ``[N, n_head, d_head]`` float64.

    Split by the model's own heads (d_head = the GGUF's head size, not a fixed 128: see
    :func:`runtime.matrix_entropy.head_entropy_scores`).
    """
    return _heads(probe, probe.hidden[probe.image_rows], probe.q_weight, probe.n_head)


def _rope_keys(probe: ProbeOutput) -> np.ndarray:
    """Keys of layer P−1 at every position, RoPE at positions 0..T−1: ``[T, n_head_kv, d_head]`` float64."""
    t = probe.hidden.shape[0]
    return rope(_heads(probe, probe.hidden, probe.k_weight, probe.n_head_kv), np.arange(t), probe.rope_theta)


def probe_keys(probe: ProbeOutput) -> np.ndarray:
    """DART's keys (method.md §7): layer P−1's keys with RoPE, all heads concatenated per token,
    ``[T, n_head_kv * d_head]`` float64 for every probed position (head-major, HF order)."""
    k = _rope_keys(probe)
    return k.reshape(k.shape[0], -1)


def fastv_scores(probe: ProbeOutput) -> np.ndarray:
    """FastV scores ``[N]`` float64: head-mean attention of the last position to each image row.

    Layer P−1's q (last position) and k (all T positions), RoPE at positions 0..T−1, logits
    scaled by 1/sqrt(d_head), GQA by HF ``repeat_kv`` (query head i reads kv head
    i // (n_head / n_head_kv)), softmax over all T positions (the last one sees them all),
    mean over heads, then the columns of ``probe.image_rows``. Example: identical keys -> every score 1/T.
    """
    if probe.n_head_kv < 1 or probe.n_head % probe.n_head_kv:
        raise ValueError(
            f"n_head ({probe.n_head}) must be a multiple of n_head_kv ({probe.n_head_kv})"
        )
    t = probe.hidden.shape[0]
    q = rope(_heads(probe, probe.hidden[-1:], probe.q_weight, probe.n_head), np.array([t - 1]),
             probe.rope_theta)[0]  # [n_head, d_h]
    k = _rope_keys(probe)  # [T, n_kv, d_h]
    if k.shape[2] != q.shape[1]:
        raise ValueError(f"q and k head sizes differ: {q.shape[1]} vs {k.shape[2]}")
    k = np.repeat(k, probe.n_head // probe.n_head_kv, axis=1)  # [T, n_head, d_h], HF order
    logits = np.einsum("hd,thd->ht", q, k) / np.sqrt(q.shape[1])  # [n_head, T]
    logits -= logits.max(axis=1, keepdims=True)
    attn = np.exp(logits)
    attn /= attn.sum(axis=1, keepdims=True)
    return attn.mean(axis=0)[probe.image_rows]
