"""tools/benchkit/proctree.py (process-tree memory and disk accounting) and tools/rehearse.py (the main job,
measured)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runtime.errors import InputError
from tools.benchkit.proctree import run_measured
from tools.rehearse import STAGES, RehearsalConfig, chat_ttft, command, last_line, main

MB = 1_000_000
N = 200 * MB  # bytes the allocating child touches
ALLOC = f"import time; block = b'x' * {N}; time.sleep(0.5)"  # b'x' * N writes every page: resident, anonymous
SPAWN = "import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}], check=True)"
INTERPRETERS_SLACK = 150 * MB  # one or two idle Python interpreters plus sampling noise


def _write(path: Path, size: int) -> str:
    """Code that writes ``size`` bytes to ``path``, fsyncs, and lingers so a sampler sees its final counter."""
    return (f"import os, time\nwith open({str(path)!r}, 'wb') as f:\n    f.write(b'x' * {size}); f.flush(); "
            f"os.fsync(f.fileno())\ntime.sleep(0.3)")


def test_peak_memory_of_one_process() -> None:
    got = run_measured([sys.executable, "-c", ALLOC])
    assert got.returncode == 0 and got.samples > 1 and got.wall_s >= 0.5
    assert got.peak_anon_bytes >= 190 * MB
    assert got.peak_anon_bytes <= got.peak_rss_bytes < N + INTERPRETERS_SLACK
    assert got.hwm_bytes >= 190 * MB  # the kernel's own peak agrees


def test_spawning_process_peak_not_charged_to_child() -> None:
    ballast = b"x" * (300 * MB)  # our own peak resident is now above 300 MB
    got = run_measured([sys.executable, "-c", "import time; time.sleep(0.2)"])
    del ballast
    assert got.returncode == 0 and got.peak_rss_bytes < 100 * MB
    # Negative control: exec carries the spawner's peak into the child's ru_maxrss, so taking
    # wait4's figure at face value would charge our 300 MB to an idle interpreter.
    assert got.ru_maxrss_bytes >= 300 * MB


def test_grandchild_counted_and_child_only_sampler_misses_it() -> None:
    argv = [sys.executable, "-c", SPAWN.format(code=ALLOC)]
    tree = run_measured(argv)
    assert tree.returncode == 0
    assert tree.peak_anon_bytes >= 190 * MB
    assert tree.peak_anon_bytes <= tree.peak_rss_bytes < N + INTERPRETERS_SLACK
    # Negative control: sampling the child alone (its grandchild ignored) must miss the 200 MB.
    alone = run_measured(argv, tree=False)
    assert alone.returncode == 0 and alone.peak_anon_bytes < 100 * MB


def test_disk_written(tmp_path: Path) -> None:
    got = run_measured([sys.executable, "-c", _write(tmp_path / "a.bin", 64 * MB)])
    assert got.returncode == 0 and got.disk_written_bytes >= 60 * MB


def test_grandchild_writes_counted_once(tmp_path: Path) -> None:
    # The kernel folds a reaped child's counters into its parent's: summing every process's own
    # counter (the grandchild is sampled after its write: it lingers 0.3 s) would report ~128 MB.
    got = run_measured([sys.executable, "-c", SPAWN.format(code=_write(tmp_path / "b.bin", 64 * MB))])
    assert got.returncode == 0 and 60 * MB <= got.disk_written_bytes < 100 * MB


def test_output_captured_in_full_and_failure_reported() -> None:
    code = "import sys; print('x' * 200000); print('bye', file=sys.stderr); sys.exit(3)"  # > a pipe buffer
    got = run_measured([sys.executable, "-c", code], label="t")
    assert got.returncode == 3 and len(got.stdout) == 200001 and last_line(got.stderr) == "bye"


def test_ttft_parsing_both_formats() -> None:
    new = "prefill: 9 positions\ntime to first token: 12.5 ms since the question, 250.0 ms since the image\n"
    assert chat_ttft(new) == (pytest.approx(0.25), "image")
    assert chat_ttft("time to first token: 40.0 ms\ndecode: 3 tokens") == (pytest.approx(0.04), "question")
    assert chat_ttft("no timings here") == (None, "")


def test_commands(tmp_path: Path) -> None:
    config = RehearsalConfig("/ckpt", tmp_path, tmp_path / "i.png", tokens=32, threads=2, max_tokens=4)
    assert "--quant" not in command("export.llm", config)
    assert command("export.llm", RehearsalConfig("/c", tmp_path, tmp_path / "i.png", quant="f32"))[-2:] == [
        "--quant", "f32"]
    chat = command("chat K", config)
    assert chat[1:3] == ["-m", "runtime.chat"] and "--strategy" not in chat
    assert {"--int8", "--timings"} <= set(chat) and chat[chat.index("--tokens") + 1] == "32"
    assert command("chat all rows", config)[-2:] == ["--strategy", "none"]
    with pytest.raises(InputError):
        RehearsalConfig("/c", tmp_path, tmp_path / "i.png", tokens=0)


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rehearse: error: no checkpoint directory")


def test_failing_stage_stops_with_table_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()  # a directory, but no checkpoint: export.clip fails fast
    report = tmp_path / "r.json"
    code = main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--image",
                 str(tmp_path / "o" / "missing.png"), "--json", str(report)])
    assert code == 2 and capsys.readouterr().err.endswith("rehearse: error: no image file at "
                                                          f"{tmp_path / 'o' / 'missing.png'}\n")
    assert main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--json", str(report)]) == 2
    captured = capsys.readouterr()
    assert list(_table_rows(captured.out)) == ["export.clip"]
    last = captured.err.splitlines()[-1]
    assert last.startswith("rehearse: error: stage export.clip failed (exit 2: export.clip: error: ")
    assert json.loads(report.read_text())["failure"] == last.removeprefix("rehearse: error: ")


def _table_rows(stdout: str) -> dict[str, list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "stage"
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "file / peak":  # the sizes table starts
            break
        rows[cells[0]] = cells
    return rows


@pytest.mark.llm
def test_rehearse_tiny_end_to_end(tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "run", tmp_path / "rehearsal.json"
    code = main(["--checkpoint", str(tiny_llava_dir), "--out", str(out), "--quant", "f32", "--max-tokens", "4",
                 "--threads", "2", "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    rows = _table_rows(captured.out)
    assert list(rows) == list(STAGES)
    for stage, cells in rows.items():
        wall, anon, resident = float(cells[1]), float(cells[2]), float(cells[3])
        assert wall > 0 and anon > 0 and resident >= anon, (stage, cells)
    for stage in ("chat K", "chat all rows", "llama.cpp turn"):
        assert float(rows[stage][5]) > 0, rows[stage]
    assert "kept 64/576" in rows["chat K"][6] and "kept 576/576" in rows["chat all rows"][6]
    data = json.loads(report.read_text())
    written = {row["stage"]: row["disk_written_bytes"] for row in data["rows"]}
    assert written["export.llm"] >= data["sizes"]["gguf_bytes"] > 0  # the GGUF went to disk
    assert [row["stage"] for row in data["rows"]] == list(STAGES) and data["failure"] is None
    assert data["sizes"]["gguf_bytes"] > 0 and "chat memory target" in captured.out
