"""Bad input gets the error torch.nn gives: same exception type, same message where torch.nn's
message comes from its Python layer. Where torch.nn's message is an internal one (a oneDNN or
matmul detail), the type must match and ours must say what is wrong."""
import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn import functional

LAYERS = {"LSTM": (nn.LSTM, fused_rnn.LSTM), "GRU": (nn.GRU, fused_rnn.GRU), "RNN": (nn.RNN, fused_rnn.RNN)}
CELLS = {"LSTMCell": (nn.LSTMCell, fused_rnn.LSTMCell), "GRUCell": (nn.GRUCell, fused_rnn.GRUCell),
         "RNNCell": (nn.RNNCell, fused_rnn.RNNCell)}


def state(mode, *shape, dtype=torch.float32, device="cpu", c_shape=None):
    h = torch.randn(*shape, dtype=dtype, device=device)
    if mode != "LSTM":
        return h
    return h, torch.randn(*(c_shape or shape), dtype=dtype, device=device)


# name -> (mode filter, call(module) raising, whether torch.nn's message must match exactly)
LAYER_CASES = {
    "4-D input": (None, lambda m, k: m(torch.randn(1, 2, 3, 4)), True),
    "1-D input": (None, lambda m, k: m(torch.randn(4)), True),
    "wrong input_size": (None, lambda m, k: m(torch.randn(3, 2, 5)), True),
    "input dtype": (None, lambda m, k: m(torch.randn(3, 2, 4, dtype=torch.float64)), True),
    "integer input": (None, lambda m, k: m(torch.ones(3, 2, 4, dtype=torch.long)), True),
    "h0 2-D for batched": (None, lambda m, k: m(torch.randn(3, 2, 4), state(k, 2, 5)), True),
    "h0 3-D for unbatched": (None, lambda m, k: m(torch.randn(3, 4), state(k, 1, 1, 5)), True),
    "h0 wrong layers": (None, lambda m, k: m(torch.randn(3, 2, 4), state(k, 2, 2, 5, c_shape=(1, 2, 5))), True),
    "h0 wrong batch": (None, lambda m, k: m(torch.randn(3, 2, 4), state(k, 1, 3, 5, c_shape=(1, 2, 5))), True),
    "h0 wrong size": (None, lambda m, k: m(torch.randn(3, 2, 4), state(k, 1, 2, 6, c_shape=(1, 2, 5))), True),
    "c0 wrong size": ("LSTM", lambda m, k: m(torch.randn(3, 2, 4), state(k, 1, 2, 5, c_shape=(1, 2, 6))), True),
    "lstm hx not a pair": ("LSTM", lambda m, k: m(torch.randn(3, 2, 4), torch.randn(1, 2, 5)), True),
    "zero-length sequence": (None, lambda m, k: m(torch.randn(0, 2, 4)), True),
    "h0 dtype": (None, lambda m, k: m(torch.randn(3, 2, 4), state(k, 1, 2, 5, dtype=torch.float64)), False),
    "h0 on another device": (None, lambda m, k: m(torch.randn(3, 2, 4), state(k, 1, 2, 5, device="meta")), True),
}


def raised(f):
    with pytest.raises(Exception) as info:
        f()
    return info.value


@pytest.mark.parametrize("kind,case", [(k, c) for k in LAYERS for c, (only, _, _) in LAYER_CASES.items()
                                       if only in (None, k)])
def test_layer_errors_match_torch_nn(kind, case):
    only, call, same_message = LAYER_CASES[case]
    theirs, ours = (cls(4, 5) for cls in LAYERS[kind])
    want, got = raised(lambda: call(theirs, kind)), raised(lambda: call(ours, kind))
    assert type(got) is type(want), f"{type(got).__name__}: {got} vs torch.nn's {type(want).__name__}: {want}"
    if same_message:
        assert str(got) == str(want)
    else:
        assert "dtype" in str(got)


CELL_CASES = {
    "3-D input": lambda m, k: m(torch.randn(1, 2, 4)),
    "wrong input_size": lambda m, k: m(torch.randn(2, 3)),
    "hidden wrong size": lambda m, k: m(torch.randn(2, 4), state(k, 2, 6, c_shape=(2, 5))),
    "cell wrong size": lambda m, k: m(torch.randn(2, 4), state(k, 2, 5, c_shape=(2, 6))),
    "hidden wrong batch": lambda m, k: m(torch.randn(2, 4), state(k, 3, 5)),
    "hidden 3-D": lambda m, k: m(torch.randn(2, 4), state(k, 1, 2, 5)),
    "input dtype": lambda m, k: m(torch.randn(2, 4, dtype=torch.float64)),
}


@pytest.mark.parametrize("kind,case", [(k, c) for k in CELLS for c in CELL_CASES
                                       if c != "cell wrong size" or k == "LSTMCell"])
def test_cell_errors_match_torch_nn(kind, case):
    mode = "LSTM" if kind == "LSTMCell" else "GRU"
    theirs, ours = (cls(4, 5) for cls in CELLS[kind])
    want, got = raised(lambda: CELL_CASES[case](theirs, mode)), raised(lambda: CELL_CASES[case](ours, mode))
    assert type(got) is type(want) and str(got) == str(want), f"{got!r} vs torch.nn's {want!r}"


def test_functional_lengths_are_validated():
    m = fused_rnn.LSTM(4, 5)
    x, hx = torch.randn(3, 2, 4), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="lengths must not exceed the sequence length 3, got 4"):
        functional.lstm(x, hx, m._flat_weights, lengths=torch.tensor([4, 2]))
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        functional.lstm(x, hx, m._flat_weights, lengths=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="lengths must be a 1-D tensor of batch size 2"):
        functional.lstm(x, hx, m._flat_weights, lengths=torch.tensor([3, 2, 1]))


def test_weights_on_another_device():
    m = fused_rnn.GRU(4, 5)
    weights = [w.to("meta") for w in m._flat_weights]
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
        functional.gru(torch.randn(3, 2, 4), torch.zeros(1, 2, 5), weights)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_recurrence_validates_lengths_before_any_kernel(backend):
    gx, h0, w = torch.randn(3, 1, 4 * 5), torch.randn(1, 5), torch.randn(4 * 5, 5)
    c0 = torch.randn(1, 5)
    with pytest.raises(ValueError, match="lengths must not exceed the sequence length 3, got 4"):
        functional.recurrence("lstm", gx, h0, c0, w, lengths=torch.tensor([4]), reverse=True, backend=backend)
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        functional.recurrence("lstm", gx, h0, c0, w, lengths=torch.tensor([0]), reverse=True, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_double_backward_of_a_backend_op_is_refused_not_silently_wrong(backend):
    """Modules and fused_rnn.functional support double backward (tests/test_double_backward.py);
    a backend's op called directly has no differentiable backward and says so."""
    from fused_rnn.backends import get
    gx = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    h0, c0, w_hh = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), torch.randn(12, 3)
    y = get(backend).recurrence("lstm", gx, h0, c0, w_hh.double(), None, None, None, False)[0]
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(y.pow(2).sum(), gx, create_graph=True)
