"""The OpenAI-compatible server, started for real on 127.0.0.1 against the tiny LLaVA bundle.

Clients are the real ``openai`` package and raw ``httpx``; the worker's counters (``app.state.worker``)
show what happened inside: images encoded, generations cancelled.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from runtime.assistant import Assistant
from runtime.serve.api import APIError, ChatRequest, Limits, settings_changes
from runtime.serve.app import ServeConfig, create_app
from runtime.serve.cli import listen, main, make_server
from runtime.turn import Settings

pytestmark = pytest.mark.llm

MAX_BODY = 2**20  # 1 MiB: oversize bodies stay quick to send
PIXEL_LIMIT = 1_000_000
KEY = "sesame"
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass(frozen=True)
class Running:
    url: str
    app: Any
    assistant: Assistant

    @property
    def worker(self) -> Any:
        return self.app.state.worker

    def chat(self, payload: Any, timeout: Any = 60, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=payload, timeout=timeout, **kwargs)


@contextmanager
def running_server(bundle: Path, **config: Any) -> Iterator[Running]:
    """The app on a free port, served by uvicorn in a background thread; stopped on exit."""
    assistant = Assistant.open(bundle, settings=Settings(temperature=0.0), threads=2)
    app = create_app(assistant, ServeConfig(bundle.name, Settings(temperature=0.0), **config))
    sock = listen("127.0.0.1", 0)
    server = make_server(app, sock, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", app, assistant)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assistant.close()


@pytest.fixture(scope="module")
def server(tiny_llm_bundle: Path) -> Iterator[Running]:
    limits = Limits(max_messages=16, max_image_pixels=PIXEL_LIMIT)
    with running_server(tiny_llm_bundle, max_queue=2, max_body_bytes=MAX_BODY, limits=limits) as running:
        yield running


def png(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 10), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (and its CRC) is patched to claim ``width`` x ``height``: a decompression bomb header."""
    data = bytearray(png((1, 1)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def user(text: str, *urls: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": parts}


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> dict[str, Any]:
    """An OpenAI-style error body with this status (and message fragment), no traceback."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and "\n" not in error["message"]
    assert fragment.lower() in error["message"].lower(), error["message"]
    return error


def wait_idle(worker: Any, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while (worker.busy or worker.queued) and time.monotonic() - start < timeout:
        time.sleep(0.01)
    assert not worker.busy and not worker.queued, "the worker did not become idle"
    return time.monotonic() - start


# --- the openai client ----------------------------------------------------------------------
def test_openai_client_plain_and_streaming(server: Running) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "Be brief."}, user("What is in the picture?", data_url(png()))]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"visual_tokens": 32, "strategy": "fastervlm"})
    assert reply.object == "chat.completion" and reply.model == model and reply.id.startswith("chatcmpl-")
    assert reply.created > 0 and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage.model_dump()
    assert usage["image_tokens_kept"] == 32 and usage["image_tokens_total"] == 576
    assert usage["prompt_tokens"] > 32 and 0 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    timings = reply.model_dump()["timings"]
    assert timings["prefill_ms"] > 0 and timings["first_token_ms"] > 0 and "decode_tokens_per_s" in timings

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True,
                                            extra_body={"visual_tokens": 32, "strategy": "fastervlm"})
    chunks = list(stream)  # the client stops at data: [DONE]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.model_dump()["image_tokens_kept"] == 32
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == choice.message.content  # greedy: the same answer both ways


def test_sse_wire_format_ends_with_done(server: Running) -> None:
    payload = {"messages": [user("Hi", data_url(png()))], "max_tokens": 3, "stream": True,
               "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["image_tokens_kept"] == 64  # include_usage
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


# --- bad input ------------------------------------------------------------------------------
BAD_REQUESTS = {
    "bad base64": (400, "base64", {"messages": [user("x", "data:image/png;base64,@@not base64@@")]}),
    "not an image": (400, "not an image", {"messages": [user("x", data_url(b"hello, world"))]}),
    "gif": (400, "png, jpeg or webp", {"messages": [user("x", data_url(png(fmt="GIF"), "image/gif"))]}),
    "bomb header": (400, "decompression bomb", {"messages": [user("x", data_url(png_claiming(100_000, 100_000)))]}),
    "over pixel limit": (400, "pixels", {"messages": [user("x", data_url(png_claiming(2000, 1000)))]}),
    "unknown model": (404, "does not exist", {"model": "gpt-4o", "messages": [user("x")]}),
    "no messages": (400, "must not be empty", {"messages": []}),
    "missing messages": (400, "messages", {"model": None}),
    "two images": (400, "one image per conversation", {"messages": [user("x", data_url(png()), data_url(png()))]}),
    "image later": (400, "first user message", {"messages": [
        user("a"), {"role": "assistant", "content": "b"}, user("c", data_url(png()))]}),
    "http image": (400, "not fetched", {"messages": [user("x", "https://example.com/cat.png")]}),
    "ends with assistant": (400, "end with a user message", {"messages": [user("x"), {"role": "assistant",
                                                                                      "content": "y"}]}),
    "tool role": (400, "role", {"messages": [{"role": "tool", "content": "x"}]}),
    "too many messages": (400, "too many messages", {"messages": [user("x"), {"role": "assistant", "content": "y"}]
                                                     * 8 + [user("z")]}),
    "bad temperature": (400, "temperature", {"messages": [user("x")], "temperature": -1}),
    "bad max_tokens": (400, "max_tokens must be >= 1, got 0", {"messages": [user("x")], "max_tokens": 0}),
    "bad budget": (400, "visual_tokens must be in 1..", {"messages": [user("x")], "visual_tokens": 5000}),
    "bad strategy": (400, "strategy", {"messages": [user("x", data_url(png()))], "strategy": "nope"}),
    "context overflow": (400, "context", {"messages": [user("hello world " * 1500)], "max_tokens": 4}),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_are_openai_style_errors(server: Running, name: str) -> None:
    status, fragment, payload = BAD_REQUESTS[name]
    error = assert_error(server.chat(payload), status, fragment)
    if name == "context overflow":
        assert error["code"] == "context_length_exceeded"
    if name in ("bad max_tokens", "bad budget"):
        assert error["param"] == {"bad max_tokens": "max_tokens", "bad budget": "visual_tokens"}[name]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_settings_errors_name_the_request_field(field: str) -> None:
    """Settings speak keyword arguments, which are the API's field names: no CLI flag reaches a client."""
    request = ChatRequest.model_validate({"messages": [user("x")], field: 0})
    with pytest.raises(APIError) as info:
        settings_changes(request, Settings())
    error = info.value
    assert (error.status, error.message, error.code, error.param) == (
        400, "max_tokens must be >= 1, got 0", "invalid_value", "max_tokens")


def test_bad_json_and_unknown_routes(server: Running) -> None:
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=10), 400, "json")
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", content=b"[1, 2]", timeout=10), 400)
    assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=10), 404)
    assert_error(httpx.get(f"{server.url}/v1/chat/completions", timeout=10), 405)


def test_oversize_bodies_get_413(server: Running) -> None:
    payload = json.dumps({"messages": [user("x" * (MAX_BODY + 1000))]}).encode()
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", content=payload, timeout=30), 413, "limit")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]

    assert_error(httpx.post(f"{server.url}/v1/chat/completions", content=chunked(), timeout=30), 413, "limit")


def test_api_key(tiny_llm_bundle: Path) -> None:
    with running_server(tiny_llm_bundle, api_key=KEY) as keyed:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            assert_error(httpx.get(f"{keyed.url}/v1/models", headers=headers, timeout=10), 401, "api key")
            assert_error(keyed.chat({"messages": [user("x")]}, headers=headers), 401)
        good = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{keyed.url}/v1/models", headers=good, timeout=10).json()["data"][0]["id"] == "bundle"
        assert keyed.chat({"messages": [user("x")], "max_tokens": 2}, headers=good).status_code == 200
        assert httpx.get(f"{keyed.url}/health", timeout=10).json()["status"] == "ok"  # /health stays open


# --- queue, disconnects, errors inside the worker ----------------------------------------------
def test_concurrent_requests_are_answered_or_refused(server: Running) -> None:
    barrier, results = threading.Barrier(8), []
    payload = {"messages": [user("Describe it.", data_url(png()))], "max_tokens": 200, "temperature": 0}

    def call() -> None:
        barrier.wait()
        results.append(server.chat(payload))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    statuses = sorted(r.status_code for r in results)
    assert len(results) == 8 and set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for response in results:
        if response.status_code == 429:
            assert assert_error(response, 429, "busy")["code"] == "queue_full"
            assert response.headers["retry-after"] == "1"
        else:
            assert response.json()["choices"][0]["message"]["role"] == "assistant"
    wait_idle(server.worker)
    assert server.chat({"messages": [user("Still there?")], "max_tokens": 2}).status_code == 200


def test_client_disconnect_stops_generation(server: Running) -> None:
    max_tokens = 1500  # greedy decoding of the tiny model runs to the limit: seconds of work
    payload = {"messages": [user("Tell a long story.", data_url(png()))], "max_tokens": max_tokens,
               "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: the worker is generating
        while not next(lines).startswith('data: {"id"'):
            pass
    waited = wait_idle(server.worker)  # leaving the block closed the connection
    last = server.worker.last
    assert last.outcome == "cancelled" and last.decode_tokens < max_tokens // 3, (last, waited)
    assert server.chat({"messages": [user("Hello")], "max_tokens": 2}).status_code == 200


def test_client_disconnect_stops_a_plain_request(server: Running) -> None:
    payload = {"messages": [user("Tell a long story.")], "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        server.chat(payload, timeout=httpx.Timeout(60, read=0.5))
    wait_idle(server.worker)
    assert server.worker.last.outcome == "cancelled" and server.worker.last.decode_tokens < 500, server.worker.last


def test_worker_survives_an_engine_bug(server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(question: str) -> Iterator[str]:
        raise RuntimeError("boom: a bug inside the engine")

    monkeypatch.setattr(server.assistant, "respond", broken)
    error = assert_error(server.chat({"messages": [user("x")]}), 500, "internal error")
    assert "boom" not in error["message"]
    monkeypatch.undo()
    assert server.chat({"messages": [user("x")], "max_tokens": 2}).status_code == 200


# --- conversations ----------------------------------------------------------------------------
def test_follow_up_reuses_the_encoded_image(server: Running) -> None:
    image = data_url(png((64, 48), (10, 120, 240)))  # an image no other test sends
    first_turn = [user("What colour is it?", image)]
    before = server.worker.set_image_calls
    first = server.chat({"messages": first_turn, "max_tokens": 8})
    assert first.status_code == 200 and server.worker.set_image_calls == before + 1
    answer = first.json()["choices"][0]["message"]["content"]
    follow_up = first_turn + [{"role": "assistant", "content": answer}, user("And the shape?")]
    second = server.chat({"messages": follow_up, "max_tokens": 8})
    assert second.status_code == 200, second.text
    assert server.worker.set_image_calls == before + 1  # the same bytes: not encoded again
    assert second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"]
    text_only = server.chat({"messages": [user("No picture this time.")], "max_tokens": 4})
    assert text_only.status_code == 200 and text_only.json()["usage"]["image_tokens_kept"] == 0


def test_follow_up_reuses_the_generated_answer_tokens(server: Running) -> None:
    """A stateless client re-sends the answer as text; the server feeds back the ids it generated
    (as the chat does), so the follow-up finds the whole previous request in the KV cache. Negative
    control: an answer the client changed is tokenised from its text, and its positions are evaluated."""
    image = data_url(png((56, 40), (30, 200, 60)))  # an image no other test sends
    first_turn = [user("Describe it.", image)]
    first = server.chat({"messages": first_turn, "max_tokens": 8}).json()
    answer, used = first["choices"][0]["message"]["content"], first["usage"]
    assert used["completion_tokens"] == 8  # the random model never stops early: 8 ids, the last never fed
    evaluated = used["prompt_tokens"] + used["completion_tokens"] - 1

    def cached(reply: str) -> int:
        messages = first_turn + [{"role": "assistant", "content": reply}, user("And the shape?")]
        response = server.chat({"messages": messages, "max_tokens": 2})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(answer) >= evaluated
    server.chat({"messages": first_turn, "max_tokens": 8})  # the same first request again: same answer (greedy)
    assert cached("Something else entirely.") < evaluated


def test_health_and_models(server: Running) -> None:
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "bundle"
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["bundle"]


# --- the command line -------------------------------------------------------------------------
def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tiny_llm_bundle: Path) -> None:
    for flags in (["--port", "70000"], ["--max-queue", "0"]):
        with pytest.raises(SystemExit) as exited:
            main(["--model", str(tiny_llm_bundle), *flags])
        assert exited.value.code == 2
    taken = listen("127.0.0.1", 0)
    try:
        assert main(["--model", str(tiny_llm_bundle), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 3 and all("error:" in line for line in lines), lines
    assert "address already in use" in lines[-1].lower()


def test_question_aware_strategy_prunes_for_the_last_user_message(server: Running) -> None:
    image = data_url(png((56, 40), (240, 200, 20)))  # an image no other test sends
    body = {"max_tokens": 3, "visual_tokens": 24, "strategy": "dart"}
    first = server.chat({**body, "messages": [user("What is the colour?", image)]})
    assert first.status_code == 200, first.text
    kept_first = server.assistant._pruned[1].kept
    follow_up = [user("What is the colour?", image), {"role": "assistant", "content": "yellow"},
                 user("How many corners does the rectangle have, and is it bright?")]
    second = server.chat({**body, "messages": follow_up})
    assert second.status_code == 200 and second.json()["usage"]["image_tokens_kept"] == 24
    assert not np.array_equal(server.assistant._pruned[1].kept, kept_first)  # pruned again for the new question
    bad = server.chat({**body, "strategy_options": {"pivots_image": -1}, "messages": [user("x", image)]})
    assert_error(bad, 400, "pivots_image")
