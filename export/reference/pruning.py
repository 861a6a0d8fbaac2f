"""The PyTorch reference path (method.md §4): every strategy on the Hugging Face model's outputs.

An independent second implementation of method.md §1–3 for checking the ONNX + NumPy runtime and
for evaluating the methods inside Hugging Face pipelines (CPU or GPU). It never imports the
runtime's numeric modules. Load the model with ``attn_implementation="eager"``: the other
attention kernels return no attention probabilities.

    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    result = reference_prune(model, pixel_values, "entropy", 64)  # result.embeddings: [64, E]

The language-model side (EntropyPrune, FastV) lives in :mod:`export.reference.llm` and is
re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from export.reference.baselines import divprune_select, uniform_indices, visionzip_contextual, visionzip_select
from export.reference.llm import (  # noqa: F401  (re-exported public API)
    FaithfulResult,
    LlmInputs,
    entropyprune_budget,
    entropyprune_faithful,
    entropyprune_scores,
    fastv_faithful,
    fastv_scores,
    head_entropy_scores,
    llava_inputs_embeds,
    run_decoder_layers,
)
from export.reference.vision import (
    RULES,
    TokenSet,
    attention_entropy,
    attention_kl,
    choose_layers,
    dual_layer_select,
    head_mean_distribution,
    merge_into_kept,
    rank_descending,
    split_budget,
    tower_outputs,
)
from runtime.errors import InputError
from runtime.model_registry import PruningDefaults

_DEFAULTS = PruningDefaults()
MERGES = ("mean", "none")


@dataclass(frozen=True)
class ReferenceVision:
    """What the vision tower gives the strategies (method.md §0), straight from Hugging Face."""

    features: Tensor  # [B, N, D]: patch tokens of hidden_states[f]
    cls_attn: Tensor  # [B, f, H, N]: [CLS]->patch softmax rows of blocks 1..f
    keys: Tensor  # [B, N, D/H]: head-mean k_proj output of block f, patches only
    feature_layer: int  # f, the 1-based block whose output is the feature map


@dataclass(frozen=True)
class ReferenceResult:
    """One strategy's answer for one image, with the diagnostics of method.md §1.8."""

    strategy: str
    kept: Tensor  # [K] int64 patch indices in LLM order (ascending except visionzip)
    counts: Tensor  # [K] int64 patches each token stands for
    tokens: Tensor  # [K, D] (merged) features fed to the projector
    embeddings: Tensor  # [K, E] multi_modal_projector(tokens)
    layers: Mapping[str, int] | None = None  # {"l_s", "l_d"} for "entropy"
    entropy: Tensor | None = None  # [f] float64 H(1..f) for "entropy"
    kl: Tensor | None = None  # [f-1] float64 KL(1..f-1) for "entropy"
    k_s: int | None = None
    k_d: int | None = None
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. visionzip's split


@dataclass(frozen=True)
class NoOptions:
    """Strategies without options."""


@dataclass(frozen=True)
class EntropyOptions:
    """Options of the entropy-adaptive strategy; defaults from :class:`PruningDefaults`."""

    rule: str = _DEFAULTS.rule
    shallow: tuple[int, int] = _DEFAULTS.shallow  # inclusive, 1-based
    deep: tuple[int, int] = _DEFAULTS.deep  # inclusive, 1-based
    p_shallow: float = _DEFAULTS.p_shallow
    merge: str = _DEFAULTS.merge
    fixed: tuple[int, int] = (6, 20)  # (l_s, l_d) for rule "fixed": the paper's L6–L20 baseline

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise InputError(f"unknown layer rule {self.rule!r}; choose one of: {', '.join(RULES)}")
        if self.merge not in MERGES:
            raise InputError(f"unknown merge {self.merge!r}; choose one of: {', '.join(MERGES)}")
        if not 0.0 <= self.p_shallow <= 1.0:
            raise InputError(f"p_shallow must be in [0, 1], got {self.p_shallow}")


def feature_layer(model: nn.Module) -> int:
    """f: LLaVA's vision_feature_layer as a 1-based block number (negative: L + 1 + vfl)."""
    vfl = model.config.vision_feature_layer
    if not isinstance(vfl, int):
        raise InputError(f"only a single vision_feature_layer is supported, got {vfl!r}")
    if model.config.vision_feature_select_strategy != "default":
        raise InputError(
            "only vision_feature_select_strategy='default' ([CLS] dropped) is supported, "
            f"got {model.config.vision_feature_select_strategy!r}"
        )
    n_blocks = model.config.vision_config.num_hidden_layers
    f = n_blocks + 1 + vfl if vfl < 0 else vfl
    if not 1 <= f <= n_blocks:
        raise InputError(f"vision_feature_layer {vfl} gives block {f}, outside 1..{n_blocks}")
    return f


@torch.no_grad()
def vision_outputs(model: nn.Module, pixel_values: Tensor) -> ReferenceVision:
    """[B, 3, S, S] pixels -> features, [CLS] attention rows and keys of a LLaVA model's tower."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [B, 3, S, S], got {tuple(pixel_values.shape)}")
    f = feature_layer(model)
    out = tower_outputs(model.model.vision_tower, pixel_values, f)
    return ReferenceVision(features=out["features"], cls_attn=out["cls_attn"], keys=out["keys"], feature_layer=f)


def _plain(kept: Tensor, features: Tensor) -> TokenSet:
    return TokenSet(kept=kept, tokens=features[kept], counts=torch.ones_like(kept))


def _none(v: ReferenceVision, budget: int | None, opts: NoOptions, project: Callable) -> dict:
    n = v.features.shape[1]
    return {"tokens": _plain(torch.arange(n, device=v.features.device), v.features[0])}


def _uniform(v: ReferenceVision, budget: int, opts: NoOptions, project: Callable) -> dict:
    kept = uniform_indices(v.features.shape[1], budget).to(v.features.device)
    return {"tokens": _plain(kept, v.features[0])}


def _fastervlm(v: ReferenceVision, budget: int, opts: NoOptions, project: Callable) -> dict:
    s_f = head_mean_distribution(v.cls_attn[0, -1:])[0]
    return {"tokens": _plain(torch.sort(rank_descending(s_f)[:budget]).values, v.features[0])}


def _entropy(v: ReferenceVision, budget: int, opts: EntropyOptions, project: Callable) -> dict:
    dist = head_mean_distribution(v.cls_attn[0])
    entropy = attention_entropy(dist)
    choice = choose_layers(entropy, opts.rule, opts.shallow, opts.deep, opts.fixed)
    split = split_budget(budget, opts.p_shallow)
    kept = dual_layer_select(dist[choice.l_s - 1], dist[choice.l_d - 1], split)
    x = v.features[0]
    tokens = merge_into_kept(x, kept) if opts.merge == "mean" else _plain(kept, x)
    return {
        "tokens": tokens,
        "layers": {"l_s": choice.l_s, "l_d": choice.l_d},
        "entropy": entropy,
        "kl": attention_kl(dist),
        "k_s": split.k_s,
        "k_d": split.k_d,
    }


def _visionzip(v: ReferenceVision, budget: int, opts: NoOptions, project: Callable) -> dict:
    c = visionzip_contextual(budget)
    return {
        "tokens": visionzip_select(v.features[0], v.cls_attn[0, -1], v.keys[0], budget),
        "extras": {"dominant": budget - c, "contextual": c},
    }


def _divprune(v: ReferenceVision, budget: int, opts: NoOptions, project: Callable) -> dict:
    return {"tokens": _plain(divprune_select(project(v.features[0]), budget), v.features[0])}


STRATEGIES: dict[str, tuple[type, Callable[..., dict]]] = {
    "none": (NoOptions, _none),
    "uniform": (NoOptions, _uniform),
    "fastervlm": (NoOptions, _fastervlm),
    "entropy": (EntropyOptions, _entropy),
    "visionzip": (NoOptions, _visionzip),
    "divprune": (NoOptions, _divprune),
}


def make_options(strategy: str, **options: Any) -> Any:
    """The options dataclass of ``strategy``; unknown names list the valid ones."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[strategy][0]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(
            f"strategy {strategy!r} takes no option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(known)) or 'none'}"
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


@torch.no_grad()
def prune_outputs(
    model: nn.Module, vision: ReferenceVision, strategy: str, budget: int | None, **options: Any
) -> ReferenceResult:
    """Run ``strategy`` on precomputed :func:`vision_outputs` (B = 1) and project the tokens.

    ``none`` ignores ``budget`` (all N tokens); every other strategy needs 1 <= budget <= N.
    """
    if vision.features.shape[0] != 1:
        raise ValueError(
            f"one image at a time: features must be [1, N, D], got {tuple(vision.features.shape)}"
        )
    opts = make_options(strategy, **options)
    n = int(vision.features.shape[1])
    if strategy != "none" and (budget is None or not 1 <= budget <= n):
        raise InputError(f"budget K must satisfy 1 <= K <= N={n}, got {budget}")
    project = model.model.multi_modal_projector
    parts = STRATEGIES[strategy][1](vision, budget, opts, project)
    chosen: TokenSet = parts.pop("tokens")
    return ReferenceResult(
        strategy=strategy,
        kept=chosen.kept,
        counts=chosen.counts,
        tokens=chosen.tokens,
        embeddings=project(chosen.tokens),
        **parts,
    )


def reference_prune(
    model: nn.Module, pixel_values: Tensor, strategy: str, budget: int | None, **options: Any
) -> ReferenceResult:
    """[1, 3, S, S] pixels -> the K tokens ``strategy`` feeds the LLM, as method.md §1/§3 define."""
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"pixel_values must be [1, 3, S, S], got {tuple(pixel_values.shape)}")
    make_options(strategy, **options)  # fail on bad options before running the tower
    return prune_outputs(model, vision_outputs(model, pixel_values), strategy, budget, **options)
