"""Timing shared by `python -m fused_rnn` and the benchmarks (benchmarks/common.py, sweep.py):
every sample kept (so the spread is known), warm-up excluded, CUDA events around each run on a GPU,
inputs rotated between runs, gradients cleared outside the timed region, and ratios against
torch.nn taken in the same run by the callers."""
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fused_rnn

MODES = {"LSTM": (nn.LSTM, fused_rnn.LSTM), "GRU": (nn.GRU, fused_rnn.GRU), "RNN": (nn.RNN, fused_rnn.RNN)}
PASSES = ("forward", "forward+backward", "inference")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sample_times(run, n_inputs, device, reset=None, warmup=2, warmup_s=0.0, min_repeats=5, max_repeats=50,
                 budget_s=1.0):
    """Seconds of each timed run(i), i rotating over n_inputs input sets; reset(i) runs untimed before.

    Warm-up: at least `warmup` calls and `warmup_s` seconds (cuDNN algorithm choice, Triton compiles,
    allocator growth), none of it timed. Then at least min_repeats and at most max_repeats runs,
    stopping once budget_s seconds have passed. On a GPU each run is timed by CUDA events around it
    and the device is synchronised after it, so one run never overlaps the next.
    """
    reset = reset or (lambda i: None)
    cuda = torch.device(device).type == "cuda"
    k, t0 = 0, time.perf_counter()
    while k < warmup or (time.perf_counter() - t0 < warmup_s and k < 50):
        reset(k % n_inputs)
        run(k % n_inputs)
        _sync(device)
        k += 1
    times, t0 = [], time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - t0 < budget_s):
        i = (k + len(times)) % n_inputs
        reset(i)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            s = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - s)
    return times


def summarize(times):
    """median, min and the 20th/80th percentiles (the spread) of a list of seconds."""
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_s": statistics.median(times), "min_s": min(times), "p20_s": q[0], "p80_s": q[3],
            "repeats": len(times)}


def median_time(run, n_inputs, device="cpu", reset=None, **kwargs):
    """Median seconds of run(i) (see sample_times)."""
    return statistics.median(sample_times(run, n_inputs, device, reset, **kwargs))


def make_layer(mode, backend, I, H, num_layers=1, bidirectional=False, device="cpu", dtype=torch.float32):
    """torch.nn's layer when backend is 'nn', else fused_rnn's, with the same weights (same seed)."""
    torch.manual_seed(0)
    cls = MODES[mode][0] if backend == "nn" else MODES[mode][1]
    kwargs = {} if backend == "nn" else {"backend": backend}
    return cls(I, H, num_layers=num_layers, bidirectional=bidirectional, device=device, dtype=dtype, **kwargs)


def make_pass(layer, what, pairs):
    """(run(i), reset(i)): run does one pass on input set i; reset clears gradients, untimed."""
    def output(i):
        y = layer(pairs[i][0])[0]
        return y.data if isinstance(y, PackedSequence) else y

    def run(i):
        if what == "inference":
            with torch.no_grad():
                output(i)
        elif what == "forward":
            output(i)
        else:
            output(i).backward(pairs[i][1])

    def reset(i):
        if what == "forward+backward":
            for p in layer.parameters():
                p.grad = None
            x = pairs[i][0]
            (x.data if isinstance(x, PackedSequence) else x).grad = None
    return run, reset


def _input_pairs(layer, what, T, B, I, device, dtype, n_inputs):
    """n_inputs (input [T, B, I], output gradient) pairs for make_pass."""
    out = layer.hidden_size * (2 if layer.bidirectional else 1)
    return [(torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=what == "forward+backward"),
             torch.randn(T, B, out, device=device, dtype=dtype)) for _ in range(n_inputs)]


def time_layer(layer, what, T, B, I, device="cpu", dtype=torch.float32, n_inputs=3, **kwargs):
    """Median seconds of one pass ('forward', 'forward+backward' or 'inference') at [T, B, I]."""
    run, reset = make_pass(layer, what, _input_pairs(layer, what, T, B, I, device, dtype, n_inputs))
    return median_time(run, n_inputs, device, reset, **kwargs)


def time_layers_interleaved(layers, what, T, B, I, device="cpu", dtype=torch.float32, repeats=9, warmup=2,
                            n_inputs=2):
    """Median seconds of one pass of each layer ({name: layer}) at [T, B, I], the layers' runs taken in
    turn (one of each per round, `warmup` rounds untimed), so a change of load reaches all alike."""
    passes = {name: make_pass(layer, what, _input_pairs(layer, what, T, B, I, device, dtype, n_inputs))
              for name, layer in layers.items()}
    samples = {name: [] for name in layers}
    for k in range(warmup + repeats):
        for name, (run, reset) in passes.items():
            reset(k % n_inputs)
            _sync(device)
            t = time.perf_counter()
            run(k % n_inputs)
            _sync(device)
            if k >= warmup:
                samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) for name, s in samples.items()}
