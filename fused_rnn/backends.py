"""Which implementation of the recurrence runs: the registry, `auto`, and `available_backends()`.

A backend is a module with two functions (the contract every kernel implements):

    recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse) -> (y, h_n, c_n)
        cell     "lstm" | "gru" | "rnn_tanh" | "rnn_relu"  (G = 4 | 3 | 1 | 1 gates)
        gx       [T, B, G*H]  x @ w_ih.T + b_ih for every step (the caller's one big GEMM)
        h0       [B, Hout]    Hout = proj_size for a projected LSTM, else H
        c0       [B, H] (LSTM) or None
        w_hh     [G*H, Hout];  b_hh [G*H] or None;  w_hr [Hout, H] or None (LSTM projection)
        lengths  int64 [B] on gx's device, 1 <= lengths[b] <= T, or None: past its length a
                 sequence's state stays frozen and its outputs are zero
        reverse  process t = T-1 ... 0
        returns  y [T, B, Hout] in gx's dtype, h_n [B, Hout], c_n [B, H] or None;
                 differentiable in gx, h0, c0, w_hh, b_hh, w_hr.
    unavailable_reason(device, dtype, cell, has_proj) -> None if it can run that, else why not.
    OPTIONS (optional) -> names of the options beyond torch.nn's it implements, each a keyword
        argument of its recurrence: ("zoneout",) takes zoneout=(keep_h [T,B,Hout], keep_c [T,B,H]
        or None) as in fused_rnn/reference.py. A backend without an option is never handed it:
        asked for explicitly it refuses with that reason, and `auto` passes over it.
    unavailable_option_reason(options, cell, has_proj) (optional) -> None, or why the backend cannot
        run these OPTIONS in this configuration (routed like a missing option).
    TAKES_PROJECTION (optional, default False) -> True when its recurrence also takes the input
        projection: recurrence(cell, None, ..., projection=(x [T,B,I], w_ih [G*H,I], b_ih [G*H] or
        None)) computes gx = x @ w_ih.T + b_ih itself (inside its op, without a [T,B,G*H] gx for the
        whole sequence) and is differentiable in x, w_ih, b_ih as well. fused_rnn/functional.py
        resolves the backend first and hands it the projection for a layer without zoneout or layer
        norm; every other backend, and those calls, get gx.

Layers, directions, dropout, PackedSequence, batch_first and unbatched input are handled above,
in fused_rnn/functional.py and fused_rnn/modules.py; a backend never sees them.
"""
import importlib
import os
import warnings
from typing import NamedTuple

import torch

# name -> module implementing the contract; imported lazily so a missing build or a missing
# triton never breaks `import fused_rnn`.
BACKEND_MODULES = {
    "reference": "fused_rnn.reference",
    "torch": "fused_rnn.ops.torch_bptt",
    "cpu": "fused_rnn.ops.cpp.cpu_backend",
    "cuda": "fused_rnn.ops.cpp.cuda_backend",
    "triton": "fused_rnn.ops.triton_rnn",
}
BACKENDS = tuple(BACKEND_MODULES)

# What `auto` tries, fastest first, by device type. `reference` is never chosen automatically.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
DEFAULT_AUTO_ORDER = ("torch",)

ENV_VAR = "FUSED_RNN_BACKEND"

_modules = {}        # name -> (module or None, import error)
_resolved = {}       # (requested, device type, dtype, cell, has_proj) -> backend name
_warned = set()


# Why the kernel backends (cpu, cuda, triton) refuse zoneout and layer norm for a projected LSTM:
# their kernels fuse both into the step of h = o * tanh(c), which the projection splits off.
OPTIONS_WITH_PROJ_REASON = "zoneout and layer norm are not implemented for a projected LSTM (proj_size > 0)"


def options_refused_with_projection(options, cell, has_proj):
    """An unavailable_option_reason for backends whose options stop at a projection."""
    return OPTIONS_WITH_PROJ_REASON if options and has_proj else None


class BackendStatus(NamedTuple):
    available: bool
    reason: str      # why not, or what it is when available


def _module(name):
    if name not in _modules:
        try:
            module = importlib.import_module(BACKEND_MODULES[name])
            missing = [f for f in ("recurrence", "unavailable_reason") if not hasattr(module, f)]
            _modules[name] = (None, f"{BACKEND_MODULES[name]} lacks {', '.join(missing)}") if missing \
                else (module, None)
        except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable, with the reason kept
            _modules[name] = (None, f"{BACKEND_MODULES[name]} could not be imported: {type(e).__name__}: {e}")
    return _modules[name]


def unavailable_reason(name, device, dtype, cell="lstm", has_proj=False, options=()):
    """None when backend `name` can run this configuration, else a sentence saying why not.
    options: names of options beyond torch.nn's that the call uses (e.g. ("zoneout",))."""
    module, error = _module(name)
    if module is None:
        return error
    missing = [o for o in options if o not in getattr(module, "OPTIONS", ())]
    if missing:
        return f"the {name} backend does not implement {', '.join(missing)} (the torch backend does)"
    option_reason = getattr(module, "unavailable_option_reason", None)  # optional: options x configuration
    reason = option_reason(options, cell, has_proj) if options and option_reason else None
    if reason is not None:
        return reason
    return module.unavailable_reason(torch.device(device), dtype, cell, has_proj)


def available_backends(device="cpu", dtype=torch.float32):
    """Every backend with whether it can run an LSTM on `device` in `dtype`, and why not."""
    out = {}
    for name in BACKENDS:
        reason = unavailable_reason(name, device, dtype)
        out[name] = BackendStatus(reason is None, reason or "available")
    return out


def _check_name(name):
    if name != "auto" and name not in BACKEND_MODULES:
        raise ValueError(f"unknown fused_rnn backend {name!r}; choose one of 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))


def resolve(backend, device, dtype, cell, has_proj, options=()):
    """See _resolve; the device is passed on as its type string, a constant for torch.compile."""
    return _resolve(backend, device.type, dtype, cell, has_proj, tuple(options))


# torch.compile evaluates the choice once at trace time and bakes the answer into the graph, so
# importing and probing backends never appears inside a compiled model (and never breaks its graph).
@torch.compiler.assume_constant_result
def _resolve(backend, device_type, dtype, cell, has_proj, options=()):
    """The backend name that will run: `backend`, else $FUSED_RNN_BACKEND, else `auto`'s choice.

    An explicitly requested backend that cannot run raises and says why; `auto` falls back to the
    next in AUTO_ORDER and says once which it took.
    """
    requested = os.environ.get(ENV_VAR, "auto") if backend == "auto" else backend
    key = (requested, device_type, dtype, cell, has_proj, options)
    if key in _resolved:
        return _resolved[key]
    _check_name(requested)
    if requested != "auto":
        reason = unavailable_reason(requested, device_type, dtype, cell, has_proj, options)
        if reason is not None:
            raise RuntimeError(f"fused_rnn backend {requested!r} cannot run {cell} on {device_type} "
                               f"in {dtype}: {reason}")
        chosen = requested
    else:
        order = AUTO_ORDER.get(device_type, DEFAULT_AUTO_ORDER)
        skipped = []
        for name in order:
            reason = unavailable_reason(name, device_type, dtype, cell, has_proj, options)
            if reason is None:
                chosen = name
                break
            skipped.append(f"{name!r} ({reason})")
        else:  # pragma: no cover - the torch backend runs everywhere
            raise RuntimeError("no fused_rnn backend can run here: " + "; ".join(skipped))
        if skipped and (device_type, chosen) not in _warned:
            _warned.add((device_type, chosen))
            warnings.warn(f"fused_rnn: auto uses backend {chosen!r} on {device_type}; skipped "
                          + "; ".join(skipped), stacklevel=3)
    _resolved[key] = chosen
    return chosen


def get(name):
    """The module implementing backend `name` (already resolved, so it imports)."""
    return _module(name)[0]
