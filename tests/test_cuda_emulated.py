"""Every CUDA kernel of csrc/cuda, run on CPU threads by the emulator (csrc/cuda/emu, CUDA_EMU.md),
against the float64 reference (fused_rnn/reference.py, autograd for the gradients).

The drivers tests/emu/kernels_*.cpp compile the kernel headers (csrc/cuda/*_kernels.cuh) with a
host compiler and launch them as csrc/recurrence.cpp and the .cu launchers would on a GPU:
- kernels_pointwise: the per-step kernels (forward, backward, the projection's commit and prep)
  through recurrence.cpp's step loop, with a host GEMM where cuBLAS runs;
- kernels_persistent: the persistent forward and backward (tensor cores, per-step flags; bf16/fp16, and
  fp32 as TF32 or 3xTF32 by the param allow_tf32), launched cooperatively through persistent.cu's own
  persistent_v2_launch.cuh, with the plan of csrc/cuda/persistent_plan.h computed for a fake device
  (132 SMs as H100/H200, 108 as A100, 24 and 8 to force larger tilings or grids that do not fit); where
  the plan refuses a layer, the per-step kernels run it, as csrc/recurrence.cpp does; and the plan
  itself for fake devices.
Inputs are random (never zeros), every output is NaN-poisoned before the kernels run, tolerances come
from the dtype (helpers.TOL), and each driver repeats some runs and requires identical bits.

Three builds (tests/emu_build.py): plain (the wide matrix), ThreadSanitizer and AddressSanitizer +
UBSan (a subset that still runs every kernel: every cell, every dtype, lengths, reverse, the
projection); any sanitizer report fails. The mutation tests plant one bug each in a copy of the
persistent kernel header and require the emulated run to fail (the flag bugs: test_cuda_persistent_v2.py).

Time (clang 16, 2 shared cores at load average 10-28; wall / CPU seconds incl. building the driver
program), each part alone: plain 136 / 49, tsan 84 / 26, asan 114 / 40, mutations 89 / 38, plan 24 / 7;
the whole file at once 270 / 123 (load 12-16): about 2 minutes on an idle 2-core runner. With the v2
cases and the v2 instances in every build: the whole file 557 s wall from an empty build/emu/ at load
6-14 (plain persistent cases alone 136-165 s incl. the build). With the fp32 v2 cases (load 5-31): the
plain fp32 persistent cases 57-68 s, the fp32 sanitizer cases 726 s incl. the tsan and asan builds.
Details in csrc/README.md, "CUDA kernels on the CPU".
Limits: not a model of the GPU's memory ordering (a __threadfence is a full fence here) nor of its
speed; host expf/tanhf differ from the device's in the last ulp (hence tolerances); shapes stay tiny.
"""
import shutil
from pathlib import Path

import pytest
import torch

from fused_rnn import reference

from helpers import assert_close
from test_backends import differentiable, make_inputs

pytestmark = pytest.mark.torch_free  # programs that link no torch (pyproject.toml's markers)

emu_build = pytest.importorskip("emu_build", reason="the emulator's build helper (tests/emu_build.py) is missing")

ROOT = Path(__file__).resolve().parent.parent
EMU = Path(__file__).resolve().parent / "emu"
CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
CELL_ID = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}        # csrc/recurrence_params.h Cell
DTYPE_ID = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # ... DType
SHORT = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# Fake devices for the plan: SMs, the per-block shared-memory opt-in limit, shared memory per SM.
DEVICES = {
    "H100": {"sms": 132, "smem_optin": 227 * 1024, "smem_per_sm": 228 * 1024},
    "A100": {"sms": 108, "smem_optin": 163 * 1024, "smem_per_sm": 164 * 1024},
    "mid": {"sms": 24, "smem_optin": 227 * 1024, "smem_per_sm": 228 * 1024},
    "small": {"sms": 8, "smem_optin": 48 * 1024, "smem_per_sm": 64 * 1024},
}
# The v2 kernels' registers per thread as ptxas reports them for sm_90 (benchmarks/PERSISTENT_V2.md:
# 109-172): one 256-thread CTA per SM, which the fake devices' occupancy model and the emulator's
# co-residency check then assume.
V2_REGS = 168
# csrc/cuda/persistent_plan.h kV2Tilings: (MT, KT, NT, fp32), and the A-fragment registers per 16x16 tile of
# each V2Math (Mma16 for bf16/fp16, Tf32, Tf32x3) with their budget kV2MaxARegisters
V2_TILINGS = [(1, 2, 2, 0), (4, 4, 2, 0), (2, 6, 2, 0), (2, 8, 2, 0), (2, 4, 4, 1), (1, 4, 8, 1)]
V2_A_REGS = {"mma16": 4, "tf32": 8, "3xtf32": 16}
V2_MAX_A_REGS = 64
MATH_ID = {"mma16": 0, "tf32": 1, "3xtf32": 2}
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@pytest.fixture(scope="module")
def compiler():
    path, why = emu_build.compiler()
    if path is None:
        pytest.skip(f"no host compiler for the emulator: {why}")
    return path


DRIVERS = [EMU / "kernels_main.cpp", EMU / "kernels_pointwise.cpp", EMU / "kernels_persistent.cpp"]
_built = {}


def instance_mask(mode):
    """The (cell, dtype) kernel instances the `mode` build compiles (tests/emu/kernels_io.h FR_INSTANCES):
    all in the plain build, only those its cases run in the sanitizer builds (their builds are the slow part)."""
    mask = 0
    for _, kw in [*pointwise_cases(mode), *persistent_cases(mode)]:
        mask |= 1 << (CELL_ID[kw["cell"]] * 4 + DTYPE_ID[kw["dtype"]])
    return mask


def driver(mode):
    """tests/emu/kernels_*.cpp built for `mode` (cached by emu_build)."""
    if mode not in _built:
        defines = () if mode == "plain" else (f"FR_INSTANCES={instance_mask(mode)}",)
        _built[mode] = emu_build.build(DRIVERS, mode, "kernels", defines=defines)
    return _built[mode]


# ---------------------------------------------------------------- driver files (tests/emu/kernels_io.h)

def write_input(path, params, arrays):
    with open(path, "wb") as f:
        f.write(b"fused_rnn-emu\n")
        for k, v in params.items():
            f.write(f"param {k} {int(v)}\n".encode())
        for k, t in arrays.items():
            f.write(f"array {k} {t.element_size()} {t.numel()}\n".encode())
        f.write(b"end\n")
        for t in arrays.values():
            f.write(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def read_output(path):
    """params, {name: raw bytes} of a driver's output file."""
    data = Path(path).read_bytes()
    end = data.index(b"\nend\n")
    lines = data[:end].decode().splitlines()
    assert lines[0] == "fused_rnn-emu"
    params, arrays, offset = {}, {}, end + len(b"\nend\n")
    for line in lines[1:]:
        kind, name, *vals = line.split()
        if kind == "param":
            params[name] = int(vals[0])
        else:
            size = int(vals[0]) * int(vals[1])
            arrays[name] = data[offset:offset + size]
            offset += size
    assert offset == len(data)
    return params, arrays


def tensor(raw, dtype, *shape):
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).double()


def run_driver(tmp_path, exe, params, arrays, command=(), timeout=300, expect_ok=True):
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    write_input(inp, params, arrays)
    proc = emu_build.run(exe, [*command, inp, out], timeout=timeout, expect_ok=expect_ok)
    return proc, (read_output(out) if proc.returncode == 0 else None)


# ---------------------------------------------------------------- the reference and the comparison

def layer_inputs(cell, T, B, H, proj, lengths, reverse, bias, dtype):
    """make_inputs' random layer plus the incoming gradients dy, dh_n, dc_n, all in `dtype`."""
    args = make_inputs(cell, T, B, H, proj, lengths, reverse, bias, dtype, requires_grad=False)
    Hout = proj or H
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64).to(dtype)  # noqa: E731
    grads = (r(T, B, Hout), r(B, Hout), r(B, H) if cell == "lstm" else None)
    return args, grads


def expected(cell, args, grads, backward):
    """Outputs and (when `backward`) gradients of every differentiable input, in float64."""
    ref_args = [a.double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    outs = reference.recurrence(cell, *ref_args)
    exp = dict(zip(("y", "h_n", "c_n"), outs))
    if backward:
        loss = sum((o * g.double()).sum() for o, g in zip(outs, grads) if o is not None)
        names = [n for n, a in zip(("gx", "h0", "c0", "w_hh", "b_hh", "w_hr"), args[:6]) if a is not None]
        exp.update({"d_" + n: g for n, g in zip(names, torch.autograd.grad(loss, differentiable(ref_args)))})
    return exp


def weight_grads(dgh, y, h0, lengths, reverse):
    """d w_hh, d b_hh from the kernels' dG_h, exactly as csrc/recurrence.cpp forms them after the loop."""
    T, B, GH = dgh.shape
    if not reverse:
        d0 = dgh[0]
    elif lengths is None:
        d0 = dgh[T - 1]
    else:
        d0 = dgh.reshape(T * B, GH)[(lengths - 1) * B + torch.arange(B)]
    d_w_hh = d0.t() @ h0
    if T > 1:
        dg_rest, y_rest = (dgh[:T - 1], y[1:]) if reverse else (dgh[1:], y[:T - 1])
        d_w_hh = d_w_hh + dg_rest.reshape(-1, GH).t() @ y_rest.reshape(-1, y.shape[2])
    return d_w_hh, dgh.sum((0, 1))


def check(cell, args, grads, arrays, dtype, backward=True, acc=torch.float32, tol_dtype=None):
    """Every output and gradient of a driver run against the reference, with the tolerance of `tol_dtype`
    (default: of `dtype`)."""
    gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse = args
    T, B, GH = gx.shape
    H, Hout = GH // {"lstm": 4, "gru": 3}.get(cell, 1), h0.shape[1]
    exp = expected(cell, args, grads, backward)
    got = {"y": tensor(arrays["y"], dtype, T, B, Hout), "h_n": tensor(arrays["h_n"], dtype, B, Hout)}
    if cell == "lstm":
        got["c_n"] = tensor(arrays["c_n"], dtype, B, H)
    # the saved tensors are outputs too: every element written (no NaN poison left), incl. frozen rows
    for name, dt in (("gates", dtype), ("cells", acc), ("proj_in", dtype)):
        if name in arrays:
            saved = torch.frombuffer(bytearray(arrays[name]), dtype=dt)
            assert torch.isfinite(saved).all(), f"{name}: NaN (unwritten?)"
    if backward:
        dgx = tensor(arrays["dgx"], dtype, T, B, GH)
        dgh = tensor(arrays["dgh"], dtype, T, B, GH) if "dgh" in arrays else dgx
        got["d_gx"], got["d_h0"] = dgx, tensor(arrays["dh0"], dtype, B, Hout)
        if cell == "lstm":
            got["d_c0"] = tensor(arrays["dc0"], dtype, B, H)
        y = got["y"]
        got["d_w_hh"], d_b_hh = weight_grads(dgh, y, h0.double(), lengths, reverse)
        if b_hh is not None:
            got["d_b_hh"] = d_b_hh
        if w_hr is not None:
            dh_all = tensor(arrays["dh_all"], dtype, T, B, Hout)
            proj_in = tensor(arrays["proj_in"], dtype, T, B, H)
            got["d_w_hr"] = dh_all.reshape(-1, Hout).t() @ proj_in.reshape(-1, H)
    assert set(got) == {k for k, v in exp.items() if v is not None}, (sorted(got), sorted(exp))
    for name, value in got.items():
        assert_close(value, exp[name], tol_dtype or dtype, name)


# ---------------------------------------------------------------- per-step kernels

def run_pointwise(tmp_path, mode, cell, dtype, T, B, H, proj=0, lengths=None, reverse=False, bias=True,
                  grid_cap=0, repeats=1):
    args, grads = layer_inputs(cell, T, B, H, proj, lengths, reverse, bias, dtype)
    gx, h0, c0, w_hh, b_hh, w_hr, lens, _ = args
    dy, dh_n, dc_n = grads
    arrays = {"gx": gx, "h0": h0, "w_hh": w_hh, "dy": dy, "dh_n": dh_n}
    arrays.update({k: v for k, v in (("c0", c0), ("dc_n", dc_n), ("b_hh", b_hh), ("w_hr", w_hr), ("lengths", lens))
                   if v is not None})
    params = {"cell": CELL_ID[cell], "dtype": DTYPE_ID[dtype], "T": T, "B": B, "H": H, "Hout": proj or H,
              "reverse": reverse, "save": 1, "grid_cap": grid_cap, "repeats": repeats}
    _, (_, out) = run_driver(tmp_path, driver(mode), params, arrays, command=("pointwise",))
    check(cell, args, grads, out, dtype, acc=torch.float64 if dtype == torch.float64 else torch.float32)


def pointwise_cases(mode):
    """(id, kwargs) of the per-step runs of a build mode."""
    if mode == "plain":
        for cell in CELLS:
            for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
                yield f"{cell}-{SHORT[dtype]}-H37", dict(cell=cell, dtype=dtype, T=5, B=3, H=37)
                yield f"{cell}-{SHORT[dtype]}-H133-len-rev", dict(cell=cell, dtype=dtype, T=4, B=3, H=133,
                                                                    lengths=[4, 1, 3], reverse=True)
            yield f"{cell}-f32-H37-len-nobias", dict(cell=cell, dtype=torch.float32, T=5, B=3, H=37,
                                                      lengths=[5, 2, 4], bias=False)
            # one block for B*H = 266 elements: the grid-stride loop takes a second turn; 3 runs, same bits
            yield f"{cell}-f32-H133-rev-grid1-repeat", dict(cell=cell, dtype=torch.float32, T=4, B=2, H=133,
                                                             reverse=True, grid_cap=1, repeats=3)
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            yield f"lstm-proj-{SHORT[dtype]}-len-rev", dict(cell="lstm", dtype=dtype, T=5, B=3, H=37, proj=20,
                                                            lengths=[5, 2, 4], reverse=True)
        yield "lstm-proj-f32-H133", dict(cell="lstm", dtype=torch.float32, T=4, B=2, H=133, proj=64)
    else:  # every kernel instance family once: each cell, each dtype, lengths, reverse, the projection
        yield "lstm-proj-f32-len-rev", dict(cell="lstm", dtype=torch.float32, T=4, B=3, H=37, proj=20,
                                            lengths=[4, 1, 3], reverse=True, repeats=2)
        yield "gru-bf16-H133", dict(cell="gru", dtype=torch.bfloat16, T=4, B=2, H=133)
        yield "rnn_tanh-f16-len", dict(cell="rnn_tanh", dtype=torch.float16, T=4, B=3, H=37, lengths=[4, 1, 3])
        yield "rnn_relu-f64-rev-grid1", dict(cell="rnn_relu", dtype=torch.float64, T=4, B=3, H=133, reverse=True,
                                             grid_cap=1)


def mode_cases(cases):
    return [pytest.param(mode, kw, id=f"{mode}-{name}") for mode in emu_build.MODES for name, kw in cases(mode)]


@pytest.mark.parametrize("mode,kw", mode_cases(pointwise_cases))
def test_pointwise_kernels(compiler, tmp_path, mode, kw):
    run_pointwise(tmp_path, mode, **kw)


# ---------------------------------------------------------------- persistent kernels

def persistent_params(cell, dtype, T, B, H, reverse, device, save=True, repeats=1, tf32=False):
    return {"cell": CELL_ID[cell], "dtype": DTYPE_ID[dtype], "T": T, "B": B, "H": H, "reverse": reverse,
            "save": save, "repeats": repeats, "compute_capability": 90, "v2_regs": V2_REGS, "allow_tf32": tf32,
            **DEVICES[device]}


def run_persistent(tmp_path, mode, cell, dtype, T, B, H, device, lengths=None, reverse=False, bias=True,
                   save=True, repeats=1, exe=None, expect_ok=True, kernel=None, tf32=False):
    """Runs the persistent kernels with `device`'s plan: the driver's CompletedProcess, its output
    (None when it failed) and a function that compares that output with the reference."""
    args, grads = layer_inputs(cell, T, B, H, 0, lengths, reverse, bias, dtype)
    gx, h0, c0, w_hh, b_hh, _, lens, _ = args
    dy, dh_n, dc_n = grads
    arrays = {"gx": gx, "h0": h0, "w_hh": w_hh, "dy": dy, "dh_n": dh_n}
    arrays.update({k: v for k, v in (("c0", c0), ("dc_n", dc_n), ("b_hh", b_hh), ("lengths", lens)) if v is not None})
    exe = exe or driver(mode)
    proc, out = run_driver(tmp_path, exe, persistent_params(cell, dtype, T, B, H, reverse, device, save, repeats,
                                                            tf32), arrays, command=("persistent", "run"),
                           expect_ok=expect_ok)
    # TF32 operands keep 10 mantissa bits, as fp16: fp16's tolerance (3xTF32 keeps fp32's)
    tol = torch.float16 if tf32 and dtype == torch.float32 else None
    return proc, out, lambda: check(cell, args, grads, out[1], dtype, backward=save, tol_dtype=tol)


# csrc/cuda/persistent_plan.h PlanVerdict, in its order
VERDICTS = ["persistent", "float64", "empty-layer", "no-cooperative-launch", "slice-too-large", "not-co-resident",
            "query-failed", "register-budget", "projection", "old-architecture", "hidden-too-large"]


def persistent_cases(mode):
    """(id, kwargs) of the persistent runs; `kernel` is the plan's verdict: "persistent", or why the
    per-step kernels run the layer instead."""
    half = (torch.bfloat16, torch.float16)
    if mode == "plain":
        for cell in CELLS:
            for dtype in (torch.float32, *half):
                # 132 SMs: tiling (1,2,2) (bf16/fp16), 3-10 CTAs; fp32 3xTF32 (1,4,8), 3-10 CTAs
                yield f"{cell}-{SHORT[dtype]}-H100-H37", dict(cell=cell, dtype=dtype, T=5, B=3, H=37, device="H100",
                                                               kernel="persistent")
                # 8 SMs: 16-bit LSTM: no grid fits 8 SMs, the per-step kernels run; GRU (4,4,2), 7 CTAs of 21
                # units; RNN (4,4,2), 3 CTAs of 64 units; fp32 3xTF32 (1,4,8): 70,656 B of shared memory per
                # CTA, over the 48 KiB opt-in limit: per-step
                yield f"{cell}-{SHORT[dtype]}-small-H133-len-rev", dict(
                    cell=cell, dtype=dtype, T=4, B=3, H=133, device="small", lengths=[4, 1, 3], reverse=True,
                    kernel="slice-too-large" if dtype == torch.float32 else "not-co-resident" if cell == "lstm"
                    else "persistent")
            for dtype in half:
                # v2 with 2 batch groups (B=19), 9 k-tiles, reversed, variable lengths, no bias; 24 SMs:
                # LSTM (4,4,2) 9x2 CTAs, GRU (4,4,2) 7x2, RNN (1,2,2) 9x2
                yield f"{cell}-{SHORT[dtype]}-mid-H133-B19-len-rev-nobias", dict(
                    cell=cell, dtype=dtype, T=4, B=19, H=133, device="mid", lengths=[4, 1, 3, 2] * 4 + [4, 3, 1],
                    reverse=True, bias=False, kernel="persistent")
            # 108 SMs: fp32 3xTF32 v2 (1,4,8), 34 (LSTM) to 9 (RNN) CTAs, 9 k-tiles
            yield f"{cell}-f32-A100-H133-len", dict(cell=cell, dtype=torch.float32, T=4, B=2, H=133, device="A100",
                                                    lengths=[4, 2], kernel="persistent")
            # fp32 3xTF32 with two batch groups of 64 rows (B=70), odd H, lengths, reverse, no bias
            yield f"{cell}-f32-H100-H45-B70-len-rev-nobias", dict(
                cell=cell, dtype=torch.float32, T=3, B=70, H=45, device="H100", lengths=[3, 1, 2, 3, 2] * 14,
                reverse=True, bias=False, kernel="persistent")
            # fp32 TF32: (2,4,4), one and two batch groups of 32 rows, lengths, reverse
            yield f"{cell}-f32-tf32-H100-H37", dict(cell=cell, dtype=torch.float32, T=5, B=3, H=37, device="H100",
                                                    tf32=True, kernel="persistent")
            # (not RNN ReLU at this size: among its 15k pre-activations some lie within TF32's rounding of 0,
            # where the ReLU's derivative switches between 0 and 1 and no tolerance covers the gradients)
            yield f"{cell}-f32-tf32-H100-{'H45' if cell == 'rnn_relu' else 'H133'}-B37-len-rev", dict(
                cell=cell, dtype=torch.float32, T=3, B=37, H=45 if cell == "rnn_relu" else 133, device="H100",
                lengths=[3, 1, 2, 2] * 9 + [3], reverse=True, tf32=True, kernel="persistent")
            # 8 SMs, three runs, the same bits: LSTM per-step (3xTF32 (1,4,8) needs 10 CTAs); GRU, RNN 3xTF32,
            # 8 and 3 CTAs
            yield f"{cell}-f32-small-H37-rev-nobias-repeat", dict(
                cell=cell, dtype=torch.float32, T=5, B=5, H=37, device="small", reverse=True, bias=False, repeats=3,
                kernel="not-co-resident" if cell == "lstm" else "persistent")
            # fp32 above H=512: the A fragments would exceed the register budget, per-step
            yield f"{cell}-f32-H100-H520-len", dict(cell=cell, dtype=torch.float32, T=2, B=2, H=520, device="H100",
                                                    lengths=[2, 1], kernel="register-budget")
            # three v2 runs, the same bits
            yield f"{cell}-bf16-H100-H45-len-repeat", dict(cell=cell, dtype=torch.bfloat16, T=5, B=5, H=45,
                                                          device="H100", lengths=[5, 2, 4, 1, 5], repeats=3, kernel="persistent")
            # inference: nothing saved (gates/cells null), forward only; v2 (RNN, GRU (1,2,2); LSTM (4,4,2))
            yield f"{cell}-bf16-small-H37-len-nosave", dict(cell=cell, dtype=torch.bfloat16, T=5, B=3, H=37,
                                                            device="small", lengths=[5, 2, 4], save=False, kernel="persistent")
    else:
        yield "lstm-f32-small-H133-len-rev", dict(cell="lstm", dtype=torch.float32, T=4, B=2, H=133, device="small",
                                                  lengths=[4, 2], reverse=True, repeats=2, kernel="slice-too-large")
        yield "gru-bf16-small-H37", dict(cell="gru", dtype=torch.bfloat16, T=4, B=2, H=37, device="small", kernel="persistent")
        yield "rnn_tanh-f16-small-H37-len", dict(cell="rnn_tanh", dtype=torch.float16, T=4, B=3, H=37,
                                                 device="small", lengths=[4, 1, 3], kernel="persistent")
        yield "rnn_relu-f32-small-H37-rev", dict(cell="rnn_relu", dtype=torch.float32, T=4, B=2, H=37,
                                                 device="small", reverse=True, kernel="persistent")  # 3xTF32 (1,4,8), 3 CTAs
        for cell in CELLS:  # fp32 v2, both maths, lengths and reverse, odd H
            yield f"{cell}-f32-H100-H37-len-rev", dict(cell=cell, dtype=torch.float32, T=3, B=3, H=37, device="H100",
                                                       lengths=[3, 1, 2], reverse=True, kernel="persistent")
            yield f"{cell}-f32-tf32-H100-H45-len", dict(cell=cell, dtype=torch.float32, T=3, B=3, H=45,
                                                        device="H100", lengths=[3, 1, 2], tf32=True, kernel="persistent")
        yield "lstm-bf16-small-H37-nosave", dict(cell="lstm", dtype=torch.bfloat16, T=4, B=2, H=37, device="small",
                                                 save=False, kernel="persistent")
        # two batch groups, lengths, reverse, odd H; and 16-bit per-step where no grid fits
        yield "lstm-f16-mid-H45-B19-len-rev", dict(cell="lstm", dtype=torch.float16, T=4, B=19, H=45, device="mid",
                                                   lengths=[4, 1, 3, 2] * 4 + [4, 3, 1], reverse=True, repeats=2,
                                                   kernel="persistent")
        yield "rnn_relu-bf16-H100-H45-len", dict(cell="rnn_relu", dtype=torch.bfloat16, T=4, B=3, H=45,
                                                 device="H100", lengths=[4, 1, 3], kernel="persistent")
        yield "lstm-bf16-small-H133-per-step", dict(cell="lstm", dtype=torch.bfloat16, T=3, B=2, H=133,
                                                    device="small", kernel="not-co-resident")


@pytest.mark.parametrize("mode,kw", mode_cases(persistent_cases))
def test_persistent_kernels(compiler, tmp_path, mode, kw):
    kw = dict(kw)
    kernel = kw.pop("kernel")
    _, out, check_output = run_persistent(tmp_path, mode, **kw)
    params = out[0]
    assert VERDICTS[params["verdict"]] == kernel, params
    if kernel != "persistent":  # the plan refuses the layer: the per-step kernels run it, as recurrence.cpp
        assert not out[1], "the driver ran kernels the plan refused"
        run_pointwise(tmp_path, mode, kw["cell"], kw["dtype"], kw["T"], kw["B"], kw["H"], lengths=kw.get("lengths"),
                      reverse=kw.get("reverse", False), bias=kw.get("bias", True), repeats=kw.get("repeats", 1))
        return
    check_output()
    dev, H, B, G = DEVICES[kw["device"]], kw["H"], kw["B"], GATES[kw["cell"]]
    mt, kt, nt, fp32 = V2_TILINGS[params["tiling"]]
    math = "mma16" if kw["dtype"] != torch.float32 else "tf32" if kw.get("tf32") else "3xtf32"
    assert fp32 == (kw["dtype"] == torch.float32) and params["math"] == MATH_ID[math], params
    assert mt * kt * V2_A_REGS[math] <= V2_MAX_A_REGS, params
    assert params["units"] == min(16 * mt // G, H) and 8 * kt >= -(-H // 16), params
    assert params["grid_x"] == -(-H // params["units"]) and params["grid_y"] == -(-B // (8 * nt)), params
    assert params["grid_x"] * params["grid_y"] <= dev["sms"], params


# ---------------------------------------------------------------- the plan, for fake devices

def plan_lines(tmp_path, command, text, n):
    """The driver's `persistent <command>` answers to the `n` lines of `text`, each split into words."""
    path = Path(tmp_path) / f"{command}.txt"
    path.write_text(text)
    out = emu_build.run(driver("plain"), ["persistent", command, path]).stdout.split("\n")[:-1]
    assert len(out) == n
    return [o.split() for o in out]


def plans_v2(tmp_path, lines):
    """plan_persistent_v2's answers for `lines` of (cell, dtype, H, B, proj, device, cooperative, regs/thread,
    compute capability[, allow_tf32]), as (verdict, tiling, units, k_tiles, grid_x, grid_y, smem_forward,
    smem_backward)."""
    text = ""
    for c, d, H, B, proj, dev, coop, regs, cc, *tf32 in lines:
        dev = DEVICES[dev] if isinstance(dev, str) else dev
        text += (f"{CELL_ID[c]} {DTYPE_ID[d]} {H} {B} {int(proj)} {dev['sms']} {int(coop)} {dev['smem_optin']} "
                 f"{dev['smem_per_sm']} {regs} {cc} {int(bool(tf32 and tf32[0]))}\n")
    return [(v, *map(int, rest)) for v, *rest in plan_lines(tmp_path, "plan2", text, len(lines))]


def v2_smem(mt, nt, k_tiles, elem=2):
    """persistent_plan.h's v2 shared memory for `elem`-byte storage: forward h tile (rows padded by 16
    bytes) + partial sums, backward dG_h tile."""
    return 8 * nt * (16 * k_tiles * elem + 16) + 8 * 16 * mt * 8 * nt * 4, 8 * nt * (16 * mt * elem + 16)


def test_plan_v2_for_fake_devices(compiler, tmp_path):
    """The shapes of benchmarks/PERSISTENT_V2.md get the budget's tilings, grids and shared memory on
    an H100/H200; the others fall back for the stated reason."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    optin48 = {"sms": 132, "smem_optin": 48 * 1024, "smem_per_sm": 228 * 1024}
    R = V2_REGS
    cases = [  # (cell, dtype, H, B, proj, device, coop, regs, cc) -> (verdict, tiling, U, k_tiles, gx, gy, smem f, b)
        (("lstm", bf16, 768, 16, 0, "H100", 1, R, 90), ("persistent", 2, 8, 48, 96, 1, 41216, 1280)),
        (("lstm", bf16, 512, 64, 0, "H100", 1, R, 90), ("persistent", 1, 16, 32, 32, 4, 49408, 2304)),
        (("lstm", bf16, 256, 16, 0, "H100", 1, R, 90), ("persistent", 0, 4, 16, 64, 1, 16640, 768)),
        (("lstm", bf16, 1024, 16, 0, "H100", 1, R, 90), ("persistent", 3, 8, 64, 128, 1, 49408, 1280)),
        (("lstm", bf16, 1024, 256, 0, "H100", 1, R, 90), ("not-co-resident", -1, 0, 0, 0, 0, 0, 0)),
        (("gru", f16, 133, 5, 0, "H100", 1, R, 90), ("persistent", 0, 5, 9, 27, 1, *v2_smem(1, 2, 9))),
        (("rnn_tanh", bf16, 37, 40, 0, "H100", 1, R, 80), ("persistent", 0, 16, 3, 3, 3, *v2_smem(1, 2, 3))),
        (("lstm", f16, 5, 1, 0, "H100", 1, R, 90), ("persistent", 0, 4, 1, 2, 1, *v2_smem(1, 2, 1))),
        (("lstm", bf16, 133, 3, 0, "small", 1, R, 90), ("not-co-resident", -1, 0, 0, 0, 0, 0, 0)),
        (("lstm", bf16, 2048, 16, 0, "H100", 1, R, 90), ("hidden-too-large", -1, 0, 0, 0, 0, 0, 0)),
        (("lstm", bf16, 1024, 16, 0, optin48, 1, R, 90), ("slice-too-large", -1, 0, 0, 0, 0, 0, 0)),  # 49,408 B
        # fp32 (shape 3): 3xTF32 one batch group of 64 rows, (1,4,8); TF32 two of 32, (2,4,4) (the budget's (b'))
        (("lstm", f32, 512, 64, 0, "H100", 1, R, 90), ("persistent", 5, 4, 32, 128, 1, 164864, 5120)),
        (("lstm", f32, 512, 64, 0, "H100", 1, R, 90, 1), ("persistent", 4, 8, 32, 64, 2, 98816, 4608)),
        # 3xTF32 holds 16 registers per 16x16 tile, TF32 8: only the fp32 tilings' KT=4, H <= 512, fit the
        # budget of 64; the 16-bit tilings that cover larger H would need 128-192
        (("lstm", f32, 768, 16, 0, "H100", 1, R, 90), ("register-budget", -1, 0, 0, 0, 0, 0, 0)),
        (("lstm", f32, 1024, 16, 0, "H100", 1, R, 90, 1), ("register-budget", -1, 0, 0, 0, 0, 0, 0)),
        (("lstm", f32, 2048, 16, 0, "H100", 1, R, 90, 1), ("hidden-too-large", -1, 0, 0, 0, 0, 0, 0)),
        (("lstm", f32, 512, 128, 0, "H100", 1, R, 90), ("not-co-resident", -1, 0, 0, 0, 0, 0, 0)),
        (("lstm", torch.float64, 64, 4, 0, "H100", 1, R, 90), ("float64", -1, 0, 0, 0, 0, 0, 0)),
        (("lstm", bf16, 64, 4, 32, "H100", 1, R, 90), ("projection", -1, 0, 0, 0, 0, 0, 0)),  # per-step
        (("gru", bf16, 64, 4, 0, "H100", 1, R, 75), ("old-architecture", -1, 0, 0, 0, 0, 0, 0)),
        (("gru", bf16, 64, 4, 0, "H100", 0, R, 90), ("no-cooperative-launch", -1, 0, 0, 0, 0, 0, 0)),
    ]
    assert plans_v2(tmp_path, [c for c, _ in cases]) == [e for _, e in cases]


def test_plan_v2_invariants(compiler, tmp_path):
    """Over many sizes: the first compiled tiling whose warps cover H, whose shared memory fits and whose
    grid is co-resident wins; its CTAs cover every unit and batch row exactly once; no fit, no v2."""
    lines = [(c, d, H, B, 0, dev, 1, V2_REGS, 90, tf32) for dev in DEVICES for c in CELLS
             for d, tf32 in ((torch.bfloat16, 0), (torch.float16, 0), (torch.float32, 0), (torch.float32, 1))
             for H in [1, 7, 16, 17, 37, 133, 255, 512, 640, 1024, 1025] for B in (1, 16, 17, 64, 100)]
    for (c, d, H, B, _, dev, _, _, _, tf32), got in zip(lines, plans_v2(tmp_path, lines)):
        G, D, k_tiles = GATES[c], DEVICES[dev], -(-H // 16)
        math = "mma16" if d != torch.float32 else "tf32" if tf32 else "3xtf32"
        first = None
        for i, (mt, kt, nt, fp32) in enumerate(V2_TILINGS):
            U = min(16 * mt // G, H)
            gx, gy = -(-H // U), -(-B // (8 * nt))
            f, b = v2_smem(mt, nt, k_tiles, 4 if fp32 else 2)
            if (fp32 == (d == torch.float32) and 8 * kt >= k_tiles and mt * kt * V2_A_REGS[math] <= V2_MAX_A_REGS
                    and max(f, b) <= D["smem_optin"] and gx * gy <= D["sms"]):
                first = ("persistent", i, U, k_tiles, gx, gy, f, b)
                break
        if first is None:
            assert got[0] in ("not-co-resident", "hidden-too-large", "slice-too-large", "register-budget"), \
                (c, d, H, B, dev, got)
        else:
            assert got == first, (c, d, H, B, dev, got)
            _, i, U, _, gx, gy, _, _ = got
            mt, kt, nt, _ = V2_TILINGS[i]
            assert G * U <= 16 * mt and (gx - 1) * U < H <= gx * U and (gy - 1) * 8 * nt < B <= gy * 8 * nt


# ---------------------------------------------------------------- the tests bite: planted bugs

HEADER = "cuda/persistent_v2_kernels.cuh"
MUTATIONS = {  # id -> (build mode, original text, planted bug)
    # the barrier between a step's h stores and its flag release (the next step's readers wait on it)
    "syncthreads-removed": ("tsan", "    __syncthreads();  // every h of the epoch written (and every partial read) "
                                    "before the release",
                            "    // every h of the epoch written (and every partial read) before the release"),
    "single-buffered-h": ("tsan", "    S* h_next = h_buf + ((s + 1) & 1) * B * Hs;",
                          "    S* h_next = h_buf + (s & 1) * B * Hs;"),
    "out-of-bounds": ("asan", "static_cast<S*>(p.h_n)[idx] = L::store(h_reg[i]);",
                      "static_cast<S*>(p.h_n)[idx + H] = L::store(h_reg[i]);"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_planted_bug_fails(compiler, tmp_path, mutation):
    mode, original, bug = MUTATIONS[mutation]
    tree = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", tree)
    header = tree / HEADER
    text = header.read_text()
    assert text.count(original) == 1, f"the mutation's target is gone from {HEADER}: update MUTATIONS"
    header.write_text(text.replace(original, bug))
    lstm_bf16 = 1 << (CELL_ID["lstm"] * 4 + DTYPE_ID[torch.bfloat16])
    exe = emu_build.build(DRIVERS, mode, f"kernels-{mutation}",
                          defines=(f'FR_PERSISTENT_V2_LAUNCH="{tree / "cuda" / "persistent_v2_launch.cuh"}"',
                                   f"FR_INSTANCES={lstm_bf16}"))
    # 8 SMs: tiling (4,4,2), 3 CTAs that exchange h every step
    proc, out, check_output = run_persistent(tmp_path, mode, "lstm", torch.bfloat16, T=4, B=3, H=37, device="small",
                                             lengths=[4, 1, 3], exe=exe, expect_ok=False)
    if proc.returncode == 0:  # no sanitizer or deadlock report: the result must be wrong
        assert out[0]["verdict"] == 0, out[0]
        with pytest.raises(AssertionError):
            check_output()
    else:  # caught by a sanitizer or the emulator's deadlock report, not by some other failure
        report = emu_build.sanitizer_report(proc.stderr)
        assert report is not None or proc.returncode == 86, f"exit {proc.returncode}:\n{proc.stderr[-2000:]}"
