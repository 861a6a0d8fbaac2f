"""Imports every built-in strategy module so that each registers itself."""

from runtime.strategies import (  # noqa: F401
    baselines,
    cdpruner,
    dart,
    divprune,
    entropy,
    entropyprune,
    fastv,
    visionzip,
)
