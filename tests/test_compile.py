"""torch.compile(fullgraph=True) goes through a model holding fused_rnn layers with no graph
break (torch.nn.LSTM cannot: dynamo refuses it), forward and backward, equal to eager."""
import pytest
import torch
from torch import nn

import fused_rnn

from helpers import assert_close


class Tagger(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.rnn = layer
        self.head = nn.Linear(2 * 6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("cls", [fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.RNN])
def test_fullgraph_compile_matches_eager(cls):
    torch.manual_seed(0)
    model = Tagger(cls(4, 6, num_layers=2, bidirectional=True, batch_first=True, backend="torch"))
    x = torch.randn(3, 5, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), model(x)
    assert_close(got, want, torch.float32)
    g_got = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    g_want = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    for a, b in zip(g_got, g_want):
        assert_close(a, b, torch.float32)


def test_torch_nn_lstm_cannot_compile_fullgraph():
    """The reason fused_rnn exists for compile: if torch.nn.LSTM ever compiles, this tells us."""
    model = Tagger(nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True))
    with pytest.raises(Exception, match="(?i)rnn|lstm"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(3, 5, 4))
