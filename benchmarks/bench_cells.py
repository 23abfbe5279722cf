"""One step of LSTMCell / GRUCell / RNNCell: fused_rnn against torch.nn in the same run.

    python -m benchmarks.bench_cells                    # B 1,8,32,64 x H 128,256,512, 2 and 1 threads
    python -m benchmarks.bench_cells --quick            # a smoke run

A decoder calls its cell once per token, so what counts is one call: the Python around it, the
op dispatch, the two projections and the cell math. Each sample is a block of calls long enough
(~2 ms) for the clock; blocks of torch.nn and fused_rnn alternate, so load on a shared machine
hits both alike; the ratio is torch.nn's median over ours (above 1: fused_rnn is faster); the
best block of each is reported too.
"no-grad" is the forward under torch.no_grad; "grad" is forward + backward of one step
(torch.autograd.grad of h' (and c') with respect to the input, the state and every parameter).
Float32, I = H. The machine's load (`uptime`) is printed with the table.
"""
import argparse
import os
import statistics
import time

import torch
from torch import nn

import fused_rnn

CELLS = {"LSTMCell": (nn.LSTMCell, fused_rnn.LSTMCell), "GRUCell": (nn.GRUCell, fused_rnn.GRUCell),
         "RNNCell": (nn.RNNCell, fused_rnn.RNNCell)}


def make_step(module, kind, B, H, grad):
    """A closure running one step of `module` (no-grad forward, or forward + backward)."""
    g = torch.Generator().manual_seed(B * 1000 + H)
    x, h, c = (torch.randn(B, H, generator=g) for _ in range(3))
    hx = (h, c) if kind == "LSTMCell" else h
    if not grad:
        def run():
            with torch.no_grad():
                module(x, hx)
        return run
    leaves = [x.requires_grad_(), h.requires_grad_()] + ([c.requires_grad_()] if kind == "LSTMCell" else [])
    params = list(module.parameters())
    outs_like = [torch.randn(B, H, generator=g) for _ in range(2 if kind == "LSTMCell" else 1)]

    def run():
        out = module(x, hx)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, leaves + params, outs_like)
    return run


def time_pair(runs, min_blocks, block_s=2e-3, budget_s=3.0):
    """(median, best) seconds per call of each closure over interleaved blocks of calls, warm-up
    excluded. The best block is what the step costs when nothing else runs; the median includes
    the machine's load (on a shared machine a 2-thread step often waits for a descheduled thread)."""
    per_call = []
    for run in runs:  # warm up, and size a block
        for _ in range(5):
            run()
        t0 = time.perf_counter()
        for _ in range(10):
            run()
        per_call.append((time.perf_counter() - t0) / 10)
    reps = [max(1, int(block_s / max(t, 1e-7))) for t in per_call]
    samples = [[] for _ in runs]
    t_start = time.perf_counter()
    while len(samples[0]) < min_blocks or (time.perf_counter() - t_start < budget_s and len(samples[0]) < 4 * min_blocks):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            for _ in range(reps[i]):
                run()
            samples[i].append((time.perf_counter() - t0) / reps[i])
    return [(statistics.median(s), min(s)) for s in samples]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--hidden", nargs="+", type=int, default=[128, 256, 512])
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--passes", nargs="+", default=["no-grad", "grad"], choices=["no-grad", "grad"])
    ap.add_argument("--blocks", type=int, default=15, help="at least this many interleaved blocks per case")
    ap.add_argument("--quick", action="store_true", help="B 1 and 32, H 128, 3 blocks")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.hidden, args.blocks = [1, 32], [128], 3
    load = os.popen("uptime").read().strip()
    lines = [f"fused_rnn cell step vs torch.nn, float32, I = H, median of >= {args.blocks} interleaved blocks",
             f"CPU: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; before: {load}", "",
             "| cell | pass | threads | H | B | torch.nn µs | fused_rnn µs | ratio | best: torch.nn µs | fused_rnn µs | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for kind in args.cells:
            Theirs, Ours = CELLS[kind]
            for pass_ in args.passes:
                for H in args.hidden:
                    for B in args.batch:
                        torch.manual_seed(0)
                        theirs = Theirs(H, H)
                        ours = Ours(H, H)
                        ours.load_state_dict(theirs.state_dict())
                        grad = pass_ == "grad"
                        (t_nn, b_nn), (t_ours, b_ours) = time_pair([make_step(theirs, kind, B, H, grad),
                                                                    make_step(ours, kind, B, H, grad)], args.blocks)
                        line = (f"| {kind} | {pass_} | {threads} | {H} | {B} | {t_nn * 1e6:.1f} | "
                                f"{t_ours * 1e6:.1f} | {t_nn / t_ours:.2f} | {b_nn * 1e6:.1f} | {b_ours * 1e6:.1f} | "
                                f"{b_nn / b_ours:.2f} |")
                        lines.append(line)
                        print(line, flush=True)
    lines += ["", f"after: {os.popen('uptime').read().strip()}"]
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
