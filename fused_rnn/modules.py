"""Drop-in modules: fused_rnn.LSTM/GRU/RNN and LSTMCell/GRUCell/RNNCell.

Same constructor, parameters (names, shapes, order, initialisation), inputs, outputs and errors
as torch.nn's, so state_dicts load both ways. The layers subclass torch.nn.RNNBase, which creates
the parameters, `_flat_weights` and `flatten_parameters`; they do not subclass nn.LSTM/GRU/RNN,
because torch.compile refuses any instance of those ("Attempted to wrap RNN, GRU, or LSTM").
Weights are read on every call, so torch.func.functional_call and parametrizations work.
"""
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional
from .backends import _check_name
from .cell_math import MODE_TO_CELL
from .ops.cpp import cell_ops


class _FusedRNNBase(nn.RNNBase):
    """Forward for every mode: unbatched / batched / packed input in, the same out as torch.nn."""

    zoneout = 0.0  # LSTM and GRU take zoneout=p (functional.zoneout_keep); RNN has none

    def _set_backend(self, backend):
        _check_name(backend)
        self.backend = backend

    def _set_zoneout(self, zoneout):
        functional.check_zoneout(zoneout)
        self.zoneout = float(zoneout)

    def _layer_norm_weights(self):
        """Per layer and direction, the layer-norm parameters (fused_rnn/layer_norm.py), or None."""
        return None

    def extra_repr(self):
        s = super().extra_repr()
        if self.zoneout:
            s += f", zoneout={self.zoneout}"
        return s if self.backend == "auto" else s + f", backend={self.backend!r}"

    def _check_hx_dims(self, hx, is_batched):
        want = 3 if is_batched else 2
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        if self.mode == "LSTM":
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        elif hx.dim() != want:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")

    def _zero_state(self, input, batch):
        num_directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = torch.zeros(self.num_layers * num_directions, batch, out_size, dtype=input.dtype, device=input.device)
        if self.mode != "LSTM":
            return h
        c = torch.zeros(self.num_layers * num_directions, batch, self.hidden_size,
                        dtype=input.dtype, device=input.device)
        return h, c

    def forward(self, input, hx=None):
        out = self._fused_call(input, hx)
        if out is not None:
            return out
        self._update_flat_weights()
        is_lstm = self.mode == "LSTM"
        orig_input = input
        lengths = None
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = orig_input
            is_batched, batch_first = True, False
            hx = self._zero_state(input, int(batch_sizes[0])) if hx is None else self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(input, hx, batch_sizes)
            # packed data is sorted by length, longest first: pad it, and pack the output back the same way
            input, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))   # [T,B,I], [B]
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                name = "RNN" if self.mode.startswith("RNN") else self.mode
                tensor = " tensor" if name == "RNN" else ""
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            is_batched = input.dim() == 3
            batch_first = self.batch_first
            batch_dim = 0 if batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is None:
                hx = self._zero_state(input, input.size(batch_dim))
            else:
                self._check_hx_dims(hx, is_batched)
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if is_lstm else hx.unsqueeze(1)
            self.check_forward_args(input, hx, None)

        h0, c0 = hx if is_lstm else (hx, None)
        output, h_n, c_n = functional.rnn(
            MODE_TO_CELL[self.mode], input, h0, c0, self._flat_weights, self.bias, self.num_layers,
            float(self.dropout), self.training, self.bidirectional, batch_first, lengths, self.backend,
            self.zoneout, self._layer_norm_weights())
        hidden = (h_n, c_n) if is_lstm else h_n

        if isinstance(orig_input, PackedSequence):
            data = pack_padded_sequence(output, lengths).data
            return PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return output, hidden

    def _fused_call(self, input, hx):
        """The common eager call on CPU tensors (inference, a decoder stepping the layer under
        torch.no_grad(), training) straight into fused_rnn._C.layer_forward (csrc/layer_entry.cpp):
        the same stack as functional.rnn, bit for bit, its graph and gradients too, without its
        Python. What is checked here is what C++ cannot see: autocast, tracing, forward-mode AD,
        dropout, zoneout, layer norm, the backend's choice, weights that are not plain parameters (a
        parametrization); C++ checks the tensors and returns None where torch.nn would raise. None
        sends the call down the full path."""
        if type(input) is not torch.Tensor:  # a PackedSequence, a tensor subclass
            return None
        params = self._parameters
        if (self.zoneout or (self.dropout and self.training and self.num_layers > 1)
                or torch.is_autocast_enabled("cpu") or forward_ad._current_level >= 0
                or torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or self._layer_norm_weights() is not None):
            return None
        cell = MODE_TO_CELL[self.mode]
        if not cell_ops.runs_on_cpu(self.backend, input.dtype, cell, self.proj_size > 0):
            return None
        if cell != "lstm":
            h, c = hx, None
        elif hx is None:
            h = c = None
        elif type(hx) is tuple and len(hx) == 2:
            h, c = hx
        else:
            return None
        weights = [params.get(name) for name in self._flat_weights_names]
        if any(w is None for w in weights):
            return None  # parametrized (or deleted) weights: read through the full path
        out = cell_ops.LAYER_FORWARD(cell, input, h, c, weights, self.num_layers, self.bidirectional,
                                     self.batch_first, self.bias, self.input_size, self.hidden_size,
                                     self.proj_size)
        if out is None:
            return None
        output, h_n, c_n = out
        return output, ((h_n, c_n) if cell == "lstm" else h_n)


class LSTM(_FusedRNNBase):
    """torch.nn.LSTM on fused_rnn's kernels. Extra keywords: backend ('auto', 'cpu', 'cuda', ...)
    and zoneout (probability that a unit of h and of c keeps its previous value at a step)."""

    def __init__(self, *args, backend="auto", zoneout=0.0, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self._set_backend(backend)
        self._set_zoneout(zoneout)

    # nn.LSTM's own hidden-state checks and permutation for an (h, c) pair, reused as they are
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_FusedRNNBase):
    """torch.nn.GRU on fused_rnn's kernels. Extra keywords: backend, zoneout (on h)."""

    def __init__(self, *args, backend="auto", zoneout=0.0, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)
        self._set_backend(backend)
        self._set_zoneout(zoneout)


class RNN(_FusedRNNBase):
    """torch.nn.RNN (tanh or relu) on fused_rnn's kernels. Extra keyword: backend."""

    def __init__(self, *args, backend="auto", **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)
        self._set_backend(backend)


class _FusedCellMixin:
    """Forward for LSTMCell/GRUCell/RNNCell: torch.nn's checks and shapes, one recurrence step."""

    def _cell_forward(self, cell, name, input, hx):
        out = self._fused_step(cell, input, hx)
        if out is not None:
            return out
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        states = hx if cell == "lstm" else (hx,)
        if hx is not None:
            for idx, value in enumerate(states):
                if value.dim() not in (1, 2):
                    what = f"hx[{idx}]" if cell == "lstm" else "hidden"
                    raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            states = (zeros, zeros) if cell == "lstm" else (zeros,)
        elif not is_batched:
            states = tuple(s.unsqueeze(0) for s in states)
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for idx, s in enumerate(states):
            if s.size(0) != input.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size {s.size(0)}")
            if s.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {s.size(1)}, "
                                   f"expected {self.hidden_size}")
        functional.check_matmul_dtypes(input, self.weight_ih)
        functional._check_same_device(input, states, [self.weight_ih, self.weight_hh])
        functional.check_matmul_dtypes(states[0], self.weight_hh)  # torch.nn's h @ w_hh.T meets it first
        if cell == "lstm":
            states = (states[0], functional.promote_cell_state(input, states[1]))
        functional._check_hidden_dtype(input, states)
        h, c = functional.cell_step(cell, input, states[0], states[1] if cell == "lstm" else None,
                                    self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.backend)
        if not is_batched:
            h, c = h.squeeze(0), (None if c is None else c.squeeze(0))
        return (h, c) if cell == "lstm" else h


    def _fused_step(self, cell, input, hx):
        """The common eager call straight into fused_rnn::cell_step: batched CPU input and a state
        of the module's sizes, dtype and device, no autocast. Anything else returns None and takes
        the full path above, whose checks give torch.nn's errors. What is checked here is what C++
        cannot see; cell_ops.CELL_STEP checks the tensors (and returns None) in C++, since a decoder
        pays these checks every step."""
        if (hx is None or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
                or torch._C._is_torch_function_mode_enabled()):
            return None
        if cell == "lstm":
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h, c = hx
        else:
            h, c = hx, None
        params = self._parameters
        w_ih, w_hh, b_ih, b_hh = (params.get("weight_ih"), params.get("weight_hh"),
                                  params.get("bias_ih"), params.get("bias_hh"))
        if w_ih is None or w_hh is None or (self.bias and (b_ih is None or b_hh is None)):
            return None  # parametrized weights: read through the full path
        if type(input) is not torch.Tensor or not cell_ops.runs_on_cpu(self.backend, input.dtype, cell):
            return None
        out = cell_ops.CELL_STEP(cell, input, h, c, w_ih, w_hh, b_ih, b_hh)
        if out is None:
            return None
        return out if cell == "lstm" else out[0]


class LSTMCell(_FusedCellMixin, nn.LSTMCell):
    """torch.nn.LSTMCell on fused_rnn's kernels (one step of the recurrence). Extra keyword: backend."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        _check_name(backend)
        self.backend = backend

    def forward(self, input, hx=None):
        return self._cell_forward("lstm", "LSTMCell", input, hx)


class GRUCell(_FusedCellMixin, nn.GRUCell):
    """torch.nn.GRUCell on fused_rnn's kernels. Extra keyword: backend."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        _check_name(backend)
        self.backend = backend

    def forward(self, input, hx=None):
        return self._cell_forward("gru", "GRUCell", input, hx)


class RNNCell(_FusedCellMixin, nn.RNNCell):
    """torch.nn.RNNCell on fused_rnn's kernels. Extra keyword: backend."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        _check_name(backend)
        self.backend = backend

    def forward(self, input, hx=None):
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return self._cell_forward("rnn_" + self.nonlinearity, "RNNCell", input, hx)
