"""The EntropyPrune probe in llama.cpp (method.md §2): hidden states entering LLM layer P-1.

``probe.gguf`` (written by ``export.llm``) holds the first P-1 decoder layers, with layer P-1's
``attn_norm`` as its final norm, so llama.cpp's embeddings output (pooling NONE) is
``RMSNorm_{P-1}(h_{P-1})`` for every position. ``probe_weights.npz`` holds W_q/W_k of layer P-1.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BundleError
from runtime.llm import LlamaBackend
from runtime.llm_bundle import checked_width, llm_entry
from runtime.manifest import Manifest, bundle_file, repair_command
from runtime.prompt_cache import ImageRows
from runtime.template import Conversation, conversation_segments, encode_prompt, get_template
from runtime.types import ProbeOutput

DEFAULT_QUESTION = "Describe the image in detail."  # probe prompt when the caller has none (benchmarks)
WEIGHT_KEYS = ("q_weight", "k_weight", "n_head", "n_head_kv", "rope_theta", "layer")


@dataclass(frozen=True)
class ProbeWeights:
    """Contents of ``probe_weights.npz``."""

    q_weight: np.ndarray  # [n_head * d_head, n_embd] float32, Hugging Face row layout (pre-RoPE)
    k_weight: np.ndarray  # [n_head_kv * d_head, n_embd] float32, Hugging Face row layout
    n_head: int
    n_head_kv: int
    rope_theta: float
    layer: int  # P-1: the 0-based decoder layer the weights belong to

    def __post_init__(self) -> None:
        d = self.q_weight.shape[1]
        if self.q_weight.shape[0] % self.n_head or self.k_weight.shape[1] != d:
            raise ValueError(
                f"q_weight {self.q_weight.shape} / k_weight {self.k_weight.shape} do not fit "
                f"n_head={self.n_head}, n_head_kv={self.n_head_kv}"
            )

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


def load_probe_weights(path: str | Path) -> ProbeWeights:
    """Read ``probe_weights.npz``; a missing or incomplete file is a one-line BundleError."""
    path = Path(path)
    try:
        with np.load(path) as data:
            missing = [k for k in WEIGHT_KEYS if k not in data.files]
            if missing:
                raise BundleError(f"{path} lacks {', '.join(missing)}; re-run export.llm")
            return ProbeWeights(
                q_weight=data["q_weight"].astype(np.float32),
                k_weight=data["k_weight"].astype(np.float32),
                n_head=int(data["n_head"]),
                n_head_kv=int(data["n_head_kv"]),
                rope_theta=float(data["rope_theta"]),
                layer=int(data["layer"]),
            )
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise BundleError(f"cannot read probe weights {path}: {err}") from None


def run_probe(
    backend: LlamaBackend,
    weights: ProbeWeights,
    prefix_ids: Sequence[int],
    image_rows: np.ndarray,
    suffix_ids: Sequence[int],
) -> ProbeOutput:
    """Probe ``prefix ids + image rows [N, n_embd] + suffix ids`` from position 0 (the backend
    is reset first); hidden states of all ``T`` positions -> ProbeOutput."""
    if not backend.embeddings_mode:
        raise ValueError("run_probe needs a LlamaBackend opened with embeddings=True (the probe GGUF)")
    if weights.q_weight.shape[1] != backend.n_embd:
        raise BundleError(f"probe weights are {weights.q_weight.shape[1]} wide, the probe GGUF {backend.n_embd}")
    backend.prefill([list(prefix_ids), ImageRows(object(), image_rows), list(suffix_ids)], output_all=True)
    return ProbeOutput(
        hidden=backend.hidden_states(),
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
    """The probe GGUF in an embeddings-mode backend plus its weights; ``run`` -> ProbeOutput."""

    def __init__(self, gguf_path: str | Path, weights_path: str | Path, **backend_options: Any) -> None:
        self.weights = load_probe_weights(weights_path)
        self.backend = LlamaBackend(gguf_path, embeddings=True, **backend_options)

    def run(self, prefix_ids: Sequence[int], image_rows: np.ndarray, suffix_ids: Sequence[int]) -> ProbeOutput:
        """See :func:`run_probe`."""
        return run_probe(self.backend, self.weights, prefix_ids, image_rows, suffix_ids)

    def bind(self, prefix_ids: Sequence[int], suffix_ids: Sequence[int]) -> Callable[[np.ndarray], ProbeOutput]:
        """A ``PruneInputs.probe`` callable: image rows [N, E] -> ProbeOutput for this prompt."""
        prefix, suffix = list(prefix_ids), list(suffix_ids)
        return lambda rows: self.run(prefix, rows, suffix)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> LlamaProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_probe(root: str | Path, manifest: dict[str, Any], **options: Any) -> LlamaProbe:
    """The bundle's probe (``manifest["llm"]["probe"]``), checked against the projector width."""
    root = Path(root)
    probe = llm_entry(root, manifest).get("probe")
    if not isinstance(probe, dict):
        raise BundleError(f"bundle {root} has no probe; re-run export.llm")
    repair = repair_command(manifest, root, "export.llm")
    opened = LlamaProbe(bundle_file(root, probe.get("gguf"), "probe", probe.get("size"), repair),
                        bundle_file(root, probe.get("weights"), "probe weights", probe.get("weights_size"), repair),
                        **options)
    recorded = probe.get("layer")
    if recorded is not None and int(recorded) != opened.weights.layer:
        opened.close()
        raise BundleError(f"{root / probe['weights']} holds layer {opened.weights.layer} but the manifest "
                          f"records probe layer {recorded}; re-run export.llm")
    checked_width(opened.backend, manifest)
    return opened


def probe_from_manifest(
    manifest: Manifest, question: str = DEFAULT_QUESTION, **options: Any
) -> Callable[[np.ndarray], ProbeOutput] | None:
    """A ``PruneInputs.probe`` callable for a one-question LLaVA prompt, or None when the bundle
    has no language model yet. The probe stays open as long as the callable lives."""
    if not isinstance(manifest.llm, dict) or "probe" not in manifest.llm:
        return None
    probe = open_probe(manifest.root, manifest.data, **options)
    segments = conversation_segments(Conversation().ask(question), get_template(manifest.chat_template))
    tokens = encode_prompt(segments, probe.backend)
    return probe.bind(tokens.prefix, tokens.suffix)
