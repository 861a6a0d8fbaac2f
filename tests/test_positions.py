"""Positions of kept tokens (method.md §6): ``packed`` vs ``original``.

Pure parts (virtual positions, identities, run splitting, the pipelines' ImageRows) against hand
cases and a plain loop; then llama.cpp (f32 KV, no flash attention) with original positions against
Hugging Face fed the same ``inputs_embeds`` with the same ``position_ids``, for LLaVA-1.5 and
LLaVA-NeXT, a chat continuation that reuses the cache, and ``runtime.prune --json``. Negative
controls: the rows fed at packed positions (what a backend that ignores the positions computes)
must miss Hugging Face's original-position logits by far more than the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import InputError, SettingError
from runtime.llm.prompt_cache import ImageRows, common_prefix, identities, position_runs, virtual_positions
from runtime.pipeline import PrunedImage
from tests.test_llm_backend import smollm2_gguf  # noqa: F401 - the real SmolLM2-135M GGUF fixture

LOGIT_ATOL = 1e-3  # llama.cpp f32 (f32 KV, no flash attention) vs PyTorch float32, as the other parity tests
FAR = 10 * LOGIT_ATOL  # a negative control must miss by at least this much
ROWS = np.zeros((3, 4), np.float32)


# --- pure ----------------------------------------------------------------------------------
def test_virtual_positions_hand_case() -> None:
    pieces = [[1, 2], ImageRows("k", ROWS, np.array([1, 2, 5]), 7), [9]]
    np.testing.assert_array_equal(virtual_positions(pieces), [0, 1, 3, 4, 7, 9])
    np.testing.assert_array_equal(virtual_positions([[1, 2], ImageRows("k", ROWS), [9]]), [0, 1, 2, 3, 4, 5])
    assert ImageRows("k", ROWS, np.array([0, 1, 2]), 3).width == 3


def test_identities_carry_positions() -> None:
    packed = identities([[1, 2], ImageRows("k", ROWS), [9]])
    original = identities([[1, 2], ImageRows("k", ROWS, np.array([0, 1, 4]), 6), [9]])
    assert packed[:4] == original[:4]  # same rows at the same positions: reusable
    assert common_prefix(packed, original) == 4  # the row after the gap differs, and all after it
    consecutive = identities([[1, 2], ImageRows("k", ROWS, np.arange(3), 3), [9]])
    assert consecutive == packed  # consecutive offsets (strategy none) are the packed positions


def _loop_runs(positions: list[int], previous: int) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(positions):
        before = positions[i - 1] if i else previous
        if i and p == before + 1:
            runs[-1] = (runs[-1][0], i + 1, runs[-1][2])
        else:
            runs.append((i, i + 1, p - before - 1))
    return runs


def test_position_runs_hand_case_and_loop() -> None:
    assert position_runs(np.array([3, 4, 7]), 0) == [(0, 2, 2), (2, 3, 2)]
    assert position_runs(np.array([0, 1, 2]), -1) == [(0, 3, 0)]
    assert position_runs(np.zeros(0, np.int64), 5) == []
    rng = np.random.default_rng(0)
    for _ in range(50):
        positions = np.sort(rng.choice(60, rng.integers(1, 30), replace=False)) + 2
        assert position_runs(positions, 1) == _loop_runs(positions.tolist(), 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        position_runs(np.array([3, 3]), 0)


@pytest.mark.parametrize(("offsets", "span", "words"), [
    (np.array([0, 2, 1]), 4, "strictly increasing"),
    (np.array([-1, 0, 1]), 4, "strictly increasing"),
    (np.array([0, 1]), 4, r"must be \[3\] integers"),
    (np.array([0.0, 1.0, 2.0]), 4, r"must be \[3\] integers"),
    (np.array([0, 1, 5]), 5, "span must be an integer above the last offset 5"),
    (np.array([0, 1, 2]), None, "span must be"),
])
def test_image_rows_refuses_bad_positions(offsets, span, words: str) -> None:
    with pytest.raises(InputError, match=words):
        ImageRows("k", ROWS, offsets, span)


def _pruned(kept: list[int], n: int = 10) -> PrunedImage:
    k = len(kept)
    rows = np.arange(k * 2, dtype=np.float32).reshape(k, 2)
    return PrunedImage(rows, np.array(kept, np.int64), np.ones(k, np.int64), np.full(n, -1), "fake", n, {})


def test_pruned_image_rows() -> None:
    pruned = _pruned([1, 4, 5])
    packed, original = pruned.image_rows("k"), pruned.image_rows("k", "original")
    assert packed.positions is None and packed.width == 3
    np.testing.assert_array_equal(original.offsets, [1, 4, 5])
    assert original.width == 10  # the text after the image starts where all N patches would end
    shuffled = _pruned([5, 1, 4]).image_rows("k", "original")  # fed in position order
    np.testing.assert_array_equal(shuffled.offsets, [1, 4, 5])
    np.testing.assert_array_equal(shuffled.rows, _pruned([5, 1, 4]).embeddings[[1, 2, 0]])
    # reordered rows are other rows: none is reused for a packed row of the same index and position
    visionzip = _pruned([1, 2, 5, 0, 3])  # dominant tokens ascending, then contextual ones
    reordered = identities([[1], visionzip.image_rows("k", "original")])
    assert common_prefix(identities([[1], visionzip.image_rows("k")]), reordered) == 1
    ascending = _pruned([0, 1, 4])
    assert common_prefix(identities([[1], ascending.image_rows("k")]),
                         identities([[1], ascending.image_rows("k", "original")])) == 1 + 2  # up to the first gap
    everything = _pruned(list(range(10)))
    assert identities([[1], everything.image_rows("k", "original")]) == identities([[1], everything.image_rows("k")])
    with pytest.raises(SettingError, match="positions must be one of packed, original, got 'shifted'"):
        pruned.image_rows("k", "shifted")


def test_pruned_anyres_rows_follow_the_pack() -> None:
    from runtime.anyres.pack import pack_kept, packed_layout
    from runtime.anyres.pipeline import PrunedAnyres
    from tests.test_anyres_pack import PINPOINTS

    layout = packed_layout((500, 1000), PINPOINTS)
    order = pack_kept(np.array([3]), [np.array([0]), np.array([0])], layout)
    rows = np.zeros((order.num_rows, 2), np.float32)
    pruned = PrunedAnyres(rows, order, (), "fake", layout.total_rows, (500, 1000), (1, 2))
    original = pruned.image_rows("k", "original")
    np.testing.assert_array_equal(original.offsets, [3, 576, 600, 624])  # runtime.anyres.pack.pack_kept's example
    assert original.width == layout.total_rows
    assert pruned.image_rows("k").positions is None


# --- llama.cpp against Hugging Face ---------------------------------------------------------
def _prompt(llm, question: str = "What is in the image?"):
    from runtime.llm.template import Conversation, conversation_segments, encode_prompt

    return encode_prompt(conversation_segments(Conversation().ask(question)), llm)


@pytest.fixture(scope="module")
def llava(tiny_llm_bundle: Path, tiny_llava_model) -> dict:
    from runtime.llm.backend import LlamaBackend
    from runtime.pipeline import Pipeline

    pipeline = Pipeline(tiny_llm_bundle)
    llm = LlamaBackend(tiny_llm_bundle / pipeline.manifest.llm.gguf, kv_type="f32", flash_attn="off")
    yield {"pipeline": pipeline, "llm": llm, "model": tiny_llava_model, "prompt": _prompt(llm)}
    llm.close()


def _check_parity(llm, model, prompt, rows: ImageRows, name: str) -> None:
    """All suffix logits with original positions equal HF's; the same rows packed miss by far."""
    from tests.llm_parity import device_logits, hf_logits

    expected = hf_logits(model, prompt, rows.rows, rows.offsets, rows.width, suffix_all=True)
    got = device_logits(llm, prompt, rows.rows, rows.offsets, rows.width, suffix_all=True)
    assert got.shape == expected.shape == (len(prompt.suffix), expected.shape[1])
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL, err_msg=name)
    held = llm.context.positions
    np.testing.assert_array_equal(held[len(prompt.prefix):len(prompt.prefix) + rows.rows.shape[0]],
                                  len(prompt.prefix) + rows.offsets)
    assert held[-1] == len(prompt.prefix) + rows.width + len(prompt.suffix) - 1
    # negative control: the rows at packed positions are another sequence for HF
    packed = device_logits(llm, prompt, rows.rows, suffix_all=True)
    assert np.abs(packed - expected).max() > FAR, name


@pytest.mark.llm
@pytest.mark.parametrize(("strategy", "tokens"), [("entropy", 64), ("divprune", 40)])
def test_llava15_original_positions_equal_hf(llava, photos, strategy: str, tokens: int) -> None:
    pruned = llava["pipeline"].prune(photos["chelsea"], tokens, strategy)
    rows = pruned.image_rows(None, "original")
    assert np.count_nonzero(np.diff(rows.offsets) > 1) > 5  # many gaps, so many runs
    _check_parity(llava["llm"], llava["model"], llava["prompt"], rows, strategy)


@pytest.mark.llm
def test_llava15_chat_continuation_with_original_positions(llava, photos) -> None:
    """Turn 2 reuses turn 1's cache (moved cells included) and still equals HF on the whole sequence;
    switching to packed positions reuses only the rows before the first gap and equals HF packed."""
    from tests.llm_parity import hf_logits

    llm, model = llava["llm"], llava["model"]
    rows = llava["pipeline"].prune(photos["astronaut"], 48, "entropy").image_rows("astronaut", "original")
    first, second = _prompt(llm), _prompt(llm, "What is in the image? Answer in one word, then explain.")
    llm.reset()
    llm.prefill([first.prefix, rows, first.suffix])
    llm.eval_tokens([300, 301])  # an answer as generation feeds it
    done = llm.prefill([second.prefix, rows, second.suffix])
    assert done.reused >= len(first.prefix) + rows.rows.shape[0]
    expected = hf_logits(model, second, rows.rows, rows.offsets, rows.width)
    np.testing.assert_allclose(llm.logits(), expected, rtol=0, atol=LOGIT_ATOL)
    packed = ImageRows("astronaut", rows.rows)
    done = llm.prefill([second.prefix, packed, second.suffix])
    first_gap = int(np.flatnonzero(np.diff(rows.offsets) > 1)[0]) + 1 if rows.offsets[0] == 0 else 0
    assert done.reused == len(second.prefix) + first_gap
    np.testing.assert_allclose(llm.logits(), hf_logits(model, second, rows.rows), rtol=0, atol=LOGIT_ATOL)
    # negative control: HF with original positions is not what the packed cache now computes
    assert np.abs(llm.logits() - expected).max() > FAR


@pytest.mark.llm
def test_assistant_feeds_original_positions(tiny_llm_bundle: Path, photos) -> None:
    from runtime.assistant import Assistant
    from runtime.turn import Settings

    assistant = Assistant.open(tiny_llm_bundle, Settings(tokens=32, temperature=0, max_tokens=3, positions="original"))
    try:
        assistant.set_image(photos["coffee"])
        "".join(assistant.respond("What is shown?"))
        first = assistant.last_stats
        rows = assistant._pruned[1].image_rows(None, "original")
        held = assistant.llm.context.positions  # prefix 0..p-1, the rows at p + offsets, the text from p + N
        starts = [p for p in range(held.size - 32) if np.array_equal(held[p:p + 32], p + rows.offsets)]
        assert len(starts) == 1 and held[starts[0] + 32] == starts[0] + rows.width
        "".join(assistant.respond("And the colour?"))
        assert assistant.last_stats.reused_positions >= first.prefill_positions - 1
        with pytest.raises(SettingError, match="positions must be one of"):
            assistant.update(positions="shifted")
    finally:
        assistant.close()


QUANT_ATOL = 1.0  # SmolLM2 logits (|max| ~26) through a q8_0 KV cache: ~0.5-0.7 off f32, packed or not


@pytest.mark.llm
def test_quantised_cache_moves_cells(smollm2_gguf: Path) -> None:  # noqa: F811 - the fixture imported below
    """A q8_0 KV cache (another cell layout in llama.cpp's state) takes gaps too: near the f32 cache
    with the same gaps, far from the rows at packed positions."""
    from runtime.llm.backend import LlamaBackend

    offsets = np.array([0, 1, 2, 5, 6, 9, 10, 11, 20, 21, 30, 33])
    logits = {}
    for kv_type, flash in (("f32", "off"), ("q8_0", "auto")):  # a quantised V cache needs flash attention
        with LlamaBackend(smollm2_gguf, kv_type=kv_type, flash_attn=flash, n_ctx=256) as backend:
            rows = (np.random.default_rng(0).standard_normal((12, backend.n_embd)) * 0.02).astype(np.float32)
            for name, image in (("gaps", ImageRows("r", rows, offsets, 40)), ("packed", ImageRows("r", rows))):
                backend.reset()
                backend.prefill([[1, 300, 301, 302], image, [310, 311, 312]])
                logits[kv_type, name] = backend.logits()
    np.testing.assert_allclose(logits["q8_0", "gaps"], logits["f32", "gaps"], rtol=0, atol=QUANT_ATOL)
    assert np.abs(logits["q8_0", "packed"] - logits["f32", "gaps"]).max() > 3 * QUANT_ATOL


@pytest.fixture(scope="module")
def llava_next(tiny_next_llm_bundle: Path, tiny_next_dir: Path) -> dict:
    from tests.llm_parity import next_parity_setup

    with next_parity_setup(tiny_next_llm_bundle, tiny_next_dir) as parts:
        yield parts


@pytest.mark.llm
@pytest.mark.parametrize("newline", ["rows", "none"])
def test_llava_next_original_positions_equal_hf(llava_next, photos, newline: str) -> None:
    pruned = llava_next["pipeline"].prune(photos["chelsea"], 200, "entropy", newline=newline)
    rows = pruned.image_rows(None, "original")
    assert rows.width == pruned.total_rows > rows.rows.shape[0]
    _check_parity(llava_next["llm"], llava_next["model"], llava_next["prompt"], rows, newline)


# --- runtime.prune --json -------------------------------------------------------------------
def test_prune_json_reports_positions(tiny_bundle: Path, photos, tmp_path: Path, capsys) -> None:
    from runtime.prune import main

    photo_path = tmp_path / "chelsea.png"
    photos["chelsea"].save(photo_path)
    argv = [str(photo_path), "--model", str(tiny_bundle), "--tokens", "16", "--json"]
    assert main(argv) == 0
    packed = json.loads(capsys.readouterr().out)
    assert packed["positions"] == "packed" and "row_positions" not in packed
    assert main([*argv, "--positions", "original"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert original["positions"] == "original" and original["positions_span"] == original["num_patches"]
    assert original["row_positions"] == sorted(original["kept"])
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices, worded on one line
        main([*argv, "--positions", "shifted"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--positions" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_server_request_sets_positions() -> None:
    from runtime.serve.api import APIError, ChatRequest, settings_changes
    from runtime.turn import Settings

    def changes(**fields) -> dict:
        return settings_changes(ChatRequest(messages=[{"role": "user", "content": "hi"}], **fields), Settings())

    assert changes()["positions"] == "packed"  # the server's default
    assert changes(positions="original")["positions"] == "original"
    with pytest.raises(APIError) as info:
        changes(positions="shifted")
    assert info.value.status == 400 and info.value.param == "positions"
