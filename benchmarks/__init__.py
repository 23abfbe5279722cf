"""Benchmarks for fused_rnn against torch.nn (cuDNN on a GPU, native/oneDNN on a CPU).

    pytest benchmarks/ --benchmark-only     pytest-benchmark suite: every pass, layer and backend
    python -m benchmarks.sweep              a grid -> CSV/JSONL rows, a markdown table, PNG plots

benchmarks/common.py holds what both share (backend choice, inputs, timing, machine description);
benchmarks/report.py turns rows into tables and plots. Method and results: benchmarks/NOTES.md.
"""
