"""The real answerer: ONNX vision + pruning (runtime.pipeline), then the LLM in llama.cpp.

All coupling to the language-model runtime (runtime.llm, runtime.template, runtime.probe) lives
here, and the bundle wiring in :func:`make_answerer` alone. Greedy decoding, as LLaVA's eval.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.errors import BundleError
from runtime.llm import LlamaBackend
from runtime.pipeline import Pipeline
from runtime.probe import LlamaProbe
from runtime.registry import bundle_path
from runtime.strategies.registry import get_strategy
from runtime.template import ChatTemplate, Conversation, conversation_segments, encode_prompt, get_template
from runtime.types import EncoderOutput

STOP = ("</s>",)


class LlavaAnswerer:
    """``answer(image, question, strategy, tokens)``: prune the image's tokens, ask the LLM.

    The encoder output of the last image is cached, so the strategies and budgets of one
    question share one vision pass (pass the same PIL object, as the runner does)."""

    def __init__(self, pipeline: Pipeline, llm: LlamaBackend, template: ChatTemplate, max_tokens: int = 16,
                 open_probe: Callable[[], LlamaProbe] | None = None) -> None:
        self.pipeline, self.llm, self.template = pipeline, llm, template
        self.max_tokens = max_tokens
        self._open_probe, self._probe = open_probe, None
        self._last: tuple[Image.Image, EncoderOutput] | None = None

    def _encoded(self, image: Image.Image) -> EncoderOutput:
        if self._last is None or self._last[0] is not image:
            self._last = (image, self.pipeline.encoder.encode(self.pipeline.pixel_values(image)))
        return self._last[1]

    def _probe_for(self, strategy: str) -> LlamaProbe | None:
        if self._probe is None and self._open_probe is not None and get_strategy(strategy).needs_probe:
            self._probe = self._open_probe()
        return self._probe

    def answer(self, image: Image.Image, question: str, strategy: str, tokens: int) -> str:
        """The model's answer (stripped) with ``tokens`` visual tokens kept by ``strategy``."""
        prompt = encode_prompt(conversation_segments(Conversation().ask(question), self.template), self.llm)
        probe = self._probe_for(strategy)
        pruned = self.pipeline.prune_encoded(self._encoded(image), tokens, strategy,
                                             probe.bind(prompt.prefix, prompt.suffix) if probe else None)
        self.llm.reset()
        self.llm.eval_tokens(prompt.prefix)
        self.llm.eval_embeddings(pruned.embeddings)
        self.llm.eval_tokens(prompt.suffix)
        return "".join(self.llm.generate(self.max_tokens, stop=STOP, temperature=0.0)).strip()

    def close(self) -> None:
        self.llm.close()
        if self._probe is not None:
            self._probe.close()


def _bundle_file(root: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path


def make_answerer(bundle: str | Path, max_tokens: int = 16, threads: int | None = None) -> LlavaAnswerer:
    """The answerer of a bundle holding export.clip's vision files and export.llm's GGUF(s)."""
    pipeline = Pipeline(bundle_path(str(bundle)), threads=threads)
    manifest = pipeline.manifest
    entry: dict[str, Any] | None = manifest.llm
    if not entry or "gguf" not in entry:
        raise BundleError(f"bundle {manifest.root} has no language model "
                          f"(run: python -m export.llm --model ALIAS --out {manifest.root})")
    llm = LlamaBackend(_bundle_file(manifest.root, entry["gguf"]), n_threads=threads)
    llm.check_n_embd(manifest.vision.projector_dim)
    probe = entry.get("probe") or {}
    open_probe = None
    if "gguf" in probe and "weights" in probe:
        def open_probe() -> LlamaProbe:
            return LlamaProbe(_bundle_file(manifest.root, probe["gguf"]),
                              _bundle_file(manifest.root, probe["weights"]), n_threads=threads)
    return LlavaAnswerer(pipeline, llm, get_template(manifest.chat_template), max_tokens, open_probe)
