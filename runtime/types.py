"""Frozen dataclasses exchanged between the runtime's stages (shapes in field comments)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EncoderOutput:
    """What the ONNX vision encoder returns for one image."""

    features: np.ndarray  # [N, D] float32: patch tokens of hidden_states[f] ([CLS] dropped)
    cls_attn: np.ndarray  # [f, H, N] float32: [CLS]->patch softmax rows of blocks 1..f
    keys: np.ndarray  # [N, D/H] float32: head-mean k_proj output of block f, patches only

    def __post_init__(self) -> None:
        n, _ = self.features.shape
        if self.cls_attn.ndim != 3 or self.cls_attn.shape[2] != n:
            raise ValueError(f"cls_attn must be [f, H, {n}], got {self.cls_attn.shape}")
        if self.keys.ndim != 2 or self.keys.shape[0] != n:
            raise ValueError(f"keys must be [{n}, D/H], got {self.keys.shape}")

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_layers(self) -> int:
        """f: the number of encoder blocks computed (the feature layer)."""
        return int(self.cls_attn.shape[0])


@dataclass(frozen=True)
class EncoderTiles(Sequence[EncoderOutput]):
    """The encoder's outputs for T tiles of one image, tile axis first (T = 1 for LLaVA-1.5's single
    view; LLaVA-NeXT: the base view, then the grid tiles row-major). Indexing gives one tile's
    :class:`EncoderOutput` (views, no copy): the strategies work on one tile at a time."""

    features: np.ndarray  # [T, N, D] float32
    cls_attn: np.ndarray  # [T, f, H, N] float32
    keys: np.ndarray  # [T, N, D/H] float32

    def __post_init__(self) -> None:
        t, n, _ = self.features.shape
        if self.cls_attn.ndim != 4 or self.cls_attn.shape[0] != t or self.cls_attn.shape[3] != n:
            raise ValueError(f"cls_attn must be [{t}, f, H, {n}], got {self.cls_attn.shape}")
        if self.keys.ndim != 3 or self.keys.shape[:2] != (t, n):
            raise ValueError(f"keys must be [{t}, {n}, D/H], got {self.keys.shape}")

    @property
    def num_tiles(self) -> int:
        return int(self.features.shape[0])

    def __len__(self) -> int:
        return self.num_tiles

    def __getitem__(self, t):  # type: ignore[override]
        if isinstance(t, slice):
            return tuple(self[i] for i in range(*t.indices(self.num_tiles)))
        if not -self.num_tiles <= t < self.num_tiles:
            raise IndexError(f"tile {t} of {self.num_tiles}")
        return EncoderOutput(self.features[t], self.cls_attn[t], self.keys[t])

    @classmethod
    def single(cls, encoded: EncoderOutput) -> EncoderTiles:
        """One view as T = 1."""
        return cls(encoded.features[None], encoded.cls_attn[None], encoded.keys[None])


@dataclass(frozen=True)
class ProbeOutput:
    """What the language-model probe (the first P-1 decoder layers in llama.cpp) returns.

    ``hidden`` is the input of decoder layer P-1's attention, i.e. RMSNorm_{P-1}(h_{P-1}), for
    every position of the probed sequence (prompt prefix, N image rows, prompt suffix).
    Queries/keys of layer P-1 are ``hidden @ q_weight.T`` / ``hidden @ k_weight.T`` (pre-RoPE,
    Hugging Face row layout: head-major, ``[n_head * d_head, d_model]``).
    """

    hidden: np.ndarray  # [T, d_model] float32
    image_start: int  # position of the first image row in the probed sequence
    num_image: int  # image rows probed: all N patches (LLaVA-NeXT: every packed row, newlines included)
    q_weight: np.ndarray  # [n_head * d_head, d_model] float32: W_q of layer P-1 (HF layout)
    k_weight: np.ndarray  # [n_head_kv * d_head, d_model] float32: W_k of layer P-1 (HF layout)
    n_head: int
    n_head_kv: int
    rope_theta: float  # RoPE base (HF rotate-half convention, positions 0..T-1)
    layer: int | None = None  # P-1: the 0-based decoder layer whose W_q/W_k are given, if known
    final_hidden: np.ndarray | None = None  # [T, d_model] float32: norm(h_P), final norm; when asked (DART)
    # [n] int64: positions of the rows a strategy chooses among, in its patch order, all inside the image
    # block (LLaVA-NeXT: one tile's candidates in the probe of every packed row, runtime.anyres.probe);
    # None: the whole block image_start..+num_image
    candidates: np.ndarray | None = None

    def __post_init__(self) -> None:
        t, d = self.hidden.shape
        if self.final_hidden is not None and self.final_hidden.shape != (t, d):
            raise ValueError(f"final_hidden must be [{t}, {d}] like hidden, got {self.final_hidden.shape}")
        if not 0 <= self.image_start <= self.image_start + self.num_image <= t:
            raise ValueError(f"image rows [{self.image_start}, +{self.num_image}) outside [0, {t})")
        c = self.candidates
        if c is not None and (c.ndim != 1 or c.dtype.kind not in "iu" or np.unique(c).size != c.size or (
                c.size and (c.min() < self.image_start or c.max() >= self.image_start + self.num_image))):
            raise ValueError(f"candidates must be distinct integer positions in [{self.image_start}, "
                             f"{self.image_start + self.num_image}), got {c.dtype} {c.shape}")
        if self.q_weight.shape[1] != d or self.q_weight.shape[0] % self.n_head:
            raise ValueError(f"q_weight must be [n_head*d_head, {d}], got {self.q_weight.shape}")

    @property
    def image_rows(self) -> np.ndarray:
        """``[n]`` int64 positions of the rows a strategy chooses among: ``candidates``, else the image block."""
        if self.candidates is not None:
            return self.candidates.astype(np.int64)
        return np.arange(self.image_start, self.image_start + self.num_image, dtype=np.int64)


@dataclass(frozen=True)
class PruneInputs:
    """Everything a strategy may look at; expensive extras are callables run on demand.

    ``probe(rows, final=False)`` probes the prompt with the image rows; ``final=True`` also runs
    the final-norm probe (``ProbeOutput.final_hidden``). ``clip_text``/``clip_image`` are the CLIP
    text tower and the vision features' projection into CLIP space (cdpruner).
    """

    encoded: EncoderOutput
    project: Callable[[np.ndarray], np.ndarray]  # [M, D] -> [M, E]: the multimodal projector
    probe: Callable[..., ProbeOutput] | None = None  # [N, E] image embeddings -> probe
    question: str | None = None  # the user's question, for the question-aware strategies
    clip_text: Callable[[str], np.ndarray] | None = None  # question -> [M, P] CLIP text embeddings
    clip_image: Callable[[np.ndarray], np.ndarray] | None = None  # features [N, D] -> [N, P] in CLIP space


@dataclass(frozen=True)
class Selection:
    """A strategy's answer: the K tokens to project, in the order they are fed to the LLM."""

    kept: np.ndarray  # [K] int64: patch index of each output token
    tokens: np.ndarray  # [K, D] float32: (merged) features to run through the projector
    counts: np.ndarray  # [K] int64: patches each token stands for (1 when nothing merged)
    report: Mapping[str, Any] = field(default_factory=dict)  # JSON-serialisable extras
    # [N] int64: position in ``kept`` of the token each patch went into (its own for a kept patch),
    # -1 for a dropped patch; None: only the kept patches have tokens (every count is 1)
    assignment: np.ndarray | None = None

    def __post_init__(self) -> None:
        k = self.kept.shape[0]
        if self.kept.ndim != 1 or self.tokens.ndim != 2 or self.tokens.shape[0] != k:
            raise ValueError(
                f"Selection needs kept [K] and tokens [K, D]; got {self.kept.shape}, {self.tokens.shape}"
            )
        if self.counts.shape != (k,):
            raise ValueError(f"counts must be [{k}], got {self.counts.shape}")
        if self.assignment is None and not (self.counts == 1).all():
            raise ValueError("a Selection that merges patches must give their assignment")
        if self.assignment is not None:
            a = self.assignment
            if a.ndim != 1 or not np.array_equal(a[self.kept], np.arange(k)):
                raise ValueError("assignment must be [N] and map every kept patch to its own position")
            if not np.array_equal(np.bincount(a[a >= 0], minlength=k), self.counts):
                raise ValueError("assignment disagrees with counts (patches per token)")

    def assignment_for(self, num_patches: int) -> np.ndarray:
        """``assignment`` ``[N]`` int64, built from ``kept`` when the strategy gave none."""
        if self.assignment is not None:
            return self.assignment
        out = np.full(num_patches, -1, np.int64)
        out[self.kept] = np.arange(self.kept.shape[0])
        return out
