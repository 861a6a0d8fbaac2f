"""Our own writer of a LLaVA-1.5 CLIP tower + projector as an ``mmproj`` GGUF for llama.cpp's libmtmd.

``python -m export.mmproj --model ALIAS_OR_PATH --out FILE [--dtype f32|f16] [--position-order hf|cls-last]``

Keys and tensor names are the ones clip.cpp reads for projector type ``mlp`` (taken from the
``gguf`` package's constants where it has them): ``clip.has_vision_encoder``,
``clip.projector_type``, ``clip.vision.*`` (image/patch size, width, FFN width, block count,
heads, LayerNorm epsilon, projection dim, image mean/std), ``clip.use_gelu`` (False selects
quick-GELU, CLIP's activation) and ``clip.vision.feature_layer``; tensors ``v.class_embd``,
``v.patch_embd.weight``, ``v.position_embd.weight``, ``v.pre_ln``, ``v.blk.N.{attn_q,attn_k,
attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}`` and ``mm.0``/``mm.2`` (LLaVA's ``linear_1``/``linear_2``).

Decisions (our choices, checked against libmtmd in tests/test_bench.py):
- Only blocks ``1..f`` are written (``f`` = ``vision_feature_layer`` made non-negative, 23 for
  LLaVA-1.5), ``block_count = f`` and ``feature_layer = [f]``. clip.cpp's LLaVA graph then runs
  exactly f blocks; without the ``feature_layer`` key it runs ``block_count - 1`` (one too few).
- ``post_layernorm`` is not written: LLaVA takes ``hidden_states[f]``, before it.
- ``position_order="hf"`` (default) stores the position table as Hugging Face does ([CLS] row 0),
  as llama.cpp's converters do. ``"cls-last"`` is a diagnostic: clip.cpp (this version) appends
  [CLS] *after* the 576 patches and adds position rows 0..576 in that order, so "cls-last" moves
  row 0 to the end to give every token its Hugging Face position. (The graph still returns rows
  1..576 of that sequence: patches 1..575 and [CLS]; no weight layout can change that.)
- clip.cpp's projector uses ``ggml_gelu`` (tanh approximation); LLaVA's is erf GELU.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from export.checkpoint import Checkpoint
from export.load import image_processor_config
from runtime.atomic import atomic_path
from runtime.cli import OneLineParser, log, run_cli
from runtime.errors import ModelNotFoundError

PROJECTOR_TYPE = "mlp"
FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # not in gguf.Keys; clip.cpp reads "clip.%s.feature_layer"
POSITION_ORDERS = ("hf", "cls-last")
DTYPES = ("f32", "f16")
ACTIVATIONS = {"quick_gelu": False, "gelu": True}  # CLIP hidden_act -> clip.use_gelu
T = gguf.MODEL_TENSOR
BLOCK_TENSORS = {  # HF suffix of encoder.layers.N -> gguf tensor kind
    "self_attn.q_proj": T.V_ENC_ATTN_Q,
    "self_attn.k_proj": T.V_ENC_ATTN_K,
    "self_attn.v_proj": T.V_ENC_ATTN_V,
    "self_attn.out_proj": T.V_ENC_ATTN_O,
    "layer_norm1": T.V_ENC_INPUT_NORM,
    "layer_norm2": T.V_ENC_POST_ATTN_NORM,
    "mlp.fc1": T.V_ENC_FFN_UP,
    "mlp.fc2": T.V_ENC_FFN_DOWN,
}


@dataclass(frozen=True)
class MmprojInfo:
    """What :func:`write_mmproj_gguf` wrote."""

    path: Path
    image_size: int
    patch_size: int
    n_embd: int  # D, the tower's width
    n_head: int
    block_count: int  # f: blocks written (= the feature layer)
    projector_dim: int  # E, the projector's output width (the LLM's n_embd)
    position_order: str
    tensors: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class _Vision:
    """The hyper-parameters the GGUF header needs."""

    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int
    eps: float
    projection_dim: int
    use_gelu: bool
    feature_layer: int  # f, non-negative: blocks computed


def _vision_hparams(model_dir: Path) -> _Vision:
    """CLIP geometry from the LLaVA config (transformers supplies CLIP's defaults)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    vision = getattr(config, "vision_config", None)
    if vision is None or vision.model_type != "clip_vision_model":
        raise ModelNotFoundError(f"{model_dir} is not a LLaVA with a CLIP tower (vision_config model_type)")
    if vision.hidden_act not in ACTIVATIONS:
        raise ModelNotFoundError(f"CLIP activation {vision.hidden_act!r} has no clip.cpp equivalent here")
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or config.vision_feature_select_strategy != "default":
        raise ModelNotFoundError("only LLaVA-1.5's single vision_feature_layer with strategy 'default' is supported")
    f = layer if layer >= 0 else vision.num_hidden_layers + 1 + layer
    if not 1 <= f <= vision.num_hidden_layers:
        raise ModelNotFoundError(f"vision_feature_layer {layer} is outside 1..{vision.num_hidden_layers}")
    return _Vision(vision.image_size, vision.patch_size, vision.hidden_size, vision.intermediate_size,
                   vision.num_attention_heads, vision.num_hidden_layers, float(vision.layer_norm_eps),
                   int(vision.projection_dim), ACTIVATIONS[vision.hidden_act], f)


Plan = list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]]  # gguf name, HF key, transform


def _name(kind: gguf.MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=bid) if bid is not None else base) + suffix


def tensor_plan(ckpt: Checkpoint, feature_layer: int, position_order: str) -> Plan:
    """GGUF name, checkpoint key and transform of every tensor, in file order."""
    keep: Callable[[np.ndarray], np.ndarray] = lambda w: w  # noqa: E731
    cls_last: Callable[[np.ndarray], np.ndarray] = lambda w: np.concatenate([w[1:], w[:1]])  # noqa: E731
    v = ckpt.prefix("embeddings.class_embedding")
    mm = ckpt.prefix("linear_1.weight")
    plan: Plan = [
        (_name(T.V_ENC_EMBD_CLS, ""), f"{v}embeddings.class_embedding", keep),
        (_name(T.V_ENC_EMBD_PATCH, ".weight"), f"{v}embeddings.patch_embedding.weight", keep),
        (_name(T.V_ENC_EMBD_POS, ".weight"), f"{v}embeddings.position_embedding.weight",
         cls_last if position_order == "cls-last" else keep),
        (_name(T.V_PRE_NORM, ".weight"), f"{v}pre_layrnorm.weight", keep),
        (_name(T.V_PRE_NORM, ".bias"), f"{v}pre_layrnorm.bias", keep),
    ]
    for i in range(feature_layer):
        for hf, kind in BLOCK_TENSORS.items():
            plan += [(_name(kind, f".{p}", i), f"{v}encoder.layers.{i}.{hf}.{p}", keep) for p in ("weight", "bias")]
    for hf, index in (("linear_1", 0), ("linear_2", 2)):
        plan += [(_name(T.V_MMPROJ, f".{p}", index), f"{mm}{hf}.{p}", keep) for p in ("weight", "bias")]
    return plan


def _add_keys(writer: gguf.GGUFWriter, hp: _Vision, mean: list[float], std: list[float], name: str) -> None:
    k = gguf.Keys.ClipVision
    writer.add_name(name)
    writer.add_description("LLaVA-1.5 CLIP tower and projector (entroprune export.mmproj)")
    writer.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, PROJECTOR_TYPE)
    for key, value in ((k.IMAGE_SIZE, hp.image_size), (k.PATCH_SIZE, hp.patch_size),
                       (k.EMBEDDING_LENGTH, hp.n_embd), (k.FEED_FORWARD_LENGTH, hp.n_ff),
                       (k.PROJECTION_DIM, hp.projection_dim), (k.BLOCK_COUNT, hp.feature_layer),
                       (k.Attention.HEAD_COUNT, hp.n_head)):
        writer.add_uint32(key, value)
    writer.add_float32(k.Attention.LAYERNORM_EPS, hp.eps)
    writer.add_array(k.IMAGE_MEAN, [float(x) for x in mean])
    writer.add_array(k.IMAGE_STD, [float(x) for x in std])
    writer.add_bool(k.USE_GELU, hp.use_gelu)
    writer.add_array(FEATURE_LAYER_KEY, [hp.feature_layer])


def write_mmproj_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32",
                      position_order: str = "hf") -> MmprojInfo:
    """Write the checkpoint's CLIP blocks 1..f and projector to ``out`` (f32, or f16 for ≥2-D weights)."""
    if dtype not in DTYPES or position_order not in POSITION_ORDERS:
        raise ValueError(f"need dtype in {DTYPES} and position_order in {POSITION_ORDERS}, "
                         f"got {dtype!r}, {position_order!r}")
    model_dir, out = Path(model_dir), Path(out)
    hp = _vision_hparams(model_dir)
    processor = image_processor_config(model_dir)
    ckpt = Checkpoint(model_dir)
    plan = tensor_plan(ckpt, hp.feature_layer, position_order)
    projector_dim = ckpt.shape(plan[-1][1])[0]
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "clip")
        _add_keys(writer, hp, processor["image_mean"], processor["image_std"], model_dir.name)
        for name, key, fix in plan:
            data = fix(ckpt.load(key))
            writer.add_tensor(name, data.astype(np.float16 if dtype == "f16" and data.ndim > 1 else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return MmprojInfo(out, hp.image_size, hp.patch_size, hp.n_embd, hp.n_head, hp.feature_layer, projector_dim,
                      position_order, len(plan))


def read_mmproj_keys(path: str | Path) -> dict[str, Any]:
    """The metadata of an mmproj GGUF as plain Python values (for checks and reports)."""
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m export.mmproj", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry alias or a local Hugging Face LLaVA-1.5 checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f32", help="weight type (default: f32)")
    parser.add_argument("--position-order", choices=POSITION_ORDERS, default="hf",
                        help="position table layout: hf (standard, default) or cls-last (diagnostic, see module doc)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from export.load import resolve_model

        info = write_mmproj_gguf(resolve_model(args.model).path, args.out, args.dtype, args.position_order)
        log(f"{info.tensors} tensors, {info.block_count} blocks, projector width {info.projector_dim}")
        print(info.path)
        return 0

    return run_cli(body, "export.mmproj")


if __name__ == "__main__":
    raise SystemExit(main())
