"""LLaVA-NeXT ("anyres", method.md §5–6): tile geometry, preprocessing, the per-tile budget split,
per-tile pruning through the 1.5 strategies, packing with ``image_newline`` rows and positions.

Built on the numeric core, ``runtime.strategies`` and ``runtime.llm`` (the probe); the front ends use it.
"""
