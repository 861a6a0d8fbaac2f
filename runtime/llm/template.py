"""LLaVA's conversation templates as data, and conversations as segments.

Two templates, chosen by name (``models/*.json`` and the manifest's ``chat_template``):

- ``llava-1.5`` (LLaVA-1.5 and LLaVA-NeXT Vicuna; ``conv_vicuna_v1``, separator style TWO):
  ``"{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"``.
- ``mistral-instruct`` (LLaVA-NeXT Mistral, ``llava-hf/llava-v1.6-mistral-7b-hf``), as that
  checkpoint's own chat template renders it: ``"[INST] <image>\\n{q1} [/INST] {a1}</s> [INST] {q2} [/INST]"``
  (no system line; a space after each ``</s>``).

Both are tested against the checkpoints' chat templates rendered by Hugging Face
(``tests/test_template.py``). One deliberate difference: llava-hf's LLaVA-1.5/1.6-Vicuna template
closes an earlier answer with a space, LLaVA's ``conv_vicuna_v1`` (what the model was trained on)
with ``</s>``; we keep ``</s>``.

Instead of a string with ``<image>``/``</s>`` in it, :func:`conversation_segments` returns text pieces and
:class:`Marker` placeholders, so the caller tokenizes each text piece on its own (with
``special=False``: user text can never forge a control token), puts the image embeddings where
``Marker.IMAGE`` stands and the EOS id where ``Marker.EOS`` stands. Tokenizing each piece
separately gives every piece SentencePiece's dummy-prefix space, as LLaVA's own
``tokenizer_image_token`` does (it tokenizes the chunks around ``<image>`` separately).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from runtime.errors import InputError

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class Marker(enum.Enum):
    """Placeholders in a segment list; ``value`` is how they render as text."""

    IMAGE = "<image>"
    EOS = "</s>"


@dataclass(frozen=True)
class AnswerTokens:
    """An earlier answer as the token ids the model generated (``text`` for rendering): fed back
    as they were, so the KV cache of that answer is reused even where re-tokenising the text
    would give other ids."""

    text: str
    ids: tuple[int, ...]


Segment = str | Marker | AnswerTokens


@dataclass(frozen=True)
class ChatTemplate:
    """A two-role conversation format as the text around questions and answers.

    A conversation renders as ``system``, then per turn ``user_prefix``, (first turn with an image:
    ``<image>`` and ``image_suffix``), the question, ``user_suffix``; an answered turn adds
    ``answer_prefix``, the answer, ``</s>`` and ``answer_suffix``. The model answers after ``user_suffix``.
    """

    system: str  # before the first turn
    user_prefix: str
    image_suffix: str  # between the image and the first question
    user_suffix: str
    answer_prefix: str
    answer_suffix: str  # after the EOS that closes an answer

    def __post_init__(self) -> None:
        if not self.user_prefix.strip() or not self.user_suffix.strip():
            raise ValueError("user_prefix and user_suffix must hold the role text, not only whitespace")


LLAVA_1_5 = ChatTemplate(
    system=LLAVA_SYSTEM + " ", user_prefix="USER: ", image_suffix="\n", user_suffix=" ASSISTANT:",
    answer_prefix=" ", answer_suffix="",
)
MISTRAL_INSTRUCT = ChatTemplate(
    system="", user_prefix="[INST] ", image_suffix="\n", user_suffix=" [/INST]", answer_prefix=" ",
    answer_suffix=" ",
)
TEMPLATES = {"llava-1.5": LLAVA_1_5, "mistral-instruct": MISTRAL_INSTRUCT}


def get_template(name: str) -> ChatTemplate:
    """The template registered as ``name`` (``models/*.json`` ``chat_template``)."""
    if name not in TEMPLATES:
        raise InputError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class Turn:
    """One question and, once given, its answer."""

    question: str
    answer: str | None = None  # None: the turn the model answers next
    answer_ids: tuple[int, ...] | None = None  # the generated ids of ``answer`` (without EOS), if known


@dataclass(frozen=True)
class Conversation:
    """A chat history; the image (if any) belongs to the first question, as in LLaVA-1.5."""

    turns: tuple[Turn, ...] = ()
    has_image: bool = True

    def __post_init__(self) -> None:
        if any(turn.answer is None for turn in self.turns[:-1]):
            raise ValueError("only the last turn may be unanswered")

    def ask(self, question: str) -> Conversation:
        """A new conversation with ``question`` appended (the previous turn must be answered)."""
        return Conversation((*self.turns, Turn(question)), self.has_image)

    def answered(self, answer: str, ids: tuple[int, ...] | None = None) -> Conversation:
        """A new conversation whose last (pending) turn has ``answer`` (and its generated ``ids``)."""
        if not self.turns or self.turns[-1].answer is not None:
            raise ValueError("there is no pending question to answer")
        return Conversation((*self.turns[:-1], Turn(self.turns[-1].question, answer, ids)), self.has_image)


def conversation_segments(conversation: Conversation, template: ChatTemplate = LLAVA_1_5) -> tuple[Segment, ...]:
    """Text pieces and markers of a conversation; ends with ``template.user_suffix`` when the last
    turn is pending. Example (``llava-1.5``, one pending turn, image):
    ``("{system} USER: ", Marker.IMAGE, "\\nWhat is it? ASSISTANT:")``."""
    if not conversation.turns:
        raise ValueError("a conversation needs at least one question")
    pieces: list[Segment] = [template.system]
    for i, turn in enumerate(conversation.turns):
        pieces.append(template.user_prefix)
        if i == 0 and conversation.has_image:
            pieces += [Marker.IMAGE, template.image_suffix]
        pieces.append(f"{turn.question}{template.user_suffix}")
        if turn.answer is None:
            continue
        text = f"{template.answer_prefix}{turn.answer}"
        pieces += [AnswerTokens(text, turn.answer_ids) if turn.answer_ids is not None else text, Marker.EOS,
                   template.answer_suffix]
    return _merge_text(pieces)


def _merge_text(pieces: list[Segment]) -> tuple[Segment, ...]:
    """Join neighbouring strings; drop empty ones."""
    out: list[Segment] = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        elif not (isinstance(piece, str) and not piece):
            out.append(piece)
    return tuple(out)


def render(segments: tuple[Segment, ...]) -> str:
    """The segments as one string (markers as ``<image>``/``</s>``), e.g. for logs and tests."""
    return "".join(piece.value if isinstance(piece, Marker) else piece.text if isinstance(piece, AnswerTokens)
                   else piece for piece in segments)


@dataclass(frozen=True)
class SplitPrompt:
    """Segments cut at the (single) image: text/markers before and after it."""

    before: tuple[Segment, ...]
    after: tuple[Segment, ...]
    has_image: bool


def split_at_image(segments: tuple[Segment, ...]) -> SplitPrompt:
    """Cut at ``Marker.IMAGE`` (at most one); without an image everything is ``before``."""
    where = [i for i, piece in enumerate(segments) if piece is Marker.IMAGE]
    if len(where) > 1:
        raise InputError(f"LLaVA-1.5 takes one image per conversation, the prompt has {len(where)}")
    if not where:
        return SplitPrompt(segments, (), False)
    return SplitPrompt(segments[: where[0]], segments[where[0] + 1 :], True)


class Tokenizer(Protocol):
    """What :func:`encode_prompt` needs (``runtime.llm.backend.LlamaBackend`` is one)."""

    bos_token: int
    eos_token: int

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class PromptTokens:
    """Token ids around the image: the LLM sees ``prefix + image rows + suffix``."""

    prefix: tuple[int, ...]  # BOS and the tokens before the image (everything when no image)
    suffix: tuple[int, ...]  # the tokens after the image
    has_image: bool


def _encode(pieces: Sequence[Segment], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for previous, piece in zip((None, *pieces), pieces, strict=False):  # previous: None first
        if piece is Marker.EOS:
            ids.append(tokenizer.eos_token)
        elif isinstance(piece, AnswerTokens):
            ids += piece.ids
        elif isinstance(piece, str):
            if previous is Marker.EOS and piece.startswith(" "):
                piece = piece[1:]  # the dummy-prefix space is the one after "</s>" (mistral-instruct's "</s> [INST]")
            ids += tokenizer.tokenize(piece, add_bos=False, special=False)
        else:
            raise InputError(f"cannot tokenize {piece}; cut the prompt at the image first")
    return ids


def encode_prompt(segments: tuple[Segment, ...], tokenizer: Tokenizer) -> PromptTokens:
    """Tokenize each text piece on its own (``special=False``), ``Marker.EOS`` -> EOS id, BOS
    first; split at the image. Example: ("A ", IMAGE, "B", EOS) -> prefix [bos, *A], suffix [*B, eos].

    A piece after ``Marker.EOS`` that starts with a space gives that space to SentencePiece's dummy
    prefix: ``"</s> [INST]"`` -> ``</s> ▁[INST]``, as Hugging Face's tokenizer encodes the rendered
    string (and as LLaVA's ``"</s>[INST]"`` was tokenized in training), not ``</s> ▁▁[INST]``."""
    split = split_at_image(segments)
    bos = [tokenizer.bos_token] if tokenizer.bos_token >= 0 else []
    return PromptTokens(
        tuple(bos + _encode(split.before, tokenizer)), tuple(_encode(split.after, tokenizer)), split.has_image
    )
