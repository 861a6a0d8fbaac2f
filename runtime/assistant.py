"""The model side of a chat: image → pruned embeddings → llama.cpp, with per-stage timings.

``Assistant.respond(question)`` streams the answer. The image is encoded once per image (the last
few encodings are kept by pixel digest); it is pruned once per (strategy, budget, options, and the
question for the question-reading strategies: the first one asked about the image, or each
one with ``Settings.reprune``) and the result cached. Each turn evaluates only what the
KV cache does not already hold (:meth:`runtime.llm.context.LlamaContext.prefill`); earlier answers
are fed back as the token ids the model generated.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime.anyres.pipeline import AnyresPipeline, PrunedAnyres
from runtime.bundle.manifest import load_manifest
from runtime.errors import BundleError, InputError
from runtime.llm.backend import LlamaBackend
from runtime.llm.bundle import open_language_model
from runtime.llm.probe import LlamaProbe, open_probe
from runtime.llm.prompt_cache import PromptPiece
from runtime.llm.template import (
    ChatTemplate,
    Conversation,
    PromptTokens,
    Turn,
    conversation_segments,
    encode_prompt,
    get_template,
)
from runtime.pipeline import Pipeline, PrunedImage
from runtime.preprocess import load_image
from runtime.strategies.capabilities import refusal
from runtime.strategies.registry import get_strategy
from runtime.turn import Settings, TurnStats
from runtime.types import EncoderOutput

STOP = ("</s>",)
Pruned = PrunedImage | PrunedAnyres  # one image's rows: LLaVA-1.5's single view or LLaVA-NeXT's tiles
ENCODED_IMAGES = 4  # encoder outputs kept by pixel digest (~3.5 MB each for CLIP-L)


def _answer_ids(generation: Any) -> tuple[int, ...] | None:
    """The ids to feed back for this answer: what was generated, without the closing EOS. None
    when a stop string ended it (its text was cut inside the generated tokens)."""
    if generation is None or generation.finish_reason is None or generation.stop_string:
        return None
    ids = list(generation.token_ids)
    if ids and generation.finish_reason == "stop":
        ids = ids[:-1]  # the EOS the template writes itself
    return tuple(ids)


class Assistant:
    """A LLaVA conversation about one image, answered by the bundle's language model."""

    def __init__(self, pipeline: Pipeline, llm: LlamaBackend, template: ChatTemplate,
                 settings: Settings = Settings(), probe_opener: Callable[[], LlamaProbe] | None = None,
                 tiles: AnyresPipeline | None = None) -> None:
        self.pipeline, self.llm, self.template = pipeline, llm, template
        self.tiles = tiles  # LLaVA-NeXT bundles: images become tiles (``pipeline`` is its base)
        self.settings = settings
        self._probe_opener, self._probe = probe_opener, None
        self.conversation = Conversation(has_image=False)
        self._image: tuple[EncoderOutput, dict[str, float]] | None = None
        self.image_digest: str | None = None  # sha256 of the current image's pixel values
        self.notice: str | None = None  # something the user should know about the last answer
        self._options: dict[str, Mapping[str, Any]] = {}  # strategy -> its options, while another is used
        self._encoded: OrderedDict[str, EncoderOutput] = OrderedDict()  # pixel digest -> encoder output (LRU)
        self._pruned: tuple[tuple, Pruned] | None = None
        self._repruned_ms: float | None = None  # set when this turn pruned the image again for its question
        self.last_stats: TurnStats | None = None

    @classmethod
    def open(cls, bundle: str | Path, settings: Settings = Settings(), threads: int | None = None,
             provider: str | None = None, n_ctx: int | None = None, int8: bool = False,
             kv_type: str = "f16", load: str = "read", n_gpu_layers: int = 0) -> Assistant:
        """Vision sessions and the GGUF of a bundle; the probe opens on first use.

        ``n_ctx`` (default 2048), ``kv_type`` and ``load`` size the language model's memory
        (see :class:`runtime.llm.backend.LlamaBackend`)."""
        manifest = load_manifest(bundle)
        reason = refusal(get_strategy(settings.strategy), manifest)
        if reason:  # one line before any session or the language model loads
            raise BundleError(reason)
        tiles = AnyresPipeline(manifest, provider, threads, int8) if manifest.anyres is not None else None
        pipeline = tiles.base if tiles is not None else Pipeline(manifest, provider, threads, int8)
        data, root = manifest.data, manifest.root
        llm = open_language_model(root, data, n_threads=threads, n_ctx=n_ctx, kv_type=kv_type, load=load,
                                  n_gpu_layers=n_gpu_layers)
        probe_ctx = tiles.probe_context() if tiles is not None else None  # NeXT: the probe sees every packed row
        opener = ((lambda: open_probe(root, data, n_threads=threads, n_ctx=probe_ctx))
                  if "probe" in (data.get("llm") or {}) else None)
        assistant = cls(pipeline, llm, get_template(pipeline.manifest.chat_template), settings, opener, tiles)
        assistant.update(tokens=settings.tokens, strategy=settings.strategy)  # validate early
        return assistant

    # --- state ---------------------------------------------------------------------------
    def set_image(self, image: Image.Image | str | Path | None) -> None:
        """Encode a new image (a new conversation: LLaVA-1.5 takes one image per chat); ``None``
        starts a text-only conversation."""
        self._pruned = None
        if image is None:
            self._image, self.image_digest = None, None
            self.conversation = Conversation(has_image=False)
            return
        start = time.perf_counter()
        loaded = image if isinstance(image, Image.Image) else load_image(image)
        pixels = self.tiles.pixels(loaded) if self.tiles else self.pipeline.pixel_values(loaded)
        values = pixels.pixel_values if self.tiles else pixels
        digest = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
        middle = time.perf_counter()
        encoded = self._encoded.pop(digest, None)
        if encoded is None:  # not among the last ENCODED_IMAGES images
            encoded = self.tiles.encode(pixels) if self.tiles else self.pipeline.encoder.encode(pixels)
        self._encoded[digest] = encoded
        while len(self._encoded) > ENCODED_IMAGES:
            self._encoded.popitem(last=False)
        end = time.perf_counter()
        self._image = (encoded, {"preprocess": 1000 * (middle - start), "encode": 1000 * (end - middle)})
        self.image_digest = digest
        self.conversation = Conversation(has_image=True)

    def restore(self, turns: Sequence[tuple[str, str]]) -> None:
        """Make the conversation these answered ``(question, answer)`` turns (the image is kept):
        how a stateless client (the HTTP server) replays its history.

        Where the replay starts with the turns this assistant answered itself (same questions, same
        answers up to surrounding whitespace), their answers keep the token ids that were generated,
        as in the chat: the KV cache holds exactly those, and re-tokenising the text can give other
        ids (always for a random-weight model, sometimes for a real one), which would evaluate the
        whole answer again. From the first turn that differs on, the text is tokenised.
        """
        known, same = self.conversation.turns, 0
        while same < min(len(known), len(turns)) and (known[same].question, known[same].answer) == \
                (turns[same][0], turns[same][1].strip()):
            same += 1
        replayed = tuple(Turn(question, answer) for question, answer in turns[same:])
        self.conversation = Conversation(known[:same] + replayed, has_image=self._image is not None)

    @property
    def finish_reason(self) -> str | None:
        """Why the last answer ended: ``stop`` (EOS or a stop string), ``length`` or ``context``."""
        return self.llm.finish_reason

    def update(self, **changes: Any) -> None:
        """Change settings (``tokens``, ``strategy``, ...); checked now, used from the next turn.

        Strategy options are kept per strategy: switching to another strategy without giving
        ``options`` uses that strategy's own (its defaults the first time), and switching back
        restores the ones it had (``--rule max-max`` then ``/strategy fastervlm`` works).
        """
        if "strategy" in changes and "options" not in changes and changes["strategy"] != self.settings.strategy:
            self._options[self.settings.strategy] = self.settings.options
            changes = {**changes, "options": self._options.get(changes["strategy"], {})}
        settings = replace(self.settings, **changes)
        self.pipeline.check_strategy(get_strategy(settings.strategy))  # what the bundle cannot run: one line
        if not get_strategy(settings.strategy).keeps_all and self.tiles is None:  # tiles: checked per image
            self.pipeline.check_budget(settings.tokens)
        self.pipeline.options_for(settings.strategy, settings.options)
        self.settings = settings

    def reset(self) -> None:
        """Forget the conversation, keep the image."""
        self.conversation = Conversation(has_image=self._image is not None)

    # --- answering -------------------------------------------------------------------------
    def respond(self, question: str) -> Iterator[str]:
        """Stream the answer to ``question``; the history (and partial answers) is kept.

        The KV cache is reused up to the first position where the new prompt differs from what
        it holds (the previous turns, the same image rows); when the conversation no longer fits
        the context, the oldest turns are dropped (the image stays) and :attr:`notice` says so.
        """
        if not question.strip():
            raise InputError("empty question")
        start = time.perf_counter()
        self.notice = None
        conversation = self.conversation.ask(question)
        pruned, vision_ms = self._prune(conversation)
        conversation, prompt = self._fit(conversation, pruned)
        prefill_start = time.perf_counter()
        done = self.llm.prefill(self._pieces(prompt, pruned))
        prefill_ms = 1000 * (time.perf_counter() - prefill_start)
        if self._repruned_ms is not None:
            self._add_notice(f"re-pruned the image for this question: {self._repruned_ms:.0f} ms of pruning, then "
                             f"{done.evaluated} positions prefilled again in {prefill_ms:.0f} ms")
            self._repruned_ms = None
        pieces, first, decode_start = [], None, time.perf_counter()
        s = self.settings
        try:
            for piece in self.llm.generate(s.max_tokens, STOP + s.stop, s.temperature, s.top_p, s.seed):
                first = first if first is not None else time.perf_counter()
                pieces.append(piece)
                yield piece
        finally:  # also on Ctrl-C or a closed generator: keep what was said
            self.conversation = conversation.answered("".join(pieces).strip(), _answer_ids(self.llm.last_generation))
            if self.llm.finish_reason == "context":
                self._add_notice(f"the answer stopped at the context limit ({self.llm.n_ctx} positions); "
                                 "/reset or a larger --n-ctx makes room")
            end = time.perf_counter()
            self.last_stats = TurnStats(
                vision_ms, prefill_ms, done.evaluated, 1000 * ((first or end) - start), 1000 * (end - decode_start),
                len(pieces), pruned.tokens if pruned else 0, pruned.num_patches if pruned else 0, done.reused,
            )

    def _add_notice(self, text: str) -> None:
        self.notice = f"{self.notice}; {text}" if self.notice else text

    def _pieces(self, prompt: PromptTokens, pruned: Pruned | None) -> list[PromptPiece]:
        """Token ids and image rows in order; the rows are keyed by image digest and prune settings,
        and sit at ``Settings.positions`` (their positions are part of what the KV cache matches)."""
        if not prompt.has_image or pruned is None:
            return [prompt.prefix]
        key = (self.image_digest, self._pruned[0] if self._pruned else None)
        return [prompt.prefix, pruned.image_rows(key, self.settings.positions), prompt.suffix]

    def _fit(self, conversation: Conversation, pruned: Pruned | None) -> tuple[Conversation, PromptTokens]:
        """Drop the oldest turns until the prompt leaves room for an answer (``max_tokens``, at
        most a quarter of the context). The system line and the image stay: the image moves to
        the first question that is kept, where LLaVA-1.5's template puts it."""
        rows = pruned.embeddings.shape[0] if pruned is not None and conversation.has_image else 0
        room = min(self.settings.max_tokens, self.llm.n_ctx // 4)
        dropped = 0
        while True:
            prompt = encode_prompt(conversation_segments(conversation, self.template), self.llm)
            fits = len(prompt.prefix) + len(prompt.suffix) + rows + room <= self.llm.n_ctx
            if fits or len(conversation.turns) == 1:
                break
            conversation = Conversation(conversation.turns[1:], conversation.has_image)
            dropped += 1
        if dropped:
            self._add_notice(f"dropped the {dropped} oldest turn(s) to fit the {self.llm.n_ctx}-position context")
        return conversation, prompt

    def _prune(self, conversation: Conversation) -> tuple[Pruned | None, dict[str, float]]:
        """The pruned image for the current settings (cached), with the vision timings it cost."""
        if self._image is None:
            return None, {}
        s = self.settings
        strategy = get_strategy(s.strategy)
        # the question the image is pruned for: the first one asked about it, or with reprune the current one
        question = conversation.turns[-1 if s.reprune else 0].question
        reads_question = strategy.needs_probe or strategy.needs_question
        key = (s.tokens, s.strategy, tuple(sorted(s.options.items())), s.tile_budget, s.newline,
               question if reads_question else "")
        if self._pruned is not None and self._pruned[0] == key:
            return self._pruned[1], {}
        encoded, vision_ms = self._image
        probe = None
        if strategy.needs_probe:  # the probe sees a one-turn prompt with that question
            alone = Conversation((Turn(question),), has_image=True)
            probe = self._bound_probe(encode_prompt(conversation_segments(alone, self.template), self.llm))
        if self.tiles is not None:
            pruned = self.tiles.prune_encoded(encoded, s.tokens, s.strategy, s.tile_budget, s.newline, question,
                                              probe, **s.options)
        else:
            pruned = self.pipeline.prune_encoded(encoded, s.tokens, s.strategy, probe, question, **s.options)
        # a NeXT result carries its image's preprocess and encode times: paid once, counted in vision_ms
        timings = {k: v for k, v in pruned.timings_ms.items() if k not in ("preprocess", "encode")}
        if self._pruned is not None and reads_question and self._pruned[0][:-1] == key[:-1]:
            self._repruned_ms = sum(v for k, v in timings.items() if k != "project")
        self._pruned = (key, pruned)
        self._image = (encoded, {})  # encoding is paid once per image
        return pruned, {**vision_ms, **timings}

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
