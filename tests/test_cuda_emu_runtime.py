"""The CUDA-on-CPU emulator's runtime (csrc/cuda/emu/): barriers, warp collectives, atomics, shared memory, and
the defects it exists to catch.

Every scenario is a small kernel in tests/emu/runtime_scenarios.cpp, built in the three modes of
tests/emu_build.py (plain, ThreadSanitizer, AddressSanitizer + UBSan). Correct programs must pass in every mode
with no sanitizer report, and give bitwise-identical output when repeated. Planted defects must be caught: a wrong
result, a sanitizer report, a deadlock report (exit 86) or a misuse error (exit 87), whichever the GPU analogue
calls for.

Time (2 shared cores, clang++-16; see csrc/cuda/emu/README.md for g++): the three builds take 10-25 s each on a
fresh checkout (the runtime objects are then cached under build/emu/), the runs about 10 s together, three of
which are the deadlock tests waiting out their 1 s stall limit.
"""
import functools
import time
from pathlib import Path

import pytest

import emu_build

DRIVER = Path(__file__).parent / "emu" / "runtime_scenarios.cpp"
MODES = emu_build.MODES
DEADLOCK_EXIT, MISUSE_EXIT = 86, 87


@functools.lru_cache(maxsize=None)
def _exe(mode):
    return emu_build.build([DRIVER], mode, "runtime_scenarios")


def run_ok(mode, *args):
    proc = emu_build.run(_exe(mode), args)
    assert proc.stdout.rstrip().endswith("ok"), proc.stdout
    return proc


def run_expecting_failure(mode, *args, timeout=60):
    return emu_build.run(_exe(mode), args, expect_ok=False, timeout=timeout)


# ---- correct programs: right in every mode, no sanitizer report ----------------------------------------------
CORRECT = [
    "reduce",                 # __syncthreads + static and dynamic shared memory
    "pingpong",               # blocks exchange through global memory across fr_grid_sync()
    "warp_ops",               # every shuffle variant with widths, ballot/any/all, half-warp masks, __activemask
    "atomics",                # atomicAdd/Sub/Max/Min/Or/CAS on int, unsigned long long, float, double
    "allgather",              # fr_emu::warp_allgather, full and interleaved masks
    "nan_smem",               # shared memory nobody wrote reads as NaN
    "smem_reuse",             # the correct versions of the planted-bug kernels below
    "syncwarp",
    "oob_global",
    "smem_overrun",
    "dynamic_smem_overrun",
    "grid_sync_cooperative",
    "cooperative_fits",       # exactly as many blocks as the small fake device holds
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", CORRECT)
def test_correct_program_passes(mode, scenario):
    run_ok(mode, scenario)


@pytest.mark.parametrize("mode", ["plain", "tsan"])
@pytest.mark.parametrize("scenario", ["reduce", "pingpong", "atomics"])
def test_repeated_runs_are_bitwise_identical(mode, scenario):
    outputs = {run_ok(mode, scenario).stdout for _ in range(3)}
    assert len(outputs) == 1, outputs


# ---- planted defects ----------------------------------------------------------------------------------------
def assert_race_reported(proc):
    assert proc.returncode == emu_build.SANITIZER_EXIT, (proc.returncode, proc.stderr[-3000:])
    assert "WARNING: ThreadSanitizer: data race" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", MODES)
def test_missing_syncthreads_before_shared_reuse_is_caught(mode):
    # Lanes of a warp run one after another until a barrier, so lane 1 reads what lane 0 already overwrote: the
    # result is wrong in every build, and ThreadSanitizer reports the race.
    proc = run_expecting_failure(mode, "smem_reuse", "bug")
    if mode == "tsan":
        assert_race_reported(proc)
    else:
        assert proc.returncode == 1 and "smem_reuse: WRONG" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


def test_missing_grid_sync_is_reported_by_tsan():
    assert_race_reported(run_expecting_failure("tsan", "pingpong", "bug"))


@pytest.mark.parametrize("mode", MODES)
def test_missing_syncwarp_is_caught(mode):
    proc = run_expecting_failure(mode, "syncwarp", "bug")
    if mode == "tsan":
        assert_race_reported(proc)
    else:  # lane 0 reads lane 31's element before lane 31 ran: the NaN fill
        assert proc.returncode == 1 and "syncwarp: WRONG" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


@pytest.mark.parametrize("scenario", ["oob_global", "smem_overrun", "dynamic_smem_overrun"])
def test_out_of_bounds_is_reported_by_asan(scenario):
    # one element past a global array, a static shared array, the dynamic shared buffer
    proc = run_expecting_failure("asan", scenario, "bug")
    assert proc.returncode == emu_build.SANITIZER_EXIT, (proc.returncode, proc.stderr[-3000:])
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]


# ---- refusals and reports instead of hangs ------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_block_skipping_grid_sync_is_reported_as_deadlock(mode):
    _exe(mode)  # build outside the timed part
    start = time.monotonic()
    proc = run_expecting_failure(mode, "skip_grid_sync", "x", "1.0", timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == DEADLOCK_EXIT, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr
    assert "fr_emu: deadlock" in err
    assert "block (2,0,0):\n    threads 0-63: exited" in err, err
    assert "block (0,0,0):\n    threads 0-63: wait at fr_grid_sync() runtime_scenarios.cpp" in err, err
    assert "grid sync: 3 of 4 blocks arrived" in err, err
    assert elapsed < 15, elapsed


MISUSE = [
    ("grid_sync_not_cooperative", "in a launch that is not cooperative"),
    ("cooperative_too_large", "cooperative launch refused"),
    ("mask_exited", "the mask names lane 16, which has exited"),
    ("mask_diverged", "the mask names lane 16, which waits at __syncthreads()"),
]


@pytest.mark.parametrize("mode", ["plain", "tsan"])
@pytest.mark.parametrize("scenario, message", MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_is_an_error(mode, scenario, message):
    proc = run_expecting_failure(mode, scenario)
    assert proc.returncode == MISUSE_EXIT, (proc.returncode, proc.stderr[-3000:])
    assert "fr_emu: error:" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert emu_build.sanitizer_report(proc.stderr) is None, proc.stderr[-3000:]
