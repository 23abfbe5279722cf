"""Tests specific to the C++/CUDA extension (fused_rnn._C): torch.library.opcheck on every op,
fullgraph compile, autocast, robustness, and a CUDA class that runs where a GPU is.

The generic backend-vs-reference-vs-torch.nn tests (every output and gradient, gradcheck, lengths,
reverse, proj) live in tests/test_backends.py and run the `cpu` and `cuda` backends too.

Memory the kernels allocate in C++ is filled with NaN (tests/conftest.py turns on torch's
deterministic mode with fill_uninitialized_memory), so an output element a kernel forgets to write
fails loudly.
Set FUSED_RNN_REQUIRE_EXT=1 (CI does) to fail instead of skip when the extension is not built.
"""
import itertools
import os

import pytest
import torch

import fused_rnn
from fused_rnn import reference
from fused_rnn.ops.cpp import cpu_backend, cuda_backend, ops

from helpers import assert_close, grads_of, reference_like_kernel, run_with_cpu_isa

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CELLS = tuple(GATES)

_err = ops.load_error()
if _err is not None and os.environ.get("FUSED_RNN_REQUIRE_EXT") == "1":
    raise RuntimeError(f"FUSED_RNN_REQUIRE_EXT=1 but {_err}")
pytestmark = pytest.mark.skipif(_err is not None, reason=str(_err))

HAS_CUDA = torch.cuda.is_available() and ops.load_error() is None and ops.built_with_cuda()
CUDA_SKIP = ("no CUDA device" if not torch.cuda.is_available() else
             f"fused_rnn._C has no CUDA kernels: {ops.load_error() or 'built without CUDA'}")


def make_inputs(cell, T=5, B=3, H=4, proj=0, bias=True, lengths=False, dtype=torch.float64, device="cpu",
                requires_grad=True, scale=1.0):
    """Random contract inputs: gx [T,B,G*H], h0 [B,Hout], c0, w_hh [G*H,Hout], b_hh, w_hr, lengths."""
    Hout = proj or H
    G = GATES[cell]

    def r(*shape, s=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * s).to(device, dtype).requires_grad_(requires_grad)

    gx = r(T, B, G * H, s=scale)
    h0 = r(B, Hout)
    c0 = r(B, H) if cell == "lstm" else None
    w_hh = r(G * H, Hout, s=0.5)
    b_hh = r(G * H) if bias else None
    w_hr = r(Hout, H, s=0.5) if proj else None
    lens = torch.randint(1, T + 1, (B,), device=device) if lengths else None
    if lengths and B:
        lens[0] = T  # the longest row has the full length, as in a packed batch
    return gx, h0, c0, w_hh, b_hh, w_hr, lens


CONFIGS = [(cell, reverse, lengths, proj, bias)
           for cell, reverse, lengths, proj, bias in itertools.product(CELLS, (False, True), (False, True), (0, 3),
                                                                       (True, False))
           if not (proj and cell != "lstm")]


def config_id(c):
    cell, reverse, lengths, proj, bias = c
    return f"{cell}{'-rev' if reverse else ''}{'-len' if lengths else ''}{f'-P{proj}' if proj else ''}" \
           f"{'' if bias else '-nobias'}"


# ------------------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_opcheck_forward(config):
    cell, reverse, lengths, proj, bias = config
    args = make_inputs(cell, proj=proj, bias=bias, lengths=lengths)
    torch.library.opcheck(torch.ops.fused_rnn.recurrence_forward.default, (cell, *args, reverse, True))


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_forward_inference(cell):
    args = make_inputs(cell, requires_grad=False)
    torch.library.opcheck(torch.ops.fused_rnn.recurrence_forward.default, (cell, *args, False, False))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_opcheck_backward(config):
    cell, reverse, lengths, proj, bias = config
    gx, h0, c0, w_hh, b_hh, w_hr, lens = make_inputs(cell, proj=proj, bias=bias, lengths=lengths,
                                                     requires_grad=False)
    y, h_n, c_n, gates, cells, proj_in = torch.ops.fused_rnn.recurrence_forward(
        cell, gx, h0, c0, w_hh, b_hh, w_hr, lens, reverse, True)
    dy, dh_n = torch.randn_like(y), torch.randn_like(h_n)
    dc_n = torch.randn_like(c_n) if cell == "lstm" else None
    torch.library.opcheck(torch.ops.fused_rnn.recurrence_backward.default,
                          (cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh, w_hr, lens, reverse))


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_backward_without_d_h0(cell):
    """need_d_h0=False (h0 needs no gradient): d_h0 is [0], in the kernel and in the fake kernel."""
    gx, h0, c0, w_hh, b_hh, w_hr, lens = make_inputs(cell, lengths=True, requires_grad=False)
    y, h_n, c_n, gates, cells, proj_in = torch.ops.fused_rnn.recurrence_forward(
        cell, gx, h0, c0, w_hh, b_hh, w_hr, lens, True, True)
    dc_n = torch.randn_like(c_n) if cell == "lstm" else None
    args = (cell, torch.randn_like(y), torch.randn_like(h_n), dc_n, y, gates, cells, proj_in, h0, c0, w_hh, w_hr,
            lens, True, False)
    assert torch.ops.fused_rnn.recurrence_backward(*args)[1].shape == (0,)
    torch.library.opcheck(torch.ops.fused_rnn.recurrence_backward.default, args)


# ------------------------------------------------------------------------- against the reference

def run_both(backend, cell, args, reverse):
    """Outputs and gradients of `backend` and of the reference on the same inputs."""
    ins = [a for a in args[:-1] if a is not None]
    results = []
    for f in (backend.recurrence, reference.recurrence):
        outs = f(cell, *args, reverse)
        results.append([o for o in outs if o is not None] + list(grads_of(outs, ins)))
    return results


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_cpu_matches_reference_float64(config):
    cell, reverse, lengths, proj, bias = config
    got, want = run_both(cpu_backend, cell, make_inputs(cell, T=6, B=4, H=5, proj=proj, bias=bias,
                                                        lengths=lengths), reverse)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, torch.float64, f"output/grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_low_precision(cell, dtype):
    """fp32 and bf16 against the float64 reference run on the same (rounded) inputs (bf16: h rounded
    per step as the kernels carry it, helpers.reference_like_kernel)."""
    args = make_inputs(cell, T=7, B=3, H=16, lengths=True, dtype=dtype)
    args64 = [None if a is None else (a.detach().double().requires_grad_() if a.is_floating_point() else a)
              for a in args]
    outs = cpu_backend.recurrence(cell, *args, False)
    want = reference_like_kernel(cell, [*args64, False], dtype, outs)
    for o, w in zip(outs, want):
        if w is not None:
            assert o.dtype == dtype
            assert_close(o, w, dtype, "output")
    got_g = grads_of(outs, [a for a in args[:-1] if a is not None])
    want_g = grads_of(want, [a for a in args64[:-1] if a is not None])
    for g, w in zip(got_g, want_g):
        assert_close(g, w, dtype, "grad")


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(cell):
    gx, h0, c0, w_hh, b_hh, w_hr, lens = make_inputs(cell, T=4, B=3, H=3, proj=2 if cell == "lstm" else 0,
                                                     lengths=True)
    fn = lambda *a: tuple(o for o in cpu_backend.recurrence(cell, *a, lens, True) if o is not None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (gx, h0, c0, w_hh, b_hh, w_hr))


_ISA_SCRIPT = """
import torch
from fused_rnn import reference
from fused_rnn.ops.cpp import cpu_backend
torch.manual_seed(0)
G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
worst = 0.0
for cell in G:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        T, B, H = 5, 3, 37  # H not a multiple of any vector width: the loops' tails run too
        r = lambda *s: (torch.randn(*s, dtype=torch.float64) * 2).to(dtype)
        args = [r(T, B, G[cell] * H), r(B, H), r(B, H) if cell == "lstm" else None, r(G[cell] * H, H) * 0.3,
                r(G[cell] * H), None, torch.tensor([5, 2, 4])]
        with torch.no_grad():
            got = cpu_backend.recurrence(cell, *args, True)[0].double()
            want = reference.recurrence(cell, *[a.double() if a is not None and a.is_floating_point() else a
                                                for a in args], True)[0]
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
        err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= tol, (cell, dtype, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_instruction_set(isa):
    """The CPU kernels are built for baseline x86-64, AVX2 and AVX-512 and chosen at run time; run
    each variant this machine supports (FUSED_RNN_CPU_ISA caps the choice) against the reference."""
    run_with_cpu_isa(isa, _ISA_SCRIPT)


def test_batch_of_zero():
    gx, h0, c0, w_hh, b_hh, _, _ = make_inputs("lstm", B=0)
    y, h_n, c_n = cpu_backend.recurrence("lstm", gx, h0, c0, w_hh, b_hh, None, None, False)
    assert y.shape == (5, 0, 4) and h_n.shape == (0, 4) and c_n.shape == (0, 4)
    d_w_hh, = torch.autograd.grad((y.sum() + h_n.sum() + c_n.sum()), [w_hh])
    assert torch.equal(d_w_hh, torch.zeros_like(w_hh))


# ------------------------------------------------------------------------------------ robustness

@pytest.mark.parametrize("cell", CELLS)
def test_large_preactivations_are_finite(cell):
    """Pre-activations of +-1e4 saturate the gates without NaN or inf (fp32 fast exp is clamped)."""
    gx, h0, c0, w_hh, b_hh, _, _ = make_inputs(cell, T=4, B=8, H=16, dtype=torch.float32, scale=1e4)
    outs = cpu_backend.recurrence(cell, gx, h0, c0, w_hh, b_hh, None, None, False)
    for o in outs:
        if o is not None:
            assert torch.isfinite(o).all()
    if cell in ("lstm", "rnn_tanh"):  # (a saturated GRU keeps h0, which may exceed 1)
        assert outs[0].abs().max() <= 1.0
    for g in grads_of(outs, [gx, h0, w_hh]):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_non_contiguous_inputs(cell):
    args = make_inputs(cell, T=5, B=4, H=6, proj=3 if cell == "lstm" else 0, lengths=True)
    nc = []
    for a in args:  # the same values behind transposed / strided storage
        if a is None or a.dim() == 0:
            nc.append(a)
        elif a.dim() == 1:
            nc.append(torch.stack([a, a], 1)[:, 0])
        else:
            nc.append(a.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(a.requires_grad))
    assert not nc[0].is_contiguous() and not nc[3].is_contiguous()
    want = cpu_backend.recurrence(cell, *args, True)
    got = cpu_backend.recurrence(cell, *nc, True)
    for a, b in zip(got, want):
        if b is not None:
            assert_close(a, b, torch.float64, "output")
    ins = lambda xs: [x for x in xs[:-1] if x is not None and x.requires_grad]  # noqa: E731
    for a, b in zip(grads_of(got, ins(nc)), grads_of(want, ins(args))):
        assert_close(a, b, torch.float64, "grad")


def test_no_grad_saves_nothing():
    gx, h0, c0, w_hh, b_hh, _, _ = make_inputs("lstm")
    with torch.no_grad():
        y, h_n, c_n, gates, cells, proj_in = torch.ops.fused_rnn.recurrence_forward(
            "lstm", gx, h0, c0, w_hh, b_hh, None, None, False, False)
    assert gates.numel() == cells.numel() == proj_in.numel() == 0
    assert torch.isfinite(y).all()


def test_bad_inputs_raise():
    gx, h0, c0, w_hh, b_hh, _, _ = make_inputs("lstm", requires_grad=False)
    with pytest.raises(RuntimeError, match="unknown cell"):
        torch.ops.fused_rnn.recurrence_forward("lsmt", gx, h0, c0, w_hh, b_hh, None, None, False, False)
    with pytest.raises(RuntimeError, match="needs c0"):
        torch.ops.fused_rnn.recurrence_forward("lstm", gx, h0, None, w_hh, b_hh, None, None, False, False)
    with pytest.raises(RuntimeError, match="h0 is"):
        torch.ops.fused_rnn.recurrence_forward("lstm", gx, h0.float(), c0, w_hh, b_hh, None, None, False, False)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        torch.ops.fused_rnn.recurrence_forward("rnn_tanh", gx[..., :4].int(), h0.int(), None, w_hh[:4].int(), None,
                                               None, None, False, False)


def test_stale_or_missing_build_is_explained(monkeypatch):
    monkeypatch.setattr(ops, "_loaded", False)
    monkeypatch.setattr(ops, "ABI_VERSION", ops.ABI_VERSION + 1)
    monkeypatch.setattr(ops, "_load_error", None)
    monkeypatch.setattr(ops, "_register", lambda: None)
    err = ops.load_error()
    assert "stale" in err and "pip install" in err
    assert cpu_backend.unavailable_reason(torch.device("cpu"), torch.float32, "lstm", False) == err
    with pytest.raises(RuntimeError, match="stale"):
        ops.recurrence("lstm", *make_inputs("lstm"), False)


def test_cuda_backend_reason_without_gpu():
    reason = cuda_backend.unavailable_reason(torch.device("cpu"), torch.float32, "lstm", False)
    assert reason and "CUDA" in reason


def test_autocast_cpu_like_torch_nn():
    """Under CPU autocast torch.nn runs LSTM and RNN in bfloat16 and GRU in float32: so do the ops."""
    for cell, want in (("lstm", torch.bfloat16), ("gru", torch.float32), ("rnn_tanh", torch.bfloat16)):
        args = make_inputs(cell, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, h_n, _ = cpu_backend.recurrence(cell, *args, False)
        assert y.dtype == want and h_n.dtype == want, cell
        y.float().sum().backward()
        assert args[3].grad is not None and args[3].grad.dtype == torch.float32


# --------------------------------------------------------------------------------------- compile

@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_lstm_cpu(compile_backend):
    """No graph break through fused_rnn.LSTM on the C++ ops (torch.nn.LSTM breaks the graph)."""
    torch._dynamo.reset()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fused_rnn.LSTM(6, 8, num_layers=2, bidirectional=True, backend="cpu")
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y).sum()

    model = Model().double()
    x = torch.randn(7, 2, 6, dtype=torch.float64)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    out = compiled(x)
    grads = torch.autograd.grad(out, list(model.parameters()))
    assert_close(out, eager, torch.float64, "loss")
    for a, b in zip(grads, eager_grads):
        assert_close(a, b, torch.float64, "grad")


# ------------------------------------------------------------------------------------------ CUDA

@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP)
class TestCUDA:
    @pytest.mark.parametrize("config", CONFIGS, ids=config_id)
    def test_matches_reference_float64(self, config):
        cell, reverse, lengths, proj, bias = config
        args = make_inputs(cell, T=6, B=4, H=5, proj=proj, bias=bias, lengths=lengths, device="cuda")
        got, want = run_both(cuda_backend, cell, args, reverse)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, torch.float64, f"output/grad {i}")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("cell", CELLS)
    def test_low_precision(self, cell, dtype):
        args = make_inputs(cell, T=9, B=5, H=32, proj=8 if cell == "lstm" else 0, lengths=True, dtype=dtype,
                           device="cuda")
        args64 = [None if a is None else (a.detach().double().requires_grad_() if a.is_floating_point() else a)
                  for a in args]
        outs = cuda_backend.recurrence(cell, *args, True)
        want = reference_like_kernel(cell, [*args64, True], dtype, outs)
        for o, w in zip(outs, want):
            if w is not None:
                assert o.dtype == dtype
                assert_close(o, w, dtype, "output")
        for g, w in zip(grads_of(outs, [a for a in args[:-1] if a is not None]),
                        grads_of(want, [a for a in args64[:-1] if a is not None])):
            assert_close(g, w, dtype, "grad")

    @pytest.mark.parametrize("cell", CELLS)
    def test_gradcheck_float64(self, cell):
        gx, h0, c0, w_hh, b_hh, w_hr, lens = make_inputs(cell, T=4, B=3, H=3, proj=2 if cell == "lstm" else 0,
                                                         lengths=True, device="cuda")
        fn = lambda *a: tuple(o for o in cuda_backend.recurrence(cell, *a, lens, False) if o is not None)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (gx, h0, c0, w_hh, b_hh, w_hr))

    @pytest.mark.parametrize("config", CONFIGS[::3], ids=config_id)
    def test_opcheck(self, config):
        cell, reverse, lengths, proj, bias = config
        args = make_inputs(cell, proj=proj, bias=bias, lengths=lengths, device="cuda")
        torch.library.opcheck(torch.ops.fused_rnn.recurrence_forward.default, (cell, *args, reverse, True))

    @pytest.mark.parametrize("cell", CELLS)
    def test_matches_cudnn(self, cell):
        mode = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN,
                "rnn_relu": lambda *a, **k: torch.nn.RNN(*a, nonlinearity="relu", **k)}[cell]
        ref = mode(16, 32, num_layers=2, bidirectional=True).cuda()
        ours = getattr(fused_rnn, type(ref).__name__)(16, 32, num_layers=2, bidirectional=True, backend="cuda",
                                                      **({"nonlinearity": "relu"} if cell == "rnn_relu" else {}))
        ours.load_state_dict(ref.state_dict())
        ours.cuda()
        x = torch.randn(11, 4, 16, device="cuda")
        # exact fp32 on both sides (cuDNN would use TF32 by default)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            self._compare(ref, ours, x)

    def _compare(self, ref, ours, x):
        assert not torch.backends.cuda.matmul.allow_tf32
        y_ref, _ = ref(x)
        y, _ = ours(x)
        assert_close(y, y_ref, torch.float32, "y")
        g_ref = torch.autograd.grad(y_ref.square().sum(), list(ref.parameters()))
        g = torch.autograd.grad(y.square().sum(), list(ours.parameters()))
        for a, b in zip(g, g_ref):
            assert_close(a, b, torch.float32, "grad")

    def test_large_preactivations_are_finite(self):
        for cell, dtype in itertools.product(CELLS, (torch.float32, torch.float16, torch.bfloat16)):
            if cell == "rnn_relu" and dtype == torch.float16:
                continue  # relu does not saturate: h grows past fp16's 65504 by construction (as in torch.nn)
            args = make_inputs(cell, T=4, B=8, H=16, dtype=dtype, device="cuda", scale=1e4)
            outs = cuda_backend.recurrence(cell, *args[:-1], None, False)
            for o in outs:
                if o is not None:
                    assert torch.isfinite(o).all(), (cell, dtype)

    @pytest.mark.parametrize("kernel", ["per-step", "persistent"])
    def test_cuda_graph_capture(self, kernel, monkeypatch):
        if kernel == "persistent":
            monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")
            assert cuda_backend.kernel_for("lstm", torch.float32, 32, 4).startswith("persistent")
        gx, h0, c0, w_hh, b_hh, _, lens = make_inputs("lstm", T=8, B=4, H=32, dtype=torch.float32, device="cuda",
                                                      lengths=True)
        static = [t.detach().clone().requires_grad_() for t in (gx, h0, c0, w_hh, b_hh)]

        def step():
            y, h_n, c_n = cuda_backend.recurrence("lstm", *static[:4], static[4], None, lens, False)
            return torch.autograd.grad((y.square().sum() + h_n.sum() + c_n.sum()), static)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()  # warm-up on the side stream, as CUDA graphs require
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_grads = step()
        for t, src in zip(static, (gx, h0, c0, w_hh, b_hh)):
            with torch.no_grad():
                t.copy_(src * 0.5)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b in zip(graph_grads, eager):
            assert_close(a, b, torch.float32, "graph replay grad")

    @pytest.mark.parametrize("kernel", ["per-step", "persistent"])
    def test_64bit_offsets(self, kernel, monkeypatch):
        """T*B*H > 2^31 elements: offsets past 2^31 must not wrap (bf16 rnn_tanh, ~4.3 GB per tensor).
        The per-step path offsets its pointers on the host; the persistent kernels index every step
        inside the kernel, so they are the ones that can wrap.

        With w_hh = 0 every step is independent: y[t] = tanh(gx[t]) and d gx[t] = dy[t] * (1 - y[t]^2)."""
        # T*B*H = 2_147_549_184 > 2^31; B=64: the persistent grid (32 x 4 CTAs) fits the device at once
        T, B, H = 32769, 64, 1024
        if kernel == "persistent":
            monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")
            assert cuda_backend.kernel_for("rnn_tanh", torch.bfloat16, H, B).startswith("persistent")
        free = torch.cuda.mem_get_info()[0]
        if free < 24 * 2**30:
            pytest.skip(f"needs ~24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
        gx = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
        h0 = torch.zeros(B, H, device="cuda", dtype=torch.bfloat16)
        w_hh = torch.zeros(H, H, device="cuda", dtype=torch.bfloat16)
        y, _, _ = cuda_backend.recurrence("rnn_tanh", gx, h0, None, w_hh, None, None, None, False)
        d_gx, = torch.autograd.grad(y, [gx], torch.ones_like(y))
        for t in (0, T // 2, T - 1):
            want = torch.tanh(gx[t].detach().float())
            assert_close(y[t], want, torch.bfloat16, f"y[{t}]")
            assert_close(d_gx[t], 1 - y[t].float() ** 2, torch.bfloat16, f"d gx[{t}]")
