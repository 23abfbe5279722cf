"""Timing shared by `python -m fused_rnn` and the benchmarks: median of many runs, warm-up excluded,
CUDA events on a GPU, inputs rotated between runs, ratios against torch.nn taken in the same run."""
import statistics
import time

import torch
from torch import nn

import fused_rnn

MODES = {"LSTM": (nn.LSTM, fused_rnn.LSTM), "GRU": (nn.GRU, fused_rnn.GRU), "RNN": (nn.RNN, fused_rnn.RNN)}
PASSES = ("forward", "forward+backward", "inference")


def median_time(fn, n_inputs, warmup=2, repeats=10, device="cpu"):
    """Median seconds of fn(i) over `repeats` calls, i cycling over n_inputs prepared input sets."""
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup):
        fn(i % n_inputs)
    times = []
    for i in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % n_inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(i % n_inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_layer(mode, backend, I, H, num_layers=1, bidirectional=False, device="cpu", dtype=torch.float32):
    """torch.nn's layer when backend is 'nn', else fused_rnn's, with the same weights (same seed)."""
    torch.manual_seed(0)
    cls = MODES[mode][0] if backend == "nn" else MODES[mode][1]
    kwargs = {} if backend == "nn" else {"backend": backend}
    return cls(I, H, num_layers=num_layers, bidirectional=bidirectional, device=device, dtype=dtype, **kwargs)


def time_layer(layer, what, T, B, I, device="cpu", dtype=torch.float32, n_inputs=3, warmup=2, repeats=10):
    """Median seconds of one pass ('forward', 'forward+backward' or 'inference') at [T, B, I]."""
    xs = [torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=what == "forward+backward")
          for _ in range(n_inputs)]
    grads = [torch.randn(T, B, layer.hidden_size * (2 if layer.bidirectional else 1), device=device, dtype=dtype)
             for _ in range(n_inputs)]

    def run(i):
        if what == "inference":
            with torch.no_grad():
                layer(xs[i])
        elif what == "forward":
            layer(xs[i])
        else:
            layer(xs[i])[0].backward(grads[i])
    return median_time(run, n_inputs, warmup, repeats, device)
