"""tools/bench_serve.py: the real server started as a child on 127.0.0.1, measured through the openai client."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.bench_serve import main

pytestmark = pytest.mark.llm


def _rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| request")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_bench_serve_measures_every_request_and_the_cache_reuse(tiny_llm_bundle: Path, capsys) -> None:
    assert main(["--model", str(tiny_llm_bundle), "--max-tokens", "4", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [row[0] for row in rows] == ["1", "2", "3", "4"] and rows[3][1].endswith("(new image)")
    prompt, cached, answer = ([int(row[i]) for row in rows] for i in (2, 3, 6))
    # A follow-up question re-sends the conversation; the server evaluates only what its cache lacks:
    # everything of the previous request is cached (its prompt and the generated answer's ids but
    # the last, which was sampled and never fed).
    assert cached[1] >= prompt[0] + answer[0] - 1 and cached[2] >= prompt[1] + answer[1] - 1
    assert prompt[2] > prompt[1] > prompt[0]
    assert cached[3] < prompt[3] - 64  # a new image: its 64 rows are evaluated again
    assert all(float(row[4]) > 0 and float(row[5]) >= float(row[4]) for row in rows)
    assert "peak resident memory" in out and "VmHWM" in out


def test_bench_serve_reports_a_server_that_cannot_start_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tmp_path / "missing"), "--start-timeout", "120"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bench_serve: error: the server exited:") and "no bundle directory" in err[-1]
    assert not any("Traceback" in line for line in err)
