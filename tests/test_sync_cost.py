"""benchmarks/sync_cost.cu, the synchronisation microbenchmark (`python -m benchmarks.sync_cost`).

Without a GPU: it compiles with nvcc for sm_80 and sm_90a with no warning, `--list` names every case (the
cluster cases only in the sm_90a build, with the reason in the sm_80 one), and the sm_90a SASS holds the
instructions each case is meant to time. With a CUDA GPU: a short run prints one row per measurement.
"""
import subprocess

import pytest
import torch

import emu_build
from benchmarks import sync_cost

GRID_CASES = ("empty", "grid_sync", "flags_neighbour", "flags_all", "flags_all_h")
CLUSTER_CASES = ("cluster_barrier", "cluster_barrier_relaxed", "cluster_dsmem", "cluster_dsmem_relaxed")
CTA_COUNTS = (2, 8, 16, 32, 64, 96, 128, 132)
CLUSTER_SIZES = (2, 4, 8, 16)


@pytest.fixture(scope="module")
def executables(tmp_path_factory):
    """arch -> executable, each built once (nvcc --Werror all-warnings: a warning fails the build)."""
    if sync_cost.nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME or /usr/local/cuda): the benchmark is compiled at test time")
    out = tmp_path_factory.mktemp("sync_cost")
    return {arch: sync_cost.build(arch, out) for arch in ("sm_80", "sm_90a")}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_builds_and_lists_its_cases(executables, arch):
    lines = sync_cost.run(executables[arch], list_only=True)
    grid = [(d["case"], int(d["ctas"])) for d in lines if d["case"] in GRID_CASES]
    assert grid == [(c, n) for c in GRID_CASES for n in CTA_COUNTS]
    assert all(d["kind"] == "plan" for d in lines if d["case"] in GRID_CASES)
    cluster = [d for d in lines if d["case"] in CLUSTER_CASES]
    assert [(d["case"], int(d["cluster"])) for d in cluster] == [(c, s) for c in CLUSTER_CASES for s in CLUSTER_SIZES]
    if arch == "sm_90a":
        assert all(d["kind"] == "plan" for d in cluster)
    else:
        assert all(d["kind"] == "skip" and "sm_90" in d["note"] for d in cluster)
    assert len(lines) == len(grid) + len(cluster)
    assert _table_rows(sync_cost.markdown(lines)) == 1 + len(lines)  # the header + one row per case


def _table_rows(markdown):
    return sum(line.startswith("| ") for line in markdown.splitlines())


def _sass_by_kernel(exe):
    cuobjdump = emu_build.cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's wheel): cannot read the SASS")
    sass = subprocess.run([cuobjdump, "--dump-sass", str(exe)], capture_output=True, text=True, check=True).stdout
    kernels = {}
    for part in sass.split("Function : ")[1:]:
        name, _, body = part.partition("\n")
        kernels[name.strip()] = body
    return kernels


def _kernel(kernels, prefix):
    (body,) = [b for name, b in kernels.items() if name.startswith(prefix)]
    return body


def test_sm90_sass_has_the_instructions_each_case_times(executables):
    k = _sass_by_kernel(executables["sm_90a"])
    # templates: cluster_step_kernel<kDsmem, kRelaxed>, grid_step_kernel<kGridSync, Wait, kExchangeH>
    barrier = _kernel(k, "_Z19cluster_step_kernelILb0ELb0E")
    for instruction in ("MEMBAR.ALL.GPU", "UCGABAR_ARV", "UCGABAR_WAIT", "CCTL.IVALL"):
        assert instruction in barrier, instruction
    relaxed = _kernel(k, "_Z19cluster_step_kernelILb0ELb1E")
    assert "UCGABAR_ARV" in relaxed and "MEMBAR" not in relaxed  # the relaxed arrive has no fence
    dsmem = _kernel(k, "_Z19cluster_step_kernelILb1ELb0E")
    for instruction in ("ST.E.128", "MEMBAR.ALL.GPU", "UCGABAR_ARV", "UCGABAR_WAIT"):
        assert instruction in dsmem, instruction
    flags_h = _kernel(k, "_Z16grid_step_kernelILb0EL4Wait2ELb1E")
    for instruction in ("ST.E.STRONG.GPU", "LD.E.STRONG.GPU", "MEMBAR.ALL.GPU", "CCTL.IVALL", "NANOSLEEP",
                        "LDGSTS.E.BYPASS.128"):
        assert instruction in flags_h, instruction
    assert "LDGSTS" not in _kernel(k, "_Z16grid_step_kernelILb0EL4Wait2ELb0E")
    assert "ATOM" in _kernel(k, "_Z16grid_step_kernelILb1EL4Wait0ELb0E")  # grid.sync's arrival counter
    empty = _kernel(k, "_Z16grid_step_kernelILb0EL4Wait0ELb0E")
    assert "BAR.SYNC" in empty and "STRONG" not in empty and "MEMBAR" not in empty


def test_runs_and_prints_one_row_per_case(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the benchmark runs on one")
    if sync_cost.nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME or /usr/local/cuda): the benchmark is compiled at test time")
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    lines = sync_cost.run(sync_cost.build(arch, tmp_path), steps=200)
    measured = [d for d in lines if d["kind"] in ("row", "skip") and d["case"] in GRID_CASES + CLUSTER_CASES]
    assert len(measured) == len(GRID_CASES) * len(CTA_COUNTS) + len(CLUSTER_CASES) * len(CLUSTER_SIZES)
    rows = [d for d in measured if d["kind"] == "row"]
    assert all(float(d["us_per_step"]) > 0 for d in rows)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert {d["case"] for d in rows if d["case"] in GRID_CASES} == set(GRID_CASES)
    assert all(int(d["ctas"]) <= sms for d in rows)
    if major >= 9:
        assert {d["case"] for d in rows if d["case"] in CLUSTER_CASES} == set(CLUSTER_CASES)
    assert _table_rows(sync_cost.markdown(lines)) == 1 + len(measured)
