"""The inline-PTX wrappers (csrc/cuda/ptx.cuh) against plain matrix products and expected copies.

The same test kernels (tests/emu/ptx_test_kernels.cuh) run
- in the CPU emulator (tests/emu/ptx_emu_driver.cpp), in the plain, ThreadSanitizer and
  AddressSanitizer + UBSan builds;
- on a CUDA GPU (tests/emu/ptx_golden.cu, compiled with nvcc at test time): the golden tests that
  check the PTX ISA fragment tables the emulation follows against the hardware.
Both read the same input file and write the same output file; the expected values come from
float64 matrix products (torch) and plain index arithmetic here.

Without a GPU the .cu program still compiles for sm_80 and sm_90 (a PTX typo fails here), and its
SASS is read: the mma wrappers must become tensor-core instructions (HMMA).

Limits: the emulated MMA adds in double and rounds once per instruction, the tensor core in its
own order and precision, so fp32 results may differ from the GPU's in the last bits (bf16/fp16/tf32
products are exact in fp32). A wait that is too weak shows in the emulator (the copy happens at
the wait) but may pass on a GPU, so those cases are emulator-only.
"""
import functools
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import emu_build

pytestmark = pytest.mark.torch_free  # programs that link no torch (pyproject.toml's markers)

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "emu"
DRIVER = EMU / "ptx_emu_driver.cpp"
GOLDEN = EMU / "ptx_golden.cu"

# cp.async modes of tests/emu/ptx_test_kernels.cuh (CpMode)
CP_CG16, CP_CA4, CP_CA8, CP_CA16, CP_PIPELINE, CP_ZFILL, CP_NO_WAIT, CP_WEAK_WAIT, CP_NO_COMMIT = range(9)
CP_THREADS, CP_GROUPS, FLAG_THREADS = 64, 3, 64
STALE = np.uint32(0xFFFFFFFF)  # shared memory is filled with 0xFF bytes at launch in the emulator


# ---------------------------------------------------------------------------------------------------
# running a case: in the emulator (one build per mode) or on the GPU
# ---------------------------------------------------------------------------------------------------


def _emu_skip_reason():
    path, why = emu_build.compiler()
    return None if path else why


@functools.lru_cache(maxsize=None)
def _emu_exe(mode):
    # emu_build keys its cache on the driver and csrc/ headers; the test kernels' header is keyed through a define
    kernels = hashlib.sha256((EMU / "ptx_test_kernels.cuh").read_bytes()).hexdigest()[:16]
    return emu_build.build([DRIVER], mode, "ptx_ops", defines=(f"FR_PTX_TEST_KERNELS_SHA={kernels}",))


@functools.lru_cache(maxsize=None)
def _golden_exe():
    """The golden program built for this machine's GPU (nvcc ~10-20 s)."""
    out = ROOT / "build" / "ptx_golden" / "ptx_golden"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [emu_build.nvcc(), "-std=c++17", "-O2", "-arch=native", f"-I{ROOT / 'csrc'}", str(GOLDEN), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}"
    return out


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if emu_build.nvcc() is None:
        return "needs nvcc (CUDA_HOME or /usr/local/cuda) to build the golden program"
    return None


def _run(where, tmp_path, case, params, *arrays):
    """Runs `case` with the given input arrays; returns the output file's bytes."""
    inp, out = tmp_path / f"{case}.in", tmp_path / f"{case}.out"
    inp.write_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    args = [case, inp, out, *params]
    if where == "gpu":
        r = subprocess.run([str(_golden_exe()), *map(str, args)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"golden program failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    else:
        emu_build.run(_emu_exe(where), args=[str(a) for a in args])
    return out.read_bytes()


WHERE = [pytest.param(m, id=m) for m in emu_build.MODES] + [pytest.param("gpu", id="gpu")]


@pytest.fixture(params=WHERE)
def where(request):
    reason = _gpu_skip_reason() if request.param == "gpu" else _emu_skip_reason()
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(params=emu_build.MODES)
def emulated(request):
    """The emulator only (cases whose expected result holds there and not necessarily on a GPU)."""
    reason = _emu_skip_reason()
    if reason:
        pytest.skip(reason)
    return request.param


# ---------------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------------
def _bits16(t):
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _tf32_rna(x):
    """cvt.rna.tf32.f32 as ptxas compiles it (read in the SASS): finite values + 0x1000, then the low
    13 bits cleared (ties away from zero; a NaN with payload only in the low bits becomes inf)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    finite = (u & 0x7F800000) != 0x7F800000
    return (np.where(finite, u + np.uint32(0x1000), u) & np.uint32(0xFFFFE000)).astype(np.uint32)


def _tf32_value(bits):
    return (np.asarray(bits, dtype=np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)


def _check_mma(D, A, B, C, where, ksteps, k_per_mma):
    """D (fp32) against A @ B + C in float64. The emulator rounds once per mma (ksteps roundings);
    the tensor core's own accumulation is allowed one fp32 ulp per added term."""
    ref = torch.bmm(A, B) + C
    scale = torch.bmm(A.abs(), B.abs()) + C.abs()
    eps = 2.0 ** -24
    tol = (eps * ksteps if where != "gpu" else 2 * eps * (k_per_mma + 1) * ksteps) * scale + 1e-30
    err = (torch.from_numpy(D.astype(np.float64)).view_as(ref) - ref).abs()
    assert torch.isfinite(torch.from_numpy(D)).all(), "non-finite output: a fragment element was not written"
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs off, first at {bad.nonzero()[0].tolist()}: "
                           f"max error {err.max().item():.3g}, tolerance {tol[bad].min().item():.3g}")


# ---------------------------------------------------------------------------------------------------
# mma.sync
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiles,ksteps", [(1, 1), (5, 3)], ids=["1tile", "5tiles-3k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_mma_m16n8k16(where, tmp_path, dtype, tiles, ksteps):
    g = torch.Generator().manual_seed(11 * tiles + ksteps)
    K = 16 * ksteps
    A = torch.randn(tiles, 16, K, generator=g).to(dtype)
    B = torch.randn(tiles, K, 8, generator=g).to(dtype)
    C = torch.randn(tiles, 16, 8, generator=g)
    case = "mma_bf16" if dtype == torch.bfloat16 else "mma_f16"
    out = _run(where, tmp_path, case, [tiles, ksteps], _bits16(A), _bits16(B), C.numpy())
    D = np.frombuffer(out, dtype=np.float32).reshape(tiles, 16, 8).copy()
    _check_mma(D, A.double(), B.double(), C.double(), where, ksteps, 16)


@pytest.mark.parametrize("convert", [1, 0], ids=["cvt-rna", "raw-bits"])
def test_mma_m16n8k8_tf32(where, tmp_path, convert):
    g = torch.Generator().manual_seed(5 + convert)
    tiles, ksteps = 3, 2
    K = 8 * ksteps
    A = torch.randn(tiles, 16, K, generator=g)
    B = torch.randn(tiles, K, 8, generator=g)
    C = torch.randn(tiles, 16, 8, generator=g)
    out = _run(where, tmp_path, "mma_tf32", [tiles, ksteps, convert], A.numpy(), B.numpy(), C.numpy())
    D = np.frombuffer(out, dtype=np.float32).reshape(tiles, 16, 8).copy()
    # operands as the tensor core sees them: rounded by cvt.rna, or the raw bits with the low 13 ignored
    op = (lambda x: _tf32_value(_tf32_rna(x.numpy()))) if convert else (lambda x: _tf32_value(x.numpy().view(np.uint32)))
    _check_mma(D, torch.from_numpy(op(A)), torch.from_numpy(op(B)), C.double(), where, ksteps, 8)


def test_cvt_tf32(where, tmp_path):
    g = torch.Generator().manual_seed(3)
    rnd = (torch.randn(500, generator=g) * torch.exp2(torch.randint(-20, 20, (500,), generator=g).float())).numpy()
    # ties (low 13 bits exactly 0x1000) both signs, just below and above ties, subnormals, the top
    # of the range (rounds to inf), zeros, infinities, NaNs (one with its payload in the low 13 bits)
    u = np.array([0x3F801000, 0xBF801000, 0x3F800FFF, 0x3F801001, 0x3F803000, 0x00001000, 0x00000FFF,
                  0x80003000, 0x7F7FF000, 0x7F7FEFFF, 0xFF7FFFFF, 0x00000000, 0x80000000, 0x7F800000,
                  0xFF800000, 0x7FC00000, 0xFFC01234, 0x7F800001], dtype=np.uint32)
    x = np.concatenate([rnd.astype(np.float32), u.view(np.float32)])
    out = np.frombuffer(_run(where, tmp_path, "cvt_tf32", [x.size], x), dtype=np.uint32)
    np.testing.assert_array_equal(out, _tf32_rna(x))


# ---------------------------------------------------------------------------------------------------
# ldmatrix
# ---------------------------------------------------------------------------------------------------
def _ldmatrix_expected(src, num, trans):
    """src [tiles][8 num][8] -> [tiles][32 lanes][num] .b32, from the PTX ISA table."""
    tiles = src.shape[0]
    lane = np.arange(32)
    out = np.zeros((tiles, 32, num), dtype=np.uint32)
    for j in range(num):
        M = src[:, 8 * j:8 * j + 8, :].astype(np.uint32)  # row r: the row lane 8j + r addressed
        if trans:
            lo, hi = M[:, 2 * (lane % 4), lane // 4], M[:, 2 * (lane % 4) + 1, lane // 4]
        else:
            lo, hi = M[:, lane // 4, 2 * (lane % 4)], M[:, lane // 4, 2 * (lane % 4) + 1]
        out[:, :, j] = lo | (hi << 16)
    return out


@pytest.mark.parametrize("trans", [0, 1], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4], ids=["x1", "x2", "x4"])
def test_ldmatrix(where, tmp_path, num, trans):
    tiles = 3
    g = torch.Generator().manual_seed(num * 2 + trans)
    src = torch.randint(0, 1 << 16, (tiles, 8 * num, 8), generator=g).numpy().astype(np.uint16)
    out = np.frombuffer(_run(where, tmp_path, "ldmatrix", [num, trans, tiles], src), dtype=np.uint32)
    np.testing.assert_array_equal(out.reshape(tiles, 32, num), _ldmatrix_expected(src, num, trans))


def test_ldmatrix_x4_is_the_mma_a_fragment():
    """The identity the kernels rely on: x4 over a row-major 16x16 tile, matrices (rows 0-7, cols 0-7),
    (8-15, 0-7), (0-7, 8-15), (8-15, 8-15), gives a[i] = A[g + 8(i&1)][2t + 8(i>>1) + {0,1}]."""
    A = np.arange(256, dtype=np.uint32).reshape(16, 16)
    mats = np.concatenate([A[0:8, 0:8], A[8:16, 0:8], A[0:8, 8:16], A[8:16, 8:16]])[None]
    frag = _ldmatrix_expected(mats, 4, False)[0]
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for i in range(4):
        r, c = g + 8 * (i & 1), 2 * t + 8 * (i >> 1)
        np.testing.assert_array_equal(frag[:, i], A[r, c] | (A[r, c + 1] << 16))


def test_ldmatrix_feeds_mma(where, tmp_path):
    """ldmatrix.x4 (A) and .x2.trans (B) from row-major tiles in shared memory, then mma: A B + C."""
    tiles = 3
    g = torch.Generator().manual_seed(21)
    A = torch.randn(tiles, 16, 16, generator=g).to(torch.bfloat16)
    B = torch.randn(tiles, 16, 8, generator=g).to(torch.bfloat16)
    C = torch.randn(tiles, 16, 8, generator=g)
    out = _run(where, tmp_path, "ldmatrix_mma", [tiles], _bits16(A), _bits16(B), C.numpy())
    D = np.frombuffer(out, dtype=np.float32).reshape(tiles, 16, 8).copy()
    _check_mma(D, A.double(), B.double(), C.double(), where, 1, 16)


# ---------------------------------------------------------------------------------------------------
# cp.async
# ---------------------------------------------------------------------------------------------------
def _cp_chunk(mode):
    return {CP_CA4: 1, CP_CA8: 2}.get(mode, 4)


def _cp_expected(src, mode):
    """out[grp][i] = the chunk thread (i+1) % 64 copied in group grp (zero-filled / stale where due)."""
    exp = np.roll(src, -1, axis=1).view(np.uint32).copy()
    if mode == CP_ZFILL:
        keep = (np.arange(CP_THREADS) + 1) % CP_THREADS % 5  # floats that thread copied from src
        exp[:, np.arange(4)[None, :] >= keep[:, None]] = 0
    if mode in (CP_NO_WAIT, CP_NO_COMMIT):
        exp[:] = STALE
    if mode == CP_WEAK_WAIT:
        exp[2] = STALE
    return exp


def _run_cp(where, tmp_path, mode):
    g = torch.Generator().manual_seed(100 + mode)
    src = torch.randn(CP_GROUPS, CP_THREADS, _cp_chunk(mode), generator=g).numpy()
    out = np.frombuffer(_run(where, tmp_path, "cp_async", [mode], src), dtype=np.uint32).reshape(src.shape)
    return out, _cp_expected(src, mode)


@pytest.mark.parametrize("mode", [CP_CG16, CP_CA4, CP_CA8, CP_CA16, CP_PIPELINE, CP_ZFILL],
                         ids=["cg16", "ca4", "ca8", "ca16", "wait_group-pipeline", "cg16-zfill"])
def test_cp_async(where, tmp_path, mode):
    out, exp = _run_cp(where, tmp_path, mode)
    np.testing.assert_array_equal(out, exp)


@pytest.mark.parametrize("mode", [CP_NO_WAIT, CP_WEAK_WAIT, CP_NO_COMMIT],
                         ids=["no-wait", "wait_group1-reads-newest", "no-commit"])
def test_cp_async_missing_wait_leaves_stale_data(emulated, tmp_path, mode):
    """The emulator copies at the wait: data read before its wait is the launch's 0xFF fill."""
    out, exp = _run_cp(emulated, tmp_path, mode)
    assert (exp == STALE).any()
    np.testing.assert_array_equal(out, exp)


@pytest.mark.parametrize("what,message", [(0, "ldmatrix: a row address is not 16-byte aligned"),
                                          (1, "cp.async: address not aligned to the copy size")],
                         ids=["ldmatrix", "cp_async"])
def test_misaligned_address_is_refused(emulated, tmp_path, what, message):
    """A misaligned address is an emulator error (exit 87) naming the kernel's line, not a wrong result."""
    inp = tmp_path / "none.in"
    inp.write_bytes(b"")
    r = emu_build.run(_emu_exe(emulated), ["misaligned", inp, tmp_path / "none.out", what], expect_ok=False)
    assert r.returncode == 87, r.stderr
    assert f"fr_emu: error: {message} (" in r.stderr and "ptx_test_kernels.cuh:" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------
# release/acquire flags
# ---------------------------------------------------------------------------------------------------
def _flags_expected(seed, steps):
    """data[s][b][i] = 3 data[s-1][b-1][(i+1) % 64] + data[s-1][b][i] + s (uint32), total = sum over b of the last."""
    exp = np.zeros((steps,) + seed.shape, dtype=np.uint64)
    exp[0] = seed
    mask = (1 << 32) - 1
    for s in range(1, steps):
        left = np.roll(exp[s - 1], 1, axis=0)  # block b reads block b-1
        exp[s] = (3 * np.roll(left, -1, axis=1) + exp[s - 1] + s) & mask
    return exp.astype(np.uint32), (exp[-1].sum(axis=0) & mask).astype(np.uint32)


def _flags_input(nb):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 1 << 31, (nb, FLAG_THREADS), generator=g).numpy().astype(np.uint32)


def test_flags_release_acquire(where, tmp_path):
    nb, steps = 5, 6
    seed = _flags_input(nb)
    out = np.frombuffer(_run(where, tmp_path, "flags", [nb, steps, 0], seed), dtype=np.uint32)
    exp_data, exp_total = _flags_expected(seed, steps)
    np.testing.assert_array_equal(out[:-FLAG_THREADS].reshape(exp_data.shape), exp_data)
    np.testing.assert_array_equal(out[-FLAG_THREADS:], exp_total)


def test_flags_without_release_acquire_is_a_race(tmp_path):
    """Planted bug: the step flags published and read relaxed. ThreadSanitizer must report the data race the
    release/acquire pair prevents (the result may still be right on x86)."""
    reason = _emu_skip_reason()
    if reason:
        pytest.skip(reason)
    inp, out = tmp_path / "flags.in", tmp_path / "flags.out"
    inp.write_bytes(_flags_input(5).tobytes())
    r = emu_build.run(_emu_exe("tsan"), ["flags", inp, out, 5, 6, 1], expect_ok=False)
    assert r.returncode == emu_build.SANITIZER_EXIT and "data race" in r.stderr, (r.returncode, r.stderr[-3000:])


# ---------------------------------------------------------------------------------------------------
# nvcc: the PTX assembles for sm_80 and sm_90, and the mma wrappers are tensor-core instructions
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden_object(tmp_path_factory):
    nvcc = emu_build.nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (CUDA_HOME or /usr/local/cuda)")
    obj = tmp_path_factory.mktemp("ptx_golden") / "ptx_golden.o"
    cmd = [nvcc, "-std=c++17", "-O2", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
           "arch=compute_90,code=sm_90", f"-I{ROOT / 'csrc'}", "-c", str(GOLDEN), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}"
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return obj


def test_golden_program_compiles_for_sm80_and_sm90(golden_object):
    assert golden_object.stat().st_size > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_has_tensor_core_instructions(golden_object, arch):
    cuobjdump = emu_build.cuobjdump()
    if cuobjdump is None:
        pytest.skip("needs cuobjdump (CUDA toolkit, or the one in triton's wheel)")
    r = subprocess.run([cuobjdump, "--dump-sass", "--gpu-architecture", arch, str(golden_object)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sass = _sass_by_function(r.stdout)
    def instrs(fragment):
        (name,) = [n for n in sass if fragment in n]
        return sass[name]
    # mangled names: mma_k16_kernel<__nv_bfloat16 / __half>, ldmatrix_kernel<4, true>, ...
    for kernel, opcode in [("mma_k16_kernelI13__nv_bfloat16E", "HMMA.16816.F32.BF16"),
                           ("mma_k16_kernelI6__halfE", "HMMA.16816.F32"),
                           ("mma_tf32_kernel", "HMMA.1688.F32.TF32"), ("ldmatrix_kernelILi4ELb1E", "LDSM.16.MT88.4"),
                           ("ldmatrix_kernelILi2ELb0E", "LDSM.16.M88.2"), ("cp_async_kernel", "LDGSTS")]:
        assert any(opcode in i for i in instrs(kernel)), f"{arch}: no {opcode} in {kernel}"
    assert not any("HMMA" in i for i in instrs("cvt_tf32_kernel"))


def _sass_by_function(dump):
    """cuobjdump --dump-sass text -> {function name: [instruction lines]}."""
    out, name = {}, None
    for line in dump.splitlines():
        s = line.strip()
        if s.startswith("Function :"):
            name = s.split(":", 1)[1].strip()
            out[name] = []
        elif name and s.startswith("/*") and "*/" in s:
            out[name].append(s.split("*/", 1)[1].strip())
    return out


# The ordering wrappers added for relaxed polling and the relaxed cluster arrive: one tiny kernel each, compiled
# for sm_90 here. What they order is tested where they are used: benchmarks/sync_cost.cu in the emulator
# (tests/test_sync_cost.py: correct data under ThreadSanitizer, and a relaxed poll without its fence is a race).
_ORDERING_KERNELS = r"""
#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"
__global__ void relaxed_poll_kernel(unsigned* flag, unsigned* out) {
  while (fr_ptx::ld_relaxed_gpu(flag) == 0u) {}
  fr_ptx::fence_acq_rel_gpu();
  out[0] = out[1];
}
__global__ void relaxed_arrive_kernel(unsigned* out) {
  fr_ptx::cluster_arrive_relaxed();
  fr_ptx::cluster_wait_acquire();
  out[0] = 1u;
}
__global__ void fenced_relaxed_arrive_kernel(unsigned* out) {
  out[0] = 1u;
  fr_ptx::fence_acq_rel_cluster();
  fr_ptx::cluster_arrive_relaxed();
  fr_ptx::cluster_wait_acquire();
}
"""


def test_ordering_wrappers_sass(tmp_path):
    nvcc, cuobjdump = emu_build.nvcc(), emu_build.cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump (CUDA toolkit, or the cuobjdump in triton's wheel)")
    src, obj = tmp_path / "ordering.cu", tmp_path / "ordering.o"
    src.write_text(_ORDERING_KERNELS)
    cmd = [nvcc, "-std=c++17", "-O2", "-arch=sm_90a", f"-I{ROOT / 'csrc'}", "-c", str(src), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    r = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sass = {name: "\n".join(lines) for name, lines in _sass_by_function(r.stdout).items()}

    def body(prefix):
        (name,) = [n for n in sass if n.startswith(prefix)]
        return sass[name]
    poll = body("_Z19relaxed_poll_kernel")
    # the loop reads with a strong load and no L1 invalidation; the fence after it is the acquire
    assert "LD.E.STRONG.GPU" in poll and "MEMBAR.ALL.GPU" in poll
    assert poll.index("LD.E.STRONG.GPU") < poll.index("MEMBAR.ALL.GPU")
    arrive = body("_Z21relaxed_arrive_kernel")
    assert "UCGABAR_ARV" in arrive and "UCGABAR_WAIT" in arrive and "MEMBAR" not in arrive
    fenced = body("_Z28fenced_relaxed_arrive_kernel")
    assert "MEMBAR" in fenced and fenced.index("MEMBAR") < fenced.index("UCGABAR_ARV")
