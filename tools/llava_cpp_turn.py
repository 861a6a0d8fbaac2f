"""One LLaVA turn through llama.cpp's own image path (llama-cpp-python's ``Llava15ChatHandler``).

``python -m tools.llava_cpp_turn --gguf G --mmproj M --image I --prompt P [--n-ctx 2048] [--threads N]
[--max-tokens 8]`` prints one JSON line: ``load_s`` (model and projector), ``ttft_s`` (from handing
over image and question to the first streamed content), ``total_s``, ``chunks``, ``answer``.
Everything else is llama.cpp's default: the path a user would otherwise pick.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.cli import OneLineParser, run_cli
from runtime.errors import InputError, UserError

DEFAULT_N_CTX = 2048
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "GIF": "image/gif"}  # what stb_image reads


@dataclass(frozen=True)
class TurnResult:
    """Timings (seconds) and the answer of one turn."""

    load_s: float
    ttft_s: float | None  # None when no content was streamed
    total_s: float
    chunks: int  # streamed content pieces (about one per token)
    answer: str


def data_url(image: Path) -> str:
    """``data:image/...;base64,...`` of the file; formats libmtmd cannot decode are re-encoded as PNG."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as picture:
            kind = picture.format or ""
            payload = image.read_bytes() if kind in MIME else None
            if payload is None:
                buffer = io.BytesIO()
                picture.convert("RGB").save(buffer, format="PNG")
                payload, kind = buffer.getvalue(), "PNG"
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"cannot read image {image}: {err}") from None
    return f"data:{MIME[kind]};base64,{base64.b64encode(payload).decode('ascii')}"


def _load(gguf: Path, mmproj: Path, n_ctx: int, threads: int | None) -> Any:
    """``llama_cpp.Llama`` with the LLaVA-1.5 chat handler (libmtmd encodes the image)."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    for path in (gguf, mmproj):
        if not path.is_file():
            raise InputError(f"no such file: {path}")
    options: dict[str, Any] = {} if threads is None else {"n_threads": threads}
    try:
        handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
        llm = llama_cpp.Llama(model_path=str(gguf), chat_handler=handler, n_ctx=n_ctx, verbose=False, **options)
        handler._init_mtmd_context(llm)  # else the first answer would load the mmproj: count it as load time
    except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
        raise UserError(f"llama.cpp cannot load {gguf} / {mmproj}: {err}") from None
    return llm


def llava_turn(gguf: Path, mmproj: Path, image: Path, prompt: str, n_ctx: int = DEFAULT_N_CTX,
               threads: int | None = None, max_tokens: int = 8) -> TurnResult:
    """Load, then answer ``prompt`` about ``image`` greedily, streaming; time to first content piece."""
    url = data_url(image)
    start = time.perf_counter()
    llm = _load(gguf, mmproj, n_ctx, threads)
    load_s = time.perf_counter() - start
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": prompt}]}]
    start = time.perf_counter()
    first, pieces = None, []
    for chunk in llm.create_chat_completion(messages=messages, stream=True, temperature=0, max_tokens=max_tokens):
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            first = time.perf_counter() - start if first is None else first
            pieces.append(content)
    return TurnResult(load_s, first, time.perf_counter() - start, len(pieces), "".join(pieces))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tools.llava_cpp_turn", description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the language model GGUF")
    parser.add_argument("--mmproj", type=Path, required=True, help="the CLIP + projector GGUF (export.mmproj)")
    parser.add_argument("--image", type=Path, required=True, help="image file")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX, help=f"context length (default: {DEFAULT_N_CTX})")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama-cpp-python's)")
    parser.add_argument("--max-tokens", type=int, default=8, help="longest answer in tokens (default: 8)")
    args = parser.parse_args(argv)

    def body() -> int:
        result = llava_turn(args.gguf, args.mmproj, args.image, args.prompt, args.n_ctx, args.threads, args.max_tokens)
        print(json.dumps(asdict(result)), flush=True)
        return 0

    return run_cli(body, "llava_cpp_turn")


if __name__ == "__main__":
    raise SystemExit(main())
