"""The registered op checks its lengths itself (a 0 or a length past T would index outside the
saved tensors), with a clear error rather than a crash or a device assert."""
import pytest
import torch

from fused_rnn.ops.cpp import ops

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason=str(ops.load_error()))


@pytest.mark.parametrize("bad, match", [([3, 0], ">= 1"), ([3, 4], "must not exceed")])
@pytest.mark.parametrize("reverse", [False, True])
def test_op_refuses_lengths_out_of_range(bad, match, reverse):
    T, B, H = 3, 2, 4
    gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    w_hh = torch.randn(4 * H, H)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fused_rnn.recurrence_forward("lstm", gx, h0, c0, w_hh, None, None, torch.tensor(bad), reverse, True)
