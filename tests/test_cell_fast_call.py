"""The cell modules' eager call, fused_rnn._C.cell_step (csrc/cell_step.cpp, "eager entry from
Python"): the same results and gradients as torch.ops.fused_rnn.cell_step and torch.nn, None
(nothing run) for every argument torch.nn's cell would refuse, so that the module's full path
raises torch.nn's error, no reference leaked, and $FUSED_RNN_BACKEND still read on every call.
"""
import sys

import pytest
import torch

import fused_rnn
from fused_rnn.ops.cpp import cell_ops, ops

from helpers import TensorSubclass, argument_variants, assert_close, grads_of

_err = ops.load_error() or (None if cell_ops.available() else "fused_rnn._C has no cell_step op: rebuild it")
pytestmark = pytest.mark.skipif(_err is not None, reason=str(_err))

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
MODULES = {"lstm": ("LSTMCell", {}), "gru": ("GRUCell", {}), "rnn_tanh": ("RNNCell", {}),
           "rnn_relu": ("RNNCell", {"nonlinearity": "relu"})}


def args_for(cell, B, I, H, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(B * 100 + H)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    G = GATES[cell]
    return [cell, r(B, I), r(B, H), r(B, H) if cell == "lstm" else None, r(G * H, I), r(G * H, H), r(G * H), r(G * H)]


@pytest.mark.parametrize("B, H", [(1, 1), (3, 3), (1, 37), (3, 133), (40, 37)], ids=str)
@pytest.mark.parametrize("cell", list(GATES))
def test_same_as_torch_ops_and_torch_nn(cell, B, H):
    """Outputs bitwise those of torch.ops' call, every gradient too; and torch.nn's, in float64."""
    args = args_for(cell, B, 5, H, requires_grad=True)
    ins = [a for a in args[1:] if a is not None]
    fast = cell_ops.CELL_STEP(*args)
    slow = torch.ops.fused_rnn.cell_step.default(*args)
    outs = [o for o in (fast, slow)]
    keep = 2 if cell == "lstm" else 1
    for a, b in zip(list(outs[0][:keep]) + list(grads_of(outs[0][:keep], ins)),
                    list(outs[1][:keep]) + list(grads_of(outs[1][:keep], ins))):
        assert torch.equal(a, b)
    name, kw = MODULES[cell]
    nn_cell = getattr(torch.nn, name)(5, H, dtype=torch.float64, **kw)
    with torch.no_grad():
        for p, w in zip(nn_cell.parameters(), args[4:]):
            p.copy_(w)
    state = (args[2], args[3]) if cell == "lstm" else args[2]
    want = nn_cell(args[1], state)
    want = want if cell == "lstm" else (want,)
    for a, b in zip(fast[:keep], want):
        assert_close(a, b, torch.float64, f"{cell} B={B} H={H}")


def _refused(cell):
    """Argument lists torch.nn's cell refuses (or the op does not run), each with what is wrong."""
    B, I, H = 3, 5, 7
    base = args_for(cell, B, I, H)
    x, h, c = base[1], base[2], base[3]
    cases = {
        "1-D input": {1: x[0]},
        "input_size": {1: torch.randn(B, I + 1, dtype=torch.float64)},
        "float32 input": {1: x.float()},
        "batch of hx": {2: h[:2]},
        "hidden size of hx": {2: torch.randn(B, H + 1, dtype=torch.float64)},
        "float32 hx": {2: h.float()},
        "hx not a tensor": {2: h.tolist()},
        "3-D hx": {2: h.unsqueeze(0)},
        "float32 w_hh": {5: base[5].float()},
        "bias of the wrong size": {6: base[6][:-1]},
        "input a subclass": {1: x.as_subclass(TensorSubclass)},
    }
    if cell == "lstm":
        cases["no cx"] = {3: None}
        cases["batch of cx"] = {3: c[:2]}
        cases["float32 cx"] = {3: c.float()}
    else:
        cases["a cx"] = {3: h.clone()}
    yield from argument_variants(base, cases)


@pytest.mark.parametrize("cell", list(GATES))
def test_none_where_torch_nn_refuses(cell):
    for what, args in _refused(cell):
        assert cell_ops.CELL_STEP(*args) is None, what


@pytest.mark.parametrize("cell", list(GATES))
def test_module_errors_stay_torch_nn_s(cell):
    """Through the modules: where the fast call says None, the full path raises torch.nn's error."""
    name, kw = MODULES[cell]
    ours = getattr(fused_rnn, name)(5, 7, **kw)
    theirs = getattr(torch.nn, name)(5, 7, **kw)
    theirs.load_state_dict(ours.state_dict())
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    bad = [(torch.randn(3, 6), None), (x, torch.randn(2, 7)), (x, torch.randn(3, 8)), (x, h.double()),
           (x.double(), h)]
    for xi, hi in bad:
        state = hi if hi is None or cell != "lstm" else (hi, torch.randn(hi.shape))
        errors = []
        for m in (ours, theirs):
            with pytest.raises(Exception) as e:  # noqa: PT011 - whatever torch.nn raises, ours must too
                m(xi, state)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1]


def test_no_reference_leaked():
    args = args_for("lstm", 3, 5, 7)
    for _ in range(3):
        out = cell_ops.CELL_STEP(*args)
    refs = [sys.getrefcount(t) for t in out]
    assert sys.getrefcount(out) == 2 and refs == [3, 3]  # out's tuple + getrefcount's argument
    before = [sys.getrefcount(a) for a in args[1:] if a is not None]
    for _ in range(100):
        cell_ops.CELL_STEP(*args)
    assert [sys.getrefcount(a) for a in args[1:] if a is not None] == before


def test_environment_variable_still_read_every_call(monkeypatch):
    """FUSED_RNN_BACKEND set after a first call sends the next call of an `auto` cell elsewhere."""
    m = fused_rnn.LSTMCell(5, 7)
    x = torch.randn(3, 5)
    assert cell_ops.runs_on_cpu("auto", torch.float32, "lstm")
    m(x, (torch.randn(3, 7), torch.randn(3, 7)))
    monkeypatch.setenv("FUSED_RNN_BACKEND", "reference")
    assert not cell_ops.runs_on_cpu("auto", torch.float32, "lstm")
    monkeypatch.delenv("FUSED_RNN_BACKEND")
    assert cell_ops.runs_on_cpu("auto", torch.float32, "lstm")


def test_wrong_argument_count_is_a_type_error():
    with pytest.raises(TypeError, match="takes 8 arguments"):
        cell_ops.CELL_STEP("lstm")
