"""``python -m runtime.serve --model BUNDLE``: an OpenAI-compatible chat server on this machine.

FastAPI on uvicorn (the ``serve`` extra), bound to 127.0.0.1 by default: ``POST
/v1/chat/completions`` with an inline image, ``GET /v1/models``, ``GET /health``. One worker
answers requests in order; Ctrl-C stops the server. The app itself is :mod:`runtime.serve.app`.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
from typing import Any

from runtime.cli import OneLineParser, log, positive_int, run_cli
from runtime.errors import UserError
from runtime.llm.backend import DEFAULT_N_CTX
from runtime.model_registry import bundle_path
from runtime.prune import add_pipeline_arguments, method_options

PROG = "runtime.serve"
API_KEY_ENV = "ENTROPRUNE_API_KEY"
GRACE_S = 3  # on Ctrl-C, open streams get this long before they are cut


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port), or a one-line error (e.g. port in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a live listener still conflicts
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def make_server(app: Any, sock: socket.socket, log_level: str = "info") -> Any:
    """A ``uvicorn.Server`` for ``app`` on ``sock`` (run it with ``server.run(sockets=[sock])``); logs go to stderr."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # uvicorn's default is stdout
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_config=log_config, log_level=log_level,
                            timeout_graceful_shutdown=GRACE_S, lifespan="on")
    return uvicorn.Server(config)


def serve(args: argparse.Namespace) -> int:
    """Load the bundle and serve it until Ctrl-C (or SIGTERM)."""
    from runtime.assistant import Assistant
    from runtime.serve.api import Limits
    from runtime.serve.app import ServeConfig, create_app
    from runtime.turn import Settings

    sock = listen(args.host, args.port)  # before loading: a port in use fails at once
    try:
        options = {k: v for k, v in method_options(args).items() if v is not None}
        defaults = Settings(args.tokens, args.strategy, options, tile_budget=args.tile_budget, newline=args.newline,
                            positions=args.positions)
        bundle = bundle_path(args.model)
        log(f"loading {bundle}")
        assistant = Assistant.open(bundle, settings=defaults, threads=args.threads, provider=args.provider,
                                   n_ctx=args.n_ctx, int8=args.int8)
        try:
            config = ServeConfig(bundle.name, defaults, args.api_key, args.max_queue, args.max_body_mb * 2**20,
                                 Limits(args.max_messages, args.max_image_pixels))
            server = make_server(create_app(assistant, config), sock)
            host, port = sock.getsockname()[:2]
            log(f"serving model {bundle.name!r} at http://{host}:{port}/v1"
                f"{' (API key required)' if args.api_key else ''}; Ctrl-C stops")
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
                pass
            log(f"{PROG}: stopped")
            return 0
        finally:
            assistant.close()
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    try:  # the serve extra: FastAPI, uvicorn (and pydantic through FastAPI)
        import uvicorn  # noqa: F401

        from runtime.serve.api import MAX_IMAGE_PIXELS, MAX_MESSAGES
    except ImportError as err:
        print(f"{PROG}: error: the server needs FastAPI and uvicorn: pip install 'entroprune[serve]' ({err})",
              file=sys.stderr)
        return 2
    parser = OneLineParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    add_pipeline_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the server to the network (default: 127.0.0.1)")
    parser.add_argument("--port", type=positive_int(0, 65535), default=8080,
                        help="TCP port, 0 = any free one (default: 8080)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--n-ctx", type=positive_int(64, 131072), default=DEFAULT_N_CTX,
                        help=f"context length in positions (default: {DEFAULT_N_CTX})")
    parser.add_argument("--max-queue", type=positive_int(1, 4096), default=16,
                        help="requests waiting behind the one being answered; more get HTTP 429 (default: 16)")
    parser.add_argument("--max-body-mb", type=positive_int(1, 1024), default=20,
                        help="largest request body in MiB; larger gets HTTP 413 (default: 20)")
    parser.add_argument("--max-image-pixels", type=positive_int(1, 2**31), default=MAX_IMAGE_PIXELS,
                        help=f"largest image, width x height, checked before decoding (default: {MAX_IMAGE_PIXELS})")
    parser.add_argument("--max-messages", type=positive_int(1, 100000), default=MAX_MESSAGES,
                        help=f"most messages in one request (default: {MAX_MESSAGES})")
    args = parser.parse_args(argv)
    return run_cli(lambda: serve(args), PROG)

