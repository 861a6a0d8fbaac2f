"""The FastAPI app of ``runtime.serve``: routes, OpenAI-shaped responses and errors, the API key check.

``create_app(assistant, config)`` serves ``POST /v1/chat/completions`` (plain or SSE streaming),
``GET /v1/models`` and ``GET /health`` (never behind the key). Requests go to one
:class:`~runtime.serve.worker.Worker`; every error answers ``{"error": {...}}`` without a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from runtime.assistant import Assistant
from runtime.serve.api import APIError, Limits, error_body, parse_chat_request, validation_message
from runtime.serve.worker import Event, Events, Failed, Finished, Piece, Ticket, Worker
from runtime.turn import Settings, TurnStats

MAX_BODY_BYTES = 20 * 2**20
DRAIN_FACTOR = 4  # read (and drop) a body up to 4x the limit before answering 413, so the client sees the answer
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}  # engine -> OpenAI


@dataclass(frozen=True)
class ServeConfig:
    """What the app serves and how much one request may hold."""

    model_name: str  # the one model id: the bundle's folder name
    defaults: Settings = field(default_factory=Settings)  # for fields a request leaves out
    api_key: str | None = None  # None: no key needed
    max_queue: int = 16  # requests waiting behind the one being answered
    max_body_bytes: int = MAX_BODY_BYTES
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.max_queue < 1 or self.max_body_bytes < 1 or self.api_key == "":
            raise ValueError(f"need max_queue >= 1, max_body_bytes >= 1 and a non-empty api_key, got "
                             f"{self.max_queue}, {self.max_body_bytes}, {self.api_key!r}")


@dataclass(frozen=True)
class Reply:
    """What every chunk of one answer repeats."""

    id: str
    created: int  # unix seconds
    model: str


def create_app(assistant: Assistant, config: ServeConfig) -> FastAPI:
    """The app; its lifespan starts and stops the worker (closing the assistant is the caller's)."""
    worker = Worker(assistant, config.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="entroprune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.config, app.state.created = worker, config, int(time.time())
    _install_error_handlers(app)
    guard = [Depends(_require_key(config.api_key))]
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=guard)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=guard)
    return app


# --- routes ---------------------------------------------------------------------------------
async def health(request: Request) -> dict[str, Any]:
    """Liveness and the worker's state (open even with an API key: it says nothing about requests)."""
    worker: Worker = request.app.state.worker
    return {"status": "ok", "model": request.app.state.config.model_name, "busy": worker.busy,
            "queued": worker.queued, "served": worker.served}


async def list_models(request: Request) -> dict[str, Any]:
    model = {"id": request.app.state.config.model_name, "object": "model", "created": request.app.state.created,
             "owned_by": "entroprune"}
    return {"object": "list", "data": [model]}


async def chat_completions(request: Request) -> Response:
    config: ServeConfig = request.app.state.config
    body = await read_body(request, config.max_body_bytes)
    query = await run_in_threadpool(parse_chat_request, body, config.model_name, config.defaults, config.limits)
    ticket = Ticket(query, Events(asyncio.get_running_loop()))
    request.app.state.worker.submit(ticket)
    reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), config.model_name)
    waiter, streaming = _Waiter(ticket, request), False
    try:
        event = await waiter.next()  # errors before the first token are plain HTTP errors
        if isinstance(event, Failed):
            raise event.error
        if query.stream:
            streaming = True  # the stream owns the ticket from here
            return _TicketStream(ticket, _sse(ticket, event, reply, query.include_usage))
        return JSONResponse(await _collect(waiter, event, reply))
    finally:
        if not streaming:
            ticket.cancel()  # a no-op once answered; stops the generation of a client that left
            ticket.events.close()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 when it passes ``limit`` bytes (declared or counted: chunked bodies too)."""
    too_big = APIError(413, f"the request body is larger than the limit of {limit} bytes", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_FACTOR * limit:
            break
    if size > limit:
        raise too_big
    return b"".join(chunks)


class _Waiter:
    """The events of one ticket, for a handler that must notice its client leaving (non-streaming)."""

    def __init__(self, ticket: Ticket, request: Request) -> None:
        self.ticket, self.request, self._checked = ticket, request, time.monotonic()

    async def next(self) -> Event:
        """The next event; a client gone (checked every DISCONNECT_POLL_S, even while pieces flow) raises."""
        while True:
            event = await self.ticket.events.get(DISCONNECT_POLL_S)
            now = time.monotonic()
            if event is None or now - self._checked >= DISCONNECT_POLL_S:
                self._checked = now
                if await self.request.is_disconnected():
                    raise APIError(400, "the client disconnected", "client_disconnected")
            if event is not None:
                return event


async def _collect(waiter: _Waiter, event: Event, reply: Reply) -> dict[str, Any]:
    """A non-streaming answer: every piece, then the ``chat.completion`` object."""
    pieces = []
    while isinstance(event, Piece):
        pieces.append(event.text)
        event = await waiter.next()
    if isinstance(event, Failed):
        raise event.error
    return completion_body(reply, "".join(pieces), event)


class _TicketStream(StreamingResponse):
    """Server-sent events that cancel their ticket however the response ends.

    Starlette listens for the client's disconnect and cancels the stream; ``finally`` then tells
    the worker, which stops generating at the next token (also when the client left before the
    first byte, when the generator never started)."""

    def __init__(self, ticket: Ticket, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.cancel()
            self.ticket.events.close()


async def _sse(ticket: Ticket, event: Event, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The role chunk, content deltas, the finish chunk (usage, timings) and ``[DONE]``."""
    yield _data(chunk_body(reply, {"role": "assistant", "content": ""}))
    while isinstance(event, Piece):
        yield _data(chunk_body(reply, {"content": event.text}))
        event = await ticket.events.get()
    if isinstance(event, Failed):  # after the first token: the error goes in the stream
        yield _data(event.error.body())
        return
    yield _data({**chunk_body(reply, {}, FINISH_REASONS[event.finish_reason]), **_extensions(event)})
    if include_usage:
        yield _data({**chunk_body(reply, {}), "choices": [], "usage": usage_body(event.stats)})
    yield "data: [DONE]\n\n"


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# --- response bodies ------------------------------------------------------------------------
def completion_body(reply: Reply, text: str, done: Finished) -> dict[str, Any]:
    """The ``chat.completion`` object, with the extension fields."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": FINISH_REASONS[done.finish_reason]}
    return {"id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
            "choices": [choice], **_extensions(done)}


def chunk_body(reply: Reply, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model,
            "choices": [choice]}


def _extensions(done: Finished) -> dict[str, Any]:
    notice = {"notice": done.notice} if done.notice else {}
    return {"usage": usage_body(done.stats), "timings": timings_body(done), **notice}


def usage_body(stats: TurnStats | None) -> dict[str, Any]:
    """OpenAI's usage (prompt = every prompt position, cached ones included) plus the image tokens."""
    if stats is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    reused = getattr(stats, "reused_positions", 0)  # engines that reuse the KV cache report it
    prompt = stats.prefill_positions + reused
    return {"prompt_tokens": prompt, "completion_tokens": stats.decode_tokens,
            "total_tokens": prompt + stats.decode_tokens, "prompt_tokens_details": {"cached_tokens": reused},
            "image_tokens_kept": stats.kept, "image_tokens_total": stats.total}


def timings_body(done: Finished) -> dict[str, Any]:
    """What ``runtime.chat --timings`` shows, in milliseconds and tokens per second."""
    s = done.stats
    if s is None:
        return {"queue_ms": round(done.queue_ms, 3)}
    return {
        "queue_ms": round(done.queue_ms, 3),
        "vision_ms": {k: round(v, 3) for k, v in s.vision_ms.items()},
        "prefill_ms": round(s.prefill_ms, 3),
        "prefill_positions": s.prefill_positions,
        "prefill_tokens_per_s": round(s.prefill_positions / max(s.prefill_ms / 1000, 1e-9), 1),
        "first_token_ms": round(s.first_token_ms, 3),
        "decode_ms": round(s.decode_ms, 3),
        "decode_tokens_per_s": round(s.decode_tokens / max(s.decode_ms / 1000, 1e-9), 1),
    }


# --- errors and the key ---------------------------------------------------------------------
def _require_key(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send the header Authorization: Bearer KEY",
                           "invalid_api_key")

    return check


def _install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style JSON for every error; a bug answers a generic 500 (uvicorn logs the traceback)."""

    async def api_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, APIError)
        headers = {"Retry-After": "1"} if err.status == 429 else {"WWW-Authenticate": "Bearer"} if err.status == 401 \
            else None
        return JSONResponse(err.body(), err.status, headers)

    async def http_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, HTTPException)
        messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        message = messages.get(err.status_code, str(err.detail))
        return JSONResponse(error_body(err.status_code, message, "not_found" if err.status_code == 404 else None),
                            err.status_code, getattr(err, "headers", None))

    async def validation_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, RequestValidationError)
        message, code, param = validation_message(err.errors())
        return JSONResponse(error_body(400, message, code, param), 400)

    async def unexpected(request: Request, err: Exception) -> Response:
        return JSONResponse(error_body(500, "internal server error; the server log has the details", "internal_error"),
                            500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
