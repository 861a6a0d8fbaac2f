"""The independent PyTorch reference path (method.md §4) every runtime number is tested against:
``vision`` (encoder outputs from Hugging Face's own, layer choice, selection, merging), ``baselines``
(uniform, VisionZip, DivPrune), ``pruning``
(every strategy on LLaVA-1.5), ``anyres`` (LLaVA-NeXT per tile), ``llm`` (EntropyPrune, FastV) and
``question`` (CDPruner, DART)."""
