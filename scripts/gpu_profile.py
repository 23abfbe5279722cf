"""Where one layer's time goes on a GPU: torch.profiler over a few forward(+backward) passes of one
fused_rnn layer, the CUDA kernels and the CPU-side ops sorted by their time, and the wall time per
step. For a per-step path far from its GEMM + pointwise cost, this says which of the host, the GEMM
or the pointwise kernel is the cause.

    python scripts/gpu_profile.py [--cell lstm] [--T 64] [--B 16] [--H 768] [--dtype bf16]
                                  [--backend cuda] [--persistent 0|1] [--backward] [--rows 15]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="lstm")
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--H", type=int, default=768)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--persistent", default="0", choices=["0", "1"])
    p.add_argument("--backward", action="store_true")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    os.environ["FUSED_RNN_CUDA_PERSISTENT"] = args.persistent

    import torch
    from torch.profiler import ProfilerActivity, profile

    import fused_rnn

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    layer = getattr(fused_rnn, args.cell.upper())(args.H, args.H, backend=args.backend, device="cuda", dtype=dtype)
    x = torch.randn(args.T, args.B, args.H, device="cuda", dtype=dtype, requires_grad=args.backward)

    def run():
        y = layer(x)[0]
        if args.backward:
            y.backward(torch.ones_like(y))

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5
    print(f"{args.cell} T={args.T} B={args.B} H={args.H} {args.dtype} backend={args.backend} "
          f"persistent={args.persistent} backward={args.backward}: {wall * 1e3:.3f} ms per pass, "
          f"{wall * 1e6 / args.T:.2f} us/step (wall)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
