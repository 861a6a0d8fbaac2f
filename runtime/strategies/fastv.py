"""FastV (method.md §3): keep the image tokens the last prompt token attends to most at layer P−1,
read from the same llama.cpp probe as EntropyPrune."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.llm.probe_scores import fastv_scores
from runtime.selection import check_budget, top_k
from runtime.strategies.probing import probe_projected_patches, score_summary
from runtime.strategies.registry import PROBE, PROJECTOR, register
from runtime.types import PruneInputs, Selection


@dataclass(frozen=True)
class FastVOptions:
    """FastV has no options: the layer P is fixed by the exported probe."""


@register("fastv", FastVOptions, needs=(PROBE, PROJECTOR))
def fastv(inputs: PruneInputs, budget: int, options: FastVOptions) -> Selection:
    """Strategy ``fastv``: top K head-mean attention scores of the last position, ascending."""
    features = inputs.encoded.features
    budget = check_budget(budget, features.shape[0])
    probe = probe_projected_patches("fastv", inputs)
    scores = fastv_scores(probe)
    kept = np.sort(top_k(scores, budget))
    # probe_layer: P−1, the 0-based decoder layer whose queries were read (None if unknown).
    report = {"scores": score_summary(scores), "probe_layer": probe.layer}
    ones = np.ones(kept.shape[0], np.int64)
    tokens = features[kept].astype(np.float32)
    return Selection(kept=kept, tokens=tokens, counts=ones, report=report)
