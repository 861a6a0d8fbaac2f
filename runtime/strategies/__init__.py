"""Pruning strategies by name (``registry``); importing the package registers the built-in ones."""

from runtime.strategies import builtin  # noqa: F401  (each built-in strategy module registers itself)
