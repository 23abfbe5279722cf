"""The `cuda` backend: per-step cuBLAS GEMM + one fused CUDA kernel (csrc/cuda/), float32/float64/
float16/bfloat16 (16-bit inputs compute in fp32 and keep the cell state in fp32).

With FUSED_RNN_CUDA_PERSISTENT=1 it runs the persistent kernels (csrc/cuda/persistent.cu: one
launch for all steps, w_hh in registers, tensor cores, per-step flags between CTAs) wherever their
plan fits the layer (csrc/cuda/persistent_plan.h): bf16/fp16, and fp32 up to H=512, without a
projection on sm_80+, whose grid the device holds at once at the batch size given; elsewhere the
per-step kernels. `kernel_for` says which kernels a layer gets and why. fp32 follows
torch.backends.cuda.matmul.allow_tf32, read at each call: on, TF32 MMAs (10-bit mantissas, like torch's
own TF32 matmuls); off (torch's default), 3xTF32, whose error stays at fp32 FFMA's level
(benchmarks/PERSISTENT_V2.md, shape 3). Verified on an H200, but 3–4.5× slower than their budget
(benchmarks/PERSISTENT_V2.md, NOTES.md), so they stay opt-in.

Zoneout and the layer-normalised LSTM/GRU (OPTIONS) run in the per-step kernels, one block per
batch row (the layer norm's statistics are a block reduction over the row; csrc/recurrence_step.h
forward_row_options / backward_row_options); the persistent kernels are not chosen for them.
Neither combines with a projection."""
import torch

from . import ops

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


OPTIONS = ops.OPTIONS  # zoneout, layer_norm (fused_rnn/backends.py routes by them)
unavailable_option_reason = ops.unavailable_option_reason


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None):
    """The recurrence contract (fused_rnn/backends.py); zoneout and layer_norm as the reference's."""
    return ops.recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout, layer_norm)


def kernel_for(cell, dtype, H, B, has_proj=False, device="cuda", options=()):
    """Which kernels run a layer of hidden size H at batch size B on `device`, and why:
    "persistent (tiling MTxKTxNT, math, grid XxY)" — the persistent kernels with their plan — or
    "per-step (reason)": the opt-in flag unset, an option of OPTIONS in `options` (zoneout,
    layer_norm), or the plan's verdict (float64, projection, register-budget, not-co-resident, ...:
    csrc/cuda/persistent_plan.h PlanVerdict)."""
    err = ops.load_error()  # loads fused_rnn._C, which registers the op
    if err is not None:
        raise RuntimeError(err)
    if options:
        return f"per-step ({', '.join(options)}: the per-step kernels run the options)"
    like = torch.empty(0, dtype=dtype, device=device)
    return torch.ops.fused_rnn.persistent_plan(cell, like, H, B, has_proj)


def unavailable_reason(device, dtype, cell, has_proj):
    if torch.device(device).type != "cuda":
        return "the cuda backend needs CUDA tensors"
    err = ops.load_error()
    if err is not None:
        return err
    if not ops.built_with_cuda():
        return ("fused_rnn._C was built without CUDA kernels (no nvcc or a CPU build of torch at build time); "
                "rebuild with CUDA_HOME set to the CUDA toolkit")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if dtype not in DTYPES:
        return f"the cuda backend does not support {dtype}"
    return None
