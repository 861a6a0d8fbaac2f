"""Shared plumbing of the command-line entry points: one-line errors and stderr progress."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from runtime.errors import UserError


def run_cli(body: Callable[[], int], prog: str) -> int:
    """Run a CLI body; a :class:`UserError` becomes ``prog: error: MESSAGE`` and exit code 2."""
    try:
        return body()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def log(message: str, stream: TextIO | None = None) -> None:
    """Write one progress line to stderr (results go to stdout)."""
    print(message, file=stream or sys.stderr, flush=True)
