"""Shared plumbing of the command-line entry points: one-line errors and stderr progress."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TextIO

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
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def log(message: str, stream: TextIO | None = None) -> None:
    """Write one progress line to stderr (results go to stdout)."""
    print(message, file=stream or sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def layer_range(text: str) -> tuple[int, int]:
    """Parse ``LO-HI`` (or a single ``L``) into an inclusive 1-based layer range."""
    lo, sep, hi = text.partition("-")
    try:
        pair = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer range like 6-8, got {text!r}") from None
    return pair


def layer_pair(text: str) -> tuple[int, int]:
    """Parse ``LS,LD`` (shallow and deep layer for the ``fixed`` rule)."""
    parts = text.split(",")
    try:
        shallow, deep = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two layers like 6,20, got {text!r}") from None
    return shallow, deep
