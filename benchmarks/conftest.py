"""Settings of the pytest-benchmark suite (benchmarks/test_bench_rnn.py), from the environment:

    FUSED_RNN_BENCH_DEVICE   cpu | cuda          (default: cuda when present)
    FUSED_RNN_BENCH_SHAPE    T,B,H (I = H)       (default: 100,32,256 on a CPU -- PERF.md's CPU target;
                                                  512,16,512 on a GPU)
    FUSED_RNN_BENCH_ROUNDS   timed rounds        (default: 10 on a CPU, 50 on a GPU)
"""
import os

import pytest
import torch


def bench_device():
    return torch.device(os.environ.get("FUSED_RNN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def bench_shape():
    default = "512,16,512" if bench_device().type == "cuda" else "100,32,256"
    T, B, H = (int(v) for v in os.environ.get("FUSED_RNN_BENCH_SHAPE", default).split(","))
    return T, B, H


def bench_rounds():
    return int(os.environ.get("FUSED_RNN_BENCH_ROUNDS", "50" if bench_device().type == "cuda" else "10"))


def bench_dtypes():
    return ("bfloat16", "float32") if bench_device().type == "cuda" else ("float32",)


@pytest.fixture(scope="session")
def nn_medians():
    """torch.nn's median per (layer, pass, dtype), filled as its benchmarks run (they run first),
    so each backend's benchmark can carry its speedup over torch.nn from the same session."""
    return {}
