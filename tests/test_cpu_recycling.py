"""The CPU ops' large tensors come from a recycling allocator (csrc/cpu/recycling_allocator.h).

y, gates, cells, gx and d gx of the CPU recurrence ops take their memory from a pool of blocks freed
by earlier calls (blocks of >= 1 MB), so a training loop does not page-fault them in every step.
Checked: outputs and gradients bitwise equal with the pool on and off (FUSED_RNN_CPU_RECYCLE=0) and
on repeated steps that reuse the blocks; the blocks do return to the pool and are taken again; the
tensors behave as any CPU tensor (resize, share_memory_, save/load, freed on another thread); the
pool is untouched when it is off; torch.profiler's memory view sees the blocks handed out and taken
back, which the benchmark's peak memory of a training call (benchmarks.cpu_targets.peak_bytes) and the
GRU backward's one-column dG_h are checked with.
"""
import io
import threading

import pytest
import torch

import fused_rnn
from fused_rnn.ops.cpp import ops

from benchmarks.cpu_targets import peak_bytes, profiled_allocations, saved_bytes
from helpers import grads_of

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))

ENV = "FUSED_RNN_CPU_RECYCLE"
T, B, H = 128, 64, 64  # y, gx, d gx [T, B, H] of an RNN: 1 MB in bf16, the pool's minimum


def _C():
    from fused_rnn import _C
    return _C


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    _C().cpu_recycle_release()
    yield
    _C().cpu_recycle_release()


def training_step(mode, dtype=torch.float32, seed=0, **kw):
    """Outputs and every gradient of one forward + backward of a cpu layer."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = getattr(fused_rnn, mode)(H, H, backend="cpu", dtype=dtype, **kw)
    x = torch.randn(T, B, H, generator=g).to(dtype).requires_grad_()
    out, hidden = m(x)
    outs = [out] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    return [o.detach() for o in outs] + list(grads_of(outs, [x, *m.parameters()]))


@pytest.mark.parametrize("mode,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("LSTM", {"proj_size": 16}),
                                     ("LSTM", {"num_layers": 2, "bidirectional": True})],
                         ids=["lstm", "gru", "rnn", "lstm-proj", "lstm-2l-bidir"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_results_bitwise_equal_with_and_without_the_pool(mode, kw, dtype, monkeypatch):
    monkeypatch.setenv(ENV, "0")
    expected = training_step(mode, dtype, **kw)
    assert _C().cpu_recycle_pool() == (0, 0)  # off: nothing goes to the pool
    monkeypatch.delenv(ENV)
    first = training_step(mode, dtype, **kw)  # fresh blocks, returned to the pool as they die
    blocks, nbytes = _C().cpu_recycle_pool()
    assert blocks > 0 and nbytes >= 1 << 20
    second = training_step(mode, dtype, **kw)  # the pool's blocks again
    for run in (first, second):
        for a, e in zip(run, expected):
            assert torch.equal(a, e)


def test_blocks_are_taken_again():
    """A repeated step takes its blocks from the pool instead of new memory: the pool does not grow."""
    training_step("LSTM")
    after_one = _C().cpu_recycle_pool()
    for _ in range(3):
        training_step("LSTM")
    assert _C().cpu_recycle_pool() == after_one


def test_live_tensors_are_not_handed_out_twice():
    """Outputs kept alive keep their blocks: a second call's outputs are other memory."""
    op = torch.ops.fused_rnn.recurrence_forward
    gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    w_hh, b_hh = torch.randn(4 * H, H) * 0.1, torch.randn(4 * H)
    a = op("lstm", gx, h0, c0, w_hh, b_hh, None, None, False, True)
    b = op("lstm", gx, h0, c0, w_hh, b_hh, None, None, False, True)
    ptrs = [t.data_ptr() for t in (*a, *b) if t.numel() * t.element_size() >= 1 << 20]
    assert len(ptrs) == len(set(ptrs)) and len(ptrs) >= 2
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_outputs_are_ordinary_cpu_tensors():
    op = torch.ops.fused_rnn.recurrence_forward
    gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    w_hh = torch.randn(4 * H, H) * 0.1
    y, _, _, gates, _, _ = op("lstm", gx, h0, c0, w_hh, None, None, None, False, True)
    kept = gates.clone()
    buf = io.BytesIO()
    torch.save(gates, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), kept)
    shared = gates.share_memory_()
    assert shared.is_shared() and torch.equal(shared, kept)
    grown = y.clone().resize_(2 * T, B, H)  # a clone is torch's; resize our own output too
    assert grown.shape == (2 * T, B, H)
    y.resize_(2 * T, B, H)
    y.fill_(1.0)
    assert y.sum().item() == 2 * T * B * H


def test_blocks_freed_on_another_thread_return_to_the_pool():
    op = torch.ops.fused_rnn.recurrence_forward
    gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    holder = [op("lstm", gx, h0, c0, torch.randn(4 * H, H) * 0.1, None, None, None, False, True)]
    before = _C().cpu_recycle_pool()[0]
    worker = threading.Thread(target=holder.clear)  # the outputs die on the worker thread
    worker.start()
    worker.join()
    assert _C().cpu_recycle_pool()[0] > before


@pytest.mark.parametrize("recycle", ["1", "0"], ids=["pool", "no-pool"])
def test_op_memory_is_reported_to_the_profiler(recycle, monkeypatch):
    """torch.profiler's memory view sees the ops' large tensors, whether their block is new, taken
    from the pool, or (pool off) torch's: allocated when the op makes them, freed when they die."""
    monkeypatch.setenv(ENV, recycle)
    op = torch.ops.fused_rnn.recurrence_forward
    gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    w_hh = torch.randn(4 * H, H) * 0.1
    op("lstm", gx, h0, c0, w_hh, None, None, None, False, True)  # its blocks die into the pool
    if recycle == "1":
        assert _C().cpu_recycle_pool()[0] >= 3
    kept = {}

    def call():
        outs = op("lstm", gx, h0, c0, w_hh, None, None, None, False, True)
        sizes = ((t.data_ptr(), t.numel() * t.element_size()) for t in outs)
        kept.update((ptr, nbytes) for ptr, nbytes in sizes if nbytes >= 1 << 20)
        del outs

    events = profiled_allocations(call)
    assert len(kept) == 3  # y, gates, cells
    for ptr, nbytes in kept.items():
        allocated = [size for p, size in events if p == ptr and size > 0]
        freed = [size for p, size in events if p == ptr and size < 0]
        assert len(allocated) == 1 and allocated[0] >= nbytes, (ptr, events)
        assert freed == [-allocated[0]], (ptr, events)


def test_training_peak_counts_the_ops_tensors():
    """The benchmark's peak memory of a training call (benchmarks.cpu_targets.peak_bytes) is at least
    what the call saves for its backward, with the blocks from the pool."""
    m = fused_rnn.LSTM(H, H, backend="cpu")
    x = torch.randn(T, B, H, requires_grad=True)
    m(x)[0].sum().backward()  # the pool now holds this step's blocks
    assert _C().cpu_recycle_pool()[0] > 0
    for p in (*m.parameters(), x):
        p.grad = None
    saved = saved_bytes(lambda: m(x)[0], list(m.parameters()))
    peak = peak_bytes(lambda: m(x)[0].sum().backward())
    assert saved >= 3 * T * B * H * 4  # y, gates (4 H), cells at least
    assert peak >= saved


def test_peak_bytes_follows_allocations_and_frees():
    mb = 1 << 20

    def f():
        a = torch.empty(4 * mb, dtype=torch.uint8)
        b = torch.empty(4 * mb, dtype=torch.uint8)
        del a
        c = torch.empty(2 * mb, dtype=torch.uint8)
        del b, c

    assert 8 * mb <= peak_bytes(f) < 9 * mb


def test_gru_training_peak_keeps_one_column_of_d_gh():
    """The GRU's fused backward keeps only the n gate's column of dG_h for all steps (its r and z
    columns are dgx's; csrc/recurrence.cpp): a training call's peak is the saved gates (4 H) and y
    with dgx (3 H) and that column, 9 of [T, B, H], where a whole dG_h would make 11."""
    m = fused_rnn.GRU(H, H, backend="cpu")
    x = torch.randn(T, B, H, requires_grad=True)
    dy = torch.randn(T, B, H)  # made before: y.sum()'s expanded ones would be made contiguous inside
    m(x)[0].backward(dy)
    for p in (*m.parameters(), x):
        p.grad = None
    unit = T * B * H * 4
    peak = peak_bytes(lambda: m(x)[0].backward(dy))
    assert 8.5 * unit < peak < 10 * unit, peak / unit
