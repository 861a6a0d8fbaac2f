"""Imports every built-in strategy module so that each registers itself."""

from runtime.strategies import baselines, entropy  # noqa: F401
