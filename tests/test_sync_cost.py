"""benchmarks/sync_cost.cu, the synchronisation microbenchmark (`python -m benchmarks.sync_cost`).

Without a GPU: it compiles with nvcc for sm_80 and sm_90a with no warning, `--list` names every case (the
cluster cases only in the sm_90a build, with the reason in the sm_80 one), and the sm_90a SASS holds the
instructions each case is meant to time. In the CPU emulator (csrc/cuda/emu/; plain, ThreadSanitizer and
AddressSanitizer + UBSan builds of the same file): every case runs a few steps at a small grid without deadlock, every CTA reads the h
(and the k-split cases the partial gate sums) the producers wrote for that step, and the flags and counters
end at their targets; three planted synchronisation bugs are caught. With a CUDA GPU: a short run prints one
row per measurement and no failed check.

Limits (csrc/cuda/emu/README.md): the emulator has the host's strong memory model, so a fence missing on the GPU
shows only as a ThreadSanitizer report (the planted missing fence is caught that way), and its cluster arrive
releases even when .relaxed; the GPU run's own checks are what test the hardware's ordering.
"""
import functools
import os
import shutil
import subprocess

import pytest
import torch

import emu_build
from benchmarks import sync_cost

pytestmark = pytest.mark.torch_free  # programs that link no torch (pyproject.toml's markers)

GRID_CASES = ("empty", "grid_sync", "flags_neighbour", "flags_all", "flags_all_h", "counter", "counter_h",
              "counter_spin", "counter_relaxed", "counter_relaxed_h", "tree4", "tree8", "tree16", "tree8_h")
CLUSTER_CASES = ("cluster_barrier", "cluster_barrier_relaxed", "cluster_dsmem", "cluster_dsmem_relaxed")
KSPLIT_CASES = ("ksplit_flags", "ksplit_counter")
CTA_COUNTS = (2, 8, 16, 32, 64, 96, 128, 132)
CLUSTER_SIZES = (2, 4, 8, 16)
KSPLIT_CTAS = 96


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
    cluster = [d for d in lines if d["case"] in CLUSTER_CASES + KSPLIT_CASES]
    assert [(d["case"], int(d["cluster"])) for d in cluster] == [
        (c, s) for c in CLUSTER_CASES + KSPLIT_CASES for s in CLUSTER_SIZES]
    assert all(int(d["ctas"]) == KSPLIT_CTAS for d in cluster if d["case"] in KSPLIT_CASES)
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
    # templates: cluster_step_kernel<kDsmem, kRelaxed>, grid_step_kernel<Sync, Poll, kGroup, kExchangeH>
    # (Sync: None 0, GridSync 1, FlagsNeighbour 2, FlagsAll 3, Counter 4, Tree 5; Poll: AcquireSleep 0,
    # AcquireSpin 1, RelaxedThenFence 2), ksplit_step_kernel<Sync>
    barrier = _kernel(k, "_Z19cluster_step_kernelILb0ELb0E")
    for instruction in ("MEMBAR.ALL.GPU", "UCGABAR_ARV", "UCGABAR_WAIT", "CCTL.IVALL"):
        assert instruction in barrier, instruction
    relaxed = _kernel(k, "_Z19cluster_step_kernelILb0ELb1E")
    assert "UCGABAR_ARV" in relaxed and "MEMBAR" not in relaxed  # the relaxed arrive has no fence
    dsmem = _kernel(k, "_Z19cluster_step_kernelILb1ELb0E")
    for instruction in ("ST.E.128", "MEMBAR.ALL.GPU", "UCGABAR_ARV", "UCGABAR_WAIT"):
        assert instruction in dsmem, instruction
    flags_h = _kernel(k, _grid("3", "0", 1, 1))
    for instruction in ("ST.E.STRONG.GPU", "LD.E.STRONG.GPU", "MEMBAR.ALL.GPU", "CCTL.IVALL", "NANOSLEEP",
                        "LDGSTS.E.BYPASS.128"):
        assert instruction in flags_h, instruction
    assert "LDGSTS" not in _kernel(k, _grid("3", "0", 1, 0))
    assert "ATOM" in _kernel(k, _grid("1", "0", 1, 0))  # grid.sync's arrival counter
    empty = _kernel(k, _grid("0", "0", 1, 0))
    assert "BAR.SYNC" in empty and "STRONG" not in empty and "MEMBAR" not in empty
    # the arrival counter: a release reduction (fence + an add at gpu scope, ATOM.E.ADD.STRONG.GPU in CUDA 13's
    # SASS), polled with acquire loads (a strong load + CCTL.IVALL) and nanosleep
    counter = _kernel(k, _grid("4", "0", 1, 0))
    for instruction in ("MEMBAR.ALL.GPU", "ADD.STRONG.GPU", "LD.E.STRONG.GPU", "CCTL.IVALL", "NANOSLEEP"):
        assert instruction in counter, instruction
    assert "NANOSLEEP" not in _kernel(k, _grid("4", "1", 1, 0))  # counter_spin
    # counter_relaxed: the poll loop is a plain strong load; the acquire comes from the one fence after it
    relaxed = _kernel(k, _grid("4", "2", 1, 0))
    assert "LD.E.STRONG.GPU" in relaxed and "NANOSLEEP" in relaxed and "MEMBAR" in relaxed
    tree = _kernel(k, _grid("5", "0", 8, 0))
    for instruction in ("ADD.STRONG.GPU", "ST.E.STRONG.GPU", "LD.E.STRONG.GPU"):
        assert instruction in tree, instruction
    for sync in ("3", "4"):  # ksplit: L2 slice by cp.async, partials by DSMEM stores, the cluster barrier
        ksplit = _kernel(k, f"_Z18ksplit_step_kernelIL4Sync{sync}EE")
        for instruction in ("LDGSTS.E.BYPASS.128", "ST.E.128", "UCGABAR_ARV", "UCGABAR_WAIT", "MEMBAR.ALL.GPU"):
            assert instruction in ksplit, instruction


def _grid(sync, poll, group, exchange_h):
    """The mangled name's start of grid_step_kernel<Sync(sync), Poll(poll), group, exchange_h>."""
    return f"_Z16grid_step_kernelIL4Sync{sync}EL4Poll{poll}ELi{group}ELb{exchange_h}EE"


# ---------------------------------------------------------------------------------------------------
# in the emulator: the same file, a few steps, with its checks
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _emu_exe(mode, mutation=0):
    """sync_cost.cu built for the emulator (copied to a .cpp: a compiler takes .cu for CUDA source; the copy's
    bytes key emu_build's cache)."""
    src_dir = emu_build.BUILD_DIR / "sync_cost_source"
    src_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / "sync_cost.cpp"
    if not src.exists() or src.read_bytes() != sync_cost.SOURCE.read_bytes():
        tmp = src.with_name(f"sync_cost.{os.getpid()}.tmp")
        shutil.copyfile(sync_cost.SOURCE, tmp)
        tmp.replace(src)
    return emu_build.build([src], mode, f"sync_cost_m{mutation}", defines=(f"SYNC_COST_MUTATION={mutation}",),
                           include_dirs=(sync_cost.SOURCE.parent,))  # its sync_cost_kernels.cuh


def _emulate(mode, case, ctas, cluster, steps=5, mutation=0, expect_ok=True):
    return emu_build.run(_emu_exe(mode, mutation), [case, ctas, cluster, steps], timeout=300, expect_ok=expect_ok)


# (case, CTAs, cluster size): 6 CTAs make groups of 4 + 2 for tree4 and one short group for tree8/16; 10 CTAs
# three groups of 4 + 4 + 2. The k-split cases at U = 8 units per CTA (H = 8 CTAs), the cluster sizes that fit.
EMULATED = ([(c, 6, 0) for c in GRID_CASES] + [("tree4", 10, 0), ("tree8_h", 12, 0)]
            + [(c, 8, s) for c in CLUSTER_CASES for s in (2, 4)]
            + [(c, 8, s) for c in KSPLIT_CASES for s in (2, 4, 8)] + [("ksplit_flags", 16, 16)])


@pytest.mark.parametrize("mode", emu_build.MODES)
@pytest.mark.parametrize("case,ctas,cluster", EMULATED)
def test_emulated_case_exchanges_the_right_data(mode, case, ctas, cluster):
    """Every CTA read epoch s of h (the k-split cases: and the C partial sums of its rows), the flags and counters
    ended at their targets, no deadlock; no race (ThreadSanitizer), no out-of-bounds access of shared memory, DSMEM
    included, or global memory (AddressSanitizer)."""
    out = _emulate(mode, case, ctas, cluster).stdout.strip()
    assert out == f"ok,{case},{ctas},{cluster},5,errors=0,counters_off=0"


# (mutation, case, CTAs, cluster size, what catches it in the plain build: exit codes)
PLANTED = [
    (1, "counter_relaxed_h", 6, 0, None),  # the relaxed poll without its fence: only TSan (host memory is strong)
    (2, "ksplit_flags", 8, 4, (1, 87)),    # no cluster barrier: wrong sums, or a peer mapped after it exited
    (2, "ksplit_counter", 8, 2, (1, 87)),
    (3, "tree8_h", 12, 0, (1,)),           # a tree leader that does not gather its group: stale h
]


@pytest.mark.parametrize("mutation,case,ctas,cluster,plain_exits", PLANTED)
def test_planted_synchronisation_bug_is_caught(mutation, case, ctas, cluster, plain_exits):
    r = _emulate("tsan", case, ctas, cluster, steps=6, mutation=mutation, expect_ok=False)
    assert r.returncode == emu_build.SANITIZER_EXIT and "ThreadSanitizer: data race" in r.stderr, r.stderr[-3000:]
    if plain_exits:
        r = _emulate("plain", case, ctas, cluster, steps=6, mutation=mutation, expect_ok=False)
        assert r.returncode in plain_exits, r.stdout + r.stderr[-3000:]


def test_runs_and_prints_one_row_per_case(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the benchmark runs on one")
    if sync_cost.nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME or /usr/local/cuda): the benchmark is compiled at test time")
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    lines = sync_cost.run(sync_cost.build(arch, tmp_path), steps=200)
    assert not [d for d in lines if d["kind"] == "fail"]
    cases = GRID_CASES + CLUSTER_CASES + KSPLIT_CASES
    measured = [d for d in lines if d["kind"] in ("row", "skip") and d["case"] in cases]
    assert len(measured) == (len(GRID_CASES) * len(CTA_COUNTS)
                             + len(CLUSTER_CASES + KSPLIT_CASES) * len(CLUSTER_SIZES))
    rows = [d for d in measured if d["kind"] == "row"]
    assert all(float(d["us_per_step"]) > 0 for d in rows)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert {d["case"] for d in rows if d["case"] in GRID_CASES} == set(GRID_CASES)
    assert all(int(d["ctas"]) <= sms for d in rows)
    if major >= 9:
        assert {d["case"] for d in rows if d["case"] in CLUSTER_CASES + KSPLIT_CASES} == set(CLUSTER_CASES + KSPLIT_CASES)
    assert _table_rows(sync_cost.markdown(lines)) == 1 + len(measured)
