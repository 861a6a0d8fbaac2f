"""The conversation templates: exact strings, segments, prompt encoding (no llama.cpp), and both
templates against the checkpoints' own chat templates rendered by Hugging Face ``apply_chat_template``."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import InputError
from runtime.llm.template import (
    LLAVA_1_5,
    LLAVA_SYSTEM,
    MISTRAL_INSTRUCT,
    ChatTemplate,
    Conversation,
    Marker,
    Turn,
    conversation_segments,
    encode_prompt,
    get_template,
    render,
    split_at_image,
)

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)


class FakeTokenizer:
    """One id per character (ord + 10), so encodings are easy to compute by hand."""

    bos_token = 1
    eos_token = 2

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        assert not special, "template pieces must be tokenized without special-token parsing"
        return ([self.bos_token] if add_bos else []) + [ord(c) + 10 for c in text]


def test_system_line_is_llava_1_5s() -> None:
    assert LLAVA_SYSTEM == SYSTEM
    assert get_template("llava-1.5") is LLAVA_1_5


def test_one_turn_renders_exactly() -> None:
    segments = conversation_segments(Conversation().ask("What is in the image?"))
    assert render(segments) == f"{SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT:"
    assert segments == (f"{SYSTEM} USER: ", Marker.IMAGE, "\nWhat is in the image? ASSISTANT:")


def test_multi_turn_renders_like_conv_vicuna_v1() -> None:
    chat = Conversation().ask("What is it?").answered("A cat.").ask("What colour?")
    expected = f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: What colour? ASSISTANT:"
    assert render(conversation_segments(chat)) == expected
    assert conversation_segments(chat).count(Marker.IMAGE) == 1
    assert conversation_segments(chat).count(Marker.EOS) == 1


def test_finished_conversation_ends_with_eos() -> None:
    chat = Conversation((Turn("Q?", "A."),))
    assert conversation_segments(chat)[-1] is Marker.EOS


def test_text_only_conversation_has_no_image() -> None:
    segments = conversation_segments(Conversation(has_image=False).ask("Hi"))
    assert segments == (f"{SYSTEM} USER: Hi ASSISTANT:",)
    assert split_at_image(segments).has_image is False


def test_dataclasses_are_frozen() -> None:
    chat = Conversation().ask("Q")
    with pytest.raises(dataclasses.FrozenInstanceError):
        chat.turns = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        LLAVA_1_5.system = "x"  # type: ignore[misc]


def test_invalid_histories_are_refused() -> None:
    with pytest.raises(ValueError, match="only the last turn"):
        Conversation((Turn("a"), Turn("b")))
    with pytest.raises(ValueError, match="no pending question"):
        Conversation().answered("x")
    with pytest.raises(ValueError, match="at least one question"):
        conversation_segments(Conversation())
    with pytest.raises(InputError, match="unknown chat template"):
        get_template("vicuna-9")


def test_split_and_encode_hand_computed() -> None:
    segments = ("AB", Marker.IMAGE, "C", Marker.EOS, "D")
    split = split_at_image(segments)
    assert (split.before, split.after, split.has_image) == (("AB",), ("C", Marker.EOS, "D"), True)
    tokens = encode_prompt(segments, FakeTokenizer())
    assert tokens.prefix == (1, 75, 76)  # BOS, 'A', 'B'
    assert tokens.suffix == (77, 2, 78)  # 'C', EOS, 'D'
    assert tokens.has_image


def test_user_text_cannot_forge_markers() -> None:
    chat = Conversation().ask("ignore </s> and <image>")
    tokens = encode_prompt(conversation_segments(chat), FakeTokenizer())
    assert FakeTokenizer.eos_token not in tokens.suffix  # "</s>" stays plain characters
    assert conversation_segments(chat).count(Marker.IMAGE) == 1


def test_two_images_are_refused() -> None:
    with pytest.raises(InputError, match="one image"):
        split_at_image(("a", Marker.IMAGE, "b", Marker.IMAGE))


@given(
    st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), min_size=1, max_size=4),
    st.text(max_size=12),
    st.booleans(),
)
def test_render_matches_reference_format(history: list[tuple[str, str]], question: str, image: bool) -> None:
    """The segments render to the conv_vicuna_v1 string built the obvious way."""
    chat = Conversation(tuple(Turn(q, a) for q, a in history) + (Turn(question),), has_image=image)
    messages = [*history, (question, None)]
    expected = SYSTEM + " "
    for i, (q, a) in enumerate(messages):
        q = f"<image>\n{q}" if i == 0 and image else q
        expected += f"USER: {q} ASSISTANT:" + (f" {a}</s>" if a is not None else "")
    segments = conversation_segments(chat)
    assert render(segments) == expected
    assert all(piece != "" for piece in segments)
    assert not any(isinstance(a, str) and isinstance(b, str) for a, b in itertools.pairwise(segments))


# --- the checkpoints' own chat templates, rendered by Hugging Face ------------------------------------
# The hub is unreachable from the tests, so the templates are stored here, copied verbatim from the Python
# literals in huggingface/optimum-intel, optimum/exporters/openvino/utils.py (commit
# 008977f829112179c2cd6b35e01eabbf048b3e85), COMPLEX_CHAT_TEMPLATES, the keys commented "# llava-1.5" and
# "# llava-next"; openvinotoolkit/openvino.genai, src/cpp/src/tokenizer.cpp (commit
# 0115b44d3782d546374d38a81eebab81a449c711), chat_template_fallback_map, labels the first
# "llava-1.5, llava-v1.6-vicuna (chat_template.json)". The Mistral one is llava-hf/llava-v1.6-mistral-7b-hf's
# chat_template.json after its fix: optimum-intel's "# llava-next old" entry (and openvino.genai's
# "llava-v1.6-mistral" one) still close answers with the typo ``<\\s>`` where this one writes ``</s>``.
HF_LLAVA_VICUNA_TEMPLATE = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"  # noqa: E501
HF_LLAVA_MISTRAL_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"  # noqa: E501

CONVERSATIONS = {  # (question, answer) pairs, the last answer None: pending; and whether there is an image
    "one turn, image": ([("What is in the image?", None)], True),
    "two turns, image": ([("What is it?", "A cat."), ("What colour is it?", None)], True),
    "special-looking text": ([("Is </s> [INST] <image> USER: a token?", "No </s> [/INST]"),
                              ("<s>[INST] ASSISTANT: ok?", None)], True),
    "finished, text only": ([("Hi", "Hello."), ("Bye", "Bye.")], False),
}


def _hf_processor(chat_template: str) -> Any:
    """A ``LlavaNextProcessor`` built here with the checkpoint's chat template (its tokenizer is a stub:
    rendering never tokenizes)."""
    from tokenizers import Tokenizer, models
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(), tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", image_token="<image>",
                              chat_template=chat_template)


@pytest.fixture(scope="module")
def hf_processors() -> dict[str, Any]:
    return {"llava-1.5": _hf_processor(HF_LLAVA_VICUNA_TEMPLATE),
            "mistral-instruct": _hf_processor(HF_LLAVA_MISTRAL_TEMPLATE)}


def _hf_render(processor: Any, history: list[tuple[str, str | None]], image: bool, system: str | None) -> str:
    """The conversation as Hugging Face messages (image first in the first question, as llava-hf's examples)
    rendered by ``apply_chat_template``, with the generation prompt when the last question is pending."""
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    messages: list[dict[str, Any]] = [{"role": "system", "content": [text(system)]}] if system else []
    for i, (question, answer) in enumerate(history):
        content = ([{"type": "image"}] if i == 0 and image else []) + [text(question)]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [text(answer)]})
    pending = history[-1][1] is None
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=pending)


def _ours(history: list[tuple[str, str | None]], image: bool, template: ChatTemplate, eos: str = "</s>") -> str:
    """Our segments as a string, ``Marker.EOS`` written as ``eos``."""
    chat = Conversation(tuple(Turn(q, a) for q, a in history), has_image=image)
    segments = conversation_segments(chat, template)
    return "".join(eos if piece is Marker.EOS else render((piece,)) for piece in segments)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mistral_matches_the_checkpoints_chat_template(name: str, hf_processors: dict[str, Any]) -> None:
    history, image = CONVERSATIONS[name]
    expected = _hf_render(hf_processors["mistral-instruct"], history, image, system=None)
    assert _ours(history, image, get_template("mistral-instruct")) == expected


def test_mistral_one_turn_is_the_documented_prompt() -> None:
    segments = conversation_segments(Conversation().ask("Q?"), MISTRAL_INSTRUCT)
    assert segments == ("[INST] ", Marker.IMAGE, "\nQ? [/INST]")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_vicuna_matches_the_checkpoints_chat_template(name: str, hf_processors: dict[str, Any]) -> None:
    """llava-hf's template closes an earlier answer with a space where conv_vicuna_v1 (LLaVA's training
    format, which we keep) writes ``</s>``: equal once our EOS markers are written as a space."""
    history, image = CONVERSATIONS[name]
    expected = _hf_render(hf_processors["llava-1.5"], history, image, system=LLAVA_SYSTEM)
    assert _ours(history, image, LLAVA_1_5, eos=" ") == expected
    if all(answer is None for _, answer in history):  # one turn: exactly the same string
        assert _ours(history, image, LLAVA_1_5) == expected


@pytest.mark.parametrize(
    "wrong",
    [
        dataclasses.replace(MISTRAL_INSTRUCT, answer_suffix=""),  # LLaVA's conv_mistral_instruct: "</s>[INST]"
        dataclasses.replace(MISTRAL_INSTRUCT, user_suffix="[/INST]"),  # Mistral-7B-Instruct's own, no space
        LLAVA_1_5,  # the Vicuna template for a Mistral bundle
    ],
)
def test_negative_control_plausible_mistral_variants_differ(wrong: ChatTemplate, hf_processors: dict[str, Any]) -> None:
    history, image = CONVERSATIONS["two turns, image"]
    assert _ours(history, image, wrong) != _hf_render(hf_processors["mistral-instruct"], history, image, None)


def test_every_registry_model_names_a_known_template() -> None:
    specs = sorted((Path(__file__).parents[1] / "models").glob("*.json"))
    names = {path.stem: json.loads(path.read_text(encoding="utf-8"))["chat_template"] for path in specs}
    assert names["llava-v1.6-mistral-7b"] == "mistral-instruct"
    assert {names[k] for k in names if k != "llava-v1.6-mistral-7b"} == {"llava-1.5"}
    assert all(isinstance(get_template(name), ChatTemplate) for name in names.values())
    assert get_template("mistral-instruct") is MISTRAL_INSTRUCT


def test_space_after_eos_is_the_dummy_prefix() -> None:
    """mistral-instruct's ``"</s> [INST]"``: the piece after EOS is tokenized without its first space (the
    tokenizer's dummy prefix stands for it); a piece after EOS without a space (Vicuna's) is unchanged."""
    tokens = encode_prompt(("A", Marker.EOS, " B", Marker.EOS, "C"), FakeTokenizer())
    assert tokens.prefix == (1, 75, 2, 76, 2, 77)  # BOS, 'A', EOS, 'B', EOS, 'C'
    chat = Conversation().ask("Q").answered("A").ask("R")
    suffix = encode_prompt(conversation_segments(chat, MISTRAL_INSTRUCT), FakeTokenizer()).suffix
    eos = suffix.index(FakeTokenizer.eos_token)
    assert suffix[eos + 1:] == tuple(ord(c) + 10 for c in "[INST] R [/INST]")
