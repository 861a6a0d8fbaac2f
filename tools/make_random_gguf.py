"""Write a random LLaMA-shaped GGUF of any size, for llama.cpp benchmarks and tests.

``python -m tools.make_random_gguf OUT [--preset tinyllama-1.1b|llama-7b|tiny] [--layers N]
[--embd N] [--ff N] [--heads N] [--kv-heads N] [--vocab N] [--ctx N] [--quant q4_0] [--seed S]``

q4_0/q8_0/f16/f32 tensors are generated directly in their block layout (random quants, a fixed
scale giving weights of std ~0.02), streamed tensor by tensor, so a 7B file needs little RAM;
other types (e.g. q4_k_m) go through an f16 file and ``llama_model_quantize``. The vocabulary
is byte-level SentencePiece-style: <unk>, <s>, </s>, the 256 ``<0xNN>`` byte tokens, then
filler pieces up to ``--vocab`` (llama.cpp tokenizes any text into bytes with it).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from runtime.atomic import atomic_path
from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import InputError

WEIGHT_STD = 0.02
QUANT_STD = {"q4_0": 4.6, "q8_0": 74.0}  # std of uniformly random 4-bit / 8-bit quants
GGML = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FTYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


@dataclass(frozen=True)
class Shape:
    """A LLaMA's geometry."""

    layers: int
    embd: int
    ff: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    ctx: int = 4096
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if min(self.layers, self.embd, self.ff, self.heads, self.kv_heads, self.ctx) < 1:
            raise InputError(f"every size must be >= 1, got {self}")
        if self.embd % self.heads or self.heads % self.kv_heads or self.vocab < 259:
            raise InputError(f"inconsistent shape {self} (embd % heads, heads % kv_heads, vocab >= 259)")


PRESETS = {
    "tinyllama-1.1b": Shape(layers=22, embd=2048, ff=5632, heads=32, kv_heads=4, ctx=2048),
    "llama-7b": Shape(layers=32, embd=4096, ff=11008, heads=32, kv_heads=32),
    "tiny": Shape(layers=2, embd=64, ff=160, heads=4, kv_heads=2, vocab=300, ctx=1024),
}


def byte_vocab(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores, types: 3 control-ish tokens, 256 byte tokens, fillers up to ``n_vocab``."""
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581tok{i}".encode() for i in range(n_vocab - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(n_vocab - 259)]
    return tokens, scores, [int(t) for t in types]


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and numpy shapes ([rows, cols]) of every tensor."""
    head_dim = shape.embd // shape.heads
    kv = shape.kv_heads * head_dim
    out = [("token_embd.weight", (shape.vocab, shape.embd))]
    for i in range(shape.layers):
        out += [
            (f"blk.{i}.attn_norm.weight", (shape.embd,)),
            (f"blk.{i}.attn_q.weight", (shape.embd, shape.embd)),
            (f"blk.{i}.attn_k.weight", (kv, shape.embd)),
            (f"blk.{i}.attn_v.weight", (kv, shape.embd)),
            (f"blk.{i}.attn_output.weight", (shape.embd, shape.embd)),
            (f"blk.{i}.ffn_norm.weight", (shape.embd,)),
            (f"blk.{i}.ffn_gate.weight", (shape.ff, shape.embd)),
            (f"blk.{i}.ffn_up.weight", (shape.ff, shape.embd)),
            (f"blk.{i}.ffn_down.weight", (shape.embd, shape.ff)),
        ]
    return out + [("output_norm.weight", (shape.embd,)), ("output.weight", (shape.vocab, shape.embd))]


def random_tensor(dims: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random weights in ``kind``'s storage layout (1-D norms: ones, float32)."""
    if len(dims) == 1:
        return np.ones(dims, np.float32)
    if kind in ("f32", "f16"):
        return (rng.standard_normal(dims, np.float32) * WEIGHT_STD).astype(np.float32 if kind == "f32" else np.float16)
    per_block, nbytes = gguf.GGML_QUANT_SIZES[GGML[kind]]
    rows, cols = dims
    if cols % per_block:
        raise ValueError(f"{kind} needs row length divisible by {per_block}, got {cols}")
    blocks = rng.integers(0, 256, size=(rows, cols // per_block, nbytes), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(WEIGHT_STD / QUANT_STD[kind]).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _storage(dims: tuple[int, ...], kind: str) -> tuple[gguf.GGMLQuantizationType, int]:
    """GGML type and byte size of one tensor (1-D norms are always f32)."""
    ggml_type = GGML[kind] if len(dims) > 1 else gguf.GGMLQuantizationType.F32
    per_block, nbytes = gguf.GGML_QUANT_SIZES[ggml_type]
    return ggml_type, int(np.prod(dims)) // per_block * nbytes


def write_random_gguf(out: Path, shape: Shape, kind: str, seed: int = 0) -> None:
    """Stream a random model of ``shape`` with weights in ``kind`` (f32, f16, q4_0, q8_0)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(f"random-{shape.layers}x{shape.embd}")
    writer.add_file_type(FTYPE[kind])
    writer.add_context_length(shape.ctx)
    writer.add_embedding_length(shape.embd)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.embd // shape.heads)
    writer.add_vocab_size(shape.vocab)
    tokens, scores, types = byte_vocab(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    specs = tensor_shapes(shape)
    for name, dims in specs:
        ggml_type, nbytes = _storage(dims, kind)
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, dims) in enumerate(specs):
        if i % 20 == 0:
            log(f"  {name} ({i + 1}/{len(specs)})")
        writer.write_tensor_data(random_tensor(dims, kind, rng))
    writer.close()


def make_random_gguf(out: Path, shape: Shape, quant: str = "q4_0", seed: int = 0) -> Path:
    """Write the file atomically; quant types other than f32/f16/q4_0/q8_0 via llama.cpp."""
    if quant in FTYPE:
        with atomic_path(out) as tmp:
            write_random_gguf(tmp, shape, quant, seed)
        return out
    from export.llm_gguf.quantize import QUANTS, quantize_gguf

    if quant not in QUANTS:
        raise InputError(f"unknown quant {quant!r}; choose from {sorted(set(FTYPE) | set(QUANTS))}")
    middle = out.with_name(f".{out.name}.f16.tmp")
    try:
        write_random_gguf(middle, shape, "f16", seed)
        with atomic_path(out) as tmp:
            quantize_gguf(middle, tmp, quant)
    finally:
        middle.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tools.make_random_gguf", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tinyllama-1.1b", help="base shape (default: tinyllama-1.1b)"
    )
    for flag, field in (
        ("--layers", "layers"),
        ("--embd", "embd"),
        ("--ff", "ff"),
        ("--heads", "heads"),
        ("--kv-heads", "kv_heads"),
        ("--vocab", "vocab"),
        ("--ctx", "ctx"),
    ):
        parser.add_argument(flag, dest=field, type=int, default=None, help=f"override the preset's {field}")
    parser.add_argument("--quant", default="q4_0", help="f32, f16, q4_0, q8_0 or q4_k_m (default: q4_0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Shape) if getattr(args, f.name, None) is not None
    }

    def body() -> int:
        shape = dataclasses.replace(PRESETS[args.preset], **overrides)
        log(f"writing {args.out}: {shape}, {args.quant}")
        print(make_random_gguf(args.out, shape, args.quant, args.seed))
        return 0

    return run_cli(body, "make_random_gguf")


if __name__ == "__main__":
    sys.exit(main())
