"""The OpenAI-compatible server as an app reaches it: load time, time to first token per request,
prompt positions served from the KV cache, and the server's peak memory.

``python tools/bench_serve.py --model BUNDLE [--tokens 64] [--max-tokens 32] [--threads N] [--int8]``

Starts ``python -m runtime.serve`` as a child process on 127.0.0.1 (a free port), waits until it
serves, and sends the conversation of ``tools/bench_chat.py`` through the real ``openai`` client,
streaming, as a stateless app does: every request carries the whole conversation so far (the image
inline on the first user message). The image switch is a new conversation (the server takes one
image per conversation). One warm-up request about a third photo comes first and is not measured.

Time to first token is the client's: request sent → first content delta received (HTTP, JSON,
image decode, prune, prefill and the first decode included). The cached positions are the server's
own ``usage.prompt_tokens_details.cached_tokens``. The server's peak resident memory is its
``VmHWM`` (one process: uvicorn runs in it), read just before it is stopped.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from runtime.cli import OneLineParser, log, positive_int, run_cli  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from tools.bench_chat import SCRIPT, add_conversation_arguments  # noqa: E402
from tools.benchkit.common import markdown_table, sample_images  # noqa: E402
from tools.benchkit.proctree import status_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVING = re.compile(r"serving model .* at (http://\S+/v1)")
STOP_S = 30  # how long the stopped server gets to exit before it is killed


@dataclass(frozen=True)
class Reply:
    """One streamed answer and what it cost."""

    text: str
    prompt_tokens: int  # every prompt position of the request (cached ones included)
    cached_tokens: int  # prompt positions the server kept in its KV cache
    ttft_s: float  # request sent -> first content delta received
    total_s: float  # request sent -> stream closed
    answer_tokens: int


@dataclass(frozen=True)
class Request:
    """One measured request of the conversation."""

    turn: int
    question: str
    new_image: bool
    reply: Reply


@dataclass(frozen=True)
class Served:
    """The server child: its process, its API base URL and how long it took to serve."""

    proc: subprocess.Popen[str]
    base_url: str
    load_s: float  # process start -> serving (imports, bundle and model load)


def start_server(argv: Sequence[str], timeout_s: float) -> Served:
    """Start the server (this repository's ``runtime`` first on its path) and wait for its "serving
    model ... at URL" line; a one-line error with its last log line if it exits or takes too long."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    found = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if SERVING.search(line):
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = start + timeout_s
    while not found.wait(0.1):
        if proc.poll() is not None or time.perf_counter() > deadline:
            stop_server(proc)
            last = lines[-1] if lines else f"exit status {proc.returncode}"
            why = "exited" if time.perf_counter() <= deadline else f"did not serve within {timeout_s:.0f} s"
            raise UserError(f"the server {why}: {last}")
    url = next(m.group(1) for m in map(SERVING.search, lines) if m)
    return Served(proc, url, time.perf_counter() - start)


def stop_server(proc: subprocess.Popen[str]) -> None:
    """SIGINT (the server's Ctrl-C: graceful), then kill if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def data_url(image: Image.Image) -> str:
    """A PNG ``data:`` URL, as an app sends an image inline."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_message(text: str, image: Image.Image) -> dict[str, Any]:
    """A user message with the image inline, as the first message of a conversation."""
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": data_url(image)}}]}


def ask(client: Any, model: str, messages: list[dict[str, Any]], max_tokens: int) -> Reply:
    """One streamed request, measured."""
    start = time.perf_counter()
    first, parts, usage = None, [], None
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, temperature=0.0,
                                            max_tokens=max_tokens, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    if usage is None:
        raise UserError("the server sent no usage chunk (stream_options.include_usage was asked)")
    details = usage.prompt_tokens_details
    return Reply("".join(parts), usage.prompt_tokens, details.cached_tokens if details is not None else 0,
                 first if first is not None else float("nan"), time.perf_counter() - start, usage.completion_tokens)


def run_script(client: Any, model: str, images: list[Image.Image], max_tokens: int) -> list[Request]:
    """bench_chat's conversation; an image switch starts a new conversation."""
    rows, messages = [], []
    for turn, (question, switch) in enumerate(SCRIPT, start=1):
        if switch is not None:
            messages = [image_message(question, images[switch])]
        else:
            messages.append({"role": "user", "content": question})
        reply = ask(client, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": reply.text})
        rows.append(Request(turn, question, switch is not None, reply))
    return rows


def table(rows: list[Request]) -> str:
    cells = [[r.turn, r.question + (" (new image)" if r.new_image else ""), r.reply.prompt_tokens,
              r.reply.cached_tokens, f"{r.reply.ttft_s:.2f}", f"{r.reply.total_s:.2f}", r.reply.answer_tokens]
             for r in rows]
    header = ("request", "question", "prompt positions", "cached", "TTFT s", "total s", "answer tokens")
    return markdown_table(header, cells, "rlrrrrr")


def server_argv(args: Any) -> list[str]:
    argv = [sys.executable, "-m", "runtime.serve", "--model", str(args.model), "--port", "0",
            "--tokens", str(args.tokens)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv + (["--int8"] if args.int8 else [])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python tools/bench_serve.py", description=__doc__.splitlines()[0])
    add_conversation_arguments(parser)
    parser.add_argument("--start-timeout", type=positive_int(1, 86400), default=900,
                        help="seconds to wait for the server to load and serve (default: 900)")
    args = parser.parse_args(argv)

    def body() -> int:
        try:
            from openai import OpenAI
        except ImportError as err:
            raise UserError(f"the benchmark needs the openai client: pip install 'entroprune[tools]' ({err})") from None
        images = [Image.fromarray(image) for image in sample_images(3)]  # the third only warms up
        log(f"starting python {' '.join(server_argv(args)[1:])}")
        served = start_server(server_argv(args), args.start_timeout)
        try:
            log(f"serving at {served.base_url} after {served.load_s:.1f} s")
            client = OpenAI(base_url=served.base_url, api_key="not-needed", max_retries=0, timeout=3600)
            model = client.models.list().data[0].id
            log("warming up (one request, not measured)")
            ask(client, model, [image_message("Warm-up: what is this?", images[2])], args.max_tokens)
            log("running the conversation")
            rows = run_script(client, model, images, args.max_tokens)
            peak = status_bytes(served.proc.pid, "VmHWM")
            if not peak:
                raise UserError(f"no VmHWM in /proc/{served.proc.pid}/status (did the server exit?)")
        finally:
            stop_server(served.proc)
        print(table(rows))
        print(f"\nserver: serving {served.load_s:.1f} s after start; peak resident memory {peak / 1e9:.2f} GB "
              f"(VmHWM); answers: {args.max_tokens} tokens at most, greedy; K = {args.tokens}")
        return 0

    return run_cli(body, "bench_serve")


if __name__ == "__main__":
    raise SystemExit(main())
