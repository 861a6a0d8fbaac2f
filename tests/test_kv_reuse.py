"""KV-cache reuse across turns: after ``prefill`` reuses what the cache holds, the next-token logits
equal those of a fresh full prefill of the same prompt, and only the new positions are evaluated.

llama.cpp runs with an f32 KV cache and flash attention off, so both paths compute the same
float32 numbers; the negative control keeps one stale position too many and must fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.llm.prompt_cache import ImageRows, common_prefix
from tests.bundle_files import member
from tests.test_llm_backend import smollm2_gguf  # noqa: F401 - the real SmolLM2-135M GGUF fixture

REUSE_ATOL = 1e-4  # issue bound: logits after reuse vs a fresh prefill, f32 KV, no flash attention
EXACT = {"kv_type": "f32", "flash_attn": "off", "n_ctx": 512}

pytestmark = pytest.mark.llm


def test_common_prefix_hand_cases() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([("k", 0), ("k", 1)], [("k", 0), ("j", 1)]) == 1


def _turns(n_embd: int, rng: np.random.Generator) -> dict[str, list]:
    rows = rng.standard_normal((12, n_embd)).astype(np.float32) * 0.02
    other = rng.standard_normal((12, n_embd)).astype(np.float32) * 0.02
    image, new_image = ImageRows(("img-a", 12), rows), ImageRows(("img-b", 12), other)
    fewer = ImageRows(("img-a", 8), rows[:8])
    head, question = [1, 300, 301, 302], [310, 311, 312]
    answer, follow_up = [320, 321, 322, 2], [330, 331, 332, 333]
    return {
        "turn 1": [head, image, question],
        "turn 2": [head, image, question + answer + follow_up],
        "new image": [head, new_image, question],
        "fewer rows": [head, fewer, question],
        "back to text": [head, fewer, question[:1]],
    }


def _fresh_logits(path: Path, prompt: list) -> np.ndarray:
    from runtime.llm.backend import LlamaBackend

    with LlamaBackend(path, **EXACT) as fresh:
        fresh.prefill(prompt)
        return fresh.logits()


@pytest.fixture(params=["tiny", "smollm2"])
def gguf(request: pytest.FixtureRequest, tiny_llm_bundle: Path) -> Path:
    return member(tiny_llm_bundle, "llm") if request.param == "tiny" else request.getfixturevalue("smollm2_gguf")


def test_reused_prefill_equals_fresh_prefill(gguf: Path) -> None:
    from runtime.llm.backend import LlamaBackend

    with LlamaBackend(gguf, **EXACT) as backend:
        turns = _turns(backend.n_embd, np.random.default_rng(0))
        counts = {}
        for name, prompt in turns.items():
            done = backend.prefill(prompt)
            counts[name] = (done.evaluated, done.reused)
            np.testing.assert_allclose(backend.logits(), _fresh_logits(gguf, prompt), rtol=0, atol=REUSE_ATOL,
                                       err_msg=name)
            if name == "turn 1":
                backend.eval_tokens([320, 321, 322])  # the answer as generated (its last token not yet fed)
    assert counts["turn 1"] == (19, 0)
    assert counts["turn 2"] == (5, 22)  # only the EOS and the new question: 19 + 3 answer tokens reused
    assert counts["new image"] == (15, 4)  # cut at the image
    assert counts["fewer rows"] == (11, 4)  # another K: other rows, cut at the image
    assert counts["back to text"] == (1, 12)  # a prefix of the cache: the last position is re-evaluated


def test_negative_control_one_stale_position_fails(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping one position past the common prefix (a plausible off-by-one) changes the logits."""
    import runtime.llm.context
    from runtime.llm.backend import LlamaBackend

    monkeypatch.setattr(runtime.llm.context, "common_prefix", lambda a, b: common_prefix(a, b) + 1)
    with LlamaBackend(gguf, **EXACT) as backend:
        turns = _turns(backend.n_embd, np.random.default_rng(0))
        backend.prefill(turns["turn 1"])
        backend.prefill(turns["new image"])
        stale = backend.logits()
    assert np.abs(stale - _fresh_logits(gguf, turns["new image"])).max() > REUSE_ATOL


def test_overflowing_prompt_evaluates_nothing(tiny_llm_bundle: Path) -> None:
    from runtime.errors import ContextOverflowError
    from runtime.llm.backend import LlamaBackend

    with LlamaBackend(member(tiny_llm_bundle, "llm"), n_ctx=64) as backend:
        backend.prefill([[1, 300, 301]])
        with pytest.raises(ContextOverflowError, match="needs 70 positions but the context holds 64"):
            backend.prefill([[1, 300, 301], list(range(400, 467))])
        assert backend.n_past == 3  # the cache is as it was
        assert backend.prefill([[1, 300, 301, 302]]).reused == 3


def test_assistant_turns_reuse_the_cache(tiny_llm_bundle: Path, photos) -> None:
    """The chat engine: turn 2 evaluates only its new tokens; a new image and /tokens cut at the image;
    /reset keeps the system prefix; a text-only chat works."""
    from runtime.assistant import Assistant
    from runtime.turn import Settings

    assistant = Assistant.open(tiny_llm_bundle, Settings(temperature=0, max_tokens=4))
    try:
        assistant.set_image(photos["coffee"])
        "".join(assistant.respond("What is shown?"))
        first = assistant.last_stats
        "".join(assistant.respond("And the colour?"))
        second = assistant.last_stats
        assert first.reused_positions == 0 and second.reused_positions >= first.prefill_positions - 1
        assert second.prefill_positions < 40  # the answer's re-tokenised tail, EOS and the new question
        assistant.update(tokens=32)
        "".join(assistant.respond("Fewer tokens?"))
        prefix = assistant.last_stats.reused_positions
        assert 0 < prefix < first.prefill_positions - 64  # cut where the image rows start
        assistant.reset()
        "".join(assistant.respond("After reset?"))
        assert assistant.last_stats.reused_positions >= prefix  # system line and image kept
        assistant.set_image(None)
        assert "".join(assistant.respond("No image at all?")) is not None
        assert assistant.last_stats.kept == 0
    finally:
        assistant.close()
