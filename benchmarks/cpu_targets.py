"""`python -m benchmarks.cpu_targets`: the CPU targets' grid (float32, T=100, I=H), fused_rnn's `cpu`
backend against torch.nn with the runs of the two interleaved, so that both see the same load.

Per shape: torch.nn and fused_rnn alternate, `--repeats` runs each after one warm-up; the row keeps
both medians of wall time and of process CPU time (all threads), their ratios (torch.nn / ours),
the bytes each holds for the backward (the tensors autograd saves, counted with saved-tensor
hooks: the training memory between forward and backward; the module's own parameters, held
anyway, are not counted), the peak memory of one forward + backward (below), and the 1-minute
load average.

Peak memory (`*_peak_MB`, forward+backward rows): the most CPU memory one training call holds at
once beyond what was held before it — activations, saved tensors, workspaces, gradients — from the
allocations and frees that torch.profiler records (profile_memory=True) during one untimed call:
torch's CPU allocator and the recycling allocator of fused_rnn's CPU ops report to it alike.
`fused_held_MB`: what fused_rnn's CPU ops keep between calls besides (the packed-weight cache,
csrc/cpu/packed_weight_cache.h); freed blocks waiting in the recycling pool are reused, not held
for a tensor, and are not counted (as the CUDA caching allocator's reserved memory is not).
The GEMM floor (`gflop`, `gemm_GFs`, `floor_ms`, `nn_of_floor`, `fused_of_floor`): a layer's call is
GEMMs and a little pointwise work, so no implementation on this machine is faster than its GEMM
FLOPs at the machine's GEMM rate. `gflop`: per layer and direction, x W_ih^T and h W_hh^T over the
valid (t, b) steps, 2 * steps * G*H * (I + H) (G gate rows per unit: LSTM 4, GRU 3, RNN 1); a
training call does three times that (the backward's d h, d x, d w_ih and d w_hh). `gemm_GFs`: torch's
own GEMM in the row's dtype (benchmarks/floor.py: a [2048, 1024] x [1024, 1024] product; the
fastest run at that thread count over the whole grid, 15 runs before the first row and 3 more before
each: a bound takes the best the machine did, and on a shared machine a single measurement can be
slow; rows print with the best so far and are written to `--out` with the run's best at the end) — for
a 16-bit dtype that torch multiplies in a scalar loop on this CPU (`fused_rnn._C.cpu_gemm_via_fp32`),
the fp32 rate, at which fused_rnn multiplies it. Where torch's GEMM is below the machine's FMA peak
(MKL on an AMD CPU), fused_rnn's microkernel can beat it: `fused_of_floor` above 1.
`floor_ms` = gflop / gemm_GFs; `*_of_floor` = floor_ms / that side's wall ms: 1.0 runs at the GEMM
rate, and a ratio against torch.nn above 1 / nn_of_floor cannot be reached.

On a loaded machine the wall-time ratio is the fair one only when both sides see the same load —
hence the interleaving; with 1 thread the CPU-time ratio is nearly load-independent.

    python -m benchmarks.cpu_targets --threads 1,2 --out benchmarks/results/cpu-targets.csv
    python -m benchmarks.cpu_targets --num-layers 2 --bidirectional --packed   # stacks, packed batches
    python -m benchmarks.cpu_targets --breakdown --threads 1 --B 64 --H 256,512  # where the time goes

`--breakdown` times the parts of one layer's call instead (medians of the same interleaved runs):
the input projection x W_ih^T over T*B rows, the recurrence op alone (forward without and with
what the backward saves, and its backward: the fused loop plus d w_hh), the large GEMMs of the
backward that run outside the loop (dG^T h for d w_hh, dG W_ih for d x, dG^T x for d w_ih), and
torch.nn's and our whole call. The split inside the fused loop (GEMM, cell math, barrier) needs
timers (rdtsc) around its phases in csrc/cpu/fused_cpu_kernels.h, which the code does not keep.
"""
import argparse
import csv
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import functional
from fused_rnn.ops.cpp import ops

from benchmarks import floor

FIELDS = ["date", "load1", "threads", "layer", "pass", "dtype", "T", "B", "H", "nn_ms", "fused_ms", "ratio_wall",
          "nn_cpu_ms", "fused_cpu_ms", "ratio_cpu", "nn_saved_MB", "fused_saved_MB", "nn_peak_MB", "fused_peak_MB",
          "fused_held_MB", "gflop", "gemm_GFs", "floor_ms", "nn_of_floor", "fused_of_floor"]
_GEMM_RATE = {}


def gemm_rate(dtype):
    """GFLOP/s of torch's GEMM on this machine at the current thread count (see the module's docstring)."""
    key = (dtype, torch.get_num_threads())
    name = str(dtype).removeprefix("torch.")
    if dtype in (torch.bfloat16, torch.float16) and ops.load_error() is None and fused_rnn._C.cpu_gemm_via_fp32(name):
        dtype = torch.float32
    rate = floor.gemm_rate(2048, 1024, 1024, dtype=dtype, repeats=3 if key in _GEMM_RATE else 15, stat=min) / 1e9
    _GEMM_RATE[key] = max(rate, _GEMM_RATE.get(key, 0.0))
    return _GEMM_RATE[key]


def with_floor(row, rate, gflop, nn_ms, fused_ms):
    """`row` with its floor columns (gemm_GFs, floor_ms, *_of_floor) at GEMM rate `rate` (GFLOP/s),
    from the unrounded GFLOP and medians (ms) of its call."""
    floor_ms = gflop / rate * 1e3
    return dict(row, gemm_GFs=f"{rate:.0f}", floor_ms=f"{floor_ms:.2f}", nn_of_floor=f"{floor_ms / nn_ms:.2f}",
                fused_of_floor=f"{floor_ms / fused_ms:.2f}")


def gemm_gflop(layer, what, steps, H, num_layers=1, bidirectional=False):
    """The GEMM GFLOP of one call over `steps` valid (t, b) rows, I = H (see the module's docstring)."""
    dirs = 2 if bidirectional else 1
    per_step = sum(dirs * 2 * floor.GATES[layer] * H * ((H if i == 0 else dirs * H) + H) for i in range(num_layers))
    return per_step * steps * (3 if what == "forward+backward" else 1) / 1e9


def saved_bytes(fn, params=()):
    """Bytes of the distinct storages autograd saves while `fn` runs its forward, without those of
    `params` (the module's parameters, held whether or not a backward follows)."""
    seen = {}
    held = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in held:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # opaque tensors (mkldnn) report their size
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def profiled_allocations(fn):
    """(address, bytes) of each allocation (+) and free (-) of CPU memory that torch.profiler records
    while `fn` runs (profile_memory=True), in the order they happened."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    found = []

    def walk(node):
        if node.typed[0] == _EventType.Allocation:
            found.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return [(ptr, size) for _, ptr, size in sorted(found, key=lambda e: e[0])]


def peak_bytes(fn):
    """The most bytes of CPU memory that `fn` holds at once beyond what was held before it: the running
    sum of profiled_allocations. A block allocated before the call and freed during it is not
    recorded (the profiler does not know its size), so `fn` should free nothing it did not allocate
    (set gradients to None before)."""
    live = peak = 0
    for _, size in profiled_allocations(fn):
        live += size
        peak = max(peak, live)
    return peak


def run_interleaved(fns, repeats):
    """Medians (ms) of wall and process CPU time of each function, the runs of all interleaved."""
    for f in fns:
        f()  # warm-up
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            w, c = time.perf_counter(), time.process_time()
            f()
            wall[i].append(time.perf_counter() - w)
            cpu[i].append(time.process_time() - c)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    return [med(x) for x in wall], [med(x) for x in cpu]


def run_pair(f_nn, f_ours, repeats):
    (nw, fw), (nc, fc) = run_interleaved((f_nn, f_ours), repeats)
    return nw, fw, nc, fc


def measure(layer, what, B, H, dtype, T, repeats, num_layers=1, bidirectional=False, packed=False):
    """Medians (wall and CPU ms of torch.nn and ours), saved bytes and peak bytes (0 for forward)
    of one shape, the bytes of fused_rnn's packed-weight cache after it, and the valid (t, b) steps
    (T*B, or the sum of the lengths). packed: the
    input as a PackedSequence of lengths drawn in [T/2, T] (one of them T), packed inside the timed
    call on both sides, as a training loop does."""
    torch.manual_seed(0)
    if ops.load_error() is None:
        fused_rnn._C.cpu_weight_cache_clear()  # fused_held_MB: this shape's panels only
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
        saved = peak = (0, 0)
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
        saved = (saved_bytes(lambda: run(nn, xr), list(nn.parameters())),
                 saved_bytes(lambda: run(ours, xr), list(ours.parameters())))

        def training_peak(m):
            call(m)()  # warm: what the first call allocates once is not part of a training step's peak
            for q in m.parameters():
                q.grad = None
            xr.grad = None
            return peak_bytes(lambda: run(m, xr).backward(dy))
        peak = (training_peak(nn), training_peak(ours))
    t = run_pair(call(nn), call(ours), repeats)
    held = fused_rnn._C.cpu_weight_cache_stats()[3] if ops.load_error() is None else 0
    return t, saved, peak, held, int(lengths.sum()) if packed else T * B


def breakdown(layer, B, H, dtype, T, repeats):
    """The parts of one layer's call (see the module's docstring): {name: (wall ms, CPU ms)}, and
    the GFLOP of one GEMM over all steps (T*B x H x G*H: the projection, the recurrence's, each of the
    backward's three)."""
    torch.manual_seed(0)
    cell = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}[layer]
    nn = getattr(torch.nn, layer)(H, H, dtype=dtype)
    ours = getattr(fused_rnn, layer)(H, H, backend="cpu", dtype=dtype)
    ours.load_state_dict(nn.state_dict())
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in nn.parameters())
    x = torch.randn(T, B, H, dtype=dtype)
    xr = x.clone().requires_grad_()
    h0 = torch.randn(B, H, dtype=dtype)
    c0 = torch.randn(B, H, dtype=dtype) if cell == "lstm" else None
    gx, b_step, _ = functional._input_projection(cell, x, w_ih, b_ih, b_hh)  # what the layer hands the op
    assert ops.load_error() is None, ops.load_error()
    rec = torch.ops.fused_rnn

    def forward(save):
        return rec.recurrence_forward(cell, gx, h0, c0, w_hh, b_step, None, None, False, save)

    y, h_n, c_n, gates, cells, proj_in = forward(True)
    dy, dh_n = torch.randn_like(y), torch.randn_like(h_n)
    dc_n = torch.randn_like(c_n) if cell == "lstm" else None
    dG, hs, xs = torch.randn(T * B, gx.shape[2], dtype=dtype), y.reshape(T * B, H), x.reshape(T * B, H)

    def train(m):
        for p in m.parameters():
            p.grad = None
        xr.grad = None
        m(xr)[0].backward(torch.ones_like(y))

    parts = {
        "nn no-grad": lambda: nn(x), "ours no-grad": lambda: ours(x), "proj x.W_ih^T": lambda: F.linear(x, w_ih),
        "rec fwd": lambda: forward(False), "rec fwd+save": lambda: forward(True),
        "rec bwd": lambda: rec.recurrence_backward(cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh,
                                                   None, None, False),
        "dG^T.h": lambda: torch.mm(dG.t(), hs), "dG.W_ih": lambda: torch.mm(dG, w_ih),
        "dG^T.x": lambda: torch.mm(dG.t(), xs),
        "nn fwd+bwd": lambda: train(nn), "ours fwd+bwd": lambda: train(ours)}
    with torch.no_grad():
        no_grad = {k: v for k, v in parts.items() if "fwd+bwd" not in k}
        wall, cpu = run_interleaved(list(no_grad.values()), repeats)
    res = dict(zip(no_grad, zip(wall, cpu)))
    wall, cpu = run_interleaved([parts["nn fwd+bwd"], parts["ours fwd+bwd"]], repeats)
    res.update(zip(("nn fwd+bwd", "ours fwd+bwd"), zip(wall, cpu)))
    return res, 2 * T * B * gx.shape[2] * H / 1e9


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
    p.add_argument("--breakdown", action="store_true", help="the parts of one layer's call (see above)")
    args = p.parse_args(argv)
    unknown = set(args.passes.split(",")) - {"forward", "forward+backward"}
    if unknown:  # any other name would silently time forward+backward
        p.error(f"--passes takes forward and/or forward+backward, not {', '.join(sorted(unknown))}")
    dtype = getattr(torch, args.dtype)
    if args.breakdown:
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for layer in args.layers.split(","):
                for H in map(int, args.H.split(",")):
                    for B in map(int, args.B.split(",")):
                        res, gflop = breakdown(layer, B, H, dtype, args.T, args.repeats)
                        print(f"{layer} threads={threads} B={B} H={H} T={args.T} load={os.getloadavg()[0]:.1f}; "
                              f"one T*B x H x G*H GEMM = {gflop:.2f} GFLOP; median wall / CPU ms (CPU GFLOP/s):")
                        one_gemm = ("proj x.W_ih^T", "rec fwd", "dG^T.h", "dG.W_ih", "dG^T.x")
                        for k, (w, c) in res.items():
                            rate = f" ({gflop / c * 1e3:.0f})" if k in one_gemm else ""
                            print(f"  {k:>14s} {w:8.2f} {c:8.2f}{rate}", flush=True)
        return
    earlier = []  # the rows --out held before this run
    if args.out and os.path.exists(args.out):
        with open(args.out, newline="") as old:
            reader = csv.DictReader(old)
            if reader.fieldnames != FIELDS:  # appended rows would land under other columns
                p.error(f"{args.out} has other columns ({','.join(reader.fieldnames or [])}); write to a new file")
            earlier = list(reader)
    rows = []  # (row, (gflop, nn ms, fused ms)) of this run

    def write_out():
        """--out: the earlier rows, then this run's with the floor at the run's best GEMM rate per
        thread count (the rate climbs while the grid runs: the first rows' floors, taken at the best
        so far, would be too low). Written after every row, so that a stopped run keeps its rows."""
        if not args.out:
            return
        best = {threads: _GEMM_RATE[(dtype, threads)] for threads in {r["threads"] for r, _ in rows}}
        with open(args.out + ".tmp", "w", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS)
            writer.writeheader()
            writer.writerows(earlier + [with_floor(r, best[r["threads"]], *exact) for r, exact in rows])
        os.replace(args.out + ".tmp", args.out)
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
                        (nw, fw, nc, fc), (ns, fs), (n_peak, f_peak), held, steps = measure(
                            layer, what, B, H, dtype, args.T, args.repeats, args.num_layers, args.bidirectional,
                            args.packed)
                        gflop = gemm_gflop(layer, what, steps, H, args.num_layers, args.bidirectional)
                        rate = gemm_rate(dtype)
                        row = dict(date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                   load1=f"{os.getloadavg()[0]:.1f}", threads=threads, layer=layer + config,
                                   dtype=args.dtype,
                                   T=args.T, B=B, H=H, nn_ms=f"{nw:.2f}", fused_ms=f"{fw:.2f}",
                                   ratio_wall=f"{nw / fw:.2f}", nn_cpu_ms=f"{nc:.2f}", fused_cpu_ms=f"{fc:.2f}",
                                   ratio_cpu=f"{nc / fc:.2f}", nn_saved_MB=f"{ns / 2**20:.1f}",
                                   fused_saved_MB=f"{fs / 2**20:.1f}", nn_peak_MB=f"{n_peak / 2**20:.1f}",
                                   fused_peak_MB=f"{f_peak / 2**20:.1f}", fused_held_MB=f"{held / 2**20:.1f}",
                                   gflop=f"{gflop:.3f}", **{"pass": what})
                        exact = (gflop, nw, fw)
                        row = with_floor(row, rate, *exact)
                        print(" ".join(f"{str(row[f]):>9s}" for f in FIELDS[1:]), flush=True)
                        rows.append((row, exact))
                        write_out()
    if args.out:
        used = sorted({r["threads"] for r, _ in rows})
        rates = ", ".join(f"{t} thread(s) {_GEMM_RATE[(dtype, t)]:.0f}" for t in used)
        print(f"{args.out}: floors at the run's best GEMM rate, GFLOP/s: {rates}")


if __name__ == "__main__":
    main()
