"""The torch-free runtime (ONNX + NumPy) against the PyTorch reference path on the HF model.

For 5+ real photos and synthetic edge cases, every strategy and rule, budgets 64/128/192:
kept indices, member counts and chosen layers are identical; embeddings agree within
``EMBED_ATOL``. Index equality is only meaningful when rankings are not decided by float noise,
so every compared top-k set and merge first asserts a margin: the decision could not flip given
the measured per-patch ONNX-vs-PyTorch disagreement (the tiny model's attention is shaped to be
peaky for this; see tools/make_tiny_llava.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from export.reference.pruning import prune_outputs, vision_outputs
from runtime.pipeline import Pipeline
from runtime.scoring import layer_distributions
from runtime.strategies import baselines
from tests.strategy_fakes import NumpyWith

BUDGETS = (64, 128, 192)
# projector outputs are O(1); ONNX features differ from PyTorch by ~5e-6 (see export validation)
EMBED_ATOL = 1e-4
ENTROPY_CASES = {
    "max-min": {}, "max-max": {"rule": "max-max"}, "min-min": {"rule": "min-min"}, "min-max": {"rule": "min-max"},
    "fixed": {"rule": "fixed", "fixed": (6, 20)}, "no-merge": {"merge": "none"}, "p-0.7": {"p_shallow": 0.7},
}
CASES = [("none", {}), ("uniform", {}), ("fastervlm", {}), ("visionzip", {}), ("divprune", {})] + [
    ("entropy", opts) for opts in ENTROPY_CASES.values()
]


def synthetic_images() -> dict[str, Image.Image]:
    """Edge cases: flat grey, a hard checkerboard, a tall thin strip, and seeded noise."""
    rng = np.random.default_rng(7)
    checker = (np.indices((336, 336)).sum(0) // 21 % 2 * 255).astype(np.uint8)
    return {
        "grey": Image.new("RGB", (64, 48), (128, 128, 128)),
        "checker": Image.fromarray(np.stack([checker] * 3, -1)),
        "strip": Image.fromarray(rng.integers(0, 256, (300, 17, 3), dtype=np.uint8)),
        "noise": Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)),
    }


@pytest.fixture(scope="module")
def pipeline(tiny_bundle) -> Pipeline:
    return Pipeline(tiny_bundle)


@pytest.fixture(scope="module")
def images(photos) -> dict[str, Image.Image]:
    return {**{k: photos[k] for k in list(photos)[:5]}, **synthetic_images()}


@pytest.fixture(scope="module")
def encoded(pipeline: Pipeline, images, tiny_llava_processor, tiny_llava_model) -> dict:
    """Per image: the runtime's EncoderOutput and the reference's vision outputs (same pixels)."""
    out = {}
    for name, image in images.items():
        pixels = tiny_llava_processor.image_processor(image, return_tensors="pt")["pixel_values"]
        np.testing.assert_array_equal(pipeline.pixel_values(image), pixels[0].numpy())  # same input
        out[name] = (pipeline.encoder.encode(pixels[0].numpy()), vision_outputs(tiny_llava_model, pixels))
    return out


def topk_is_decided(ref: np.ndarray, rt: np.ndarray, k: int, taken: np.ndarray | None = None) -> bool:
    """The top-``k`` set of ``ref`` (excluding ``taken``) cannot differ from that of ``rt``.

    Sufficient condition with the measured per-patch disagreement ``e = |rt − ref|``: every
    selected j and unselected i satisfy ref_j − e_j > ref_i + e_i.
    """
    ref, err = ref.astype(np.float64).copy(), np.abs(rt.astype(np.float64) - ref)
    if taken is not None:
        ref[taken] = -np.inf
    order = np.argsort(-ref, kind="stable")
    chosen, rest = order[:k], order[k:]
    rest = rest[np.isfinite(ref[rest])]
    if k == 0 or rest.shape[0] == 0:
        return True
    return bool((ref[chosen] - err[chosen]).min() > (ref[rest] + err[rest]).max())


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def merge_is_decided(rt_features: np.ndarray, ref_features: np.ndarray, kept: np.ndarray) -> bool:
    """Every removed patch's best kept match wins by more than both implementations can disagree.

    For removed patch j the argmax over kept patches cannot differ between the two
    implementations when best − second-best cosine > 2 · max_i |cos_rt(j, i) − cos_ref(j, i)|
    (a sufficient condition, measured per patch).
    """
    removed = np.setdiff1d(np.arange(ref_features.shape[0]), kept)
    if kept.shape[0] < 2 or removed.shape[0] == 0:
        return True
    cos_ref = unit_rows(ref_features)[removed] @ unit_rows(ref_features)[kept].T
    cos_rt = unit_rows(rt_features)[removed] @ unit_rows(rt_features)[kept].T
    top2 = np.sort(cos_ref, axis=1)[:, -2:]
    return bool(np.all(top2[:, 1] - top2[:, 0] > 2 * np.abs(cos_rt - cos_ref).max(axis=1)))


def assert_entropy_margins(runtime_enc, ref_vision, result) -> None:
    s_ref = layer_distributions(ref_vision.cls_attn[0].double().numpy())
    s_rt = layer_distributions(runtime_enc.cls_attn)
    l_s, l_d = result.report["layers"]["shallow"], result.report["layers"]["deep"]
    k_s, k_d = result.report["k_s"], result.report["k_d"]
    assert topk_is_decided(s_ref[l_d - 1], s_rt[l_d - 1], k_d), "deep top-k margin too small"
    deep = np.argsort(-s_ref[l_d - 1], kind="stable")[:k_d]
    assert topk_is_decided(s_ref[l_s - 1], s_rt[l_s - 1], k_s, taken=deep), "shallow top-k margin too small"
    if result.counts.max() > 1:
        rt, ref = runtime_enc.features.astype(np.float64), ref_vision.features[0].double().numpy()
        assert merge_is_decided(rt, ref, result.kept), "merge cosine margin too small for a count comparison"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("strategy", "options"), CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_runtime_equals_reference(pipeline, encoded, tiny_llava_model, strategy, options, budget) -> None:
    for name, (runtime_enc, ref_vision) in encoded.items():
        got = pipeline.prune_encoded(runtime_enc, budget, strategy, **options)
        ref = prune_outputs(tiny_llava_model, ref_vision, strategy, budget, **options)
        where = f"{name}, {strategy} {options}, K={budget}"
        if strategy == "entropy":
            assert got.report["layers"] == {"shallow": ref.layers["l_s"], "deep": ref.layers["l_d"]}, where
            assert (got.report["k_s"], got.report["k_d"]) == (ref.k_s, ref.k_d), where
            assert_entropy_margins(runtime_enc, ref_vision, got)
            np.testing.assert_allclose(got.report["entropy"], ref.entropy.numpy(), rtol=0, atol=1e-4, err_msg=where)
        if strategy == "fastervlm":
            s_ref = layer_distributions(ref_vision.cls_attn[0].double().numpy())[-1]
            assert topk_is_decided(s_ref, layer_distributions(runtime_enc.cls_attn)[-1], budget), where
        np.testing.assert_array_equal(got.kept, ref.kept.numpy(), err_msg=where)
        np.testing.assert_array_equal(got.counts, ref.counts.numpy(), err_msg=where)
        np.testing.assert_allclose(got.embeddings, ref.embeddings.numpy(), rtol=0, atol=EMBED_ATOL, err_msg=where)


def test_chosen_layers_depend_on_the_image(pipeline, encoded) -> None:
    """The adaptive rule really adapts on this model (otherwise parity of layers proves little)."""
    results = [pipeline.prune_encoded(enc, 64, "entropy") for enc, _ in encoded.values()]
    chosen = {tuple(result.report["layers"].values()) for result in results}
    assert len(chosen) >= 2, chosen


# --- negative controls: plausible bugs that the parity checks above must catch -----------------


def test_negative_control_unsorted_indices(pipeline, encoded, tiny_llava_model, monkeypatch) -> None:
    """FasterVLM forgetting to sort (rank-ordered indices) fails the index check, run through the pipeline."""
    runtime_enc, ref_vision = encoded["astronaut"]
    ref = prune_outputs(tiny_llava_model, ref_vision, "fastervlm", 64)
    monkeypatch.setattr(baselines, "np", NumpyWith(sort=np.asarray))
    got = pipeline.prune_encoded(runtime_enc, 64, "fastervlm")
    assert sorted(got.kept.tolist()) == sorted(ref.kept.tolist())  # the same set, in rank order
    assert not np.array_equal(got.kept, ref.kept.numpy())


def test_negative_control_merge_after_projector(pipeline, encoded, tiny_llava_model, monkeypatch) -> None:
    """The pipeline merging projected embeddings (projector before the strategy, none after) keeps the
    same tokens but fails the embedding tolerance."""
    runtime_enc, ref_vision = encoded["coffee"]
    ref = prune_outputs(tiny_llava_model, ref_vision, "entropy", 64)
    projected = dataclasses.replace(runtime_enc, features=pipeline.projector(runtime_enc.features))
    monkeypatch.setattr(pipeline, "projector", lambda rows: rows)
    got = pipeline.prune_encoded(projected, 64, "entropy")
    np.testing.assert_array_equal(got.kept, ref.kept.numpy())
    assert not np.allclose(got.embeddings, ref.embeddings.numpy(), rtol=0, atol=EMBED_ATOL)


def test_negative_control_zero_based_layers(pipeline, encoded, tiny_llava_model) -> None:
    """Reading layer l from index l (0-based ranges) changes the choice for some image."""
    differs = 0
    for runtime_enc, ref_vision in encoded.values():
        ref = prune_outputs(tiny_llava_model, ref_vision, "entropy", 64)
        shifted = pipeline.prune_encoded(runtime_enc, 64, "entropy", shallow=(7, 9), deep=(21, 22))
        differs += not np.array_equal(shifted.kept, ref.kept.numpy())
    assert differs >= len(encoded) // 2


def test_visionzip_dominant_margin(encoded) -> None:
    """VisionZip's dominant set is decided by head-summed S^f with a clear margin too."""
    for runtime_enc, ref_vision in encoded.values():
        summed = ref_vision.cls_attn[0, -1].double().sum(0).numpy()
        rt = runtime_enc.cls_attn[-1].astype(np.float64).sum(0)
        for budget in BUDGETS:
            dominant = budget - (5 * budget + 16) // 32
            assert topk_is_decided(summed, rt, dominant)


def test_projector_of_reference_tokens(pipeline, encoded, tiny_llava_model) -> None:
    """Same tokens in, same embeddings out: the ONNX projector equals HF's on reference tokens."""
    _, ref_vision = encoded["chelsea"]
    ref = prune_outputs(tiny_llava_model, ref_vision, "entropy", 128)
    with torch.no_grad():
        expected = tiny_llava_model.model.multi_modal_projector(ref.tokens).numpy()
    np.testing.assert_allclose(pipeline.projector(ref.tokens.numpy().astype(np.float32)), expected, atol=EMBED_ATOL)
