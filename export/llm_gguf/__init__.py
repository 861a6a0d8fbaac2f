"""The language model to GGUF for ``export.llm``: our own LLaMA/Mistral ``converter``, its
SentencePiece ``vocab``, the EntropyPrune/FastV/DART ``probe`` cut, and ``quantize``."""
