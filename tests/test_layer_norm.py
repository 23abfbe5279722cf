"""Layer-normalised LSTM and GRU: the torch, cpu and triton backends' analytic backwards (recurrent LN
inside the step) against the textbook reference and finite differences, double backward on both,
the modules against a from-scratch loop, the drop-in options, initialisation, and the backends
that refuse it. The triton backend runs in the Triton interpreter without a GPU (conftest)."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import functional, reference
from fused_rnn.backends import get, unavailable_reason

import drop_in
from helpers import assert_close, grads_of

F64 = torch.float64
SHAPES = {  # (T, B, H, lengths, reverse)
    "T1-B1-H3": (1, 1, 3, None, False),
    "T6-B3-H5": (6, 3, 5, None, False),
    "T7-B5-H6-len": (7, 5, 6, [7, 3, 1, 7, 5], False),
    "T7-B5-H6-len-rev": (7, 5, 6, [2, 7, 7, 1, 4], True),
    "T3-B2-H3-len-rev": (3, 2, 3, [1, 3], True),  # small: gradcheck in the Triton interpreter
}


TRITON_REASON = unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu", F64)
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"  # as test_triton.py
CPU_REASON = unavailable_reason("cpu", "cpu", F64)
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")
CUDA_REASON = unavailable_reason("cuda", "cuda", F64)
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend unavailable: {CUDA_REASON}")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")
# (backend, device): the triton backend on the GPU, or on CPU tensors in the interpreter
BACKENDS = [pytest.param("torch", "cpu", id="torch"),
            pytest.param("cpu", "cpu", id="cpu", marks=needs_cpu),
            pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda),
            pytest.param("triton", "cuda" if ON_GPU else "cpu", id="triton", marks=needs_triton)]


def make(cell, T, B, H, lengths, reverse, device="cpu"):
    G = 4 if cell == "lstm" else 3
    new = lambda *s, k=1.0: (torch.randn(*s, dtype=F64) * k).to(device).requires_grad_()  # noqa: E731
    args = [new(T, B, G * H), new(B, H), new(B, H) if cell == "lstm" else None, new(G * H, H, k=H ** -0.5),
            new(G * H), None, None if lengths is None else torch.tensor(lengths, device=device), reverse]
    ln = (new(G * H, k=0.5), new(H, k=0.5), new(H)) if cell == "lstm" else (new(G * H, k=0.5), None, None)
    return args, ln


def differentiable(args, ln):
    return [a for a in list(args[:6]) + list(ln) if a is not None]


def match_cases():
    """Every shape with and without zoneout on the torch backend; on the triton backend (slow in the
    interpreter) every shape plain, and each zoneout mode on a shape with lengths."""
    for b in BACKENDS:
        for shape in SHAPES:
            for zoneout in ("plain", "zoneout-train", "zoneout-eval"):
                if b.id in ("torch", "cpu") or zoneout == "plain" or (shape, zoneout) in (
                        ("T7-B5-H6-len-rev", "zoneout-train"), ("T7-B5-H6-len", "zoneout-eval")):
                    yield pytest.param(*b.values, shape, zoneout, id=f"{b.id}-{shape}-{zoneout}", marks=b.marks)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device,shape,zoneout", list(match_cases()))
def test_backend_matches_reference(backend, device, shape, zoneout, cell):
    args, ln = make(cell, *SHAPES[shape], device=device)
    T, B, H = SHAPES[shape][:3]
    keep = None if zoneout == "plain" else functional.zoneout_keep(0.3, zoneout == "zoneout-train", cell, T, B, H,
                                                                  H, device)
    out = get(backend).recurrence(cell, *args, zoneout=keep, layer_norm=ln)
    ref = reference.recurrence(cell, *args, zoneout=keep, layer_norm=ln)
    for name, a, b in zip(("y", "h_n", "c_n"), out, ref):
        if b is not None:
            assert_close(a, b, F64, name)
    inputs = differentiable(args, ln)
    for k, (a, b) in enumerate(zip(grads_of(out, inputs), grads_of(ref, inputs))):
        assert_close(a, b, F64, f"grad {k}")


# the interpreter's gradchecks stay on the smallest shape
GRADCHECK = [pytest.param(*b.values, shape, id=f"{b.id}-{shape}", marks=b.marks) for b in BACKENDS
             for shape in (["T6-B3-H5", "T3-B2-H3-len-rev"] if b.id != "triton" else ["T3-B2-H3-len-rev"])]


@pytest.mark.parametrize("zoneout", [None, "eval", "train"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device,shape", GRADCHECK)
def test_gradcheck_float64(backend, device, shape, cell, zoneout):
    args, ln = make(cell, *SHAPES[shape], device=device)
    T, B, H = SHAPES[shape][:3]
    if zoneout == "train" and backend == "triton":
        pytest.skip("the interpreter's gradchecks stay few: training masks are checked on torch and cpu")
    keep = None if zoneout is None else functional.zoneout_keep(0.3, zoneout == "train", cell, T, B, H, H, device)
    inputs = differentiable(args, ln)
    slots = [a is not None for a in list(args[:6]) + list(ln)]

    def f(*xs):
        it = iter(xs)
        full = [next(it) if present else None for present in slots]
        out = get(backend).recurrence(cell, *full[:6], *args[6:], zoneout=keep, layer_norm=tuple(full[6:]))
        return tuple(o for o in out if o is not None)
    # the interpreter takes seconds per evaluation: the triton backend checks a random projection of
    # the Jacobian (fast_mode), the torch backend every element
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")


def textbook(module, x):
    """One layer, one direction, written from the paper with reference.layer_norm."""
    H = module.hidden_size
    h = torch.zeros(x.shape[1], H, dtype=x.dtype)
    c = torch.zeros_like(h)
    ys = []
    for x_t in x:
        gx = reference.layer_norm(x_t @ module.weight_ih_l0.t(), module.ln_gain_ih_l0, module.bias_ih_l0)
        if isinstance(module, fused_rnn.LayerNormLSTM):
            h, c = reference.layer_norm_lstm_cell(gx, h, c, module.weight_hh_l0, module.bias_hh_l0,
                                                  module.ln_gain_hh_l0, module.ln_gain_c_l0, module.ln_bias_c_l0)
        else:
            h = reference.layer_norm_gru_cell(gx, h, module.weight_hh_l0, module.bias_hh_l0, module.ln_gain_hh_l0)
        ys.append(h)
    return torch.stack(ys)


@pytest.mark.parametrize("cls", ["LayerNormLSTM", "LayerNormGRU"])
def test_module_matches_the_textbook_loop(cls):
    m = getattr(fused_rnn, cls)(3, 5, backend="torch").double()
    with torch.no_grad():  # away from the initial gains 1 / biases 0, so every parameter matters
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(6, 4, 3, dtype=F64)
    got, want = m(x)[0], textbook(m, x)
    assert_close(got, want, F64)
    params = list(m.parameters())
    for a, b in zip(grads_of([got], params), grads_of([want], params)):
        assert_close(a, b, F64)


OPTIONS = dict(drop_in.OPTIONS, **{
    "zoneout-bidirectional": dict(bidirectional=True, zoneout=0.2),
    "nobias": dict(bias=False),
})


@pytest.mark.parametrize("cls", ["LayerNormLSTM", "LayerNormGRU"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_drop_in_options_match_the_reference_backend(cls, option):
    make = lambda backend, **kw: getattr(fused_rnn, cls)(3, 4, backend=backend, **kw).double()  # noqa: E731
    drop_in.assert_torch_backend_matches_reference(make, OPTIONS[option], perturb=0.1)


@needs_cpu
@pytest.mark.parametrize("cls", ["LayerNormLSTM", "LayerNormGRU"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cpu_backend_modules_match_the_reference_backend(cls, option):
    """drop_in's check with the cpu backend standing in for the torch one."""
    def make(backend, **kw):
        return getattr(fused_rnn, cls)(3, 4, backend="cpu" if backend == "torch" else backend, **kw).double()
    drop_in.assert_torch_backend_matches_reference(make, OPTIONS[option], perturb=0.1)


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("options", ["layer_norm", "zoneout-train", "zoneout-eval", "layer_norm+zoneout-train"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_backend_thread_counts(cell, options, threads):
    """Rows split over 1, 2 and 3 threads (37 rows of 33 units, lengths), float32 and float64, with
    the layer norm, zoneout (test_zoneout.py's option, tested here with the thread counts) or both."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, F64):
            args, ln = make(cell, 5, 37, 33, [5, 2, 4] * 12 + [1], False)
            cast = lambda a: a.detach().to(dtype).requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
            args, ln = [cast(a) for a in args], tuple(cast(a) for a in ln) if "layer_norm" in options else None
            keep = None if "zoneout" not in options else functional.zoneout_keep(
                0.3, "train" in options, cell, 5, 37, 33, 33, "cpu")
            out = get("cpu").recurrence(cell, *args, zoneout=keep, layer_norm=ln)
            ref = reference.recurrence(cell, *args, zoneout=keep, layer_norm=ln)
            inputs = differentiable(args, ln or ())
            for a, b in zip(out, ref):
                if b is not None:
                    assert_close(a, b, dtype)
            for a, b in zip(grads_of(out, inputs), grads_of(ref, inputs)):
                assert_close(a, b, dtype)
    finally:
        torch.set_num_threads(old)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_backend_16_bit(dtype):
    """16-bit storage (fp32 statistics and state) against the float64 reference of the rounded inputs."""
    for cell in ("lstm", "gru"):
        args, ln = make(cell, 4, 3, 8, [4, 2, 3], True)
        cast = lambda a: a.detach().to(dtype).requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
        low, low_ln = [cast(a) for a in args], tuple(cast(a) for a in ln)
        up = lambda a: a.detach().double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
        hi, hi_ln = [up(a) for a in low], tuple(up(a) for a in low_ln)
        out = get("cpu").recurrence(cell, *low, layer_norm=low_ln)
        ref = reference.recurrence(cell, *hi, layer_norm=hi_ln)
        for a, b in zip(out, ref):
            if b is not None:
                assert_close(a.double(), b, dtype)
        for a, b in zip(grads_of(out, differentiable(low, low_ln)), grads_of(ref, differentiable(hi, hi_ln))):
            assert_close(a.double(), b, dtype)


@pytest.mark.skipif(TRITON_REASON is not None or ON_GPU, reason="the interpreter run (CPU tensors) of the triton backend")
@pytest.mark.parametrize("cls", ["LayerNormLSTM", "LayerNormGRU"])
def test_triton_backend_modules_match_the_reference_backend(cls):
    """Packed, bidirectional, with zoneout, in training on the triton backend (drop_in's check,
    with the triton backend standing in for the torch one)."""
    def make(backend, **kw):
        return getattr(fused_rnn, cls)(3, 4, backend="triton" if backend == "torch" else backend, **kw).double()
    drop_in.assert_torch_backend_matches_reference(make, dict(OPTIONS["zoneout-bidirectional"], packed=True),
                                                   perturb=0.1)


@pytest.mark.parametrize("cls", ["LayerNormLSTM", "LayerNormGRU"])
def test_parameters_initialisation_and_state_dict(cls):
    m = getattr(fused_rnn, cls)(3, 4, num_layers=2, bidirectional=True)
    torch_names = [n for n, _ in getattr(torch.nn, cls[len("LayerNorm"):])(3, 4, 2, bidirectional=True).named_parameters()]
    names = [n for n, _ in m.named_parameters()]
    assert names[:len(torch_names)] == torch_names
    ln = [n for n in names if n.startswith("ln_")]
    assert len(ln) == 4 * (4 if cls == "LayerNormLSTM" else 2)
    m.reset_parameters()
    for n in ln:
        assert torch.equal(getattr(m, n), torch.full_like(getattr(m, n), 0.0 if "bias" in n else 1.0))
    other = getattr(fused_rnn, cls)(3, 4, num_layers=2, bidirectional=True)
    other.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(5, 2, 3)
    assert torch.equal(other(x)[0], m(x)[0])


def test_proj_size_is_refused_and_the_cpp_backends_take_layer_norm():
    with pytest.raises(ValueError, match="proj_size is not supported by LayerNormLSTM"):
        fused_rnn.LayerNormLSTM(3, 4, proj_size=2)
    for backend in ("cpu", "cuda"):
        assert "layer_norm" in get(backend).OPTIONS
    assert fused_rnn.LayerNormLSTM(3, 4)(torch.randn(2, 1, 3))[0].grad_fn is not None  # auto: torch


# (class, constructor kwargs, packed lengths or None)
DOUBLE_BACKWARD = {
    "LayerNormLSTM": ("LayerNormLSTM", {}, None),
    "LayerNormLSTM-bi-packed-zoneout": ("LayerNormLSTM", {"bidirectional": True, "zoneout": 0.3}, [3, 1]),
    "LayerNormGRU-bi-packed": ("LayerNormGRU", {"bidirectional": True}, [3, 1]),
    "LayerNormGRU-zoneout": ("LayerNormGRU", {"zoneout": 0.3}, None),
}


# In Triton's interpreter (no GPU) these take 10-55 s each; the second-order gradients are the reference
# recompute shared by every backend (fused_rnn/double_backward.py), checked here on every configuration
# through the other backends, so the interpreted triton backend runs one configuration per cell.
INTERPRETED_TRITON_DOUBLE_BACKWARD = ["LayerNormLSTM", "LayerNormGRU-zoneout"]


def double_backward_cases():
    for backend in [pytest.param("reference", "cpu", id="reference"), *BACKENDS]:
        interpreted = backend.id == "triton" and not ON_GPU
        for config in INTERPRETED_TRITON_DOUBLE_BACKWARD if interpreted else DOUBLE_BACKWARD:
            yield pytest.param(*backend.values, config, id=f"{backend.id}-{config}", marks=backend.marks)


@pytest.mark.parametrize("backend,device,config", list(double_backward_cases()))
def test_double_backward_gradgradcheck(backend, device, config):
    """gradgradcheck in float64 of every output in every input and parameter (layer-norm gains
    perturbed away from 1 and 0, so that they matter); zoneout in training with a seeded mask."""
    cls, kwargs, lengths = DOUBLE_BACKWARD[config]
    m = getattr(fused_rnn, cls)(2, 3, backend=backend, device=device, dtype=F64, **kwargs)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.3)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        torch.manual_seed(11)  # the same zoneout masks at every evaluation
        inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, hidden = torch.func.functional_call(m, dict(zip(names, params)), (inp,))
        return ((out if lengths is None else out.data),) + (tuple(hidden) if isinstance(hidden, tuple) else (hidden,))
    x = torch.randn(3, 2, 2, dtype=F64, device=device, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradgradcheck(f, [x] + params, fast_mode=True)


def test_backend_op_called_directly_refuses_create_graph():
    args, ln = make("lstm", *SHAPES["T6-B3-H5"])
    y = get("torch").recurrence("lstm", *args, layer_norm=ln)[0]
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(y.square().sum(), args[0], create_graph=True)


def test_input_side_layer_norm_runs_once_for_all_steps(monkeypatch):
    calls = []
    real = F.layer_norm
    monkeypatch.setattr(F, "layer_norm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    fused_rnn.LayerNormGRU(3, 4, backend="torch")(torch.randn(6, 2, 3))
    assert calls == [torch.Size([6, 2, 12])]


@needs_cpu
@pytest.mark.parametrize("zoneout", [None, "train", "eval"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck_of_the_cpp_options_ops(cell, zoneout):
    """torch.library.opcheck (schema, fake kernels, autograd registration) of the C++ ops that take
    zoneout and layer norm, forward and backward."""
    from fused_rnn.ops.cpp import ops
    T, B, H = 4, 3, 5
    args, ln = make(cell, T, B, H, [4, 2, 3], True)
    gx, h0, c0, w_hh, b_hh, _, lengths, reverse = args
    keep = None if zoneout is None else functional.zoneout_keep(0.3, zoneout == "train", cell, T, B, H, H, "cpu")
    opts = (*ops.zoneout_operands(keep), *ln)
    fwd = (cell, gx, h0, c0, w_hh, b_hh, None, lengths, reverse, True, *opts)
    torch.library.opcheck(torch.ops.fused_rnn.recurrence_forward_options.default, fwd)
    y, h_n, c_n, gates, cells, proj_in, ln_hat, ln_rstd = torch.ops.fused_rnn.recurrence_forward_options(
        *[a.detach() if torch.is_tensor(a) else a for a in fwd])
    dc_n = torch.randn_like(c_n) if cell == "lstm" else None
    bwd = (cell, torch.randn_like(y), torch.randn_like(h_n), dc_n, y, gates, cells, proj_in, h0.detach(),
           None if c0 is None else c0.detach(), w_hh.detach(), None, lengths, reverse,
           *[a.detach() if torch.is_tensor(a) and a.is_floating_point() else a for a in opts], ln_hat, ln_rstd)
    torch.library.opcheck(torch.ops.fused_rnn.recurrence_backward_options.default, bwd)


@needs_cpu
@pytest.mark.parametrize("cls", ["LayerNormLSTM", "LayerNormGRU"])
def test_cpu_backend_inference_without_saving(cls):
    """Under no_grad the op saves nothing (one step of scratch): eval with zoneout, 2 layers, both
    directions, against the reference backend."""
    torch.manual_seed(0)
    cpu = getattr(fused_rnn, cls)(3, 7, num_layers=2, bidirectional=True, zoneout=0.2, backend="cpu").double().eval()
    ref = getattr(fused_rnn, cls)(3, 7, num_layers=2, bidirectional=True, zoneout=0.2, backend="reference").double()
    ref.load_state_dict(cpu.state_dict())
    x = torch.randn(5, 4, 3, dtype=F64)
    with torch.no_grad():
        for a, b in zip(torch.utils._pytree.tree_leaves(cpu(x)), torch.utils._pytree.tree_leaves(ref.eval()(x))):
            assert_close(a, b, F64)


_ODD_WIDTHS_SCRIPT = """
import torch
from fused_rnn import functional, reference
from fused_rnn.backends import get
from helpers import TOL

torch.manual_seed(0)
T, B, lengths = 3, 3, torch.tensor([3, 1, 2])
for cell in ("lstm", "gru"):
    G = 4 if cell == "lstm" else 3
    for H in (1, 3, 37, 133):
        for options in ("layer_norm", "zoneout-train", "zoneout-eval", "layer_norm+zoneout-train",
                        "layer_norm+zoneout-eval"):
            for dtype in (torch.float32, torch.float64):
                new = lambda *s, k=1.0: (torch.randn(*s, dtype=dtype) * k).requires_grad_()
                args = [new(T, B, G * H), new(B, H), new(B, H) if cell == "lstm" else None,
                        new(G * H, H, k=H ** -0.5), new(G * H), None, lengths, False]
                ln = ((new(G * H, k=0.5), new(H, k=0.5), new(H)) if cell == "lstm" else (new(G * H, k=0.5), None, None)
                      ) if "layer_norm" in options else None
                keep = None if "zoneout" not in options else functional.zoneout_keep(
                    0.3, "train" in options, cell, T, B, H, H, "cpu")
                out = get("cpu").recurrence(cell, *args, zoneout=keep, layer_norm=ln)
                ref = reference.recurrence(cell, *args, zoneout=keep, layer_norm=ln)
                inputs = [a for a in args[:6] + list(ln or ()) if a is not None]
                outs = [o for o in out if o is not None]
                refs = [o for o in ref if o is not None]
                w = [torch.randn(o.shape, dtype=dtype) for o in refs]
                got = torch.autograd.grad(sum((o * v).sum() for o, v in zip(outs, w)), inputs)
                want = torch.autograd.grad(sum((o * v).sum() for o, v in zip(refs, w)), inputs)
                for a, b in zip(outs + list(got), refs + list(want)):
                    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
                    assert torch.isfinite(a).all() and err <= TOL[dtype], (cell, H, options, dtype, err)
print("ok")
"""


@needs_cpu
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_cpu_option_rows_every_instruction_set_and_odd_widths(isa):
    """The option rows are compiled once per instruction set with their loops vectorised: each variant
    this machine has, at widths that leave a vector's tail (H = 1, 3, 37, 133), every combination of
    layer norm and zoneout (training masks, eval's blend), float32 and float64, outputs and gradients
    against the reference."""
    from helpers import run_with_cpu_isa
    run_with_cpu_isa(isa, "import sys; sys.path.insert(0, 'tests')\n" + _ODD_WIDTHS_SCRIPT)
