"""The model side of a chat: image → pruned embeddings → llama.cpp, with per-stage timings.

``Assistant.respond(question)`` streams the answer. The image is encoded once per image; it is
pruned once per (strategy, budget, prompt) and the result cached. Every turn re-evaluates the
whole conversation (system line, image rows, history) from position 0: with 64–192 image rows
this prefill is short next to decoding, and it keeps the KV cache exactly equal to the template
(the text of earlier answers is re-tokenized as the template renders it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.errors import InputError
from runtime.llm import LlamaBackend
from runtime.llm_bundle import open_language_model
from runtime.pipeline import Pipeline, PrunedImage
from runtime.preprocess import load_image
from runtime.probe import LlamaProbe, open_probe
from runtime.strategies.registry import get_strategy
from runtime.template import (
    ChatTemplate,
    Conversation,
    PromptTokens,
    conversation_segments,
    encode_prompt,
    get_template,
)
from runtime.types import EncoderOutput

STOP = ("</s>",)


@dataclass(frozen=True)
class Settings:
    """What the user can change between turns (CLI flags and REPL commands)."""

    tokens: int = 64  # K, visual tokens kept
    strategy: str = "entropy"
    options: Mapping[str, Any] = field(default_factory=dict)  # strategy options (rule, p_shallow, ...)
    max_tokens: int = 512
    temperature: float = 0.2  # LLaVA's CLI default; 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"the seed must be in 0..2**63-1, got {self.seed}")


@dataclass(frozen=True)
class TurnStats:
    """Timings of the last answer (milliseconds) and token counts."""

    vision_ms: Mapping[str, float]  # preprocess, encode, prune, project_all, probe, project
    prefill_ms: float
    prefill_positions: int  # text tokens + image rows evaluated before the first answer token
    first_token_ms: float  # from the question to the first streamed piece
    decode_ms: float
    decode_tokens: int
    kept: int
    total: int

    @property
    def image_ms(self) -> float:
        """Preprocess + encode paid in this turn (0 when the image was encoded earlier)."""
        return sum(self.vision_ms.get(stage, 0.0) for stage in ("preprocess", "encode"))

    def lines(self) -> list[str]:
        vision = ", ".join(f"{k} {v:.1f} ms" for k, v in self.vision_ms.items())
        prefill_rate = self.prefill_positions / max(self.prefill_ms / 1000, 1e-9)
        decode_rate = self.decode_tokens / max(self.decode_ms / 1000, 1e-9)
        first = f"time to first token: {self.first_token_ms:.1f} ms since the question"
        if self.image_ms:  # README: image in -> first token out
            first += f", {self.first_token_ms + self.image_ms:.1f} ms since the image"
        return [
            f"vision: {vision or 'cached'}",
            f"image tokens kept: {self.kept}/{self.total}",
            f"prefill: {self.prefill_positions} positions in {self.prefill_ms:.1f} ms ({prefill_rate:.1f} tok/s)",
            first,
            f"decode: {self.decode_tokens} tokens in {self.decode_ms:.1f} ms ({decode_rate:.1f} tok/s)",
        ]


class Assistant:
    """A LLaVA conversation about one image, answered by the bundle's language model."""

    def __init__(self, pipeline: Pipeline, llm: LlamaBackend, template: ChatTemplate,
                 settings: Settings = Settings(), probe_opener: Callable[[], LlamaProbe] | None = None) -> None:
        self.pipeline, self.llm, self.template = pipeline, llm, template
        self.settings = settings
        self._probe_opener, self._probe = probe_opener, None
        self.conversation = Conversation(has_image=False)
        self._image: tuple[EncoderOutput, dict[str, float]] | None = None
        self._pruned: tuple[tuple, PrunedImage] | None = None
        self.last_stats: TurnStats | None = None

    @classmethod
    def open(cls, bundle: str | Path, settings: Settings = Settings(), threads: int | None = None,
             provider: str | None = None, n_ctx: int | None = None, int8: bool = False,
             kv_type: str = "f16", load: str = "read") -> Assistant:
        """Vision sessions and the GGUF of a bundle; the probe opens on first use.

        ``n_ctx`` (default 2048), ``kv_type`` and ``load`` size the language model's memory
        (see :class:`runtime.llm.LlamaBackend`)."""
        pipeline = Pipeline(bundle, provider, threads, int8)
        data, root = pipeline.manifest.data, pipeline.manifest.root
        llm = open_language_model(root, data, n_threads=threads, n_ctx=n_ctx, kv_type=kv_type, load=load)
        opener = (lambda: open_probe(root, data, n_threads=threads)) if "probe" in (data.get("llm") or {}) else None
        assistant = cls(pipeline, llm, get_template(pipeline.manifest.chat_template), settings, opener)
        assistant.update(tokens=settings.tokens, strategy=settings.strategy)  # validate early
        return assistant

    # --- state ---------------------------------------------------------------------------
    def set_image(self, image: Image.Image | str | Path) -> None:
        """Encode a new image (a new conversation: LLaVA-1.5 takes one image per chat)."""
        start = time.perf_counter()
        loaded = image if isinstance(image, Image.Image) else load_image(image)
        pixels = self.pipeline.pixel_values(loaded)
        middle = time.perf_counter()
        encoded = self.pipeline.encoder.encode(pixels)
        end = time.perf_counter()
        self._image = (encoded, {"preprocess": 1000 * (middle - start), "encode": 1000 * (end - middle)})
        self._pruned = None
        self.conversation = Conversation(has_image=True)

    def update(self, **changes: Any) -> None:
        """Change settings (``tokens``, ``strategy``, ...); checked now, used from the next turn."""
        settings = replace(self.settings, **changes)
        get_strategy(settings.strategy)
        if settings.strategy != "none":
            self.pipeline.check_budget(settings.tokens)
        self.pipeline.options_for(settings.strategy, settings.options)
        self.settings = settings

    def reset(self) -> None:
        """Forget the conversation, keep the image."""
        self.conversation = Conversation(has_image=self._image is not None)

    # --- answering -------------------------------------------------------------------------
    def respond(self, question: str) -> Iterator[str]:
        """Stream the answer to ``question``; the history (and partial answers) is kept."""
        if not question.strip():
            raise InputError("empty question")
        start = time.perf_counter()
        conversation = self.conversation.ask(question)
        prompt = encode_prompt(conversation_segments(conversation, self.template), self.llm)
        pruned, vision_ms = self._prune(conversation)
        prefill_start = time.perf_counter()
        self.llm.reset()
        self.llm.eval_tokens(prompt.prefix)
        if prompt.has_image:
            self.llm.eval_embeddings(pruned.embeddings)
        self.llm.eval_tokens(prompt.suffix)
        prefill_ms = 1000 * (time.perf_counter() - prefill_start)
        pieces, first, decode_start = [], None, time.perf_counter()
        s = self.settings
        try:
            for piece in self.llm.generate(s.max_tokens, STOP, s.temperature, s.top_p, s.seed):
                first = first if first is not None else time.perf_counter()
                pieces.append(piece)
                yield piece
        finally:  # also on Ctrl-C or a closed generator: keep what was said
            self.conversation = conversation.answered("".join(pieces).strip())
            end = time.perf_counter()
            self.last_stats = TurnStats(
                vision_ms, prefill_ms, len(prompt.prefix) + len(prompt.suffix) + (pruned.tokens if pruned else 0),
                1000 * ((first or end) - start), 1000 * (end - decode_start), len(pieces),
                pruned.tokens if pruned else 0, pruned.num_patches if pruned else 0,
            )

    def _prune(self, conversation: Conversation) -> tuple[PrunedImage | None, dict[str, float]]:
        """The pruned image for the current settings (cached), with the vision timings it cost."""
        if self._image is None:
            return None, {}
        s = self.settings
        first = Conversation((conversation.turns[0],), has_image=True)  # the probe sees the first question
        key = (s.tokens, s.strategy, tuple(sorted(s.options.items())), first.turns[0].question)
        if self._pruned is not None and self._pruned[0] == key:
            return self._pruned[1], {}
        encoded, vision_ms = self._image
        probe = None
        if get_strategy(s.strategy).needs_probe:
            probe_tokens = encode_prompt(conversation_segments(first, self.template), self.llm)
            probe = self._bound_probe(probe_tokens)
        pruned = self.pipeline.prune_encoded(encoded, s.tokens, s.strategy, probe, **s.options)
        self._pruned = (key, pruned)
        self._image = (encoded, {})  # encoding is paid once per image
        return pruned, {**vision_ms, **pruned.timings_ms}

    def _bound_probe(self, tokens: PromptTokens):
        if self._probe_opener is None:
            raise InputError(f"strategy {self.settings.strategy!r} needs the probe; re-run export.llm for this bundle")
        if self._probe is None:
            self._probe = self._probe_opener()
        return self._probe.bind(tokens.prefix, tokens.suffix)

    def stats_lines(self) -> list[str]:
        """The last answer's timings, for ``--timings`` and ``/stats``."""
        return self.last_stats.lines() if self.last_stats else ["no answer yet"]

    def close(self) -> None:
        self.llm.close()
        if self._probe is not None:
            self._probe.close()
