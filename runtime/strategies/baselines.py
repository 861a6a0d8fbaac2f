"""Baseline strategies ``none``, ``uniform`` and ``fastervlm`` (method.md §3), no merging.

Each report carries the per-layer entropy and KL curves (as the ``entropy`` strategy's does), so
analyses can compare layer statistics across strategies; they cost O(f N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.scoring import layer_distributions
from runtime.selection import check_budget, top_k
from runtime.strategies.registry import CLS_ATTN, register
from runtime.types import EncoderOutput, PruneInputs, Selection


@dataclass(frozen=True)
class NoOptions:
    """The baselines take no options."""


@register("none", NoOptions, keeps_all=True)
def keep_all(inputs: PruneInputs, budget: int, options: NoOptions) -> Selection:
    """All N patches in raster order; ``budget`` is ignored (the unpruned reference)."""
    encoded = inputs.encoded
    return _unmerged(encoded, np.arange(encoded.num_patches, dtype=np.int64))


@register("uniform", NoOptions)
def uniform(inputs: PruneInputs, budget: int, options: NoOptions) -> Selection:
    """Patches floor((i + 0.5) N / K), i = 0..K-1: an even raster-order stride, no attention."""
    encoded = inputs.encoded
    return _unmerged(encoded, uniform_indices(encoded.num_patches, budget))


@register("fastervlm", NoOptions, needs=(CLS_ATTN,))
def fastervlm(inputs: PruneInputs, budget: int, options: NoOptions) -> Selection:
    """Top K patches by S^f, the head-mean [CLS] attention of the last computed block f."""
    encoded = inputs.encoded
    k = check_budget(budget, encoded.num_patches)
    last = layer_distributions(encoded.cls_attn[-1:])[0]
    return _unmerged(encoded, np.sort(top_k(last, k)))


def uniform_indices(num_patches: int, budget: int) -> np.ndarray:
    """[K] int64 indices floor((i + 0.5) N / K), computed exactly in integers.

    Example: ``uniform_indices(10, 4)`` -> ``[1, 3, 6, 8]``.
    """
    k = check_budget(budget, num_patches)
    i = np.arange(k, dtype=np.int64)
    return ((2 * i + 1) * num_patches) // (2 * k)


def _unmerged(encoded: EncoderOutput, kept: np.ndarray) -> Selection:
    """Selection of the ``kept`` features as they are, counts 1. The H(l)/KL(l) curves are added by
    the pipeline (``runtime.pipeline``), so a strategy that never reads the [CLS] rows does not here."""
    tokens = np.asarray(encoded.features[kept], dtype=np.float32)
    counts = np.ones(kept.shape[0], dtype=np.int64)
    return Selection(kept=kept, tokens=tokens, counts=counts, report={})
