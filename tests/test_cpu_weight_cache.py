"""The fused CPU forward's packed-weight cache (csrc/cpu/packed_weight_cache.h).

A repeated call with unchanged weights reuses the panel packed by an earlier call; any change of the
weight's bytes — an optimizer-like in-place update, a write through `.data` (which the version
counter does not see), load_state_dict, another tensor at the same address — must give the result
of a fresh pack. Every output is compared bitwise with the same call with the cache off
(FUSED_RNN_CPU_WEIGHT_CACHE=0: the same kernel on a freshly packed panel), and with torch.nn where a
module runs; the counters (_C.cpu_weight_cache_stats) show hits and misses where they must happen.
"""
import contextlib
import os
import threading

import pytest
import torch

import fused_rnn
from fused_rnn.ops.cpp import ops

from helpers import assert_close, run_with_cpu_isa, torch_nn_under_autocast
from test_cpu_fused import GATES, fused_kernel, threads  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))

ENV = "FUSED_RNN_CPU_WEIGHT_CACHE"


def _C():
    from fused_rnn import _C
    return _C


def stats():
    """(hits, misses, entries, bytes)."""
    return _C().cpu_weight_cache_stats()


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)  # the default: on
    # the counts below are of w_hh's panel (fp32 on an AMD CPU projects inside by default: w_ih's too)
    monkeypatch.setenv("FUSED_RNN_CPU_PROJECTION", "outside")
    _C().cpu_weight_cache_clear()
    yield
    _C().cpu_weight_cache_clear()


@contextlib.contextmanager
def cache_off():
    old = os.environ.get(ENV)
    os.environ[ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = old


def make_inputs(cell, T, B, H, dtype=torch.float32, seed=0):
    """gx, h0, c0, w_hh, b_hh: random, never zeros."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    return [r(T, B, G * H), r(B, H), r(B, H) if cell == "lstm" else None, r(G * H, H, s=1.0 / H**0.5), r(G * H)]


def forward(cell, gx, h0, c0, w_hh, b_hh, save=False):
    """y, h_n (and c_n for LSTM) of torch.ops.fused_rnn.recurrence_forward."""
    y, h_n, c_n, *_ = torch.ops.fused_rnn.recurrence_forward(cell, gx, h0, c0, w_hh, b_hh, None, None, False, save)
    return [y, h_n] + ([c_n] if cell == "lstm" else [])


def assert_bitwise(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: output {i}"
        assert torch.equal(a, b), f"{what}: output {i} differs from the uncached call by {(a - b).abs().max()}"


def check_against_uncached(fn, what):
    """fn() with the cache on must equal, bit for bit, fn() with it off; returns the outputs."""
    got = fn()
    with cache_off():
        want = fn()
    assert_bitwise(got, want, what)
    return got


def delta(before):
    return tuple(a - b for a, b in zip(stats()[:2], before[:2]))


@pytest.mark.parametrize("H", [1, 3, 37, 133])
@pytest.mark.parametrize("cell", list(GATES))
def test_repeated_call_hits_and_equals_uncached(cell, H, threads):
    args = make_inputs(cell, T=4, B=3, H=H)
    s0 = stats()
    first = check_against_uncached(lambda: forward(cell, *args), f"{cell} H={H} first")
    assert delta(s0) == (0, 1), "the first call packs (one miss)"
    s1 = stats()
    for n in range(3):
        check_against_uncached(lambda: forward(cell, *args), f"{cell} H={H} repeat {n}")
    assert delta(s1) == (3, 0), "repeated calls with unchanged weights reuse the panel"
    assert stats()[2] == 1
    assert_bitwise(forward(cell, *args), first, "repeat")


@pytest.mark.parametrize("cell", list(GATES))
def test_panel_packed_at_one_thread_count_used_at_another(cell):
    """The panel's layout does not depend on how the units were split over threads."""
    args = make_inputs(cell, T=3, B=2, H=133)
    old = torch.get_num_threads()
    try:
        for n_pack, n_use in ((1, 3), (3, 2), (2, 1)):
            _C().cpu_weight_cache_clear()
            torch.set_num_threads(n_pack)
            forward(cell, *args)
            torch.set_num_threads(n_use)
            s = stats()
            check_against_uncached(lambda: forward(cell, *args), f"{cell} packed at {n_pack}, used at {n_use}")
            assert delta(s) == (1, 0)
    finally:
        torch.set_num_threads(old)


def lstm_pair(H=37, I=11, seed=0, **kw):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(I, H, **kw)
    m = fused_rnn.LSTM(I, H, backend="cpu", **kw)
    m.load_state_dict(ref.state_dict())
    return m, ref


def check_module(m, ref, x, what):
    """The module with the cache on equals itself with the cache off bitwise, and torch.nn closely."""
    with torch.no_grad():
        y, h, c = check_against_uncached(lambda: [m(x)[0], *m(x)[1]], what)
        y_ref, (h_ref, c_ref) = ref(x)
    for a, b, name in ((y, y_ref, "y"), (h, h_ref, "h_n"), (c, c_ref, "c_n")):
        assert_close(a, b, torch.float32, f"{what}: {name}")


def test_inplace_update_invalidates(threads):
    """An optimizer-like in-place step on w_hh (bumps its version counter): a miss, then the new result."""
    m, ref = lstm_pair()
    x = torch.randn(5, 3, 11)
    check_module(m, ref, x, "before")
    s = stats()
    check_module(m, ref, x, "repeat")
    assert delta(s)[0] > 0 and delta(s)[1] == 0
    for step in range(3):
        with torch.no_grad():
            upd = torch.randn_like(m.weight_hh_l0) * 0.1
            m.weight_hh_l0.add_(upd)
            ref.weight_hh_l0.add_(upd)
        s = stats()
        check_module(m, ref, x, f"after update {step}")
        assert delta(s)[1] >= 1, "the update must repack"


def test_write_through_data_is_seen(threads):
    """A write through .data leaves the version counter unchanged: only the byte comparison sees it."""
    m, ref = lstm_pair()
    x = torch.randn(4, 2, 11)
    check_module(m, ref, x, "before")
    version = m.weight_hh_l0._version
    m.weight_hh_l0.data[3, 5] += 0.5  # one value
    ref.weight_hh_l0.data[3, 5] += 0.5
    assert m.weight_hh_l0._version == version
    check_module(m, ref, x, "after one value changed through .data")
    m.weight_hh_l0.data.mul_(0.5)
    ref.weight_hh_l0.data.mul_(0.5)
    check_module(m, ref, x, "after all values changed through .data")


def test_load_state_dict_invalidates(threads):
    m, ref = lstm_pair()
    x = torch.randn(4, 2, 11)
    check_module(m, ref, x, "before")
    other = torch.nn.LSTM(11, 37)
    m.load_state_dict(other.state_dict())
    check_module(m, other, x, "after load_state_dict")


def test_other_tensor_at_the_same_address():
    """A new tensor over the same memory (its own version counter, 0) with other values, and a freed
    weight's address taken by a new one: the result of the new values."""
    cell = "lstm"
    gx, h0, c0, w, b = make_inputs(cell, T=4, B=2, H=37)
    w1 = w.clone()
    w2 = torch.empty(0).set_(w1.untyped_storage(), 0, w1.shape, w1.stride())
    assert w2.data_ptr() == w1.data_ptr()
    while w1._version < w2._version:
        w1.add_(0.0)  # the same values, one version more
    assert w1._version == w2._version
    forward(cell, gx, h0, c0, w1, b)
    w2.data.copy_(torch.randn_like(w2) / 37**0.5)  # w2's version stays equal to the entry's
    assert w2._version == w1._version
    check_against_uncached(lambda: forward(cell, gx, h0, c0, w2, b), "same address, new values, same version")
    for seed in range(4):  # freed and allocated again, usually at the same address
        del w1, w2
        w1 = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) / 37**0.5
        w2 = w1
        check_against_uncached(lambda: forward(cell, gx, h0, c0, w1, b), f"new weight {seed}")


def test_inference_mode(threads):
    """Parameters called under inference_mode, and inference tensors (no version counter) as weights,
    updated in place inside inference_mode."""
    m, ref = lstm_pair()
    x = torch.randn(4, 2, 11)
    with torch.inference_mode():
        y1 = check_against_uncached(lambda: [m(x)[0]], "inference_mode")[0]
        s = stats()
        y2 = m(x)[0]
        assert delta(s) == (1, 0)
        assert torch.equal(y1, y2)
        assert_close(y1, ref(x)[0], torch.float32, "inference_mode vs torch.nn")
        cell = "gru"
        args = make_inputs(cell, T=4, B=2, H=37)
        args = [a.clone() for a in args if a is not None]
        gx, h0, w, b = args
        assert w.is_inference()
        check_against_uncached(lambda: forward(cell, gx, h0, None, w, b), "inference tensors")
        s = stats()
        check_against_uncached(lambda: forward(cell, gx, h0, None, w, b), "inference tensors, repeated")
        assert delta(s)[0] == 1
        w.mul_(0.75)
        s = stats()
        check_against_uncached(lambda: forward(cell, gx, h0, None, w, b), "inference tensor updated in place")
        assert delta(s)[1] == 1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bfloat16_and_autocast(cell, threads):
    """bf16 weights (an fp32 panel converted from them), and autocast, which casts the weights to a
    fresh bf16 tensor on every call."""
    args = make_inputs(cell, T=4, B=3, H=37, dtype=torch.bfloat16)
    check_against_uncached(lambda: forward(cell, *args), "bf16")
    s = stats()
    check_against_uncached(lambda: forward(cell, *args), "bf16 repeated")
    assert delta(s)[0] == 1
    args[3].add_(torch.randn_like(args[3]) * 0.1)
    check_against_uncached(lambda: forward(cell, *args), "bf16 after an update")

    cls, ref_cls = (fused_rnn.LSTM, torch.nn.LSTM) if cell == "lstm" else (fused_rnn.GRU, torch.nn.GRU)
    torch.manual_seed(3)
    ref = ref_cls(11, 37)
    m = cls(11, 37, backend="cpu")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 11)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for n in range(3):
            y = check_against_uncached(lambda: [m(x)[0]], f"autocast {n}")[0]
            assert y.dtype == torch_nn_under_autocast(ref, x)[0].dtype  # LSTM in bf16 as torch.nn's, GRU fp32
    with torch.no_grad():  # outside autocast: torch.nn's autocast keeps its casts of the weights until it exits
        m.weight_hh_l0.mul_(0.5)
        ref.weight_hh_l0.mul_(0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = check_against_uncached(lambda: [m(x)[0]], "autocast after an update")[0]
        assert_close(y, torch_nn_under_autocast(ref, x)[0], torch.bfloat16, "autocast vs torch.nn")


@pytest.mark.parametrize("module", ["gru", "rnn_tanh", "rnn_relu"])
def test_gru_and_rnn_modules(module, threads):
    torch.manual_seed(0)
    if module == "gru":
        ref, m = torch.nn.GRU(11, 37), fused_rnn.GRU(11, 37, backend="cpu")
    else:
        nl = module.split("_")[1]
        ref, m = torch.nn.RNN(11, 37, nonlinearity=nl), fused_rnn.RNN(11, 37, nonlinearity=nl, backend="cpu")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 11)
    for step in range(3):
        with torch.no_grad():
            y = check_against_uncached(lambda: [m(x)[0]], f"{module} step {step}")[0]
            assert_close(y, ref(x)[0], torch.float32, f"{module} step {step} vs torch.nn")
            if step == 1:
                m.weight_hh_l0.data.mul_(0.9)  # unseen by the version counter
                ref.weight_hh_l0.data.mul_(0.9)
            else:
                m.weight_hh_l0.add_(0.01)
                ref.weight_hh_l0.add_(0.01)


def test_training_forward_uses_the_cache_and_grads_match(threads):
    """save=True calls (training) use the cache too; gradients as torch.nn's, outputs as uncached."""
    m, ref = lstm_pair()
    x = torch.randn(5, 3, 11)
    s = stats()
    for n in range(2):
        y = check_against_uncached(lambda: [m(x)[0]], f"training forward {n}")[0]
    assert delta(s)[0] >= 1
    y = m(x)[0]
    y_ref = ref(x)[0]
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), list(m.parameters()))
    grads_ref = torch.autograd.grad((y_ref * g).sum(), list(ref.parameters()))
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, torch.float32, "training grads")


@pytest.mark.parametrize("cell", list(GATES))
def test_input_projection_inside(cell, threads, monkeypatch):
    """recurrence_forward_projected with the projection inside the loop packs w_ih too: both panels
    cached, an in-place update of either (or a .data write) repacks it."""
    monkeypatch.setenv("FUSED_RNN_CPU_PROJECTION", "inside")
    gx, h0, c0, w_hh, b_hh = make_inputs(cell, T=5, B=3, H=37)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, 13, generator=g)
    w_ih = torch.randn(w_hh.shape[0], 13, generator=g) / 13**0.5
    b_ih = torch.randn(w_hh.shape[0], generator=g)

    def run():
        y, h_n, c_n, *_ = torch.ops.fused_rnn.recurrence_forward_projected(
            cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, None, None, False, False)
        return [y, h_n] + ([c_n] if cell == "lstm" else [])

    check_against_uncached(run, "first")
    assert stats()[2] == 2, "w_hh's and w_ih's panels"
    s = stats()
    check_against_uncached(run, "repeat")
    assert delta(s) == (2, 0)
    w_ih.add_(0.05)
    s = stats()
    check_against_uncached(run, "w_ih updated")
    assert delta(s) == (1, 1)
    w_ih.data.mul_(0.5)
    check_against_uncached(run, "w_ih written through .data")
    w_hh.data[0, 0] += 1.0
    check_against_uncached(run, "w_hh written through .data")


def test_eviction_past_the_entry_limit_stays_correct():
    """More distinct weights than entries (8), cycled: entries stay bounded, every result correct."""
    cell = "lstm"
    layers = [make_inputs(cell, T=3, B=2, H=37, seed=s) for s in range(11)]
    with cache_off():
        want = [forward(cell, *a) for a in layers]
    for rnd in range(3):
        for i, a in enumerate(layers):
            assert_bitwise(forward(cell, *a), want[i], f"round {rnd} layer {i}")
            assert stats()[2] <= 8
    assert stats()[2] == 8
    # the most recent eight still hit; the oldest was evicted
    s = stats()
    forward(cell, *layers[-1])
    assert delta(s) == (1, 0)
    s = stats()
    forward(cell, *layers[0])
    assert delta(s) == (0, 1)


def test_concurrent_calls_from_two_threads():
    """Two Python threads call the op at once with different weights (and update them in place):
    every result is the uncached one."""
    cell = "lstm"
    per_thread = [make_inputs(cell, T=6, B=3, H=133, seed=s) for s in range(2)]
    updates = 4
    want = []
    with cache_off():
        for args in per_thread:
            args = [a.clone() if a is not None else None for a in args]
            outs = []
            for u in range(updates):
                outs.append(forward(cell, *args))
                args[3].mul_(0.9)
            want.append(outs)
    errors = []

    def work(i):
        args = [a.clone() if a is not None else None for a in per_thread[i]]
        try:
            for u in range(updates):
                for rep in range(5):
                    got = forward(cell, *args)
                    for a, b in zip(got, want[i][u]):
                        if not torch.equal(a, b):
                            errors.append(f"thread {i} update {u} repeat {rep}")
                args[3].mul_(0.9)
        except Exception as e:  # reported below, not swallowed
            errors.append(f"thread {i}: {e!r}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    assert stats()[0] > 0


def test_env_var_off_keeps_nothing(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    args = make_inputs("lstm", T=3, B=2, H=37)
    for _ in range(3):
        forward("lstm", *args)
    assert stats() == (0, 0, 0, 0)


def test_stats_count_bytes_and_clear():
    cell = "lstm"
    args = make_inputs(cell, T=3, B=2, H=37)
    forward(cell, *args)
    hits, misses, entries, nbytes = stats()
    weight_bytes = 4 * 37 * 37 * 4
    assert (hits, misses, entries) == (0, 1, 1)
    assert nbytes >= 2 * weight_bytes, "the panel and the copy of the weight"
    _C().cpu_weight_cache_clear()
    assert stats() == (0, 0, 0, 0)


_ISA_SCRIPT = """
import os
import torch
from fused_rnn.ops.cpp import ops
assert ops.load_error() is None, ops.load_error()
from fused_rnn import _C

os.environ["FUSED_RNN_CPU_KERNEL"] = "fused"  # at any T (by default from 4 steps)

def run(cell, args, cache):
    os.environ["FUSED_RNN_CPU_WEIGHT_CACHE"] = "1" if cache else "0"
    y, h, c, *_ = torch.ops.fused_rnn.recurrence_forward(cell, *args, None, None, False, False)
    return [y, h, c]

G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
for cell in G:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        H = 37
        r = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)
        args = [r(4, 3, G[cell] * H), r(3, H), r(3, H) if cell == "lstm" else None, r(G[cell] * H, H) * 0.2,
                r(G[cell] * H)]
        _C.cpu_weight_cache_clear()
        for change in (None, None, "add_", "data"):
            if change == "add_":
                args[3].add_(0.01)
            elif change == "data":
                args[3].data.mul_(0.5)
            got, want = run(cell, args, True), run(cell, args, False)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (cell, dtype, change)
        hits, misses, entries, _ = _C.cpu_weight_cache_stats()
        assert (hits, misses, entries) == (1, 3, 1), (cell, dtype, hits, misses, entries)
print("ok")
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_instruction_set(isa):
    """The panel's lanes differ per instruction-set build (chosen once per process): each build's
    cache hits on a repeat and repacks after an update, bitwise as its uncached call."""
    run_with_cpu_isa(isa, _ISA_SCRIPT)
