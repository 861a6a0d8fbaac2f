"""PyTorch reference of the language-model side (method.md §2 EntropyPrune, §3 FastV).

Works on a Hugging Face ``LlavaForConditionalGeneration`` (LLaMA-family language model) loaded
with ``attn_implementation="eager"``. The faithful path runs the decoder layers after the cut
itself, calling each ``LlamaDecoderLayer`` module with the model's own rotary embedding for the
kept (original) position ids and an explicit causal mask; nothing in transformers is patched.
Layers are 0-based here, as in Hugging Face: ``P`` is the first layer that sees the cut sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from export.reference.vision import rank_descending
from runtime.errors import InputError

EIG_FLOOR = 1e-10  # method.md §2: eigenvalues of G_t clipped below before the log


@dataclass(frozen=True)
class LlmInputs:
    """A LLaVA prompt as language-model input, with its contiguous block of image rows."""

    inputs_embeds: Tensor  # [1, T, d]
    image_start: int  # first image row
    num_image: int  # image rows (N, or K after vision-side pruning)


@dataclass(frozen=True)
class FaithfulResult:
    """The outcome of cutting the image rows before layer ``P`` and running the rest."""

    logits: Tensor  # [V] logits of the last position
    kept: Tensor  # [K'] int64 kept image rows (0..N-1), ascending
    scores: Tensor  # [N] float64 the scores the cut ranked
    position_ids: Tensor  # [T'] int64 original positions of the rows run through layers P..


def _language_model(model: nn.Module) -> nn.Module:
    return model.model.language_model


def _check_layer(p: int, n_layers: int) -> None:
    if not 1 <= p < n_layers:
        raise InputError(f"pruning layer P must satisfy 1 <= P < {n_layers} (LLM layers), got {p}")


def _check_rows(embeds: Tensor, image_start: int, num_image: int) -> None:
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds must be [1, T, d], got {tuple(embeds.shape)}")
    t = int(embeds.shape[1])
    if num_image < 1 or image_start < 0 or image_start + num_image > t:
        raise ValueError(
            f"image rows [{image_start}, {image_start + num_image}) must lie in [0, {t})"
        )


@torch.no_grad()
def llava_inputs_embeds(model: nn.Module, input_ids: Tensor, image_embeddings: Tensor) -> LlmInputs:
    """[1, T] ids with M contiguous image tokens + [M, E] embeddings -> [1, T, d] LLM input."""
    token = getattr(model.config, "image_token_id", None)
    token = model.config.image_token_index if token is None else token
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
    rows = torch.nonzero(input_ids[0] == token).flatten()
    m = int(rows.shape[0])
    if m == 0 or m != image_embeddings.shape[0] or int(rows[-1] - rows[0]) != m - 1:
        raise ValueError(
            f"expected one contiguous block of {image_embeddings.shape[0]} image "
            f"tokens (id {token}), found {m} at {rows.tolist()[:4]}..."
        )
    embeds = _language_model(model).embed_tokens(input_ids).clone()
    embeds[0, rows] = image_embeddings.to(embeds.dtype)
    return LlmInputs(inputs_embeds=embeds, image_start=int(rows[0]), num_image=m)


def head_entropy_scores(queries: Tensor) -> Tensor:
    """[N, h, d_h] per-token queries -> [N] float64 head-entropy scores (method.md §2).

    Centre over heads, G = Z Zᵀ / h, eigenvalues clipped at 1e-10, −Σ λ ln λ / ln h.
    Example: one token with heads (0.5, 0) and (−0.5, 0): λ = {0.25, 1e-10} -> ≈ 0.5.
    """
    if queries.ndim != 3 or queries.shape[1] < 2:
        raise ValueError(f"queries must be [N, h >= 2, d_h], got {tuple(queries.shape)}")
    h = queries.shape[1]
    z = queries.to(torch.float64)
    z = z - z.mean(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(z @ z.transpose(1, 2) / h).clamp_min(EIG_FLOOR)
    return -(lam * lam.log()).sum(dim=-1) / math.log(h)


def _run_lm(lm: nn.Module, embeds: Tensor, attentions: bool = False) -> Any:
    """Full-sequence forward of the language model, guarded against missing recorded outputs."""
    n_layers = len(lm.layers)
    out = lm(
        inputs_embeds=embeds,
        output_hidden_states=True,
        output_attentions=attentions,
        use_cache=False,
    )
    hidden = out.hidden_states
    if not hidden or len(hidden) != n_layers + 1 or any(x is None for x in hidden):
        raise RuntimeError(
            f"language model returned {0 if not hidden else len(hidden)} hidden "
            f"states, expected {n_layers + 1}: transformers changed its outputs"
        )
    if attentions and (not out.attentions or any(a is None for a in out.attentions)):
        raise RuntimeError(
            "language model returned no attention probabilities: load the model "
            "with attn_implementation='eager'"
        )
    return out


def _layer_queries(lm: nn.Module, hidden_in: Tensor, rows: slice, p: int) -> Tensor:
    """Pre-RoPE queries of layer P-1 for ``rows``: q_proj(input_layernorm(h)) -> [N, h, d_h]."""
    layer = lm.layers[p - 1]
    q = layer.self_attn.q_proj(layer.input_layernorm(hidden_in[0, rows]))
    return q.view(q.shape[0], -1, layer.self_attn.head_dim)


def _scores(lm: nn.Module, out: Any, rows: slice, p: int, method: str) -> Tensor:
    if method == "entropyprune":
        return head_entropy_scores(_layer_queries(lm, out.hidden_states[p - 1], rows, p))
    return out.attentions[p - 1][0, :, -1, rows].to(torch.float64).mean(dim=0)


@torch.no_grad()
def entropyprune_scores(
    model: nn.Module, inputs_embeds: Tensor, image_start: int, num_image: int, P: int = 2
) -> Tensor:
    """[1, T, d] LLM input -> [N] float64 EntropyPrune scores of the image rows at layer P-1."""
    lm = _language_model(model)
    _check_layer(P, len(lm.layers))
    _check_rows(inputs_embeds, image_start, num_image)
    rows = slice(image_start, image_start + num_image)
    return _scores(lm, _run_lm(lm, inputs_embeds), rows, P, "entropyprune")


@torch.no_grad()
def fastv_scores(
    model: nn.Module, inputs_embeds: Tensor, image_start: int, num_image: int, P: int = 2
) -> Tensor:
    """[1, T, d] LLM input -> [N] float64 head-mean attention of the last row to each image row
    in layer P-1 (RoPE applied, eager softmax probabilities)."""
    lm = _language_model(model)
    _check_layer(P, len(lm.layers))
    _check_rows(inputs_embeds, image_start, num_image)
    rows = slice(image_start, image_start + num_image)
    return _scores(lm, _run_lm(lm, inputs_embeds, attentions=True), rows, P, "fastv")


def entropyprune_budget(avg: float, n_layers: int, P: int, N: int) -> int:
    """K' = floor((Lm·avg − P·N) / (Lm − P)), exact. Example: (64, 32, 2, 576) -> 29."""
    if not 1 <= P < n_layers:
        raise InputError(f"P must satisfy 1 <= P < Lm={n_layers}, got {P}")
    k = math.floor((Fraction(avg) * n_layers - P * N) / (n_layers - P))
    if not 1 <= k <= N:
        raise InputError(
            f"average budget {avg} over {n_layers} layers with P={P}, N={N} gives "
            f"K'={k}, outside 1..{N}"
        )
    return k


def _causal_mask(t: int, like: Tensor) -> Tensor:
    """[1, 1, T, T] additive mask: 0 on and below the diagonal, the dtype's minimum above."""
    upper = torch.ones(t, t, dtype=torch.bool, device=like.device).triu(1)
    mask = torch.zeros(t, t, dtype=like.dtype, device=like.device)
    return mask.masked_fill(upper, torch.finfo(like.dtype).min)[None, None]


@torch.no_grad()
def run_decoder_layers(
    model: nn.Module, hidden: Tensor, position_ids: Tensor, start: int
) -> Tensor:
    """Run decoder layers ``start..`` on [1, T', d] rows at [1, T'] positions -> [V] last logits.

    Rows must be in increasing position order (the causal mask follows row order).
    """
    if hidden.ndim != 3 or position_ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden [1, T', d] and position_ids [1, T'] expected, got "
            f"{tuple(hidden.shape)}, {tuple(position_ids.shape)}"
        )
    lm = _language_model(model)
    rope = lm.rotary_emb(hidden, position_ids)
    mask = _causal_mask(hidden.shape[1], hidden)
    for layer in lm.layers[start:]:
        hidden = layer(
            hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rope
        )
        if isinstance(hidden, tuple):  # transformers < 5 returned tuples
            hidden = hidden[0]
    return model.lm_head(lm.norm(hidden[:, -1]))[0]


@torch.no_grad()
def _faithful(
    model: nn.Module,
    inputs: Tensor,
    image_start: int,
    num_image: int,
    keep: int,
    P: int,
    method: str,
) -> FaithfulResult:
    lm = _language_model(model)
    embeds = inputs if inputs.is_floating_point() else lm.embed_tokens(inputs)
    _check_layer(P, len(lm.layers))
    _check_rows(embeds, image_start, num_image)
    if not 1 <= keep <= num_image:
        raise InputError(f"K' must satisfy 1 <= K' <= N={num_image}, got {keep}")
    out = _run_lm(lm, embeds, attentions=method == "fastv")
    scores = _scores(lm, out, slice(image_start, image_start + num_image), P, method)
    kept = torch.sort(rank_descending(scores)[:keep]).values
    dev = embeds.device
    before = torch.arange(image_start, device=dev)
    after = torch.arange(image_start + num_image, embeds.shape[1], device=dev)
    rows = torch.cat([before, image_start + kept, after])
    logits = run_decoder_layers(model, out.hidden_states[P][:, rows], rows[None], start=P)
    return FaithfulResult(logits=logits, kept=kept, scores=scores, position_ids=rows)


def entropyprune_faithful(
    model: nn.Module, inputs: Tensor, image_start: int, num_image: int, K_prime: int, P: int = 2
) -> FaithfulResult:
    """EntropyPrune as released: layers 0..P-1 see all rows, then only the top-K' image rows
    (by :func:`head_entropy_scores`) go on, keeping their original positions.

    ``inputs``: [1, T] input_ids (integer dtype, embedded as they are) or [1, T, d] inputs_embeds.
    """
    return _faithful(model, inputs, image_start, num_image, K_prime, P, "entropyprune")


def fastv_faithful(
    model: nn.Module, inputs: Tensor, image_start: int, num_image: int, K_prime: int, P: int = 2
) -> FaithfulResult:
    """FastV: as :func:`entropyprune_faithful`, ranking image rows by :func:`fastv_scores`."""
    return _faithful(model, inputs, image_start, num_image, K_prime, P, "fastv")
