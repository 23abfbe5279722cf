"""Long sequences in 16-bit: what is carried from step to step in a sum (the per-step GEMM result gh
and the gradient dh) stays in fp32, so bf16/fp16 rounding does not compound over T.

T=1024 against the float64 reference run on the same (rounded) inputs, tolerances from the dtype
(tests/helpers.py TOL), every output and gradient; the per-step kernels of the `cpu` backend, and
of the `cuda` backend where a GPU is.
"""
import pytest
import torch

from fused_rnn import reference
from fused_rnn.ops.cpp import cpu_backend, cuda_backend, ops

from helpers import assert_close, grads_of

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
HAS_CUDA = torch.cuda.is_available() and ops.load_error() is None and ops.built_with_cuda()


def long_inputs(cell, dtype, device, T=1024, B=3, H=48):
    """Weights scaled so the recurrence neither explodes nor forgets within a few steps, and a
    gradient at every step (dy) so that dh sums T contributions."""
    g = torch.Generator().manual_seed(7)
    G = GATES[cell]

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device, dtype)

    gx = r(T, B, G * H, s=0.5)
    h0, c0 = r(B, H), (r(B, H) if cell == "lstm" else None)
    w_hh = r(G * H, H, s=1.0 / H ** 0.5)
    b_hh = r(G * H, s=0.1)
    lens = torch.tensor([T] + [T - 1 - 37 * i for i in range(1, B)], device=device)
    return [gx, h0, c0, w_hh, b_hh, None, lens]


def check_long_sequence(backend, cell, dtype, device, reverse):
    args = long_inputs(cell, dtype, device)
    ours = [a.clone().requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
    ref = [a.double().requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
    outs = backend.recurrence(cell, *ours, reverse)
    want = reference.recurrence(cell, *ref, reverse)
    for i, (o, w) in enumerate(zip(outs, want)):
        if w is not None:
            assert o.dtype == dtype
            assert_close(o, w, dtype, f"output {i}")
    got_g = grads_of(outs, [a for a in ours[:-1] if a is not None])
    want_g = grads_of(want, [a for a in ref[:-1] if a is not None])
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert_close(g, w, dtype, f"grad {i}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_per_step_long_sequence(dtype, cell, reverse, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "per-step")
    check_long_sequence(cpu_backend, cell, dtype, "cpu", reverse)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and fused_rnn._C built with CUDA")
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_per_step_long_sequence(dtype, cell, reverse, monkeypatch):
    monkeypatch.delenv("FUSED_RNN_CUDA_PERSISTENT", raising=False)
    check_long_sequence(cuda_backend, cell, dtype, "cuda", reverse)


def check_gh_beyond_fp16_range(backend, device):
    """h @ w_hh.T = 70000 is past fp16's largest value (65504) but gx brings the pre-activation
    back to 5000: the sum must be formed before any rounding to fp16 (else inf)."""
    H = 4
    h0 = torch.full((1, H), 1.0, dtype=torch.float16, device=device)
    w_hh = torch.full((H, H), 17500.0, dtype=torch.float16, device=device)  # each row: 4 * 17500 = 70000
    gx = torch.full((1, 1, H), -65000.0, dtype=torch.float16, device=device)
    y, h_n, _ = backend.recurrence("rnn_relu", gx, h0, None, w_hh, None, None, None, False)
    want = reference.recurrence("rnn_relu", gx.double(), h0.double(), None, w_hh.double(), None, None, None,
                                False)[0]
    assert_close(y, want, torch.float16, "y")


def test_cpu_per_step_gh_beyond_fp16_range(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "per-step")
    check_gh_beyond_fp16_range(cpu_backend, "cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and fused_rnn._C built with CUDA")
def test_cuda_per_step_gh_beyond_fp16_range(monkeypatch):
    monkeypatch.delenv("FUSED_RNN_CUDA_PERSISTENT", raising=False)
    check_gh_beyond_fp16_range(cuda_backend, "cuda")
