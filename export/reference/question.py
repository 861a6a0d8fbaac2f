"""PyTorch reference of the question-aware strategies (method.md §7): CDPruner and DART.

A second implementation, computed from the Hugging Face models' own outputs and never importing
the runtime's numeric modules:

- CDPruner: ``V`` from the CLIP vision model's hidden states with ``post_layernorm`` and
  ``visual_projection``, ``T`` from ``CLIPModel.get_text_features`` on the question's 77-token
  segments, ``E`` from LLaVA's projector. The DPP gain of a candidate is the Schur complement
  ``L_jj − L_jS L_SS⁻¹ L_Sj`` solved afresh at every step (``torch.linalg.solve``), not the
  runtime's incremental Cholesky rows: the two agree in exact arithmetic.
- DART: layer P−1's keys as ``LlamaAttention`` computes them (``k_proj`` of ``input_layernorm``,
  the model's rotary embedding) and ``H = norm(hidden_states[P])`` from one LlamaModel forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from export.reference.llm import _check_layer, _language_model, _run_lm
from runtime.errors import InputError

RANK_SPENT = 1e-10  # method.md §7.5: a best gain at or below this ends the greedy loop
RELEVANCE_OFFSET = 1e-6  # method.md §7.4: (r − min r + 1e-6) / (max r − min r)
NORM_EPS = 1e-6  # norms clipped here before a cosine (as the runtime and DivPrune)


# --- CDPruner ------------------------------------------------------------------------------
def clip_image_features(clip_model: nn.Module, pixel_values: Tensor, feature_layer: int) -> Tensor:
    """[1, 3, S, S] -> V [N, P]: ``visual_projection(post_layernorm(hidden_states[f]))`` of the patches."""
    vision = clip_model.vision_model
    out = vision(pixel_values=pixel_values, output_hidden_states=True)
    if out.hidden_states is None or len(out.hidden_states) <= feature_layer:
        raise RuntimeError("the CLIP vision model returned no hidden states: transformers changed its outputs")
    patches = out.hidden_states[feature_layer][0, 1:]
    return clip_model.visual_projection(vision.post_layernorm(patches))


def question_segments(ids: list[int], positions: int = 77, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids (start/end included) -> ``input_ids, attention_mask`` [M, positions] int64,
    right-padded with ``pad_id`` and mask 0 to a multiple of ``positions`` (method.md §7.3)."""
    if not ids:
        raise InputError("the question has no tokens")
    m = math.ceil(len(ids) / positions)
    flat = torch.full((m * positions,), pad_id, dtype=torch.int64)
    mask = torch.zeros(m * positions, dtype=torch.int64)
    flat[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    mask[: len(ids)] = 1
    return flat.view(m, positions), mask.view(m, positions)


def clip_text_features(clip_model: nn.Module, tokenizer: object, question: str) -> Tensor:
    """The question alone through CLIP's tokenizer and text tower: T [M, P]."""
    ids = tokenizer(question)["input_ids"]  # type: ignore[operator]
    positions = int(clip_model.config.text_config.max_position_embeddings)
    input_ids, mask = question_segments(list(ids), positions)
    out = clip_model.get_text_features(input_ids=input_ids, attention_mask=mask)
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers 5 may return an output object


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def cdpruner_relevance(image_clip: Tensor, text_clip: Tensor, relevance_weight: float | None = None) -> Tensor:
    """r [N] float32: mean over segments of −cos(V_i, T_m), min-max normalised, optionally exp(α r)."""
    raw = -(_unit(image_clip.float()) @ _unit(text_clip.float()).T).mean(dim=1)
    lo, hi = raw.min(), raw.max()
    r = torch.ones_like(raw) if hi == lo else (raw - lo + RELEVANCE_OFFSET) / (hi - lo)
    if relevance_weight is not None:
        r = torch.exp(relevance_weight / (2.0 * (1.0 - relevance_weight)) * r)
    return r


def dpp_select(embeds: Tensor, relevance: Tensor, budget: int) -> Tensor:
    """CDPruner's kept rows [K] int64 ascending: greedy MAP of ``diag(r) S diag(r)`` (S: cosine of
    ``embeds [N, E]``) by Schur-complement gains in float64, filled by relevance once rank is spent."""
    n = int(embeds.shape[0])
    if not 1 <= budget <= n:
        raise InputError(f"budget K must satisfy 1 <= K <= N={n}, got {budget}")
    unit = _unit(embeds.float())
    r = relevance.float()
    kernel = (r[:, None] * (unit @ unit.T) * r[None, :]).double()
    chosen: list[int] = []
    for _ in range(budget):
        gains = torch.diagonal(kernel).clone()
        if chosen:
            s = torch.tensor(chosen)
            cross = kernel[s]  # [t, N]
            gains -= (cross * torch.linalg.solve(kernel[s][:, s], cross)).sum(dim=0)
            gains[s] = -math.inf
        j = int(torch.argmax(gains))  # first maximum
        if not gains[j] > RANK_SPENT:
            break
        chosen.append(j)
    rest = [i for i in range(n) if i not in set(chosen)]
    by_relevance = sorted(rest, key=lambda i: (-float(r[i]), i))
    return torch.tensor(sorted(chosen + by_relevance[: budget - len(chosen)]), dtype=torch.int64)


# --- DART ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DartStates:
    """What DART reads from the language model for one prompt."""

    keys: Tensor  # [T, n_kv * d_head] float32: layer P−1's keys with RoPE, heads concatenated
    hidden: Tensor  # [T, d] float32: norm(hidden_states[P]), the final RMSNorm of layer P−1's output


@torch.no_grad()
def dart_states(model: nn.Module, inputs_embeds: Tensor, P: int = 2) -> DartStates:
    """[1, T, d] LLaVA language-model input -> :class:`DartStates` at layer P (1 <= P < layers)."""
    lm = _language_model(model)
    _check_layer(P, len(lm.layers))
    out = _run_lm(lm, inputs_embeds)
    layer = lm.layers[P - 1]
    t = inputs_embeds.shape[1]
    k = layer.self_attn.k_proj(layer.input_layernorm(out.hidden_states[P - 1]))  # [1, T, n_kv * d_head]
    head_dim = layer.self_attn.head_dim
    k = k.view(1, t, -1, head_dim).transpose(1, 2)  # [1, n_kv, T, d_head]
    cos, sin = lm.rotary_emb(k, torch.arange(t)[None])
    half = head_dim // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    k = k * cos[:, None] + rotated * sin[:, None]
    keys = k.transpose(1, 2).reshape(t, -1)
    return DartStates(keys=keys, hidden=lm.norm(out.hidden_states[P])[0])


def dart_select(states: DartStates, image_start: int, num_image: int, budget: int,
                p_img: int = 4, p_txt: int = 4) -> Tensor:
    """DART's kept image rows [K] int64 ascending (method.md §7 steps 2–5); text candidates are
    every position after the image."""
    if not 1 <= budget <= num_image:
        raise InputError(f"budget K must satisfy 1 <= K <= N={num_image}, got {budget}")
    keys, hidden = states.keys.double(), states.hidden.double()
    img = slice(image_start, image_start + num_image)
    l1 = keys.abs().sum(dim=1)

    def largest(values: Tensor, count: int) -> list[int]:
        return sorted(range(values.shape[0]), key=lambda i: (-float(values[i]), i))[:count]

    image_pivots = largest(l1[img], p_img)
    if budget <= len(image_pivots):
        return torch.tensor(sorted(image_pivots[:budget]), dtype=torch.int64)
    text_pivots = largest(l1[img.stop:], p_txt)
    pivot_rows = [hidden[img][i] for i in image_pivots] + [hidden[img.stop + i] for i in text_pivots]
    share, extra = divmod(budget - len(image_pivots), len(pivot_rows))
    kept = set(image_pivots)
    for n, pivot in enumerate(pivot_rows):
        quota = share + (1 if n < extra else 0)
        candidates = [i for i in range(num_image) if i not in kept]
        sims = {i: float(torch.dot(hidden[img][i], pivot) / (hidden[img][i].norm().clamp_min(NORM_EPS)
                                                              * pivot.norm().clamp_min(NORM_EPS)))
                for i in candidates}
        kept.update(sorted(candidates, key=lambda i: (sims[i], i))[:quota])
    return torch.tensor(sorted(kept), dtype=torch.int64)
