"""benchmarks/cpu_targets.py's CSV: the rows of a run carry the floor at the run's best GEMM rate
(not the best so far when the row was measured), the rows the file held before stay as they were,
and a file with other columns is refused. Tiny shapes; nothing is asserted about speed."""
import csv
import itertools

import pytest

from benchmarks import cpu_targets, floor

GRID = ["--threads", "1", "--layers", "LSTM", "--passes", "forward,forward+backward", "--H", "64", "--B", "8,16",
        "--T", "20", "--repeats", "1"]


def test_rows_take_the_runs_best_rate(tmp_path, monkeypatch):
    # the GEMM rate climbs while the grid runs (as on a shared machine that calms down): 50, 60, ... GFLOP/s
    rates = itertools.count(50e9, 10e9)
    monkeypatch.setattr(floor, "gemm_rate", lambda *args, **kwargs: next(rates))
    monkeypatch.setattr(cpu_targets, "_GEMM_RATE", {})
    out = tmp_path / "grid.csv"
    earlier = {f: "x" for f in cpu_targets.FIELDS}  # a row of an earlier run: kept as it is
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, cpu_targets.FIELDS)
        writer.writeheader()
        writer.writerow(earlier)

    cpu_targets.main(GRID + ["--out", str(out)])

    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0] == earlier
    new = rows[1:]
    assert [(r["pass"], r["B"]) for r in new] == [("forward", "8"), ("forward", "16"), ("forward+backward", "8"),
                                                 ("forward+backward", "16")]
    best = max(cpu_targets._GEMM_RATE.values())
    assert best == pytest.approx(80.0)  # one rate per row, the last the highest
    for r in new:
        assert r["gemm_GFs"] == "80"
        floor_ms = cpu_targets.gemm_gflop("LSTM", r["pass"], 20 * int(r["B"]), 64) / best * 1e3
        assert float(r["floor_ms"]) == pytest.approx(floor_ms, abs=0.006)
        for side in ("nn", "fused"):  # from the unrounded time, which the 2-decimal column brackets
            ms, fraction = float(r[f"{side}_ms"]), float(r[f"{side}_of_floor"])
            assert floor_ms / (ms + 0.005) - 0.005 <= fraction <= floor_ms / (ms - 0.005) + 0.005, (side, r)


def test_a_file_with_other_columns_is_refused(tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("date,ratio\n2026-12-03,1.0\n")
    with pytest.raises(SystemExit):
        cpu_targets.main(GRID + ["--out", str(out)])
    assert out.read_text() == "date,ratio\n2026-12-03,1.0\n"
