"""Shared plumbing of the command-line entry points: one-line errors and stderr progress."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

from runtime.errors import SettingError, UserError

# OSErrors that say something about the machine (full disk, read-only or forbidden place), shown as one line
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that ``finally`` blocks remove temporary files."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def cli_flag(field: str) -> str:
    """The flag that sets keyword argument ``field`` (flags map one to one): ``max_tokens`` -> ``--max-tokens``."""
    return "--" + field.replace("_", "-")


def run_cli(body: Callable[[], int], prog: str) -> int:
    """Run a CLI body; a :class:`UserError` becomes ``prog: error: MESSAGE`` and exit code 2.

    SIGTERM and SIGHUP unwind the body like Ctrl-C (temporary files are cleaned up on the way out).
    """
    handlers = _install_termination_handlers()
    try:
        return body()
    except SettingError as err:  # the library names the keyword argument; the user typed its flag
        print(f"{prog}: error: {err.named(cli_flag(err.field))}", file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Terminated as err:
        print(f"{prog}: stopped by {err}; temporary files removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a full disk, a read-only folder: the environment, not a bug
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"{prog}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _install_termination_handlers() -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signals can only be handled in the main thread
    return {number: signal.signal(number, _raise_terminated) for number in (signal.SIGTERM, signal.SIGHUP)}


def log(message: str, stream: TextIO | None = None) -> None:
    """Write one progress line to stderr (results go to stdout)."""
    print(message, file=stream or sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ...``) and exit code 2.

    A word that argparse took for an option but that names an existing file (``-photo.jpg``) gets
    the usual remedy appended: write it ``./-photo.jpg`` (or, for a positional, after ``--``).
    """

    _words: Sequence[str] = ()  # the command line being parsed (set by parse_known_args)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._path_hint()} (see --help)\n")

    def _path_hint(self) -> str:
        """``; -x.jpg is a file, not an option: ...`` for the first such word before ``--``, else ""."""
        words = self._words[: self._words.index("--")] if "--" in self._words else self._words
        for word in words:
            if word.startswith("-") and word != "-" and word not in self._option_string_actions \
                    and os.path.isfile(word):
                after = " or put it after --" if self._get_positional_actions() else ""
                return f"; {word} is a file, not an option: write ./{word}{after}"
        return ""


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


def positive_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (inclusive), else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    return parse
