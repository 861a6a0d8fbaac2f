"""Requests of the OpenAI-compatible server: the JSON shapes, their validation, and OpenAI-style errors.

A request becomes a :class:`ChatQuery`: the answered ``(question, answer)`` pairs that
``Assistant.restore`` takes, the last user message, at most one inline image (checked, not yet
decoded) and the ``Assistant.update`` keywords. Everything a client can get wrong is an
:class:`APIError` with an HTTP status and a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.errors import ContextOverflowError, InputError, SettingError, UserError
from runtime.preprocess import decode_image as decode_image_file
from runtime.turn import Settings

# A phone photo is 12-50 megapixels; Pillow's own bomb limit is ~89 M (an error only at twice that).
MAX_IMAGE_PIXELS = 50_000_000
MAX_MESSAGES = 256
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}  # Pillow format -> name in messages
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error"}
ONE_IMAGE = "LLaVA-1.5 takes one image per conversation, on the first user message"


class APIError(Exception):
    """A request the server refuses: HTTP status, one-line message, OpenAI ``code`` and ``param``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def from_user_error(cls, err: UserError) -> APIError:
        """An engine :class:`UserError` (bad settings, context overflow, undecodable image) as a 400."""
        code = "context_length_exceeded" if isinstance(err, ContextOverflowError) else "invalid_value"
        if isinstance(err, SettingError):  # a keyword argument: name it as the request does
            param = REQUEST_FIELDS.get(err.field, err.field)
            return cls(400, " ".join(str(err.named(param)).split()), code, param)
        return cls(400, " ".join(str(err).split()), code)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


REQUEST_FIELDS = {"tokens": "visual_tokens"}  # Settings fields whose request field has another name


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI's API answers errors."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- the request as JSON --------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None  # accepted, ignored: the image is always 336x336 for the encoder


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    """``POST /v1/chat/completions``; unknown fields are ignored, as OpenAI-compatible servers do."""

    model: str | None = None
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    visual_tokens: int | None = None  # extension: K, the visual tokens kept
    strategy: str | None = None  # extension: pruning strategy
    strategy_options: dict[str, Any] | None = None  # extension: the strategy's keyword options
    positions: str | None = None  # extension: "packed" or "original" positions of the kept rows (method.md §6)


# --- what the worker needs -------------------------------------------------------------------
@dataclass(frozen=True)
class ImageData:
    """An inline image whose header passed the checks; decoded by the worker only when it is new."""

    sha256: str  # of the base64-decoded bytes: the cache key
    data: bytes
    width: int
    height: int


@dataclass(frozen=True)
class ChatQuery:
    """One validated chat completion request."""

    history: tuple[tuple[str, str], ...]  # answered (question, answer) turns, for Assistant.restore
    question: str  # the last user message
    image: ImageData | None  # on the first user message; None = text-only conversation
    changes: Mapping[str, Any]  # Assistant.update keywords (every setting, so none leaks between requests)
    stream: bool
    include_usage: bool  # stream_options.include_usage: a usage-only chunk before [DONE]


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_messages: int = MAX_MESSAGES
    max_image_pixels: int = MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class _Said:
    role: str
    text: str
    images: tuple[tuple[str, str], ...]  # (param, url)


def parse_chat_request(body: bytes, model_name: str, defaults: Settings, limits: Limits) -> ChatQuery:
    """Validate a request body against the served model, the defaults and the limits."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as err:
        raise APIError(400, *validation_message(err.errors(include_url=False))) from None
    if request.model is not None and request.model != model_name:
        raise APIError(404, f"model {request.model!r} does not exist; this server has {model_name!r}",
                       "model_not_found", "model")
    if request.n not in (None, 1):
        raise APIError(400, f"only n=1 is supported, got {request.n}", "invalid_value", "n")
    history, question, image = conversation(request.messages, limits)
    changes = settings_changes(request, defaults)
    return ChatQuery(history, question, image, changes, request.stream,
                     bool(request.stream_options and request.stream_options.include_usage))


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str, str | None]:
    """The first pydantic (or FastAPI) validation error as (one-line message, code, param)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}", "invalid_json", None
    skip = {"body", "str", "int", "float", "bool", "list", "dict", "none"}  # FastAPI's prefix, union member names
    param = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and (p in skip or "[" in p)))
    return f"{param or 'body'}: {first['msg']}", "invalid_value", param or None


def conversation(messages: list[Message], limits: Limits) -> tuple[tuple[tuple[str, str], ...], str, ImageData | None]:
    """Messages -> (answered turns, last question, the image); system messages are ignored."""
    if not messages:
        raise APIError(400, "messages must not be empty", "invalid_value", "messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(messages)}, the limit is {limits.max_messages}",
                       "too_many_messages", "messages")
    said = _merged(messages)
    if not said or said[0].role != "user" or said[-1].role != "user":
        raise APIError(400, "the conversation must start and end with a user message (system messages aside)",
                       "invalid_value", "messages")
    images = [(s, image) for s in said for image in s.images]
    if len(images) > 1:
        raise APIError(400, f"{ONE_IMAGE}; this request has {len(images)} images", "too_many_images", "messages")
    if images and images[0][0] is not said[0]:
        raise APIError(400, f"{ONE_IMAGE}; this request has it elsewhere", "invalid_value", images[0][1][0])
    if not said[-1].text.strip():
        raise APIError(400, "the last user message has no text", "invalid_value", "messages")
    image = check_image_url(images[0][1][1], images[0][1][0], limits.max_image_pixels) if images else None
    turns = tuple((q.text, a.text) for q, a in zip(said[0:-1:2], said[1::2], strict=True))
    return turns, said[-1].text, image


def _merged(messages: list[Message]) -> list[_Said]:
    """User and assistant messages with consecutive ones of the same role joined by a newline."""
    said: list[_Said] = []
    for i, message in enumerate(messages):
        parts = [message.content] if isinstance(message.content, str) else message.content or []
        texts = [p if isinstance(p, str) else p.text for p in parts if not isinstance(p, ImagePart)]
        images = tuple((f"messages.{i}.content.{j}.image_url", p.image_url.url)
                       for j, p in enumerate(parts) if isinstance(p, ImagePart))
        if images and message.role != "user":
            raise APIError(400, f"images are accepted in user messages only, not in a {message.role} message",
                           "invalid_value", images[0][0])
        if message.role in ("system", "developer"):
            continue  # LLaVA-1.5 has its fixed system line
        text = "\n".join(texts)
        if said and said[-1].role == message.role:
            said[-1] = _Said(message.role, f"{said[-1].text}\n{text}", said[-1].images + images)
        else:
            said.append(_Said(message.role, text, images))
    return said


def settings_changes(request: ChatRequest, defaults: Settings) -> dict[str, Any]:
    """The request's sampling and pruning fields over the server defaults, checked like the CLI's flags."""
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "invalid_value", "stop")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in (request.strategy_options or {}).items()}
    given = {
        "tokens": request.visual_tokens,
        "strategy": request.strategy,
        "options": options if request.strategy_options is not None else None,
        "max_tokens": request.max_completion_tokens if request.max_completion_tokens is not None
        else request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "positions": request.positions,
    }
    changes = {k: getattr(defaults, k) if v is None else v for k, v in given.items()}
    changes["stop"] = stop
    changes["reprune"] = True  # a question-aware strategy prunes for the request's last user message
    try:
        replace(defaults, **changes)  # Settings checks max_tokens, temperature, top_p and seed
    except InputError as err:
        param = err.field if isinstance(err, SettingError) else None
        raise APIError(400, str(err), "invalid_value", param) from None
    return changes


# --- images -------------------------------------------------------------------------------
def check_image_url(url: str, param: str, max_pixels: int) -> ImageData:
    """A ``data:image/...;base64,`` URL whose header names PNG, JPEG or WebP within ``max_pixels``."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        raise APIError(400, "image URLs are not fetched (a local server stays off the network); send the image "
                       "inline as a data:image/png;base64,... URL", "invalid_image_url", param)
    head, comma, payload = url.partition(",")
    if scheme != "data" or not comma or not head.lower().endswith(";base64"):
        raise APIError(400, "an image must be a data:image/png|jpeg|webp;base64,... URL", "invalid_image_url", param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)  # line-wrapped base64 too
    except (binascii.Error, ValueError):
        raise APIError(400, "the image's base64 data is not valid base64", "invalid_image", param) from None
    width, height = _image_size(data, param)
    if width * height > max_pixels:
        raise APIError(400, f"image refused: {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
                       "image_too_large", param)
    return ImageData(hashlib.sha256(data).hexdigest(), data, width, height)


def _image_size(data: bytes, param: str) -> tuple[int, int]:
    """Read only the header: the format and size, before anything is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = image.format, image.size
    except UnidentifiedImageError:
        raise APIError(400, "the image data is not an image Pillow can read", "invalid_image", param) from None
    except Image.DecompressionBombError as err:
        raise APIError(400, f"image refused as a decompression bomb: {' '.join(str(err).split())}",
                       "image_too_large", param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise APIError(400, f"cannot read the image header: {' '.join(str(err).split())}", "invalid_image",
                       param) from None
    if fmt not in IMAGE_FORMATS:
        raise APIError(400, f"unsupported image format {fmt}; send PNG, JPEG or WebP", "invalid_image", param)
    return size


def decode_image(image: ImageData) -> Image.Image:
    """Fully decode a checked image as ``runtime.chat`` decodes a file; InputError if broken."""
    return decode_image_file(io.BytesIO(image.data), "(the request's image_url)")
