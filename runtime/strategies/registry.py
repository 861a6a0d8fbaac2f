"""Strategies by name: each is a function ``(inputs, budget, options) -> Selection``.

A strategy module registers itself with :func:`register`, giving its options dataclass (frozen,
validated in ``__post_init__``, every field defaulted). The pipeline never names a strategy.
This module imports no strategy module (a leaf of the import graph): importing it runs
``runtime/strategies/__init__.py`` first, which imports the built-in ones (``builtin``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runtime.errors import InputError
from runtime.types import PruneInputs, Selection

StrategyFn = Callable[[PruneInputs, int, Any], Selection]


# What a strategy may need besides the patch features: the vision graph's score maps, the projector,
# the language-model probe (and its final-norm variant), the user's question, the CLIP text tower.
# ``runtime.strategies.capabilities`` matches them against what a bundle provides.
CLS_ATTN, KEYS, PROJECTOR = "cls_attn", "keys", "projector"
PROBE, PROBE_FINAL, QUESTION, TEXT_TOWER = "probe", "probe_final", "question", "text_tower"
NEEDS = frozenset({CLS_ATTN, KEYS, PROJECTOR, PROBE, PROBE_FINAL, QUESTION, TEXT_TOWER})


@dataclass(frozen=True)
class Strategy:
    name: str
    run: StrategyFn
    options: type  # a frozen dataclass whose fields are the strategy's keyword options
    # what it reads besides the patch features (NEEDS above); QUESTION: the user's question is
    # required (no default prompt)
    needs: frozenset[str] = frozenset()
    keeps_all: bool = False  # True: every row is kept whatever the budget (the unpruned baseline, K = N)

    @property
    def needs_probe(self) -> bool:
        return PROBE in self.needs

    @property
    def needs_question(self) -> bool:
        return QUESTION in self.needs

    def make_options(self, **overrides: Any) -> Any:
        """Build the options, ignoring ``None`` values; unknown keys are an :class:`InputError`."""
        known = {f.name for f in dataclasses.fields(self.options)}
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - known)
        if unknown:
            raise InputError(
                f"strategy {self.name!r} takes no option(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(sorted(known)) or 'none'}"
            )
        try:
            return self.options(**given)
        except ValueError as err:
            raise InputError(f"strategy {self.name!r}: {err}") from None


_REGISTRY: dict[str, Strategy] = {}


def register(name: str, options: type, needs: tuple[str, ...] = (),
             keeps_all: bool = False) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: register ``fn`` under ``name`` with its options dataclass, what it ``needs`` and
    whether it ``keeps_all`` rows (callers then use K = N, never the strategy's name)."""

    def decorate(fn: StrategyFn) -> StrategyFn:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        if not set(needs) <= NEEDS:
            raise ValueError(f"strategy {name!r} needs unknown inputs {sorted(set(needs) - NEEDS)}")
        _REGISTRY[name] = Strategy(name, fn, options, frozenset(needs), keeps_all)
        return fn

    return decorate


def available() -> list[str]:
    """Names of all registered strategies, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown strategy {name!r}; choose one of: {', '.join(available())}") from None
