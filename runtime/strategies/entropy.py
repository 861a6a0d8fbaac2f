"""Strategy ``entropy``: entropy-adaptive dual-layer selection with mean merging (method.md §1)."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from runtime.merging import MERGE_MODES, merge_tokens
from runtime.scoring import layer_distributions, layer_entropy, layer_kl
from runtime.selection import RULES, choose_layers, select_dual, split_budget
from runtime.strategies.registry import CLS_ATTN, register
from runtime.types import PruneInputs, Selection


@dataclass(frozen=True)
class EntropyOptions:
    """Options of the ``entropy`` strategy; layer numbers are 1-based, ranges inclusive."""

    rule: str = "max-min"  # shallow rule - deep rule, or "fixed" (uses ``fixed``)
    shallow: tuple[int, int] = (6, 8)  # range searched for l_s
    deep: tuple[int, int] = (20, 21)  # range searched for l_d
    p_shallow: float = 0.4  # share of the budget picked by the shallow layer
    merge: str = "mean"  # "mean": removed patches join their nearest kept one; "none": dropped
    fixed: tuple[int, int] | None = None  # (l_s, l_d) for rule "fixed"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {', '.join(MERGE_MODES)}, got {self.merge!r}")
        if isinstance(self.p_shallow, bool) or not isinstance(self.p_shallow, Real):
            raise ValueError(f"p_shallow must be a number in [0, 1], got {self.p_shallow!r}")
        if not 0.0 <= self.p_shallow <= 1.0:
            raise ValueError(f"p_shallow must be in [0, 1], got {self.p_shallow}")
        for name in ("shallow", "deep"):
            object.__setattr__(self, name, _layer_pair(name, getattr(self, name), ordered=True))
        if (self.rule == "fixed") != (self.fixed is not None):
            raise ValueError("fixed=(l_s, l_d) is required with rule 'fixed' and only then")
        if self.fixed is not None:
            object.__setattr__(self, "fixed", _layer_pair("fixed", self.fixed, ordered=False))


@register("entropy", EntropyOptions, needs=(CLS_ATTN,))
def entropy_strategy(inputs: PruneInputs, budget: int, options: EntropyOptions) -> Selection:
    """Keep K = ``budget`` patches chosen by the entropy-selected shallow and deep layers."""
    encoded = inputs.encoded
    dists = layer_distributions(encoded.cls_attn)  # [f, N]
    entropy = layer_entropy(dists)
    choice = choose_layers(entropy, options.rule, options.shallow, options.deep, options.fixed)
    split = split_budget(budget, options.p_shallow)
    kept = select_dual(dists[choice.shallow - 1], dists[choice.deep - 1], split.k_s, split.k_d)
    merged = merge_tokens(encoded.features, kept, options.merge)
    report: dict[str, Any] = {
        "layers": {"shallow": choice.shallow, "deep": choice.deep},
        "entropy": [float(v) for v in entropy],
        "kl": [float(v) for v in layer_kl(dists)],
        "k_s": split.k_s,
        "k_d": split.k_d,
    }
    return Selection(kept=kept, tokens=merged.tokens, counts=merged.counts, report=report,
                     assignment=merged.assignment)


def _layer_pair(name: str, value: Any, ordered: bool) -> tuple[int, int]:
    """A pair of 1-based layer numbers as a tuple of ints (lo <= hi when ``ordered``)."""
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two layer numbers, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (a, b)):
        raise ValueError(f"{name} layers must be integers, got {value!r}")
    a, b = int(a), int(b)
    if min(a, b) < 1 or (ordered and a > b):
        rule = "1 <= lo <= hi" if ordered else "both >= 1"
        raise ValueError(f"{name} must satisfy {rule} (layers are numbered from 1), got {value!r}")
    return (a, b)
