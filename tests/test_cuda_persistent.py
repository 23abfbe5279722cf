"""The persistent CUDA kernels (csrc/cuda/persistent.cu) against the reference: every cell, lengths,
reverse, hidden sizes that do and do not divide over the SMs, fp32, bf16 and fp16 — every case here runs
the persistent kernels on an H100/H200 (fp32 through 3xTF32 MMAs, or TF32 when
torch.backends.cuda.matmul.allow_tf32 is on) — and the layers their plan refuses (fp32 above H=512, a
grid the device cannot hold, float64, a projection), which run the per-step kernels. GPU only."""
import pytest
import torch

from fused_rnn.backends import unavailable_reason
from fused_rnn.functional import recurrence

from helpers import assert_close, grads_of, reference_like_kernel
from test_backends import differentiable, make_inputs

pytestmark = pytest.mark.skipif(
    unavailable_reason("cuda", "cuda", torch.float32) is not None,
    reason=f"needs the cuda backend on a GPU: {unavailable_reason('cuda', 'cuda', torch.float32)}")


@pytest.fixture(autouse=True)
def persistent_on(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")


def _check_against_reference(cell, args, dtype):
    """Every output and every gradient of the cuda backend against the float64 reference (for 16-bit
    kernels: with the state rounded as they carry it, see helpers.reference_like_kernel)."""
    ref_args = [a.detach().cpu().double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point()
                else a.cpu() if torch.is_tensor(a) else a for a in args]
    out = recurrence(cell, *args, backend="cuda")
    ref = reference_like_kernel(cell, ref_args, args[0].dtype, out)
    for o, r in zip(out, ref):
        if r is not None:
            assert_close(o, r, dtype)
    for g, w in zip(grads_of(out, differentiable(args)), grads_of(ref, differentiable(ref_args))):
        assert_close(g, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("H", [8, 133, 512])
@pytest.mark.parametrize("lengths,reverse", [(None, False), (None, True), ([9, 3, 1, 9, 6], False),
                                             ([2, 9, 9, 1, 5], True)], ids=["fwd", "rev", "len", "len-rev"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_persistent_matches_reference(cell, lengths, reverse, H, dtype):
    from fused_rnn.ops.cpp import cuda_backend
    assert cuda_backend.kernel_for(cell, dtype, H, 5).startswith("persistent")
    args = make_inputs(cell, 9, 5, H, 0, lengths, reverse, True, dtype, device="cuda")
    _check_against_reference(cell, args, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H", [45, 512])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_persistent_v2_batch_groups_match_reference(cell, H, dtype):
    """B=37: three batch groups of 16 rows, the last one short; lengths from 1 to T, reversed."""
    from fused_rnn.ops.cpp import cuda_backend
    assert cuda_backend.kernel_for(cell, dtype, H, 37).startswith("persistent")
    lengths = [(7 * b) % 9 + 1 for b in range(37)]
    args = make_inputs(cell, 9, 37, H, 0, lengths, True, True, dtype, device="cuda")
    _check_against_reference(cell, args, dtype)


@pytest.mark.parametrize("H", [45, 133, 512])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_persistent_fp32_tf32_matches_reference(cell, H, monkeypatch):
    """torch.backends.cuda.matmul.allow_tf32 on: the fp32 v2 kernels multiply TF32 operands (10-bit
    mantissas, as fp16), so fp16's tolerance; off (the default), 3xTF32 keeps fp32's (the tests above).
    B=37: two batch groups of 32 rows; lengths, reversed. (Not RNN ReLU: a pre-activation within TF32's
    rounding of 0 flips the ReLU's derivative, which no tolerance covers.)"""
    from fused_rnn.ops.cpp import cuda_backend
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert cuda_backend.kernel_for(cell, torch.float32, H, 37).startswith("persistent")
    lengths = [(7 * b) % 9 + 1 for b in range(37)]
    args = make_inputs(cell, 9, 37, H, 0, lengths, True, True, torch.float32, device="cuda")
    _check_against_reference(cell, args, torch.float16)


def _outputs_and_grads(cell, args):
    out = recurrence(cell, *args, backend="cuda")
    return [o.detach().clone() for o in out if o is not None] + list(grads_of(out, differentiable(args)))


def test_persistent_runs_are_identical():
    args = make_inputs("lstm", 16, 7, 256, 0, None, False, True, torch.float32, device="cuda")
    a, b = _outputs_and_grads("lstm", args), _outputs_and_grads("lstm", args)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("B,H,dtype", [(16, 768, torch.bfloat16), (64, 512, torch.float32)], ids=["B16-H768-bf16",
                                                                                               "B64-H512-f32"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_persistent_repeats_bitwise_and_matches_per_step(cell, B, H, dtype, monkeypatch):
    """T=512 at the benchmark shapes: three persistent runs are bitwise identical (a race or a
    missing barrier shows as a run-to-run difference; every run's memory starts NaN), and they agree
    with the per-step kernels within the dtype's tolerance."""
    from fused_rnn.ops.cpp import cuda_backend
    assert cuda_backend.kernel_for(cell, dtype, H, B).startswith("persistent")
    args = make_inputs(cell, 512, B, H, 0, [512, 300, 1, 511] * (B // 4), False, True, dtype, device="cuda")
    runs = [_outputs_and_grads(cell, args) for _ in range(3)]
    for run in runs[1:]:
        for u, v in zip(runs[0], run):
            assert torch.equal(u, v), "two persistent runs on the same inputs differ"
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "0")
    assert cuda_backend.kernel_for(cell, dtype, H, B) == "per-step (opt-in: FUSED_RNN_CUDA_PERSISTENT=1)"
    per_step = recurrence(cell, *args, backend="cuda")
    for o, p in zip(runs[0], [o for o in per_step if o is not None]):
        assert_close(o, p, dtype)


@pytest.mark.parametrize("cell,dtype,H,B,proj,why", [
    ("lstm", torch.float32, 768, 5, 0, "register-budget"),       # fp32 w_hh above H=512: A fragments > 64 regs
    ("gru", torch.float32, 1024, 5, 0, "register-budget"),
    ("lstm", torch.bfloat16, 1024, 256, 0, "not-co-resident"),   # 128 x 16 CTAs > one per SM
    ("lstm", torch.float64, 37, 5, 0, "float64"),
    ("lstm", torch.bfloat16, 37, 5, 20, "projection"),
])
def test_layers_the_plan_refuses_run_per_step(cell, dtype, H, B, proj, why):
    """Where the persistent plan does not fit, the per-step kernels run the layer, for the plan's reason,
    and match the reference."""
    from fused_rnn.ops.cpp import cuda_backend
    assert cuda_backend.kernel_for(cell, dtype, H, B, bool(proj)) == f"per-step ({why})"
    T, lengths = (4, [4, 2, 1, 3] * (B // 4)) if B > 5 else (9, [9, 3, 1, 9, 6])
    args = make_inputs(cell, T, B, H, proj, lengths, True, True, dtype, device="cuda")
    _check_against_reference(cell, args, dtype)
