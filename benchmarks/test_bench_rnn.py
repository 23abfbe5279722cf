"""pytest-benchmark suite: forward, forward+backward and inference of LSTM, GRU and RNN, for torch.nn
and every fused_rnn backend, at one shape (see conftest.py for the environment variables).

    pytest benchmarks/ --benchmark-only                          # CPU: T=100 B=32 I=H=256 fp32
    FUSED_RNN_BENCH_SHAPE=512,64,1024 pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Each benchmark is one pass on one of three rotating random input sets, gradients cleared untimed
before each round, warm-up rounds excluded; on a GPU the round ends with a device synchronise (so it is
wall time of a synchronous call; the sweep, `python -m benchmarks.sweep`, times with CUDA events).
Backends that cannot run here are skipped with their reason (`-ra` lists them). extra_info carries the
shape, threads, device and the speedup over torch.nn measured earlier in the same session.
"""
import itertools

import pytest
import torch

from benchmarks import common
from benchmarks.conftest import bench_device, bench_dtypes, bench_rounds, bench_shape
from fused_rnn import backends as fr_backends

N_INPUTS = 3


def _backend_skip_reason(backend, device, dtype, mode):
    if backend == common.NN:
        return None
    if backend == "triton" and device.type != "cuda":
        return "Triton on a CPU device runs in the interpreter: not a speed measurement"
    return fr_backends.unavailable_reason(backend, device, common.DTYPES[dtype], common.CELL[mode], False)


@pytest.mark.parametrize("dtype", bench_dtypes())
@pytest.mark.parametrize("what", common.PASSES)
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("backend", (common.NN,) + fr_backends.BACKENDS)
def test_rnn(benchmark, nn_medians, backend, mode, what, dtype):
    device = bench_device()
    reason = _backend_skip_reason(backend, device, dtype, mode)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    T, B, H = bench_shape()
    case = common.Case("single", mode, T, B, H, H, dtype, None)
    layer = common.build_layer(case, backend, device)
    pairs = common.make_inputs(case, what, device, N_INPUTS)
    run, reset = common.make_pass(layer, what, pairs)
    counter = itertools.count()

    def setup():
        i = next(counter) % N_INPUTS
        reset(i)
        return (i,), {}

    def target(i):
        run(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = f"{mode} {what} {dtype} T={T} B={B} H={H}"
    benchmark.extra_info.update(backend=common.backend_label(backend), mode=mode, what=what, dtype=dtype,
                                T=T, B=B, H=H, I=H, device=device.type, threads=torch.get_num_threads(),
                                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                                cpu=common.cpu_name(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                                tf32_cudnn=torch.backends.cudnn.allow_tf32)
    benchmark.pedantic(target, setup=setup, rounds=bench_rounds(), warmup_rounds=2, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:   # None under --benchmark-disable
        median = stats.stats.median
        key = (mode, what, dtype, T, B, H)
        if backend == common.NN:
            nn_medians[key] = median
        elif key in nn_medians:
            benchmark.extra_info["speedup_vs_nn"] = round(nn_medians[key] / median, 3)
