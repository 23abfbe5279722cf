"""Zoneout and the layer-normalised LSTM/GRU in the CUDA per-step kernels (csrc/cuda/pointwise_kernels.cuh:
one block per row, the layer norm's statistics a block reduction), run on CPU threads by the emulator
against the float64 reference (fused_rnn/reference.py, autograd for the gradients): every output, the
saved tensors written everywhere (NaN poison gone), and every gradient the op returns, formed from the
kernels' per-step grads as csrc/recurrence.cpp forms them (d w_hh from dmm, d b_hh from dgh, the gains'
from ln_hat and dcout). Plain build: each cell and dtype, odd H (37, 133: a block's threads take one
or several units), lengths, reverse, training masks and eval's p, a one-block grid; ThreadSanitizer
and AddressSanitizer + UBSan builds: a subset with every option, in the kernel instances those builds
compile (tests/test_cuda_emulated.py). Skips with the reason when no host compiler can build the
emulator (tests/emu_build.py). With nvcc present, the launcher (csrc/cuda/pointwise_cuda.cu) is also
compiled for sm_80 and sm_90, and ptxas must report no spills."""
import re
import subprocess

import pytest
import torch

from fused_rnn import functional, reference

from helpers import assert_close

pytestmark = pytest.mark.torch_free  # programs that link no torch (pyproject.toml's markers)

base = pytest.importorskip("test_cuda_emulated", reason="tests/test_cuda_emulated.py (the emulator's drivers)")
emu_build = base.emu_build

F64 = torch.float64


compiler = base.compiler  # the fixture: skips with the reason when no host compiler can build the emulator


def run_features(tmp_path, mode, cell, dtype, T, B, H, lengths=None, reverse=False, zoneout=None, ln=True,
                 grid_cap=0, repeats=1):
    """One forward + backward through the driver; zoneout None | "train" | "eval"."""
    args, grads = base.layer_inputs(cell, T, B, H, 0, lengths, reverse, True, dtype)
    gx, h0, c0, w_hh, b_hh, _, lens, _ = args
    dy, dh_n, dc_n = grads
    r = lambda *shape, k=1.0: (torch.randn(*shape, dtype=F64) * k).to(dtype)  # noqa: E731
    G = 4 if cell == "lstm" else 3
    gains = (1 + r(G * H, k=0.3), 1 + r(H, k=0.3), r(H, k=0.3)) if cell == "lstm" else (1 + r(G * H, k=0.3), None,
                                                                                      None)
    keep = None if zoneout is None else functional.zoneout_keep(0.3, zoneout == "train", cell, T, B, H, H, "cpu")
    arrays = {"gx": gx, "h0": h0, "w_hh": w_hh, "dy": dy, "dh_n": dh_n, "b_hh": b_hh}
    arrays.update({k: v for k, v in (("c0", c0), ("dc_n", dc_n), ("lengths", lens)) if v is not None})
    params = {"cell": base.CELL_ID[cell], "dtype": base.DTYPE_ID[dtype], "T": T, "B": B, "H": H, "Hout": H,
              "reverse": reverse, "save": 1, "grid_cap": grid_cap, "repeats": repeats}
    if ln:
        arrays.update({k: v for k, v in zip(("gain_hh", "gain_c", "bias_c"), gains) if v is not None})
    if zoneout == "train":
        arrays["keep_h"] = keep[0].to(torch.uint8)
        if cell == "lstm":
            arrays["keep_c"] = keep[1].to(torch.uint8)
    elif zoneout == "eval":
        params["keep_p_ppm"] = 300000
    _, (_, out) = base.run_driver(tmp_path, base.driver(mode), params, arrays, command=("pointwise",))

    # the reference in float64 on the same (rounded) inputs
    up = lambda a: a.double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
    ref_args, ref_ln = [up(a) for a in args], tuple(up(g) for g in gains) if ln else None
    outs = reference.recurrence(cell, *ref_args, zoneout=keep, layer_norm=ref_ln)
    loss = sum((o * g.double()).sum() for o, g in zip(outs, grads) if o is not None)
    names = ["gx", "h0", "c0", "w_hh", "b_hh"] + (["gain_hh", "gain_c", "bias_c"] if ln else [])
    leaves = ref_args[:5] + (list(ref_ln) if ln else [])
    present = [(n, t) for n, t in zip(names, leaves) if t is not None]
    exp = dict(zip(("y", "h_n", "c_n"), outs))
    exp.update({"d_" + n: g for (n, _), g in zip(present, torch.autograd.grad(loss, [t for _, t in present]))})

    acc = F64 if dtype == F64 else torch.float32
    GH = G * H
    got = {"y": base.tensor(out["y"], dtype, T, B, H), "h_n": base.tensor(out["h_n"], dtype, B, H)}
    if cell == "lstm":
        got["c_n"] = base.tensor(out["c_n"], dtype, B, H)
    for name, dt in (("gates", dtype), ("cells", acc), ("ln_hat", acc), ("ln_rstd", acc), ("dmm", dtype),
                     ("dcout", dtype)):
        if name in out:  # every element written, frozen rows included
            assert torch.isfinite(torch.frombuffer(bytearray(out[name]), dtype=dt)).all(), f"{name}: NaN (unwritten?)"
    dgx = base.tensor(out["dgx"], dtype, T, B, GH)
    dgh = base.tensor(out["dgh"], dtype, T, B, GH) if "dgh" in out else dgx
    dmm = base.tensor(out["dmm"], dtype, T, B, GH) if ln else dgh
    got["d_gx"], got["d_h0"] = dgx, base.tensor(out["dh0"], dtype, B, H)
    if cell == "lstm":
        got["d_c0"] = base.tensor(out["dc0"], dtype, B, H)
    got["d_w_hh"], _ = base.weight_grads(dmm, got["y"], h0.double(), lens, reverse)
    got["d_b_hh"] = dgh.sum((0, 1))
    if ln:
        hat = base.tensor(out["ln_hat"], acc, T, B, GH + (H if cell == "lstm" else 0))
        got["d_gain_hh"] = (dgh * hat[..., :GH]).sum((0, 1))
        if cell == "lstm":
            dcout = base.tensor(out["dcout"], dtype, T, B, H)
            got["d_gain_c"], got["d_bias_c"] = (dcout * hat[..., GH:]).sum((0, 1)), dcout.sum((0, 1))
    assert set(got) == {k for k, v in exp.items() if v is not None}, (sorted(got), sorted(exp))
    for name, value in got.items():
        assert_close(value, exp[name], dtype, name)


def cases(mode):
    if mode == "plain":
        for cell in ("lstm", "gru"):
            for dtype in (F64, torch.float32, torch.bfloat16, torch.float16):
                yield f"{cell}-{base.SHORT[dtype]}-H37-ln", dict(cell=cell, dtype=dtype, T=5, B=3, H=37)
            for zoneout in ("train", "eval"):
                yield f"{cell}-f64-H37-len-rev-{zoneout}", dict(cell=cell, dtype=F64, T=5, B=3, H=37,
                                                                lengths=[5, 2, 4], reverse=True, zoneout=zoneout,
                                                                ln=False)
                yield f"{cell}-f64-H133-len-ln-{zoneout}", dict(cell=cell, dtype=F64, T=4, B=3, H=133,
                                                                lengths=[4, 1, 3], zoneout=zoneout)
            yield f"{cell}-f32-H5-rev-ln-train", dict(cell=cell, dtype=torch.float32, T=4, B=2, H=5, reverse=True,
                                                      zoneout="train")
            # one block for three rows: the row loop takes more turns; 3 runs, the same bits
            yield f"{cell}-f32-H301-ln-eval-grid1-repeat", dict(cell=cell, dtype=torch.float32, T=3, B=3, H=301,
                                                                zoneout="eval", grid_cap=1, repeats=3)
    else:  # the instances the sanitizer builds compile: lstm f32, gru bf16
        yield "lstm-f32-H37-len-rev-ln-train", dict(cell="lstm", dtype=torch.float32, T=4, B=3, H=37,
                                                    lengths=[4, 1, 3], reverse=True, zoneout="train", repeats=2)
        yield "lstm-f32-H133-ln-eval-grid1", dict(cell="lstm", dtype=torch.float32, T=3, B=2, H=133,
                                                  zoneout="eval", grid_cap=1)
        yield "gru-bf16-H37-len-ln-train", dict(cell="gru", dtype=torch.bfloat16, T=4, B=3, H=37, lengths=[4, 1, 3],
                                                zoneout="train")


@pytest.mark.parametrize("mode,kw", base.mode_cases(cases))
def test_zoneout_and_layer_norm_kernels(compiler, tmp_path, mode, kw):
    run_features(tmp_path, mode, **kw)


NVCC = emu_build.nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed: no sm_80/sm_90 compile check")
def test_pointwise_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    csrc = base.ROOT / "csrc"
    cmd = [NVCC, "-std=c++17", "-O3", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
           "arch=compute_90,code=sm_90", "-Xptxas", "-v", f"-I{csrc}", "-c", str(csrc / "cuda" / "pointwise_cuda.cu"),
           "-o", str(tmp_path / "pointwise.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    spills = [line for line in r.stderr.splitlines() if re.search(r"[1-9]\d* bytes spill", line)]
    assert not spills, spills
