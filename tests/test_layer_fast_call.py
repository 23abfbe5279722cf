"""The layer modules' eager call, fused_rnn._C.layer_forward (csrc/layer_entry.cpp), without
gradients: outputs bitwise those of the modules' full path (functional.rnn) and close to torch.nn's;
None (nothing run) for every argument torch.nn's layer would refuse, so that the full path raises
torch.nn's error; the module's own conditions (autocast, dropout, zoneout, layer norm, parametrized
weights, the backend) respected; no reference leaked. Training calls: tests/test_layer_train_call.py.
"""
import sys
import warnings

import pytest
import torch
from torch.nn.utils import parametrize

import fused_rnn
from fused_rnn.ops.cpp import cell_ops, ops

from helpers import TensorSubclass, argument_variants, assert_close

_err = ops.load_error() or (None if cell_ops.available() else "fused_rnn._C is not built")
pytestmark = pytest.mark.skipif(_err is not None, reason=str(_err))

MODULES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {}),
           "rnn_relu": ("RNN", {"nonlinearity": "relu"})}


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls LAYER_FORWARD ran (returned outputs) and refused (returned None)."""
    counts = {"ran": 0, "refused": 0}
    real = cell_ops.LAYER_FORWARD

    def counting(*args):
        out = real(*args)
        counts["refused" if out is None else "ran"] += 1
        return out

    monkeypatch.setattr(cell_ops, "LAYER_FORWARD", counting)
    return counts


def make(cell, I, H, dtype=torch.float64, **kw):
    """fused_rnn's and torch.nn's layer with the same random weights (never zeros)."""
    name, extra = MODULES[cell]
    torch.manual_seed(I * 31 + H)
    ours = getattr(fused_rnn, name)(I, H, dtype=dtype, **extra, **kw)
    theirs = getattr(torch.nn, name)(I, H, dtype=dtype, **extra, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def state(cell, m, B, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    Hout = m.proj_size or m.hidden_size
    h = torch.randn(m.num_layers * D, B, Hout, generator=g, dtype=dtype)
    if cell != "lstm":
        return h
    return h, torch.randn(m.num_layers * D, B, m.hidden_size, generator=g, dtype=dtype)


def flat(out):
    output, hidden = out
    return [output, *hidden] if isinstance(hidden, tuple) else [output, hidden]


def full_path(m, *args):
    """The module's call with the eager entry refusing: functional.rnn's stack."""
    real = cell_ops.LAYER_FORWARD
    cell_ops.LAYER_FORWARD = lambda *a: None
    try:
        return m(*args)
    finally:
        cell_ops.LAYER_FORWARD = real


CASES = [  # (num_layers, bidirectional, batch_first, proj_size, T, B, H)
    (1, False, False, 0, 1, 1, 1), (1, False, False, 0, 1, 3, 37), (1, False, True, 0, 5, 3, 3),
    (2, True, False, 0, 1, 1, 37), (2, True, True, 0, 5, 3, 3), (3, False, False, 0, 17, 2, 5),
    (1, False, False, 2, 1, 3, 7), (2, True, True, 3, 5, 1, 7),
]


CELL_CASES = [(cell, case) for cell in MODULES for case in CASES if cell == "lstm" or not case[3]]  # proj: LSTM


def make_case(cell, case, dtype):
    """make() for one of CASES, input size 4."""
    L, bidir, bf, proj, _T, _B, H = case
    return make(cell, 4, H, dtype, num_layers=L, bidirectional=bidir, batch_first=bf,
                **({"proj_size": proj} if proj else {}))


@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("cell, case", CELL_CASES, ids=str)
def test_same_as_full_path_and_torch_nn(spy, cell, case, hx_given):
    bf, T, B = case[2], case[4], case[5]
    for dtype in (torch.float64, torch.float32):
        ours, theirs = make_case(cell, case, dtype)
        x = torch.randn((B, T, 4) if bf else (T, B, 4), dtype=dtype)
        args = (x, state(cell, ours, B, dtype)) if hx_given else (x,)
        with torch.no_grad():
            fast = flat(ours(*args))
            ran = spy["ran"]
            slow = flat(full_path(ours, *args))
            want = flat(theirs(*args))
        assert ran == 1 and spy["ran"] == 1, "the eager entry did not run the call"
        for a, b, w in zip(fast, slow, want):
            assert torch.equal(a, b)
            assert_close(a, w, dtype, f"{cell} {case} {dtype}")
        spy["ran"] = 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_eval_dropout_train_single_layer_and_no_grad_weights(spy, cell):
    """Dropout between layers does nothing in eval mode or for one layer: those calls run here; so do
    grad-mode calls where no tensor requires a gradient."""
    ours, theirs = make(cell, 4, 6, num_layers=2, dropout=0.5)
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(flat(ours(x)), flat(theirs(x))):
            assert_close(a, b, torch.float64, "eval")
    with warnings.catch_warnings():  # torch.nn's "dropout ... only between layers" for one layer
        warnings.simplefilter("ignore", UserWarning)
        single, _ = make(cell, 4, 6, dropout=0.5)
    with torch.no_grad():
        single(x)
    for p in single.parameters():
        p.requires_grad_(False)
    out = single(x)[0]
    assert not out.requires_grad
    assert spy == {"ran": 3, "refused": 0}


def _base_args(cell):
    """LAYER_FORWARD's arguments for a 2-layer bidirectional layer, I=4, H=5, T=2, B=3, float64."""
    ours, _ = make(cell, 4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    hx = state(cell, ours, 3, torch.float64)
    h, c = hx if cell == "lstm" else (hx, None)
    return [cell, x, h, c, list(ours._flat_weights), 2, True, False, True, 4, 5, 0]


def _refused(cell):
    """Argument lists torch.nn's layer refuses, each with what is wrong."""
    base = _base_args(cell)
    x, h, c, weights = base[1:5]
    B, T = 3, 2
    cases = {
        "unbatched input": {1: x[0]},
        "input_size": {1: torch.randn(T, B, 5, dtype=torch.float64)},
        "float32 input": {1: x.float()},
        "empty sequence": {1: x[:0]},
        "empty batch": {1: x[:, :0], 2: h[:, :0], 3: None if c is None else c[:, :0]},
        "input a subclass": {1: x.as_subclass(TensorSubclass)},
        "batch of hx": {2: h[:, :2]},
        "layers of hx": {2: h[:2]},
        "hidden size of hx": {2: torch.randn(4, B, 6, dtype=torch.float64)},
        "float32 hx": {2: h.float()},
        "hx not a tensor": {2: h.tolist()},
        "a weight missing": {4: weights[:-1]},
        "a weight of the wrong shape": {4: weights[:1] + [weights[1][:-1]] + weights[2:]},
        "a float32 weight": {4: [weights[0].float()] + weights[1:]},
        "weights as a tuple": {4: tuple(weights)},
        "input_size argument": {9: 5},
    }
    if cell == "lstm":
        cases["no cx"] = {3: None}
        cases["batch of cx"] = {3: c[:, :2]}
        cases["float32 cx"] = {3: c.float()}
    else:
        cases["a cx"] = {3: h.clone()}
    yield from argument_variants(base, cases)


@pytest.mark.parametrize("cell", list(MODULES))
def test_none_where_torch_nn_refuses(cell):
    for what, args in _refused(cell):
        assert cell_ops.LAYER_FORWARD(*args) is None, what
        with torch.no_grad():
            assert cell_ops.LAYER_FORWARD(*args) is None, what


@pytest.mark.parametrize("cell", list(MODULES))
def test_module_errors_stay_torch_nn_s(cell):
    """Through the modules, under no_grad: where the entry says None, torch.nn's error is raised."""
    ours, theirs = make(cell, 4, 5)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    h = torch.randn(1, 3, 5, dtype=torch.float64)
    bad = [(torch.randn(2, 3, 6, dtype=torch.float64), None), (x, torch.randn(1, 2, 5, dtype=torch.float64)),
           (x, torch.randn(1, 3, 6, dtype=torch.float64)), (x, torch.randn(2, 3, 5, dtype=torch.float64)),
           (x, h.float()), (x.float(), None), (torch.randn(2, 3, 4, 1, dtype=torch.float64), None)]
    for xi, hi in bad:
        hx = hi if hi is None or cell != "lstm" else (hi, torch.randn(hi.shape, dtype=hi.dtype))
        errors = []
        for m in (ours, theirs):
            with torch.no_grad(), pytest.raises(Exception) as e:  # noqa: PT011 - whatever torch.nn raises, ours must too
                m(xi, hx)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1], (xi.shape, None if hi is None else hi.shape)


def test_module_conditions_send_calls_down_the_full_path(spy, monkeypatch):
    """What only Python sees: autocast, dropout in training, zoneout, layer norm, a parametrized
    weight, packed or unbatched input, another backend (also through $FUSED_RNN_BACKEND)."""
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_rnn.LSTM(4, 5)(x)
        fused_rnn.LSTM(4, 5, num_layers=2, dropout=0.5)(x)                 # training mode
        fused_rnn.LSTM(4, 5, zoneout=0.2).eval()(x)
        fused_rnn.LayerNormLSTM(4, 5)(x)
        m = fused_rnn.GRU(4, 5)
        parametrize.register_parametrization(m, "weight_hh_l0", _Double())
        m(x)
        fused_rnn.GRU(4, 5)(torch.nn.utils.rnn.pack_padded_sequence(x, [3, 2]))
        fused_rnn.GRU(4, 5, backend="reference")(x)
        monkeypatch.setenv("FUSED_RNN_BACKEND", "reference")
        fused_rnn.GRU(4, 5)(x)
        monkeypatch.delenv("FUSED_RNN_BACKEND")
        assert spy == {"ran": 0, "refused": 0}
        fused_rnn.GRU(4, 5)(x[:, 0])  # unbatched: C++ refuses it
        assert spy == {"ran": 0, "refused": 1}
        fused_rnn.GRU(4, 5)(x)
    assert spy == {"ran": 1, "refused": 1}


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_weights_read_on_every_call():
    """In-place updates and torch.func.functional_call's weights are what the next call uses."""
    ours, theirs = make("lstm", 4, 5)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        first = ours(x)[0]
        ours.weight_hh_l0.mul_(0.5)
        theirs.weight_hh_l0.mul_(0.5)
        second = ours(x)[0]
        assert not torch.equal(first, second)
        assert_close(second, theirs(x)[0], torch.float64, "after an in-place update")
        other = {k: torch.randn_like(v) for k, v in ours.state_dict().items()}
        got = torch.func.functional_call(ours, other, (x,))[0]
        theirs.load_state_dict(other)
        assert_close(got, theirs(x)[0], torch.float64, "functional_call")


def test_no_reference_leaked():
    args = _base_args("lstm")
    with torch.no_grad():
        for _ in range(3):
            out = cell_ops.LAYER_FORWARD(*args)
        assert sys.getrefcount(out) == 2 and [sys.getrefcount(t) for t in out] == [3, 3, 3]
        before = [sys.getrefcount(a) for a in (*args[1:4], *args[4])]
        for _ in range(100):
            cell_ops.LAYER_FORWARD(*args)
        assert [sys.getrefcount(a) for a in (*args[1:4], *args[4])] == before
        args[3] = None
        args[0] = "gru"
        args[4] = list(make("gru", 4, 5, num_layers=2, bidirectional=True)[0]._flat_weights)
        out = cell_ops.LAYER_FORWARD(*args)
        output, h_n, c_n = out
        assert c_n is None and sys.getrefcount(output) == sys.getrefcount(h_n) == 3


def test_wrong_argument_count_is_a_type_error():
    with pytest.raises(TypeError, match="takes 12 arguments"):
        cell_ops.LAYER_FORWARD("lstm")
