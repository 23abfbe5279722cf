"""bf16/fp16 GEMMs on the CPU outside the fused loop (the input projection, the weight and input
gradients, the cells, proj_size's h_r): through torch's 16-bit GEMM, or through fp32 copies rounded
once where torch's runs a scalar loop (csrc/cpu/half_gemm.h; FUSED_RNN_CPU_GEMM16=fp32|torch forces
one way). Both ways, every output and gradient of the drop-in modules against the same module in
float64 on the same rounded inputs and weights, within the dtype's tolerance.
"""
import copy
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn.ops.cpp import ops

from helpers import assert_close, grads_of

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))


def cpu_flags():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo to know the CPU's flags")
def test_route_follows_the_cpu_and_the_setting(monkeypatch):
    """Through fp32 exactly where torch's 16-bit GEMM has no oneDNN kernel: bf16 without AVX-512
    BW/VL/DQ, fp16 without AVX512_FP16; the setting overrides it; fp32 never converts."""
    from fused_rnn import _C
    flags = cpu_flags()
    monkeypatch.delenv("FUSED_RNN_CPU_GEMM16", raising=False)
    assert _C.cpu_gemm_via_fp32("bfloat16") == (not {"avx512bw", "avx512vl", "avx512dq"} <= flags)
    assert _C.cpu_gemm_via_fp32("float16") == ("avx512_fp16" not in flags)
    assert _C.cpu_gemm_via_fp32("float32") is False
    for mode, want in (("fp32", True), ("torch", False)):
        monkeypatch.setenv("FUSED_RNN_CPU_GEMM16", mode)
        assert _C.cpu_gemm_via_fp32("bfloat16") is want
        assert _C.cpu_gemm_via_fp32("float16") is want
        assert _C.cpu_gemm_via_fp32("float32") is False


def rounded_pair(module, dtype):
    """(module in dtype, a float64 copy of the rounded module)."""
    low = module.to(dtype)
    return low, copy.deepcopy(low).double()


def check_layer(make, dtype, T, packed=False, B=3):
    torch.manual_seed(3)
    low, ref = rounded_pair(make(), dtype)
    I = low.input_size
    x = torch.randn(T, B, I).to(dtype)
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    outs = []
    for m, xi in zip((low, ref), xs):
        if packed:
            lengths = torch.tensor([T] + [T - 1] * (B - 2) + [1])
            y, h = m(pack_padded_sequence(xi, lengths))
            y = pad_packed_sequence(y)[0]
        else:
            y, h = m(xi)
        outs.append([y, *(h if isinstance(h, tuple) else (h,))])
    for i, (o, w) in enumerate(zip(*outs)):
        assert o.dtype == dtype
        assert_close(o, w, dtype, f"output {i}")
    params = [list(low.parameters()), list(ref.parameters())]
    got = grads_of(outs[0], [xs[0], *params[0]])
    want = grads_of(outs[1], [xs[1], *params[1]])
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype, f"grad {i}")


# (module, T, packed, B). "sliced": 40000 rows of d gx (LSTM [T*B, 4H=32], through C++) or 49553
# valid ones (the packed GRU's compact [N, 3H=24], through ops.py), more than one fp32 slice (2^18
# elements) in d x and in the weight gradients' contraction (half_gemm.h gemm_fp32_slices, ops._mm).
LAYERS = {
    "lstm_fused": (lambda: fused_rnn.LSTM(7, 11), 20, False, 3),
    "lstm_per_step": (lambda: fused_rnn.LSTM(7, 11), 3, False, 3),
    "lstm_proj": (lambda: fused_rnn.LSTM(7, 11, proj_size=5), 6, False, 3),
    "gru_packed": (lambda: fused_rnn.GRU(7, 11), 20, True, 3),
    "lstm_bidir_2layer": (lambda: fused_rnn.LSTM(7, 11, num_layers=2, bidirectional=True), 17, False, 3),
    "lstm_sliced": (lambda: fused_rnn.LSTM(5, 8), 200, False, 200),
    "gru_packed_sliced": (lambda: fused_rnn.GRU(5, 8), 200, True, 250),
}


@pytest.mark.parametrize("case", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["fp32", "torch"])
def test_layers_both_ways(mode, dtype, case, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CPU_GEMM16", mode)
    make, T, packed, B = LAYERS[case]
    check_layer(make, dtype, T, packed, B)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["fp32", "torch"])
def test_cells_both_ways(mode, dtype, cell, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CPU_GEMM16", mode)
    torch.manual_seed(5)
    low, ref = rounded_pair(getattr(fused_rnn, cell)(7, 13), dtype)
    x = torch.randn(3, 7).to(dtype)
    h = torch.randn(3, 13).to(dtype)
    state = (h, torch.randn(3, 13).to(dtype)) if cell == "LSTMCell" else h
    ins = [[t.clone().requires_grad_() for t in (x, *(state if isinstance(state, tuple) else (state,)))],
           [t.double().requires_grad_() for t in (x, *(state if isinstance(state, tuple) else (state,)))]]
    outs = []
    for m, (xi, *si) in zip((low, ref), ins):
        o = m(xi, tuple(si) if cell == "LSTMCell" else si[0])
        outs.append(list(o) if isinstance(o, tuple) else [o])
    for i, (o, w) in enumerate(zip(*outs)):
        assert o.dtype == dtype
        assert_close(o, w, dtype, f"output {i}")
    got = grads_of(outs[0], [*ins[0], *low.parameters()])
    want = grads_of(outs[1], [*ins[1], *ref.parameters()])
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype, f"grad {i}")
