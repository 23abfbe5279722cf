"""The CUDA-on-CPU emulator's runtime (csrc/cuda/emu/): barriers, warp collectives, atomics, shared memory, and
the defects it exists to catch.

Every scenario is a small kernel in tests/emu/runtime_scenarios.cpp, built in the three modes of
tests/emu_build.py (plain, ThreadSanitizer, AddressSanitizer + UBSan). Correct programs must pass in every mode
with no sanitizer report, and give bitwise-identical output when repeated. Planted defects must be caught: a wrong
result, a sanitizer report, a deadlock report (exit 86) or a misuse error (exit 87), whichever the GPU analogue
calls for.

Time, measured on the 2-core development machine under load average 15-28 from other work (clang++-16; the
suite also passes with FR_EMU_CXX=g++): 72-93 s from a fresh checkout, of which ~50-65 s are the three builds
of the driver and the runtime (about 28 s of CPU in all, so roughly 30-40 s on an idle 2-core runner); 17-26 s
with the builds cached under build/emu/, three of which are the deadlock tests waiting out their 1 s limit.
"""
import functools
import time
from pathlib import Path

import pytest

import emu_build

pytestmark = pytest.mark.torch_free  # programs that link no torch (pyproject.toml's markers)

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
    "barrier_loop",           # __syncwarp (full, half), allgather, __syncthreads, grid sync, 12 rounds
    "warp_ops",               # every shuffle variant with widths, ballot/any/all, half-warp masks, __activemask
    "atomics",                # atomicAdd/Sub/Max/Min/Or/CAS on int, unsigned long long, float, double
    "flag",                   # blocks hand over data through __threadfence + an atomic flag
    "allgather",              # fr_emu::warp_allgather, full and interleaved masks
    "nan_smem",               # shared memory nobody wrote reads as NaN
    "smem_reuse",             # the correct versions of the planted-bug kernels below
    "syncwarp",
    "oob_global",
    "smem_overrun",
    "dynamic_smem_overrun",
    "grid_sync_cooperative",
    "cooperative_fits",       # exactly as many blocks as the small fake device holds
    "cooperative_static_fits",  # the same, counting static shared memory
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", CORRECT)
def test_correct_program_passes(mode, scenario):
    run_ok(mode, scenario)


@pytest.mark.parametrize("scenario", ["pingpong", "syncwarp"])
def test_correct_program_passes_with_shared_tsan_identities(scenario):
    # more warps than TSan tracks lane by lane: no false report from lanes sharing an identity
    run_ok("tsan", scenario, "big")


@pytest.mark.parametrize("mode", ["plain", "tsan"])
@pytest.mark.parametrize("scenario", ["reduce", "pingpong", "barrier_loop", "atomics"])
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


@pytest.mark.parametrize("variant", ["bug", "bigbug"])
def test_missing_grid_sync_is_reported_by_tsan(variant):
    # bigbug: 8 blocks x 128 threads, more than TSan tracks lane by lane: most warps share one TSan identity
    assert_race_reported(run_expecting_failure("tsan", "pingpong", variant))


@pytest.mark.parametrize("skip", [1, 2, 3, 4], ids=["syncwarp", "syncwarp_half_mask", "syncthreads", "grid_sync"])
def test_each_barrier_removed_from_a_loop_is_reported_by_tsan(skip):
    # The same loop passes with every barrier in place (test_correct_program_passes[barrier_loop-tsan]).
    assert_race_reported(run_expecting_failure("tsan", "barrier_loop", f"skip={skip}"))


def test_missing_threadfence_is_reported_by_tsan():
    # x86 orders the stores anyway (a GPU need not): only TSan's model of fences sees this one
    assert_race_reported(run_expecting_failure("tsan", "flag", "bug"))


@pytest.mark.parametrize("variant", ["bug", "bigbug"])
@pytest.mark.parametrize("mode", MODES)
def test_missing_syncwarp_is_caught(mode, variant):
    # bigbug: 4 blocks x 256 threads; the first warps keep one TSan identity per lane, so the race still shows
    proc = run_expecting_failure(mode, "syncwarp", variant)
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
    ("cooperative_static_too_large", "at most 2 per SM (limited by shared memory per SM) x 2 SMs = 4"),
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


# ---- the emulator's own half precision (used where the CUDA toolkit's headers are absent) -------------------------
@pytest.mark.parametrize("own", [True, False], ids=["own_half_h", "toolkit"])
def test_half_conversions_round_like_torch(own, tmp_path):
    import torch

    if not own and emu_build._cuda_include() is None:
        pytest.skip("no CUDA toolkit headers: the emulator uses its own half.h (tested by the other case)")
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-8, 1e-6, 6e-5, 1e-3, 1.0, 300.0, 6e4, 1e30])
    x = torch.cat([
        (torch.randn(800, generator=gen) * scales.repeat_interleave(100)),
        torch.tensor([0.0, -0.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 65504.0, 65519.0, 65520.0, 2.0**-24, 2.0**-25,
                      3 * 2.0**-26, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38, float("inf"), float("-inf"), float("nan")]),
    ]).float()
    (tmp_path / "in.f32").write_bytes(x.numpy().tobytes())
    exe = emu_build.build([DRIVER.parent / "runtime_half.cpp"], "asan", "runtime_half_own" if own else "runtime_half",
                          defines=("FR_EMU_OWN_HALF",) if own else ())
    emu_build.run(exe, [tmp_path / "in.f32", tmp_path / "out.bin"])
    out = (tmp_path / "out.bin").read_bytes()
    n = x.numel()
    half_bits = torch.frombuffer(bytearray(out[: 2 * n]), dtype=torch.int16)
    bf16_bits = torch.frombuffer(bytearray(out[2 * n: 4 * n]), dtype=torch.int16)
    half_back = torch.frombuffer(bytearray(out[4 * n: 8 * n]), dtype=torch.float32)
    bf16_back = torch.frombuffer(bytearray(out[8 * n: 12 * n]), dtype=torch.float32)
    num = ~torch.isnan(x)  # NaN must stay NaN; its payload may differ
    assert torch.equal(half_bits[num], x[num].half().view(torch.int16))
    assert torch.equal(bf16_bits[num], x[num].bfloat16().view(torch.int16))
    assert torch.equal(half_back[num], x[num].half().float())
    assert torch.equal(bf16_back[num], x[num].bfloat16().float())
    assert torch.isnan(half_back[~num]).all() and torch.isnan(bf16_back[~num]).all()
