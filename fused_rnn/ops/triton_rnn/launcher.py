"""Launchers: tensors in, kernels launched, tensors out. No autograd here (see op.py).

How a launch is planned (once per device, shape, dtype and kernel flags; cached in _PLANS):
  * one hidden tile: one launch runs every step (a CTA barrier per step);
  * several hidden tiles: one cooperative launch with a grid barrier per step, when the compiled
    kernel's occupancy (registers, shared memory) lets every program be resident at once; the
    driver checks that again at launch and, if it refuses, the plan falls back to
  * one launch per step ("stepwise"): the launch boundary is the barrier.
Before either, the compiled kernel's shared memory is fitted to the device's per-block limit
(fewer pipelining stages, a smaller K chunk; a clear error when nothing fits): shared_fitting_config.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ...cell_math import LAYER_NORM_EPS
from .kernels import CELL_IDS, NUM_GATES, NUM_SAVED, ZONEOUT_MODES, rnn_backward_kernel, rnn_forward_kernel

# Polls of the grid barrier per step before a program gives up waiting: seconds of polling, while
# a legitimate wait (the slowest program's step) is microseconds. A timeout is an error, never a hang.
SPIN_LIMIT = 1 << 22


def _decorated_for_interpreter() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(rnn_forward_kernel, InterpretedFunction)


_INTERPRETED = _decorated_for_interpreter()


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


def _interpreter_accepts_loop_bounds():
    """triton 3.6's interpreter turns a runtime loop bound into a Python int with int() on a
    one-element NumPy array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"); triton 3.8 squeezes it first. Give the older interpreter the same
    conversion, for the duration of each interpreted call (its own patch scope restores it).
    The compiled kernels are not involved: their loop bounds are ordinary i32 kernel arguments."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "fused_rnn_index_fix", False):
        return

    def patch_with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_with_index.fused_rnn_index_fix = True
    interpreter._patch_lang_tensor = patch_with_index


if interpreting():
    _interpreter_accepts_loop_bounds()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 compute (and keep state) in fp32; float64 (gradcheck) in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32, torch.float64: tl.float64}


@dataclass(frozen=True)
class LaunchConfig:
    block_b: int
    block_h: int
    block_k: int
    num_warps: int = 4
    # "persistent": one launch runs the whole time loop (programs synchronise once per step when there
    # is more than one hidden tile: a cooperative launch, so every program is resident);
    # "stepwise": one launch per step, the launch boundary is the synchronisation.
    mode: str = "persistent"
    # software-pipelining stages of the K loop (None: triton's default); each stage holds one more
    # [BLOCK_K, BLOCK_H] chunk of every gate's weights in shared memory
    num_stages: int | None = None
    # tests only: run the inter-program barrier even with one hidden tile (the interpreter cannot run
    # more than one waiting program, but it can run the barrier code of one)
    force_sync: bool = False


def choose_config(B: int, H: int, G: int, device: torch.device, whole_row: bool = False) -> LaunchConfig:
    """Block sizes per shape: fixed small blocks in the interpreter, a heuristic on a GPU. Whether a
    multi-tile persistent launch fits is settled per compiled kernel (see _settle_mode).
    whole_row (layer norm): one program holds all hidden units of its rows, so that the per-row
    mean and variance are a reduction inside the program, with no extra exchange between programs."""
    if whole_row and not interpreting():
        # ptxas (sm_90): a whole row of 32 or 64 units over 4 warps spills (up to ~700 B of stack in the
        # LSTM backward); over 8 warps at most 48 B. Wider rows spill more (README.md).
        block_h = max(16, triton.next_power_of_2(H))
        return LaunchConfig(block_b=16, block_h=block_h, block_k=32, num_warps=8 if block_h >= 32 else 4)
    if interpreting():
        # one program per batch block covers the whole hidden size: no inter-program waits, which the
        # interpreter (programs run one after the other) could not serve
        return LaunchConfig(block_b=16, block_h=max(16, triton.next_power_of_2(H)), block_k=16)
    # ptxas (sm_90, BLOCK_K=32) keeps 16x16, 16x32 and 32x16 tiles of every cell within ~190
    # registers with no or tiny spills; 32x32 and larger spill (README.md), so tiles stay small and
    # wide hidden sizes are spread over more programs instead. BLOCK_B=16 for every B: a 16-row
    # tile is one MMA row block, and twice the programs of 32 keep more SMs busy. 4 warps: a 16-row
    # tile has too few MMA tiles for 8 warps to share (the rest would repeat the same work).
    return LaunchConfig(block_b=16, block_h=16, block_k=32, num_warps=4)


def shared_fitting_config(cfg: LaunchConfig, shared_of, limit: int) -> LaunchConfig:
    """The first of cfg, then fewer pipelining stages, then half the K chunk (down to 16), whose
    compiled kernel's shared memory (shared_of(config) -> bytes) is within `limit` (the device's
    opt-in maximum per block); a ValueError saying so when none is. The whole-row (layer norm)
    kernels hold every gate's [BLOCK_K, H] weight chunk per stage: an fp32 LSTM with H=256 needs
    260 KiB at triton's default 3 stages on sm_90 (227 KiB there, 163 KiB on sm_80)."""
    tried = []
    block_k = cfg.block_k
    while True:
        for stages in ((cfg.num_stages,) if cfg.num_stages is not None else (None, 2)) + (1,):
            candidate = replace(cfg, block_k=block_k, num_stages=stages)
            need = shared_of(candidate)
            if need <= limit:
                return candidate
            tried.append(f"block_k={block_k} num_stages={stages or 'default'}: {need} B")
        if block_k <= 16:
            raise ValueError(f"fused_rnn triton: no launch configuration fits the device's {limit} B of shared "
                             f"memory per block ({'; '.join(tried)}); the torch backend runs this shape")
        block_k //= 2


def _launch_options(cfg: LaunchConfig) -> dict:
    """The compile options of a launch (num_stages only when set: triton's default otherwise)."""
    return {"num_warps": cfg.num_warps} if cfg.num_stages is None else \
        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def blocks_per_sm(n_regs: int, shared: int, num_warps: int, props) -> int:
    """Programs of one compiled kernel that fit on one SM at once (the CUDA occupancy calculation:
    registers allocated per warp in units of 256, 1 KiB of shared memory reserved per block)."""
    if n_regs > 255 or shared > props.shared_memory_per_block_optin:
        return 0
    warp_regs = math.ceil(max(n_regs, 1) * 32 / 256) * 256
    by_regs = (props.regs_per_multiprocessor // warp_regs) // num_warps
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    by_shared = props.shared_memory_per_multiprocessor // (shared + 1024)
    return max(0, min(by_regs, by_threads, by_shared, 32))


def _check_config(cfg: LaunchConfig, B: int, G: int, H: int, nsave: int, whole_row: bool = False) -> None:
    # offsets inside one step (b * row + unit over the exchange's two buffers, the saved row stride
    # NSAVE*H, gate rows of w_hh) are int32 in the kernels
    if 2 * B * max(G, nsave) * H >= 2**31 or G * H * H >= 2**31:
        raise ValueError(f"fused_rnn triton: B={B}, H={H} too large for the kernels' int32 offsets")
    n_h = triton.cdiv(H, cfg.block_h)
    if whole_row and n_h > 1:
        raise ValueError(f"fused_rnn triton: the layer norm needs one hidden tile per row (block_h >= H={H}), "
                         f"got block_h={cfg.block_h}")
    if cfg.mode == "persistent" and n_h > 1 and interpreting():
        raise ValueError("the interpreter runs programs one after another: a persistent launch with "
                         f"{n_h} hidden tiles would wait forever; use mode='stepwise'")


def _dot_dtype(dtype: torch.dtype):
    # the interpreter's bf16 tl.dot is wrong (triton 3.8): multiply the bf16 values in fp32 there
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots use TF32 tensor cores when torch's matmul flag allows it, as torch's own GEMMs do
    (including this layer's input projection); otherwise, and for every other dtype, exact."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _new(*shape, device, dtype):
    """Every output and scratch buffer comes from here (tests poison it with NaN)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _new_counters(n: int, device) -> torch.Tensor:
    """[n batch blocks + 1] int32: the grid barrier's arrival counters, then its timeout flag."""
    return torch.zeros(n + 1, device=device, dtype=torch.int32)


# (kernel, device, config asked for, everything that selects a compiled variant) -> config to run
_PLANS: dict = {}
_warned: set = set()


def _plan_key(kernel, device, cfg, B, H, consts):
    return (kernel, str(device), cfg, B, H,
            tuple(sorted((k, str(v)) for k, v in consts.items())))


def _fit_shared_memory(kernel, args, consts, grid, cfg, device) -> LaunchConfig:
    """cfg with its pipelining stages / K chunk reduced until the compiled kernel's shared memory fits
    the device (triton would raise OutOfResources at the launch otherwise)."""
    if interpreting():
        return cfg
    sync = cfg.mode == "persistent" and (grid[1] > 1 or cfg.force_sync)

    def shared_of(candidate):
        consts_k = dict(consts, BLOCK_K=candidate.block_k)
        return kernel.warmup(**args, **consts_k, SYNC=sync, grid=grid, **_launch_options(candidate),
                             launch_cooperative_grid=sync).metadata.shared

    return shared_fitting_config(cfg, shared_of, torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


def _settle_mode(kernel, args, consts, grid, cfg, device) -> LaunchConfig:
    """A multi-tile persistent launch needs all its programs resident: compile the kernel and compare
    the grid with what its occupancy allows on this device; stepwise when it does not fit."""
    if cfg.mode != "persistent" or grid[1] == 1 or interpreting():
        return cfg
    compiled = kernel.warmup(**args, **consts, SYNC=True, grid=grid, **_launch_options(cfg),
                             launch_cooperative_grid=True)
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    capacity = blocks_per_sm(compiled.n_regs, compiled.metadata.shared, cfg.num_warps, props) * \
        props.multi_processor_count
    if grid[0] * grid[1] <= capacity:
        return cfg
    return replace(cfg, mode="stepwise")


def _run(kernel, args, consts, total_steps, cfg, grid, device, plan_key):
    """Launches `kernel` over steps [0, total_steps) as the (cached) plan says."""
    counters = _new_counters(grid[0], device)
    sync = cfg.mode == "persistent" and (grid[1] > 1 or cfg.force_sync)
    if cfg.mode == "persistent":
        try:
            kernel[grid](**args, cnt_ptr=counters, step_begin=0, step_end=total_steps, spin_limit=SPIN_LIMIT,
                         **consts, SYNC=sync, **_launch_options(cfg), launch_cooperative_grid=sync)
        except RuntimeError as e:  # the driver refused the cooperative launch: nothing ran
            if not (sync and "cooperative" in str(e)):
                raise
            cfg = _PLANS[plan_key] = replace(cfg, mode="stepwise")
            if plan_key not in _warned:
                _warned.add(plan_key)
                warnings.warn(f"fused_rnn triton: the driver refused a cooperative launch of {grid[0] * grid[1]} "
                              f"programs ({e}); running one launch per step for this shape", stacklevel=3)
        else:
            if sync:  # no host sync: a CPU tensor (interpreter) raises here, a GPU one at its next sync
                torch._assert_async(
                    counters[-1] == 0,
                    "fused_rnn triton: the grid barrier timed out (a program of the persistent launch was "
                    "not resident); set FUSED_RNN_BACKEND=cuda or report this with the GPU and shape")
            return
    for step in range(total_steps):
        kernel[grid](**args, cnt_ptr=counters, step_begin=step, step_end=step + 1, spin_limit=SPIN_LIMIT,
                     **consts, SYNC=False, **_launch_options(cfg))


def _launch(kernel, args, consts, total_steps, G, nsave, config):
    """args: the kernel's tensor and size arguments by name (T, B, H among them); consts: its
    constexprs except the block sizes and SYNC."""
    B, H, device = args["B"], args["H"], args["y_ptr"].device
    whole_row = consts["LAYER_NORM"]
    cfg = config or choose_config(B, H, G, device, whole_row)
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
    consts = dict(consts, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k)
    key = _plan_key(kernel, device, cfg, B, H, consts)
    if key not in _PLANS:
        _check_config(cfg, B, G, H, nsave, whole_row)
        probe = dict(args, cnt_ptr=_new_counters(grid[0], device), step_begin=0, step_end=total_steps,
                     spin_limit=SPIN_LIMIT)
        fitted = _fit_shared_memory(kernel, probe, consts, grid, cfg, device)
        _PLANS[key] = _settle_mode(kernel, probe, dict(consts, BLOCK_K=fitted.block_k), grid, fitted, device)
    plan = _PLANS[key]
    _run(kernel, args, dict(consts, BLOCK_K=plan.block_k), total_steps, plan, grid, device, key)


def zoneout_operands(keep_h: torch.Tensor | None, keep_c: torch.Tensor | None, cdt: torch.dtype):
    """The zoneout keep values as the kernels read them: (mode, keep_h, keep_c).
    Training masks (bool [T,B,n]) -> "mask", as uint8; eval's probability p (a float expanded to
    [T,B,n] without memory, see fused_rnn.functional.zoneout_keep) -> "constant", a [1] tensor of p."""
    if keep_h is None:
        return ZONEOUT_MODES["off"], None, None
    if keep_h.dtype == torch.bool:
        to_kernel = lambda k: None if k is None else k.contiguous().view(torch.uint8)  # noqa: E731
        return ZONEOUT_MODES["mask"], to_kernel(keep_h), to_kernel(keep_c)
    for k in (keep_h, keep_c):
        if k is not None and any(st != 0 for st in k.stride()):
            raise ValueError("fused_rnn triton: zoneout takes bool masks or one probability p expanded "
                             "over [T, B, n] (stride 0), not per-unit float values")
    to_kernel = lambda k: None if k is None else k.reshape(-1)[:1].to(cdt)  # noqa: E731
    return ZONEOUT_MODES["constant"], to_kernel(keep_h), to_kernel(keep_c)


def _forward(cell: str, gx: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, w_hh: torch.Tensor,
             b_hh: torch.Tensor | None, lengths: torch.Tensor | None, reverse: bool, save: bool,
             gh0: torch.Tensor | None = None, keep_h: torch.Tensor | None = None,
             keep_c: torch.Tensor | None = None, gain_hh: torch.Tensor | None = None,
             gain_c: torch.Tensor | None = None, bias_c: torch.Tensor | None = None,
             config: LaunchConfig | None = None):
    """-> y [T,B,H], h_n [B,H], c_n [B,H] (LSTM, else [0]), saved gates [T,B,NSAVE*H] (save, else [0]),
    c_all [T,B,H] (LSTM and save, else [0]), ln_hat [T,B,NLN*H] and ln_rstd [T,B,1|2] (layer norm and
    save, else [0]). Inputs must be contiguous. gh0 [B,G*H], if given, is used instead of
    h @ w_hh.T at each sequence's first step. keep_h/keep_c: zoneout (see zoneout_operands);
    gain_hh [G*H] (gain_c, bias_c [H] for the LSTM): the layer-normalised recurrence."""
    T, B, GH = gx.shape
    G = NUM_GATES[cell]
    H = GH // G
    nsave = NUM_SAVED[cell]
    lstm = cell == "lstm"
    ln = gain_hh is not None
    nln = G + 1 if lstm else G
    cdt = compute_dtype(gx.dtype)
    dev = gx.device
    zoneout, keep_h, keep_c = zoneout_operands(keep_h, keep_c, cdt)
    ln_hat = _new(T, B, nln * H, device=dev, dtype=cdt) if (ln and save) else _new(0, device=dev, dtype=cdt)
    ln_rstd = _new(T, B, nln - G + 1, device=dev, dtype=cdt) if (ln and save) else _new(0, device=dev, dtype=cdt)
    y = _new(T, B, H, device=dev, dtype=gx.dtype)
    hbuf = _new(2, B, H, device=dev, dtype=w_hh.dtype)  # ping-pong h exchange, in the dot's operand dtype
    hbuf[0].copy_(h0)
    hstate = h0.to(cdt, copy=True)  # [B, H] each program's carried h between launches
    cstate = c0.to(cdt, copy=True) if lstm else _new(0, device=dev, dtype=cdt)  # [B, H]
    saved = _new(T, B, nsave * H, device=dev, dtype=cdt) if save else _new(0, device=dev, dtype=cdt)
    c_all = _new(T, B, H, device=dev, dtype=cdt) if (save and lstm) else _new(0, device=dev, dtype=cdt)
    if B > 0:
        args = dict(gx_ptr=gx, w_ptr=w_hh, b_ptr=b_hh if b_hh is not None else gx,
                    len_ptr=lengths if lengths is not None else gx, y_ptr=y, hbuf_ptr=hbuf, hstate_ptr=hstate,
                    cstate_ptr=cstate, saved_ptr=saved, call_ptr=c_all, gh0_ptr=gh0 if gh0 is not None else gx,
                    **_option_args(gx, keep_h, keep_c, gain_hh, gain_c, bias_c), lnhat_ptr=ln_hat,
                    lnrstd_ptr=ln_rstd, T=T, B=B, H=H)
        consts = dict(CELL=CELL_IDS[cell], G=G, NSAVE=nsave, HAS_BIAS=b_hh is not None,
                      HAS_LENGTHS=lengths is not None, REVERSE=reverse, HAS_GH0=gh0 is not None, SAVE=save,
                      CDT=_TL_DTYPES[cdt], DOT_DT=_dot_dtype(w_hh.dtype), DOT_PREC=_dot_precision(w_hh.dtype),
                      ZONEOUT=zoneout, LAYER_NORM=ln, NLN=nln, EPS=LAYER_NORM_EPS)
        _launch(rnn_forward_kernel, args, consts, T, G, nsave, config)
    h_n = hstate.to(gx.dtype)
    c_n = cstate.to(gx.dtype) if lstm else _new(0, device=dev, dtype=gx.dtype)
    return y, h_n, c_n, saved, c_all, ln_hat, ln_rstd


def _option_args(dummy, keep_h, keep_c, gain_hh, gain_c, bias_c):
    """The zoneout and layer-norm pointer arguments of both kernels (`dummy` for those not used)."""
    pick = lambda t: dummy if t is None else t  # noqa: E731
    return dict(keep_h_ptr=pick(keep_h), keep_c_ptr=pick(keep_c), gain_hh_ptr=pick(gain_hh),
                gain_c_ptr=pick(gain_c), bias_c_ptr=pick(bias_c))


def _backward(cell: str, reverse: bool, dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor | None,
              h0: torch.Tensor, c0: torch.Tensor | None, w_hh: torch.Tensor, lengths: torch.Tensor | None,
              y: torch.Tensor, saved: torch.Tensor, c_all: torch.Tensor, keep_h: torch.Tensor | None = None,
              keep_c: torch.Tensor | None = None, gain_hh: torch.Tensor | None = None,
              gain_c: torch.Tensor | None = None, bias_c: torch.Tensor | None = None,
              ln_hat: torch.Tensor | None = None, ln_rstd: torch.Tensor | None = None,
              config: LaunchConfig | None = None):
    """-> d gx [T,B,G*H], d gh [T,B,G*H] (GRU, else [0]), dh0 [B,H], dc0 [B,H] (LSTM, else [0]),
    d mm [T,B,G*H] (layer norm, else [0]), d c_out [T,B,H] (layer-normalised LSTM, else [0]).
    d gh is the grad of h @ w_hh.T + b_hh (of LN(h @ w_hh.T) * gain_hh + b_hh with the layer norm),
    equal to d gx except for GRU's n gate; d mm the grad of h @ w_hh.T itself; d c_out the grad of
    LN(c_t) * gain_c + bias_c. The options as in _forward, with its ln_hat and ln_rstd."""
    T, B, H = y.shape
    G = NUM_GATES[cell]
    lstm, gru = cell == "lstm", cell == "gru"
    ln = gain_hh is not None
    cdt = saved.dtype
    dev = y.device
    zoneout, keep_h, keep_c = zoneout_operands(keep_h, keep_c, cdt)
    dmm = _new(T, B, G * H, device=dev, dtype=y.dtype) if ln else _new(0, device=dev, dtype=y.dtype)
    dcout = _new(T, B, H, device=dev, dtype=y.dtype) if (ln and lstm) else _new(0, device=dev, dtype=y.dtype)
    dgx = _new(T, B, G * H, device=dev, dtype=y.dtype)
    dgh = _new(T, B, G * H, device=dev, dtype=y.dtype) if gru else _new(0, device=dev, dtype=y.dtype)
    dgbuf = _new(2, B, G * H, device=dev, dtype=w_hh.dtype)  # exchange in the dot's operand dtype
    dhstate = dh_n.to(cdt, copy=True)
    dcstate = dc_n.to(cdt, copy=True) if lstm else _new(0, device=dev, dtype=cdt)
    if B > 0:
        args = dict(dy_ptr=dy, w_ptr=w_hh, len_ptr=lengths if lengths is not None else dy, h0_ptr=h0, y_ptr=y,
                    c0_ptr=c0 if lstm else h0, saved_ptr=saved, call_ptr=c_all if lstm else saved,
                    dgx_ptr=dgx, dgh_ptr=dgh if gru else dgx, dgbuf_ptr=dgbuf, dhstate_ptr=dhstate,
                    dcstate_ptr=dcstate if lstm else dhstate, **_option_args(dy, keep_h, keep_c, gain_hh, gain_c, bias_c),
                    lnhat_ptr=ln_hat if ln else dy, lnrstd_ptr=ln_rstd if ln else dy, dmm_ptr=dmm if ln else dy,
                    dcout_ptr=dcout if (ln and lstm) else dy, T=T, B=B, H=H)
        consts = dict(CELL=CELL_IDS[cell], G=G, NSAVE=NUM_SAVED[cell], HAS_LENGTHS=lengths is not None,
                      REVERSE=reverse, CDT=_TL_DTYPES[cdt], DOT_DT=_dot_dtype(w_hh.dtype),
                      DOT_PREC=_dot_precision(w_hh.dtype), ZONEOUT=zoneout, LAYER_NORM=ln,
                      NLN=G + 1 if lstm else G)
        _launch(rnn_backward_kernel, args, consts, T + 1, G, NUM_SAVED[cell], config)
    dh0 = dhstate.to(h0.dtype)
    dc0 = dcstate.to(h0.dtype) if lstm else _new(0, device=dev, dtype=h0.dtype)
    return dgx, dgh, dh0, dc0, dmm, dcout


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device and its stream: make that the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(cell, gx, *args, **kwargs):
    """Runs the forward kernel (see _forward) on gx's device."""
    with _device_of(gx):
        return _forward(cell, gx, *args, **kwargs)


def backward(cell, reverse, dy, *args, **kwargs):
    """Runs the backward kernel (see _backward) on dy's device."""
    with _device_of(dy):
        return _backward(cell, reverse, dy, *args, **kwargs)
