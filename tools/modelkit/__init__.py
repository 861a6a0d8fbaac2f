"""Building checkpoints offline for tests and measurements: ``tiny_clip`` and ``llava_parts``
(the tiny LLaVA's pieces), ``llama_tokenizer`` (a SentencePiece tokenizer with LLaMA's layout) and
``shape_checkpoint`` (random-weight checkpoints with the real 7B/13B configs and key names, their
values from ``random_fp16``)."""
