"""What a chat turn takes and reports: the user's :class:`Settings` (CLI flags, REPL commands, a
server request) and the :class:`TurnStats` of the last answer (per-stage timings, token counts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.anyres.pipeline import NEWLINE_MODES
from runtime.anyres.tile_budget import MODES
from runtime.errors import InputError, SettingError
from runtime.llm.prompt_cache import check_positions


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
    stop: tuple[str, ...] = ()  # extra stop strings (never emitted), besides "</s>"
    reprune: bool = False  # question-dependent strategies: prune again for every question (else the first)
    tile_budget: str = "equal"  # LLaVA-NeXT: how K is split across tiles (runtime.anyres.tile_budget.MODES)
    newline: str = "rows"  # LLaVA-NeXT: image_newline rows after packed rows that kept a token, or "none"
    positions: str = "packed"  # kept rows at consecutive positions, or "original" ones (method.md §6)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SettingError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"the seed must be in 0..2**63-1, got {self.seed}")
        if self.tile_budget not in MODES:
            raise SettingError("tile_budget", f"must be one of {', '.join(MODES)}, got {self.tile_budget!r}")
        if self.newline not in NEWLINE_MODES:
            raise SettingError("newline", f"must be one of {', '.join(NEWLINE_MODES)}, got {self.newline!r}")
        check_positions(self.positions)


@dataclass(frozen=True)
class TurnStats:
    """Timings of the last answer (milliseconds) and token counts."""

    vision_ms: Mapping[str, float]  # preprocess, encode, prune, project_all, probe, project
    prefill_ms: float
    prefill_positions: int  # text tokens + image rows evaluated (not reused) before the first answer token
    first_token_ms: float  # from the question to the first streamed piece
    decode_ms: float
    decode_tokens: int
    kept: int
    total: int
    reused_positions: int = 0  # prompt positions whose KV cache was kept from the previous turn

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
            f"prefill: {self.prefill_positions} positions in {self.prefill_ms:.1f} ms ({prefill_rate:.1f} tok/s), "
            f"{self.reused_positions} reused from the KV cache",
            first,
            f"decode: {self.decode_tokens} tokens in {self.decode_ms:.1f} ms ({decode_rate:.1f} tok/s)",
        ]
