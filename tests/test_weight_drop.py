"""Weight-drop (DropConnect on the recurrent weights, as AWD-LSTM) is a plain parametrization:
fused_rnn reads its weights on every call, so a fresh mask reaches the kernels at each forward and
the gradient flows back through the mask to the raw weight, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fused_rnn
from fused_rnn.backends import unavailable_reason

from helpers import assert_close


class DropConnect(nn.Module):
    """weight -> dropout(weight): each element of the weight is zeroed with probability p (and the
    rest scaled by 1/(1-p)) at every call in training; the weight itself in eval."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, weight):
        return F.dropout(weight, self.p, self.training)


def weight_dropped(module, p=0.5, name="weight_hh_l0"):
    parametrize.register_parametrization(module, name, DropConnect(p))
    return module


def skip_unless_usable(backend, cell="lstm"):
    reason = unavailable_reason(backend, "cpu", torch.float32, cell, False)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_weight_dropped_lstm_trains(backend):
    skip_unless_usable(backend)
    torch.manual_seed(0)
    model = weight_dropped(fused_rnn.LSTM(4, 8, backend=backend))
    head = nn.Linear(8, 1)
    x, target = torch.randn(6, 5, 4), torch.randn(6, 5, 1)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=0.03)
    raw = model.parametrizations.weight_hh_l0.original
    before = raw.detach().clone()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(head(model(x)[0]), target)
        loss.backward()
        assert raw.grad is not None and raw.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(raw.detach(), before)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    # a fresh mask at every call in training; none in eval
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_weight_drop_equals_torch_nn_with_the_same_mask(backend):
    """Seeded, the fused layer and torch.nn.LSTM draw the same mask: outputs and the raw weight's
    gradient (mask/(1-p) times the dropped weight's gradient) agree."""
    skip_unless_usable(backend)
    ours = fused_rnn.LSTM(4, 8, num_layers=2, bidirectional=True, backend=backend)
    theirs = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    for m in (ours, theirs):
        weight_dropped(m, 0.3)
        weight_dropped(m, 0.3, "weight_hh_l1_reverse")
    x = torch.randn(6, 5, 4)
    results = []
    for m in (ours, theirs):
        torch.manual_seed(5)
        out = m(x)[0]
        raws = [m.parametrizations[n].original for n in ("weight_hh_l0", "weight_hh_l1_reverse")]
        results.append((out, *torch.autograd.grad(out.sin().sum(), raws)))
    for a, b in zip(*results):
        assert_close(a, b, torch.float32)
