"""What the benchmark scripts share: ``common`` (sample images, tables, medians, decoding, the
1.5 and NeXT vision paths), ``types`` and ``report`` (tools/bench.py's results and outputs),
``proctree`` (time and peak memory of a process tree), ``flops_model`` (tools/flops.py's cost
model) and ``rehearse_report`` (tools/rehearse.py's tables)."""
