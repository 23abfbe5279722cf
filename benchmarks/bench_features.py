"""The cost on the CPU of zoneout, the layer-normalised LSTM/GRU and double backward, each against
the plain layer of the same backend in the same run.

    python -m benchmarks.bench_features                       # cpu and torch backends, T=50 B=16 H=256
    python -m benchmarks.bench_features --quick               # a smoke run
    python -m benchmarks.bench_features --out benchmarks/results/features-cpu.md

Variants: plain (LSTM / GRU), plain-per-step (the cpu backend's per-step kernels, which zoneout and
layer norm run on, instead of its fused recurrence: FUSED_RNN_CPU_KERNEL=per-step; the same as plain
on the torch backend), zoneout 0.1 in training (masks drawn per call) and in eval,
LayerNormLSTM / LayerNormGRU, the layer-normalised layer with zoneout, and double backward of the
plain layer (a gradient penalty: grad of y.sum() in every parameter with create_graph=True, then
backward of the squared norm of those grads). Passes: forward+backward in training (the first five)
and, for double backward, that whole penalty step. Samples of the variants alternate, so load on a
shared machine hits all alike; the table gives each variant's median and its ratio to the plain
layer's median (above 1: slower). Float32, one layer, I = H. The machine's load (`uptime`) is
printed with the table.
"""
import argparse
import os
import statistics
import time

import torch

import fused_rnn

VARIANTS = ("plain", "plain-per-step", "zoneout-train", "zoneout-eval", "layer-norm", "layer-norm+zoneout", "double-backward")


def make_module(cell, variant, backend, H):
    torch.manual_seed(0)
    ln = variant.startswith("layer-norm")
    cls = getattr(fused_rnn, ("LayerNorm" if ln else "") + cell)
    zoneout = 0.1 if "zoneout" in variant else 0.0
    m = cls(H, H, zoneout=zoneout, backend=backend)
    m.train(variant != "zoneout-eval")
    return m


def make_run(m, variant, x):
    params = list(m.parameters())

    def run():
        if variant == "plain-per-step":
            os.environ["FUSED_RNN_CPU_KERNEL"] = "per-step"  # read by the C++ op at each call
        try:
            step()
        finally:
            os.environ.pop("FUSED_RNN_CPU_KERNEL", None)

    def step():
        y = m(x)[0]
        if variant == "double-backward":
            grads = torch.autograd.grad(y.sum(), params, create_graph=True)
            penalty = sum((g * g).sum() for g in grads)
            torch.autograd.grad(penalty, params)
        else:
            torch.autograd.grad(y.sum(), params)
    return run


def measure(cell, backend, T, B, H, repeats):
    """{variant: list of seconds}, the variants' samples interleaved."""
    x = torch.randn(T, B, H)
    runs = {v: make_run(make_module(cell, v, backend, H), v, x) for v in VARIANTS}
    for run in runs.values():  # warm-up
        run()
        run()
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v, run in runs.items():
            s = time.perf_counter()
            run()
            times[v].append(time.perf_counter() - s)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="cpu,torch")
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="T=5, H=32, 3 repeats")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    a = ap.parse_args(argv)
    if a.quick:
        a.T, a.H, a.repeats = 5, 32, 3
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    lines = [f"# Cost of zoneout, layer norm and double backward (CPU, float32)", "",
             f"T={a.T} B={a.B} H=I={a.H}, {a.threads} thread(s), median of {a.repeats} interleaved samples; "
             f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}", "",
             "| cell | backend | variant | median ms | × plain |", "|---|---|---|---|---|"]
    for backend in a.backends.split(","):
        for cell in ("LSTM", "GRU"):
            times = measure(cell, backend, a.T, a.B, a.H, a.repeats)
            plain = statistics.median(times["plain"])
            for v in VARIANTS:
                med = statistics.median(times[v])
                lines.append(f"| {cell} | {backend} | {v} | {med * 1e3:.2f} | {med / plain:.2f} |")
    load = os.getloadavg()
    lines += ["", f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
