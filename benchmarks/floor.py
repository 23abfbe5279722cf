"""`python -m benchmarks.floor`: the GEMM floor of a layer on this machine, from FLOPs and measured
matmul rates, to set beside the sweep's times (PERF.md: count FLOPs before writing a kernel).

Per layer and direction, G = 4 (LSTM), 3 (GRU), 1 (RNN) gates:
  forward   one large GEMM  x[T*B, I] @ w_ih.T[I, G*H]        2*T*B*I*G*H FLOPs
            T small GEMMs   h[B, H]   @ w_hh.T[H, G*H]        2*T*B*H*G*H FLOPs
  backward  large: d x, d w_ih (I each) and d w_hh (H)        2*T*B*G*H*(2*I + H)
            small: d h per step                                2*T*B*H*G*H
The floor is each part's FLOPs over the rate this machine reaches on that GEMM shape (median of
repeats, random inputs), with the pointwise work counted as free: nothing can go below it.

    python -m benchmarks.floor --T 100 --B 32 --H 256          # every layer type, fp32, this CPU
"""
import argparse
import statistics
import time

import torch

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def gemm_rate(m, k, n, device="cpu", dtype=torch.float32, repeats=20, stat=statistics.median):
    """FLOP/s of a [m, k] @ [k, n] matmul (`stat` of the times of `repeats` after warm-up, rotating
    inputs: the median, or min for the best the machine did)."""
    pairs = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
             for _ in range(3)]
    out = torch.empty(m, n, device=device, dtype=dtype)
    for a, b in pairs:
        torch.matmul(a, b, out=out)
    times = []
    for i in range(repeats):
        a, b = pairs[i % 3]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / stat(times)


def floor(mode, T, B, H, I, device="cpu", dtype=torch.float32):
    """dict: FLOPs of forward and forward+backward, the two GEMM rates, and the floor times (seconds)."""
    G = GATES[mode]
    big_rate = gemm_rate(T * B, I, G * H, device, dtype)
    small_rate = gemm_rate(B, H, G * H, device, dtype, repeats=200)
    fwd_big, small = 2 * T * B * I * G * H, 2 * T * B * H * G * H
    bwd_big = 2 * T * B * G * H * (2 * I + H)
    return {
        "fwd_flop": fwd_big + small, "fwdbwd_flop": fwd_big + bwd_big + 2 * small,
        "big_gflops": big_rate / 1e9, "small_gflops": small_rate / 1e9,
        "fwd_floor_s": fwd_big / big_rate + small / small_rate,
        "fwdbwd_floor_s": (fwd_big + bwd_big) / big_rate + 2 * small / small_rate,
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--I", type=int, help="input size (default H)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    I = args.I or args.H
    print(f"T={args.T} B={args.B} I={I} H={args.H} float32 on {args.device}, {torch.get_num_threads()} threads")
    print(f"{'layer':5s} {'fwd GFLOP':>10s} {'fwd+bwd GFLOP':>14s} {'big GEMM GFLOP/s':>17s} "
          f"{'step GEMM GFLOP/s':>18s} {'fwd floor ms':>13s} {'fwd+bwd floor ms':>17s}")
    for mode in GATES:
        f = floor(mode, args.T, args.B, args.H, I, args.device)
        print(f"{mode:5s} {f['fwd_flop'] / 1e9:10.2f} {f['fwdbwd_flop'] / 1e9:14.2f} {f['big_gflops']:17.0f} "
              f"{f['small_gflops']:18.0f} {f['fwd_floor_s'] * 1e3:13.1f} {f['fwdbwd_floor_s'] * 1e3:17.1f}")


if __name__ == "__main__":
    main()
