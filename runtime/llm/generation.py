"""Token-by-token generation on a :class:`runtime.llm.context.LlamaContext`.

:class:`Generation` is both the stream (iterate it for text pieces) and its result: the pieces,
the token ids fed back and the finish reason are on the object, not on the context.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence

import numpy as np

from runtime.llm.context import LlamaContext
from runtime.llm.sampling import StopScanner, sample_token


class Generation:
    """Stream text pieces after the evaluated prompt; ends at EOS, a stop string (not emitted),
    ``max_tokens`` or a full context. ``finish_reason`` is then ``stop``, ``length`` or ``context``."""

    def __init__(self, context: LlamaContext, max_tokens: int, stop: Sequence[str], temperature: float,
                 top_p: float, rng: np.random.Generator) -> None:
        self.context, self.max_tokens, self.stop = context, max_tokens, tuple(stop)
        self.temperature, self.top_p, self.rng = temperature, top_p, rng
        self.pieces: list[str] = []
        self.token_ids: list[int] = []  # sampled tokens, in order (the last one may not be evaluated)
        self.finish_reason: str | None = None  # None while running
        self.stop_string = False  # True when a stop string (not EOS) ended it
        self._stream = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._stream)

    def close(self) -> None:
        """Stop early (e.g. the reader went away); what was generated stays on the object."""
        self._stream.close()
        if self.finish_reason is None:
            self.finish_reason = "length"

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _emit(self, text: str) -> Iterator[str]:
        if text:
            self.pieces.append(text)
            yield text

    def _run(self) -> Iterator[str]:
        model = self.context.model
        scanner, decoder = StopScanner(self.stop), codecs.getincrementaldecoder("utf-8")("replace")
        self.finish_reason = None
        for step in range(self.max_tokens):
            token = sample_token(self.context.logits(), self.temperature, self.top_p, self.rng)
            self.token_ids.append(token)
            if model.is_end(token):
                self.finish_reason = "stop"
                break
            scan = scanner.feed(decoder.decode(model.token_to_piece(token)))
            yield from self._emit(scan.text)
            if scan.stopped:
                self.finish_reason, self.stop_string = "stop", True
                return
            if step + 1 == self.max_tokens:
                break
            if self.context.n_past + 1 > self.context.n_ctx:
                self.finish_reason = "context"
                break
            self.context.eval_tokens([token])
        self.finish_reason = self.finish_reason or "length"
        yield from self._emit(scanner.feed(decoder.decode(b"", final=True)).text + scanner.flush())
