"""Packed batches: what the C++ ops save for the backward keeps only the rows of valid steps.

fused_rnn/ops/cpp/ops.py compacts the [T,B,...] tensors an op saves (y, gates, cells, proj_in,
ln_hat, ln_rstd) to their valid rows when lengths leave at least COMPACT_MIN_PADDING of the rows
as padding, and puts them back (zeros in the padding) for the backward. Checked here: every output
and gradient bitwise equal to the run without compaction (every cell, projection, zoneout, layer
norm, reverse and stacked layers, float32/float64/bfloat16, both ops: the projected one of the cpu
layers and the plain one of functional.recurrence), against the reference in float64, that the
compaction happened (saved tensors of n_valid rows) and what it saves, and where it does not run.
"""
import pytest
import torch

import fused_rnn
from fused_rnn import functional, reference
from fused_rnn.ops.cpp import ops

from benchmarks.cpu_targets import saved_bytes
from helpers import assert_close, grads_of

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
T, B, I, H = 7, 5, 4, 3
LENGTHS = torch.tensor([7, 3, 5, 1, 6])  # unsorted; 22 of 35 rows valid
N_VALID = int(LENGTHS.sum())


def layer_inputs(cell, dtype, num_layers=1, bidirectional=False, proj=0, layer_norm=False, seed=0):
    """Random (x, hx, cx, weights, layer_norm parameters), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    D, G, Hout = 2 if bidirectional else 1, GATES[cell], proj or H

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()

    weights, ln = [], []
    for layer in range(num_layers):
        for _ in range(D):
            inp = I if layer == 0 else D * Hout
            weights += [r(G * H, inp), r(G * H, Hout), r(G * H), r(G * H)] + ([r(Hout, H)] if proj else [])
            if layer_norm:
                ln.append((r(G * H), r(G * H)) + ((r(H), r(H)) if cell == "lstm" else (None, None)))
    x = r(T, B, I)
    hx = r(num_layers * D, B, Hout)
    cx = r(num_layers * D, B, H) if cell == "lstm" else None
    return x, hx, cx, weights, (ln if layer_norm else None)


def run_layer(cell, inputs, backend="cpu", lengths=LENGTHS, zoneout=0.0, **kw):
    """Outputs (output, h_n, c_n) and the gradients of every input of functional.rnn."""
    x, hx, cx, weights, ln = inputs
    torch.manual_seed(1)  # the same zoneout masks in every run
    out = functional.rnn(cell, x, hx, cx, weights, lengths=lengths, backend=backend, zoneout=zoneout,
                         training=zoneout > 0, layer_norm=ln, **kw)
    leaves = [t for t in (x, hx, cx, *weights, *[p for group in (ln or []) for p in group]) if t is not None]
    return [o for o in out if o is not None] + list(grads_of(out, leaves))


def saved_row_counts(fn):
    """The first dimension of every 2-D tensor autograd saves while `fn` runs its forward."""
    rows = []

    def pack(t):
        if t.dim() == 2:
            rows.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return rows


@pytest.fixture
def compaction(monkeypatch):
    """set(on): compact the saved tensors whenever lengths are given (on) or never (off)."""
    def set_(on):
        monkeypatch.setattr(ops, "COMPACT_MIN_PADDING", 0.0 if on else float("inf"))
    return set_


CASES = [  # (cell, options)
    ("lstm", {}), ("gru", {}), ("rnn_tanh", {}), ("rnn_relu", {}),
    ("lstm", {"proj": 2}), ("lstm", {"zoneout": 0.3}), ("gru", {"zoneout": 0.3}),
    ("lstm", {"layer_norm": True}), ("gru", {"layer_norm": True}),
    ("lstm", {"num_layers": 2, "bidirectional": True}), ("gru", {"num_layers": 2, "bidirectional": True}),
    ("lstm", {"num_layers": 2, "bidirectional": True, "proj": 2}),
]


def case_id(case):
    cell, opts = case
    return "-".join([cell] + [f"{k}={v}" for k, v in opts.items()])


def split_options(opts):
    layer = {k: opts[k] for k in ("num_layers", "bidirectional", "proj", "layer_norm") if k in opts}
    run = {k: opts[k] for k in ("num_layers", "bidirectional") if k in opts}
    if "zoneout" in opts:
        run["zoneout"] = opts["zoneout"]
    return layer, run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bitwise_equal_to_uncompacted(case, dtype, compaction):
    cell, opts = case
    layer_opts, run_opts = split_options(opts)
    inputs = layer_inputs(cell, dtype, **layer_opts)
    compaction(False)
    expected = run_layer(cell, inputs, **run_opts)
    assert N_VALID not in saved_row_counts(lambda: run_layer(cell, inputs, **run_opts))
    compaction(True)
    actual = run_layer(cell, inputs, **run_opts)
    assert N_VALID in saved_row_counts(lambda: run_layer(cell, inputs, **run_opts))  # it did compact
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), i
        if a is not None:
            assert torch.isfinite(a).all(), i
            assert torch.equal(a, e), f"output/gradient {i} differs"


@pytest.mark.parametrize("case", [c for c in CASES if "zoneout" not in c[1]], ids=case_id)
def test_against_reference_float64(case, compaction):
    cell, opts = case
    layer_opts, run_opts = split_options(opts)
    inputs = layer_inputs(cell, torch.float64, **layer_opts)
    compaction(True)
    actual = run_layer(cell, inputs, **run_opts)
    expected = run_layer(cell, inputs, backend="reference", **run_opts)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), i
        if a is not None:
            assert_close(a, e, torch.float64, f"output/gradient {i}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("reverse", [False, True])
def test_plain_op(cell, reverse, compaction):
    """functional.recurrence with a given gx: recurrence_forward's saved tensors compact the same."""
    g = torch.Generator().manual_seed(2)
    G = GATES[cell]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    args = (r(T, B, G * H), r(B, H), r(B, H) if cell == "lstm" else None, r(G * H, H), r(G * H))
    leaves = [a for a in args if a is not None]

    def run():
        outs = functional.recurrence(cell, *args, lengths=LENGTHS, reverse=reverse, backend="cpu")
        return [o for o in outs if o is not None] + list(grads_of(outs, leaves))

    compaction(False)
    expected = run()
    compaction(True)
    assert N_VALID in saved_row_counts(run)
    for a, e in zip(run(), expected):
        assert torch.equal(a, e)
    ref = reference.recurrence(cell, *args, None, LENGTHS, reverse)
    for a, e in zip(run(), [o for o in ref if o is not None] + list(grads_of(ref, leaves))):
        assert_close(a, e, torch.float64)


def test_saved_bytes_shrink_by_the_padding(compaction):
    """One LSTM layer: y, gates and cells (6 H floats per row) keep N_VALID of T*B rows."""
    inputs = layer_inputs("lstm", torch.float32)
    compaction(False)
    full = saved_bytes(lambda: run_layer("lstm", inputs))
    compaction(True)
    compact = saved_bytes(lambda: run_layer("lstm", inputs))
    assert full - compact == (T * B - N_VALID) * 6 * H * 4


def test_packed_module_matches_torch_nn_and_saves_less():
    """A packed batch through fused_rnn.LSTM (default threshold): torch.nn's outputs and gradients,
    and the saved tensors compacted."""
    torch.manual_seed(3)
    nn = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = fused_rnn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.float64, backend="cpu")
    ours.load_state_dict(nn.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    results = []
    for m in (nn, ours):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
        out, (h, c) = m(packed)
        results.append([out.data, h, c] + list(grads_of((out.data, h, c), [x, *m.parameters()])))
    for a, e in zip(*results[::-1]):
        assert_close(a, e, torch.float64)
    rows = saved_row_counts(lambda: ours(torch.nn.utils.rnn.pack_padded_sequence(x, LENGTHS, enforce_sorted=False)))
    assert rows.count(N_VALID) >= 4 * 3  # y, gates, cells of each layer and direction


def test_not_compacted_without_enough_padding():
    """lengths None, or fewer than COMPACT_MIN_PADDING of the rows padded: saved as they are."""
    inputs = layer_inputs("lstm", torch.float32)
    full = torch.full((B,), T)
    nearly_full = full.clone()
    nearly_full[0] = T - 1  # 1 of 35 rows padded, below 1/16
    assert ops.COMPACT_MIN_PADDING == 1 / 16
    for lengths in (None, full, nearly_full):
        n = T * B if lengths is None else int(lengths.sum())
        rows = saved_row_counts(lambda: run_layer("lstm", inputs, lengths=lengths))
        assert n not in rows or n == T * B


def test_compiled_op_with_lengths():
    """Under torch.compile (fullgraph, the op's autograd traced) nothing is compacted: no
    data-dependent sizes; outputs and gradients as eager's."""
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    args = (r(T, B, 4 * H), r(B, H), r(B, H), r(4 * H, H), r(4 * H))

    def f(gx, h0, c0, w_hh, b_hh):
        return ops.recurrence("lstm", gx, h0, c0, w_hh, b_hh, None, LENGTHS, False)

    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(*args)
    for a, e in zip(compiled, eager):
        assert_close(a, e, torch.float32)
    for a, e in zip(grads_of(compiled, args), grads_of(eager, args)):
        assert_close(a, e, torch.float32)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_gradcheck_float64_compacted(cell, compaction):
    """The analytic backward on restored (compacted) saved tensors, float64 gradcheck."""
    compaction(True)
    g = torch.Generator().manual_seed(5)
    G = GATES[cell]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    lengths = torch.tensor([3, 1, 2])
    args = (r(3, 3, G * 2), r(3, 2), r(3, 2) if cell == "lstm" else None, r(G * 2, 2), r(G * 2))
    leaves = [a for a in args if a is not None]

    def f(*ts):
        it = iter(ts)
        full = [next(it) if a is not None else None for a in args]
        return tuple(o for o in ops.recurrence(cell, *full, None, lengths, False) if o is not None)

    assert 6 in saved_row_counts(lambda: f(*leaves))  # 6 of 9 rows valid: compacted
    assert torch.autograd.gradcheck(f, leaves)
