"""Rehearse the main job on a local LLaVA checkpoint, measuring each stage as its own process.

``python tools/rehearse.py --checkpoint CKPT --out DIR [--image PATH] [--question TEXT] [--tokens 64]
[--threads N] [--max-tokens 8] [--quant Q] [--skip-llama-cpp] [--json FILE]``

Stages: export.clip (int8), export.llm, runtime.prune, runtime.chat with K tokens and with all rows,
then llama.cpp's own LLaVA path on the same GGUF (export.mmproj + ``tools.llava_cpp_turn``). Prints a
markdown table (wall time, peak anonymous and resident memory and disk writes of each process tree,
time to first token) and the bundle's file sizes against the chat memory target.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.atomic import write_json_atomic  # noqa: E402
from runtime.cli import OneLineParser, log, run_cli  # noqa: E402
from runtime.errors import InputError, UserError  # noqa: E402
from tools.benchkit.proctree import Measured, run_measured  # noqa: E402
from tools.benchkit.rehearse_report import FileSizes, file_sizes, report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_QUESTION = "What is shown in this image? Describe it in detail."
DEFAULT_N_CTX = 2048  # llama.cpp path; our chat picks its own
STAGES = ("export.clip", "export.llm", "prune", "chat K", "chat all rows", "export.mmproj", "llama.cpp turn")
LLAMA_CPP_STAGES = ("export.mmproj", "llama.cpp turn")
CHAT_STAGES = ("chat K", "chat all rows")
TTFT = re.compile(r"time to first token: ([\d.]+) ms(?: since the question, ([\d.]+) ms since the image)?")
KEPT = re.compile(r"image tokens kept: (\d+)/(\d+)")


@dataclass(frozen=True)
class RehearsalConfig:
    """What to rehearse; paths are absolute (the stages run with the repository as working directory)."""

    checkpoint: str  # a local checkpoint directory (absolute) or a registry alias
    out: Path
    image: Path
    question: str = DEFAULT_QUESTION
    tokens: int = 64  # K for prune and the first chat turn
    threads: int | None = None
    max_tokens: int = 8
    quant: str | None = None  # None: export.llm's default
    llama_cpp: bool = True
    force: bool = False
    n_ctx: int = DEFAULT_N_CTX

    def __post_init__(self) -> None:
        for name in ("tokens", "max_tokens", "n_ctx") + (("threads",) if self.threads is not None else ()):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")

    @property
    def bundle(self) -> Path:
        return self.out / "bundle"

    @property
    def mmproj(self) -> Path:
        return self.out / "mmproj-f16.gguf"


@dataclass(frozen=True)
class StageRow:
    """One measured stage (memory and disk in bytes)."""

    stage: str
    command: tuple[str, ...]
    returncode: int
    wall_s: float
    peak_anon_bytes: int
    peak_rss_bytes: int
    disk_written_bytes: int
    ttft_s: float | None  # chat rows: from handing over the image to the first answer token
    note: str


@dataclass(frozen=True)
class Rehearsal:
    """All stage rows that ran, file sizes once the exports exist, and the failure (one line) if any."""

    config: RehearsalConfig
    rows: tuple[StageRow, ...]
    sizes: FileSizes | None
    failure: str | None


def gguf_path(bundle: Path) -> Path:
    """The language model GGUF named by ``bundle/manifest.json`` (``manifest["llm"]["gguf"]``)."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        return bundle / manifest["llm"]["gguf"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot find the GGUF in {bundle}/manifest.json ({type(err).__name__}: {err})") from None


def command(stage: str, config: RehearsalConfig) -> list[str]:
    """The child command line of ``stage``."""
    py, ckpt, bundle, k = sys.executable, config.checkpoint, str(config.bundle), str(config.tokens)
    force = ["--force"] if config.force else []
    threads = [] if config.threads is None else ["--threads", str(config.threads)]
    chat = [py, "-m", "runtime.chat", "--model", bundle, "--image", str(config.image), "--prompt", config.question,
            "--tokens", k, "--int8", "--timings", "--temperature", "0", "--max-tokens", str(config.max_tokens),
            *threads]
    commands = {
        "export.clip": [py, "-m", "export.clip", "--model", ckpt, "--out", bundle, "--int8", *force],
        "export.llm": [py, "-m", "export.llm", "--model", ckpt, "--out", bundle, *force,
                       *(["--quant", config.quant] if config.quant else [])],
        "prune": [py, "-m", "runtime.prune", str(config.image), "--model", bundle, "--tokens", k, "--int8", *threads],
        "chat K": chat,
        "chat all rows": [*chat, "--strategy", "none"],
        "export.mmproj": [py, "-m", "export.mmproj", "--model", ckpt, "--out", str(config.mmproj), "--dtype", "f16"],
    }
    if stage == "llama.cpp turn":
        return [py, "-m", "tools.llava_cpp_turn", "--gguf", str(gguf_path(config.bundle)), "--mmproj",
                str(config.mmproj), "--image", str(config.image), "--prompt", config.question, "--n-ctx",
                str(config.n_ctx), "--max-tokens", str(config.max_tokens), *threads]
    return commands[stage]


def chat_ttft(stderr: str) -> tuple[float | None, str]:
    """``(seconds, since)`` of ``runtime.chat --timings``' time to first token; since the image when printed."""
    found = TTFT.findall(stderr)
    if not found:
        return None, ""
    question_ms, image_ms = found[-1]
    return float(image_ms or question_ms) / 1000, "image" if image_ms else "question"


def _llama_turn(stdout: str) -> dict[str, object]:
    """The JSON line of ``tools.llava_cpp_turn`` (empty when absent)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}


def _export_llm_note(config: RehearsalConfig) -> str:
    """GGUF name and quant as recorded in the manifest."""
    try:
        entry = json.loads((config.bundle / "manifest.json").read_text(encoding="utf-8"))["llm"]
        return f"{entry['gguf']} ({entry.get('quant', '?')})"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"manifest unreadable ({type(err).__name__})"


def _note(stage: str, measured: Measured, config: RehearsalConfig) -> tuple[float | None, str]:
    """``(time to first token s, note)`` of a finished stage."""
    if measured.returncode != 0:
        return None, f"exit {measured.returncode}: {last_line(measured.stderr)}"
    if stage in CHAT_STAGES:
        kept, (ttft, since) = KEPT.findall(measured.stderr), chat_ttft(measured.stderr)
        rows = f"kept {kept[-1][0]}/{kept[-1][1]} rows" if kept else "kept ? rows"
        return ttft, f"{rows}, ttft since the {since}" if since else f"{rows}, no ttft line"
    if stage == "llama.cpp turn":
        turn = _llama_turn(measured.stdout)
        ttft, load = turn.get("ttft_s"), turn.get("load_s")
        note = f"load {load:.2f} s, Llava15ChatHandler" if isinstance(load, float) else "no JSON line"
        return (float(ttft) if isinstance(ttft, (int, float)) else None), note
    if stage == "export.llm":
        return None, _export_llm_note(config)
    notes = {"export.clip": "vision (fp32 + int8) + projector ONNX", "export.mmproj": "f16 mmproj for libmtmd",
             "prune": f"K={config.tokens}, int8 encoder"}
    return None, notes.get(stage, "")


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (what a failing child said last)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_stage(stage: str, config: RehearsalConfig) -> StageRow:
    """Run one stage as a child process tree and measure it."""
    argv = command(stage, config)
    log(f"rehearse: {stage}: {shlex.join(argv)}")
    measured = run_measured(argv, cwd=REPO, label=stage)
    ttft, note = _note(stage, measured, config)
    return StageRow(stage, measured.argv, measured.returncode, measured.wall_s, measured.peak_anon_bytes,
                    measured.peak_rss_bytes, measured.disk_written_bytes, ttft, note)


def rehearse(config: RehearsalConfig) -> Rehearsal:
    """Run the stages in order; stop at the first that fails."""
    rows: list[StageRow] = []
    for stage in (s for s in STAGES if config.llama_cpp or s not in LLAMA_CPP_STAGES):
        row = run_stage(stage, config)
        rows.append(row)
        if row.returncode != 0:
            return Rehearsal(config, tuple(rows), file_sizes(config.bundle), f"stage {stage} failed ({row.note})")
    return Rehearsal(config, tuple(rows), file_sizes(config.bundle), None)


def _config(args: argparse.Namespace) -> RehearsalConfig:
    """Resolve and check the CLI's paths; writes the default photo into ``--out``."""
    from runtime.model_registry import known_aliases

    ckpt = Path(args.checkpoint).expanduser()
    if not ckpt.is_dir() and args.checkpoint not in known_aliases():
        raise InputError(f"no checkpoint directory at {ckpt} (and not one of the aliases {', '.join(known_aliases())})")
    out = Path(args.out).expanduser().resolve()
    bundle = out / "bundle"
    if bundle.is_dir() and any(bundle.iterdir()) and not args.force:
        raise InputError(f"{bundle} is not empty; pass --force to export over it, or pick another --out")
    image = Path(args.image).expanduser().resolve() if args.image else out / "chelsea.png"
    if args.image and not image.is_file():
        raise InputError(f"no image file at {image}")
    if not args.image:
        from tools.sample_photos import write_photos

        write_photos(out, ("chelsea",))
    checkpoint = str(ckpt.resolve()) if ckpt.is_dir() else args.checkpoint
    return RehearsalConfig(checkpoint, out, image, args.question, args.tokens, args.threads, args.max_tokens,
                           args.quant, not args.skip_llama_cpp, args.force)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="tools/rehearse.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="local Hugging Face LLaVA-1.5 checkpoint (or an alias)")
    parser.add_argument("--out", type=Path, required=True, help="working directory (bundle/, mmproj, photo)")
    parser.add_argument("--image", type=Path, default=None, help="photo to ask about (default: chelsea, saved in OUT)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help=f"the question (default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--tokens", type=int, default=64, help="visual tokens kept, K (default: 64)")
    parser.add_argument("--threads", type=int, default=None, help="threads of prune, chat, llama.cpp (default: theirs)")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer length in tokens (default: 8)")
    parser.add_argument("--quant", default=None, help="export.llm --quant (default: the exporter's default)")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="skip llama.cpp's own LLaVA path (default: run)")
    parser.add_argument("--force", action="store_true", help="export over an existing OUT/bundle (default: refuse)")
    parser.add_argument("--json", type=Path, default=None, help="also write all rows as JSON to this file")
    return parser


def to_json(result: Rehearsal) -> dict[str, object]:
    """Rows, file sizes and failure as plain JSON."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result.config).items()}
    return {"config": config, "rows": [asdict(row) for row in result.rows],
            "sizes": asdict(result.sizes) if result.sizes else None, "failure": result.failure}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        result = rehearse(_config(args))
        print(report(result.rows, result.sizes), flush=True)
        if args.json is not None:
            write_json_atomic(args.json, to_json(result))
        if result.failure:
            raise UserError(result.failure)
        return 0

    return run_cli(body, "rehearse")


if __name__ == "__main__":
    raise SystemExit(main())
