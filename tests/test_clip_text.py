"""runtime.clip_text: CLIP's tokenizer, text tower and image projection of the bundle equal Hugging Face's
(cdpruner's T and V, method.md §7), and a bundle without (or with a broken) text tower is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, normalizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing

from runtime.bundle.manifest import load_manifest
from runtime.clip_text import ClipSpace, load_tokenizer, open_clip_space, tokenize_question
from runtime.errors import BundleError, InputError

# float32 onnxruntime vs PyTorch on the same ids/features (the export's own bound; measured ~1e-6)
MAX_ABS = 1e-5
LONG = " ".join(["What colour is the small red car left of the tree?"] * 12)  # > 2 × 77 tokens
QUESTIONS = {"short": "What is in the image?", "mark": "?", "long": LONG,
             "mixed": "Is the CAFÉ's sign   red, or 2 shades of blue? 😀"}
TRICKY = [
    "Café crème brûlée", "naïve ÜBER Straße façade", "😀 🐱‍👤 cat 👍🏽!", "猫在哪里？",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a \t\n   b      c", "  leading and trailing  ", "WhAt Is ThIs ObJeCt?", "!!!???...,,,;;:: ()[]{}",
    "1234567890 3.14159 2024-12-03 10,000", "what's it's they're we've I'm you'll he'd", "e-mail @user #tag $5 50%",
    "<|endoftext|> inside <|startoftext|>", "x" * 300, "Ünïcödé ÅNGSTRÖM", "tab\there", "ﬁ ligature ½",
]


def hf_segments(ids: list[int], positions: int = 77, pad: int = 0) -> dict[str, torch.Tensor]:
    """The released CDPruner's cut, written out independently of the runtime: pad the row to a multiple
    of ``positions`` with ``pad`` (mask 0), reshape."""
    m = -(-len(ids) // positions)
    input_ids = np.full(m * positions, pad, np.int64)
    mask = np.zeros(m * positions, np.int64)
    input_ids[: len(ids)], mask[: len(ids)] = ids, 1
    return {"input_ids": torch.from_numpy(input_ids.reshape(m, positions)),
            "attention_mask": torch.from_numpy(mask.reshape(m, positions))}


@pytest.fixture(scope="module")
def space(tiny_bundle: Path) -> ClipSpace:
    return open_clip_space(load_manifest(tiny_bundle))


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_clip_dir: Path):
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast.from_pretrained(tiny_clip_dir)


def hf_text(clip, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        out = clip.get_text_features(**feeds)
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


@pytest.mark.parametrize("case", sorted(QUESTIONS))
def test_text_equals_get_text_features(space: ClipSpace, tiny_clip_model, hf_tokenizer, case: str) -> None:
    ids = hf_tokenizer(QUESTIONS[case]).input_ids
    expected = hf_text(tiny_clip_model, hf_segments(ids))
    got = space.text(QUESTIONS[case])
    assert got.dtype == np.float32 and got.shape == expected.shape == (-(-len(ids) // 77), 32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=MAX_ABS, err_msg=case)
    if case == "long":
        assert got.shape[0] == 3  # every segment of a question longer than 77 tokens


def test_negative_control_last_position_pooling_fails(space: ClipSpace, tiny_clip_model, hf_tokenizer) -> None:
    """Pooling each segment at its last position (as if every segment ended in the end token) is another
    function: the long question's first segment has no end token, CLIP's legacy argmax pools elsewhere."""
    feeds = hf_segments(hf_tokenizer(LONG).input_ids)
    with torch.no_grad():
        hidden = tiny_clip_model.text_model(**feeds).last_hidden_state
        wrong = tiny_clip_model.text_projection(hidden[:, -1]).numpy()
    assert np.abs(space.text(LONG)[0] - wrong[0]).max() > 100 * MAX_ABS


@pytest.fixture(scope="module")
def block_features(tiny_bundle: Path, tiny_clip_model) -> dict[str, np.ndarray]:
    """Block f's patch features of CLIP's own vision tower (f = the bundle's feature layer) and of the last block."""
    from export.validate import validation_inputs

    f = load_manifest(tiny_bundle).vision.feature_layer
    pixels = torch.from_numpy(validation_inputs(336)["pattern-b1"])
    with torch.no_grad():
        hidden = tiny_clip_model.vision_model(pixels, output_hidden_states=True).hidden_states
    return {"f": hidden[f][0, 1:].numpy(), "last": hidden[-1][0, 1:].numpy()}


def hf_image(clip, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return clip.visual_projection(clip.vision_model.post_layernorm(torch.from_numpy(features))).numpy()


def test_image_equals_visual_projection_of_post_layernorm(space: ClipSpace, tiny_clip_model, block_features) -> None:
    expected = hf_image(tiny_clip_model, block_features["f"])
    got = space.image(block_features["f"])
    assert got.dtype == np.float32 and got.shape == expected.shape == (576, 32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=MAX_ABS)
    # negative controls: the last block's features, and the projection without post_layernorm
    assert np.abs(space.image(block_features["last"]) - expected).max() > 100 * MAX_ABS
    with torch.no_grad():
        no_norm = tiny_clip_model.visual_projection(torch.from_numpy(block_features["f"])).numpy()
    assert np.abs(got - no_norm).max() > 100 * MAX_ABS


def test_bundle_vision_features_are_clips_own(tiny_bundle: Path, block_features) -> None:
    """vision.onnx (LLaVA's tower) gives CLIP's block-f features: the checkpoints share the tower."""
    from export.validate import run_onnx, validation_inputs
    from tests.bundle_files import member

    features = run_onnx(member(tiny_bundle, "vision"), {"pixel_values": validation_inputs(336)["pattern-b1"]})
    np.testing.assert_allclose(features["features"][0], block_features["f"], rtol=0, atol=1e-4)


def test_runtime_tokenizer_equals_clip_tokenizer_fast(space: ClipSpace, hf_tokenizer) -> None:
    for text in TRICKY:
        expected = hf_tokenizer(text).input_ids
        assert space.tokenizer.encode(text).ids == expected, text
        tokens = space.tokens(text)
        assert tokens.input_ids[tokens.attention_mask == 1].tolist() == expected, text
        assert tokens.num_tokens == len(expected)
    assert max(len(hf_tokenizer(t).input_ids) for t in TRICKY) > 77  # truncation would have shown


def test_negative_control_tokenizer_without_lower_casing_fails(tiny_bundle: Path, hf_tokenizer) -> None:
    manifest = load_manifest(tiny_bundle)
    data = json.loads((tiny_bundle / manifest.text_tower.files["tokenizer"]).read_text(encoding="utf-8"))
    cased = Tokenizer.from_str(json.dumps(data))
    # CLIP's normaliser without its Lowercase step
    cased.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")])
    differ = [t for t in TRICKY if cased.encode(t).ids != hf_tokenizer(t).input_ids]
    assert "WhAt Is ThIs ObJeCt?" in differ


def _word_tokenizer() -> Tokenizer:
    """Words a..h -> ids 1..8 with start [S]=10 and end [E]=11 added, as a CLIP tokenizer adds its own."""
    vocab = {w: i + 1 for i, w in enumerate("abcdefgh")} | {"[UNK]": 9, "[S]": 10, "[E]": 11}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(single="[S] $A [E]", special_tokens=[("[S]", 10), ("[E]", 11)])
    return tokenizer


def test_segments_by_hand() -> None:
    tokens = tokenize_question(_word_tokenizer(), "a b c d e", max_positions=4, pad_id=0)
    assert tokens.input_ids.dtype == np.int64 and tokens.attention_mask.dtype == np.int64
    np.testing.assert_array_equal(tokens.input_ids, [[10, 1, 2, 3], [4, 5, 11, 0]])
    np.testing.assert_array_equal(tokens.attention_mask, [[1, 1, 1, 1], [1, 1, 1, 0]])
    exact = tokenize_question(_word_tokenizer(), "a b c d e f", max_positions=4, pad_id=7)
    np.testing.assert_array_equal(exact.input_ids, [[10, 1, 2, 3], [4, 5, 6, 11]])  # 8 tokens: no padding
    short = tokenize_question(_word_tokenizer(), "h", max_positions=4, pad_id=7)
    np.testing.assert_array_equal(short.input_ids, [[10, 8, 11, 7]])
    np.testing.assert_array_equal(short.attention_mask, [[1, 1, 1, 0]])


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_is_one_line(question: str) -> None:
    with pytest.raises(InputError, match="empty question") as info:
        tokenize_question(_word_tokenizer(), question)
    assert "\n" not in str(info.value)


def test_a_truncating_tokenizer_is_refused() -> None:
    tokenizer = _word_tokenizer()
    tokenizer.enable_truncation(4)
    with pytest.raises(ValueError, match="truncates or pads"):
        tokenize_question(tokenizer, "a b c d e", max_positions=4)


def _without_text_tower(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    del data["text_tower"]
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def test_missing_text_tower_names_the_command(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _without_text_tower(tiny_bundle, tmp_path)
    manifest = load_manifest(bundle)
    assert manifest.text_tower is None
    for opener in (open_clip_space, ClipSpace):
        with pytest.raises(BundleError) as info:
            opener(manifest)
        message = str(info.value)
        assert "\n" not in message and "cdpruner" in message
        assert f"python -m export.clip --model {manifest.data['source']['model']} --out {bundle} --text-tower-only" \
            in message


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(max_positions="77"), r"text_tower.max_positions must be an integer"),
    (lambda t: t.pop("pad_id"), r"text_tower: missing fields \['pad_id'\]"),
    (lambda t: t["files"].pop("tokenizer"), r"text_tower.files lacks roles \['tokenizer'\]"),
    (lambda t: t["sizes"].clear(), r"records no size/sha256"),
    (lambda t: t.update(extra=1), r"text_tower: unknown fields \['extra'\]"),
    (lambda t: t.update(files=[]), r"text_tower.files must be an object"),
])
def test_malformed_text_tower_is_one_line(tiny_bundle: Path, tmp_path: Path, change, match: str) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    change(data["text_tower"])
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=match) as info:
        load_manifest(bundle)
    assert "\n" not in str(info.value)


def test_broken_text_files_are_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = load_manifest(bundle)
    tokenizer = bundle / manifest.text_tower.files["tokenizer"]
    tokenizer.write_bytes(b"{" + b" " * (tokenizer.stat().st_size - 1))  # same size, not a tokenizer
    with pytest.raises(BundleError, match="is not a tokenizers file.*--text-tower-only --force") as info:
        ClipSpace(manifest)
    assert "\n" not in str(info.value)
    (bundle / manifest.text_tower.files["image_projection"]).unlink()
    with pytest.raises(BundleError, match="is missing .*image_projection.onnx"):
        ClipSpace(manifest)


def test_int8_text_is_close_and_needs_its_file(tiny_bundle: Path, tmp_path: Path, space: ClipSpace) -> None:
    int8 = ClipSpace(load_manifest(tiny_bundle), int8=True)
    a, b = space.text(LONG), int8.text(LONG)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine.min() > 0.99
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    del data["text_tower"]["files"]["text_int8"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="no text.int8.onnx.*--text-tower-only --force --int8"):
        ClipSpace(load_manifest(bundle), int8=True)


def test_prune_check_hashes_the_text_tower(tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.bundle.check import check_bundle, recorded_files, require_intact

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = load_manifest(bundle)
    names = {r.name for r in recorded_files(manifest)}
    assert set(manifest.text_tower.files.values()) <= names
    require_intact(manifest, check_bundle(manifest))  # as exported
    target = bundle / manifest.text_tower.files["tokenizer"]
    data = bytearray(target.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\n")  # one byte, same size
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tokenizer.json \(changed\).*export.clip --text-tower-only") as info:
        require_intact(manifest, check_bundle(manifest))
    assert "\n" not in str(info.value)


def test_load_tokenizer_turns_truncation_off(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    saved = Tokenizer.from_file(str(tiny_bundle / manifest.text_tower.files["tokenizer"]))
    saved.enable_truncation(77)
    path = tmp_path / "tokenizer.json"
    saved.save(str(path))
    assert len(load_tokenizer(path, "repair").encode(LONG).ids) > 77
