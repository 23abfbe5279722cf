"""fused_rnn::recurrence_forward_projected: the recurrence op with the input projection
gx = x w_ih^T (+ b_ih) inside (CPU), and the cpu backend's plain layers that run on it.

torch.library.opcheck on the op; its outputs and the gradients of x, w_ih, b_ih, h0, c0, w_hh,
b_hh (w_hr) against the reference in float64 (and gradcheck) and float32; that a cpu layer calls
it (and the torch/reference backends and zoneout do not); double backward through such a layer;
and that autograd saves no more for a cpu LSTM layer than with a separate gx.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fused_rnn
from fused_rnn import reference
from fused_rnn.ops.cpp import cell_ops, cpu_backend, ops

from benchmarks.cpu_targets import saved_bytes
from helpers import assert_close, grads_of
from test_cpp_ops import CELLS, CONFIGS, config_id, make_inputs

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))

OP = torch.ops.fused_rnn.recurrence_forward_projected.default if ops.load_error() is None else None


def make_projected_inputs(cell, I=3, b_ih=True, **kw):
    """(x [T,B,I], w_ih [G*H,I], b_ih [G*H] or None) followed by make_inputs' h0, c0, w_hh, b_hh, w_hr, lengths."""
    gx, *rest = make_inputs(cell, **kw)
    T, B, GH = gx.shape
    dtype, requires_grad = gx.dtype, gx.requires_grad

    def r(*shape, s=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * s).to(dtype).requires_grad_(requires_grad)

    return (r(T, B, I), r(GH, I, s=0.5), r(GH) if b_ih else None, *rest)


# (config of test_cpp_ops, with b_ih): b_ih with b_hh as the GRU layer passes them, b_ih alone, and
# neither (the LSTM/RNN layer folds b_ih into b_hh: b_hh alone, which the configs' bias=True runs)
PROJECTED_CONFIGS = [(c, c[4] and c[0] == "gru") for c in CONFIGS] + [
    ((cell, False, True, 0, False), True) for cell in CELLS]


def projected_id(pc):
    config, b_ih = pc
    return config_id(config) + ("-b_ih" if b_ih else "")


# ------------------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("pc", PROJECTED_CONFIGS, ids=projected_id)
def test_opcheck(pc):
    (cell, reverse, lengths, proj, bias), b_ih = pc
    args = make_projected_inputs(cell, proj=proj, bias=bias, lengths=lengths, b_ih=b_ih)
    torch.library.opcheck(OP, (cell, *args, reverse, True))


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_inference(cell):
    args = make_projected_inputs(cell, requires_grad=False)
    torch.library.opcheck(OP, (cell, *args, False, False))


# ------------------------------------------------------------------------- against the reference

def projected_and_reference(cell, args, reverse):
    """(our outputs, the reference's) for the same inputs: the op through cpu_backend, and
    reference.recurrence on F.linear(x, w_ih, b_ih)."""
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lens = args
    ours = cpu_backend.recurrence(cell, None, h0, c0, w_hh, b_hh, w_hr, lens, reverse, projection=(x, w_ih, b_ih))
    up = lambda t: t if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x64, w_ih64, b_ih64, h064, c064, w_hh64, b_hh64, w_hr64 = map(up, args[:8])
    want = reference.recurrence(cell, F.linear(x64, w_ih64, b_ih64), h064, c064, w_hh64, b_hh64, w_hr64, lens,
                                reverse)
    ins = [a for a in args[:8] if a is not None]
    ins64 = [a for a in (x64, w_ih64, b_ih64, h064, c064, w_hh64, b_hh64, w_hr64) if a is not None]
    return ours, want, grads_of(ours, ins), grads_of(want, ins64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("pc", PROJECTED_CONFIGS, ids=projected_id)
def test_matches_reference(pc, dtype):
    """Every output and the gradient of every input, against the float64 reference on the same inputs."""
    (cell, reverse, lengths, proj, bias), b_ih = pc
    args = make_projected_inputs(cell, I=4, T=6, B=4, H=5, proj=proj, bias=bias, lengths=lengths, b_ih=b_ih,
                                 dtype=dtype)
    ours, want, d_ours, d_want = projected_and_reference(cell, args, reverse)
    for i, (a, b) in enumerate(zip(ours, want)):
        if b is not None:
            assert a.dtype == dtype
            assert_close(a, b, dtype, f"output {i}")
    for i, (a, b) in enumerate(zip(d_ours, d_want)):
        assert_close(a, b, dtype, f"grad {i}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(cell, reverse, projection_mode):
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lens = make_projected_inputs(
        cell, T=4, B=3, H=3, proj=2 if cell == "lstm" else 0, lengths=True)

    def fn(*a):
        outs = cpu_backend.recurrence(cell, None, *a[3:], lens, reverse, projection=a[:3])
        return tuple(o for o in outs if o is not None)

    assert torch.autograd.gradcheck(fn, (x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr))


def test_only_the_needed_input_grads():
    """x frozen (an embedding's output with no grad): only w_ih gets a gradient, and b_ih None gets none."""
    x, w_ih, _, h0, c0, w_hh, b_hh, _, _ = make_projected_inputs("lstm", b_ih=False)
    x = x.detach()
    y, h_n, c_n = cpu_backend.recurrence("lstm", None, h0, c0, w_hh, b_hh, None, None, False,
                                         projection=(x, w_ih, None))
    (y.sum() + h_n.sum() + c_n.sum()).backward()
    assert x.grad is None and w_ih.grad is not None and torch.isfinite(w_ih.grad).all()


def test_no_grad_saves_nothing():
    args = make_projected_inputs("lstm", requires_grad=False)
    y, h_n, c_n, gates, cells, proj_in = OP("lstm", *args, False, False)
    assert gates.numel() == cells.numel() == proj_in.numel() == 0
    assert torch.isfinite(y).all()


def test_projection_replaces_gx_only():
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, _, _ = make_projected_inputs("lstm")
    gx = F.linear(x, w_ih, b_ih)
    with pytest.raises(ValueError, match="replaces gx"):
        cpu_backend.recurrence("lstm", gx, h0, c0, w_hh, b_hh, None, None, False, projection=(x, w_ih, b_ih))


def test_autocast_casts_the_projection_like_torch_nn():
    """Under CPU autocast the LSTM runs in bfloat16 (as torch.nn's): x, w_ih, b_ih are cast too,
    and the float32 leaves get float32 gradients."""
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, _, _ = make_projected_inputs("lstm", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h_n, _ = cpu_backend.recurrence("lstm", None, h0, c0, w_hh, b_hh, None, None, False,
                                           projection=(x, w_ih, b_ih))
    assert y.dtype == h_n.dtype == torch.bfloat16
    y.float().sum().backward()
    for t in (x, w_ih, b_ih, w_hh):
        assert t.grad is not None and t.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------ the layer path

class CountOps(TorchDispatchMode):
    """How often each fused_rnn op runs (below autograd, so forward ops only)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("fused_rnn::"):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_fused_ops(module, x):
    with CountOps() as counter:
        module(x)
    return counter.calls


@pytest.mark.parametrize("name, kwargs", [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {}),
                                          ("RNN", {"nonlinearity": "relu", "bias": False})], ids=str)
def test_cpu_layer_runs_the_projected_op(name, kwargs):
    module = getattr(fused_rnn, name)(3, 4, num_layers=2, bidirectional=True, backend="cpu", **kwargs)
    calls = count_fused_ops(module, torch.randn(5, 2, 3))
    assert calls == {"fused_rnn::recurrence_forward_projected": 4}, calls


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_other_backends_get_gx(backend):
    calls = count_fused_ops(fused_rnn.LSTM(3, 4, backend=backend), torch.randn(5, 2, 3))
    assert "fused_rnn::recurrence_forward_projected" not in calls, calls


def test_zoneout_keeps_gx():
    module = fused_rnn.LSTM(3, 4, backend="cpu", zoneout=0.3)
    calls = count_fused_ops(module, torch.randn(5, 2, 3))
    assert calls == {"fused_rnn::recurrence_forward_options": 1}, calls


@pytest.fixture(params=["inside", "outside"])
def projection_mode(request, monkeypatch):
    """Where the op computes gx: inside the fused loop, or one at::linear first (the default at
    these small sizes; csrc/recurrence.cpp project_inside)."""
    monkeypatch.setenv("FUSED_RNN_CPU_PROJECTION", request.param)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_cpu_layer_matches_torch_nn(name, batch_first, projection_mode):
    """A packed, bidirectional 2-layer stack with dropout off, every output and gradient, float64."""
    ours = getattr(fused_rnn, name)(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first,
                                    backend="cpu").double()
    theirs = getattr(torch.nn, name)(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 3, dtype=torch.float64) if batch_first else torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    results = []
    for m in (ours, theirs):
        xr = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xr, lengths, batch_first=batch_first, enforce_sorted=False)
        out, hidden = m(packed)
        outs = [out.data, *(hidden if name == "LSTM" else (hidden,))]
        results.append(outs + list(grads_of(outs, [xr, *m.parameters()])))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float64, f"output/grad {i}")


def test_double_backward_through_a_cpu_layer(projection_mode):
    """A Hessian-vector product through a cpu LSTM (the projected op inside) equals torch.nn's."""
    ours = fused_rnn.LSTM(3, 4, bidirectional=True, backend="cpu").double()
    theirs = torch.nn.LSTM(3, 4, bidirectional=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for m in (ours, theirs):
        xr = x.clone().requires_grad_()
        params = [xr, *m.parameters()]
        g = torch.autograd.grad(m(xr)[0].square().sum(), params, create_graph=True)
        v = [torch.ones_like(t) for t in g]
        hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)
        results.append(list(g) + list(hv))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float64, f"grad/hvp {i}")


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_saved_memory_no_larger_than_with_gx(name, monkeypatch):
    """Autograd keeps x and w_ih (alive anyway) for the projection, never gx: a training forward of a
    cpu layer saves no more than the same layer with gx computed outside the op."""
    module = getattr(fused_rnn, name)(32, 32, backend="cpu")
    x = torch.randn(20, 8, 32, requires_grad=True)
    projected = saved_bytes(lambda: module(x))
    monkeypatch.setattr(cpu_backend, "TAKES_PROJECTION", False)
    monkeypatch.setattr(cell_ops, "LAYER_FORWARD", lambda *args: None)  # the layers' C++ entry projects inside too
    assert count_fused_ops(module, x) == {"fused_rnn::recurrence_forward": 1}
    with_gx = saved_bytes(lambda: module(x))
    assert projected <= with_gx, (projected, with_gx)


def test_compile_fullgraph_runs_the_projected_op():
    """No graph break, dynamic shapes, the same outputs and gradients as eager."""
    torch._dynamo.reset()
    model = fused_rnn.GRU(3, 4, num_layers=2, backend="cpu").double()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (5, 7):
        x = torch.randn(T, 2, 3, dtype=torch.float64)
        eager, got = model(x)[0], compiled(x)[0]
        assert_close(got, eager, torch.float64, "output")
        for a, b in zip(torch.autograd.grad(got.sum(), list(model.parameters())),
                        torch.autograd.grad(eager.sum(), list(model.parameters()))):
            assert_close(a, b, torch.float64, "grad")
