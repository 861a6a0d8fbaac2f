"""Absurd GGUF metadata is refused with one line before llama.cpp sees the file (llama.cpp itself
aborts the whole process on it). Files are written with the ``gguf`` package, metadata only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from runtime.errors import BundleError
from runtime.llm.gguf_header import check_hparams, read_metadata

GOOD = {"block_count": 2, "embedding_length": 64, "head_count": 4, "head_count_kv": 2, "eps": 1e-5}


def _write(path: Path, block_count: int, embedding_length: int, head_count: int, head_count_kv: int,
           eps: float) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(block_count)
    writer.add_embedding_length(embedding_length)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(head_count_kv)
    writer.add_layer_norm_rms_eps(eps)
    writer.add_token_list([b"<unk>", b"a", b"b"])  # an array of strings to skip
    writer.add_token_scores([0.0, -1.0, -2.0])  # a numeric array to skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def test_metadata_is_read_like_the_gguf_reader(tmp_path: Path) -> None:
    meta = read_metadata(_write(tmp_path / "ok.gguf", **GOOD))
    reader = gguf.GGUFReader(tmp_path / "ok.gguf")
    assert meta["llama.block_count"] == reader.get_field("llama.block_count").contents() == 2
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.tokens"] is None
    assert check_hparams(tmp_path / "ok.gguf")["llama.attention.head_count_kv"] == 2


@pytest.mark.parametrize(("change", "words"), [
    ({"block_count": 0}, "block_count is 0"),
    ({"block_count": 600_000}, "block_count is 600000"),
    ({"eps": float("nan")}, "layer_norm_rms_epsilon is nan"),
    ({"head_count": 5}, "head_count 5 does not divide the width 64"),
    ({"head_count_kv": 0}, "head_count_kv 0 does not divide"),
    ({"head_count_kv": 3}, "head_count_kv 3 does not divide"),
])
def test_absurd_metadata_is_one_line(tmp_path: Path, change: dict, words: str) -> None:
    path = _write(tmp_path / "bad.gguf", **{**GOOD, **change})
    with pytest.raises(BundleError, match=words) as err:
        check_hparams(path)
    assert "\n" not in str(err.value)


def test_truncated_header_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.gguf", **GOOD)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BundleError, match="unreadable GGUF header"):
        check_hparams(cut)


@pytest.mark.llm
def test_llama_cpp_never_sees_a_zero_block_model(tmp_path: Path) -> None:
    """Through the product: LlamaBackend refuses it in a child process that exits normally (the
    negative control is llama.cpp's own loader, which aborts the process on the same file)."""
    path = _write(tmp_path / "zero.gguf", **{**GOOD, "block_count": 0})
    ours = subprocess.run([sys.executable, "-c", "import sys; from runtime.llm.backend import LlamaBackend\n"
                           "try:\n    LlamaBackend(sys.argv[1])\nexcept Exception as e:\n    print(e); sys.exit(2)",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert ours.returncode == 2 and "block_count is 0" in ours.stdout
    raw = subprocess.run([sys.executable, "-c", "import sys, llama_cpp\n"
                          "p = llama_cpp.llama_model_default_params()\n"
                          "m = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), p)\n"
                          "sys.exit(3 if m else 4)", str(path)], capture_output=True, text=True, timeout=60)
    assert raw.returncode != 2  # llama.cpp alone: an abort (negative) or a failed load, never our message


def test_make_random_gguf_refuses_zero_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.make_random_gguf import main

    assert main([str(tmp_path / "x.gguf"), "--preset", "tiny", "--layers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every size must be >= 1" in err and not (tmp_path / "x.gguf").exists()
    assert main([str(tmp_path / "y.gguf"), "--preset", "tiny", "--quant", "q9"]) == 2
    assert "unknown quant" in capsys.readouterr().err
