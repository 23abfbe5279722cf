"""`python -m benchmarks.cpu_targets`: the CPU targets' grid (float32, T=100, I=H), fused_rnn's `cpu`
backend against torch.nn with the runs of the two interleaved, so that both see the same load.

Per shape: torch.nn and fused_rnn alternate, `--repeats` runs each after one warm-up; the row keeps
both medians of wall time and of process CPU time (all threads), their ratios (torch.nn / ours),
the bytes each holds for the backward (the tensors autograd saves, counted with saved-tensor
hooks: the training memory between forward and backward), and the 1-minute load average.
On a loaded machine the wall-time ratio is the fair one only when both sides see the same load —
hence the interleaving; with 1 thread the CPU-time ratio is nearly load-independent.

    python -m benchmarks.cpu_targets --threads 1,2 --out benchmarks/results/cpu-targets.csv
    python -m benchmarks.cpu_targets --num-layers 2 --bidirectional --packed   # stacks, packed batches
"""
import argparse
import csv
import os
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn

FIELDS = ["date", "load1", "threads", "layer", "pass", "dtype", "T", "B", "H", "nn_ms", "fused_ms", "ratio_wall",
          "nn_cpu_ms", "fused_cpu_ms", "ratio_cpu", "nn_saved_MB", "fused_saved_MB"]


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while `fn` runs its forward."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # opaque tensors (mkldnn) report their size
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def run_pair(f_nn, f_ours, repeats):
    f_nn(), f_ours()  # warm-up
    wall = ([], [])
    cpu = ([], [])
    for _ in range(repeats):
        for i, f in enumerate((f_nn, f_ours)):
            w, c = time.perf_counter(), time.process_time()
            f()
            wall[i].append(time.perf_counter() - w)
            cpu[i].append(time.process_time() - c)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    return med(wall[0]), med(wall[1]), med(cpu[0]), med(cpu[1])


def measure(layer, what, B, H, dtype, T, repeats, num_layers=1, bidirectional=False, packed=False):
    """Medians (wall and CPU ms of torch.nn and ours) and saved bytes of one shape. packed: the
    input as a PackedSequence of lengths drawn in [T/2, T] (one of them T), packed inside the timed
    call on both sides, as a training loop does."""
    torch.manual_seed(0)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, dtype=dtype)
    nn = getattr(torch.nn, layer)(H, H, **kw)
    ours = getattr(fused_rnn, layer)(H, H, backend="cpu", **kw)
    ours.load_state_dict(nn.state_dict())
    x = torch.randn(T, B, H, dtype=dtype)
    lengths = torch.randint(T // 2, T + 1, (B,))
    lengths[0] = T

    def run(m, inp):
        if not packed:
            return m(inp)[0]
        return m(pack_padded_sequence(inp, lengths, enforce_sorted=False))[0].data

    if what == "forward":
        def call(m):
            def f():
                with torch.no_grad():
                    run(m, x)
            return f
        saved = (0, 0)
    else:
        xr = x.clone().requires_grad_()
        with torch.no_grad():
            dy = torch.randn_like(run(nn, x))

        def call(m):
            def f():
                for p in m.parameters():
                    p.grad = None
                xr.grad = None
                run(m, xr).backward(dy)
            return f
        saved = (saved_bytes(lambda: run(nn, xr)), saved_bytes(lambda: run(ours, xr)))
    t = run_pair(call(nn), call(ours), repeats)
    return t, saved


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_targets", description=__doc__)
    p.add_argument("--threads", default="2,1")
    p.add_argument("--layers", default="LSTM,GRU")
    p.add_argument("--passes", default="forward,forward+backward")
    p.add_argument("--H", default="128,256,512")
    p.add_argument("--B", default="1,8,32,64")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--packed", action="store_true", help="a PackedSequence of lengths in [T/2, T]")
    p.add_argument("--out", default=None, help="CSV to append rows to")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    writer = None
    if args.out:
        new = not os.path.exists(args.out)
        fh = open(args.out, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        writer = csv.DictWriter(fh, FIELDS)
        if new:
            writer.writeheader()
    # the stack in the layer column (e.g. LSTM-2L-bidir-packed), so that one CSV holds every kind of row
    config = ((f"-{args.num_layers}L" if args.num_layers > 1 else "") + ("-bidir" if args.bidirectional else "")
              + ("-packed" if args.packed else ""))
    print(" ".join(f"{f:>9s}" for f in FIELDS[1:]))
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for layer in args.layers.split(","):
            for what in args.passes.split(","):
                for H in map(int, args.H.split(",")):
                    for B in map(int, args.B.split(",")):
                        (nw, fw, nc, fc), (ns, fs) = measure(layer, what, B, H, dtype, args.T, args.repeats,
                                                             args.num_layers, args.bidirectional, args.packed)
                        row = dict(date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                   load1=f"{os.getloadavg()[0]:.1f}", threads=threads, layer=layer + config,
                                   dtype=args.dtype,
                                   T=args.T, B=B, H=H, nn_ms=f"{nw:.2f}", fused_ms=f"{fw:.2f}",
                                   ratio_wall=f"{nw / fw:.2f}", nn_cpu_ms=f"{nc:.2f}", fused_cpu_ms=f"{fc:.2f}",
                                   ratio_cpu=f"{nc / fc:.2f}", nn_saved_MB=f"{ns / 2**20:.1f}",
                                   fused_saved_MB=f"{fs / 2**20:.1f}", **{"pass": what})
                        print(" ".join(f"{str(row[f]):>9s}" for f in FIELDS[1:]), flush=True)
                        if writer:
                            writer.writerow(row)
                            fh.flush()


if __name__ == "__main__":
    main()
