"""GPU smoke test (stage 1 of scripts/gpu_check.sh): every cell, H in {8, 133, 512, 768}, B in {1, 5, 16},
forward / reverse / lengths, fp32 / bf16, through the per-step CUDA kernels, the persistent CUDA
kernels and the Triton kernels, each against the float64 reference (outputs and every gradient),
with a profiler check of which kernels actually ran. Uninitialised memory is NaN-filled (torch's
deterministic mode with fill_uninitialized_memory, as the tests do).

    python scripts/gpu_smoke.py [--workers 8] [--backends per-step,persistent,triton] [--H 8,133] [--list]

Configurations are dealt round-robin to worker processes (Triton compiles its variants in parallel
that way; --workers 0 runs them in this process, e.g. under compute-sanitizer); one line per
configuration. Exit status 0 only if every one passed.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
HS = (8, 133, 512, 768)
BS = (1, 5, 16)
MODES = ("fwd", "rev", "len")
DTYPES = ("fp32", "bf16")
BACKENDS = ("per-step", "persistent", "triton")
# kernel names the profiler must see (forward and backward) for each backend, and must not see. The
# persistent backend runs a configuration only where kernel_for says the persistent kernels take it (their
# plan, csrc/cuda/persistent_plan.h: every bf16 configuration here on an H100/H200, fp32 up to H=512 —
# 3xTF32 MMAs, torch's TF32 flag is off here); the others are skipped with the plan's reason.
KERNELS = {"per-step": (("elementwise_kernel",), ("persistent_",)),
           "persistent": (("persistent_v2_forward_kernel", "persistent_v2_backward_kernel"), ()),
           "triton": (("rnn_forward_kernel", "rnn_backward_kernel"), ())}
T = 7


def configs(backends, hs=HS):
    return list(itertools.product(CELLS, hs, BS, MODES, DTYPES, backends))


def run_one(cell, H, B, mode, dtype_name, backend):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fused_rnn import reference
    from fused_rnn.functional import recurrence
    from fused_rnn.ops.cpp import cuda_backend
    from helpers import TOL, assert_close, grads_of
    from test_backends import differentiable, make_inputs

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    os.environ["FUSED_RNN_CUDA_PERSISTENT"] = "1" if backend == "persistent" else "0"
    if backend != "triton":
        chosen = cuda_backend.kernel_for(cell, dtype, H, B)
        want = "persistent" if backend == "persistent" else "per-step"
        if not chosen.startswith(want):
            return f"SKIP  cuda chooses {chosen!r}"
    lengths = None
    if mode == "len":
        lengths = [T, 3, 1, T, 5][:B] if B < 16 else ([T, 3, 1, T] * 4)
        lengths[0] = T
    torch.manual_seed(hash((cell, H, B, mode, dtype_name)) % 2**31)
    args = make_inputs(cell, T, B, H, 0, lengths, mode == "rev", True, dtype, device="cuda")
    ref_args = [a.detach().cpu().double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point()
                else a.cpu() if torch.is_tensor(a) else a for a in args]
    check_kernels = os.environ.get("FUSED_RNN_SMOKE_KERNEL_CHECK", "1") == "1"
    with profile(activities=[ProfilerActivity.CUDA]) if check_kernels else contextlib.nullcontext() as prof:
        out = recurrence(cell, *args, backend="triton" if backend == "triton" else "cuda")
        grads = grads_of(out, differentiable(args))
        torch.cuda.synchronize()
    if check_kernels:
        names = {e.name for e in prof.events()}
        must, must_not = KERNELS[backend]
        missing = [k for k in must if not any(k in n for n in names)]
        unwanted = [n for n in names for k in must_not if k in n]
        if missing or unwanted:
            raise AssertionError(f"kernels: missing {missing}, unexpected {sorted(set(unwanted))}")
    ref = reference.recurrence(cell, *ref_args)
    for o, r, n in zip(out, ref, ("y", "h_n", "c_n")):
        if r is not None:
            assert o.dtype == dtype, n
            assert_close(o, r, dtype, n)
    # relu's derivative jumps at 0: in bf16 the rounded h moves some pre-activations across it, so its
    # gradients legitimately differ from float64's there (fp32 checks them); tests/test_triton.py does the same
    if not (cell == "rnn_relu" and dtype != torch.float32):
        for g, w, n in zip(grads, grads_of(ref, differentiable(ref_args)), ("gx", "h0", "c0", "w_hh", "b_hh")):
            assert_close(g, w, dtype, f"d{n}")
    return f"PASS  tol {TOL[dtype]:g}"


def worker(index, count, backends, hs, queue):
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    for i, cfg in enumerate(configs(backends, hs)):
        if i % count != index:
            continue
        t0 = time.time()
        try:
            status = run_one(*cfg)
        except Exception as e:  # noqa: BLE001 - every configuration is reported; the summary fails
            status = f"FAIL  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc()
        queue.put((index, f"{status.split()[0]:5s} {'/'.join(map(str, cfg)):40s} {time.time() - t0:6.2f}s  "
                          f"{status[6:]}"))
    queue.put((index, None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--H", default=",".join(map(str, HS)), help="hidden sizes")
    p.add_argument("--no-kernel-check", action="store_true",
                   help="no profiler check of which kernels ran (compute-sanitizer and CUPTI do not mix)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit (no GPU needed)")
    args = p.parse_args()
    backends = tuple(args.backends.split(","))
    hs = tuple(int(h) for h in args.H.split(","))
    assert set(backends) <= set(BACKENDS), backends
    if args.no_kernel_check:
        os.environ["FUSED_RNN_SMOKE_KERNEL_CHECK"] = "0"  # inherited by the workers
    if args.list:
        for cfg in configs(backends, hs):
            print("/".join(map(str, cfg)))
        print(f"{len(configs(backends, hs))} configurations")
        return 0
    import multiprocessing as mp
    import queue as queues

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.workers == 0:  # in this process
        queue = queues.Queue()
        worker(0, 1, backends, hs, queue)
        lines = [line for _, line in iter(queue.get_nowait, (0, None))]
        for line in lines:
            print(line)
        failed = sum(line.startswith("FAIL") for line in lines)
        print(f"smoke: {sum(line.startswith('PASS') for line in lines)} passed, {failed} failed")
        return 1 if failed else 0
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, args.workers, backends, hs, queue)) for i in range(args.workers)]
    for proc in procs:
        proc.start()
    counts, finished = {}, set()
    while len(finished) < len(procs):
        try:
            index, line = queue.get(timeout=5)
        except queues.Empty:  # a worker that died (a device-side assert, a segfault) sends nothing more
            finished |= {i for i, proc in enumerate(procs) if not proc.is_alive() and queue.empty()}
            continue
        if line is None:
            finished.add(index)
            continue
        print(line, flush=True)
        counts[line.split()[0]] = counts.get(line.split()[0], 0) + 1
    for proc in procs:
        proc.join()
    crashed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    print(f"smoke: {counts.get('PASS', 0)} passed, {counts.get('FAIL', 0)} failed, {counts.get('SKIP', 0)} skipped"
          f"{f', worker exit codes {crashed}' if crashed else ''}")
    return 1 if counts.get("FAIL", 0) or crashed or not counts.get("PASS") else 0


if __name__ == "__main__":
    sys.exit(main())
