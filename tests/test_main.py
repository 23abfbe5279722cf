"""The README's main job runs and reports every backend usable here as agreeing with torch.nn."""
import subprocess
import sys


def test_main_job_runs_and_checks_backends():
    r = subprocess.run([sys.executable, "-m", "fused_rnn", "--T", "5", "--B", "2", "--H", "8", "--repeats", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch      max |diff|" in r.stdout and "FAILED" not in r.stdout
    assert "LSTM  torch.nn" in r.stdout
