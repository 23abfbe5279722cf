"""`python -m benchmarks.sweep`: time fused_rnn's backends against torch.nn over a grid, append one
row per measurement to CSV and JSON Lines, then write a markdown table and PNG plots.

    python -m benchmarks.sweep                       # default grid for the device (GPU if present)
    python -m benchmarks.sweep --device cpu          # the small CPU grid (a few minutes on 2 cores)
    python -m benchmarks.sweep --quick --out /tmp/q  # tiny smoke grid (seconds)
    python -m benchmarks.sweep --modes LSTM --precisions bf16 --B 16,64 --resume   # a slice, continuing a run
    python -m benchmarks.sweep --render benchmarks/results/sweep-<device>.csv      # table and plots only

Rows are appended and flushed as they are measured, so an interrupted sweep loses nothing, and
--resume skips every shape already measured under the same --run label (default: date and commit).
Ratios are torch.nn's time over the backend's, both measured in the same process on the same shape.
Files: <out>/sweep-<device>.csv, .jsonl, .md and sweep-<device>-<layer>-<pass>.png.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks import common, report

RESULTS = Path(__file__).resolve().parent / "results"

# precision label -> (dtype name, TF32 flag)
PRECISIONS = {"fp32": ("float32", False), "tf32": ("float32", True), "bf16": ("bfloat16", None),
              "fp16": ("float16", None), "fp64": ("float64", None)}

# Each grid: (cases, layers, T, B, H, precisions, passes), and the sweep is the union of its parts.
GRIDS = {
    # issue 5: T=512, I=H, single layer, every layer type and precision; then a packed batch and a
    # 2-layer bidirectional stack (STANDARD cuDNN paths); peak memory is recorded with every fwd+bwd.
    "gpu": [
        (("single",), common.MODES, 512, (1, 8, 16, 64, 256, 1024), (256, 512, 1024),
         ("bf16", "tf32", "fp32", "fp16"), common.PASSES),
        (("packed", "bidir2"), ("LSTM", "GRU"), 512, (8, 64, 256), (256, 1024),
         ("bf16", "tf32"), ("forward+backward", "inference")),
    ],
    # PERF.md's CPU target is T=100, B=32, I=H=256 fp32 LSTM; a few minutes on 2 cores.
    "cpu": [
        (("single",), common.MODES, 100, (1, 8, 32, 64), (128, 256), ("fp32",), common.PASSES),
        (("packed", "bidir2"), ("LSTM", "GRU"), 100, (32,), (256,), ("fp32",),
         ("forward+backward", "inference")),
    ],
    # the shapes PERF.md's targets are about, for a GPU session short of time (a few minutes on an H100)
    "gpu-core": [
        (("single",), ("LSTM", "GRU"), 512, (1, 16, 64, 256, 1024), (256, 1024), ("bf16", "tf32", "fp16"),
         ("forward", "forward+backward")),
        (("packed", "bidir2"), ("LSTM",), 512, (16, 64), (512,), ("bf16",), ("forward+backward",)),
    ],
    "quick": [
        (("single",), common.MODES, 8, (1, 4), (16,), ("fp32",), common.PASSES),
        (("packed", "bidir2"), ("LSTM",), 8, (4,), (16,), ("fp32",), ("forward+backward",)),
    ],
}
QUICK_GPU_PRECISIONS = ("tf32", "bf16")

# per device: warm-up calls, warm-up seconds, min/max repeats, seconds per measurement
TIMING = {"cuda": (3, 0.1, 10, 100, 0.3), "cpu": (2, 0.0, 5, 30, 1.0), "quick": (1, 0.0, 3, 5, 0.05)}

KEY = report.KEY      # what makes a row unique: run, device, shape, pass, backend
FIELDS = ["run", "date", "commit", "device", "device_slug", "gpu_name", "gpu_sms", "cpu_name", "cpu_count",
          "threads", "hostname", "platform", "python", "fused_rnn", "torch", "cuda", "cudnn", "triton",
          "case", "mode", "layers", "bidirectional", "T", "B", "H", "I", "dtype", "tf32", "precision", "pass",
          "backend", "median_ms", "min_ms", "p20_ms", "p80_ms", "repeats", "n_inputs", "us_per_step",
          "speedup_vs_nn", "peak_mem_mb", "load_avg_1m", "status"]


def grid_cases(parts, args, device):
    """Case objects of the grid, filtered by the command line, in the order they will run."""
    def pick(default, given, cast=str):
        return tuple(cast(v) for v in given.split(",")) if given else default
    out = []
    for cases, modes, T, Bs, Hs, precs, passes in parts:
        if args.quick and device.type == "cuda":
            precs = QUICK_GPU_PRECISIONS
        if device.type != "cuda":   # TF32 is a GPU setting; on a CPU float32 is float32
            precs = tuple(dict.fromkeys("fp32" if p == "tf32" else p for p in precs))
        cases, modes = pick(cases, args.cases), pick(modes, args.modes)
        T = pick((T,), args.T, int)
        Bs, Hs, precs, passes = pick(Bs, args.B, int), pick(Hs, args.H, int), pick(precs, args.precisions), \
            pick(passes, args.passes)
        for case in cases:
            for mode in modes:
                for prec in precs:
                    for t in T:
                        for H in Hs:
                            for B in Bs:
                                dtype, tf32 = PRECISIONS[prec]
                                tf32 = tf32 if device.type == "cuda" else None
                                out.append((common.Case(case, mode, t, B, H, H, dtype, tf32), passes))
    # the same case from two grid parts runs once, with the union of their passes
    merged = {}
    for case, passes in out:
        merged[case] = tuple(dict.fromkeys(merged.get(case, ()) + tuple(passes)))
    return list(merged.items())


def open_rows(path):
    """Existing rows of a CSV (re-written with the current columns if they changed)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    if fields != FIELDS:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, FIELDS, extrasaction="ignore", restval="")
            w.writeheader()
            w.writerows(rows)
    return rows


class RowWriter:
    """Appends each row to <stem>.csv and <stem>.jsonl at once (flushed: a killed sweep keeps its rows)."""

    def __init__(self, stem):
        self.csv_path, self.json_path = stem.with_suffix(".csv"), stem.with_suffix(".jsonl")
        self.existing = open_rows(self.csv_path)
        new = not self.csv_path.exists()
        self._csv = self.csv_path.open("a", newline="")
        self._writer = csv.DictWriter(self._csv, FIELDS, extrasaction="ignore", restval="")
        if new:
            self._writer.writeheader()
        self._json = self.json_path.open("a")

    def write(self, row):
        self._writer.writerow(row)
        self._json.write(json.dumps({k: row.get(k, "") for k in FIELDS}) + "\n")
        self._csv.flush()
        self._json.flush()

    def close(self):
        self._csv.close()
        self._json.close()


def measure_case(case, passes, backends, device, timing, info, run_label, writer, log):
    """Time every pass of every backend on one shape (torch.nn first), write one row each."""
    warmup, warmup_s, min_rep, max_rep, budget = timing
    base = {}
    results = {}
    for backend in backends:
        try:
            with common.tf32_mode(case.tf32, device):
                layer = common.build_layer(case, backend, device)
        except Exception as e:  # noqa: BLE001 - a backend that cannot even be built is a recorded failure
            layer, build_error = None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        for what in passes:
            row = dict(info, run=run_label, case=case.name, mode=case.mode, layers=case.num_layers,
                       bidirectional=case.bidirectional, T=case.T, B=case.B, H=case.H, I=case.I,
                       dtype=case.dtype, tf32="" if case.tf32 is None else case.tf32, precision=case.precision,
                       backend=backend)
            row["pass"] = what
            if layer is None:
                row["status"] = build_error
                writer.write(row)
                continue
            try:
                with common.tf32_mode(case.tf32, device):
                    n_inputs = common.n_inputs_for(case)
                    pairs = common.make_inputs(case, what, device, n_inputs)
                    run, reset = common.make_pass(layer, what, pairs)
                    times = common.sample_times(run, n_inputs, device, reset, warmup, warmup_s, min_rep, max_rep,
                                                budget)
                    peak = (common.peak_memory_bytes(run, reset, device) if what == "forward+backward" else None)
                s = common.summarize(times)
                if backend == common.NN:
                    base[what] = s["median_s"]
                row.update(
                    median_ms=f"{s['median_s'] * 1e3:.6g}", min_ms=f"{s['min_s'] * 1e3:.6g}",
                    p20_ms=f"{s['p20_s'] * 1e3:.6g}", p80_ms=f"{s['p80_s'] * 1e3:.6g}", repeats=s["repeats"],
                    n_inputs=n_inputs, us_per_step=f"{s['median_s'] * 1e6 / case.T:.6g}",
                    speedup_vs_nn=f"{base[what] / s['median_s']:.4g}" if what in base else "",
                    peak_mem_mb="" if peak is None else f"{peak / 2**20:.1f}", status="ok")
                results[(backend, what)] = s["median_s"]
            except Exception as e:  # noqa: BLE001 - OOM, unsupported dtype, a kernel error: recorded, sweep goes on
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                pairs = run = reset = None
            row["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            row["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else ""
            writer.write(row)
        del layer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # one line per shape: each pass, each backend, with its ratio to torch.nn
    parts = []
    for what in passes:
        cells = []
        for backend in backends:
            t = results.get((backend, what))
            ratio = f" {base[what] / t:.2f}x" if t and what in base and backend != common.NN else ""
            cells.append(f"{common.backend_label(backend)} {t * 1e3:.3g}ms{ratio}" if t else
                         f"{common.backend_label(backend)} failed")
        parts.append(f"{what}: " + ", ".join(cells))
    log(f"{case.mode} {case.name} {case.precision} T={case.T} B={case.B} H={case.H} | " + " | ".join(parts))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny grid, few repeats: a smoke test, not a measurement")
    p.add_argument("--grid", choices=sorted(GRIDS),
                   help="named grid (default: gpu or cpu by device, quick with --quick)")
    p.add_argument("--max-minutes", type=float, help="start no new shape after this many minutes, then write "
                   "the table and plots (continue later with --resume)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results; a temp folder with --quick)")
    p.add_argument("--run", help="label grouping the rows of one sweep (default: date and commit)")
    p.add_argument("--resume", action="store_true", help="skip shapes already measured under the same --run")
    p.add_argument("--backends", help="comma list of fused_rnn backends to time beside torch.nn (default: every "
                   "available one; on a GPU not 'reference' and 'torch', the slow references)")
    p.add_argument("--cases", help="comma list of single, packed, bidir2")
    p.add_argument("--modes", help="comma list of LSTM, GRU, RNN")
    p.add_argument("--precisions", help="comma list of fp32, tf32, bf16, fp16")
    p.add_argument("--passes", help="comma list of forward, forward+backward, inference")
    p.add_argument("--T", help="comma list of sequence lengths")
    p.add_argument("--B", help="comma list of batch sizes")
    p.add_argument("--H", help="comma list of hidden sizes (input size I = H)")
    p.add_argument("--budget", type=float, help="seconds of timed runs per measurement")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for a CPU sweep")
    p.add_argument("--dry-run", action="store_true", help="list the shapes and backends, time nothing")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--render", type=Path, metavar="CSV", help="only write the table and plots of CSV's latest run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        written = report.render(args.render, run=args.run, plots=not args.no_plots)
        print("\n".join(str(p) for p in written))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="fused_rnn: auto uses")
    grid = args.grid or ("quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu"))
    timing = TIMING["quick" if args.quick else device.type]
    if args.budget is not None:
        timing = timing[:4] + (args.budget,)
    out = args.out or (Path(tempfile.mkdtemp(prefix="fused_rnn_quick_")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    info = common.machine_info(device)
    run_label = args.run or f"{info['date'][:10]}-{info['commit'] or 'nogit'}"
    stem = out / f"sweep-{info['device_slug']}"
    print(f"fused_rnn sweep | {info['gpu_name'] or info['cpu_name']} | {info['threads']} CPU threads | "
          f"torch {info['torch']} CUDA {info['cuda'] or '-'} cuDNN {info['cudnn'] or '-'} "
          f"Triton {info['triton'] or '-'} | commit {info['commit'] or '-'} | load {info['load_avg_1m']}")
    print(f"run {run_label!r}, grid {grid!r} -> {stem}.csv / .jsonl")
    if device.type == "cpu" and info["load_avg_1m"] != "" and info["load_avg_1m"] > 0.5 * (info["cpu_count"] or 1):
        print(f"warning: load average {info['load_avg_1m']} on {info['cpu_count']} cores: other processes share "
              "the CPU, timings will be noisy (each row records the load)")

    if args.backends:
        include = [b for b in args.backends.split(",") if b and b != common.NN]
    else:
        include = None
    # the textbook loop and the PyTorch-ops template are references, not speed paths: on a GPU (T=512,
    # thousands of launches) they would take most of the time; on a CPU they are cheap anchors
    exclude = ("reference", "torch") if device.type == "cuda" else ()
    cases = grid_cases(GRIDS[grid], args, device)
    writer = None if args.dry_run else RowWriter(stem)
    done = set()
    if args.resume and writer:
        by_shape = {}
        for r in writer.existing:
            if r.get("run") == run_label and r.get("status") == "ok":
                by_shape.setdefault(tuple(r[k] for k in KEY[:-2]), set()).add((r["pass"], r["backend"]))
        done = by_shape
    skipped_said = set()
    t_start = time.time()
    try:
        for n, (case, passes) in enumerate(cases, 1):
            if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
                print(f"--max-minutes {args.max_minutes} reached after {n - 1}/{len(cases)} shapes; "
                      "continue with the same command and --resume")
                break
            dtype = common.DTYPES[case.dtype]
            names, skipped = common.fused_backends(device, dtype, case.mode, include=include, exclude=exclude)
            for name, why in skipped.items():
                if (name, why) not in skipped_said and (include is None or name in include):
                    skipped_said.add((name, why))
                    print(f"  not timed: {name} ({case.mode}, {case.dtype}): {why}")
            backends = [common.NN] + names
            if args.dry_run:
                print(f"[{n}/{len(cases)}] {case} passes={passes} backends={backends}")
                continue
            shape = (run_label, info["device_slug"], case.name, case.mode, case.precision, str(case.T), str(case.B),
                     str(case.H), str(case.I))
            if args.resume and {(w, b) for w in passes for b in backends} <= done.get(shape, set()):
                continue
            measure_case(case, passes, backends, device, timing, info, run_label, writer,
                         lambda s, n=n: print(f"[{n}/{len(cases)} {time.time() - t_start:6.0f}s] {s}", flush=True))
    finally:
        if writer:
            writer.close()
    if args.dry_run:
        return
    print(f"measured in {time.time() - t_start:.0f}s")
    for path in report.render(stem.with_suffix(".csv"), run=run_label, plots=not args.no_plots):
        print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
