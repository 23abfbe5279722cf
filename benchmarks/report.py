"""Sweep rows -> a markdown table and PNG plots (time per step and speedup over torch.nn against batch
size, one panel per hidden size and precision). Used by benchmarks/sweep.py; on its own:

    python -m benchmarks.sweep --render benchmarks/results/sweep-<device>.csv
"""
from __future__ import annotations

import csv
from pathlib import Path

from benchmarks import common

PASS_SLUG = {"forward": "fwd", "forward+backward": "fwd-bwd", "inference": "inference"}
PASS_SHORT = {"forward": "fwd", "forward+backward": "fwd+bwd", "inference": "no-grad"}
PRECISION_ORDER = ("bf16", "fp16", "tf32", "fp32", "fp64")
CASE_TITLE = {"single": "single layer, one direction",
              "packed": "packed variable-length batch (unsorted lengths uniform in [T/4, T]), one layer",
              "bidir2": "2-layer bidirectional stack"}
SHAPE = ("case", "mode", "precision", "T", "B", "H", "pass")
KEY = ("run", "device_slug", "case", "mode", "precision", "T", "B", "H", "I", "pass", "backend")


def load_rows(csv_path, run=None):
    """Rows of one run (default: the run of the file's last row), the last measurement of each key kept."""
    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return [], None
    run = run or rows[-1]["run"]
    latest = {}
    for r in rows:
        if r["run"] == run:
            latest[tuple(r[k] for k in KEY)] = r
    return list(latest.values()), run


def _backend_order(rows):
    names = {r["backend"] for r in rows}
    return [common.NN] + [b for b in common.fr_backends.BACKENDS if b in names]


def _shape_key(r):
    return (r["case"], common.MODES.index(r["mode"]) if r["mode"] in common.MODES else 9,
            PRECISION_ORDER.index(r["precision"]) if r["precision"] in PRECISION_ORDER else 9,
            int(r["T"]), int(r["H"]), int(r["B"]), common.PASSES.index(r["pass"]))


def _fmt_ms(ms):
    ms = float(ms)
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def markdown(rows, run):
    """The whole report: machine line, one time table per case, peak memory, failures."""
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    if not rows:
        return "no rows\n"
    first = rows[0]
    dates = sorted(r["date"] for r in rows)
    loads = sorted(float(r["load_avg_1m"]) for r in rows if r.get("load_avg_1m"))
    hw = (f"{first['gpu_name']} ({first['gpu_sms']} SMs), host CPU {first['cpu_name']}" if first["device"] == "cuda"
          else f"{first['cpu_name']}, {first['cpu_count']} cores")
    lines = [
        f"# fused_rnn vs torch.nn — {first['gpu_name'] or first['cpu_name']} ({first['device']})", "",
        f"- machine: {hw}; {first['threads']} torch CPU threads; {first['platform']}",
        f"- versions: torch {first['torch']}, CUDA {first['cuda'] or '-'}, cuDNN {first['cudnn'] or '-'}, "
        f"Triton {first['triton'] or '-'}, Python {first['python']}, fused_rnn {first['fused_rnn']}",
        f"- run `{run}`: commit {first['commit'] or '-'}, {dates[0]} to {dates[-1]}"
        + (f", 1-min load average {loads[0]:.1f}–{loads[-1]:.1f}" if loads else ""),
        "- cells: median time per call in ms (median of many runs after warm-up, inputs rotated); in brackets "
        "the speedup, torch.nn time / backend time, both from this run. I = H. fwd = forward with autograd "
        "recording, fwd+bwd = forward and backward (training step of the layer), no-grad = inference.",
    ]
    if first["device"] == "cpu" and loads and loads[-1] > 0.5 * float(first["cpu_count"] or 1):
        lines.append(f"- **noisy**: the load average reached {loads[-1]:.1f} on {first['cpu_count']} cores — other "
                     "processes shared the CPU; compare ratios, not absolute times, and rerun on an idle machine")
    lines.append("")
    backends = _backend_order(ok)
    by_key = {}   # SHAPE fields -> backend -> row
    for r in ok:
        by_key.setdefault(tuple(r[f] for f in SHAPE), {})[r["backend"]] = r

    def order(k):
        return _shape_key(dict(zip(SHAPE, k)))
    for case in ("single", "packed", "bidir2"):
        keys = sorted((k for k in by_key if k[0] == case), key=order)
        if not keys:
            continue
        lines += [f"## {CASE_TITLE[case]}", "",
                  "| layer | precision | T | B | H | pass | " + " | ".join(map(common.backend_label, backends)) + " |",
                  "|---|---|---:|---:|---:|---|" + "---:|" * len(backends)]
        for k in keys:
            cells = []
            for b in backends:
                r = by_key[k].get(b)
                if r is None:
                    cells.append("–")
                elif b == common.NN or not r["speedup_vs_nn"]:
                    cells.append(_fmt_ms(r["median_ms"]))
                else:
                    cells.append(f"{_fmt_ms(r['median_ms'])} ({float(r['speedup_vs_nn']):.2f}×)")
            lines.append(f"| {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {PASS_SHORT[k[6]]} | " + " | ".join(cells)
                         + " |")
        lines.append("")
    mem = [r for r in ok if r["peak_mem_mb"]]
    if mem:
        lines += ["## Peak memory of one training step (fwd+bwd), MB above what was allocated before it", "",
                  "| case | layer | precision | T | B | H | " + " | ".join(map(common.backend_label, backends)) + " |",
                  "|---|---|---|---:|---:|---:|" + "---:|" * len(backends)]
        keys = sorted((k for k in by_key if by_key[k].get(common.NN, {}).get("peak_mem_mb")), key=order)
        for k in keys:
            base = float(by_key[k][common.NN]["peak_mem_mb"])
            cells = []
            for b in backends:
                r = by_key[k].get(b)
                if r is None or not r["peak_mem_mb"]:
                    cells.append("–")
                else:
                    m = float(r["peak_mem_mb"])
                    ratio = f" ({m / base:.2f}×)" if b != common.NN and base else ""
                    cells.append(f"{m:.0f}{ratio}")
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | " + " | ".join(cells) + " |")
        lines.append("")
    if failed:
        lines += ["## Not measured (errors)", ""]
        seen = set()
        for r in sorted(failed, key=_shape_key):
            msg = (r["backend"], r["mode"], r["precision"], r["status"])
            if msg not in seen:
                seen.add(msg)
                lines.append(f"- {common.backend_label(r['backend'])} {r['mode']} {r['precision']} "
                             f"(first: {r['case']} T={r['T']} B={r['B']} H={r['H']} {r['pass']}): {r['status']}")
        lines.append("")
    return "\n".join(lines)


def plot_rows(rows, stem):
    """One PNG per layer and pass (single-layer shapes): for each precision a row of time per step and a
    row of speedup over torch.nn, against batch size; one column per hidden size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ok = [r for r in rows if r["status"] == "ok" and r["case"] == "single"]
    backends = _backend_order(ok)
    colors = {common.NN: "black", "cpu": "tab:blue", "cuda": "tab:green", "triton": "tab:red",
              "torch": "tab:orange", "reference": "tab:gray"}
    written = []
    for mode in common.MODES:
        for what in common.PASSES:
            sel = [r for r in ok if r["mode"] == mode and r["pass"] == what]
            if not sel:
                continue
            precs = sorted({r["precision"] for r in sel}, key=PRECISION_ORDER.index)
            Hs = sorted({int(r["H"]) for r in sel})
            Bs_all = sorted({int(r["B"]) for r in sel})
            T = sel[0]["T"]
            fig, axes = plt.subplots(2 * len(precs), len(Hs), figsize=(max(3.8 * len(Hs), 6.4), 2.7 * 2 * len(precs)),
                                     squeeze=False)
            for pi, prec in enumerate(precs):
                for hi, H in enumerate(Hs):
                    ax_t, ax_s = axes[2 * pi][hi], axes[2 * pi + 1][hi]
                    for b in backends:
                        pts = sorted((int(r["B"]), float(r["us_per_step"]), r["speedup_vs_nn"]) for r in sel
                                     if r["backend"] == b and r["precision"] == prec and int(r["H"]) == H)
                        if not pts:
                            continue
                        Bs = [p[0] for p in pts]
                        style = dict(marker="o", ms=4, color=colors.get(b), label=common.backend_label(b))
                        ax_t.plot(Bs, [p[1] for p in pts], **style)
                        if b != common.NN:
                            sp = [(p[0], float(p[2])) for p in pts if p[2]]
                            ax_s.plot([p[0] for p in sp], [p[1] for p in sp], **style)
                    ax_s.axhline(1.0, color="black", lw=0.8, ls="--")
                    for ax, unit in ((ax_t, ""), (ax_s, "×")):
                        ax.set_xscale("log", base=2)
                        ax.set_yscale("log")
                        ax.set_xticks(Bs_all, [str(b) for b in Bs_all])
                        ax.xaxis.set_minor_locator(ticker.NullLocator())
                        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
                        ax.yaxis.set_minor_locator(ticker.NullLocator())
                        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _, u=unit: f"{v:g}{u}"))
                        ax.grid(True, alpha=0.3)
                    ax_t.set_title(f"{mode} {PASS_SHORT[what]}, {prec}, H={H}, T={T}", fontsize=9)
                    ax_t.set_ylabel("µs per step")
                    ax_s.set_ylabel("speedup vs torch.nn")
                    ax_s.set_xlabel("batch size B")
            handles, labels = axes[0][0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9)
            first = sel[0]
            fig.suptitle(f"{first['gpu_name'] or first['cpu_name']} · {first['threads']} threads · "
                         f"torch {first['torch']} · {first['date'][:10]} · {first['commit']}", fontsize=9, y=0.005,
                         va="bottom")
            fig.tight_layout(rect=(0, 0.02, 1, 0.97))
            path = Path(f"{stem}-{mode}-{PASS_SLUG[what]}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def render(csv_path, run=None, plots=True):
    """Write <stem>.md (and the PNGs) for one run of csv_path; returns the paths written."""
    csv_path = Path(csv_path)
    rows, run = load_rows(csv_path, run)
    stem = csv_path.with_suffix("")
    md = stem.with_suffix(".md")
    md.write_text(markdown(rows, run))
    written = [md]
    if plots and rows:
        try:
            written += plot_rows(rows, stem)
        except ImportError as e:
            print(f"no plots: {e}")
    return written
