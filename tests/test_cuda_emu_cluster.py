"""Thread block clusters in the CUDA-on-CPU emulator (csrc/cuda/emu/cluster.cpp) and ptx.cuh's cluster
wrappers (rank and size, the split cluster barrier, mapa into another block's shared memory), for the sm_90
cluster variant of the persistent kernels (benchmarks/PERSISTENT_V2.md).

- tests/emu/runtime_scenarios.cpp "cluster_exchange": blocks of 2x2 clusters exchange values through each other's
  shared memory (dynamic and static) for 5 rounds across the cluster barrier, against a host computation, in the
  plain, ThreadSanitizer and AddressSanitizer + UBSan builds, bitwise repeatable; with more blocks than one wave
  of a non-cooperative launch (waves must hold whole clusters).
- Mutation: one cluster barrier removed -> ThreadSanitizer reports the race.
- Misuse is an error as the CUDA runtime or the PTX ISA says: a grid that is not a whole number of clusters, 16
  blocks without the non-portable opt-in, a wait without an arrive, a rank outside the cluster.
- nvcc for sm_90 (tests/emu/cluster_sm90.cu): the wrappers compile, and the SASS has the hardware cluster
  barrier (UCGABAR_ARV / UCGABAR_WAIT) and reads the CTA's rank in the cluster (SR_CgaCtaId).
Limits: no model of the GPU's memory ordering (CUDA_EMU.md) nor of where clusters are placed (GPCs).
"""
import subprocess
from pathlib import Path

import pytest

import emu_build
from test_cuda_emu_runtime import MISUSE_EXIT, assert_race_reported, run_expecting_failure, run_ok

pytestmark = pytest.mark.torch_free  # programs that link no torch (pyproject.toml's markers)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("variant", ["", "big"], ids=["2-clusters", "16-clusters-in-waves"])
@pytest.mark.parametrize("mode", emu_build.MODES)
def test_cluster_exchange_passes(mode, variant):
    run_ok(mode, "cluster_exchange", *([variant] if variant else []))


def test_cluster_exchange_is_bitwise_repeatable():
    assert len({run_ok("plain", "cluster_exchange").stdout for _ in range(3)}) == 1


def test_cluster_of_16_with_the_non_portable_opt_in_runs():
    run_ok("tsan", "cluster_16_non_portable")


def test_missing_cluster_barrier_is_reported_by_tsan():
    # the same kernel passes with every barrier in place (test_cluster_exchange_passes[tsan])
    assert_race_reported(run_expecting_failure("tsan", "cluster_exchange", "bug"))


CLUSTER_MISUSE = [
    ("cluster_not_dividing", "does not divide the grid"),
    ("cluster_16_portable", "at most 8 (16 with cudaFuncAttributeNonPortableClusterSizeAllowed)"),
    ("cluster_wait_without_arrive", "waits without having arrived"),
    ("cluster_rank_outside", "maps shared memory to rank 2 of a cluster of 2 blocks"),
]


@pytest.mark.parametrize("scenario, message", CLUSTER_MISUSE, ids=[m[0] for m in CLUSTER_MISUSE])
def test_cluster_misuse_is_an_error(scenario, message):
    proc = run_expecting_failure("plain", scenario)
    assert proc.returncode == MISUSE_EXIT, (proc.returncode, proc.stderr[-3000:])
    assert "fr_emu: error:" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]


def test_cluster_wrappers_compile_for_sm90_to_the_hardware_barrier(tmp_path):
    nvcc = emu_build.nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME or /usr/local/cuda): the sm_90 check needs it")
    obj = tmp_path / "cluster.o"
    r = subprocess.run([nvcc, "-std=c++17", "-gencode=arch=compute_90,code=sm_90", f"-I{ROOT / 'csrc'}", "-c",
                        str(ROOT / "tests" / "emu" / "cluster_sm90.cu"), "-o", str(obj)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    cuobjdump = emu_build.cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's wheel): cannot read the SASS")
    sass = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    for instruction in ("UCGABAR_ARV", "UCGABAR_WAIT", "SR_CgaCtaId"):
        assert instruction in sass, f"{instruction} missing from the SASS:\n{sass[-3000:]}"
    # the cluster exchange kernel: two full barriers and the split one, each an arrive and a wait
    assert sass.count("UCGABAR_ARV") >= 2 and sass.count("UCGABAR_WAIT") >= 2
