"""The server's one worker thread: it owns the (not thread-safe) Assistant and answers queued requests in order.

Each request is a :class:`Ticket` in a bounded queue (full: HTTP 429). The worker streams the
answer back as :class:`Piece` events and ends with :class:`Finished` or :class:`Failed`; a
cancelled ticket (the client went away) is skipped, or its generation stopped at the next piece.
The worker survives any error in a request: it logs the traceback and answers a generic 500.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from runtime.assistant import Assistant
from runtime.cli import log
from runtime.errors import UserError
from runtime.serve.api import APIError, ChatQuery, ImageData, decode_image
from runtime.turn import TurnStats

POLL_S = 0.1  # how often an idle worker looks at its stop flag


@dataclass(frozen=True)
class Piece:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer ended; ``finish_reason`` is the engine's: stop, length or context."""

    finish_reason: str
    stats: TurnStats | None
    notice: str | None  # the engine's note (e.g. old turns dropped to fit the context)
    queue_ms: float  # waiting in the queue before the worker took the request


@dataclass(frozen=True)
class Failed:
    """The request failed; ``error`` says how to answer it."""

    error: APIError


Event = Piece | Finished | Failed


class Events:
    """A channel from the worker thread to the request's asyncio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._queue = loop, asyncio.Queue()
        self._pending: asyncio.Task | None = None

    def put(self, event: Event) -> bool:
        """Called by the worker; False when the event loop is gone (the server is stopping)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            return False
        return True

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (the pending read is kept, nothing is lost)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout)
        if not done:
            return None
        event, self._pending = self._pending.result(), None
        return event

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


class Ticket:
    """A queued request: what to answer, where the events go, and a cancel flag."""

    def __init__(self, query: ChatQuery, events: Events) -> None:
        self.query, self.events = query, events
        self.cancelled = threading.Event()
        self.enqueued = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(frozen=True)
class JobRecord:
    """How a request ended, as the worker saw it (for /health and tests)."""

    outcome: str  # finished | cancelled | failed | skipped (cancelled while queued)
    decode_tokens: int
    finish_reason: str | None


class Worker:
    """The thread that drives the Assistant; ``submit`` from any thread."""

    def __init__(self, assistant: Assistant, max_queue: int) -> None:
        self.assistant = assistant
        self._queue: queue.Queue[Ticket] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._image_key: str | None = None  # sha256 of the bytes of the image the engine holds (None: text)
        self._image_known = False  # False until the engine holds a known image (or none) for sure
        self.set_image_calls = 0
        self.busy = False
        self.served = 0
        self.last: JobRecord | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current request (its generation is cancelled) and skip the queued ones."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait().cancel()
            except queue.Empty:
                break
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, ticket: Ticket) -> None:
        """Queue a request, or refuse it with a 429 when the queue is full."""
        if self._stop.is_set():
            raise APIError(500, "the server is stopping", "server_stopping")
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self._queue.maxsize} requests are waiting; retry later",
                           "queue_full") from None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ticket = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            self.busy = True
            try:
                self.last = self._serve(ticket)
            finally:
                self.busy, self.served = False, self.served + 1

    def _serve(self, ticket: Ticket) -> JobRecord:
        """Answer one ticket; every error becomes a :class:`Failed` event, the worker goes on."""
        if ticket.cancelled.is_set():
            return JobRecord("skipped", 0, None)
        try:
            return self._answer(ticket)
        except APIError as err:
            failure = err
        except UserError as err:
            failure = APIError.from_user_error(err)
        except Exception:  # the worker must outlive any bug; the traceback goes to stderr
            log(f"runtime.serve: error while answering a request:\n{traceback.format_exc().rstrip()}")
            failure = APIError(500, "internal error while answering; the server log has the details", "internal_error")
        ticket.events.put(Failed(failure))
        return JobRecord("failed", 0, None)

    def _answer(self, ticket: Ticket) -> JobRecord:
        query, assistant = ticket.query, self.assistant
        queue_ms = 1000 * (time.perf_counter() - ticket.enqueued)
        self._use_image(query.image)
        assistant.update(**query.changes)
        assistant.restore(query.history)
        pieces = assistant.respond(query.question)
        cancelled = False
        try:
            for piece in pieces:
                if ticket.cancelled.is_set() or not ticket.events.put(Piece(piece)):
                    cancelled = True
                    break
        finally:
            pieces.close()  # stops generation; the engine records its stats
        stats = assistant.last_stats
        tokens = stats.decode_tokens if stats else 0
        if cancelled:
            return JobRecord("cancelled", tokens, None)
        notice = getattr(assistant, "notice", None)  # newer engines say when they dropped old turns
        ticket.events.put(Finished(assistant.finish_reason or "stop", stats, notice, queue_ms))
        return JobRecord("finished", tokens, assistant.finish_reason)

    def _use_image(self, image: ImageData | None) -> None:
        """Give the engine this request's image, unless it already holds the same bytes (encoding costs seconds)."""
        key = image.sha256 if image is not None else None
        if self._image_known and key == self._image_key:
            return
        self._image_known = False  # until set_image succeeds
        decoded: Any = decode_image(image) if image is not None else None
        self.assistant.set_image(decoded)
        self.set_image_calls += 1
        self._image_key, self._image_known = key, True
