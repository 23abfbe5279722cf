"""Double backward (create_graph=True) on every backend: float64 gradgradcheck of every module and
cell, with lengths (packed input), reverse (bidirectional) and proj_size; Hessian-vector products
equal to torch.nn's on the CPU; the first-order path still runs each backend's analytic backward;
a backend's op called directly refuses create_graph=True instead of returning wrong gradients."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import double_backward, functional, reference
from fused_rnn.backends import get, unavailable_reason

from helpers import assert_close

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64

# (module class name, constructor kwargs, packed lengths or None)
MODULES = {
    "LSTM": ("LSTM", {}, None),
    "LSTM-bi-packed": ("LSTM", {"bidirectional": True}, [4, 2, 3]),
    "LSTM-proj2-bi-packed": ("LSTM", {"proj_size": 2, "bidirectional": True}, [3, 4, 1]),
    "LSTM-2layers": ("LSTM", {"num_layers": 2}, None),
    "GRU": ("GRU", {}, None),
    "GRU-bi-packed": ("GRU", {"bidirectional": True}, [4, 2, 3]),
    "RNN-tanh-bi-packed": ("RNN", {"bidirectional": True}, [2, 4, 3]),
    "RNN-relu": ("RNN", {"nonlinearity": "relu"}, None),
    "RNN-relu-bi-packed": ("RNN", {"nonlinearity": "relu", "bidirectional": True}, [4, 1, 3]),
}
T, B, I, H = 4, 3, 2, 3


def skip_unless_usable(backend, device, cell="lstm", has_proj=False):
    reason = unavailable_reason(backend, device, F64, cell, has_proj)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def cell_of(name, kwargs):
    return {"LSTM": "lstm", "GRU": "gru"}.get(name, "rnn_" + kwargs.get("nonlinearity", "tanh"))


def module_function(module, lengths):
    """f(x, h0, [c0], *parameters) -> every output of the module, for gradgradcheck."""
    names = [n for n, _ in module.named_parameters()]
    is_lstm = isinstance(module, fused_rnn.LSTM)

    def f(x, h0, *rest):
        state = (h0, rest[0]) if is_lstm else h0
        params = dict(zip(names, rest[1:] if is_lstm else rest))
        inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, hidden = torch.func.functional_call(module, params, (inp, state))
        out = out if lengths is None else out.data
        return (out,) + (tuple(hidden) if is_lstm else (hidden,))
    return f


def module_inputs(module, device):
    D = 2 if module.bidirectional else 1
    Hout = module.proj_size or module.hidden_size
    x = torch.randn(T, B, I, dtype=F64, device=device, requires_grad=True)
    h0 = torch.randn(module.num_layers * D, B, Hout, dtype=F64, device=device, requires_grad=True)
    states = [h0]
    if module.mode == "LSTM":
        states.append(torch.randn(module.num_layers * D, B, H, dtype=F64, device=device, requires_grad=True))
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return [x] + states + params


# Triton's interpreter (the triton backend without a GPU) takes seconds a layer forward, and a gradgradcheck
# runs dozens. The second-order gradients are the reference recompute every backend shares (the module
# docstring), checked on every configuration through the torch and cpu backends; what is the triton
# backend's own, its forward values, is checked there on one configuration per cell, the LSTM's richest.
INTERPRETED_TRITON_MODULES = ["LSTM-proj2-bi-packed", "GRU", "RNN-relu"]


def module_cases():
    for device in DEVICES:
        for backend in fused_rnn.BACKENDS:
            interpreted = backend == "triton" and device == "cpu"
            for config in INTERPRETED_TRITON_MODULES if interpreted else MODULES:
                yield pytest.param(device, backend, config, id=f"{device}-{backend}-{config}")


@pytest.mark.parametrize("device,backend,config", list(module_cases()))
def test_module_gradgradcheck(device, backend, config):
    name, kwargs, lengths = MODULES[config]
    skip_unless_usable(backend, device, cell_of(name, kwargs), bool(kwargs.get("proj_size")))
    module = getattr(fused_rnn, name)(I, H, backend=backend, **kwargs).to(device, F64)
    f = module_function(module, lengths)
    assert torch.autograd.gradgradcheck(f, module_inputs(module, device), fast_mode=True)


CELLS = {"LSTMCell": {}, "GRUCell": {}, "RNNCell-tanh": {}, "RNNCell-relu": {"nonlinearity": "relu"}}


@pytest.mark.parametrize("config", list(CELLS))
@pytest.mark.parametrize("backend", fused_rnn.BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_cell_gradgradcheck(device, backend, config):
    name = config.split("-")[0]
    cell = {"LSTMCell": "lstm", "GRUCell": "gru"}.get(name, "rnn_" + CELLS[config].get("nonlinearity", "tanh"))
    skip_unless_usable(backend, device, cell)
    module = getattr(fused_rnn, name)(I, H, backend=backend, **CELLS[config]).to(device, F64)
    names = [n for n, _ in module.named_parameters()]
    is_lstm = name == "LSTMCell"

    def f(x, h, *rest):
        state = (h, rest[0]) if is_lstm else h
        out = torch.func.functional_call(module, dict(zip(names, rest[1:] if is_lstm else rest)), (x, state))
        return tuple(out) if is_lstm else out

    new = lambda *s: torch.randn(*s, dtype=F64, device=device, requires_grad=True)  # noqa: E731
    inputs = [new(B, I), new(B, H)] + ([new(B, H)] if is_lstm else [])
    inputs += [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def test_full_gradgradcheck_packed_bidirectional_projected_lstm():
    """The exhaustive (not fast_mode) check once, on the richest configuration, on the cpu backend
    (or torch where the extension is not built)."""
    backend = "cpu" if unavailable_reason("cpu", "cpu", F64, "lstm", True) is None else "torch"
    module = fused_rnn.LSTM(I, H, proj_size=2, bidirectional=True, backend=backend).double()
    f = module_function(module, [3, 4, 1])
    assert torch.autograd.gradgradcheck(f, module_inputs(module, "cpu"))


HVP_MODULES = {
    "LSTM-2layers-bi-proj-packed": ("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 2}, [4, 2, 3]),
    "GRU-2layers-bi-packed": ("GRU", {"num_layers": 2, "bidirectional": True}, [4, 2, 3]),
    "RNN-tanh-bi": ("RNN", {"bidirectional": True}, None),
    "RNN-relu-packed": ("RNN", {"nonlinearity": "relu"}, [1, 4, 3]),
}


def hessian_vector_product(module, x, lengths, v_seed=7):
    """(g, H v) with g the gradient of a nonlinear loss w.r.t. (x, parameters) and v random."""
    params = [x] + list(module.parameters())
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, hidden = module(inp)
    out = out if lengths is None else out.data
    h_n = hidden[0] if isinstance(hidden, tuple) else hidden
    loss = out.sin().sum() + h_n.square().sum()
    g = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(v_seed)
    v = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
    hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)
    return g, hv


@pytest.mark.parametrize("config", list(HVP_MODULES))
@pytest.mark.parametrize("backend", fused_rnn.BACKENDS)
def test_hessian_vector_product_equals_torch_nn(backend, config):
    name, kwargs, lengths = HVP_MODULES[config]
    skip_unless_usable(backend, "cpu", cell_of(name, kwargs), bool(kwargs.get("proj_size")))
    ours = getattr(fused_rnn, name)(I, H, backend=backend, **kwargs).double()
    theirs = getattr(nn, name)(I, H, **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=F64)
    got = hessian_vector_product(ours, x.clone().requires_grad_(), lengths)
    want = hessian_vector_product(theirs, x.clone().requires_grad_(), lengths)
    for kind, a_all, b_all in (("grad", got[0], want[0]), ("hvp", got[1], want[1])):
        for k, (a, b) in enumerate(zip(a_all, b_all)):
            assert_close(a, b, F64, f"{kind}[{k}]")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_first_order_backward_never_touches_the_reference(backend, monkeypatch):
    """Without create_graph the backend's own analytic backward runs, as before."""
    device = "cuda" if backend == "cuda" else "cpu"
    skip_unless_usable(backend, device)
    module = fused_rnn.LSTM(I, H, bidirectional=True, backend=backend).to(device, F64)
    x = torch.randn(T, B, I, dtype=F64, device=device, requires_grad=True)
    out = module(x)[0]
    monkeypatch.setattr(reference, "recurrence", lambda *a, **k: pytest.fail("reference ran"))
    monkeypatch.setattr(double_backward, "_differentiable_recurrence", lambda *a, **k: pytest.fail("recomputed"))
    out.square().sum().backward()
    assert x.grad is not None and module.weight_hh_l0.grad is not None


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_backend_op_called_directly_refuses_create_graph(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    skip_unless_usable(backend, device)
    new = lambda *s: torch.randn(*s, dtype=F64, device=device, requires_grad=True)  # noqa: E731
    gx, h0, c0, w_hh = new(T, B, 4 * H), new(B, H), new(B, H), new(4 * H, H)
    y, _, _ = get(backend).recurrence("lstm", gx, h0, c0, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(y.square().sum(), gx, create_graph=True)
    # through the functional layer it works, and agrees with the reference
    y = functional.recurrence("lstm", gx, h0, c0, w_hh, backend=backend)[0]
    (g,) = torch.autograd.grad(y.square().sum(), w_hh, create_graph=True)
    y_ref = reference.recurrence("lstm", gx, h0, c0, w_hh, None, None, None, False)[0]
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), w_hh, create_graph=True)
    assert_close(torch.autograd.grad(g.sin().sum(), gx)[0], torch.autograd.grad(g_ref.sin().sum(), gx)[0], F64)
