"""LSTMCell / GRUCell / RNNCell on the fused cell-step op, fused_rnn::cell_step (csrc/cell_step.cpp):
every output and gradient against the reference and torch.nn, float64 gradcheck, opcheck of the
three ops, both forward paths (the dot kernels at small batch, GEMMs at larger batch), every CPU
instruction-set variant, unbatched input, hx=None, and fullgraph compile.

Memory the ops allocate in C++ is filled with NaN, and torch.empty* from Python too (both by
conftest.py's autouse fixtures), so an element a kernel forgets to write fails.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn import functional, reference
from fused_rnn.ops.cpp import cell_ops, ops

from helpers import assert_close, grads_of, run_with_cpu_isa

_err = ops.load_error() or (None if cell_ops.available() else "fused_rnn._C has no cell_step op: rebuild it")
if _err is not None and os.environ.get("FUSED_RNN_REQUIRE_EXT") == "1":
    raise RuntimeError(f"FUSED_RNN_REQUIRE_EXT=1 but {_err}")
pytestmark = pytest.mark.skipif(_err is not None, reason=str(_err))

# cell -> (torch.nn class, fused_rnn class, constructor keywords)
CELLS = {"lstm": (nn.LSTMCell, fused_rnn.LSTMCell, {}), "gru": (nn.GRUCell, fused_rnn.GRUCell, {}),
         "rnn_tanh": (nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "tanh"}),
         "rnn_relu": (nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "relu"})}
# B=1, 3, 8 run the dot kernels forward and the one-pass products backward, B=11 and 40 the GEMMs,
# except in fp32 on an Intel AVX-512 CPU, where the dots run to B=32 and the products to B=64 while
# the weights are small (there H=133 at B=40 runs the GEMMs both ways) (csrc/cpu/cell_step_cpu.cpp,
# cell_dots_pay and cell_products_pay)
BATCHES = (1, 3, 8, 11, 40)


def pair(cell, I, H, bias=True, dtype=torch.float64):
    """torch.nn's cell and ours with the same weights."""
    Theirs, Ours, kw = CELLS[cell]
    theirs = Theirs(I, H, bias=bias, dtype=dtype, **kw)
    ours = Ours(I, H, bias=bias, dtype=dtype, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def reference_step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step of fused_rnn/reference.py's cells: h' (, c')."""
    gx = x @ w_ih.t() + (0 if b_ih is None else b_ih)
    if cell == "lstm":
        return reference.lstm_cell(gx, h, c, w_hh, b_hh)
    if cell == "gru":
        return (reference.gru_cell(gx, h, w_hh, b_hh),)
    return (reference.rnn_cell(gx, h, w_hh, b_hh, "relu" if cell == "rnn_relu" else "tanh"),)


def random_inputs(cell, B, I, H, dtype, requires_grad=True):
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    return r(B, I), r(B, H), (r(B, H) if cell == "lstm" else None)


def as_tuple(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def module_step(module, cell, x, h, c):
    return as_tuple(module(x, (h, c) if cell == "lstm" else h))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("H", [1, 3, 37, 133])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_reference_and_torch_nn(cell, B, H, bias, dtype):
    """Every output and every gradient (input, h, c, both weights, both biases)."""
    I = H + 2
    theirs, ours = pair(cell, I, H, bias, dtype)
    x, h, c = random_inputs(cell, B, I, H, dtype)
    leaves = [t for t in (x, h, c) if t is not None]
    got = module_step(ours, cell, x, h, c)
    assert "CellStep" in got[0].grad_fn.name(), "the fused op must run"
    want_nn = module_step(theirs, cell, x, h, c)
    w = list(ours.parameters())
    want_ref = reference_step(cell, x, h, c, *w, *([None, None] if not bias else []))
    g_got = grads_of(got, leaves + list(ours.parameters()))
    g_nn = grads_of(want_nn, leaves + list(theirs.parameters()))
    g_ref = grads_of(want_ref, leaves + w)
    for i, (a, b, r) in enumerate(zip(got + g_got, want_nn + g_nn, want_ref + g_ref)):
        assert_close(a, b, dtype, f"output/grad {i} vs torch.nn")
        assert_close(a, r, dtype, f"output/grad {i} vs the reference")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_float32_at_the_batch_limits_of_the_cell_routes(cell, threads):
    """In fp32 on an Intel AVX-512 CPU the dot kernels run the forward up to B=16 (1 thread) or 32
    (the GRU's 12 or 24), twice that for weights of >= 1M values (cell_dots_pay), and the one-pass
    products the backward up to B=16 or 64 for small weights, 16 on two threads for mid-sized ones
    (cell_products_pay): each side of each limit, small, mid-sized and large weights, outputs and
    every gradient against torch.nn, whichever route this CPU takes."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for H in (37, 200, 512):
            theirs, ours = pair(cell, H, H, dtype=torch.float32)
            for B in (12, 13, 16, 17, 24, 25, 32, 33, 64, 65):
                x, h, c = random_inputs(cell, B, H, H, torch.float32)
                got = module_step(ours, cell, x, h, c)
                want = module_step(theirs, cell, x, h, c)
                leaves = [t for t in (x, h, c) if t is not None]
                for i, (a, b) in enumerate(zip(got + grads_of(got, leaves + list(ours.parameters())),
                                               want + grads_of(want, leaves + list(theirs.parameters())))):
                    assert_close(a, b, torch.float32, f"H={H} B={B} output/grad {i}")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_bfloat16_against_the_float64_reference(cell, B):
    """bf16 storage, fp32 accumulation: within bf16's tolerance of float64 on the same inputs."""
    I, H = 19, 37
    _, ours = pair(cell, I, H, dtype=torch.bfloat16)
    x, h, c = random_inputs(cell, B, I, H, torch.bfloat16)
    got = module_step(ours, cell, x, h, c)
    assert all(o.dtype == torch.bfloat16 for o in got)
    x64, h64, c64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, h, c))
    w64 = [p.detach().double().requires_grad_() for p in ours.parameters()]
    want = reference_step(cell, x64, h64, c64, *w64)
    leaves = [t for t in (x, h, c) if t is not None]
    leaves64 = [t for t in (x64, h64, c64) if t is not None]
    for i, (a, b) in enumerate(zip(got + grads_of(got, leaves + list(ours.parameters())),
                                   want + grads_of(want, leaves64 + w64))):
        assert_close(a, b, torch.bfloat16, f"output/grad {i}")


@pytest.mark.parametrize("B, I, H", [(2, 4, 3), (5, 19, 9), (10, 4, 3)])  # 19, 9: whole vectors and tails
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradcheck_float64(cell, bias, B, I, H):
    x, h, c = random_inputs(cell, B, I, H, torch.float64)
    G = fused_rnn.functional.GATES[cell]
    w_ih, w_hh = (torch.randn(G * H, n, dtype=torch.float64, requires_grad=True) for n in (I, H))
    b = [torch.randn(G * H, dtype=torch.float64, requires_grad=True) for _ in range(2)] if bias else [None, None]
    fn = lambda *a: tuple(o for o in functional.cell_step(cell, *a) if o is not None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, h, c, w_ih, w_hh, *b))


def op_args(cell, B=3, I=5, H=4, bias=True, requires_grad=True):
    x, h, c = random_inputs(cell, B, I, H, torch.float64, requires_grad)
    G = fused_rnn.functional.GATES[cell]
    r = lambda *s: torch.randn(*s, dtype=torch.float64).requires_grad_(requires_grad)  # noqa: E731
    return (cell, x, h, c, r(G * H, I), r(G * H, H), r(G * H) if bias else None, r(G * H) if bias else None)


@pytest.mark.parametrize("B", [3, 10])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_opcheck(cell, bias, B):
    for requires_grad in (True, False):
        args = op_args(cell, B=B, bias=bias, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.fused_rnn.cell_step.default, args)
    args = op_args(cell, B=B, bias=bias, requires_grad=False)
    for save in (True, False):
        torch.library.opcheck(torch.ops.fused_rnn.cell_step_forward.default, (*args, save))
    cell, x, h, c, w_ih, w_hh, _, _ = args
    h_new, c_new, gates = torch.ops.fused_rnn.cell_step_forward(*args, True)
    dc = torch.randn_like(c_new) if cell == "lstm" else None
    torch.library.opcheck(torch.ops.fused_rnn.cell_step_backward.default,
                          (cell, torch.randn_like(h_new), dc, x, h, c, w_ih, w_hh, h_new, c_new, gates))


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_and_no_hx_like_torch_nn(cell, batched, with_hx):
    theirs, ours = pair(cell, 6, 37, dtype=torch.float32)
    x = torch.randn(*((3,) if batched else ()), 6, requires_grad=True)
    hx, leaves = None, [x]
    if with_hx:
        hs = [torch.randn(*x.shape[:-1], 37, requires_grad=True) for _ in range(2 if cell == "lstm" else 1)]
        hx, leaves = (tuple(hs) if cell == "lstm" else hs[0]), leaves + hs
    got, want = as_tuple(ours(x, hx)), as_tuple(theirs(x, hx))
    for i, (a, b) in enumerate(zip(got + grads_of(got, leaves + list(ours.parameters())),
                                   want + grads_of(want, leaves + list(theirs.parameters())))):
        assert_close(a, b, torch.float32, f"output/grad {i}")


@pytest.mark.parametrize("cell", list(CELLS))
def test_weights_updated_in_place_are_read_again(cell):
    """Nothing derived from the weights outlives a call: an optimizer step shows in the next one."""
    theirs, ours = pair(cell, 5, 8, dtype=torch.float32)
    x, h, c = random_inputs(cell, 2, 5, 8, torch.float32, requires_grad=False)
    module_step(ours, cell, x, h, c)
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.mul_(0.5)
            b.mul_(0.5)
    for a, b in zip(module_step(ours, cell, x, h, c), module_step(theirs, cell, x, h, c)):
        assert_close(a, b, torch.float32)


def test_batch_of_zero():
    theirs, ours = pair("lstm", 3, 4, dtype=torch.float32)
    x = torch.randn(0, 3, requires_grad=True)
    h, c = ours(x, (torch.randn(0, 4), torch.randn(0, 4)))
    assert h.shape == c.shape == (0, 4)
    (h.sum() + c.sum()).backward()
    assert torch.equal(ours.weight_hh.grad, torch.zeros_like(ours.weight_hh))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_op_double_backward(cell, bias):
    """create_graph=True through the op recomputes the step in ATen ops (csrc/cell_step.cpp's
    differentiable_backward): float64 gradgradcheck of every input, biases included."""
    B, I, H = 3, 5, 4
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    x, h, c = random_inputs(cell, B, I, H, torch.float64)
    w = [torch.randn(G * H, n, dtype=torch.float64, requires_grad=True) for n in (I, H)]
    b = [torch.randn(G * H, dtype=torch.float64, requires_grad=True) for _ in range(2)] if bias else []

    def step(x, h, w_ih, w_hh, *rest):
        c_, (b_ih, b_hh) = (rest[0], rest[1:]) if cell == "lstm" else (None, rest)
        h_new, c_new = torch.ops.fused_rnn.cell_step(cell, x, h, c_, w_ih, w_hh, b_ih, b_hh)
        return (h_new, c_new) if cell == "lstm" else h_new

    inputs = [x, h, *w] + ([c] if cell == "lstm" else []) + (b if bias else [None, None])
    assert torch.autograd.gradgradcheck(step, inputs)


def test_hessian_vector_product_matches_torch_nn():
    theirs, ours = pair("lstm", 3, 4)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, dtype=torch.float64)
    hvp = []
    for module in (theirs, ours):
        (g,) = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
        hvp.append(torch.autograd.grad((g * v).sum(), x)[0])
    assert_close(hvp[1], hvp[0], torch.float64, "Hessian-vector product")


class Decoder(nn.Module):
    """A few steps of a cell feeding itself: the seq2seq decoder loop."""

    def __init__(self, cell):
        super().__init__()
        self.cell_name = cell
        self.cell = CELLS[cell][1](4, 6, **CELLS[cell][2])
        self.head = nn.Linear(6, 4)

    def forward(self, x, steps=3):
        state = None
        outs = []
        for _ in range(steps):
            state = self.cell(x, state)
            h = state[0] if self.cell_name == "lstm" else state
            x = self.head(h)
            outs.append(x)
        return torch.stack(outs)


@pytest.mark.parametrize("cell", list(CELLS))
def test_fullgraph_compile_matches_eager(cell):
    model = Decoder(cell)
    x = torch.randn(3, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), model(x)
    assert_close(got, want, torch.float32)
    for a, b in zip(torch.autograd.grad(got.square().sum(), list(model.parameters())),
                    torch.autograd.grad(want.square().sum(), list(model.parameters()))):
        assert_close(a, b, torch.float32)


_ISA_SCRIPT = """
import torch
from fused_rnn import functional
torch.manual_seed(0)
G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
for cell in G:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for B in (1, 3, 5, 8, 11):  # 5, 8: two batch blocks of the AVX2 products, one of AVX-512's
            I, H = 21, 37  # not multiples of any vector width: the tails run too
            r = lambda *s: (torch.randn(*s, dtype=torch.float64)).to(dtype)
            args = [r(B, I), r(B, H), r(B, H) if cell == "lstm" else None, r(G[cell] * H, I) * 0.3,
                    r(G[cell] * H, H) * 0.3, r(G[cell] * H), r(G[cell] * H)]
            args64 = [a if a is None else a.double().requires_grad_() for a in args]
            args = [a if a is None else a.requires_grad_() for a in args]
            got = [o for o in functional.cell_step(cell, *args) if o is not None]
            want = [o for o in functional.cell_step(cell, *args64, backend="reference") if o is not None]
            dys = [r(*o.shape) for o in got]  # the same upstream gradients for both
            got += torch.autograd.grad(got, [a for a in args if a is not None], [d.to(dtype) for d in dys])
            want += torch.autograd.grad(want, [a for a in args64 if a is not None], [d.double() for d in dys])
            tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
            for i, (a, b) in enumerate(zip(got, want)):
                err = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
                assert err <= tol, (cell, dtype, B, i, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_instruction_set(isa):
    """The cell kernels are built for baseline x86-64, AVX2 and AVX-512 and chosen at run time
    (FUSED_RNN_CPU_ISA caps the choice): run each variant this machine has against the reference,
    outputs and every gradient."""
    run_with_cpu_isa(isa, _ISA_SCRIPT)


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("cell", list(CELLS))
def test_small_batch_backward_same_bits_on_1_2_3_threads(cell, B):
    """At small batch the backward op's products split the weights' columns over threads, and every
    element is summed in the same order whatever the split: the same bits on any thread count."""
    I, H = 45, 133
    args = op_args(cell, B, I, H, requires_grad=False)
    args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
    h_new, c_new, gates = torch.ops.fused_rnn.cell_step_forward(*args, True)
    dh, dc = torch.randn(B, H), (torch.randn(B, H) if cell == "lstm" else None)
    x, h, c, w_ih, w_hh = args[1:6]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torch.ops.fused_rnn.cell_step_backward(
                cell, dh, dc, x, h, c, w_ih, w_hh, h_new, c_new if cell == "lstm" else h, gates))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert torch.equal(a, b), f"gradient {i}"


def test_cell_benchmark_runs(tmp_path):
    """Smoke test of benchmarks/bench_cells.py (nothing is asserted about speed): a table row per case."""
    out = tmp_path / "cells.md"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_cells", "--quick", "--threads", "1",
                           "--out", str(out)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == 3 * 2 * 2  # cells x passes x batches
    for row in rows:
        cells = [c.strip() for c in row.strip("| ").split("|")]
        assert float(cells[7]) > 0 and float(cells[10]) > 0  # ratio of medians, of best blocks
