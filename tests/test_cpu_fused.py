"""The fused CPU recurrence (csrc/cpu/fused_cpu_kernels.h): one parallel region for all steps, each
thread's packed slice of w_hh, one barrier per step.

Against the float64 reference and torch.nn on every output and gradient, float64 gradcheck, odd
sizes (a partial vector block, fewer blocks than threads), lengths and reverse, thread counts 1, 2
and 3 (a barrier bug shows with an odd count), bitwise-repeatable runs, 16-bit inputs, and the
per-step kernels on the same inputs. Memory the op allocates in C++ is NaN-filled (torch's
fill_uninitialized_memory), as are torch.empty* tensors (tests/conftest.py).
"""
import itertools

import pytest
import torch

import fused_rnn
from fused_rnn import reference
from fused_rnn.ops.cpp import cpu_backend, ops

from helpers import assert_close, grads_of, reference_like_kernel

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CELLS = tuple(GATES)


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fused_kernel(monkeypatch):
    # forced: by default layers of fewer steps than csrc/recurrence.cpp's kFusedForwardMinSteps /
    # kFusedBackwardMinSteps (4 / 16) run the per-step kernels (test_default_route_by_steps)
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "fused")


def make_inputs(cell, T, B, H, dtype=torch.float64, lengths=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).requires_grad_()

    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[B // 2] = T
    return [r(T, B, G * H), r(B, H), r(B, H) if cell == "lstm" else None, r(G * H, H, s=1.0 / max(H, 1) ** 0.5),
            r(G * H) if bias else None, None, lens]


def outputs_and_grads(fn, cell, args, reverse):
    outs = fn(cell, *args, reverse)
    ins = [a for a in args[:-1] if a is not None]
    return [o for o in outs if o is not None] + list(grads_of(outs, ins))


# (H, B). (133, 13): more rows than one microkernel call takes (6 or 8) plus a remainder, and K
# (H forward, G*H backward) longer than one K chunk of the GEMM, so partial sums are re-read.
SIZES = [(1, 1), (3, 3), (37, 1), (37, 3), (133, 3), (133, 13)]


@pytest.mark.parametrize("H, B", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("cell", CELLS)
def test_fused_matches_reference_float64(cell, H, B, threads):
    for reverse, lengths in itertools.product((False, True), (False, True)):
        args = make_inputs(cell, T=5, B=B, H=H, lengths=lengths, bias=not (reverse and lengths))
        got = outputs_and_grads(cpu_backend.recurrence, cell, args, reverse)
        want = outputs_and_grads(reference.recurrence, cell, args, reverse)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, torch.float64, f"{cell} H={H} B={B} rev={reverse} len={lengths}: output/grad {i}")


@pytest.mark.parametrize("cell", CELLS)
def test_fused_gradcheck_float64(cell, threads):
    args = make_inputs(cell, T=4, B=3, H=19, lengths=True)
    lens = args[-1]
    n = sum(a is not None for a in args[:-1])

    def f(*xs):
        it = iter(xs)
        full = [next(it) if a is not None else None for a in args[:-1]]
        return [o for o in cpu_backend.recurrence(cell, *full, lens, True) if o is not None]

    assert torch.autograd.gradcheck(f, [a for a in args[:-1] if a is not None], eps=1e-6, atol=1e-7)
    assert n >= 3


@pytest.mark.parametrize("kernel", ["fused", "per-step"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64_without_h0_gradient(cell, kernel, monkeypatch):
    """h0 held constant (need_d_h0=False, the last dh_prev GEMM skipped): every other input's gradient
    still passes gradcheck, T=1 and T=4 with lengths and reverse."""
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", kernel)
    for T, lengths in ((1, False), (4, True)):
        args = make_inputs(cell, T=T, B=3, H=7, lengths=lengths)
        h0, lens = args[1].detach(), args[-1]
        rest = [a for i, a in enumerate(args[:-1]) if i != 1 and a is not None]

        def f(*xs):
            it = iter(xs)
            full = [h0 if i == 1 else next(it) if a is not None else None for i, a in enumerate(args[:-1])]
            return [o for o in cpu_backend.recurrence(cell, *full, lens, True) if o is not None]

        assert torch.autograd.gradcheck(f, rest, eps=1e-6, atol=1e-7)


MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_fused_module_matches_torch_nn(cell, dtype, threads):
    """fused_rnn.<Module>(backend='cpu') against torch.nn on every output and every gradient
    (input, h0, c0, every weight), a packed batch in both directions."""
    H, I, T, B = 37, 11, 6, 3
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    ref = getattr(torch.nn, MODULES[cell])(I, H, bidirectional=True, dtype=dtype, **kw)
    ours = getattr(fused_rnn, MODULES[cell])(I, H, bidirectional=True, dtype=dtype, backend="cpu", **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = torch.tensor([T, 2, 5])
    h0 = torch.randn(2, B, H, dtype=dtype)
    state = (h0, torch.randn(2, B, H, dtype=dtype)) if cell == "lstm" else h0
    results = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        st = tuple(s.clone().requires_grad_() for s in state) if cell == "lstm" else state.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, hn = m(packed, st)
        y = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
        hs = hn if cell == "lstm" else (hn,)
        sts = st if cell == "lstm" else (st,)
        results.append([y, *hs] + list(grads_of([y, *hs], [xi, *sts, *m.parameters()])))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, dtype, f"{cell} {dtype} output/grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_low_precision_against_reference(cell, dtype, threads):
    """16-bit and fp32 against the float64 reference on the same (rounded) inputs."""
    args = make_inputs(cell, T=7, B=3, H=40, lengths=True, dtype=dtype)
    args64 = [a.detach().double().requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
    got = outputs_and_grads(cpu_backend.recurrence, cell, args, True)
    want = outputs_and_grads(reference.recurrence, cell, args64, True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        assert_close(a, b, dtype, f"output/grad {i}")


# (H, B): a zero-padded tile operand in both dimensions (and an odd G*H for the GRU's backward), several
# unit blocks with a partial one, and whole 16 x 32 tiles that the kernels read in place.
BF16_SIZES = [(37, 3), (133, 13), (64, 32)]


@pytest.mark.parametrize("H, B", BF16_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("cell", CELLS)
def test_fused_bfloat16_against_reference(cell, H, B, threads):
    """bf16 on this CPU's best path (AMX tiles, AVX512_BF16 pairs, or fp32 FMAs on converted operands)
    against the float64 reference on the same rounded inputs (h rounded per step as the kernels carry
    it, helpers.reference_like_kernel): every output and gradient, lengths and reverse."""
    for reverse, lengths in ((False, True), (True, False)):
        args = make_inputs(cell, T=6, B=B, H=H, dtype=torch.bfloat16, lengths=lengths, seed=H + B)
        args64 = [a.detach().double().requires_grad_() if a is not None and a.is_floating_point() else a
                  for a in args]
        outs = cpu_backend.recurrence(cell, *args, reverse)
        want = reference_like_kernel(cell, [*args64, reverse], torch.bfloat16, outs)
        got = [o for o in outs if o is not None] + list(grads_of(outs, [a for a in args[:-1] if a is not None]))
        want = [w for w in want if w is not None] + list(grads_of(want, [a for a in args64[:-1] if a is not None]))
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == torch.bfloat16
            assert_close(a, b, torch.bfloat16, f"{cell} H={H} B={B} rev={reverse} len={lengths}: output/grad {i}")


_BF16_ISA_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from helpers import assert_close, grads_of, reference_like_kernel
from fused_rnn.ops.cpp import cpu_backend
torch.set_num_threads(3)
G = {{"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}}
for cell in G:
    for H, B in {sizes!r}:
        g = torch.Generator().manual_seed(H * B)
        r = lambda *s, k=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * k).to(torch.bfloat16)
        lens = torch.randint(1, 7, (B,), generator=g)
        lens[0] = 6
        ins = [r(6, B, G[cell] * H), r(B, H), r(B, H) if cell == "lstm" else None, r(G[cell] * H, H, k=H ** -0.5),
               r(G[cell] * H)]
        for rows, reverse in ((lens, False), (None, True)):
            xs, xs64 = ([a.to(dt).requires_grad_() if a is not None else None for a in ins]
                        for dt in (torch.bfloat16, torch.float64))
            outs = cpu_backend.recurrence(cell, *xs, None, rows, reverse)
            want = reference_like_kernel(cell, [*xs64, None, rows, reverse], torch.bfloat16, outs)
            results = [[o for o in os if o is not None] + list(grads_of(os, [x for x in inputs if x is not None]))
                       for os, inputs in ((outs, xs), (want, xs64))]
            for i, (a, b) in enumerate(zip(*results)):
                assert_close(a, b, torch.bfloat16, f"{{cell}} H={{H}} B={{B}} reverse={{reverse}}: output/grad {{i}}")
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx512_bf16", "amx_bf16"])
def test_fused_bfloat16_on_every_instruction_set(isa, monkeypatch):
    """bf16's fused recurrence as each instruction set this CPU has runs it (FUSED_RNN_CPU_ISA caps the
    choice, once per process): fp32 FMAs on converted operands (avx512), bf16 pairs (avx512_bf16), AMX
    tiles (amx_bf16), against the float64 reference on every output and gradient, 3 threads."""
    import os
    from helpers import run_with_cpu_isa
    tests = os.path.dirname(os.path.abspath(__file__))
    run_with_cpu_isa(isa, _BF16_ISA_SCRIPT.format(tests=tests, sizes=BF16_SIZES))


@pytest.mark.parametrize("cell", CELLS)
def test_fused_agrees_with_per_step_kernels(cell, monkeypatch):
    args = make_inputs(cell, T=6, B=5, H=33, lengths=True)
    fused = outputs_and_grads(cpu_backend.recurrence, cell, args, False)
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "per-step")
    per_step = outputs_and_grads(cpu_backend.recurrence, cell, args, False)
    for i, (a, b) in enumerate(zip(fused, per_step)):
        assert_close(a, b, torch.float64, f"output/grad {i}")


@pytest.mark.parametrize("kernel", ["fused", "per-step"])
@pytest.mark.parametrize("cell", CELLS)
def test_backward_without_d_h0_changes_no_other_gradient(cell, kernel, threads, monkeypatch):
    """need_d_h0=False (h0 needs no gradient: a layer called without hx) skips the last step's dh_prev
    GEMM, which gives d h0 alone: d_h0 comes back as [0] and every other output is bitwise the one
    need_d_h0=True gives. Forward and reverse, lengths (each row's first step elsewhere), T=1."""
    monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", kernel)
    for T, reverse, lengths in ((5, False, False), (5, True, True), (6, False, True), (1, False, False)):
        gx, h0, c0, w_hh, b_hh, _, lens = [a.detach() if torch.is_tensor(a) else a for a in
                                           make_inputs(cell, T, 3, 37, torch.float32, lengths=lengths)]
        y, h_n, c_n, gates, cells, proj_in = torch.ops.fused_rnn.recurrence_forward(
            cell, gx, h0, c0, w_hh, b_hh, None, lens, reverse, True)
        dy, dh_n = torch.randn_like(y), torch.randn_like(h_n)
        dc_n = torch.randn_like(c_n) if cell == "lstm" else None
        args = (cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh, None, lens, reverse)
        full = torch.ops.fused_rnn.recurrence_backward(*args, True)
        part = torch.ops.fused_rnn.recurrence_backward(*args, False)
        assert full[1].shape == h0.shape and part[1].shape == (0,)
        for i in (0, 2, 3, 4, 5):
            assert torch.equal(full[i], part[i]), f"output {i}, T={T} reverse={reverse} lengths={lengths}"


@pytest.mark.parametrize("T", [1, 3, 4, 15, 16, 17])
@pytest.mark.parametrize("cell", CELLS)
def test_default_route_by_steps(cell, T, monkeypatch):
    """Unforced, the forward runs fused from 4 steps and the backward from 16 (csrc/recurrence.cpp
    use_cpu_fused), so T = 4..15 takes the fused forward and the per-step backward: the same outputs
    and gradients as either kernel forced throughout, and as the float64 reference. That the route
    really changes with T is seen through the packed-weight cache, which only the fused forward fills."""
    from fused_rnn import _C
    args = make_inputs(cell, T=T, B=3, H=37, lengths=True)
    runs = {}
    for kernel in ("per-step", "fused", None):
        if kernel is None:
            monkeypatch.delenv("FUSED_RNN_CPU_KERNEL")
        else:
            monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", kernel)
        _C.cpu_weight_cache_clear()
        runs[kernel] = outputs_and_grads(cpu_backend.recurrence, cell, args, T % 2 == 1)
        runs[kernel, "cached"] = _C.cpu_weight_cache_stats()[2]
    assert runs["per-step", "cached"] == 0 and runs["fused", "cached"] == 1
    assert runs[None, "cached"] == (1 if T >= 4 else 0)
    want = outputs_and_grads(reference.recurrence, cell, args, T % 2 == 1)
    for i, (default, per_step, fused, ref) in enumerate(zip(runs[None], runs["per-step"], runs["fused"], want)):
        for other in (per_step, fused, ref):
            assert_close(default, other, torch.float64, f"T={T} output/grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_runs_are_bitwise_repeatable(cell, dtype, threads):
    args = make_inputs(cell, T=9, B=7, H=70, lengths=True, dtype=dtype)
    first = outputs_and_grads(cpu_backend.recurrence, cell, args, False)
    for _ in range(3):
        again = outputs_and_grads(cpu_backend.recurrence, cell, args, False)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_fused_no_grad_saves_nothing():
    args = [a.detach() if a is not None and a.is_floating_point() else a for a in make_inputs("lstm", 4, 2, 8)]
    with torch.no_grad():
        y, h_n, c_n, gates, cells, proj_in = torch.ops.fused_rnn.recurrence_forward("lstm", *args, False, False)
    assert gates.numel() == 0 and cells.numel() == 0 and torch.isfinite(y).all() and torch.isfinite(c_n).all()


def test_projection_runs_the_per_step_kernels_correctly():
    """proj_size routes to the per-step kernels; the results still match the reference."""
    g = torch.Generator().manual_seed(3)
    T, B, H, P = 5, 3, 9, 4
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    args = [r(T, B, 4 * H), r(B, P), r(B, H), r(4 * H, P), r(4 * H), r(P, H), torch.tensor([5, 2, 4])]
    got = outputs_and_grads(cpu_backend.recurrence, "lstm", args, True)
    want = outputs_and_grads(reference.recurrence, "lstm", args, True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, torch.float64, f"output/grad {i}")
