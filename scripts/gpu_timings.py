"""GPU timings (stage 1 of scripts/gpu_check.sh): one LSTM layer, torch.nn (cuDNN) vs the cuda backend's
per-step and persistent kernels vs the Triton kernels (per warp count), forward and forward+backward,
CUDA events around each pass, median of --reps runs after warm-up, 3 rotating random input sets.

    python scripts/gpu_timings.py [--reps 10] [--triton-warps 2,4,8] [--csv out.csv] [--list]
                                  [--cases lstm:1024:16:256:bf16,...] [--backends nn,persistent]
                                  [--passes forward]

fp32 rows run once with TF32 off and once on (torch.backends.cuda.matmul.allow_tf32 and
torch.backends.cudnn.allow_tf32 both set), so every backend computes at the same precision.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (cell, T, B, H, dtype, tf32): the shapes of benchmarks/PERSISTENT_V2.md's budget
CASES = [("lstm", 1024, 16, 768, "bf16", False), ("lstm", 1024, 16, 768, "fp16", False),
         ("lstm", 512, 64, 512, "bf16", False),
         ("lstm", 512, 64, 512, "fp32", False), ("lstm", 512, 64, 512, "fp32", True),
         ("lstm", 1024, 16, 256, "bf16", False), ("lstm", 1024, 16, 1024, "bf16", False),
         ("lstm", 256, 256, 1024, "bf16", False), ("gru", 1024, 16, 768, "bf16", False)]
PASSES = ("forward", "forward+backward")


def timed_ms(run, reset, reps, n_inputs=3, warmup=3):
    import torch

    for i in range(warmup):
        reset(i % n_inputs)
        run(i % n_inputs)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        reset(i % n_inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(i % n_inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer_for(backend, cell, H, dtype, nn_layer):
    import fused_rnn

    if backend == "nn":
        return nn_layer
    layer = getattr(fused_rnn, cell.upper())(H, H, backend="triton" if backend.startswith("triton") else "cuda",
                           device="cuda", dtype=dtype)
    layer.load_state_dict(nn_layer.state_dict())
    return layer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--triton-warps", default="", help="warp counts to time the Triton kernels with, besides "
                   "the launcher's own choice (column `triton`), e.g. 2,4,8")
    p.add_argument("--csv", default=None)
    p.add_argument("--list", action="store_true", help="print what would be timed and exit (no GPU needed)")
    p.add_argument("--cases", default=None, help="comma-separated cell:T:B:H:dtype[:tf32] (dtype bf16, fp16 "
                   "or fp32) instead of the budget's shapes")
    p.add_argument("--backends", default=None, help="comma-separated subset of the columns to time")
    p.add_argument("--passes", default=",".join(PASSES), help="forward and/or forward+backward")
    args = p.parse_args()
    warps = [int(w) for w in args.triton_warps.split(",") if w]
    backends = ["nn", "per-step", "persistent", "triton"] + [f"triton-w{w}" for w in warps]
    if args.backends:
        backends = [b for b in args.backends.split(",") if b]
    passes = [w for w in args.passes.split(",") if w]
    cases = CASES if args.cases is None else [
        (c[0], int(c[1]), int(c[2]), int(c[3]), c[4], len(c) > 5 and c[5] == "tf32")
        for c in (case.split(":") for case in args.cases.split(",") if case)]
    if args.list:
        for case in cases:
            print(case, passes, backends)
        return 0

    import torch

    from fused_rnn.ops.cpp import cuda_backend
    from fused_rnn.ops.triton_rnn import launcher

    choose = launcher.choose_config
    rows = []
    print(f"{'cell':4s} {'T':>5s} {'B':>4s} {'H':>5s} {'dtype':6s} {'pass':17s} " + " ".join(f"{b:>11s}" for b in backends)
          + "   (ms, median)", flush=True)
    for cell, T, B, H, dtype_name, tf32 in cases:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(0)
        nn_layer = getattr(torch.nn, cell.upper())(H, H, device="cuda", dtype=dtype)
        inputs = [(torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=True),
                   torch.randn(T, B, H, device="cuda", dtype=dtype)) for _ in range(3)]
        label = f"{dtype_name}{'+tf32' if tf32 else ''}"
        for what in passes:
            times = []
            for backend in backends:
                os.environ["FUSED_RNN_CUDA_PERSISTENT"] = "1" if backend == "persistent" else "0"
                if backend == "persistent":
                    chosen = cuda_backend.kernel_for(cell, dtype, H, B)
                    if what == passes[0]:
                        print(f"# {cell} B={B} H={H} {label}: {chosen}", flush=True)
                    if not chosen.startswith("persistent"):
                        times.append(float("nan"))
                        continue
                if backend.startswith("triton-w"):
                    w = int(backend[len("triton-w"):])
                    launcher.choose_config = lambda *a, w=w, **k: replace(choose(*a, **k), num_warps=w)
                    launcher._PLANS.clear()
                layer = layer_for(backend, cell, H, dtype, nn_layer)

                def run(i, layer=layer, what=what):
                    y = layer(inputs[i][0])[0]
                    if what == "forward+backward":
                        y.backward(inputs[i][1])

                def reset(i, layer=layer):
                    for t in [*layer.parameters(), inputs[i][0]]:
                        t.grad = None
                try:
                    times.append(timed_ms(run, reset, args.reps))
                except Exception as e:  # noqa: BLE001 - one failing backend must not hide the others' rows
                    print(f"  {backend} failed: {type(e).__name__}: {e}", flush=True)
                    times.append(float("nan"))
                finally:
                    launcher.choose_config = choose
            rows.append(dict(cell=cell, T=T, B=B, H=H, dtype=label, what=what, **dict(zip(backends, times))))
            print(f"{cell:4s} {T:5d} {B:4d} {H:5d} {label:6s} {what:17s} " + " ".join(f"{t:11.3f}" for t in times)
                  + "   us/step: " + " ".join(f"{1000 * t / T:.2f}" for t in times), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
