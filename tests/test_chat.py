"""runtime.chat: the REPL with a fake backend (full stdin → stdout transcript), and real runs."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.chat import main, repl
from runtime.errors import InputError, SettingError


class FakeBackend:
    """Answers with the question reversed and records every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.tokens, self.strategy, self.turns = 64, "entropy", 0

    def respond(self, question: str) -> Iterator[str]:
        self.calls.append(f"respond {question}")
        self.turns += 1
        yield f"[{self.strategy}/{self.tokens}/turn {self.turns}] "
        yield question[::-1]

    def set_image(self, image) -> None:
        if not Path(image).name.endswith(".png"):
            raise InputError(f"not an image: {image}")
        self.calls.append(f"image {Path(image).name}")
        self.turns = 0

    def update(self, **changes) -> None:
        if changes.get("tokens", 1) > 576:
            raise SettingError("tokens", "must be in 1..576 (the image has 576 patches), got 999")  # as Pipeline
        if changes.get("strategy", "entropy") not in ("entropy", "fastervlm"):
            raise InputError(f"unknown strategy {changes['strategy']!r}; choose one of: entropy, fastervlm")
        self.__dict__.update(changes)
        self.calls.append(f"update {changes}")

    def reset(self) -> None:
        self.turns = 0
        self.calls.append("reset")

    def stats_lines(self) -> list[str]:
        return [f"turns: {self.turns}"]


def run(text: str, backend: FakeBackend | None = None) -> tuple[str, str, FakeBackend]:
    backend = backend or FakeBackend()
    stdout, stderr = io.StringIO(), io.StringIO()
    assert repl(backend, io.StringIO(text), stdout, stderr) == 0
    return stdout.getvalue(), stderr.getvalue(), backend


def test_full_transcript() -> None:
    stdin = ("what is this?\nand now?\n/tokens 32\n/strategy fastervlm\nagain\n/image other.png\nhi\n/stats\n"
             "/reset\n/quit\nnever\n")
    stdout, stderr, backend = run(stdin)
    assert stdout == (
        "[entropy/64/turn 1] ?siht si tahw\n"
        "[entropy/64/turn 2] ?won dna\n"
        "tokens: 32\n"
        "strategy: fastervlm\n"
        "[fastervlm/32/turn 3] niaga\n"
        "image: other.png (new conversation)\n"
        "[fastervlm/32/turn 1] ih\n"
        "turns: 1\n"
        "conversation cleared\n"
    )
    assert stderr == ""
    assert "respond never" not in backend.calls  # nothing after /quit


def test_errors_are_one_line_and_the_loop_goes_on() -> None:
    stdin = "/frobnicate\n/tokens\n/tokens abc\n/tokens 999\n/strategy magic\n/image notes.txt\nstill here?\n"
    stdout, stderr, _ = run(stdin)
    assert stderr.splitlines() == [
        "error: unknown command /frobnicate; /help lists the commands",
        "error: /tokens needs an argument (see /help)",
        "error: /tokens needs a positive integer, got 'abc'",
        "error: /tokens must be in 1..576 (the image has 576 patches), got 999",
        "error: unknown strategy 'magic'; choose one of: entropy, fastervlm",
        "error: not an image: notes.txt",
    ]
    assert stdout == "[entropy/64/turn 1] ?ereh llits\n"


def test_settings_name_the_field_not_a_flag() -> None:
    """The library speaks keyword arguments; only the CLI layer knows flags."""
    from runtime.errors import SettingError
    from runtime.turn import Settings

    with pytest.raises(SettingError, match=r"^max_tokens must be >= 1, got 0$") as info:
        Settings(max_tokens=0)
    assert info.value.field == "max_tokens"
    assert str(info.value.named("--max-tokens")) == "--max-tokens must be >= 1, got 0"


def test_cli_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """runtime.chat reports the bad setting by the flag the user typed (before any bundle is opened)."""
    assert main(["--model", str(tmp_path / "no-bundle"), "--prompt", "hi", "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err == "runtime.chat: error: --max-tokens must be >= 1, got 0\n"


def test_help_and_end_of_input() -> None:
    stdout, _, _ = run("/help\n")
    for command in ("/image PATH", "/tokens K", "/strategy NAME", "/reset", "/stats", "/help", "/quit"):
        assert command in stdout


def test_ctrl_c_stops_the_answer_not_the_program() -> None:
    class Interrupting(FakeBackend):
        def respond(self, question: str) -> Iterator[str]:
            self.calls.append(f"respond {question}")
            yield "partial"
            if question == "stop me":
                raise KeyboardInterrupt

    stdout, _, backend = run("stop me\nnext\n", Interrupting())
    assert stdout == "partial [stopped]\npartial\n"
    assert backend.calls == ["respond stop me", "respond next"]


# --- real runs on the tiny bundle with its language model (llama.cpp) -----------------------


@pytest.fixture(scope="module")
def photo(photos, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "coffee.png"
    photos["coffee"].save(path)
    return path


@pytest.mark.llm
@pytest.mark.parametrize("strategy", ["entropy", "entropyprune"])
def test_prompt_mode_answers_once(tiny_llm_bundle: Path, photo: Path, capsys, strategy: str) -> None:
    argv = ["--model", str(tiny_llm_bundle), "--image", str(photo), "--prompt", "What is shown?",
            "--max-tokens", "6", "--temperature", "0", "--timings", "--strategy", strategy]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and len(captured.out.splitlines()) >= 1
    assert "image tokens kept: 64/576" in captured.err
    assert "time to first token" in captured.err and "decode:" in captured.err
    if strategy == "entropyprune":
        assert "probe " in captured.err  # the probe's cost is shown on its own


@pytest.mark.llm
def test_greedy_answers_are_reproducible(tiny_llm_bundle: Path, photo: Path, capsys) -> None:
    argv = ["--model", str(tiny_llm_bundle), "--image", str(photo), "--prompt", "Describe.", "--max-tokens", "8",
            "--temperature", "0"]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.llm
@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("no-llm", "has no language model"),
        ("wide", "n_embd"),
        ("long", "context holds"),
    ],
)
def test_bad_input_is_one_line(tiny_bundle: Path, tiny_llm_bundle: Path, photo: Path, tmp_path: Path, capsys,
                               setup: str, words: str) -> None:
    import shutil

    bundle, extra = tiny_llm_bundle, []
    if setup == "no-llm":
        bundle = tiny_bundle
    elif setup == "wide":
        bundle = tmp_path / "wide"
        shutil.copytree(tiny_llm_bundle, bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["vision"]["projector_dim"] = 128
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    else:
        extra = ["--n-ctx", "100", "--tokens", "192"]
    code = main(["--model", str(bundle), "--image", str(photo), "--prompt", "hi", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert words in err[-1], err


def test_missing_image_fails_before_loading(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tiny_bundle), "--image", str(tmp_path / "none.png"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == f"runtime.chat: error: image not found: {tmp_path / 'none.png'}"


@pytest.mark.llm
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--n-ctx", "16"], "must be in 64.."),
        (["--n-ctx", "-100000"], "must be in 64.."),
        (["--kv-type", "q2"], "invalid choice"),
        (["--temperature", "nan"], "temperature >= 0"),
        (["--seed", "-1"], "seed must be in"),
        (["--kv-type", "q8_0"], "head size divisible by 32"),  # the tiny model's heads are 16 wide
    ],
)
def test_out_of_range_options_are_refused(tiny_llm_bundle: Path, photo: Path, capsys, extra: list[str],
                                          words: str) -> None:
    try:
        code = main(["--model", str(tiny_llm_bundle), "--image", str(photo), "--prompt", "hi", *extra])
    except SystemExit as stop:  # argparse's usage errors exit from parse_args
        code = stop.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loading ")]
    assert code == 2 and len(err) == 1 and words in err[0], err


@pytest.mark.llm
@pytest.mark.parametrize("options", [["--mmap"], ["--n-ctx", "1024", "--kv-type", "f32"]])
def test_memory_options_answer(tiny_llm_bundle: Path, photo: Path, capsys, options: list[str]) -> None:
    argv = ["--model", str(tiny_llm_bundle), "--image", str(photo), "--prompt", "What is shown?",
            "--max-tokens", "3", "--temperature", "0", "--timings", *options]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ms since the question" in err and "ms since the image" in err  # image in -> first token out


# --- the conversation engine on the real tiny bundle (issue: multi-turn, options, context) -------
@pytest.fixture()
def assistant(tiny_llm_bundle: Path):
    from runtime.assistant import Assistant
    from runtime.turn import Settings

    engine = Assistant.open(tiny_llm_bundle, Settings(temperature=0, max_tokens=6, options={"rule": "max-max"}),
                            n_ctx=300)
    yield engine
    engine.close()


@pytest.mark.llm
def test_text_only_question_answers(tiny_llm_bundle: Path, capsys) -> None:
    assert main(["--model", str(tiny_llm_bundle), "--prompt", "hello", "--max-tokens", "3", "--timings"]) == 0
    assert "image tokens kept: 0/0" in capsys.readouterr().err


@pytest.mark.llm
def test_strategy_options_are_kept_per_strategy(assistant) -> None:
    assistant.update(strategy="fastervlm")  # "takes no option(s) rule" before
    assert dict(assistant.settings.options) == {}
    assistant.update(strategy="entropy")
    assert dict(assistant.settings.options) == {"rule": "max-max"}


@pytest.mark.llm
def test_history_prune_cache_and_partial_answers(assistant, photos) -> None:
    assistant.set_image(photos["coffee"])
    first = "".join(assistant.respond("What is shown?"))
    vision = dict(assistant.last_stats.vision_ms)
    stream = assistant.respond("And the colour?")
    piece = next(stream)
    stream.close()  # Ctrl-C / a closed client: the partial answer is kept
    turns = assistant.conversation.turns
    assert [t.question for t in turns] == ["What is shown?", "And the colour?"]
    assert turns[0].answer == first.strip() and turns[1].answer == piece.strip()
    assert "encode" in vision and "encode" not in assistant.last_stats.vision_ms  # encoded once
    assert "prune" not in assistant.last_stats.vision_ms  # the pruned image was cached
    assistant.update(strategy="visionzip")
    "".join(assistant.respond("With another strategy?"))
    assert "prune" in assistant.last_stats.vision_ms and assistant.last_stats.kept == 64
    digest = assistant.image_digest
    calls = []
    encode = assistant.pipeline.encoder.encode
    assistant.pipeline.encoder.encode = lambda pixels: calls.append(1) or encode(pixels)
    assistant.set_image(photos["chelsea"])
    assistant.set_image(photos["coffee"])  # back to an image encoded before: from the digest cache
    assert calls == [1] and assistant.image_digest == digest


@pytest.mark.llm
def test_context_limit_is_said_and_old_turns_are_dropped(tiny_llm_bundle: Path, photos) -> None:
    from runtime.assistant import Assistant
    from runtime.turn import Settings

    engine = Assistant.open(tiny_llm_bundle, Settings(temperature=0, max_tokens=200), n_ctx=200)
    try:
        engine.set_image(photos["coffee"])  # 64 rows + the prompt: ~180 of the 200 positions
        notices = []
        for question in ("one?", "two?", "three?"):
            "".join(engine.respond(question))
            notices.append((engine.finish_reason, engine.notice or ""))
        assert notices[0][0] == "context" and "stopped at the context limit" in notices[0][1], notices
        assert all("dropped the" in n and "oldest turn" in n for _, n in notices[1:]), notices
        assert engine.conversation.has_image and [t.question for t in engine.conversation.turns] == ["three?"]
        assert engine.last_stats.kept == 64  # the image stays, on the first question kept
    finally:
        engine.close()


@pytest.mark.llm
def test_bench_chat_runs_and_reuse_evaluates_less(tiny_llm_bundle: Path, capsys) -> None:
    from tools.bench_chat import main as bench_main

    assert bench_main(["--model", str(tiny_llm_bundle), "--max-tokens", "4"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 4
    reused = [int(row[3].split()[0]) for row in rows]
    fresh = [int(row[5]) for row in rows]
    assert all(r < f for r, f in zip(reused, fresh, strict=True))  # turn 1 too: the warm-up's system line


def test_binary_garbage_on_stdin_is_one_line_and_the_loop_goes_on() -> None:
    fake = FakeBackend()
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\xfa garbage\nhello\n"), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert repl(fake, stdin, out, err) == 0
    assert "not UTF-8" in err.getvalue()


@pytest.mark.llm
def test_prompt_with_invalid_utf8_and_closed_stdin(tiny_llm_bundle: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    bad = os.fsdecode(b"what is \xff?")  # how Python hands undecodable argv bytes over
    assert main(["--model", str(tiny_llm_bundle), "--prompt", bad]) == 2
    closed = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(tiny_llm_bundle)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert closed.returncode == 0 and "Traceback" not in closed.stderr


@pytest.mark.llm
def test_verbose_shows_llama_cpp_buffer_sizes_and_default_is_quiet(tiny_llm_bundle: Path) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "runtime.chat", "--model", str(tiny_llm_bundle), "--prompt", "hi",
            "--max-tokens", "2"]
    runs = {flag: subprocess.run([*argv, *flag], capture_output=True, text=True, timeout=120,
                                 cwd=Path(__file__).resolve().parents[1]) for flag in ((), ("--verbose",))}
    assert "KV buffer size" in runs[("--verbose",)].stderr
    assert "buffer size" not in runs[()].stderr


# --- question-aware strategies: pruned once with the first question, or per question -----------
@pytest.mark.llm
def test_dart_prunes_once_then_per_question_with_reprune(assistant, photos) -> None:
    assistant.update(strategy="dart", options={}, tokens=16)
    assistant.set_image(photos["coffee"])
    "".join(assistant.respond("What is on the table?"))
    first = assistant._pruned[1]
    assert "prune" in assistant.last_stats.vision_ms and "probe" in assistant.last_stats.vision_ms
    "".join(assistant.respond("How many cups are there, and what colour is the wall behind them?"))
    assert assistant._pruned[1] is first and "prune" not in assistant.last_stats.vision_ms  # reused
    assert assistant.notice is None
    assistant.update(reprune=True)
    "".join(assistant.respond("Is there a spoon?"))
    assert assistant._pruned[1] is not first and "probe" in assistant.last_stats.vision_ms
    assert assistant.notice.startswith("re-pruned the image for this question") and "prefilled again" in \
        assistant.notice
    # negative control: the same question again is not pruned again
    "".join(assistant.respond("Is there a spoon?"))
    assert assistant.notice is None and "prune" not in assistant.last_stats.vision_ms


def test_reprune_command() -> None:
    out, err, backend = run("/reprune on\n/reprune off\n/reprune maybe\n/reprune\n")
    assert out.splitlines() == ["reprune: on", "reprune: off"]
    assert "update {'reprune': True}" in backend.calls and "update {'reprune': False}" in backend.calls
    assert err.splitlines() == ["error: /reprune takes on or off, got 'maybe'", "error: /reprune needs on or off"]


@pytest.mark.llm
def test_question_aware_strategy_in_prompt_mode(tiny_llm_bundle: Path, photo: Path, capsys) -> None:
    argv = ["--model", str(tiny_llm_bundle), "--image", str(photo), "--prompt", "What is shown?",
            "--max-tokens", "4", "--temperature", "0", "--timings", "--strategy", "dart", "--tokens", "32",
            "--pivots-image", "2", "--reprune"]
    assert main(argv) == 0
    assert "image tokens kept: 32/576" in capsys.readouterr().err
