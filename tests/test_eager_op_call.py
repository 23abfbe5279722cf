"""The cpu backend's eager op call (fused_rnn/ops/cpp/ops.py _call_op): plain tensors outside any
trace run the op below autograd through _EagerAutograd, everything else through the op's
registered autograd (torch.library). Both must give the same outputs and gradients bitwise, with
the same saved tensors, for every op the backend calls (plain, projected, options), and the same
second-order gradients (the eager projected op differentiates itself under create_graph=True).
The layers' C++ entry (cell_ops.LAYER_FORWARD, tests/test_layer_train_call.py) is turned off here,
so that the modules' calls reach _call_op."""
import pytest
import torch

import fused_rnn
from fused_rnn.ops.cpp import cell_ops, ops

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))


@pytest.fixture(autouse=True)
def no_layer_entry(monkeypatch):
    """The modules' calls through functional.rnn and the backend's _call_op."""
    cell_ops.available()  # registered first (it sets LAYER_FORWARD), so that undo restores it
    monkeypatch.setattr(cell_ops, "LAYER_FORWARD", lambda *args: None)


def graph_names(t):
    """The names of every node in t's autograd graph."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def run(layer, x, state, lengths):
    inp = x if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, hidden = layer(inp, state)
    y = out if lengths is None else torch.nn.utils.rnn.pad_packed_sequence(out)[0]
    hs = hidden if isinstance(hidden, tuple) else (hidden,)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum((h * h).sum() for h in hs)
    params = [p for p in layer.parameters()]
    leaves = [x, *(s for s in (state if isinstance(state, tuple) else (state,)))] + params
    return [y, *hs], list(torch.autograd.grad(loss, leaves)), graph_names(y)


CASES = {
    "lstm": dict(cls=fused_rnn.LSTM, kw={}),
    "gru-bidir-2L": dict(cls=fused_rnn.GRU, kw=dict(num_layers=2, bidirectional=True)),
    "rnn-relu": dict(cls=fused_rnn.RNN, kw=dict(nonlinearity="relu")),
    "lstm-proj": dict(cls=fused_rnn.LSTM, kw=dict(proj_size=3)),
    "lstm-zoneout": dict(cls=fused_rnn.LSTM, kw=dict(zoneout=0.3)),
}


@pytest.mark.parametrize("T", [1, 7, 20])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_eager_call_equals_registered_op(case, packed, T, monkeypatch):
    torch.manual_seed(0)
    spec = CASES[case]
    layer = spec["cls"](5, 6, backend="cpu", dtype=torch.float64, **spec["kw"])
    D = 2 if layer.bidirectional else 1
    B, Hout = 3, layer.proj_size or layer.hidden_size
    x = torch.randn(T, B, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layer.num_layers * D, B, Hout, dtype=torch.float64, requires_grad=True)
    state = (h0, torch.randn(layer.num_layers * D, B, 6, dtype=torch.float64, requires_grad=True)) \
        if isinstance(layer, fused_rnn.LSTM) else h0
    lengths = torch.tensor([T, max(1, T // 2), max(1, T - 1)]) if packed else None
    torch.manual_seed(1)  # the zoneout masks
    eager = run(layer, x, state, lengths)
    monkeypatch.setattr(ops, "_PLAIN_ARG_TYPES", frozenset())  # every call through torch.library
    torch.manual_seed(1)
    registered = run(layer, x, state, lengths)
    assert "_EagerAutogradBackward" in eager[2] and "_EagerAutogradBackward" not in registered[2]
    for a, b in zip(eager[0] + eager[1], registered[0] + registered[1]):
        assert torch.equal(a, b)


def test_no_grad_call_records_nothing(monkeypatch):
    layer = fused_rnn.GRU(4, 5, backend="cpu")
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        y, h = layer(x)
    assert y.grad_fn is None and h.grad_fn is None
    y, h = layer(x)  # the parameters need gradients: recorded
    assert "_EagerAutogradBackward" in graph_names(y)
    monkeypatch.undo()  # the layer entry records its own node
    assert "CppFunction" in graph_names(layer(x)[0])


def test_traced_calls_take_the_registered_op():
    """Under torch.compile the registered op is what the graph holds (no graph break)."""
    layer = fused_rnn.LSTM(4, 5, backend="cpu")
    x = torch.randn(3, 2, 4)
    want = layer(x)[0]
    got = torch.compile(layer, fullgraph=True, backend="eager")(x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["lstm", "gru-bidir-2L", "lstm-proj", "lstm-zoneout"])
def test_second_order_equals_registered_op(case, monkeypatch):
    """create_graph=True: the eager projected op differentiates itself through the reference
    (ops._second_order_backward) instead of double_backward.attach's extra node; the gradient
    penalty's gradients are the same either way (zoneout runs the options op: attach in both)."""
    spec = CASES[case]

    def penalty_grads():
        torch.manual_seed(0)
        layer = spec["cls"](5, 6, backend="cpu", dtype=torch.float64, **spec["kw"])
        x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([4, 2, 3])
        torch.manual_seed(1)
        out, _ = layer(torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
        y = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
        params = list(layer.parameters())
        first = torch.autograd.grad((y * y).sum(), [x, *params], create_graph=True)
        penalty = sum((g * g).sum() for g in first)
        return [*first, *torch.autograd.grad(penalty, [x, *params], allow_unused=True)], graph_names(y)

    eager, eager_graph = penalty_grads()
    monkeypatch.setattr(ops, "_PLAIN_ARG_TYPES", frozenset())
    registered, registered_graph = penalty_grads()
    assert "_SecondOrderThroughReferenceBackward" in registered_graph
    assert ("_SecondOrderThroughReferenceBackward" in eager_graph) == (case == "lstm-zoneout")
    for a, b in zip(eager, registered):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
