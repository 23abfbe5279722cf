"""fused_rnn's modules against torch.nn's: every output and every gradient over a grid of options."""
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import fused_rnn

from helpers import assert_close, grads_of, torch_nn_under_autocast

PAIRS = {"LSTM": (nn.LSTM, fused_rnn.LSTM), "GRU": (nn.GRU, fused_rnn.GRU),
         "RNN_TANH": (nn.RNN, fused_rnn.RNN), "RNN_RELU": (nn.RNN, fused_rnn.RNN)}


def build(mode, *args, **kwargs):
    """The torch.nn module and ours with identical weights (same seed -> same initialisation)."""
    if mode.startswith("RNN"):
        kwargs["nonlinearity"] = mode[4:].lower()
    backend = kwargs.pop("backend", "auto")
    torch.manual_seed(7)
    theirs = PAIRS[mode][0](*args, **kwargs)
    torch.manual_seed(7)
    ours = PAIRS[mode][1](*args, backend=backend, **kwargs)
    for (n1, p1), (n2, p2) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), "initialisation differs from torch.nn"
    return theirs, ours


def flat(out):
    """(output, hidden) -> list of tensors, PackedSequence data unpacked."""
    y, h = out
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    return [y] + (list(h) if isinstance(h, tuple) else [h])


# (layers, bidirectional, bias, batch_first, proj, input kind); kinds: dense, packed (unsorted), unbatched, T1
GRID = [
    (1, False, True, False, 0, "dense"),
    (1, True, True, True, 0, "dense"),
    (2, False, False, False, 0, "dense"),
    (2, True, True, True, 0, "packed"),
    (3, True, False, False, 0, "packed"),
    (3, False, True, True, 0, "unbatched"),
    (2, True, True, False, 0, "unbatched"),
    (1, False, True, False, 0, "T1"),
    (2, True, True, True, 0, "T1"),
    (1, False, True, False, 3, "dense"),
    (2, True, False, True, 3, "packed"),
    (2, True, True, False, 2, "unbatched"),
]


def grid():
    for mode in PAIRS:
        for g in GRID:
            if g[4] and mode != "LSTM":
                continue
            L, bi, bias, bf, proj, kind = g
            yield pytest.param(mode, g, id=f"{mode}-L{L}-{'bi' if bi else 'uni'}-{'bias' if bias else 'nobias'}"
                                           f"-{'bf' if bf else 'tf'}-proj{proj}-{kind}")


def make_input(kind, batch_first, I, dtype, with_hx, module):
    """Input (and optionally a random initial state) of the given kind."""
    B, T = 4, 6
    if kind == "packed":
        seqs = [torch.randn(n, I, dtype=dtype, requires_grad=True) for n in (3, 6, 1, 5)]
        return pack_sequence(seqs, enforce_sorted=False), seqs, B
    if kind == "unbatched":
        x = torch.randn(T, I, dtype=dtype, requires_grad=True)
        return x, [x], None
    T = 1 if kind == "T1" else T
    x = torch.randn(*((B, T) if batch_first else (T, B)), I, dtype=dtype, requires_grad=True)
    return x, [x], B


def random_state(module, B, dtype):
    D = 2 if module.bidirectional else 1
    shape = (module.num_layers * D,) + (() if B is None else (B,))
    Hout = module.proj_size or module.hidden_size
    h = torch.randn(*shape, Hout, dtype=dtype, requires_grad=True)
    if module.mode != "LSTM":
        return h, [h]
    c = torch.randn(*shape, module.hidden_size, dtype=dtype, requires_grad=True)
    return (h, c), [h, c]


@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,cfg", list(grid()))
def test_matches_torch_nn(mode, cfg, dtype, with_hx):
    L, bi, bias, bf, proj, kind = cfg
    I, H = 5, 4
    kwargs = dict(num_layers=L, bias=bias, batch_first=bf, bidirectional=bi, dtype=dtype)
    if proj:
        kwargs["proj_size"] = proj
    theirs, ours = build(mode, I, H, **kwargs)
    x, leaves, B = make_input(kind, bf, I, dtype, with_hx, ours)
    hx, hx_leaves = random_state(ours, B, dtype) if with_hx else (None, [])
    out_theirs, out_ours = flat(theirs(x, hx)), flat(ours(x, hx))
    for a, b, name in zip(out_ours, out_theirs, ["output", "h_n", "c_n"]):
        assert_close(a, b, dtype, name)
    inputs_theirs = leaves + hx_leaves + list(theirs.parameters())
    inputs_ours = leaves + hx_leaves + list(ours.parameters())
    for a, b, (name, _) in zip(grads_of(out_ours, inputs_ours), grads_of(out_theirs, inputs_theirs),
                               [("input", 0)] * len(leaves) + [("hx", 0)] * len(hx_leaves)
                               + list(ours.named_parameters())):
        assert a is not None and b is not None, name
        assert_close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("mode", list(PAIRS))
def test_packed_sorted_equals_padded_with_lengths(mode):
    """enforce_sorted=True packing and the functional `lengths` give the same as torch.nn."""
    theirs, ours = build(mode, 3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 2])
    packed = pack_padded_sequence(x, lengths)
    for a, b in zip(flat(ours(packed)), flat(theirs(packed))):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("mode", list(PAIRS))
def test_state_dict_round_trip_strict(mode):
    theirs, _ = build(mode, 3, 5, num_layers=2, bidirectional=True)
    ours = PAIRS[mode][1](3, 5, num_layers=2, bidirectional=True,
                          **({"nonlinearity": mode[4:].lower()} if mode.startswith("RNN") else {}))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = PAIRS[mode][0](3, 5, num_layers=2, bidirectional=True,
                          **({"nonlinearity": mode[4:].lower()} if mode.startswith("RNN") else {}))
    back.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_constructor_positional_args_and_repr():
    theirs = nn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    ours = fused_rnn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    assert ours.mode == "RNN_RELU" and ours.nonlinearity == "relu"
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert repr(theirs).replace("RNN", "X") == repr(ours).replace("RNN", "X")
    assert "backend='torch'" in repr(fused_rnn.LSTM(3, 4, backend="torch"))
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        fused_rnn.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        fused_rnn.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        fused_rnn.LSTM(3, 4, proj_size=4)


def test_flatten_parameters_exists_and_keeps_results():
    _, ours = build("LSTM", 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    before = ours(x)[0]
    ours.flatten_parameters()
    assert torch.equal(ours(x)[0], before)


def test_functional_call_reads_the_given_weights():
    theirs, ours = build("GRU", 3, 4)
    x = torch.randn(5, 2, 3)
    new = {k: torch.randn_like(v) for k, v in ours.named_parameters()}
    got = torch.func.functional_call(ours, new, (x,))
    want = torch.func.functional_call(theirs, new, (x,))
    assert_close(got[0], want[0], torch.float32)
    assert not torch.allclose(got[0], ours(x)[0])


def test_weight_norm_parametrization_trains():
    theirs, ours = build("LSTM", 3, 4)
    for m in (theirs, ours):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    x = torch.randn(5, 2, 3)
    a, b = flat(theirs(x)), flat(ours(x))
    assert_close(b[0], a[0], torch.float32)
    ga = grads_of(a, [theirs.parametrizations.weight_hh_l0.original0, theirs.parametrizations.weight_hh_l0.original1])
    gb = grads_of(b, [ours.parametrizations.weight_hh_l0.original0, ours.parametrizations.weight_hh_l0.original1])
    for u, v in zip(gb, ga):
        assert_close(u, v, torch.float32)


def test_whole_model_pickles_and_loads_weights_only():
    model = nn.Sequential()
    model.add_module("rnn", fused_rnn.LSTM(3, 4, num_layers=2, backend="torch"))
    buf = io.BytesIO()
    torch.save(model.rnn, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([fused_rnn.LSTM]):
        loaded = torch.load(buf, weights_only=True)
    x = torch.randn(5, 2, 3)
    assert torch.equal(loaded(x)[0], model.rnn(x)[0])
    assert loaded.backend == "torch"
    assert pickle.loads(pickle.dumps(model.rnn)).backend == "torch"


@pytest.mark.parametrize("mode", list(PAIRS))
def test_dropout_between_layers_only_in_training(mode):
    theirs, ours = build(mode, 3, 6, num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 3)
    ours.eval(), theirs.eval()
    assert_close(flat(ours(x))[0], flat(theirs(x))[0], torch.float32)
    ours.train(), theirs.train()
    torch.manual_seed(3)
    a = flat(ours(x))[0]
    torch.manual_seed(3)
    b = flat(ours(x))[0]
    torch.manual_seed(4)
    c = flat(ours(x))[0]
    assert torch.equal(a, b), "dropout must follow the RNG seed"
    assert not torch.allclose(a, c), "training mode must apply dropout"
    ours.eval()
    assert not torch.allclose(a, flat(ours(x))[0])


CELL_PAIRS = [(nn.LSTMCell, fused_rnn.LSTMCell, {}), (nn.GRUCell, fused_rnn.GRUCell, {}),
              (nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "tanh"}),
              (nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "relu"})]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("pair", CELL_PAIRS, ids=["LSTMCell", "GRUCell", "RNNCell-tanh", "RNNCell-relu"])
def test_cells_match_torch_nn(pair, with_hx, bias, batched):
    Theirs, Ours, kw = pair
    torch.manual_seed(0)
    theirs = Theirs(5, 7, bias=bias, dtype=torch.float64, **kw)
    torch.manual_seed(0)
    ours = Ours(5, 7, bias=bias, dtype=torch.float64, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 5, dtype=torch.float64, requires_grad=True)
    leaves = [x]
    hx = None
    if with_hx:
        n = 2 if Theirs is nn.LSTMCell else 1
        hs = [torch.randn(*shape, 7, dtype=torch.float64, requires_grad=True) for _ in range(n)]
        leaves += hs
        hx = tuple(hs) if n == 2 else hs[0]
    a, b = ours(x, hx), theirs(x, hx)
    a, b = (list(a), list(b)) if isinstance(a, tuple) else ([a], [b])
    for u, v in zip(a, b):
        assert_close(u, v, torch.float64)
    for u, v in zip(grads_of(a, leaves + list(ours.parameters())), grads_of(b, leaves + list(theirs.parameters()))):
        assert_close(u, v, torch.float64)


def test_zero_batch_like_torch_nn():
    theirs, ours = build("LSTM", 3, 4)
    x = torch.randn(5, 0, 3)
    a, b = flat(ours(x)), flat(theirs(x))
    assert [t.shape for t in a] == [t.shape for t in b]


@pytest.mark.parametrize("make", [
    lambda: (nn.LSTM(4, 5), fused_rnn.LSTM(4, 5)), lambda: (nn.GRU(4, 5), fused_rnn.GRU(4, 5)),
    lambda: (nn.RNN(4, 5), fused_rnn.RNN(4, 5)), lambda: (nn.LSTMCell(4, 5), fused_rnn.LSTMCell(4, 5)),
    lambda: (nn.GRUCell(4, 5), fused_rnn.GRUCell(4, 5)), lambda: (nn.RNNCell(4, 5), fused_rnn.RNNCell(4, 5)),
], ids=["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lower", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_autocast_runs_in_the_dtype_torch_nn_uses(make, dtype, lower):
    """Module and input in `dtype`, autocast to `lower`: the output's dtype and values are torch.nn's
    (float64 is never lowered; GRU and the LSTM/GRU cells keep float32 unless the input is `lower`)."""
    theirs, ours = make()
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    if lower == torch.float16 and type(theirs) is nn.LSTM and dtype != torch.float64:
        pytest.skip("torch.nn's CPU LSTM has no float16 kernel under autocast (oneDNN refuses it)")
    x = (torch.randn(3, 2, 4) if isinstance(theirs, nn.RNNBase) else torch.randn(2, 4)).to(dtype)
    with torch.autocast("cpu", dtype=lower):
        a, b = torch_nn_under_autocast(theirs, x), ours(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert b.dtype == a.dtype
    assert_close(b, a, a.dtype if a.dtype != torch.float32 else lower)


@pytest.mark.parametrize("cell", ["LSTM", "LSTMCell"])
@pytest.mark.parametrize("c0_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lower_precision_c0_beside_a_float64_lstm(cell, c0_dtype):
    """torch.nn takes a c0 whose dtype promotes to the layer's and computes in the layer's dtype:
    the same outputs, and c0's gradient in c0's dtype."""
    theirs = getattr(nn, cell)(4, 5, dtype=torch.float64)
    ours = getattr(fused_rnn, cell)(4, 5, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    layer = cell == "LSTM"
    x = torch.randn((2, 3, 4) if layer else (3, 4), dtype=torch.float64)
    h = torch.randn((1, 3, 5) if layer else (3, 5), dtype=torch.float64)
    c = torch.randn(h.shape).to(c0_dtype).requires_grad_()
    outs = []
    for m in (theirs, ours):
        out = m(x, (h, c))
        flat_out = [out[0], *out[1]] if layer else list(out)
        outs.append(flat_out + list(grads_of(flat_out, [c])))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        assert_close(b, a, torch.float64 if a.dtype == torch.float64 else c0_dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode", list(PAIRS))
def test_dropout_draws_the_same_masks_as_torch_nn(mode, packed):
    theirs, ours = build(mode, 3, 6, num_layers=3, dropout=0.4, bidirectional=packed)
    x = torch.randn(5, 2, 3)
    if packed:
        x = pack_sequence([torch.randn(n, 3) for n in (2, 5, 4)], enforce_sorted=False)
    torch.manual_seed(11)
    a = flat(theirs(x))
    torch.manual_seed(11)
    b = flat(ours(x))
    for u, v in zip(b, a):
        assert_close(u, v, torch.float32)
