"""CDPruner (method.md §7): a conditional DPP over the projected features, weighted by the CLIP
relevance of each patch to the question. Kept rows ascending, no merge."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.dpp import conditional_kernel, fill_by_relevance, greedy_map, relevance
from runtime.errors import InputError
from runtime.selection import check_budget
from runtime.strategies.probing import score_summary
from runtime.strategies.registry import PROJECTOR, QUESTION, TEXT_TOWER, register
from runtime.types import PruneInputs, Selection


@dataclass(frozen=True)
class CdprunerOptions:
    """``relevance_weight`` θ in [0, 1): when given, ``r ← exp(θ / (2(1 − θ)) · r)`` (the paper's
    variant, OpenVINO's knob); None (default) uses the min-max normalised relevance itself."""

    relevance_weight: float | None = None

    def __post_init__(self) -> None:
        theta = self.relevance_weight
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not 0.0 <= theta < 1.0):
            raise ValueError(f"relevance_weight must lie in [0, 1), got {theta!r}")


@register("cdpruner", CdprunerOptions, needs=(QUESTION, TEXT_TOWER, PROJECTOR))
def cdpruner(inputs: PruneInputs, budget: int, options: CdprunerOptions) -> Selection:
    """Strategy ``cdpruner``: K rows of the DPP ``diag(r) S diag(r)`` on E = project(features)."""
    features = inputs.encoded.features
    budget = check_budget(budget, features.shape[0])
    if inputs.question is None or inputs.clip_text is None or inputs.clip_image is None:
        raise InputError("strategy 'cdpruner' needs the question and the bundle's CLIP text tower")
    r = relevance(inputs.clip_image(features), inputs.clip_text(inputs.question), options.relevance_weight)
    picks = greedy_map(conditional_kernel(inputs.project(features), r), budget)
    kept = fill_by_relevance(picks, r, budget)
    # dpp_picks: rows the greedy MAP chose; the rest (budget − dpp_picks) filled by relevance.
    report = {"relevance": score_summary(r), "dpp_picks": int(picks.shape[0])}
    ones = np.ones(kept.shape[0], np.int64)
    return Selection(kept=kept, tokens=features[kept].astype(np.float32), counts=ones, report=report)
