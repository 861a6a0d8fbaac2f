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


@dataclass(frozen=True)
class Strategy:
    name: str
    run: StrategyFn
    options: type  # a frozen dataclass whose fields are the strategy's keyword options
    needs_probe: bool = False  # True when the strategy reads the language-model probe

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


def register(name: str, options: type, needs_probe: bool = False) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: register ``fn`` under ``name`` with its options dataclass."""

    def decorate(fn: StrategyFn) -> StrategyFn:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        _REGISTRY[name] = Strategy(name, fn, options, needs_probe)
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
