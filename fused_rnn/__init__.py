"""fused_rnn: drop-in torch.nn.LSTM/GRU/RNN on fused kernels with analytic backpropagation through time.

    from fused_rnn import LSTM          # instead of torch.nn.LSTM
    lstm = LSTM(256, 512, num_layers=2, batch_first=True)

See README.md for backends and the speed table, DESIGN.md (in the project's shared notes) for the architecture.
"""
from . import functional
from .backends import BACKENDS, available_backends
from .layer_norm import LayerNormGRU, LayerNormLSTM
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU", "functional",
           "available_backends", "BACKENDS", "__version__"]
