"""The one error hierarchy of the project.

CLIs catch :class:`UserError` and exit 2 with its one-line message; anything else is a bug
and crashes loudly with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user or the environment; the message is one actionable line."""

    exit_code = 2


class InputError(UserError):
    """An argument, image or prompt that cannot be used."""


class BundleError(UserError):
    """An exported bundle (manifest, ONNX or GGUF files) that is missing or not understood."""


class ModelNotFoundError(UserError):
    """An unknown model alias, an unreadable checkpoint path or an unreachable hub."""


class ContextOverflowError(UserError):
    """A prompt plus image embeddings that do not fit into the language model's context."""
