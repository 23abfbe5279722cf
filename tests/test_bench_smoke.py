"""CI smoke test of the benchmark sweep: `python -m benchmarks.sweep --quick` into a temporary folder
writes sane CSV/JSONL rows, a markdown table and PNG plots. Nothing is asserted about speed."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODES = ("LSTM", "GRU", "RNN")
PASSES = ("forward", "forward+backward", "inference")


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # one thread: a smoke test on a busy 2-core CI machine should not fight itself for cores
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--quick", "--device", "cpu", "--threads", "1",
                           "--out", str(out), "--run", "smoke"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_sweep_writes_sane_rows(quick_sweep):
    out, _ = quick_sweep
    csvs = list(out.glob("sweep-*.csv"))
    assert len(csvs) == 1, list(out.iterdir())
    with csvs[0].open(newline="") as f:
        rows = list(csv.DictReader(f))
    jsonl = [json.loads(line) for line in csvs[0].with_suffix(".jsonl").read_text().splitlines()]
    assert len(jsonl) == len(rows) > 0
    assert {r["run"] for r in rows} == {"smoke"}
    for r in rows:   # every row says where and with what it was measured
        for field in ("date", "device", "cpu_name", "threads", "torch", "case", "mode", "pass", "backend", "T", "B",
                      "H"):
            assert r[field] != "", (field, r)
        assert r["threads"] == "1" and r["device"] == "cpu"
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["backend"] for r in ok} >= {"nn", "torch"}
    # torch.nn and the torch backend ran every layer type and pass of the single-layer grid
    for backend in ("nn", "torch"):
        assert {(r["mode"], r["pass"]) for r in ok if r["backend"] == backend and r["case"] == "single"} == \
            {(m, p) for m in MODES for p in PASSES}
    assert {r["case"] for r in ok} == {"single", "packed", "bidir2"}
    for r in ok:
        median, lo, hi = float(r["median_ms"]), float(r["min_ms"]), float(r["p80_ms"])
        assert math.isfinite(median) and 0 < lo <= median <= hi, r
        assert int(r["repeats"]) >= 3 and int(r["n_inputs"]) >= 2
        assert float(r["us_per_step"]) == pytest.approx(median * 1e3 / int(r["T"]), rel=1e-3)
        speedup = float(r["speedup_vs_nn"])
        assert speedup > 0 and (r["backend"] != "nn" or speedup == 1.0)


def test_quick_sweep_writes_table_and_plots(quick_sweep):
    out, stdout = quick_sweep
    md = next(out.glob("sweep-*.md")).read_text()
    assert "| layer | precision | T | B | H | pass | torch.nn |" in md
    assert "| LSTM | fp32 | 8 | 4 | 16 | fwd+bwd |" in md
    assert "2-layer bidirectional" in md and "packed variable-length" in md
    pngs = sorted(out.glob("sweep-*.png"))
    assert {p.name.split("-")[-1] for p in pngs} >= {"fwd.png", "bwd.png", "inference.png"}
    assert len(pngs) == len(MODES) * len(PASSES)
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
    assert "wrote" in stdout
