"""The llama.cpp layer: the model and context handles, batches and KV-cache reuse, generation and
sampling, conversation templates, the EntropyPrune/FastV/DART probe, and GGUF header checks.

Imports the numeric core (``runtime.errors``, ``runtime.types``, ``runtime.bundle``) and nothing above it.
"""
