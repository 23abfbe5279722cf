"""The input projection inside the fused CPU recurrence: torch.ops.fused_rnn.recurrence_forward_projected.

The fused path computes gx = x w_ih^T (+ b_ih) a chunk of steps at a time inside its parallel
region (csrc/cpu/fused_cpu_kernels.h, projection_chunk); its outputs must be those of
recurrence_forward on gx = F.linear(x, w_ih, b_ih) (the same recurrence kernel, so the tolerance is
tight: only the projection's summation order differs) and the float64 reference's. Small chunks
(FUSED_RNN_CPU_PROJ_CHUNK) cover many chunks, a last partial chunk and one step per chunk, forward
and reverse; odd sizes give partial vector blocks and fewer blocks than threads.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fused_rnn import reference
from fused_rnn.ops.cpp import ops

from helpers import assert_close
from test_cpu_fused import CELLS, GATES, fused_kernel, threads  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))


@pytest.fixture(autouse=True)
def project_inside(monkeypatch):
    """By default the op projects inside the loop only on some CPUs and sizes (project_inside in
    csrc/cpu/cpu_routes.h); here the inside path is forced."""
    monkeypatch.setenv("FUSED_RNN_CPU_PROJECTION", "inside")

# Against recurrence_forward on F.linear's gx: a few ulp of the dtype, grown by the recurrence.
TIGHT = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}

# (T, B, H, I): T = 1; I != H, I = 1, H = 1; B = 1, 3, 13 (more rows than one microkernel call);
# H = 133 with a K (I) longer than the GEMM's K chunk.
SIZES = [(1, 1, 1, 1), (7, 3, 3, 5), (9, 13, 37, 11), (5, 3, 133, 133), (10, 1, 37, 64), (6, 13, 37, 1)]
# Steps per projection chunk: the default (one chunk at these sizes), 1, and 3 (T % 3 != 0 mostly).
CHUNKS = [None, "1", "3"]


def make_inputs(cell, T, B, H, I, dtype, lengths, b_ih, seed=0):
    """x, w_ih, b_ih, h0, c0, w_hh, b_hh, lengths: random, never zeros; unsorted lengths."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[B // 2] = T
    return [r(T, B, I), r(G * H, I, s=1.0 / I**0.5), r(G * H) if b_ih else None, r(B, H),
            r(B, H) if cell == "lstm" else None, r(G * H, H, s=1.0 / H**0.5), r(G * H), lens]


def projected(cell, args, reverse, save):
    return torch.ops.fused_rnn.recurrence_forward_projected(cell, *args[:7], None, args[7], reverse, save)


def on_linear_gx(cell, args, reverse, save):
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, lens = args
    return torch.ops.fused_rnn.recurrence_forward(cell, F.linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, None, lens,
                                                  reverse, save)


def reference_outputs(cell, args, reverse):
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, lens = [a.double() if a is not None and a.is_floating_point() else a
                                               for a in args]
    return reference.recurrence(cell, F.linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, None, lens, reverse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_projected_matches_linear_gx_and_reference(cell, dtype, threads, monkeypatch):
    for n, ((T, B, H, I), (reverse, lengths, save)) in enumerate(
            itertools.product(SIZES, itertools.product((False, True), repeat=3))):
        chunk = CHUNKS[n % len(CHUNKS)]
        if chunk is None:
            monkeypatch.delenv("FUSED_RNN_CPU_PROJ_CHUNK", raising=False)
        else:
            monkeypatch.setenv("FUSED_RNN_CPU_PROJ_CHUNK", chunk)
        args = make_inputs(cell, T, B, H, I, dtype, lengths, b_ih=n % 4 != 3, seed=n)
        what = f"{cell} {dtype} T={T} B={B} H={H} I={I} rev={reverse} len={lengths} save={save} chunk={chunk}"
        got = projected(cell, args, reverse, save)
        want = on_linear_gx(cell, args, reverse, save)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: output {i}"
            if a.numel():
                assert_close(a, b, dtype, f"{what}: output {i} against the op on F.linear's gx")
                err = (a.double() - b.double()).abs().max().item()
                assert err <= TIGHT[dtype] * max(1.0, b.double().abs().max().item()), f"{what}: output {i}: {err:.3g}"
        if save and cell in ("lstm", "gru"):
            assert got[3].numel() == T * B * 4 * H
        y, h_n, c_n = reference_outputs(cell, args, reverse)
        for i, (a, b) in enumerate(zip(got[:3], (y, h_n, c_n))):
            if b is not None:
                assert_close(a, b, dtype, f"{what}: output {i} against the reference")


@pytest.mark.parametrize("chunk", [None, "2"])
@pytest.mark.parametrize("cell", CELLS)
def test_projected_fused_equals_per_step_kernels(cell, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setenv("FUSED_RNN_CPU_PROJ_CHUNK", chunk)
    for reverse in (False, True):
        args = make_inputs(cell, T=7, B=5, H=33, I=20, dtype=torch.float64, lengths=True, b_ih=True)
        fused = projected(cell, args, reverse, True)
        monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "per-step")
        per_step = projected(cell, args, reverse, True)
        monkeypatch.setenv("FUSED_RNN_CPU_KERNEL", "fused")
        for i, (a, b) in enumerate(zip(fused, per_step)):
            assert a.shape == b.shape
            if a.numel():
                assert_close(a, b, torch.float64, f"rev={reverse} output {i}")
                assert (a - b).abs().max().item() <= TIGHT[torch.float64] * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_projected_runs_are_bitwise_repeatable(cell, dtype, threads, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CPU_PROJ_CHUNK", "4")
    args = make_inputs(cell, T=9, B=7, H=70, I=30, dtype=dtype, lengths=True, b_ih=True)
    first = projected(cell, args, True, True)
    for _ in range(3):
        for a, b in zip(first, projected(cell, args, True, True)):
            assert torch.equal(a, b)


def test_projected_default_chunk_spans_several_chunks():
    """B=64, H=256 LSTM fp32: one step of gx is 256 KB, so the default chunk is a couple of steps and
    T=9 takes several chunks with a partial last one."""
    args = make_inputs("lstm", T=9, B=64, H=256, I=100, dtype=torch.float32, lengths=True, b_ih=False)
    for reverse in (False, True):
        got = projected("lstm", args, reverse, True)
        want = on_linear_gx("lstm", args, reverse, True)
        for i, (a, b) in enumerate(zip(got, want)):
            if a.numel():
                assert_close(a, b, torch.float32, f"rev={reverse} output {i}")


def test_projected_bad_inputs_raise():
    args = make_inputs("gru", T=4, B=2, H=5, I=3, dtype=torch.float32, lengths=False, b_ih=True)
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, lens = args

    def call(**kw):
        a = dict(x=x, w_ih=w_ih, b_ih=b_ih, h0=h0, w_hh=w_hh)
        a.update(kw)
        return torch.ops.fused_rnn.recurrence_forward_projected("gru", a["x"], a["w_ih"], a["b_ih"], a["h0"], None,
                                                                a["w_hh"], b_hh, None, None, False, False)

    assert torch.isfinite(call()[0]).all()
    with pytest.raises(RuntimeError, match="w_ih must be"):
        call(w_ih=w_ih[:, :2])
    with pytest.raises(RuntimeError, match="w_ih must be"):
        call(w_ih=w_ih[:-1])
    with pytest.raises(RuntimeError, match="w_ih is"):
        call(w_ih=w_ih.double())
    with pytest.raises(RuntimeError, match="b_ih must be"):
        call(b_ih=b_ih[:-1])
    with pytest.raises(RuntimeError, match="b_ih must be"):
        call(b_ih=b_ih.double())
    with pytest.raises(RuntimeError, match="x must be"):
        call(x=x[0])
    with pytest.raises(RuntimeError, match="h0 is"):
        call(h0=h0.double())
    with pytest.raises(RuntimeError, match="h0 must be"):
        call(h0=h0[:1])


def aten_ops_called(fn):
    """Names of the aten ops fn dispatches (also from inside the C++ op: RecordFunction sees them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


@pytest.mark.parametrize("T, B, H, dtype, inside", [(33, 64, 1024, torch.float32, "on AMD with AVX-512"),
                                                    (9, 13, 37, torch.float32, "on AMD, or AVX-512 and small weights"),
                                                    (9, 3, 600, torch.float32, "on AMD with AVX-512"),
                                                    (9, 13, 37, torch.bfloat16, "via fp32"),
                                                    (65, 64, 1024, torch.bfloat16, "via fp32")])
def test_default_projects_inside_only_where_the_loop_is_faster(T, B, H, dtype, inside, monkeypatch):
    """Without FUSED_RNN_CPU_PROJECTION the op projects inside the loop for fp32 on an AMD CPU with
    AVX-512 at any size, with AVX2 while w_ih and w_hh take <= 4 MB (MKL's fp32 GEMM is slower there;
    H=600 I=100: 6.7 MB), fp32 on another CPU with AVX-512 while they take <= 1 MB (H=37 I=100: 81 KB),
    and 16-bit dtypes where torch's GEMM of that dtype is a scalar loop (csrc/cpu/half_gemm.h), and
    runs one GEMM first otherwise, however large gx is (T=33 B=64 H=1024 fp32 LSTM: 34.6 MB, into
    recycled memory) (csrc/cpu/cpu_routes.h project_inside; input_projection: addmm, or mm without
    b_ih); either way the outputs are those of the op on F.linear's gx."""
    from fused_rnn import _C
    if inside == "on AMD, or AVX-512 and small weights":
        inside = (_C.cpu_is_amd() and _C.cpu_isa() != "default") or \
            _C.cpu_isa() in ("avx512", "avx512_bf16", "amx_bf16")
    if inside == "via fp32":
        inside = _C.cpu_gemm_via_fp32(str(dtype).removeprefix("torch."))
    if inside == "on AMD with AVX-512":
        inside = _C.cpu_is_amd() and _C.cpu_isa() in ("avx512", "avx512_bf16", "amx_bf16")
    monkeypatch.delenv("FUSED_RNN_CPU_PROJECTION")
    args = make_inputs("lstm", T=T, B=B, H=H, I=100, dtype=dtype, lengths=True, b_ih=True)
    called = aten_ops_called(lambda: projected("lstm", args, False, False))
    assert bool({"aten::addmm", "aten::mm"} & called) != inside, sorted(called)
    got = projected("lstm", args, False, False)
    for i, (a, b) in enumerate(zip(got, on_linear_gx("lstm", args, False, False))):
        if a.numel():
            assert_close(a, b, dtype, f"output {i}")
