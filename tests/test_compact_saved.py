"""Packed batches: what the C++ ops save for the backward keeps only the rows of valid steps.

fused_rnn/ops/cpp/ops.py compacts the [T,B,...] tensors an op saves (y, gates, cells, proj_in,
ln_hat, ln_rstd, and the projected op's x) to their valid rows when lengths leave at least
COMPACT_MIN_PADDING of the rows as padding; an LSTM without projection saves no y then. The fused
CPU backward reads them in place (csrc/cpu/compact_rows.h) and returns d gx compact; the other paths
put them back (zeros in the padding). Checked here: every output and gradient against the run
without compaction (every cell, projection, zoneout, layer norm, reverse and stacked layers,
float32/float64/bfloat16, both ops: the projected one of the cpu layers and the plain one of
functional.recurrence; bitwise where the same sums are formed), the op's backward on compact
tensors on both paths, against the reference in float64, gradcheck, that the compaction happened
(saved tensors of n_valid rows) and what it saves, the peak memory of a packed training call, and
where compaction does not run.
"""
import pytest
import torch

import fused_rnn
from fused_rnn import functional, reference
from fused_rnn.ops.cpp import ops

from benchmarks.cpu_targets import peak_bytes, saved_bytes
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
    remade_y = remade_y_grads(cell, opts, len(inputs[3]))
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), i
        if a is not None:
            assert torch.isfinite(a).all(), i
            if i in remade_y:  # h_prev = o tanh(c) remade from the rounded o: within the dtype's rounding
                assert_close(a, e, dtype, f"gradient {i}")
            else:
                assert torch.equal(a, e), f"output/gradient {i} differs"


def remade_y_grads(cell, opts, n_weights):
    """Indices in run_layer's list of the d w_hh that a compacted LSTM without projection, zoneout or
    layer norm forms from y remade as o tanh(c) (fused_rnn/ops/cpp/ops.py); none otherwise."""
    if cell != "lstm" or {"proj", "zoneout", "layer_norm"} & set(opts):
        return set()
    first = 3 + 3  # output, h_n, c_n; then the grads of x, hx, cx
    return {first + k + 1 for k in range(0, n_weights, 4)}  # w_ih, w_hh, b_ih, b_hh per layer and direction


KERNELS = ["default", "fused"]  # the default route (T=7: the per-step backward), or the fused one forced


def use_kernel(kernel, monkeypatch):
    if kernel == "fused":
        monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "fused")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", [c for c in CASES if "zoneout" not in c[1]], ids=case_id)
def test_against_reference_float64(case, kernel, compaction, monkeypatch):
    use_kernel(kernel, monkeypatch)
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
    for i, (a, e) in enumerate(zip(run(), expected)):
        if cell == "lstm" and i == 6:  # d w_hh (after y, h_n, c_n, d gx, d h0, d c0): from y remade
            assert_close(a, e, torch.float64)
        else:
            assert torch.equal(a, e)
    ref = reference.recurrence(cell, *args, None, LENGTHS, reverse)
    for a, e in zip(run(), [o for o in ref if o is not None] + list(grads_of(ref, leaves))):
        assert_close(a, e, torch.float64)


def test_saved_bytes_shrink_by_the_padding(compaction):
    """One LSTM layer: gates and cells (5 H floats per row) and x (I) keep N_VALID of T*B rows, y (H)
    is not saved (the backward remakes it as o tanh(c)), and x's compaction keeps its index (int64
    [N_VALID], for a second-order backward through it)."""
    inputs = layer_inputs("lstm", torch.float32)
    compaction(False)
    full = saved_bytes(lambda: run_layer("lstm", inputs))
    compaction(True)
    compact = saved_bytes(lambda: run_layer("lstm", inputs))
    assert full - compact == (T * B * (6 * H + I) - N_VALID * (5 * H + I)) * 4 - N_VALID * 8


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_module_matches_torch_nn_and_saves_less(kernel, monkeypatch):
    """A packed batch through fused_rnn.LSTM (default threshold): torch.nn's outputs and gradients,
    and the saved tensors compacted."""
    use_kernel(kernel, monkeypatch)
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
    assert rows.count(N_VALID) >= 4 * 2  # gates, cells of each layer and direction (y is remade)


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


# ---- The fused CPU backward reads the compact layout in place (csrc/cpu/compact_rows.h) ----------
# Its d gx is compact too ([N, G*H]); d w_hh, d b_hh, d w_ih and d b_ih are sums over the N valid rows
# instead of all T*B, so they equal the padded run's within rounding (not bitwise); the other paths
# put the tensors back in place in C++ and equal the padded run bitwise.

def op_backward(cell, T_, lengths, reverse, H_=H, dtype=torch.float64, compact=True, seed=6):
    """recurrence_forward (save=True) then recurrence_backward on its saved tensors, compacted or
    not; random dy everywhere (the padded rows' values must not matter)."""
    g = torch.Generator().manual_seed(seed)
    B_, G = lengths.shape[0], GATES[cell]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    gx, h0, w_hh, b_hh = r(T_, B_, G * H_), r(B_, H_), r(G * H_, H_) / H_ ** 0.5, r(G * H_)
    c0 = r(B_, H_) if cell == "lstm" else None
    y, h_n, c_n, gates, cells, proj_in = torch.ops.fused_rnn.recurrence_forward(
        cell, gx, h0, c0, w_hh, b_hh, None, lengths, reverse, True)
    saved = [y, gates, cells, proj_in]
    if compact:
        saved = [ops._compact(t, ops._valid_rows(lengths, T_, B_)[0]) for t in saved]
    dy, dh_n = r(T_, B_, H_), r(B_, H_)
    dc_n = r(B_, H_) if cell == "lstm" else None
    return torch.ops.fused_rnn.recurrence_backward(cell, dy, dh_n, dc_n, *saved, h0, c0, w_hh, None, lengths,
                                                   reverse, True)


OP_SHAPES = [  # (T, lengths): unsorted with T = max length; T above every length (steps with no valid row); B = 1
    (7, LENGTHS), (9, torch.tensor([2, 7, 1])), (20, torch.tensor([13])), (18, torch.tensor([18, 3, 11, 1, 17, 9, 4]))]


@pytest.mark.parametrize("kernel", ["fused", "per-step"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: f"T{s[0]}-B{s[1].shape[0]}")
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", list(GATES))
def test_op_backward_on_compact_tensors(cell, reverse, shape, kernel, monkeypatch):
    """recurrence_backward given the compact [N, ...] y, gates, cells: the fused kernel returns d gx
    [N, G*H] (the padded run's valid rows), the per-step kernels the padded run's d gx bitwise;
    d h0, d c0, d w_hh, d b_hh as the padded run's (float64, H = 37: a partial vector block)."""
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", kernel)
    T_, lengths = shape
    valid = ops._valid_rows(lengths, T_, lengths.shape[0])[0]
    padded = op_backward(cell, T_, lengths, reverse, H_=37, compact=False)
    compact = op_backward(cell, T_, lengths, reverse, H_=37)
    d_gx, d_gx_padded = compact[0], padded[0]
    if kernel == "fused":
        assert d_gx.shape == (valid.numel(), d_gx_padded.shape[2])
        assert_close(d_gx, d_gx_padded.flatten(0, 1)[valid], torch.float64, "d gx")
    else:
        assert torch.equal(d_gx, d_gx_padded)
    for i, (a, e) in enumerate(zip(compact[1:], padded[1:])):
        assert_close(a, e, torch.float64, f"output {i + 1}")
        if kernel == "per-step":
            assert torch.equal(a, e), f"output {i + 1}"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in CASES if not {"proj", "zoneout", "layer_norm"} & set(c[1])],
                         ids=case_id)
def test_fused_backward_reads_compact_in_place(case, dtype, threads, compaction, monkeypatch):
    """Every layer output and gradient with the fused backward on compact saved tensors: as the
    uncompacted run's within the dtype's tolerance, finite, and bitwise the same run to run."""
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "fused")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cell, opts = case
        layer_opts, run_opts = split_options(opts)
        inputs = layer_inputs(cell, dtype, **layer_opts)
        compaction(False)
        expected = run_layer(cell, inputs, **run_opts)
        compaction(True)
        actual = run_layer(cell, inputs, **run_opts)
        again = run_layer(cell, inputs, **run_opts)
    finally:
        torch.set_num_threads(old)
    assert len(actual) == len(expected)
    for i, (a, e, b) in enumerate(zip(actual, expected, again)):
        assert_close(a, e, dtype, f"output/gradient {i}")
        assert torch.equal(a, b), f"output/gradient {i} not repeatable"


@pytest.mark.parametrize("kernel", ["fused", "per-step"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", list(GATES))
def test_gradcheck_float64_compacted(cell, reverse, kernel, compaction, monkeypatch):
    """The analytic backward on compact saved tensors, float64 gradcheck: the fused one reading them
    in place, the per-step one on them put back in place (T above every length)."""
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", kernel)
    compaction(True)
    g = torch.Generator().manual_seed(7)
    G = GATES[cell]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    lengths = torch.tensor([3, 1, 4])
    args = (r(5, 3, G * 3), r(3, 3), r(3, 3) if cell == "lstm" else None, r(G * 3, 3), r(G * 3))
    leaves = [a for a in args if a is not None]

    def f(*ts):
        it = iter(ts)
        full = [next(it) if a is not None else None for a in args]
        return tuple(o for o in ops.recurrence(cell, *full, None, lengths, reverse) if o is not None)

    assert 8 in saved_row_counts(lambda: f(*leaves))  # 8 of 15 rows valid: compacted
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_packed_training_peak_below_uncompacted(mode, compaction):
    """A packed batch's training call (fused backward: T >= 16): with the saved tensors compact the
    peak memory is below that of the same call without compaction. (When the backward put the
    compact tensors back in place first, it held both copies at once and its peak was above.)"""
    T_, B_, H_ = 40, 16, 64
    torch.manual_seed(8)
    m = getattr(fused_rnn, mode)(H_, H_, backend="cpu")
    x = torch.randn(T_, B_, H_, requires_grad=True)
    lengths = torch.randint(T_ // 2, T_ + 1, (B_,))
    lengths[0] = T_

    def call():
        return m(torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data

    dy = torch.randn_like(call().detach())
    peaks = {}
    for on in (False, True):
        compaction(on)
        call().backward(dy)  # the pool's blocks and the weight cache are in place before the measured call
        for p in (*m.parameters(), x):
            p.grad = None
        peaks[on] = peak_bytes(lambda: call().backward(dy))
    assert peaks[True] < peaks[False], peaks


@pytest.mark.parametrize("bad", [0, T + 1])
def test_op_backward_refuses_lengths_out_of_range_on_compact_tensors(bad):
    """The compact layout is addressed through lengths: one outside [1, T] is an error, not a read
    out of bounds."""
    g = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    gx, h0, w_hh = r(T, B, 3 * H), r(B, H), r(3 * H, H)
    y, _, _, gates, cells, proj_in = torch.ops.fused_rnn.recurrence_forward(
        "gru", gx, h0, None, w_hh, None, None, LENGTHS, False, True)
    saved = [ops._compact(t, ops._valid_rows(LENGTHS, T, B)[0]) for t in (y, gates, cells, proj_in)]
    lengths = LENGTHS.clone()
    lengths[2] = bad
    with pytest.raises(RuntimeError, match="lengths must"):
        torch.ops.fused_rnn.recurrence_backward("gru", r(T, B, H), r(B, H), None, *saved, h0, None, w_hh, None,
                                                lengths, False, True)
