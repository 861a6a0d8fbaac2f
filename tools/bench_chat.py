"""A chat of several turns and an image switch, with and without KV-cache reuse.

``python tools/bench_chat.py --model BUNDLE [--tokens 64] [--max-tokens 32] [--threads N] [--int8]``

The same greedy conversation runs twice through :class:`runtime.assistant.Assistant`: once as the
chat does (the KV cache is reused up to the first changed position), once with the cache cleared
before every turn (what the chat did before reuse). Prints, per turn, the positions evaluated and
reused and the time to first token (since the question; the image switch turn also encodes the
new image), and the process's peak resident memory.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from runtime.cli import OneLineParser, log, positive_int, run_cli  # noqa: E402
from tools.benchkit.common import markdown_table, sample_images  # noqa: E402

SCRIPT = (  # (question, image index to switch to before it, or None)
    ("What is shown in this image? Describe it in detail.", 0),
    ("What colours stand out?", None),
    ("Is there any text in the picture?", None),
    ("And in this one, what is shown?", 1),
)


@dataclass(frozen=True)
class TurnRow:
    """One turn of one run."""

    turn: int
    question: str
    evaluated: int  # prompt positions evaluated before the first answer token
    reused: int  # prompt positions kept in the KV cache
    ttft_s: float  # question (and image, on a switch) in -> first token out
    answer_tokens: int


def run_script(assistant, images: list[Image.Image], reuse: bool) -> list[TurnRow]:
    """The scripted conversation; ``reuse=False`` clears the KV cache before every turn."""
    rows = []
    for turn, (question, switch) in enumerate(SCRIPT, start=1):
        if switch is not None:
            assistant.set_image(images[switch])
        if not reuse:
            assistant.llm.reset()
        "".join(assistant.respond(question))
        stats = assistant.last_stats
        ttft = (stats.first_token_ms + stats.image_ms) / 1000
        rows.append(TurnRow(turn, question, stats.prefill_positions, stats.reused_positions, ttft,
                            stats.decode_tokens))
    return rows


def table(with_reuse: list[TurnRow], without: list[TurnRow]) -> str:
    cells = [[a.turn, a.question + (" (new image)" if SCRIPT[a.turn - 1][1] is not None else ""),
              f"{a.evaluated} ({a.reused} reused)", f"{a.ttft_s:.2f}", b.evaluated, f"{b.ttft_s:.2f}",
              f"{a.ttft_s / max(b.ttft_s, 1e-9):.2f}"]
             for a, b in zip(with_reuse, without, strict=True)]
    header = ("turn", "question", "positions evaluated (reuse)", "TTFT s (reuse)", "positions evaluated (no reuse)",
              "TTFT s (no reuse)", "reuse / no reuse")
    return markdown_table(header, cells, "rlrrrrr")


def add_conversation_arguments(parser: OneLineParser) -> None:
    """The options this conversation is run with (shared with tools/bench_serve.py)."""
    parser.add_argument("--model", required=True, help="bundle directory or name (with export.llm done)")
    parser.add_argument("--tokens", type=positive_int(1, 4096), default=64, help="visual tokens kept (default: 64)")
    parser.add_argument("--max-tokens", type=positive_int(1, 4096), default=32,
                        help="answer length in tokens (default: 32)")
    parser.add_argument("--threads", type=positive_int(1, 512), default=None, help="CPU threads (default: all)")
    parser.add_argument("--int8", action="store_true", help="use the int8 vision encoder (default: fp32)")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python tools/bench_chat.py", description=__doc__.splitlines()[0])
    add_conversation_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from runtime.assistant import Assistant
        from runtime.model_registry import bundle_path
        from runtime.turn import Settings

        images = [Image.fromarray(image) for image in sample_images(3)]  # the third only warms up
        settings = Settings(tokens=args.tokens, max_tokens=args.max_tokens, temperature=0.0)
        assistant = Assistant.open(bundle_path(args.model), settings, threads=args.threads, int8=args.int8)
        try:
            log("warming up (one answer, not measured: first-call allocations and page faults)")
            assistant.set_image(images[2])
            "".join(assistant.respond("Warm-up: what is this?"))
            runs = {}
            for reuse in (True, False):
                log(f"running the conversation {'with' if reuse else 'without'} KV-cache reuse")
                runs[reuse] = run_script(assistant, images, reuse)
        finally:
            assistant.close()
        print(table(runs[True], runs[False]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"\npeak resident memory of this process: {peak:.2f} GB; answers: {args.max_tokens} tokens at most, "
              f"greedy; K = {args.tokens}")
        return 0

    return run_cli(body, "bench_chat")


if __name__ == "__main__":
    raise SystemExit(main())
