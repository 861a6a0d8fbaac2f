"""Our own converter of LLaVA's LLaMA or Mistral language model to GGUF (llama.cpp's ``llama`` architecture).

The checkpoint is read lazily with ``safetensors.safe_open``, one tensor at a time, and streamed
into the GGUF file, so a 7B model converts in a few GB of RAM. Tensor names and the q/k row
permutation follow llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``): llama.cpp applies RoPE
to adjacent pairs (GPT-J style) while Hugging Face rotates halves, so the rows of each q/k head
are interleaved here. Weights are written as f32 (``dtype="f32"``) or f16 (2-D) / f32 (1-D norms).

Mistral-7B (LLaVA-NeXT Mistral's ``text_config``, ``model_type`` "mistral") is the LLaMA graph with
grouped-query attention (8 key/value heads for 32 query heads) and RoPE base 1e6, so it is written as
``llama`` too, as ``convert_hf_to_gguf.py`` does: k rows are permuted per key/value head and
``rope_freq_base`` comes from the config. llama.cpp's ``llama`` has no sliding-window attention, so a
Mistral config with ``sliding_window`` set (Mistral-7B v0.1's 4096) is refused; v0.2 (LLaVA-NeXT's) has none.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from export.checkpoint import Checkpoint
from export.llm_gguf.vocab import SpmVocab, read_spm_vocab
from runtime.atomic import atomic_path
from runtime.bundle.manifest import EXPORT_ID_KEY
from runtime.errors import ModelNotFoundError

# decoder-prefix / lm_head spellings: transformers >= 4.52 LLaVA, original llava-hf, plain LLaMA
DECODER_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
LAYER_TENSORS = {  # HF suffix of model.layers.N -> GGUF suffix of blk.N
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
DTYPES = ("f32", "f16")
LM_TYPES = ("llama", "mistral")  # text_config.model_type values written as llama.cpp's "llama"


@dataclass(frozen=True)
class LlamaHParams:
    """The language model's hyper-parameters (Hugging Face ``LlamaConfig``/``MistralConfig`` with their defaults)."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    n_ctx_train: int
    tie_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")


def read_hparams(model_dir: Path) -> LlamaHParams:
    """The text model's config (``text_config`` of a LLaVA, or a plain ``LlamaForCausalLM``/``MistralForCausalLM``)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read the config of {model_dir}: {str(err).splitlines()[0]}") from None
    text = getattr(config, "text_config", config)
    if text.model_type not in LM_TYPES:
        raise ModelNotFoundError(
            f"language model type {text.model_type!r} is not supported (only {', '.join(map(repr, LM_TYPES))})"
        )
    if getattr(text, "sliding_window", None) is not None:
        raise ModelNotFoundError(
            f"sliding-window attention (sliding_window={text.sliding_window}) is not supported: "
            "llama.cpp's llama architecture attends to the whole context"
        )
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ModelNotFoundError(f"RoPE scaling {rope.get('rope_type')!r} is not supported (only 'default')")
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        raise ModelNotFoundError("LLaMA models with attention or MLP biases are not supported")
    n_head = int(text.num_attention_heads)
    return LlamaHParams(
        n_vocab=int(text.vocab_size),
        n_embd=int(text.hidden_size),
        n_layer=int(text.num_hidden_layers),
        n_ff=int(text.intermediate_size),
        n_head=n_head,
        n_head_kv=int(getattr(text, "num_key_value_heads", None) or n_head),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // n_head),
        rms_eps=float(text.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
        n_ctx_train=int(text.max_position_embeddings),
        tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        pad_token_id=getattr(text, "pad_token_id", None),
    )


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head: [n_head*d, in] -> same shape.

    Example: one head, d=4, rows [r0, r1, r2, r3] -> [r0, r2, r1, r3].
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: llama.cpp rows -> HF rows. Example: [r0, r2, r1, r3] -> [r0..r3]."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class CheckpointTensors(Checkpoint):
    """Lazy access to the language-model tensors of a (sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.prefix = next((p for p in DECODER_PREFIXES if f"{p}embed_tokens.weight" in self), None)
        if self.prefix is None:
            raise ModelNotFoundError(f"{model_dir}: no LLaMA embed_tokens weight under {DECODER_PREFIXES}")
        self.lm_head = next((k for k in LM_HEAD_KEYS if k in self), None)


Plan = list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]]  # gguf name, HF key, transform


def tensor_plan(tensors: CheckpointTensors, hp: LlamaHParams, permute: bool = True) -> Plan:
    """GGUF name, checkpoint key and transform of every tensor, in file order."""
    keep: Callable[[np.ndarray], np.ndarray] = lambda w: w  # noqa: E731
    plan: Plan = [("token_embd.weight", f"{tensors.prefix}embed_tokens.weight", keep)]
    for i in range(hp.n_layer):
        for hf, name in LAYER_TENSORS.items():
            fix = keep
            if permute and name == "attn_q.weight":
                fix = lambda w: permute_qk(w, hp.n_head)  # noqa: E731
            elif permute and name == "attn_k.weight":
                fix = lambda w: permute_qk(w, hp.n_head_kv)  # noqa: E731
            plan.append((f"blk.{i}.{name}", f"{tensors.prefix}layers.{i}.{hf}", fix))
    plan.append(("output_norm.weight", f"{tensors.prefix}norm.weight", keep))
    if tensors.lm_head is not None and not hp.tie_embeddings:
        plan.append(("output.weight", tensors.lm_head, keep))
    return plan




def add_hparams(writer: gguf.GGUFWriter, hp: LlamaHParams, n_layer: int, dtype: str, name: str) -> None:
    """The ``llama.*`` and ``general.*`` keys (``n_layer`` may be fewer than hp.n_layer: the probe)."""
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.n_embd:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_vocab_size(hp.n_vocab)


def _out_dtype(shape: tuple[int, ...], dtype: str) -> type:
    return np.float16 if dtype == "f16" and len(shape) > 1 else np.float32


def write_llama_gguf(
    model_dir: Path,
    out: Path,
    dtype: str = "f16",
    permute: bool = True,
    progress: bool = False,
    export_id: str | None = None,
    hparams: LlamaHParams | None = None,
) -> LlamaHParams:
    """Convert the checkpoint's language model into one GGUF at ``out`` (f32 or f16); ``progress``
    shows a tqdm bar over the bytes written (stderr); ``export_id`` is stored under
    ``runtime.bundle.manifest.EXPORT_ID_KEY`` (``llama_model_quantize`` copies it to the quantised file).

    ``permute=False`` skips the q/k permutation and ``hparams`` replaces the checkpoint's
    (default: :func:`read_hparams`); both exist only for negative-control tests.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    hp = read_hparams(model_dir) if hparams is None else hparams
    vocab = read_spm_vocab(
        model_dir,
        hp.n_vocab,
        {"bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id, "pad_token_id": hp.pad_token_id},
    )
    tensors = CheckpointTensors(model_dir)
    embd_shape = tensors.shape(f"{tensors.prefix}embed_tokens.weight")
    if embd_shape != (hp.n_vocab, hp.n_embd):
        raise ModelNotFoundError(f"embed_tokens is {embd_shape}, config says {(hp.n_vocab, hp.n_embd)}")
    plan = tensor_plan(tensors, hp, permute)
    with atomic_path(out) as tmp:
        _stream(tensors, plan, hp, vocab, tmp, dtype, (model_dir.name, export_id), progress)
    return hp


def _stream(
    tensors: CheckpointTensors,
    plan: Plan,
    hp: LlamaHParams,
    vocab: SpmVocab,
    path: Path,
    dtype: str,
    names: tuple[str, str | None],
    progress: bool,
) -> None:
    """Write header, metadata and tensor infos, then each tensor as it is loaded (one at a time:
    the largest, a 7B's embedding table, is ~0.5 GB in float32)."""
    """``names``: the model's name and the export id (None: none recorded)."""
    writer = gguf.GGUFWriter(path, "llama")
    model_name, export_id = names
    add_hparams(writer, hp, hp.n_layer, dtype, model_name)
    if export_id is not None:
        writer.add_string(EXPORT_ID_KEY, export_id)
    vocab.add_to(writer)
    total = 0
    for name, key, _ in plan:
        shape = tensors.shape(key)
        out_dtype = _out_dtype(shape, dtype)
        nbytes = int(np.prod(shape)) * np.dtype(out_dtype).itemsize
        writer.add_tensor_info(name, shape, np.dtype(out_dtype), nbytes)
        total += nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"  writing {dtype} GGUF", file=sys.stderr,
              disable=not progress) as bar:
        for _name, key, fix in plan:
            data = fix(tensors.load(key))
            data = np.ascontiguousarray(data.astype(_out_dtype(data.shape, dtype), copy=False))
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
            del data
    writer.close()
