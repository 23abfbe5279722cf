"""The `cpu` backend: C++ kernels (csrc/cpu/) on CPU tensors, float32/float64/bfloat16/float16.

Zoneout and the layer-normalised LSTM/GRU (OPTIONS) run in the per-step kernels
(csrc/recurrence_step.h, forward_row_options / backward_row_options: one row's phases per call,
the layer norm's statistics a reduction over the row); the fused CPU recurrence
(csrc/cpu/fused_cpu_kernels.h) is not chosen for them. Neither combines with a projection.

The backend takes the input projection (TAKES_PROJECTION): a plain layer hands it (x, w_ih, b_ih)
instead of gx, and fused_rnn::recurrence_forward_projected computes x w_ih^T inside the op, so no
[T,B,G*H] gx is allocated for the whole sequence."""
import torch

from . import ops

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

OPTIONS = ops.OPTIONS  # zoneout, layer_norm (fused_rnn/backends.py routes by them)
unavailable_option_reason = ops.unavailable_option_reason
TAKES_PROJECTION = True  # recurrence(..., projection=(x, w_ih, b_ih)) with gx None (fused_rnn/backends.py)


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None,
               projection=None):
    """The recurrence contract (fused_rnn/backends.py); zoneout and layer_norm as the reference's."""
    return ops.recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout, layer_norm, projection)


def unavailable_reason(device, dtype, cell, has_proj):
    err = ops.load_error()
    if err is not None:
        return err
    if torch.device(device).type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {torch.device(device).type}"
    if dtype not in DTYPES:
        return f"the cpu backend does not support {dtype}"
    return None
