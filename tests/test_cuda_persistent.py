"""The persistent CUDA kernels (csrc/cuda/persistent.cu) against the reference: every cell, lengths,
reverse, hidden sizes that do and do not divide over the SMs, fp32 and bf16. GPU only."""
import pytest
import torch

from fused_rnn import reference
from fused_rnn.backends import unavailable_reason
from fused_rnn.functional import recurrence

from helpers import assert_close, grads_of
from test_backends import differentiable, make_inputs

pytestmark = pytest.mark.skipif(
    unavailable_reason("cuda", "cuda", torch.float32) is not None,
    reason=f"needs the cuda backend on a GPU: {unavailable_reason('cuda', 'cuda', torch.float32)}")


@pytest.fixture(autouse=True)
def persistent_on(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("H", [8, 133, 512])
@pytest.mark.parametrize("lengths,reverse", [(None, False), (None, True), ([9, 3, 1, 9, 6], False),
                                             ([2, 9, 9, 1, 5], True)], ids=["fwd", "rev", "len", "len-rev"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_persistent_matches_reference(cell, lengths, reverse, H, dtype):
    from fused_rnn.ops.cpp import cuda_backend
    assert cuda_backend.kernel_for(cell, dtype, H) == "persistent"
    args = make_inputs(cell, 9, 5, H, 0, lengths, reverse, True, dtype, device="cuda")
    ref_args = [a.detach().cpu().double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point()
                else a.cpu() if torch.is_tensor(a) else a for a in args]
    out = recurrence(cell, *args, backend="cuda")
    ref = reference.recurrence(cell, *ref_args)
    for o, r in zip(out, ref):
        if r is not None:
            assert_close(o, r, dtype)
    for g, w in zip(grads_of(out, differentiable(args)), grads_of(ref, differentiable(ref_args))):
        assert_close(g, w, dtype)


def test_persistent_runs_are_identical():
    args = make_inputs("lstm", 16, 7, 256, 0, None, False, True, torch.float32, device="cuda")
    a = [o for o in recurrence("lstm", *args, backend="cuda")] + list(grads_of(recurrence("lstm", *args, backend="cuda"), differentiable(args)))
    b = [o for o in recurrence("lstm", *args, backend="cuda")] + list(grads_of(recurrence("lstm", *args, backend="cuda"), differentiable(args)))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
