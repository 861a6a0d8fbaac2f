"""DART (method.md §7): pivots by key L1 norm at layer P−1, then per pivot the image rows whose
final-norm hidden state is least similar to it, read from the llama.cpp probes. Kept rows
ascending, no merge; the kept rows are prefilled again from layer 0 (as for ``fastv``).

The text pivots are drawn from every token after the image in the probe's prompt (the question
and the template's ``ASSISTANT:``), as the released code does (method.md: "the text tokens after
the image").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.dart import IMAGE_PIVOTS, TEXT_PIVOTS, dart_select
from runtime.errors import InputError
from runtime.llm.probe_scores import probe_keys
from runtime.selection import check_budget
from runtime.strategies.probing import probe_projected_patches
from runtime.strategies.registry import PROBE, PROBE_FINAL, PROJECTOR, QUESTION, register
from runtime.types import PruneInputs, Selection


@dataclass(frozen=True)
class DartOptions:
    """``layer`` P (None: the bundle probe's P, 2 unless the registry says otherwise; another value
    is refused, since the keys are read where export.llm cut the probe); ``pivots_image`` p_img and
    ``pivots_text`` p_txt (default 4 and 4, at least one pivot)."""

    layer: int | None = None
    pivots_image: int = IMAGE_PIVOTS
    pivots_text: int = TEXT_PIVOTS

    def __post_init__(self) -> None:
        for name in ("pivots_image", "pivots_text"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.pivots_image + self.pivots_text < 1:
            raise ValueError("pivots_image + pivots_text must be at least 1")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 2):
            raise ValueError(f"layer must be an integer >= 2, got {self.layer!r}")


@register("dart", DartOptions, needs=(PROBE, PROBE_FINAL, QUESTION, PROJECTOR))
def dart(inputs: PruneInputs, budget: int, options: DartOptions) -> Selection:
    """Strategy ``dart``: image pivots ∪ each pivot's quota of least-similar rows, ascending."""
    features = inputs.encoded.features
    budget = check_budget(budget, features.shape[0])
    probe = probe_projected_patches("dart", inputs, final=True)
    p = None if probe.layer is None else probe.layer + 1
    if options.layer is not None and p is not None and options.layer != p:
        raise InputError(f"dart layer {options.layer} needs keys of layer {options.layer - 1}, but this bundle's "
                         f"probe is cut at P={p} (export.llm's entropyprune_layer); use layer {p}")
    if probe.final_hidden is None:
        raise InputError("dart needs the final-norm probe's hidden states (re-run export.llm)")
    image = probe.image_rows  # the strategy's candidates (LLaVA-NeXT: one tile's, never a newline row)
    text = slice(probe.image_start + probe.num_image, probe.hidden.shape[0])
    keys, hidden = probe_keys(probe), probe.final_hidden
    choice = dart_select(keys[image], keys[text], hidden[image], hidden[text], budget,
                         options.pivots_image, options.pivots_text)
    kept = choice.kept
    # pivots_image: image rows (0..N-1); pivots_text: positions after the image (0 = first token after it)
    report = {"pivots_image": choice.image_pivots.tolist(), "pivots_text": choice.text_pivots.tolist(),
              "quotas": choice.quotas.tolist(), "probe_layer": probe.layer}
    ones = np.ones(kept.shape[0], np.int64)
    return Selection(kept=kept, tokens=features[kept].astype(np.float32), counts=ones, report=report)
