"""Synthetic encoder outputs, a linear projector, a fake LLM probe for strategy tests, and
:class:`ModuleWith`/:class:`NumpyWith` for injecting a plausible bug into a product module's
numpy or math calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.types import EncoderOutput, ProbeOutput, PruneInputs

THETA = 10000.0


def make_encoded(n: int = 36, d: int = 12, f: int = 3, heads: int = 2, key_dim: int = 6,
                 seed: int = 0) -> EncoderOutput:
    """A random EncoderOutput: features [n, d], softmax-like cls_attn [f, heads, n], keys."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((f, heads, n))
    attn = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return EncoderOutput(features=rng.standard_normal((n, d)).astype(np.float32),
                         cls_attn=attn.astype(np.float32),
                         keys=rng.standard_normal((n, key_dim)).astype(np.float32))


def linear_projector(d: int, e: int, seed: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A row-wise linear 'projector' [M, d] -> [M, e] (float32)."""
    w = np.random.default_rng(seed).standard_normal((d, e)).astype(np.float32)
    return lambda x: (np.asarray(x, np.float32) @ w).astype(np.float32)


@dataclass(frozen=True)
class FakeProbe:
    """Callable probe: the image embeddings become the image rows of the probed sequence."""

    prefix: np.ndarray  # [P0, E]
    suffix: np.ndarray  # [S, E]
    q_weight: np.ndarray  # [n_head * d_head, E]
    k_weight: np.ndarray  # [n_head_kv * d_head, E]
    n_head: int
    n_head_kv: int

    def __call__(self, embeds: np.ndarray, final: bool = False) -> ProbeOutput:
        """``final``: ``final_hidden = tanh(hidden)`` stands in for the final-norm probe."""
        hidden = np.concatenate([self.prefix, embeds, self.suffix]).astype(np.float32)
        return ProbeOutput(hidden=hidden, image_start=self.prefix.shape[0],
                           num_image=embeds.shape[0], q_weight=self.q_weight,
                           k_weight=self.k_weight, n_head=self.n_head, n_head_kv=self.n_head_kv,
                           rope_theta=THETA, layer=1, final_hidden=np.tanh(hidden) if final else None)


def make_probe(e: int, n_head: int = 4, n_head_kv: int = 2, d_head: int = 8,
               seed: int = 2) -> FakeProbe:
    """A FakeProbe with 3 prefix and 2 suffix rows and random W_q, W_k."""
    rng = np.random.default_rng(seed)
    return FakeProbe(prefix=rng.standard_normal((3, e)).astype(np.float32),
                     suffix=rng.standard_normal((2, e)).astype(np.float32),
                     q_weight=rng.standard_normal((n_head * d_head, e)).astype(np.float32) / 2,
                     k_weight=rng.standard_normal((n_head_kv * d_head, e)).astype(np.float32) / 2,
                     n_head=n_head, n_head_kv=n_head_kv)


def make_inputs(n: int = 36, d: int = 12, e: int = 16, probe: bool = True,
                seed: int = 0) -> PruneInputs:
    """PruneInputs over make_encoded, a linear projector and (optionally) a FakeProbe."""
    return PruneInputs(encoded=make_encoded(n=n, d=d, seed=seed), project=linear_projector(d, e),
                       probe=make_probe(e) if probe else None)


class ModuleWith:
    """A module with some functions replaced, to monkeypatch over a product module's import of it.

    Example: ``monkeypatch.setattr(selection, "math", ModuleWith(math, floor=...))`` changes
    ``math.floor`` for ``runtime.selection`` only (a negative control run through its own code).
    """

    def __init__(self, module: Any, **replaced: Callable[..., Any]) -> None:
        self._module, self._replaced = module, replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


class NumpyWith(ModuleWith):
    """numpy with some functions replaced, to monkeypatch over a product module's ``np``.

    Example: ``monkeypatch.setattr(baselines, "np", NumpyWith(sort=np.asarray))`` makes that
    module forget to sort (a negative control run through the product's own code).
    """

    def __init__(self, **replaced: Callable[..., Any]) -> None:
        super().__init__(np, **replaced)
