"""Benchmarks for the receiver: `python -m benchmarks [--quick]` prints one JSON object per line.

Each line is `{"benchmark": NAME, "metric": METRIC, "value": NUMBER, "unit": UNIT}`. Timings
are medians of several runs; ratios are measured within the same run, so they are the figures
to compare across machines. See docs/performance.md.
"""
