"""export.llm: our HF -> GGUF converter and the EntropyPrune probe, checked against PyTorch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from export.bundle_writer import LOCK
from export.llm_gguf.converter import permute_qk, unpermute_qk
from runtime.bundle.manifest import EXPORT_ID_KEY, SCHEMA
from runtime.errors import InputError
from tests.bundle_files import member

PARITY_ATOL = 1e-3  # llama.cpp f32 (f32 KV, no flash attention) vs PyTorch float32 logits; seen ~1e-5
PROBE_ATOL = 1e-4  # probe hidden states, float32 on both sides; seen ~1e-6
QUANT_ATOL = 0.5  # q8_0 vs f32 logits of the tiny model (|logits| up to ~17): seen 0.32; Q4_0 gives 3.7
Q8_STEPS = 1.0  # |q8_0 - f32| per weight in steps of amax/127: rounding gives <= 0.5 (+ f16), seen 0.52
PROMPT = "USER: What is in this picture? ASSISTANT: A cat on a mat."
PRECISE = {"kv_type": "f32", "flash_attn": "off"}  # llama.cpp in float32 throughout


def _bundle(root: Path, vision: dict[str, Any] | None = None) -> Path:
    """A bundle directory with the minimal manifest export.clip would have written."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"schema": SCHEMA, "vision": {"projector_dim": 64} if vision is None else vision}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def exported(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``export.llm --quant f32`` of the tiny LLaVA into a bundle."""
    from export.llm import export_llm

    out = _bundle(tmp_path_factory.mktemp("llm_export") / "bundle")
    export_llm(str(tiny_llava_dir), quant="f32", out=out)
    return out


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    from runtime.llm.backend import LlamaBackend

    with LlamaBackend(path, n_ctx=128, **PRECISE) as backend:
        backend.eval_tokens(ids, output_all=True)
        return backend.logits(all_positions=True)


def _q8_steps(quantised: Path, reference: Path) -> dict[str, float]:
    """Per tensor: max |dequantised - f32| in q8_0 steps of the f32 tensor (max |w| / 127)."""
    from gguf.quants import dequantize

    got = {t.name: t for t in gguf.GGUFReader(quantised).tensors}
    ref = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(reference).tensors}
    assert sorted(got) == sorted(ref)
    steps = {}
    for name, want in ref.items():
        have = dequantize(np.asarray(got[name].data), got[name].tensor_type).reshape(want.shape)
        steps[name] = float(np.abs(have - want).max() / (np.abs(want).max() / 127))
    return steps


# --- q/k permutation ---------------------------------------------------------------------
def test_permute_hand_case() -> None:
    rows = np.arange(4, dtype=np.float32)[:, None]  # one head, d_head 4
    assert permute_qk(rows, 1)[:, 0].tolist() == [0, 2, 1, 3]


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_permute_matches_loop_and_inverts(n_head: int, half: int, cols: int) -> None:
    w = np.random.default_rng(n_head * 100 + half).standard_normal((n_head * 2 * half, cols)).astype(np.float32)
    expected = np.empty_like(w)
    d = 2 * half
    for h in range(n_head):  # llama.cpp row h*d + 2j + r  <-  HF row h*d + r*half + j
        for j in range(half):
            for r in range(2):
                expected[h * d + 2 * j + r] = w[h * d + r * half + j]
    np.testing.assert_array_equal(permute_qk(w, n_head), expected)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)


# --- the exported bundle -----------------------------------------------------------------
@pytest.mark.llm
def test_manifest_entry(exported: Path) -> None:
    from runtime.bundle.check import file_sha256 as sha256

    manifest = _manifest(exported)
    llm = manifest["llm"]
    assert manifest["vision"] == {"projector_dim": 64} and manifest["schema"] == SCHEMA  # kept
    folder = f"llm.{llm['export_id']}"
    assert (llm["gguf"], llm["quant"], llm["n_embd"], llm["n_vocab"]) == (f"{folder}/llm-f32.gguf", "f32", 64, 514)
    assert llm["sha256"] == sha256(exported / llm["gguf"]) and llm["registered"] is False
    probe = llm["probe"]
    assert (probe["gguf"], probe["weights"], probe["entropyprune_layer"], probe["layer"], probe["dtype"]) == (
        f"{folder}/probe.gguf",
        f"{folder}/probe_weights.npz",
        2,
        1,
        "f32",
    )
    assert probe["sha256"] == sha256(member(exported, "probe"))
    assert {p.name for p in exported.rglob(".*")} == {LOCK}, "no temporary files left behind"


@pytest.mark.llm
def test_gguf_metadata_and_vocab(exported: Path) -> None:
    reader = gguf.GGUFReader(member(exported, "llm"))

    def field(key: str) -> Any:
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (
        4,
        64,
        160,
    )
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.freq_base") == 10000.0 and field("llama.context_length") == 2048
    assert field("tokenizer.ggml.model") == "llama"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 514 and (tokens[512], tokens[513]) == ("<image>", "<pad>")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == types[512] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and tokens[3] == "<0x00>"
    assert [field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 513]
    assert field("tokenizer.ggml.add_bos_token") is True and "ASSISTANT" in field("tokenizer.chat_template")
    probe = gguf.GGUFReader(member(exported, "probe"))
    assert probe.get_field("llama.block_count").contents() == 1
    assert sorted(t.name for t in probe.tensors if not t.name.startswith("blk.0.")) == [
        "output_norm.weight",
        "token_embd.weight",
    ]


@pytest.mark.llm
def test_llama_cpp_logits_match_hf(exported: Path, tiny_llava_dir: Path, tiny_llava_model: Any, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from export.llm_gguf.converter import write_llama_gguf

    ids = AutoTokenizer.from_pretrained(tiny_llava_dir)(PROMPT).input_ids
    with torch.no_grad():
        expected = tiny_llava_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    actual = _llama_logits(member(exported, "llm"), ids)
    assert actual.shape == expected.shape == (len(ids), 514)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PARITY_ATOL, err_msg="llama.cpp vs HF logits")
    unpermuted = tmp_path / "no-permute.gguf"
    write_llama_gguf(tiny_llava_dir, unpermuted, "f32", permute=False)
    wrong = _llama_logits(unpermuted, ids)
    assert not np.allclose(wrong, expected, rtol=0, atol=PARITY_ATOL), "negative control: no q/k permutation"


@pytest.mark.llm
def test_probe_matches_hf_input_layernorm(exported: Path, tiny_llava_dir: Path, tiny_llava_model: Any) -> None:
    import torch
    from transformers import AutoTokenizer

    from runtime.llm.probe import LlamaProbe

    p = _manifest(exported)["llm"]["probe"]["entropyprune_layer"]
    tok = AutoTokenizer.from_pretrained(tiny_llava_dir)
    prefix, suffix = tok("USER: ").input_ids, tok("What is it? ASSISTANT:").input_ids[1:]
    rows = (np.random.default_rng(0).standard_normal((576, 64)) * 0.05).astype(np.float32)
    with LlamaProbe(member(exported, "probe"), member(exported, "probe_weights"), n_ctx=640, **PRECISE) as probe:
        out = probe.bind(prefix, suffix)(rows)
    lm = tiny_llava_model.model.language_model
    with torch.no_grad():
        embeds = torch.cat(
            [lm.embed_tokens(torch.tensor(prefix)), torch.from_numpy(rows), lm.embed_tokens(torch.tensor(suffix))]
        )[None]
        states = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        expected = lm.layers[p - 1].input_layernorm(states[p - 1])[0].numpy()
        off_by_one = lm.layers[p].input_layernorm(states[p])[0].numpy()
    assert out.hidden.shape == expected.shape == (len(prefix) + 576 + len(suffix), 64)
    assert (out.image_start, out.num_image, out.n_head, out.n_head_kv, out.rope_theta) == (len(prefix), 576, 4, 2, 1e4)
    np.testing.assert_allclose(out.hidden, expected, rtol=0, atol=PROBE_ATOL, err_msg="probe vs HF input_layernorm")
    assert not np.allclose(out.hidden, off_by_one, rtol=0, atol=PROBE_ATOL), "negative control: layer P"
    attn = lm.layers[p - 1].self_attn
    np.testing.assert_array_equal(out.q_weight, attn.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(out.k_weight, attn.k_proj.weight.detach().numpy())


def _renamed_checkpoint(src: Path, dst: Path, style: str) -> Path:
    """The tiny checkpoint with other key spellings: transformers>=4.52 LLaVA names in two
    shards plus an index (``llava-new``), or a plain LlamaForCausalLM (``llama``)."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k.startswith("language_model.")}
    prefix = "model.language_model." if style == "llava-new" else "model."
    renamed = {
        ("lm_head.weight" if k.endswith("lm_head.weight") else prefix + k.removeprefix("language_model.model.")): v
        for k, v in tensors.items()
    }
    if style == "llama":
        (dst / "config.json").write_text(json.dumps(config["text_config"]))
        save_file(renamed, dst / "model.safetensors")
        return dst
    (dst / "config.json").write_text(json.dumps(config))
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: renamed[k] for k in names}, dst / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


@pytest.mark.llm
@pytest.mark.parametrize("style", ["llava-new", "llama"])
def test_other_key_spellings_convert_identically(
    exported: Path, tiny_llava_dir: Path, tmp_path: Path, style: str
) -> None:
    from export.llm_gguf.converter import write_llama_gguf

    checkpoint = _renamed_checkpoint(tiny_llava_dir, tmp_path / style, style)
    write_llama_gguf(checkpoint, tmp_path / "out.gguf", "f32")
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    reference = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(member(exported, "llm")).tensors}
    assert sorted(ours) == sorted(reference)
    for name, data in reference.items():
        np.testing.assert_array_equal(ours[name], data, err_msg=name)


@pytest.mark.llm
def test_quantized_export_and_force(exported: Path, tiny_llava_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from export.llm import export_llm
    from export.llm_gguf.quantize import QUANTS

    out = _bundle(tmp_path / "q8")
    entry = export_llm(str(tiny_llava_dir), quant="q8_0", out=out).entry
    assert (entry["quant"], entry["probe"]["dtype"]) == ("q8_0", "f16")
    reader = gguf.GGUFReader(member(out, "llm"))
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    ids = [1, 423, 488, 453, 265, 327]
    reference = _llama_logits(member(exported, "llm"), ids)
    np.testing.assert_allclose(
        _llama_logits(member(out, "llm"), ids), reference, rtol=0, atol=QUANT_ATOL, err_msg="q8_0 vs f32"
    )
    # Tensor by tensor within one q8_0 step of the f32 export: a wrong tensor in the quantised path
    # (e.g. q/k rows unpermuted in the f16 intermediate: +0.03 on the logits, inside QUANT_ATOL) fails.
    steps = _q8_steps(member(out, "llm"), member(exported, "llm"))
    assert max(steps.values()) <= Q8_STEPS, {k: round(v, 2) for k, v in steps.items() if v > Q8_STEPS}
    # Negative control: the same export with llama_ftype 2 (Q4_0) where 7 (Q8_0) belongs, a plausible
    # slip in the QUANTS table (export.llm_gguf.quantize), must fail the same bound.
    monkeypatch.setitem(QUANTS, "q8_0", 2)
    coarse = _bundle(tmp_path / "q8-wrong-ftype")
    export_llm(str(tiny_llava_dir), quant="q8_0", out=coarse)
    coarse_reader = gguf.GGUFReader(member(coarse, "llm"))
    assert coarse_reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert not np.allclose(_llama_logits(member(coarse, "llm"), ids), reference, rtol=0, atol=QUANT_ATOL)
    assert max(_q8_steps(member(coarse, "llm"), member(exported, "llm")).values()) > Q8_STEPS
    monkeypatch.undo()
    with pytest.raises(InputError, match="--force"):
        export_llm(str(tiny_llava_dir), quant="q8_0", out=out)
    assert {p.name for p in out.rglob(".*")} == {LOCK}, "no temporary files left behind"
    assert [p.name for p in out.glob("llm.*")] == [f"llm.{entry['export_id']}"], "no staging folder left"


@pytest.mark.llm
def test_register_existing_gguf(
    exported: Path, tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.llm import main

    out = _bundle(tmp_path / "registered", vision={})
    assert main(["--model", str(tiny_llava_dir), "--gguf", str(member(exported, "llm")), "--out", str(out)]) == 0
    assert "n_embd check skipped" in capsys.readouterr().err
    llm = _manifest(out)["llm"]
    assert llm["gguf"] == f"llm.{llm['export_id']}/llm-f32.gguf" and llm["n_embd"] == 64  # inside: can be moved
    assert llm["registered"] is True
    assert os.path.samefile(member(out, "llm"), member(exported, "llm"))  # a hard link, no second copy
    assert llm["source"] == str(member(exported, "llm").resolve())
    cut, original = (gguf.GGUFReader(member(b, "probe")) for b in (out, exported))  # same cut, other export id
    assert [(t.name, t.data.tobytes()) for t in cut.tensors] == [(t.name, t.data.tobytes()) for t in original.tensors]
    assert cut.get_field(EXPORT_ID_KEY).contents() == llm["export_id"] != _manifest(exported)["llm"]["export_id"]


@pytest.mark.llm
@pytest.mark.parametrize("case", ["no-manifest", "unknown-alias", "missing-gguf", "width", "exists",
                                  "exists-gguf", "quant+gguf"])
def test_cli_errors_exit_2_with_one_line(
    case: str, exported: Path, tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.llm import main

    gguf_file = str(member(exported, "llm"))
    args, expected = {
        "no-manifest": (["--model", str(tiny_llava_dir), "--out", str(tmp_path / "empty")], "run export.clip first"),
        "unknown-alias": (["--model", "llava-9", "--gguf", gguf_file, "--out", str(tmp_path)], "unknown model"),
        "missing-gguf": (
            ["--model", str(tiny_llava_dir), "--gguf", str(tmp_path / "x.gguf"), "--out", str(_bundle(tmp_path / "b"))],
            "no GGUF file",
        ),
        "width": (
            [
                "--model",
                str(tiny_llava_dir),
                "--gguf",
                gguf_file,
                "--out",
                str(_bundle(tmp_path / "w", vision={"projector_dim": 128})),
            ],
            "n_embd 64",
        ),
        "exists": (["--model", str(tiny_llava_dir), "--quant", "f32", "--out", str(exported)], "--force"),
        "exists-gguf": (["--gguf", gguf_file, "--out", str(exported)], "already has a language model"),
        "quant+gguf": (["--model", str(tiny_llava_dir), "--quant", "f32", "--gguf", gguf_file], "does not apply"),
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("export.llm: error:") and expected in err[-1], err
    assert not any("Traceback" in line for line in err)


@pytest.mark.llm
def test_bundle_openers_check_the_projector_width(exported: Path) -> None:
    from runtime.errors import BundleError
    from runtime.llm.bundle import open_language_model
    from runtime.llm.probe import open_probe

    manifest = _manifest(exported)
    with open_language_model(exported, manifest, n_ctx=64) as backend:
        assert backend.n_embd == 64
    with open_probe(exported, manifest, n_ctx=64) as probe:
        assert probe.weights.layer == 1 and probe.backend.embeddings_mode
    wider = {**manifest, "projector": {"out_dim": 128}}  # projector.out_dim wins over vision.projector_dim
    for opener in (open_language_model, open_probe):
        with pytest.raises(BundleError, match="n_embd 64 but the projector outputs 128"):
            opener(exported, wider, n_ctx=64)
    with pytest.raises(BundleError, match="no language model"):
        open_language_model(exported, {k: v for k, v in manifest.items() if k != "llm"})
    probe = manifest["llm"]["probe"]
    deeper = {**manifest, "llm": {**manifest["llm"], "probe": {**probe, "layer": 2, "entropyprune_layer": 3}}}
    with pytest.raises(BundleError, match="holds layer 1 but the manifest records probe layer 2"):
        open_probe(exported, deeper, n_ctx=64)
    inconsistent = {**manifest, "llm": {**manifest["llm"], "probe": {**probe, "layer": 2}}}  # P = 2 says layer 1
    with pytest.raises(BundleError, match="layer 2 must be entropyprune_layer - 1"):
        open_probe(exported, inconsistent, n_ctx=64)


@pytest.mark.llm
def test_llava_prompt_with_injected_rows_matches_hf(
    exported: Path, tiny_llava_dir: Path, tiny_llava_model: Any
) -> None:
    """Template -> prefix ids + image rows + suffix ids in llama.cpp = HF on the same inputs_embeds."""
    import torch

    from runtime.llm.backend import LlamaBackend
    from runtime.llm.template import Conversation, conversation_segments, encode_prompt

    rows = (np.random.default_rng(1).standard_normal((64, 64)) * 0.05).astype(np.float32)
    with LlamaBackend(member(exported, "llm"), n_ctx=256, **PRECISE) as backend:
        tokens = encode_prompt(conversation_segments(Conversation().ask("What is it?")), backend)
        backend.eval_tokens(tokens.prefix)
        backend.eval_embeddings(rows)
        backend.eval_tokens(tokens.suffix)
        assert backend.n_past == len(tokens.prefix) + 64 + len(tokens.suffix)
        actual = backend.logits()
    lm = tiny_llava_model.model.language_model
    embed = lm.embed_tokens
    with torch.no_grad():
        embeds = torch.cat(
            [embed(torch.tensor(tokens.prefix)), torch.from_numpy(rows), embed(torch.tensor(tokens.suffix))]
        )
        expected = tiny_llava_model.lm_head(lm(inputs_embeds=embeds[None]).last_hidden_state)[0, -1].numpy()
        reordered = torch.cat(
            [torch.from_numpy(rows), embed(torch.tensor(tokens.prefix)), embed(torch.tensor(tokens.suffix))]
        )
        wrong = tiny_llava_model.lm_head(lm(inputs_embeds=reordered[None]).last_hidden_state)[0, -1].numpy()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PARITY_ATOL, err_msg="injected prompt vs HF")
    assert not np.allclose(wrong, expected, rtol=0, atol=PARITY_ATOL), "negative control: image at the wrong place"


@pytest.mark.llm
def test_probe_from_manifest(exported: Path) -> None:
    from types import SimpleNamespace

    from runtime.llm.probe import probe_from_manifest
    from runtime.types import ProbeOutput

    data = _manifest(exported)
    manifest = SimpleNamespace(root=exported, data=data, llm=data["llm"], chat_template="llava-1.5")
    probe = probe_from_manifest(manifest, n_ctx=1024)
    rows = np.zeros((576, 64), np.float32)
    out = probe(rows)
    assert isinstance(out, ProbeOutput) and out.num_image == 576
    assert out.hidden.shape[0] > out.image_start + 576 > out.image_start > 1  # BOS + system text first
    assert probe_from_manifest(SimpleNamespace(root=exported, data={}, llm=None, chat_template="llava-1.5")) is None
