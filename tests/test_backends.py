"""Every backend's recurrence against the textbook reference and torch.nn.

Parametrised over all backend names: a backend that cannot run here skips with its own reason
(e.g. `cuda` without a GPU), so a new kernel is held to the same bar by adding it to the registry.
"""
import os

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn import reference
from fused_rnn.backends import unavailable_reason
from fused_rnn.cell_math import GATES
from fused_rnn.functional import recurrence

from helpers import assert_close, grads_of

# every test runs on the CPU; on a machine with a GPU the CUDA-capable backends run there too
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]

# (T, B, H, proj, lengths, reverse, bias): odd sizes, T=1, B=1, every option on its own and together.
SHAPES = {
    "T1-B1-H3": (1, 1, 3, 0, None, False, True),
    "T7-B3-H5": (7, 3, 5, 0, None, False, True),
    "T6-B4-H5-rev": (6, 4, 5, 0, None, True, True),
    "T6-B4-H5-nobias": (6, 4, 5, 0, None, False, False),
    "T7-B5-H6-len": (7, 5, 6, 0, [7, 3, 1, 7, 5], False, True),
    "T7-B5-H6-len-rev": (7, 5, 6, 0, [2, 7, 7, 1, 4], True, True),
    "T5-B3-H6-proj4": (5, 3, 6, 4, None, False, True),
    "T6-B3-H7-proj3-len-rev": (6, 3, 7, 3, [6, 2, 4], True, True),
}


def make_inputs(cell, T, B, H, proj, lengths, reverse, bias, dtype, requires_grad=True, device="cpu"):
    G, Hout = GATES[cell], proj or H
    scale = Hout ** -0.5
    t = lambda *s, k=1.0: (torch.randn(*s, dtype=torch.float64) * k).to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
    gx, h0 = t(T, B, G * H), t(B, Hout)
    c0 = t(B, H) if cell == "lstm" else None
    w_hh = t(G * H, Hout, k=scale)
    b_hh = t(G * H, k=scale) if bias else None
    w_hr = t(Hout, H, k=H ** -0.5) if proj else None
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device)
    return gx, h0, c0, w_hh, b_hh, w_hr, lens, reverse


def differentiable(args):
    gx, h0, c0, w_hh, b_hh, w_hr, _, _ = args
    return [a for a in (gx, h0, c0, w_hh, b_hh, w_hr) if a is not None]


def skip_unless_usable(backend, dtype, cell, proj, device="cpu"):
    reason = unavailable_reason(backend, device, dtype, cell, bool(proj))
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def cases():
    for cell in CELLS:
        for name, shape in SHAPES.items():
            if shape[3] and cell != "lstm":
                continue
            yield pytest.param(cell, shape, id=f"{cell}-{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,shape", list(cases()))
@pytest.mark.parametrize("backend", fused_rnn.BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_outputs_and_gradients_match_reference(device, backend, cell, shape, dtype):
    skip_unless_usable(backend, dtype, cell, shape[3], device)
    args = make_inputs(cell, *shape, dtype=dtype, device=device)
    ref_args = [a.detach().cpu().double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point()
                else a.cpu() if torch.is_tensor(a) else a for a in args]
    out = recurrence(cell, *args, backend=backend)
    ref = reference.recurrence(cell, *ref_args)
    names = ["y", "h_n", "c_n"]
    for o, r, n in zip(out, ref, names):
        assert (o is None) == (r is None), n
        if r is not None:
            assert o.dtype == dtype, n
            assert_close(o, r, dtype, n)
    got = grads_of(out, differentiable(args))
    want = grads_of(ref, differentiable(ref_args))
    for g, w, n in zip(got, want, ["gx", "h0", "c0", "w_hh", "b_hh", "w_hr"]):
        assert g is not None, f"no gradient for {n}"
        assert_close(g, w, dtype, f"d{n}")


@pytest.mark.parametrize("cell,shape", [pytest.param(c, s, id=i) for c, s, i in [
    ("lstm", SHAPES["T6-B3-H7-proj3-len-rev"], "lstm-proj-len-rev"),
    ("lstm", SHAPES["T7-B5-H6-len"], "lstm-len"),
    ("gru", SHAPES["T7-B5-H6-len-rev"], "gru-len-rev"),
    ("gru", SHAPES["T6-B4-H5-nobias"], "gru-nobias"),
    ("rnn_tanh", SHAPES["T7-B5-H6-len"], "rnn_tanh-len"),
    ("rnn_relu", SHAPES["T6-B4-H5-rev"], "rnn_relu-rev"),
]])
@pytest.mark.parametrize("backend", [b for b in fused_rnn.BACKENDS if b != "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, backend, cell, shape):
    skip_unless_usable(backend, torch.float64, cell, shape[3], device)
    T, B, H, proj, lengths, reverse, bias = shape
    args = make_inputs(cell, min(T, 5), min(B, 3), min(H, 4), min(proj, 3) if proj else 0,
                       None if lengths is None else lengths[:3], reverse, bias, torch.float64, device=device)
    if args[6] is not None:
        args = args[:6] + (args[6].clamp(max=min(T, 5)),) + args[7:]
    inputs = differentiable(args)
    gx, h0, c0, w_hh, b_hh, w_hr, lens, rev = args

    def f(*xs):
        it = iter(xs)
        full = [next(it) if a is not None else None for a in (gx, h0, c0, w_hh, b_hh, w_hr)]
        return tuple(o for o in recurrence(cell, *full, lens, rev, backend=backend) if o is not None)

    # In the Triton interpreter every kernel call is slow; fast mode checks random directional
    # derivatives of all inputs at once instead of every Jacobian column — still a full check.
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, fast_mode=interpreted)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", fused_rnn.BACKENDS)
def test_large_preactivations_stay_finite(backend, cell):
    skip_unless_usable(backend, torch.float32, cell, False)
    gx, h0, c0, w_hh, b_hh, w_hr, lens, rev = make_inputs(cell, 4, 3, 5, 0, None, False, True, torch.float32)
    with torch.no_grad():
        gx.copy_(torch.sign(torch.randn_like(gx)) * 1e4)
    out = recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lens, rev, backend=backend)
    for o in out:
        if o is not None and cell != "rnn_relu":
            assert torch.isfinite(o).all()
    grads = grads_of(out if cell != "rnn_relu" else out[:1], [gx, h0, w_hh])
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", fused_rnn.BACKENDS)
def test_non_contiguous_inputs_and_determinism(backend, cell):
    skip_unless_usable(backend, torch.float32, cell, False)
    args = make_inputs(cell, 5, 3, 4, 0, [5, 2, 4], True, True, torch.float32, requires_grad=False)
    gx, h0, c0, w_hh, b_hh, w_hr, lens, rev = args
    # the same values behind strided views: batch-major gx, transposed weight
    gx_nc = gx.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    w_nc = w_hh.t().contiguous().t().requires_grad_()
    assert not gx_nc.is_contiguous() and not w_nc.is_contiguous()
    runs = []
    for _ in range(2):
        out = recurrence(cell, gx_nc, h0, c0, w_nc, b_hh, w_hr, lens, rev, backend=backend)
        runs.append([o for o in out if o is not None] + list(grads_of(out, [gx_nc, w_nc])))
    ref = reference.recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lens, rev)
    for o, r in zip(runs[0], ref):
        if r is not None:
            assert_close(o, r, torch.float32)
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical runs differ"


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("backend", fused_rnn.BACKENDS)
def test_single_layer_module_matches_torch_nn(backend, mode):
    """Each backend inside the module, against torch.nn itself: bidirectional, unsorted packed batch."""
    cell = mode.lower()
    skip_unless_usable(backend, torch.float64, cell, False)
    kwargs = dict(nonlinearity=mode[4:].lower()) if mode.startswith("RNN") else {}
    cls = {"LSTM": (nn.LSTM, fused_rnn.LSTM), "GRU": (nn.GRU, fused_rnn.GRU)}.get(mode, (nn.RNN, fused_rnn.RNN))
    torch_rnn = cls[0](5, 6, bidirectional=True, **kwargs).double()
    ours = cls[1](5, 6, bidirectional=True, backend=backend, **kwargs).double()
    ours.load_state_dict(torch_rnn.state_dict())
    seqs = [torch.randn(n, 5, dtype=torch.float64, requires_grad=True) for n in (3, 6, 1, 4)]
    packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    (y1, h1), (y2, h2) = torch_rnn(packed), ours(packed)
    assert_close(y2.data, y1.data, torch.float64, "output")
    for a, b in zip(h2 if isinstance(h2, tuple) else (h2,), h1 if isinstance(h1, tuple) else (h1,)):
        assert_close(a, b, torch.float64, "h_n")
    inputs = seqs + list(torch_rnn.parameters())
    g1 = grads_of([y1.data] + list(h1 if isinstance(h1, tuple) else (h1,)), inputs)
    g2 = grads_of([y2.data] + list(h2 if isinstance(h2, tuple) else (h2,)), seqs + list(ours.parameters()))
    for a, b in zip(g2, g1):
        assert_close(a, b, torch.float64, "grad")
