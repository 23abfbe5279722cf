"""`python -m benchmarks.sync_cost`: what one step of a persistent recurrence pays for synchronisation alone
(grid.sync, v2's release/acquire flags, the h exchange through L2, the sm_90 cluster barrier and DSMEM, and
the candidates for v2.1: one arrival counter, a two-level barrier, relaxed polling, the K-split cluster
exchange), in µs per step; benchmarks/sync_cost.cu says what each case models and how it is timed.
Each row's warm-up launch also checks the exchanged data and the counters; a failure is a `fail` row.

Compiles benchmarks/sync_cost.cu with nvcc for this GPU's architecture (sm_90a on an H100/H200, where the
cluster cases run; an older one skips them with the reason), runs it, prints a markdown table and saves it
(and with --out a CSV). ~30 s on an H200 (the build ~1 min).

    python -m benchmarks.sync_cost                      # build for this GPU, run, print, save the table
    python -m benchmarks.sync_cost --arch sm_80 --list  # build only and list the cases (no GPU needed)
"""
import argparse
import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "sync_cost.cu"
BUILD_DIR = ROOT / "build" / "sync_cost"
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ("kind", "case", "ctas", "cluster", "clusters", "us_per_step", "note")


def nvcc():
    """Path of nvcc (CUDA_HOME, /usr/local/cuda, PATH) or None."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def gpu_arch():
    """nvcc's -arch for GPU 0 (sm_90a for compute capability 9.0, where the cluster PTX needs the a-variant), or
    None when no GPU answers."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    r = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
    m = re.match(r"\s*(\d+)\.(\d+)", r.stdout)
    if r.returncode != 0 or not m:
        return None
    major, minor = m.groups()
    return f"sm_{major}{minor}" + ("a" if (major, minor) == ("9", "0") else "")


def build(arch, out_dir=BUILD_DIR):
    """Compile sync_cost.cu for `arch` with every warning an error; returns the executable's path."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / f"sync_cost_{arch}"
    cmd = [compiler, "-std=c++17", "-O3", f"-arch={arch}", f"-I{ROOT / 'csrc'}", "--Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra", str(SOURCE), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or r.stderr.strip():
        raise RuntimeError(f"nvcc failed or warned ({' '.join(cmd)}):\n{r.stdout}{r.stderr}")
    return exe


def parse(stdout):
    """The program's lines as dicts of FIELDS (every line has the seven fields; the note may hold commas)."""
    return [dict(zip(FIELDS, line.split(",", len(FIELDS) - 1))) for line in stdout.splitlines() if line.strip()]


def run(exe, steps=10000, timeout=120, list_only=False):
    args = [str(exe), "--list"] if list_only else [str(exe), "--steps", str(steps)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return parse(r.stdout)


def markdown(lines):
    """The measurements (and skips) as one markdown table, the device and cluster occupancy above it."""
    out = []
    for d in lines:
        if d["kind"] == "info" and d["case"] == "device":
            out.append(f"{d['note']}, {d['ctas']} SMs; µs per step = CUDA events around one launch / steps "
                       f"(median of 3 launches)\n")
    out += ["| case | CTAs | cluster size | clusters | µs/step | note |", "|---|---|---|---|---|---|"]
    for d in lines:
        if d["kind"] in ("row", "plan", "skip", "fail"):
            us = {"row": d["us_per_step"], "plan": "(planned)", "skip": "skipped", "fail": "CHECK FAILED"}[d["kind"]]
            out.append(f"| {d['case']} | {d['ctas'] if d['ctas'] != '0' else ''} | "
                       f"{d['cluster'] if d['cluster'] != '0' else ''} | "
                       f"{d['clusters'] if d['clusters'] != '0' else ''} | {us} | {d['note']} |")
    occupancy = [d for d in lines if d["kind"] == "info" and d["case"] == "max_active_clusters"]
    if occupancy:
        for case in dict.fromkeys(d["note"].rsplit(" ", 1)[-1] for d in occupancy):
            by_size = {int(d["cluster"]): d["clusters"] for d in occupancy if d["note"].endswith(" " + case)}
            out.append(f"\ncudaOccupancyMaxActiveClusters for {case} (CTAs of 256 threads): "
                       + ", ".join(f"size {size}: {n}" for size, n in sorted(by_size.items())))
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help="nvcc -arch (default: this GPU's, sm_90a on an H100/H200)")
    p.add_argument("--steps", type=int, default=10000, help="steps per launch (default 10000)")
    p.add_argument("--list", action="store_true", help="build and list the cases, run nothing (no GPU needed)")
    p.add_argument("--md", type=Path, help="markdown output (default benchmarks/results/sync-cost-<arch>.md)")
    p.add_argument("--out", type=Path, help="also write the rows as CSV here")
    p.add_argument("--timeout", type=int, default=120, help="seconds before the run is killed (default 120)")
    args = p.parse_args(argv)
    arch = args.arch or gpu_arch()
    if arch is None:
        if not args.list:
            p.error("no GPU found (nvidia-smi); pass --arch and --list to build and list only")
        arch = "sm_90a"
    exe = build(arch)
    lines = run(exe, args.steps, args.timeout, list_only=args.list)
    table = markdown(lines)
    print(table)
    if args.list:
        return
    md = args.md or RESULTS / f"sync-cost-{arch}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    print(f"saved {md}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(lines)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
