"""Layer-normalised LSTM and GRU (Ba et al. 2016; as Haste's LayerNormLSTM).

LSTM, per step (LN over all 4H of each part, each with its own gain; b_ih and b_hh are the biases
of the two LNs, exactly torch.nn.LSTM's two bias vectors):

    gates = LN(W_ih x) * gain_ih + b_ih  +  LN(W_hh h) * gain_hh + b_hh
    c' = σ(f) c + σ(i) tanh(g),     h' = σ(o) tanh(LN(c') * gain_c + bias_c)

GRU (LN over all 3H of each part):

    gx = LN(W_ih x) * gain_ih + b_ih,     gh = LN(W_hh h) * gain_hh + b_hh
    r = σ(gx_r + gh_r),  z = σ(gx_z + gh_z),  n = tanh(gx_n + r ⊙ gh_n),  h' = (1 - z) n + z h

The GRU keeps torch.nn.GRU's r ⊙ (W_hn h + b_hn) form with the normalised recurrent part in its
place: the recurrent contribution is normalised as a whole before the reset gate scales its n
rows, so the parameters keep torch's meaning and layout, and the recurrence keeps the shape every
backend already implements (gh computed once per step, n reading gh_n).

The input-side LN runs over all steps at once, outside the recurrence (one GEMM, one layer_norm);
the recurrent LN is a per-row reduction inside each step of the `torch` backend's recurrence and
its analytic backward (ops/torch_bptt), and inside the `triton` backend's fused step kernels and
their backward (ops/triton_rnn; one program holds a whole row). The `cpu` and `cuda` backends do
not implement it (`auto` passes over them; `reference` is the oracle). Double backward on every
backend that runs it: fused_rnn/double_backward.py recomputes the layer, input-side LN included,
in differentiable ops when the backward runs with create_graph=True.

Parameters: torch.nn's (weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}, same shapes and
initialisation) plus, per layer and direction, ln_gain_ih_l{k} [G*H], ln_gain_hh_l{k} [G*H] and for
the LSTM ln_gain_c_l{k}, ln_bias_c_l{k} [H]: gains initialised to 1 and biases to 0, as the paper.
"""
import torch
from torch import nn

from .modules import GRU, LSTM


class _LayerNormMixin:
    def _add_layer_norm_parameters(self, with_cell):
        self._ln_names = []
        G = 4 if with_cell else 3
        factory = {"device": self.weight_hh_l0.device, "dtype": self.weight_hh_l0.dtype}
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[:2 if self.bidirectional else 1]:
                names = [f"ln_gain_ih_l{layer}{suffix}", f"ln_gain_hh_l{layer}{suffix}"]
                shapes = [G * self.hidden_size, G * self.hidden_size]
                if with_cell:
                    names += [f"ln_gain_c_l{layer}{suffix}", f"ln_bias_c_l{layer}{suffix}"]
                    shapes += [self.hidden_size, self.hidden_size]
                for name, n in zip(names, shapes):
                    self.register_parameter(name, nn.Parameter(torch.empty(n, **factory)))
                self._ln_names.append(names)
        self._reset_layer_norm_parameters()

    def _reset_layer_norm_parameters(self):
        with torch.no_grad():
            for names in self._ln_names:
                for name in names:
                    getattr(self, name).fill_(0.0 if name.startswith("ln_bias") else 1.0)

    def reset_parameters(self):
        super().reset_parameters()  # torch.nn's uniform init of every parameter, then the paper's
        if hasattr(self, "_ln_names"):
            self._reset_layer_norm_parameters()

    def _layer_norm_weights(self):
        # read on every call, so functional_call and parametrizations see the current tensors
        return [[getattr(self, n) for n in names] + [None] * (4 - len(names)) for names in self._ln_names]


def _refuse_proj(kwargs, name):
    if kwargs.get("proj_size", 0):
        raise ValueError(f"proj_size is not supported by {name}")
    kwargs.pop("proj_size", None)


class LayerNormLSTM(_LayerNormMixin, LSTM):
    """Layer-normalised LSTM: torch.nn.LSTM's constructor (without proj_size) plus zoneout= and
    backend=; inputs and outputs as torch.nn.LSTM's (PackedSequence, unbatched, batch_first)."""

    def __init__(self, *args, backend="auto", zoneout=0.0, **kwargs):
        _refuse_proj(kwargs, "LayerNormLSTM")
        if len(args) > 7:
            raise TypeError("LayerNormLSTM takes at most 7 positional arguments (it has no proj_size); "
                            "pass device and dtype by keyword")
        super().__init__(*args, backend=backend, zoneout=zoneout, **kwargs)
        self._add_layer_norm_parameters(with_cell=True)


class LayerNormGRU(_LayerNormMixin, GRU):
    """Layer-normalised GRU: torch.nn.GRU's constructor plus zoneout= and backend=."""

    def __init__(self, *args, backend="auto", zoneout=0.0, **kwargs):
        _refuse_proj(kwargs, "LayerNormGRU")
        super().__init__(*args, backend=backend, zoneout=zoneout, **kwargs)
        self._add_layer_norm_parameters(with_cell=False)
