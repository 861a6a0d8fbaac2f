"""EntropyPrune (method.md §2): keep the image tokens whose layer-(P−1) queries have the highest
head-matrix entropy, read from the llama.cpp probe.

The query of a token is split into the model's own heads ([h, d_h]), not into 128-wide groups as
in the released code (equal for LLaVA-1.5, whose d_h is 128): see
:func:`runtime.matrix_entropy.head_entropy_scores` for why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError
from runtime.llm.probe_scores import probe_queries
from runtime.matrix_entropy import head_entropy_scores
from runtime.selection import check_budget, top_k
from runtime.strategies.probing import probe_projected_patches, score_summary
from runtime.strategies.registry import PROBE, PROJECTOR, register
from runtime.types import PruneInputs, Selection


@dataclass(frozen=True)
class EntropyPruneOptions:
    """EntropyPrune has no options: the layer P is fixed by the exported probe."""


def entropyprune_budget(avg: int, n_layers: int, p: int, n_image: int) -> int:
    """Tokens K' kept after layer P for a budget ``avg`` averaged over all ``n_layers`` layers.

    K' = floor((Lm·avg − P·N) / (Lm − P)): layers 0..P−1 see all N tokens. Raises
    :class:`InputError` unless 1 <= K' <= N. Example: Lm=32, P=2, N=576, avg=64 -> 29.
    """
    if not 1 <= p < n_layers:
        raise InputError(f"pruning layer P must satisfy 1 <= P < {n_layers} (layers), got {p}")
    kept = (n_layers * avg - p * n_image) // (n_layers - p)
    if not 1 <= kept <= n_image:
        lowest = -(-(p * n_image + n_layers - p) // n_layers)  # ceil: smallest avg with K' >= 1
        raise InputError(
            f"a layer-averaged budget of {avg} leaves {kept} image tokens after layer {p}; "
            f"use an average in [{lowest}, {n_image}] ({n_layers} layers, {n_image} image tokens)"
        )
    return int(kept)


@register("entropyprune", EntropyPruneOptions, needs=(PROBE, PROJECTOR))
def entropyprune(inputs: PruneInputs, budget: int, options: EntropyPruneOptions) -> Selection:
    """Strategy ``entropyprune``: the K image queries of highest head entropy, ascending."""
    features = inputs.encoded.features
    budget = check_budget(budget, features.shape[0])
    probe = probe_projected_patches("entropyprune", inputs)
    scores = head_entropy_scores(probe_queries(probe))
    kept = np.sort(top_k(scores, budget))
    # probe_layer: P−1, the 0-based decoder layer whose queries were read (None if unknown).
    report = {"scores": score_summary(scores), "probe_layer": probe.layer}
    ones = np.ones(kept.shape[0], np.int64)
    tokens = features[kept].astype(np.float32)
    return Selection(kept=kept, tokens=tokens, counts=ones, report=report)
