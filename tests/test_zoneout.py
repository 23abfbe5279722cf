"""Zoneout (Krueger et al. 2016) on LSTM and GRU: the torch, cpu and triton backends' analytic backwards
against the textbook reference, float64 gradcheck, masks that a seed reproduces, the eval-mode
expectation, frozen states past each sequence's length, the drop-in options, and backends that
refuse it. The triton backend runs in the Triton interpreter without a GPU (conftest)."""
import os
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import functional, reference
from fused_rnn.backends import get, resolve, unavailable_reason
from fused_rnn.cell_math import GATES

import drop_in
from helpers import assert_close, grads_of

F64 = torch.float64
# (T, B, H, proj, lengths, reverse)
SHAPES = {
    "T6-B3-H5": (6, 3, 5, 0, None, False),
    "T6-B4-H5-rev": (6, 4, 5, 0, None, True),
    "T7-B5-H6-len": (7, 5, 6, 0, [7, 3, 1, 7, 5], False),
    "T7-B5-H6-len-rev": (7, 5, 6, 0, [2, 7, 7, 1, 4], True),
    "T6-B3-H7-proj3-len-rev": (6, 3, 7, 3, [6, 2, 4], True),
    "T3-B2-H3-len-rev": (3, 2, 3, 0, [1, 3], True),  # small: gradcheck in the Triton interpreter
}


TRITON_REASON = unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu", F64)
CPU_REASON = unavailable_reason("cpu", "cpu", F64)
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")
CUDA_REASON = unavailable_reason("cuda", "cuda", F64)
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend unavailable: {CUDA_REASON}")
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"  # as test_triton.py
# (backend, device): the triton backend on the GPU, or on CPU tensors in the interpreter
BACKENDS = [pytest.param("torch", "cpu", id="torch"),
            pytest.param("cpu", "cpu", id="cpu", marks=needs_cpu),
            pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda),
            pytest.param("triton", "cuda" if ON_GPU else "cpu", id="triton", marks=pytest.mark.skipif(
                TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}"))]


def cases():
    for cell in ("lstm", "gru"):
        for name, shape in SHAPES.items():
            if not (shape[3] and cell != "lstm"):
                for mode in ("train", "eval"):
                    yield pytest.param(cell, shape, mode, id=f"{cell}-{name}-{mode}")


def backend_cases(select=lambda backend, case: True):
    """cases() on each backend; only the torch backend has zoneout with a projection (the others refuse, below)."""
    for backend in BACKENDS:
        for case in cases():
            if select(backend.id, case.id) and not (backend.id != "torch" and "proj" in case.id):
                yield pytest.param(*backend.values, *case.values, id=f"{backend.id}-{case.id}", marks=backend.marks)


def make(cell, T, B, H, proj, lengths, reverse, mode, p=0.35, device="cpu"):
    G, Hout = GATES[cell], proj or H
    new = lambda *s, k=1.0: (torch.randn(*s, dtype=F64) * k).to(device).requires_grad_()  # noqa: E731
    args = [new(T, B, G * H), new(B, Hout), new(B, H) if cell == "lstm" else None,
            new(G * H, Hout, k=Hout ** -0.5), new(G * H), new(Hout, H, k=H ** -0.5) if proj else None,
            None if lengths is None else torch.tensor(lengths, device=device), reverse]
    keep = functional.zoneout_keep(p, mode == "train", cell, T, B, Hout, H, device)
    return args, keep


@pytest.mark.parametrize("backend,device,cell,shape,mode", list(backend_cases()))
def test_backend_matches_reference(backend, device, cell, shape, mode):
    args, keep = make(cell, *shape, mode, device=device)
    out = get(backend).recurrence(cell, *args, zoneout=keep)
    ref = reference.recurrence(cell, *args, zoneout=keep)
    inputs = [a for a in args[:6] if a is not None]
    for name, a, b in zip(("y", "h_n", "c_n"), out, ref):
        if b is not None:
            assert_close(a, b, F64, name)
    for k, (a, b) in enumerate(zip(grads_of(out, inputs), grads_of(ref, inputs))):
        assert_close(a, b, F64, f"grad {k}")


@pytest.mark.parametrize("backend,device,cell,shape,mode",
                         list(backend_cases(lambda backend, case: "T3-B2-H3" in case or (
                             backend in ("torch", "cpu", "cuda") and ("len-rev" in case or "T6-B3-H5" in case)))))
def test_gradcheck_float64(backend, device, cell, shape, mode):
    args, keep = make(cell, *shape, mode, device=device)
    inputs = [a for a in args[:6] if a is not None]
    slots = [i for i, a in enumerate(args[:6]) if a is not None]

    def f(*xs):
        full = list(args)
        for i, x in zip(slots, xs):
            full[i] = x
        return tuple(o for o in get(backend).recurrence(cell, *full, zoneout=keep) if o is not None)
    # the interpreter takes seconds per evaluation: the triton backend checks a random projection of
    # the Jacobian (fast_mode), the torch backend every element
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")


def test_training_masks_keep_a_fraction_p_of_units():
    """At the first step every unit of h and c is either its previous value or the new one, and
    the share kept is p (a binomial count over 64*64 units, within 5 standard deviations)."""
    p, B, H = 0.3, 64, 64
    m = fused_rnn.LSTM(8, H, zoneout=p, backend="torch").double()
    x, h0, c0 = torch.randn(1, B, 8, dtype=F64), torch.randn(1, B, H, dtype=F64), torch.randn(1, B, H, dtype=F64)
    _, (h, c) = m(x, (h0, c0))
    plain = fused_rnn.LSTM(8, H, backend="torch").double()
    plain.load_state_dict(m.state_dict())
    _, (h_new, c_new) = plain(x, (h0, c0))
    sd = (B * H * p * (1 - p)) ** 0.5
    for state, prev, new in ((h, h0, h_new), (c, c0, c_new)):
        kept, changed = state == prev, state == new
        assert (kept | changed).all()
        assert abs(kept.sum().item() - p * B * H) < 5 * sd


@pytest.mark.parametrize("backend", ["auto", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_a_seed_reproduces_a_run_and_masks_change_between_calls(cls, backend):
    m = getattr(fused_rnn, cls)(3, 5, num_layers=2, bidirectional=True, zoneout=0.2, backend=backend)
    x = torch.randn(6, 4, 3)
    torch.manual_seed(7)
    a, ga = m(x)[0], None
    ga = torch.autograd.grad(a.sum(), m.weight_hh_l0)[0]
    torch.manual_seed(7)
    b = m(x)[0]
    gb = torch.autograd.grad(b.sum(), m.weight_hh_l0)[0]
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(m(x)[0], m(x)[0])


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_eval_uses_the_expectation(cls):
    """In eval h_t = p h_{t-1} + (1-p) h~_t (and c): one step against the plain layer's step."""
    p = 0.4
    m = getattr(fused_rnn, cls)(3, 5, zoneout=p).double().eval()
    plain = getattr(fused_rnn, cls)(3, 5).double()
    plain.load_state_dict(m.state_dict())
    x, h0, c0 = torch.randn(1, 2, 3, dtype=F64), torch.randn(1, 2, 5, dtype=F64), torch.randn(1, 2, 5, dtype=F64)
    state = (h0, c0) if cls == "LSTM" else h0
    y, got = m(x, state)
    _, new = plain(x, state)
    for g, prev, n in zip(*(s if cls == "LSTM" else (s,) for s in (got, state, new))):
        assert_close(g, p * prev + (1 - p) * n, F64)
    assert torch.equal(m(x, state)[0], y)  # deterministic


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_packed_sequences_freeze_past_their_end(cls):
    """Eval (deterministic): each sequence of a packed batch gives what it gives alone."""
    m = getattr(fused_rnn, cls)(3, 5, bidirectional=True, zoneout=0.3).double().eval()
    lengths = [5, 2, 4]
    x = torch.randn(5, 3, 3, dtype=F64)
    out, hidden = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out, _ = pad_packed_sequence(out)
    h_n = hidden[0] if cls == "LSTM" else hidden
    for b, n in enumerate(lengths):
        y_b, hid_b = m(x[:n, b:b + 1])
        assert_close(out[:n, b:b + 1], y_b, F64)
        assert (out[n:, b] == 0).all()
        assert_close(h_n[:, b:b + 1], hid_b[0] if cls == "LSTM" else hid_b, F64)


OPTIONS = dict(drop_in.OPTIONS, **{"proj-bidirectional": dict(bidirectional=True, proj_size=2)})


@pytest.mark.parametrize("cls,option", [(c, o) for c in ("LSTM", "GRU") for o in OPTIONS
                                        if c == "LSTM" or "proj_size" not in OPTIONS[o]])
def test_drop_in_options_match_the_reference_backend(cls, option):
    make = lambda backend, **kw: getattr(fused_rnn, cls)(3, 4, zoneout=0.25, backend=backend, **kw).double()  # noqa: E731
    drop_in.assert_torch_backend_matches_reference(make, OPTIONS[option])


@needs_cpu
@pytest.mark.parametrize("cls,option", [(c, o) for c in ("LSTM", "GRU") for o in drop_in.OPTIONS])
def test_cpu_backend_modules_match_the_reference_backend(cls, option):
    """drop_in's check with the cpu backend standing in for the torch one (no projection)."""
    def make(backend, **kw):
        return getattr(fused_rnn, cls)(3, 4, zoneout=0.25, backend="cpu" if backend == "torch" else backend,
                                       **kw).double()
    drop_in.assert_torch_backend_matches_reference(make, drop_in.OPTIONS[option])


@pytest.mark.skipif(TRITON_REASON is not None or ON_GPU, reason="the interpreter run (CPU tensors) of the triton backend")
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_triton_backend_modules_match_the_reference_backend(cls):
    """A packed bidirectional layer in training on the triton backend (drop_in's check, with the
    triton backend standing in for the torch one)."""
    def make(backend, **kw):
        return getattr(fused_rnn, cls)(3, 4, zoneout=0.25, backend="triton" if backend == "torch" else backend,
                                       **kw).double()
    drop_in.assert_torch_backend_matches_reference(make, drop_in.OPTIONS["bidirectional-packed"])


def test_double_backward_with_zoneout():
    m = fused_rnn.LSTM(2, 3, zoneout=0.3, bidirectional=True, backend="torch").double()
    x = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        torch.manual_seed(11)  # the same masks at every evaluation
        return torch.func.functional_call(m, dict(zip(names, params)), (x,))[0]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradgradcheck(f, [x] + params, fast_mode=True)


@needs_cpu
def test_cpp_backends_refuse_zoneout_with_a_projection_and_auto_passes_over_it(monkeypatch):
    monkeypatch.delenv("FUSED_RNN_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="not implemented for a projected LSTM"):
        fused_rnn.LSTM(3, 4, proj_size=2, zoneout=0.1, backend="cpu")(torch.randn(2, 1, 3))
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda")):
        assert "projected LSTM" in unavailable_reason(backend, device, F64, "lstm", True, ("zoneout",))
    assert unavailable_reason("cpu", "cpu", F64, "lstm", False, ("zoneout",)) is None
    with warnings.catch_warnings():  # auto says once which backend it took
        warnings.simplefilter("ignore")
        assert resolve("auto", torch.device("cpu"), F64, "lstm", True, ("zoneout",)) == "torch"
        assert resolve("auto", torch.device("cpu"), F64, "lstm", False, ("zoneout",)) == "cpu"


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")
def test_triton_refuses_zoneout_with_a_projection_and_auto_passes_over_it(monkeypatch):
    device = "cuda" if ON_GPU else "cpu"
    with pytest.raises(RuntimeError, match="not implemented for a projected LSTM"):
        fused_rnn.LSTM(3, 4, proj_size=2, zoneout=0.1, backend="triton", device=device)(torch.randn(2, 1, 3, device=device))
    assert unavailable_reason("triton", device, F64, "lstm", True, ("zoneout",)) is not None
    assert unavailable_reason("triton", device, F64, "lstm", False, ("zoneout",)) is None


def test_auto_takes_a_zoneout_backend_and_zero_is_the_plain_layer(monkeypatch):
    monkeypatch.delenv("FUSED_RNN_BACKEND", raising=False)
    m = fused_rnn.GRU(3, 4, zoneout=0.2)
    torch.manual_seed(0)
    a = m(torch.randn(2, 1, 3))[0]
    assert a.grad_fn is not None
    assert functional.zoneout_keep(0.0, True, "lstm", 2, 1, 4, 4, "cpu") is None
    plain, zero = fused_rnn.LSTM(3, 4), fused_rnn.LSTM(3, 4, zoneout=0.0)
    zero.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 3)
    assert torch.equal(plain(x)[0], zero(x)[0])


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "0.1", True])
def test_bad_probability_is_refused(p):
    with pytest.raises(ValueError, match="zoneout should be a number in range"):
        fused_rnn.LSTM(3, 4, zoneout=p)
    with pytest.raises(ValueError, match="zoneout should be a number in range"):
        functional.gru(torch.randn(2, 1, 3), torch.zeros(1, 1, 4), list(fused_rnn.GRU(3, 4)._flat_weights),
                       zoneout=p)
