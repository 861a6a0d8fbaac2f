"""``python -m runtime.chat --model DIR --image PATH``: chat about an image on a laptop.

With ``--prompt`` it answers once and exits (scriptable); without, a REPL with streaming output
and commands (``/help``). Ctrl-C stops the current answer, not the program; Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TextIO

from runtime.cli import OneLineParser, cli_flag, log, positive_int, run_cli
from runtime.errors import SettingError, UserError
from runtime.llm.backend import DEFAULT_N_CTX, KV_TYPES, set_llama_logging
from runtime.model_registry import bundle_path
from runtime.prune import add_pipeline_arguments, method_options

REPL_SETTINGS = ("tokens", "strategy", "reprune")  # settings the REPL changes with /tokens, /strategy, /reprune

HELP = """commands:
  /image PATH      chat about another image (starts a new conversation)
  /tokens K        keep K visual tokens from the next answer on
  /strategy NAME   pruning strategy from the next answer on
  /reprune on|off  question-aware strategies: prune again for every question (off: the first one)
  /reset           forget the conversation, keep the image
  /stats           timings of the last answer
  /help            this text
  /quit            leave (Ctrl-D works too)"""


class ChatBackend(Protocol):
    """What the REPL drives (``runtime.assistant.Assistant`` is one; tests use a fake)."""

    def respond(self, question: str) -> Iterator[str]: ...
    def set_image(self, image: str | Path) -> None: ...
    def update(self, **changes: object) -> None: ...
    def reset(self) -> None: ...
    def stats_lines(self) -> list[str]: ...


def stream_answer(backend: ChatBackend, question: str, out: TextIO) -> bool:
    """Print the answer as it streams; False when Ctrl-C stopped it."""
    pieces = backend.respond(question)
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()  # type: ignore[attr-defined]  # records the partial answer
        out.write(" [stopped]\n")
        return False
    out.write("\n")
    return True


def _command(backend: ChatBackend, line: str, out: TextIO) -> bool:
    """Run one ``/command``; False means quit."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        out.write(HELP + "\n")
    elif name == "/reset":
        backend.reset()
        out.write("conversation cleared\n")
    elif name == "/stats":
        out.write("\n".join(backend.stats_lines()) + "\n")
    elif name == "/image" and arg:
        sys.stderr.write("encoding image…\n")
        backend.set_image(Path(arg).expanduser())
        out.write(f"image: {arg} (new conversation)\n")
    elif name == "/tokens" and arg:
        if not (arg.isascii() and arg.isdigit()):
            raise UserError(f"/tokens needs a positive integer, got {arg!r}")
        backend.update(tokens=int(arg))
        out.write(f"tokens: {int(arg)}\n")
    elif name == "/strategy" and arg:
        backend.update(strategy=arg)
        out.write(f"strategy: {arg}\n")
    elif name == "/reprune" and arg in ("on", "off"):
        backend.update(reprune=arg == "on")
        out.write(f"reprune: {arg}\n")
    elif name == "/reprune":
        raise UserError(f"/reprune takes on or off, got {arg!r}" if arg else "/reprune needs on or off")
    elif name in ("/image", "/tokens", "/strategy"):
        raise UserError(f"{name} needs an argument (see /help)")
    else:
        raise UserError(f"unknown command {name}; /help lists the commands")
    return True


def _terminal_reader() -> Callable[[], str]:
    """Read lines with readline (history, arrow keys, line editing) from a terminal; "" at Ctrl-D."""
    import readline  # noqa: F401 - importing it gives input() line editing and history

    def read() -> str:
        try:
            return input("> ") + "\n"
        except EOFError:
            return ""

    return read


def _is_utf8(text: str) -> bool:
    """False for command-line text that held undecodable bytes (Python keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _notice(backend: ChatBackend, stderr: TextIO) -> None:
    """Say what the engine did that the user should know (turns dropped, answer cut by the context)."""
    notice = getattr(backend, "notice", None)
    if notice:
        stderr.write(f"note: {notice}\n")


def repl(backend: ChatBackend, stdin: TextIO, stdout: TextIO, stderr: TextIO, timings: bool = False) -> int:
    """Read questions and commands until /quit or end of input; errors are one line and the loop goes on."""
    interactive = stdin.isatty()
    line_editing = interactive and stdin is sys.stdin  # readline's input() writes its own prompt
    read = _terminal_reader() if line_editing else stdin.readline
    if interactive:
        stdout.write("type a question, /help for commands, Ctrl-D to quit\n")
    while True:
        if interactive and not line_editing:
            stdout.write("> ")
            stdout.flush()
        try:
            line = read()
        except UnicodeDecodeError:
            stderr.write("error: the input is not UTF-8 text; type the question again\n")
            continue
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        if not line:
            if interactive:
                stdout.write("\n")  # Ctrl-D: leave the shell prompt on a line of its own
            return 0
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/"):
                if not _command(backend, text, stdout):
                    return 0
            else:
                answered = stream_answer(backend, text, stdout)
                _notice(backend, stderr)
                if answered and timings:
                    stderr.write("\n".join(backend.stats_lines()) + "\n")
        except SettingError as err:  # a setting the REPL changes with /FIELD, else a flag of the command
            name = "/" + err.field if err.field in REPL_SETTINGS else cli_flag(err.field)
            stderr.write(f"error: {err.named(name)}\n")
        except UserError as err:
            stderr.write(f"error: {err}\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m runtime.chat", description=__doc__.splitlines()[0],
                           epilog="REPL " + HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(parser)
    parser.add_argument("--image", type=Path, default=None, help="image to chat about (or /image later)")
    parser.add_argument("--prompt", default=None, help="answer this one question and exit")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.2,
                        help="sampling temperature, 0 = greedy (default: 0.2)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("--n-ctx", type=positive_int(64, 131072), default=DEFAULT_N_CTX,
                        help=f"context length in positions; the KV cache grows with it (7B, f16: 0.5 MB per "
                             f"position) (default: {DEFAULT_N_CTX})")
    parser.add_argument("--kv-type", choices=sorted(KV_TYPES), default="f16",
                        help="KV cache type: q8_0 halves its memory, f32 doubles it (default: f16)")
    parser.add_argument("--mmap", dest="load", action="store_const", const="mmap", default="read",
                        help="memory-map the GGUF instead of reading it (faster start; with llama.cpp's "
                             "weight repacking both copies stay resident, ~2x memory) (default: read)")
    parser.add_argument("--n-gpu-layers", type=positive_int(0, 1000), default=0,
                        help="layers llama.cpp offloads to a GPU; needs llama-cpp-python built with CUDA or "
                             "Metal (see README) (default: 0, CPU only)")
    parser.add_argument("--reprune", action="store_true",
                        help="question-aware strategies (cdpruner, dart) and the probe strategies: prune the image "
                             "again for every question, re-prefilling its rows (default: off, pruned once with the "
                             "first question; REPL: /reprune on)")
    parser.add_argument("--timings", action="store_true", help="print per-stage timings to stderr after answers")
    parser.add_argument("--verbose", action="store_true",
                        help="show llama.cpp's log: buffer sizes of the weights, KV cache and compute (default: off)")
    args = parser.parse_args(argv)

    def body() -> int:
        from runtime.assistant import Assistant
        from runtime.preprocess import load_image
        from runtime.turn import Settings

        if args.prompt is not None and not _is_utf8(args.prompt):
            raise UserError("--prompt is not valid UTF-8 text")
        image = load_image(args.image) if args.image else None  # bad image: fail before loading models
        options = {k: v for k, v in method_options(args).items() if v is not None}
        settings = Settings(args.tokens, args.strategy, options, args.max_tokens, args.temperature,
                            args.top_p, args.seed, reprune=args.reprune, tile_budget=args.tile_budget,
                            newline=args.newline, positions=args.positions)
        set_llama_logging(args.verbose)
        log(f"loading {args.model}")
        bundle = bundle_path(args.model)
        assistant = Assistant.open(bundle, settings, args.threads, args.provider, args.n_ctx, args.int8,
                                   args.kv_type, args.load, args.n_gpu_layers)
        try:
            if image is not None:
                log("encoding image…")
                assistant.set_image(image)
            if args.prompt is not None:
                stream_answer(assistant, args.prompt, sys.stdout)
                _notice(assistant, sys.stderr)
                if args.timings:
                    log("\n".join(assistant.stats_lines()))
                return 0
            if sys.stdin is None:  # started with stdin closed: nothing to read
                return 0
            return repl(assistant, sys.stdin, sys.stdout, sys.stderr, args.timings)
        finally:
            assistant.close()

    return run_cli(body, "runtime.chat")


if __name__ == "__main__":
    raise SystemExit(main())
