"""The cell-step ops of csrc/cell_step.cpp: fake kernels (torch.compile) and the call used by
functional.cell_step.

    fused_rnn::cell_step(cell, input, hx, cx?, w_ih, w_hh, b_ih?, b_hh?) -> (h', c' | [0])

is one step of LSTMCell/GRUCell/RNNCell, input projection included; its autograd is registered
in C++ (cell_step_forward / cell_step_backward), so a call costs no Python beyond this module's
one line. The modules call it eagerly through CELL_STEP (fused_rnn._C.cell_step), which skips
torch.ops' argument parsing and checks the arguments in C++. CPU tensors only; other devices take
the recurrence path (functional.cell_step).

The layer modules' eager CPU calls likewise go through LAYER_FORWARD (fused_rnn._C.layer_forward,
csrc/layer_entry.cpp): functional.rnn's stack of fused_rnn::recurrence_forward_projected ops in C++,
recorded for autograd by a C++ node per layer and direction when a gradient is needed
(csrc/projected_autograd.cpp).
"""
import os

import torch

from ... import backends
from . import ops

_registered = None  # None: not tried yet; else whether the ops are there
# fused_rnn._C.cell_step once available() is True: the modules' eager call of the op, None where
# torch.nn's cell would raise (csrc/cell_step.cpp, "eager entry from Python")
CELL_STEP = None
# fused_rnn._C.layer_forward once available() is True: the layer modules' eager call (training
# included), None where torch.nn's layer would raise (csrc/layer_entry.cpp)
LAYER_FORWARD = None
_runs = {}          # (backend, $FUSED_RNN_BACKEND, dtype, cell, has_proj) -> runs_on_cpu's answer
# os.environ.get costs ~2 us when the variable is unset (a KeyError raised and caught inside it);
# the mapping's own dict, which os.environ keeps in step with every change, answers in 0.1 us.
_ENVIRON = os.environ._data
_ENV_KEY = os.environ.encodekey(backends.ENV_VAR)


def available():
    """Whether fused_rnn._C is loaded, current, and has the cell-step ops (registers their fakes once)."""
    global _registered
    if _registered is None:
        _registered = ops.load_error() is None and hasattr(torch.ops.fused_rnn, "cell_step")
        if _registered:
            _register()
    return _registered


# torch.compile evaluates the choice once at trace time (as backends.resolve), so probing the build
# never appears in a compiled graph.
@torch.compiler.assume_constant_result
def runs_on_cpu(backend, dtype, cell, has_proj=False):
    """Whether a CPU call of `cell` in `dtype` (with a projection: has_proj) asked of `backend` runs
    on the `cpu` backend's ops (fused_rnn::cell_step, or a layer's LAYER_FORWARD): when the backend
    resolves to `cpu` and the build is there. Cached: a decoder asks every step."""
    key = (backend, _ENVIRON.get(_ENV_KEY) if backend == "auto" else None, dtype, cell, has_proj)
    runs = _runs.get(key)
    if runs is None:
        runs = _runs[key] = backends._resolve(backend, "cpu", dtype, cell, has_proj) == "cpu" and available()
    return runs


def _gates(cell):
    return ops.GATES[cell]


def _fake_cell_step_forward(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, save):
    B, H = hx.shape
    c = input.new_empty(B, H) if cell == "lstm" else input.new_empty(0)
    gates = input.new_empty(B, 4 * H) if save and cell in ("lstm", "gru") else input.new_empty(0)
    return input.new_empty(B, H), c, gates


def _fake_cell_step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    h, c, _ = _fake_cell_step_forward(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, False)
    return h, c


def _fake_cell_step_backward(cell, dh, dc, input, hx, cx, w_ih, w_hh, h_new, c_new, gates):
    GH = _gates(cell) * hx.shape[1]
    d_cx = hx.new_empty(hx.shape) if cell == "lstm" else hx.new_empty(0)
    return (input.new_empty(input.shape), hx.new_empty(hx.shape), d_cx, w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), w_ih.new_empty(GH), w_ih.new_empty(GH))


def _register():
    global CELL_STEP, LAYER_FORWARD
    CELL_STEP = ops._C.cell_step
    LAYER_FORWARD = ops._C.layer_forward
    torch.library.register_fake("fused_rnn::cell_step")(_fake_cell_step)
    torch.library.register_fake("fused_rnn::cell_step_forward")(_fake_cell_step_forward)
    torch.library.register_fake("fused_rnn::cell_step_backward")(_fake_cell_step_backward)
