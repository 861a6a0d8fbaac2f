"""The full-size-shaped random LLaVA writer (tools/modelkit/shape_checkpoint.py) on a reduced ShapeSpec.

The reduced spec keeps what the tools downstream rely on (vocab 32064, LLaMA's 32,000-piece
tokenizer layout, <image> = 32000, <pad> = 32001, 336 px / patch 14) at small widths, and a small
shard size, so that several shards are written in about a second.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools.modelkit.shape_checkpoint import (
    INDEX_NAME,
    SHAPES,
    ShapeSpec,
    layout_name,
    llava_config,
    meta_tensors,
    vision_tensors,
    write_shape_checkpoint,
    write_weights,
)

SMALL = ShapeSpec(
    "small", text_hidden=128, text_intermediate=1024, text_layers=32, text_heads=4, text_kv_heads=2,
    vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=4, projection_dim=64,
)
SHARD_BYTES = 8_400_000  # just above the 32064 x 128 fp16 embedding (8.2 MB): 7 shards
PROMPT = "USER: <image>\nWhat is shown in this image? Describe it in detail. ASSISTANT:"
PLAIN_TEXTS = (  # no leading space: HF's legacy Metaspace and SentencePiece differ there, for LLaMA too
    "What is shown in this image? Describe it in detail.",
    "USER: How many people are there?\nASSISTANT: Two people, 12 chairs and a dog.",
    "Ünïcödé, 日本語 and tabs\tare byte-fallback pieces.",
)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained 32,000-piece tokenizer.model, built once for the module (~3 s)."""
    from tools.modelkit.llama_tokenizer import train_llama_spm

    return train_llama_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def checkpoints(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SMALL checkpoint in both layouts."""
    root = tmp_path_factory.mktemp("shape")
    return {layout: write_shape_checkpoint(root / layout, SMALL, layout=layout, shard_bytes=SHARD_BYTES,
                                           tokenizer_model=sp_model) for layout in ("hub", "transformers5")}


def _index(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / INDEX_NAME).read_text())


def test_real_shapes_are_llava_hf_configs() -> None:
    s7, s13 = SHAPES["llava-1.5-7b"], SHAPES["llava-1.5-13b"]
    assert (s7.text_hidden, s7.text_intermediate, s7.text_layers, s7.text_heads, s7.text_kv_heads) == (
        4096, 11008, 32, 32, 32)
    assert (s13.text_hidden, s13.text_intermediate, s13.text_layers, s13.text_heads, s13.text_kv_heads) == (
        5120, 13824, 40, 40, 40)
    for s in (s7, s13):
        assert (s.vocab_size, s.max_position_embeddings, s.rms_norm_eps, s.rope_theta) == (32064, 4096, 1e-5, 10000.0)
        assert (s.vision_hidden, s.vision_intermediate, s.vision_layers, s.vision_heads) == (1024, 4096, 24, 16)
        assert (s.image_size, s.patch_size, s.projection_dim, s.vision_layer_norm_eps) == (336, 14, 768, 1e-5)
        assert s.image_seq_length == 576
    config = llava_config(s7)
    assert (config.image_token_index, config.pad_token_id, config.image_seq_length) == (32000, 32001, 576)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.projector_hidden_act == "gelu" and config.vision_config.hidden_act == "quick_gelu"
    text = config.text_config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id, text.tie_word_embeddings) == (1, 2, 32001, False)


def test_7b_parameter_count_from_meta_shapes() -> None:
    shapes = meta_tensors(llava_config(SHAPES["llava-1.5-7b"]))
    # LLaVA-1.5-7B: Vicuna-7B with 32064 rows 6,738,939,904 + CLIP-L/336 303,507,456 + projector 20,979,712
    assert sum(int(np.prod(shape)) for shape, _ in shapes.values()) == 7_063_427_072
    assert shapes["model.language_model.embed_tokens.weight"][0] == (32064, 4096)
    assert shapes["model.multi_modal_projector.linear_1.weight"][0] == (4096, 1024)


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_layout_loads_without_missing_or_unexpected_keys(checkpoints: dict[str, Path], layout: str) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(checkpoints[layout], output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    assert model.dtype == torch.float16
    config = model.config
    assert model.lm_head.weight.shape == (config.text_config.vocab_size, SMALL.text_hidden) == (32064, 128)
    assert model.model.language_model.embed_tokens.weight.shape == (32064, 128)
    assert len(model.model.language_model.layers) == SMALL.text_layers
    assert model.model.multi_modal_projector.linear_2.weight.shape == (SMALL.text_hidden, SMALL.text_hidden)
    norm = model.model.language_model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    embed = model.model.language_model.embed_tokens.weight.detach().float()
    assert abs(float(embed.std()) - 0.02) < 1e-3 and abs(float(embed.mean())) < 1e-3


def test_layout_names(checkpoints: dict[str, Path]) -> None:
    hub = set(_index(checkpoints["hub"])["weight_map"])
    for name in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
                 "language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.norm.weight",
                 "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias",
                 "vision_tower.vision_model.embeddings.patch_embedding.weight",
                 "vision_tower.vision_model.encoder.layers.1.self_attn.k_proj.weight",
                 "vision_tower.vision_model.post_layernorm.weight"):
        assert name in hub
    assert all(n.split(".")[0] in ("language_model", "vision_tower", "multi_modal_projector") for n in hub)
    names = set(meta_tensors(llava_config(SMALL)))
    assert set(_index(checkpoints["transformers5"])["weight_map"]) == names
    assert {layout_name(n, "hub") for n in names} == hub


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_shards_and_index(checkpoints: dict[str, Path], layout: str) -> None:
    from safetensors import safe_open

    ckpt = checkpoints[layout]
    index = _index(ckpt)
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 4 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    seen: list[str] = []
    total = 0
    for path in shards:
        assert path.stat().st_size <= SHARD_BYTES
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                array = f.get_tensor(name)
                assert array.dtype == np.float16 and index["weight_map"][name] == path.name
                seen.append(name)
                total += array.nbytes
    assert sorted(seen) == sorted(index["weight_map"])  # every tensor exactly once
    assert index["metadata"]["total_size"] == total
    assert not list(ckpt.glob(".*.tmp"))


def _traced_peak(out: Path, shard_bytes: int) -> tuple[int, int]:
    """(traced peak bytes, total bytes) of writing SMALL's weights into ``out``."""
    config = llava_config(SMALL)
    meta_tensors(config)  # imports and first-call caches outside the measurement
    out.mkdir()
    tracemalloc.start()
    try:
        index = write_weights(out, config, "hub", shard_bytes, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, index["metadata"]["total_size"]


def test_writing_holds_about_one_shard(tmp_path: Path) -> None:
    vision = sum(a.nbytes for a in vision_tensors(llava_config(SMALL), 0).values())
    bound = 3 * SHARD_BYTES + vision  # one shard's arrays (+ a bytes copy in safetensors < 0.8) + slack
    peak, total = _traced_peak(tmp_path / "sharded", SHARD_BYTES)
    assert peak <= bound, f"traced peak {peak} > {bound}"
    # negative control: the same measurement of a write holding everything at once (one shard) fails
    assert total > bound
    peak_all, _ = _traced_peak(tmp_path / "single", 10 * total)
    assert peak_all > bound, f"holding all tensors peaked at {peak_all}, not above {bound}"


def test_tokenizer_layout(checkpoints: dict[str, Path]) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from export.llm_gguf.vocab import read_spm_vocab

    ckpt = checkpoints["hub"]
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    assert sp.vocab_size() == 32000
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] and len(tok) == 32002
    config = json.loads((ckpt / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 32064
    ids = tok(PROMPT)["input_ids"]
    assert 15 <= len(ids) <= 40 and ids[0] == 1 and ids.count(32000) == 1
    for text in PLAIN_TEXTS:
        assert tok(text)["input_ids"] == [1, *sp.encode(text)], text
    vocab = read_spm_vocab(ckpt, 32064, config["text_config"])
    assert len(vocab.tokens) == 32064 and vocab.tokens[32000] == b"<image>" and vocab.tokens[32001] == b"<pad>"
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 32001}


def test_padded_tokenizer_fillers_are_never_produced(tmp_path: Path) -> None:
    import sentencepiece as spm

    from tools.modelkit.llama_tokenizer import filler_piece, train_llama_spm
    from tools.modelkit.llava_parts import llava_tokenizer

    model = train_llama_spm(tmp_path, max_chars=20_000)  # too little text for 32,000 merges
    sp = spm.SentencePieceProcessor(model_file=str(model))
    first_filler = sp.piece_to_id(filler_piece(0))
    assert sp.vocab_size() == 32000 and 1000 < first_filler < 32000
    assert all(not sp.is_unused(i) and not sp.is_control(i) for i in range(first_filler, 32000, 997))
    tok = llava_tokenizer(tmp_path)
    for text in (*PLAIN_TEXTS, filler_piece(0), "a" + filler_piece(1) + filler_piece(2), filler_piece(3)[:2]):
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert max(ids) < first_filler, text


def test_cli_bad_arguments_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tools.make_tiny_llava import main

    for argv in (["--shape", "llava-9b"], ["--layout", "hub"], ["--shape", "llava-1.5-7b", "--text-layers", "0"],
                 ["--shape", "llava-1.5-7b", "--shard-gb", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "error:" in err, (argv, err)
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "out"), "--shape", "llava-1.5-7b", "--shard-gb", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embed_tokens.weight needs 262668" in err, err
    assert not (tmp_path / "out").exists()


def test_shape_spec_is_validated() -> None:
    from runtime.errors import InputError

    with pytest.raises(InputError, match="not divisible"):
        ShapeSpec("bad", text_hidden=65, text_intermediate=128, text_layers=1, text_heads=4, text_kv_heads=4)
    with pytest.raises(InputError, match="vocab_size"):
        ShapeSpec("bad", text_hidden=64, text_intermediate=128, text_layers=1, text_heads=4, text_kv_heads=4,
                  vocab_size=32000)
