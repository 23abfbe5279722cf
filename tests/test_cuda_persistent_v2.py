"""The persistent v2 kernels (csrc/cuda/persistent_v2_kernels.cuh) without a GPU.

- In the CPU emulator (tests/emu/v2_recurrence.cpp; csrc/cuda/emu/, ptx.cuh's emulated mma.sync,
  ldmatrix, cp.async and release/acquire flags): every cell x bf16/fp16, odd H, lengths and reverse,
  two tilings (several k-tiles per warp with idle warps; two m-tiles with several batch groups), the
  forward against the float64 reference (fused_rnn/reference.py) on y, h_n, c_n and the saved gates
  and cells, the backward (run on the forward's saved tensors) against the reference's autograd on
  d gx, d h0, d c0 and GRU's d gh; plain and ThreadSanitizer builds, two cases under
  AddressSanitizer + UBSan.
- Mutations that must fail: a warp that reads h without waiting for its producers' flags, a CTA that
  publishes its flag before writing the h it announces, a backward that sums other CTAs' partial dh
  without waiting for their flags.
- On a CUDA GPU (tests/emu/v2_gpu.cu, the same cases and files; skipped without one): the same
  comparisons, and bitwise repeatability over repeated launches.
- nvcc for sm_90 (tests/emu/v2_forward_sm90.cu, the tilings of benchmarks/PERSISTENT_V2.md): no
  local-memory spills, registers within one CTA per SM, and SASS with exactly MT*KT*NT tensor-core
  MMAs (HMMA) per step; fp32 instances (TF32, 3xTF32) with HMMA.1688.F32.TF32.

Limits (see ../shared/CUDA_EMU.md): the emulator is no model of the GPU's weaker memory model (a
missing fence can pass here) nor of speed; the emulated MMA adds in double. The fragment layouts are
checked on a GPU by ptx.cuh's golden tests and by the GPU tests here.
"""
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fused_rnn import reference
from helpers import TOL

pytestmark = pytest.mark.torch_free  # programs that link no torch (pyproject.toml's markers)

emu_build = pytest.importorskip("emu_build", reason="the emulator runtime (tests/emu_build.py) is not in this tree")

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "emu" / "v2_recurrence.cpp"
GPU_PROGRAM = ROOT / "tests" / "emu" / "v2_gpu.cu"
SM90_SOURCE = ROOT / "tests" / "emu" / "v2_sm90.cu"

CELLS = {"lstm": (0, 4), "gru": (1, 3), "rnn_tanh": (2, 1), "rnn_relu": (3, 1)}  # Cell id, gates
DTYPES = {torch.float16: 2, torch.bfloat16: 3}                                     # DType id
# Tiling 0: MT=1 KT=2 NT=2 (16 rows, 2 k-tiles per warp, 16 batch rows per CTA);
# tiling 1: MT=2 KT=1 NT=1 (32 rows, 8 batch rows per CTA). Units per CTA fit G*U in 16*MT rows.
UNITS = {0: {"lstm": 4, "gru": 5, "rnn_tanh": 11, "rnn_relu": 16},
         1: {"lstm": 7, "gru": 10, "rnn_tanh": 32, "rnn_relu": 13}}


def _exe(mode, mutable=False):
    """The driver; `mutable`: the build whose planted bug $FR_V2_MUTATION selects at run time."""
    if mutable:
        return emu_build.build([DRIVER], mode, "v2_recurrence_mutable", defines=("FR_V2_MUTABLE",))
    return emu_build.build([DRIVER], mode, "v2_recurrence")


def _inputs(cell, dtype, T, B, H, lengths, bias, seed):
    """Inputs of the forward and the gradients arriving at its outputs (dy, dh_n, dc_n)."""
    G = CELLS[cell][1]
    g = torch.Generator().manual_seed(seed)
    k = H ** -0.5
    lstm = cell == "lstm"
    x = {
        "gx": torch.randn(T, B, G * H, generator=g),
        "w_hh": (torch.rand(G * H, H, generator=g) * 2 - 1) * k * 2,
        "b_hh": (torch.rand(G * H, generator=g) * 2 - 1) * k if bias else None,
        "h0": torch.randn(B, H, generator=g) * 0.5,
        "c0": torch.randn(B, H, generator=g) * 0.5 if lstm else None,
        "dy": torch.randn(T, B, H, generator=g),
        "dh_n": torch.randn(B, H, generator=g),
        "dc_n": torch.randn(B, H, generator=g) if lstm else None,
    }
    x = {n: (v.to(dtype) if v is not None else None) for n, v in x.items()}
    lens = torch.randint(1, T + 1, (B,), generator=g, dtype=torch.int64) if lengths else None
    if lens is not None:
        lens[0] = T  # one full-length row, one that ends after the first step
        lens[-1] = 1
    return x, lens


def _write(d, x, lens):
    for n, v in x.items():
        if v is not None:
            v.contiguous().view(torch.int16).numpy().tofile(d / f"{n}.bin")
    if lens is not None:
        lens.numpy().tofile(d / "lengths.bin")


def _read(d, name, shape, dtype):
    raw = np.fromfile(d / f"{name}.bin", dtype=np.float32 if dtype == torch.float32 else np.int16)
    t = torch.from_numpy(raw)
    return (t if dtype == torch.float32 else t.view(dtype)).reshape(shape)


def _run(tmp_path, exe, cell, dtype, T, B, H, reverse, lengths, bias, tiling, seed=0, expect_ok=True,
         backward=True, mutation=0):
    x, lens = _inputs(cell, dtype, T, B, H, lengths, bias, seed)
    _write(tmp_path, x, lens)
    args = [tmp_path, CELLS[cell][0], DTYPES[dtype], T, B, H, int(reverse), int(lengths), int(bias),
            UNITS[tiling][cell], tiling, int(backward)]
    proc = emu_build.run(exe, args, timeout=600, expect_ok=expect_ok, env={"FR_V2_MUTATION": str(mutation)})
    return x, lens, proc


def _expected_saved(cell, x, lens, reverse):
    """The gates and cells the per-step path saves, step by step in float64 (LSTM i,f,g,o and c;
    GRU r,z,n,gh_n; zeros on finished rows, whose cells keep c)."""
    d = {n: (v.detach().double() if v is not None else None) for n, v in x.items()}
    gx, W, b = d["gx"], d["w_hh"], d["b_hh"]
    T, B, GH = gx.shape
    H = GH // CELLS[cell][1]
    h, c = d["h0"], d["c0"]
    gates, cells = torch.zeros(T, B, 4 * H, dtype=torch.float64), torch.zeros(T, B, H, dtype=torch.float64)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        gh = h @ W.t() + (b if b is not None else 0)
        alive = torch.ones(B, 1, dtype=torch.bool) if lens is None else (t < lens).unsqueeze(1)
        if cell == "lstm":
            pre = gx[t] + gh
            i, f, gg, o = (pre[:, k * H:(k + 1) * H] for k in range(4))
            i, f, gg, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(gg), torch.sigmoid(o)
            c_new = f * c + i * gg
            h_new = o * torch.tanh(c_new)
            gates[t] = torch.where(alive, torch.cat([i, f, gg, o], 1), 0.0)
            c = torch.where(alive, c_new, c)
            cells[t] = c
        else:
            r = torch.sigmoid(gx[t, :, :H] + gh[:, :H])
            z = torch.sigmoid(gx[t, :, H:2 * H] + gh[:, H:2 * H])
            n = torch.tanh(gx[t, :, 2 * H:] + r * gh[:, 2 * H:])
            h_new = n + z * (h - n)
            gates[t] = torch.where(alive, torch.cat([r, z, n, gh[:, 2 * H:]], 1), 0.0)
        h = torch.where(alive, h_new, h)
    return gates, cells


def _relu_backward_given_y(d, y, lens, reverse):
    """RNN relu's BPTT in float64 with the derivative's on/off pattern taken from the kernel's own
    output y (what its backward receives). The reference's autograd takes it from its own
    pre-activations, which differ from the kernel's by the bf16/fp16 rounding of h: where a
    pre-activation is within that rounding of 0 the two derivatives are 0 and 1, an O(1) difference
    that says nothing about the backward kernel."""
    T, B, H = y.shape
    W = d["w_hh"].detach()
    dh, dgx = d["dh_n"].detach().clone(), torch.zeros(T, B, H, dtype=torch.float64)
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        alive = torch.ones(B, 1, dtype=torch.bool) if lens is None else (t < lens).unsqueeze(1)
        dpre = torch.where(alive & (y[t] > 0), d["dy"][t].detach() + dh, 0.0)
        dgx[t] = dpre
        dh = torch.where(alive, dpre @ W, dh)
    return dgx, dh


def _check(tmp_path, cell, dtype, T, B, H, x, lens, reverse, backward=True):
    """Forward outputs and saved tensors, and (backward) the gradients of gx, h0, c0 and of the hidden
    pre-activations, against the float64 reference and its autograd."""
    d = {n: (v.double().requires_grad_(n in ("gx", "h0", "c0")) if v is not None else None) for n, v in x.items()}
    y_ref, h_ref, c_ref = reference.recurrence(cell, d["gx"], d["h0"], d["c0"], d["w_hh"], d["b_hh"], None,
                                               lens, reverse)
    got = {"y": _read(tmp_path, "y", (T, B, H), dtype), "h_n": _read(tmp_path, "h_n", (B, H), dtype)}
    want = {"y": y_ref, "h_n": h_ref}
    if cell == "lstm":
        got["c_n"], want["c_n"] = _read(tmp_path, "c_n", (B, H), dtype), c_ref
    G = CELLS[cell][1]
    if backward:
        loss = (y_ref * d["dy"]).sum() + (h_ref * d["dh_n"]).sum()
        if cell == "lstm":
            loss = loss + (c_ref * d["dc_n"]).sum()
        leaves = [d["gx"], d["h0"]] + ([d["c0"]] if cell == "lstm" else [])
        grads = torch.autograd.grad(loss, leaves)
        got["dgx"], want["dgx"] = _read(tmp_path, "dgx", (T, B, G * H), dtype), grads[0]
        got["dh0"], want["dh0"] = _read(tmp_path, "dh0", (B, H), dtype), grads[1]
        if cell == "lstm":
            got["dc0"], want["dc0"] = _read(tmp_path, "dc0", (B, H), dtype), grads[2]
        if cell == "rnn_relu":
            want["dgx"], want["dh0"] = _relu_backward_given_y(d, got["y"].double(), lens, reverse)
    want = {n: v.detach() for n, v in want.items()}
    if cell in ("lstm", "gru"):
        gates, cells = _expected_saved(cell, x, lens, reverse)
        got["gates"], want["gates"] = _read(tmp_path, "gates", (T, B, 4 * H), dtype), gates
        if backward and cell == "gru":  # grad of gh = h @ w_hh.T + b_hh: dgx, but d gh_n = d gx_n * r
            dgh = want["dgx"].clone()
            dgh[:, :, 2 * H:] *= gates[:, :, :H]
            got["dgh"], want["dgh"] = _read(tmp_path, "dgh", (T, B, 3 * H), dtype), dgh
        if cell == "lstm":
            got["cells"], want["cells"] = _read(tmp_path, "cells", (T, B, H), torch.float32), cells
    for name in got:
        a, e = got[name].double(), want[name]
        assert torch.isfinite(a).all(), f"{name}: elements never written (NaN poison) or non-finite"
        scale = max(1.0, e.abs().max().item())
        err = (a - e).abs().max().item()
        assert err <= TOL[dtype] * scale, f"{name}: max error {err:.3g} > {TOL[dtype] * scale:.3g} ({dtype})"


# ---------------------------------------------------------------------------------------------------
# against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("case", [
    # (T, B, H, reverse, lengths, bias, tiling)
    (5, 5, 37, False, False, True, 0),   # 3 k-tiles: warp 0 two, warp 1 one (+ one past the end), 6 idle
    (4, 11, 45, True, True, False, 1),   # two batch groups of 8 rows, reversed, variable lengths, no bias
    (3, 19, 133, True, True, True, 0),   # 9 k-tiles: every warp busy, the last with one; 2 groups of 16
], ids=["H37-fwd", "H45-rev-lengths-2groups", "H133-all-warps"])
def test_forward_backward_match_reference(tmp_path, cell, dtype, case):
    T, B, H, reverse, lengths, bias, tiling = case
    x, lens, _ = _run(tmp_path, _exe("plain"), cell, dtype, T, B, H, reverse, lengths, bias, tiling)
    _check(tmp_path, cell, dtype, T, B, H, x, lens, reverse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_under_thread_sanitizer(tmp_path, cell, dtype):
    T, B, H = 4, 11, 37
    x, lens, _ = _run(tmp_path, _exe("tsan"), cell, dtype, T, B, H, True, True, True, 1, seed=1)
    _check(tmp_path, cell, dtype, T, B, H, x, lens, True)


@pytest.mark.parametrize("cell,dtype", [("lstm", torch.bfloat16), ("gru", torch.float16)], ids=["lstm-bf16", "gru-fp16"])
def test_under_address_sanitizer(tmp_path, cell, dtype):
    T, B, H = 3, 11, 45
    x, lens, _ = _run(tmp_path, _exe("asan"), cell, dtype, T, B, H, False, True, True, 0, seed=2)
    _check(tmp_path, cell, dtype, T, B, H, x, lens, False)


# ---------------------------------------------------------------------------------------------------
# planted synchronisation bugs must fail (a wrong or poisoned result, or a TSan report)
# ---------------------------------------------------------------------------------------------------
def test_mutation_build_passes_unmutated(tmp_path):
    """The control of the mutation tests: the same build with no bug selected passes."""
    T, B, H, cell, dtype = 5, 11, 45, "lstm", torch.bfloat16
    x, lens, _ = _run(tmp_path, _exe("tsan", mutable=True), cell, dtype, T, B, H, False, False, True, 1)
    _check(tmp_path, cell, dtype, T, B, H, x, lens, False)


@pytest.mark.parametrize("mutation", [1, 2, 3],
                         ids=["flag-wait-removed", "flag-published-before-data", "backward-reduction-unwaited"])
def test_mutations_are_caught(tmp_path, mutation):
    T, B, H, cell, dtype = 5, 11, 45, "lstm", torch.bfloat16
    proc = None
    for seed in range(3):  # a race need not show on every run; one failure of three is enough
        x, lens, proc = _run(tmp_path, _exe("tsan", mutable=True), cell, dtype, T, B, H, False, False, True, 1,
                             seed=seed, expect_ok=False, mutation=mutation)
        if proc.returncode != 0 or emu_build.sanitizer_report(proc.stderr):
            return
        try:
            _check(tmp_path, cell, dtype, T, B, H, x, lens, False)
        except AssertionError:
            return
    pytest.fail(f"mutation {mutation} was not caught in 3 runs (last exit {proc.returncode})")


# ---------------------------------------------------------------------------------------------------
# on a GPU: the same program with cudaLaunchCooperativeKernel instead of the emulator
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_program(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the v2 kernels' GPU tests run in a GPU session")
    nvcc = emu_build.nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME or /usr/local/cuda): the GPU program is compiled at test time")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip(f"sm_{major}{minor}: the v2 kernels need mma.sync bf16 (sm_80 or newer)")
    exe = tmp_path_factory.mktemp("v2gpu") / "v2_gpu"
    arch = f"{major}{minor}"
    r = subprocess.run([nvcc, "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{ROOT / 'csrc'}",
                        str(GPU_PROGRAM), "-o", str(exe)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    return exe


def _run_gpu(exe, tmp_path, cell, dtype, case, repeat=1):
    T, B, H, reverse, lengths, bias, tiling = case
    x, lens = _inputs(cell, dtype, T, B, H, lengths, bias, 0)
    _write(tmp_path, x, lens)
    args = [tmp_path, CELLS[cell][0], DTYPES[dtype], T, B, H, int(reverse), int(lengths), int(bias),
            UNITS[tiling][cell], tiling, 1]
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "FR_V2_REPEAT": str(repeat)})
    assert r.returncode == 0, r.stdout + r.stderr
    return x, lens, r.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("case", [(5, 5, 37, False, False, True, 0), (4, 11, 45, True, True, False, 1),
                                  (9, 19, 133, True, True, True, 0)], ids=["H37", "H45-rev-lengths", "H133"])
def test_gpu_matches_reference(gpu_program, tmp_path, cell, dtype, case):
    x, lens, _ = _run_gpu(gpu_program, tmp_path, cell, dtype, case)
    T, B, H, reverse = case[:4]
    _check(tmp_path, cell, dtype, T, B, H, x, lens, reverse)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_bitwise_repeatable(gpu_program, tmp_path, cell):
    _, _, out = _run_gpu(gpu_program, tmp_path, cell, torch.bfloat16, (16, 19, 133, False, True, True, 0), repeat=5)
    lines = [l for l in out.split("\n") if "_us_per_step" in l]
    assert len(lines) == 2 and all(l.endswith("repeatable 1") for l in lines), out


# ---------------------------------------------------------------------------------------------------
# the machine code nvcc makes for sm_90
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sm90_object(tmp_path_factory):
    nvcc = emu_build.nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME or /usr/local/cuda): the sm_90 resource check needs it")
    obj = tmp_path_factory.mktemp("sm90") / "v2.o"
    r = subprocess.run([nvcc, "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v",
                        f"-I{ROOT / 'csrc'}", "-c", str(SM90_SOURCE), "-o", str(obj)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    return obj, r.stdout + r.stderr


def _tiling_of(mangled):
    """(MT, KT, NT) from a mangled persistent_v2_{forward,backward}_kernel<C, S, MT, KT, NT, M> name."""
    return tuple(int(v) for v in re.findall(r"Li(\d+)E", mangled)[-3:])


# persistent_plan.h V2Math (the last template argument): A registers per 16x16 w_hh tile, and the SASS MMA
# instructions per 16x16x8 block of one step: one HMMA.16816 (bf16/fp16); two HMMA.1688 TF32 (its two k8
# halves); six for 3xTF32 (big*big, big*small, small*big per half)
MATHS = {0: (4, r"\bHMMA\.16816\.F32\b", 1), 1: (8, r"\bHMMA\.1688\.F32\.TF32\b", 2),
         2: (16, r"\bHMMA\.1688\.F32\.TF32\b", 6)}


def _math_of(mangled):
    """The V2Math of a mangled v2 kernel name: (A registers per tile, HMMA pattern, HMMA per block)."""
    return MATHS[int(re.search(r"V2MathE(\d)E", mangled).group(1))]


def _check_hmma(name, sass):
    """MT*KT*NT blocks per step, each with the HMMA of its math, and no other MMA."""
    mt, kt, nt = _tiling_of(name)
    _, pattern, per_block = _math_of(name)
    assert len(re.findall(pattern, sass)) == per_block * mt * kt * nt, name
    assert len(re.findall(r"\bHMMA\.", sass)) == per_block * mt * kt * nt, f"{name}: other MMAs"


def test_sm90_no_spills_and_registers(sm90_object):
    _, log = sm90_object
    entries = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads.*?Used (\d+) registers", log, re.S)
    assert len(entries) == 20, log  # 10 instances (6 bf16/fp16, 4 fp32) x forward, backward
    for name, stack, st, ld, regs in entries:
        assert (int(stack), int(st), int(ld)) == (0, 0, 0), f"{name}: local memory used\n{log}"
        mt, kt, nt = _tiling_of(name)
        a_regs = _math_of(name)[0] * mt * kt
        # the A fragments alone take MT*KT*4 (fp32: *8, *16) registers; all of them must stay under one CTA of
        # 256 threads per SM
        assert a_regs < int(regs) <= 255, f"{name}: {regs} registers"


def test_sm90_sass_has_one_hmma_per_mma(sm90_object):
    cuobjdump = emu_build.cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's wheel): cannot read the SASS")
    obj, _ = sm90_object
    sass = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    assert len(functions) == 20
    for f in functions:
        name = f.split()[0]
        _check_hmma(name, f)
        assert "LDSM" in f, f"{name}: no ldmatrix in the SASS"
        if "forward" in name:
            assert "LDGSTS" in f, f"{name}: h not copied with cp.async"
        assert not re.search(r"\b(LDL|STL)\b", f), f"{name}: local memory in the SASS"


# ---------------------------------------------------------------------------------------------------
# exact fp32: 3xTF32 against 1xTF32 and an fp32 FFMA chain (benchmarks/PERSISTENT_V2.md, shape 3)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [64, 512, 2048])
def test_fp32_3xtf32_is_fp32_accurate(K):
    exe = emu_build.build([ROOT / "tests" / "emu" / "v2_fp32_accuracy.cpp"], "plain", "v2_fp32_accuracy")
    err = {}
    for seed in range(2):
        for line in emu_build.run(exe, [K, seed]).stdout.split("\n"):
            if line:
                name, max_rel, _ = line.split()
                err[name] = max(err.get(name, 0.0), float(max_rel))
    # relative to sum|a*b|: fp32 rounding is ~6e-8 per operation; TF32 keeps 11 bits (~5e-4 per product)
    assert err["ffma"] < 1e-6 and err["tf32x3"] < 1e-6, err
    assert err["tf32x1"] > 1e-5, err  # the measurement tells TF32 from fp32
    assert err["tf32x3"] < 2 * err["ffma"], err


# ---------------------------------------------------------------------------------------------------
# the machine code of the built extension: the launcher's own v2 instances (every cell x dtype x tiling)
# ---------------------------------------------------------------------------------------------------
def test_built_extension_v2_kernels_use_tensor_cores():
    """cuobjdump of fused_rnn/_C*.so (built with CUDA): every persistent_v2 kernel of the launcher, for
    every architecture it was built for, issues MT*KT*NT HMMA.16816 per step (fp32: 2 or 6 times as many
    HMMA.1688.F32.TF32) and uses no local memory."""
    so = next((ROOT / "fused_rnn").glob("_C*.so"), None)
    if so is None:
        pytest.skip("fused_rnn/_C is not built in this tree (python setup.py build_ext --inplace)")
    cuobjdump = emu_build.cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's wheel): cannot read the SASS")
    r = subprocess.run([cuobjdump, "--dump-sass", str(so)], capture_output=True, text=True, timeout=600)
    functions = [f for f in re.split(r"\n\s*Function : ", r.stdout)[1:] if "persistent_v2_" in f.split()[0]]
    if r.returncode != 0 or not functions:
        pytest.skip(f"{so.name} holds no CUDA kernels (a CPU-only build): {r.stderr.strip()[:200]}")
    archs = set(re.findall(r"arch = (sm_\d+)", r.stdout))
    # 4 cells x (2 dtypes x 4 tilings + fp32 TF32 x 2 tilings + fp32 3xTF32 x 1 tiling: persistent_plan.h
    # v2_tiling_for) x forward/backward, per architecture
    assert len(functions) == 88 * len(archs), (len(functions), archs)
    # one persistent design: no other persistent kernel in the extension
    others = {f.split()[0] for f in re.split(r"\n\s*Function : ", r.stdout)[1:]
              if "persistent" in f.split()[0] and "persistent_v2_" not in f.split()[0]}
    assert not others, sorted(others)[:4]
    maths = set()
    for f in functions:
        name = f.split()[0]
        _check_hmma(name, f)
        maths.add(int(re.search(r"V2MathE(\d)E", name).group(1)))
        assert not re.search(r"\b(LDL|STL)\b", f), f"{name}: local memory in the SASS"
    assert maths == {0, 1, 2}
