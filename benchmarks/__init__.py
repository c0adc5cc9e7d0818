"""Benchmarks for the core of rayhooks, run as ``python -m benchmarks [--quick] [--only NAME]``.

Each benchmark module exposes ``NAME``, ``TITLE`` and ``run(quick=False, tiny=False)``
returning a `benchmarks.common.BenchResult`: a table and the targets, each MET or
MISSED. Figures are medians over repeats with min and max, and every comparison
is a ratio against an anchor measured in the same run on the same machine,
because the machines these run on are shared and noisy.
"""

BENCHMARKS = ("step_overhead", "checkpoint_stall", "ray", "chief", "storage", "throughput")
