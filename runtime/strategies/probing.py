"""The language-model probe as the probe-based strategies (entropyprune, fastv, dart) use it."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.types import ProbeOutput, PruneInputs


def probe_projected_patches(strategy: str, inputs: PruneInputs, final: bool = False) -> ProbeOutput:
    """Project all N features to ``[N, E]`` embeddings and run the language-model probe on them
    (``final``: the final-norm probe too, for ``ProbeOutput.final_hidden``).

    ``strategy`` names the caller in the error raised when the bundle has no probe.
    """
    if inputs.probe is None:
        raise InputError(f"strategy {strategy!r} needs the language model probe (run export.llm)")
    rows = inputs.project(inputs.encoded.features)
    probe = inputs.probe(rows, final=True) if final else inputs.probe(rows)
    n, got = inputs.encoded.num_patches, probe.image_rows.shape[0]
    if got != n:
        raise ValueError(f"probe returned {got} image rows, expected {n}")
    return probe


def score_summary(scores: np.ndarray) -> dict[str, Any]:
    """JSON-friendly min / max / mean of a score vector ``[N]``."""
    return {"min": float(scores.min()), "max": float(scores.max()), "mean": float(scores.mean())}
