"""PyTorch reference of the vision side: the encoder outputs from Hugging Face's own (method.md §0)
and the selection (method.md §1 and §3), pure tensor functions.

Independent of ``runtime/`` by design: this is the check the NumPy runtime is compared with.
Scores, distributions and cosines are computed in float64; merged features are accumulated in
float64 and returned in the features' dtype; indices are int64. Every ranking breaks ties by the
smaller index (stable sorts; ``argmax`` returns the first maximum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from export.vision_family import VisionFamily, family_of_tower
from runtime.errors import InputError

RULES = ("max-min", "max-max", "min-min", "min-max", "fixed")
KL_FLOOR = 1e-12  # method.md §1.2: both distributions clipped below before the log
NORM_FLOOR = 1e-6  # method.md §1.6: vector norms clipped below before a cosine
# block f's attention recomputed from the family's query/key projections vs the tower's own (float32
# softmax rows vs float64): a spec naming the wrong projection or norm is off by far more
SPEC_ATTN_ATOL = 1e-5


def check_outputs(out: Any, num_blocks: int, label: str = "CLIP") -> None:
    """Fail loudly when the tower returned fewer than ``num_blocks`` attention maps (or ``num_blocks + 1``
    hidden states), or None in their place (not eager attention; transformers changed)."""
    attentions = [a for a in getattr(out, "attentions", None) or () if a is not None]
    hidden = [h for h in getattr(out, "hidden_states", None) or () if h is not None]
    if len(attentions) < num_blocks or len(hidden) <= num_blocks:
        raise RuntimeError(f"the installed transformers did not return {label} attentions/hidden states (got "
                           f"{len(attentions)} attentions, {len(hidden)} hidden states besides None; need {num_blocks} "
                           f"and {num_blocks + 1}): load the model with attn_implementation='eager' and use the "
                           "pinned transformers range from pyproject.toml")


def tower_outputs(tower: Any, pixel_values: Tensor, feature_layer: int,
                  family: VisionFamily | None = None) -> dict[str, Tensor]:
    """[B,3,S,S] pixels -> the encoder outputs from the tower's own ``hidden_states``/``attentions``.

    ``features [B,N,D]`` = hidden_states[f][:, 1:]; ``cls_attn [B,f,H,N]`` = attentions[l-1][:, :, 0, 1:]
    for l = 1..f; ``keys [B,N,D/H]`` = head mean of block f's key projection on its first norm of
    hidden_states[f-1]. The token count ([CLS] + (S/patch)²) and block f's attention recomputed from
    the family's projections are checked, so a wrong spec fails here rather than validating itself.
    ``family``: from the tower's ``config.model_type`` when None.
    """
    family = family or family_of_tower(tower)
    if not family.has_cls:
        raise RuntimeError(f"the {family.name} vision family has no [CLS] token: cls_attn is undefined for it")
    blocks = family.parts(tower).blocks
    if not 1 <= feature_layer <= len(blocks):
        raise ValueError(f"feature_layer must be in 1..{len(blocks)}, got {feature_layer}")
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        check_outputs(out, len(blocks), family.label)
        _check_tokens(family, out.hidden_states[0].shape[1], pixel_values, int(tower.config.patch_size))
        attn = family.attention_of(blocks[feature_layer - 1])
        normed = family.norms_of(blocks[feature_layer - 1])[0](out.hidden_states[feature_layer - 1])
        k = family.key_of(attn)(normed)
        b, t, _ = k.shape
        heads = family.head_count(attn)
        # the first image suffices to check the spec (a float64 copy of B images' maps would be 4x theirs)
        probs = out.attentions[feature_layer - 1][:1]
        _check_projections(family, family.query_of(attn)(normed[:1]), k[:1], heads, probs)
        return {
            "features": out.hidden_states[feature_layer][:, 1:],
            "cls_attn": torch.stack([out.attentions[i][:, :, 0, 1:] for i in range(feature_layer)], dim=1),
            "keys": k.view(b, t, heads, k.shape[-1] // heads).mean(dim=2)[:, 1:],
        }


def _check_tokens(family: VisionFamily, tokens: int, pixel_values: Tensor, patch: int) -> None:
    grid = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
    if tokens != grid + family.has_cls:
        raise RuntimeError(f"the {family.name} vision family says [CLS]={family.has_cls}, so {grid + family.has_cls} "
                           f"tokens for {grid} patches, but the tower has {tokens}: the spec's has_cls is wrong")


def _check_projections(family: VisionFamily, q: Tensor, k: Tensor, heads: int, probs: Tensor) -> None:
    """softmax(q·kᵀ/√d) per head must be the tower's own attention probabilities ``probs [B,H,T,T]``."""
    b, t, width = q.shape
    qh, kh = (x.to(torch.float64).view(b, t, heads, width // heads).transpose(1, 2) for x in (q, k))
    diff = float(((qh @ kh.transpose(-1, -2)) * (width // heads) ** -0.5).softmax(-1).sub(probs).abs().max())
    if diff > SPEC_ATTN_ATOL:
        raise RuntimeError(f"the {family.name} vision family's {family.attention}.{family.query}/{family.key} on "
                           f"{family.norms[0]} do not reproduce the tower's attention (max |Δ| {diff:.2e} > "
                           f"{SPEC_ATTN_ATOL:.0e}): the spec names the wrong submodules")


@dataclass(frozen=True)
class LayerChoice:
    """The two layers of the dual-layer selection, numbered 1..f."""

    l_s: int  # shallow layer
    l_d: int  # deep layer


@dataclass(frozen=True)
class BudgetSplit:
    """Tokens taken by the shallow and the deep layer; ``k_s + k_d = K``."""

    k_s: int
    k_d: int


@dataclass(frozen=True)
class TokenSet:
    """Selected tokens in the order they are fed to the projector."""

    kept: Tensor  # [K] int64 patch index of each output token
    tokens: Tensor  # [K, D] features (merged where a strategy merges)
    counts: Tensor  # [K] int64 patches each token stands for


def check_ndim(t: Tensor, ndim: int, what: str) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_budget(budget: int, n: int) -> None:
    if not 1 <= budget <= n:
        raise InputError(f"budget K must satisfy 1 <= K <= N={n}, got {budget}")


def head_mean_distribution(cls_attn: Tensor) -> Tensor:
    """[f, H, N] [CLS]->patch rows -> [f, N] float64 head means renormalised to sum 1 per layer.

    Example: rows [[[0.2, 0.2], [0.4, 0.0]]] (f=1, H=2, N=2) -> [[0.75, 0.25]].
    """
    check_ndim(cls_attn, 3, "cls_attn [f, H, N]")
    mean = cls_attn.to(torch.float64).mean(dim=1)
    return mean / mean.sum(dim=-1, keepdim=True)


def attention_entropy(dist: Tensor) -> Tensor:
    """[f, N] distributions -> [f] float64 entropies -Σ p ln p (0 ln 0 = 0).

    Example: [[0.5, 0.5, 0.0]] -> [ln 2].
    """
    check_ndim(dist, 2, "dist [f, N]")
    return -torch.xlogy(dist, dist).sum(dim=-1)


def attention_kl(dist: Tensor) -> Tensor:
    """[f, N] distributions -> [f-1] float64 KL(S^l || S^{l+1}), both clipped at 1e-12 in the log.

    The weight ``S^l_j`` in front of the log is not clipped (0 ln(..) = 0 for empty patches).
    Example: [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]] -> [0, 0.5 ln 0.5 + 0.5 ln(0.5/1e-12)].
    """
    check_ndim(dist, 2, "dist [f, N]")
    p, q = dist[:-1], dist[1:]
    log_ratio = p.clamp_min(KL_FLOOR).log() - q.clamp_min(KL_FLOOR).log()
    return (p * log_ratio).sum(dim=-1)


def _validate_range(name: str, rng: tuple[int, int], f: int) -> None:
    lo, hi = rng
    if not 1 <= lo <= hi <= f:
        raise InputError(
            f"{name} layer range must satisfy 1 <= lo <= hi <= f={f}, got {tuple(rng)}"
        )


def choose_layers(
    entropy: Tensor,
    rule: str,
    shallow: tuple[int, int],
    deep: tuple[int, int],
    fixed: tuple[int, int],
) -> LayerChoice:
    """[f] entropies -> the (l_s, l_d) of ``rule`` over the inclusive 1-based ranges.

    Ties go to the smaller layer. Example: H = [3, 1, 2], rule "max-min", shallow (1, 2),
    deep (2, 3) -> l_s = 1 (H=3), l_d = 2 (H=1).
    """
    check_ndim(entropy, 1, "entropy [f]")
    f = int(entropy.shape[0])
    if rule not in RULES:
        raise InputError(f"unknown layer rule {rule!r}; choose one of: {', '.join(RULES)}")
    if rule == "fixed":
        for name, layer in zip(("shallow", "deep"), fixed, strict=True):
            if not 1 <= layer <= f:
                raise InputError(f"fixed {name} layer must be in 1..f={f}, got {layer}")
        return LayerChoice(l_s=int(fixed[0]), l_d=int(fixed[1]))
    _validate_range("shallow", shallow, f)
    _validate_range("deep", deep, f)
    shallow_rule, deep_rule = rule.split("-")

    def pick(rng: tuple[int, int], how: str) -> int:
        window = entropy[rng[0] - 1 : rng[1]]
        pos = torch.argmax(window) if how == "max" else torch.argmin(window)
        return int(rng[0] + pos)

    return LayerChoice(l_s=pick(shallow, shallow_rule), l_d=pick(deep, deep_rule))


def split_budget(budget: int, p_shallow: float) -> BudgetSplit:
    """K -> (k_s, k_d) with k_s = floor(p_s·K + 0.5). Example: (64, 0.4) -> (26, 38)."""
    if not 0.0 <= p_shallow <= 1.0:
        raise InputError(f"p_shallow must be in [0, 1], got {p_shallow}")
    k_s = math.floor(p_shallow * budget + 0.5)
    return BudgetSplit(k_s=k_s, k_d=budget - k_s)


def rank_descending(scores: Tensor) -> Tensor:
    """[N] -> [N] int64 indices by descending score, ties: smaller first. [1, 3, 3] -> [1, 2, 0]."""
    check_ndim(scores, 1, "scores [N]")
    return torch.sort(scores, descending=True, stable=True).indices


def dual_layer_select(s_shallow: Tensor, s_deep: Tensor, split: BudgetSplit) -> Tensor:
    """Top k_d by ``s_deep``, then top k_s by ``s_shallow`` among the rest -> [K] int64 ascending.

    Example: s_deep [0.1, 0.6, 0.3], s_shallow [0.5, 0.4, 0.1], k_s = k_d = 1 -> [0, 1].
    """
    if s_shallow.shape != s_deep.shape or s_deep.ndim != 1:
        raise ValueError(
            f"scores must both be [N], got {tuple(s_shallow.shape)}, {tuple(s_deep.shape)}"
        )
    check_budget(split.k_s + split.k_d, int(s_deep.shape[0]))
    deep_kept = rank_descending(s_deep)[: split.k_d]
    taken = torch.zeros_like(s_deep, dtype=torch.bool)
    taken[deep_kept] = True
    order = rank_descending(s_shallow)
    shallow_kept = order[~taken[order]][: split.k_s]
    return torch.sort(torch.cat([deep_kept, shallow_kept])).values


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[M, D], [P, D] -> [M, P] float64 cosines, norms clipped below at 1e-6.

    Example: a [[1, 0]], b [[2, 0], [0, 3]] -> [[1, 0]].
    """
    check_ndim(a, 2, "a [M, D]")
    check_ndim(b, 2, "b [P, D]")
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    a64 = a64 / a64.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    b64 = b64 / b64.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    return a64 @ b64.T


def merge_into_kept(features: Tensor, kept: Tensor) -> TokenSet:
    """[N, D], [K] ascending -> each removed patch joins its most cosine-similar kept patch;
    a kept token becomes the plain mean of itself and its members (float64 sums).

    Example: X = [[1, 0], [0, 1], [3, 0]], kept [0, 1] -> tokens [[2, 0], [0, 1]], counts [2, 1].
    """
    check_ndim(features, 2, "features [N, D]")
    n = int(features.shape[0])
    removed = torch.ones(n, dtype=torch.bool, device=features.device)
    removed[kept] = False
    removed_idx = torch.nonzero(removed).flatten()
    target = torch.argmax(cosine_matrix(features[removed_idx], features[kept]), dim=1)
    sums = features[kept].to(torch.float64)
    sums = sums.index_add(0, target, features[removed_idx].to(torch.float64))
    counts = torch.ones(kept.shape[0], dtype=torch.int64, device=features.device)
    counts = counts.index_add(0, target, torch.ones_like(target))
    tokens = (sums / counts[:, None].to(torch.float64)).to(features.dtype)
    return TokenSet(kept=kept, tokens=tokens, counts=counts)
