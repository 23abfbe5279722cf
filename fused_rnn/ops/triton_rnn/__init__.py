"""The `triton` backend: LSTM / GRU / RNN recurrences as Triton kernels with the time loop inside.

Runs on CUDA devices, and on CPU tensors in the Triton interpreter when TRITON_INTERPRET=1 was set
before this backend's kernels were first imported. See README.md for the kernel design.
Kernels are imported lazily (on the first recurrence), so `import fused_rnn` never compiles anything.
"""
from __future__ import annotations

import os
import sys

import torch

from ... import backends

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CPU_REASON = "triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"


def _interpreter_active() -> bool:
    """TRITON_INTERPRET=1 and, if the kernels are already decorated, decorated for the interpreter."""
    if "fused_rnn.ops.triton_rnn.launcher" in sys.modules:
        return sys.modules["fused_rnn.ops.triton_rnn.launcher"].interpreting()
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device, dtype: torch.dtype, cell: str, has_proj: bool) -> str | None:
    device = torch.device(device)
    if has_proj and cell != "lstm":
        return "only the LSTM has a projection (w_hr)"
    if cell not in CELLS:
        return f"cell {cell!r} is not supported by triton"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported by triton"
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable, with the reason
        return f"triton cannot be imported: {e}"
    if device.type == "cpu":
        return None if _interpreter_active() else CPU_REASON
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if _interpreter_active():
            return None
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            return "triton bfloat16 needs a GPU of compute capability 8.0 or newer"
        return None
    return f"triton runs on CUDA devices (or on the CPU in the interpreter), not {device.type}"


# options beyond torch.nn's that this backend implements (fused_rnn/backends.py routes by them); the
# projected LSTM runs as an LSTM on m_t with h_t = m_t @ w_hr.T outside the kernels (op.py): zoneout of
# h_t and the layer norm do not fit that split
OPTIONS = ("zoneout", "layer_norm")
unavailable_option_reason = backends.options_refused_with_projection


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None):
    """One layer, one direction (see the contract): -> y [T,B,H], h_n [B,H], c_n [B,H] | None.
    zoneout: None or (keep_h, keep_c); layer_norm: None or (gain_hh, gain_c, bias_c), as the reference's."""
    reason = unavailable_reason(gx.device, gx.dtype, cell, w_hr is not None)
    if reason is not None:
        raise RuntimeError(f"fused_rnn triton backend: {reason}")
    from .op import recurrence as _recurrence  # decorates the kernels on first use

    return _recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout, layer_norm)
