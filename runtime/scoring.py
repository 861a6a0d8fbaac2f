"""Per-layer [CLS]-attention distributions, their entropies and adjacent KL (method.md §1.1-2).

Layers are numbered 1..f as in the paper; row ``l - 1`` of every ``[f, ...]`` array is layer ``l``.
All arithmetic is float64 whatever the input dtype.
"""

from __future__ import annotations

import numpy as np

KL_FLOOR = 1e-12  # both distributions are clipped below at this value before the KL's log


def layer_distributions(cls_attn: np.ndarray) -> np.ndarray:
    """[f, H, N] [CLS]->patch attention -> [f, N] float64 head means, renormalised over patches.

    The [CLS] self-attention mass is absent from the rows, so the head mean sums to less than 1;
    dividing by its sum makes each layer a distribution over the N patches.
    Example: ``[[[0.2, 0.6], [0.4, 0.4]]]`` (f=1, H=2, N=2) -> ``[[0.375, 0.625]]``.
    """
    attn = np.asarray(cls_attn)
    if attn.ndim != 3 or 0 in attn.shape:
        raise ValueError(f"cls_attn must be a non-empty [f, H, N] array, got shape {attn.shape}")
    mean = attn.astype(np.float64).mean(axis=1)
    if not np.all(np.isfinite(mean)) or np.any(mean < 0):
        raise ValueError("cls_attn must hold finite, non-negative attention probabilities")
    total = mean.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        layers = (np.flatnonzero(total[:, 0] <= 0) + 1).tolist()
        raise ValueError(f"cls_attn has no attention mass on the patches in layer(s) {layers}")
    return mean / total


def layer_entropy(dists: np.ndarray) -> np.ndarray:
    """[f, N] distributions -> [f] float64 Shannon entropies in nats, with 0 ln 0 = 0.

    Example: ``[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]`` -> ``[ln 2, 0.0]``.
    """
    s = _check_dists(dists)
    log_s = np.log(s, out=np.zeros_like(s), where=s > 0)
    return -(s * log_s).sum(axis=1)


def layer_kl(dists: np.ndarray) -> np.ndarray:
    """[f, N] distributions -> [f-1] float64 KL(l || l+1) = sum_j S^l_j ln(S^l_j / S^{l+1}_j).

    Both distributions are clipped below at ``KL_FLOOR`` (the clipped values are used both as the
    weight and inside the log, the usual ``clamp_min`` implementation); f = 1 gives an empty array.
    Example: ``[[0.5, 0.5], [0.25, 0.75]]`` -> ``[0.5 ln 2 + 0.5 ln(2/3)]`` = ``[0.1438...]``.
    """
    s = np.maximum(_check_dists(dists), KL_FLOOR)
    log_s = np.log(s)
    return (s[:-1] * (log_s[:-1] - log_s[1:])).sum(axis=1)


def _check_dists(dists: np.ndarray) -> np.ndarray:
    s = np.asarray(dists, dtype=np.float64)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"distributions must be a non-empty [f, N] array, got shape {s.shape}")
    return s
