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


class SettingError(InputError):
    """A bad value of one named setting, worded with its keyword-argument name ``field``
    (``max_tokens must be >= 1, got 0``); a front end renames it with :meth:`named`
    (a CLI to its flag: ``--max-tokens must be >= 1, got 0``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def named(self, name: str) -> InputError:
        """The same error with the setting called ``name``."""
        return InputError(f"{name} {self.problem}")


class BundleError(UserError):
    """An exported bundle (manifest, ONNX or GGUF files) that is missing or not understood."""


class ModelNotFoundError(UserError):
    """An unknown model alias, an unreadable checkpoint path or an unreachable hub."""


class ContextOverflowError(UserError):
    """A prompt plus image embeddings that do not fit into the language model's context."""
