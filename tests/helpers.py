"""Shared test helpers: tolerances from the dtype, random inputs, gradients of every input."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import fused_rnn
from fused_rnn.backends import unavailable_reason

# Tolerance per dtype, relative to the size of the expected values (see assert_close).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def assert_close(actual, expected, dtype, what=""):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise, and no NaN anywhere."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g} ({dtype})"


def torch_nn_under_autocast(module, *args):
    """torch.nn's `module(*args)` inside the current CPU autocast region. Where its LSTM has no kernel
    on this CPU (oneDNN builds no bfloat16 LSTM primitive without AVX-512: "could not create a
    primitive descriptor"), the same module run in float32 with autocast off, every output cast to
    the autocast dtype, the dtype torch.nn returns where it runs: the values then differ from its own
    by that dtype's rounding, within the dtype's tolerance."""
    try:
        return module(*args)
    except RuntimeError as e:
        if "could not create a primitive descriptor" not in str(e):
            raise
    lower = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        out = copy.deepcopy(module).float()(*(a.float() if torch.is_tensor(a) else a for a in args))

    def cast(o):
        return o.to(lower) if torch.is_tensor(o) else tuple(cast(v) for v in o)
    return cast(out)


def usable_backends(device="cpu", dtype=torch.float32, cell="lstm", has_proj=False):
    return [b for b in fused_rnn.BACKENDS if unavailable_reason(b, device, dtype, cell, has_proj) is None]


def grads_of(outputs, inputs, seed=0):
    """Gradients of a random weighted sum of `outputs` w.r.t. `inputs` (None where unused)."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        if o is not None:
            loss = loss + (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum()
    return torch.autograd.grad(loss, list(inputs), allow_unused=True, retain_graph=True)


def argument_variants(base, cases):
    """(what, a copy of the argument list `base` with cases[what]'s {index: value} changes) for each case."""
    for what, change in cases.items():
        args = list(base)
        for i, v in change.items():
            args[i] = v
        yield what, args


class TensorSubclass(torch.Tensor):
    """A tensor subclass, which the modules' eager entries must leave to torch.ops (it may override
    __torch_function__)."""


def run_with_cpu_isa(isa, script):
    """Runs `script` in a fresh Python with FUSED_RNN_CPU_ISA=isa (the kernels built per instruction
    set are chosen once per process) and asserts it printed "ok"; skips an ISA this CPU lacks."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if isa != "default" and f" {isa}" not in flags.replace("avx512f", "avx512"):
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, FUSED_RNN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def reference_like_kernel(cell, ref_args, dtype, out, rounds="state", rounding="nearest", **options):
    """The float64 reference for a kernel that ran in `dtype` and returned `out` (y first): for
    fp16/bf16 it rounds what the kernel rounds, and each ReLU takes the branch the kernel took
    (y > 0) — otherwise the reference drifts where the recurrence amplifies the rounding, and a
    pre-activation within float32 rounding of 0 flips a ReLU's derivative, which no tolerance covers.
    rounds: "state", h rounded to `dtype` after every step (the C++ kernels carry it so), or
    "operands", only the recurrent product's operands (the Triton kernels keep h and dh in fp32 and
    exchange h forward, the product's gradient backward, in `dtype`; reference.recurrence's
    operand_dtype, `rounding` its mode; a projected LSTM's product reads another operand: there the
    plain reference). fp32/fp64 kernels get the plain reference. options: zoneout=, layer_norm=."""
    from fused_rnn import reference
    sixteen = dtype in (torch.float16, torch.bfloat16)
    branch = (out[0].detach().to(ref_args[0].device) > 0) if sixteen and cell == "rnn_relu" else None
    rounded = {}
    if sixteen and rounds == "state":
        rounded = {"state_dtype": dtype}
    elif sixteen and ref_args[5] is None:  # ref_args[5]: w_hr
        rounded = {"operand_dtype": dtype, "operand_rounding": rounding}
    return reference.recurrence(cell, *ref_args, relu_branch=branch, **rounded, **options)
