"""The real answerer: runtime.assistant.Assistant (ONNX vision + pruning + llama.cpp), greedy.

The image is encoded once per image object, so all strategies and budgets of one question
share one vision pass (the runner passes the same PIL object); each question is a fresh
one-turn conversation.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from runtime.assistant import Assistant
from runtime.model_registry import bundle_path
from runtime.turn import Settings


class LlavaAnswerer:
    """``answer(image, question, strategy, tokens)``: prune the image's tokens, ask the LLM."""

    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant
        self._image: Image.Image | None = None

    def answer(self, image: Image.Image, question: str, strategy: str, tokens: int) -> str:
        """The model's answer (stripped) with ``tokens`` visual tokens kept by ``strategy``."""
        if image is not self._image:
            self.assistant.set_image(image)
            self._image = image
        self.assistant.update(strategy=strategy, tokens=tokens)
        self.assistant.reset()
        return "".join(self.assistant.respond(question)).strip()

    def close(self) -> None:
        self.assistant.close()


def make_answerer(bundle: str | Path, max_tokens: int = 16, threads: int | None = None) -> LlavaAnswerer:
    """The answerer of a bundle holding export.clip's vision files and export.llm's GGUF(s)."""
    settings = Settings(max_tokens=max_tokens, temperature=0.0)
    return LlavaAnswerer(Assistant.open(bundle_path(str(bundle)), settings, threads=threads))
