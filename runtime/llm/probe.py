"""The EntropyPrune probe in llama.cpp (method.md §2): hidden states entering LLM layer P-1.

``probe.gguf`` (written by ``export.llm``) holds the first P-1 decoder layers, with layer P-1's
``attn_norm`` as its final norm, so llama.cpp's embeddings output (pooling NONE) is
``RMSNorm_{P-1}(h_{P-1})`` for every position. ``probe_weights.npz`` holds W_q/W_k of layer P-1.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle.manifest import Manifest, repair_command
from runtime.errors import BundleError
from runtime.llm.backend import LlamaBackend
from runtime.llm.bundle import checked_gguf, checked_npz, checked_width, llm_info
from runtime.llm.prompt_cache import ImageRows
from runtime.llm.template import Conversation, conversation_segments, encode_prompt, get_template
from runtime.types import ProbeOutput

DEFAULT_QUESTION = "Describe the image in detail."  # probe prompt when the caller has none (benchmarks)
WEIGHT_KEYS = ("q_weight", "k_weight", "n_head", "n_head_kv", "rope_theta", "layer")
PROBE_REPAIR = "re-run export.llm"  # when the caller knows no better (open_probe knows the model)
FINAL_PROBE = "probe_final.gguf"  # blocks 0..P-1 + the final norm (DART's H), written by export.llm
# what np.load raises for a file that is not a readable .npz (pickled data: ValueError, never unpickled)
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class ProbeWeights:
    """Contents of ``probe_weights.npz``; checked on construction (ValueError naming the member)."""

    q_weight: np.ndarray  # [n_head * d_head, n_embd] float32, Hugging Face row layout (pre-RoPE)
    k_weight: np.ndarray  # [n_head_kv * d_head, n_embd] float32, Hugging Face row layout
    n_head: int
    n_head_kv: int
    rope_theta: float
    layer: int  # P-1: the 0-based decoder layer the weights belong to

    def __post_init__(self) -> None:
        for name, low in (("n_head", 1), ("n_head_kv", 1), ("layer", 0)):
            _check_integer(name, getattr(self, name), low)
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float, np.number)) or not 0 < theta < np.inf:
            raise ValueError(f"rope_theta must be a positive finite number, got {theta!r}")
        for name in ("q_weight", "k_weight"):
            _check_matrix(name, getattr(self, name))
        _check_heads(self.q_weight.shape, self.k_weight.shape, self.n_head, self.n_head_kv)

    def arrays(self) -> dict[str, Any]:
        """The npz members (scalars as 0-d arrays)."""
        return {
            "q_weight": self.q_weight,
            "k_weight": self.k_weight,
            "n_head": np.int64(self.n_head),
            "n_head_kv": np.int64(self.n_head_kv),
            "rope_theta": np.float64(self.rope_theta),
            "layer": np.int64(self.layer),
        }


def _check_integer(name: str, value: object, low: int) -> None:
    """ValueError unless ``value`` is an integer (not a bool) >= ``low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def _check_matrix(name: str, weight: object) -> None:
    """ValueError unless ``weight`` is a non-empty 2-D floating-point array of finite values."""
    if not isinstance(weight, np.ndarray) or not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got {getattr(weight, 'dtype', type(weight))}")
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(f"{name} must be 2-D [heads * d_head, n_embd] and not empty, got shape {weight.shape}")
    finite = np.isfinite(weight)
    if not finite.all():
        bad = weight[~finite]
        kinds = " and ".join(k for k, hit in (("NaN", np.isnan(bad).any()), ("inf", np.isinf(bad).any())) if hit)
        raise ValueError(f"{name} holds {kinds} ({bad.size} of {weight.size} values)")


def _check_heads(q_shape: tuple[int, ...], k_shape: tuple[int, ...], n_head: int, n_head_kv: int) -> None:
    """ValueError unless ``q [n_head*d_head, E]`` and ``k [n_head_kv*d_head, E]`` fit the head counts.

    Example: q (8, 16), k (4, 16), n_head 2, n_head_kv 1 -> d_head 4, fine.
    """
    rows, n_embd = q_shape
    if rows % n_head:
        raise ValueError(f"q_weight has {rows} rows, not a multiple of n_head={n_head}")
    d_head = rows // n_head
    if d_head % 2:
        raise ValueError(f"d_head={d_head} (q_weight rows / n_head) must be even for RoPE")
    if n_head % n_head_kv:
        raise ValueError(f"n_head={n_head} is not a multiple of n_head_kv={n_head_kv}")
    expected = (n_head_kv * d_head, n_embd)
    if tuple(k_shape) != expected:
        raise ValueError(f"k_weight has shape {tuple(k_shape)}, expected {expected} "
                         f"(n_head_kv={n_head_kv} x d_head={d_head}, n_embd={n_embd} of q_weight)")


def load_probe_weights(path: str | Path, repair: str = PROBE_REPAIR) -> ProbeWeights:
    """Read ``probe_weights.npz`` without unpickling anything and check it; a file that is not such
    an archive, lacks a member or holds unusable values is a one-line BundleError naming the file."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as err:
        pickled = "not an .npz archive (numpy would have to unpickle it, which is never done)"
        raise BundleError(f"cannot read probe weights {path}: {_npz_reason(err, pickled)}; {repair}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise BundleError(f"{path} holds a single array, not the .npz archive of probe weights; {repair}")
    with loaded as data:
        missing = [k for k in WEIGHT_KEYS if k not in data.files]
        if missing:
            raise BundleError(f"{path} lacks {', '.join(missing)}; {repair}")
        try:
            return ProbeWeights(**_members(data))
        except _NPZ_ERRORS as err:
            pickled = "a member holds pickled Python objects, which are never loaded"
            raise BundleError(f"bad probe weights {path}: {_npz_reason(err, pickled)}; {repair}") from None


def _members(data: np.lib.npyio.NpzFile) -> dict[str, Any]:
    """The archive's members as ProbeWeights keyword arguments (ValueError for a wrong kind)."""
    return {"q_weight": _float_matrix(data, "q_weight"), "k_weight": _float_matrix(data, "k_weight"),
            "n_head": _scalar(data, "n_head", np.integer), "n_head_kv": _scalar(data, "n_head_kv", np.integer),
            "rope_theta": _scalar(data, "rope_theta", np.number), "layer": _scalar(data, "layer", np.integer)}


def _float_matrix(data: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    """Member ``key`` as float32 (ValueError unless it is floating point)."""
    value = data[key]
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"{key} must be floating point, got {value.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused as such
        return value.astype(np.float32)


def _scalar(data: np.lib.npyio.NpzFile, key: str, kind: type[np.generic]) -> int | float:
    """Member ``key``: a 0-d array of ``kind`` (np.integer or np.number) as a Python number."""
    value = data[key]
    if value.shape != ():
        raise ValueError(f"{key} must be a single number, got shape {value.shape}")
    if value.dtype == np.bool_ or not np.issubdtype(value.dtype, kind):
        wanted = "an integer" if kind is np.integer else "a number"
        raise ValueError(f"{key} must be {wanted}, got {value.dtype} {value.item()!r}")
    return value.item()


def _npz_reason(err: BaseException, pickled: str) -> str:
    """One line for what numpy said, or ``pickled`` when it refused to unpickle (allow_pickle=False)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return pickled if "pickle" in text.lower() else text[:200]


def _hidden_states(backend: LlamaBackend, prefix_ids: Sequence[int], image_rows: np.ndarray,
                   suffix_ids: Sequence[int]) -> np.ndarray:
    """``[T, n_embd]`` embeddings output of ``prefix ids + image rows + suffix ids`` from position 0."""
    if not backend.embeddings_mode:
        raise ValueError("a probe needs a LlamaBackend opened with embeddings=True (the probe GGUF)")
    backend.prefill([list(prefix_ids), ImageRows(object(), image_rows), list(suffix_ids)], output_all=True)
    return backend.hidden_states()


def run_probe(
    backend: LlamaBackend,
    weights: ProbeWeights,
    prefix_ids: Sequence[int],
    image_rows: np.ndarray,
    suffix_ids: Sequence[int],
    final: LlamaBackend | None = None,
) -> ProbeOutput:
    """Probe ``prefix ids + image rows [N, n_embd] + suffix ids`` from position 0 (the backend
    is reset first); hidden states of all ``T`` positions -> ProbeOutput. With ``final`` (the
    final-norm probe) the same sequence runs through it too, giving ``final_hidden``."""
    if weights.q_weight.shape[1] != backend.n_embd:
        raise BundleError(f"probe weights are {weights.q_weight.shape[1]} wide, the probe GGUF {backend.n_embd}")
    hidden = _hidden_states(backend, prefix_ids, image_rows, suffix_ids)
    return ProbeOutput(
        hidden=hidden,
        final_hidden=None if final is None else _hidden_states(final, prefix_ids, image_rows, suffix_ids),
        image_start=len(prefix_ids),
        num_image=int(image_rows.shape[0]),
        q_weight=weights.q_weight,
        k_weight=weights.k_weight,
        n_head=weights.n_head,
        n_head_kv=weights.n_head_kv,
        rope_theta=weights.rope_theta,
        layer=weights.layer,
    )


class LlamaProbe:
    """The probe GGUF in an embeddings-mode backend plus its weights; ``run`` -> ProbeOutput.

    ``final_path`` is the final-norm probe (``probe_final.gguf``, DART's ``H``): opened on first
    use only, so the strategies that never ask for it pay nothing; None for bundles exported
    before it existed (asking for it is then a one-line BundleError naming ``repair``).
    """

    def __init__(self, gguf_path: str | Path, weights_path: str | Path, *, repair: str = PROBE_REPAIR,
                 final_path: str | Path | None = None, **backend_options: Any) -> None:
        self.weights = load_probe_weights(weights_path, repair)
        self.backend = LlamaBackend(gguf_path, embeddings=True, **backend_options)
        self._final_path, self._final, self._repair, self._options = final_path, None, repair, backend_options

    def run(self, prefix_ids: Sequence[int], image_rows: np.ndarray, suffix_ids: Sequence[int],
            final: bool = False) -> ProbeOutput:
        """See :func:`run_probe`; ``final`` also runs the final-norm probe."""
        return run_probe(self.backend, self.weights, prefix_ids, image_rows, suffix_ids,
                         self._final_backend() if final else None)

    def _final_backend(self) -> LlamaBackend:
        if self._final is None:
            if self._final_path is None:
                raise BundleError(f"the bundle's language model has no final-norm probe ({FINAL_PROBE}), "
                                  f"which dart needs; {self._repair}")
            self._final = LlamaBackend(self._final_path, embeddings=True, **self._options)
        return self._final

    def bind(self, prefix_ids: Sequence[int], suffix_ids: Sequence[int]) -> Callable[..., ProbeOutput]:
        """A ``PruneInputs.probe`` callable: ``(image rows [N, E], final=False)`` -> ProbeOutput."""
        prefix, suffix = list(prefix_ids), list(suffix_ids)
        return lambda rows, final=False: self.run(prefix, rows, suffix, final)

    def close(self) -> None:
        self.backend.close()
        if self._final is not None:
            self._final.close()

    def __enter__(self) -> LlamaProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_probe(root: str | Path, manifest: dict[str, Any], **options: Any) -> LlamaProbe:
    """The bundle's probe (``manifest["llm"]["probe"]``): both files of the language model's
    export (size and export id), checked against the projector width."""
    root = Path(root)
    llm = llm_info(root, manifest)
    probe = llm.probe
    final = None if probe.final is None else checked_gguf(root, probe.final.gguf, "final probe", probe.final.size,
                                                           llm.export_id, manifest)
    opened = LlamaProbe(checked_gguf(root, probe.gguf, "probe", probe.size, llm.export_id, manifest),
                        checked_npz(root, probe.weights, "probe weights", probe.weights_size, llm.export_id,
                                    manifest),
                        repair=repair_command(manifest, root, "export.llm"), final_path=final, **options)
    if probe.layer != opened.weights.layer:
        opened.close()
        raise BundleError(f"{root / probe.weights} holds layer {opened.weights.layer} but the manifest "
                          f"records probe layer {probe.layer}; {repair_command(manifest, root, 'export.llm')}")
    checked_width(opened.backend, manifest)
    return opened


def probe_from_manifest(
    manifest: Manifest, question: str = DEFAULT_QUESTION, **options: Any
) -> Callable[..., ProbeOutput] | None:
    """A ``PruneInputs.probe`` callable for a one-question LLaVA prompt, or None when the bundle
    has no language model yet. The probe stays open as long as the callable lives."""
    if manifest.llm is None:
        return None
    probe = open_probe(manifest.root, manifest.data, **options)
    segments = conversation_segments(Conversation().ask(question), get_template(manifest.chat_template))
    tokens = encode_prompt(segments, probe.backend)
    return probe.bind(tokens.prefix, tokens.suffix)
