"""The `cpu` backend: C++ kernels (csrc/cpu/) on CPU tensors, float32/float64/bfloat16/float16."""
import torch

from . import ops

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse):
    """The recurrence contract (fused_rnn/backends.py)."""
    return ops.recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse)


def unavailable_reason(device, dtype, cell, has_proj):
    err = ops.load_error()
    if err is not None:
        return err
    if torch.device(device).type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {torch.device(device).type}"
    if dtype not in DTYPES:
        return f"the cpu backend does not support {dtype}"
    return None
