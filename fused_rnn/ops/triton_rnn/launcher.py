"""Launchers: tensors in, kernels launched, tensors out. No autograd here (see op.py)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .kernels import CELL_IDS, NUM_GATES, NUM_SAVED, rnn_backward_kernel, rnn_forward_kernel


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(rnn_forward_kernel, InterpretedFunction)


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
    # is more than one hidden tile, so every program must be resident);
    # "stepwise": one launch per step, the launch boundary is the synchronisation.
    mode: str = "persistent"
    # tests only: run the inter-program barrier even with one hidden tile (the interpreter cannot run
    # more than one waiting program, but it can run the barrier code of one)
    force_sync: bool = False


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_config(B: int, H: int, G: int, device: torch.device) -> LaunchConfig:
    """Block sizes per shape: fixed small blocks in the interpreter, a heuristic on a GPU."""
    if interpreting():
        # one program per batch block covers the whole hidden size: no inter-program waits, which the
        # interpreter (programs run one after the other) could not serve
        return LaunchConfig(block_b=16, block_h=max(16, triton.next_power_of_2(H)), block_k=16)
    # ptxas (sm_90, BLOCK_K=32, 8 warps) keeps 16x16, 16x32 and 32x16 tiles of every cell within
    # ~190 registers with no or tiny spills; 32x32 and larger spill (README.md), so tiles stay small
    # and wide hidden sizes are spread over more programs instead.
    block_b = 16 if B <= 16 else 32
    n_b = triton.cdiv(B, block_b)
    sms = _num_sms(device)
    block_h = 16
    if n_b * triton.cdiv(H, 16) > sms and block_b == 16 and n_b * triton.cdiv(H, 32) <= sms:
        block_h = 32
    n_h = triton.cdiv(H, block_h)
    # all programs of a persistent multi-tile launch wait for each other: they must all be resident
    mode = "persistent" if (n_h == 1 or n_b * n_h <= sms) else "stepwise"
    return LaunchConfig(block_b=block_b, block_h=block_h, block_k=32, num_warps=8 if G > 1 else 4, mode=mode)


def _check_config(cfg: LaunchConfig, B: int, G: int, H: int) -> None:
    # offsets inside one step (b * G*H + unit, gate rows of w_hh) are int32 in the kernels
    if B * G * H >= 2**31 or G * H * H >= 2**31:
        raise ValueError(f"fused_rnn triton: B={B}, H={H} too large for the kernels' int32 offsets")
    n_h = triton.cdiv(H, cfg.block_h)
    if cfg.mode == "persistent" and n_h > 1 and interpreting():
        raise ValueError("the interpreter runs programs one after another: a persistent launch with "
                         f"{n_h} hidden tiles would wait forever; use mode='stepwise'")


def _dot_dtype(dtype: torch.dtype):
    # the interpreter's bf16 tl.dot is wrong (triton 3.8): multiply the bf16 values in fp32 there
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


def _new(*shape, device, dtype):
    """Every output and scratch buffer comes from here (tests poison it with NaN)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _steps(cfg: LaunchConfig, total: int):
    """(step_begin, step_end) per launch."""
    if cfg.mode == "persistent":
        return [(0, total)]
    return [(s, s + 1) for s in range(total)]


def _forward(cell: str, gx: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, w_hh: torch.Tensor,
            b_hh: torch.Tensor | None, lengths: torch.Tensor | None, reverse: bool, save: bool,
            gh0: torch.Tensor | None = None, config: LaunchConfig | None = None):
    """-> y [T,B,H], h_n [B,H], c_n [B,H] (LSTM, else [0]), saved gates [T,B,NSAVE*H] (save, else [0]),
    c_all [T,B,H] (LSTM and save, else [0]). Inputs must be contiguous. gh0 [B,G*H], if given, is
    used instead of h @ w_hh.T at each sequence's first step."""
    T, B, GH = gx.shape
    G = NUM_GATES[cell]
    H = GH // G
    nsave = NUM_SAVED[cell]
    lstm = cell == "lstm"
    cdt = compute_dtype(gx.dtype)
    dev = gx.device
    y = _new(T, B, H, device=dev, dtype=gx.dtype)
    hbuf = _new(2, B, H, device=dev, dtype=cdt)   # ping-pong h exchange between programs
    hbuf[0].copy_(h0)
    cstate = c0.to(cdt, copy=True) if lstm else _new(0, device=dev, dtype=cdt)  # [B, H]
    saved = _new(T, B, nsave * H, device=dev, dtype=cdt) if save else _new(0, device=dev, dtype=cdt)
    c_all = _new(T, B, H, device=dev, dtype=cdt) if (save and lstm) else _new(0, device=dev, dtype=cdt)
    if B > 0:
        cfg = config or choose_config(B, H, G, dev)
        _check_config(cfg, B, G, H)
        grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
        sync = cfg.mode == "persistent" and (grid[1] > 1 or cfg.force_sync)
        for begin, end in _steps(cfg, T):
            counters = torch.zeros(grid[0] if sync else 1, device=dev, dtype=torch.int32)  # [n batch blocks]
            rnn_forward_kernel[grid](
                gx, w_hh, b_hh if b_hh is not None else gx, lengths if lengths is not None else gx,
                y, hbuf, cstate, saved, c_all, counters, gh0 if gh0 is not None else gx,
                T, B, H, begin, end,
                CELL=CELL_IDS[cell], G=G, NSAVE=nsave,
                HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None, REVERSE=reverse,
                HAS_GH0=gh0 is not None,
                SAVE=save, SYNC=sync, CDT=_TL_DTYPES[cdt], DOT_DT=_dot_dtype(w_hh.dtype),
                BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    h_n = hbuf[T % 2].to(gx.dtype, copy=True)  # no view of a scratch buffer
    c_n = cstate.to(gx.dtype) if lstm else _new(0, device=dev, dtype=gx.dtype)
    return y, h_n, c_n, saved, c_all


def _backward(cell: str, reverse: bool, dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor | None,
             h0: torch.Tensor, c0: torch.Tensor | None, w_hh: torch.Tensor, lengths: torch.Tensor | None,
             y: torch.Tensor, saved: torch.Tensor, c_all: torch.Tensor, config: LaunchConfig | None = None):
    """-> d gx [T,B,G*H], d gh [T,B,G*H] (GRU, else [0]), dh0 [B,H], dc0 [B,H] (LSTM, else [0]).
    d gh is the grad of h @ w_hh.T + b_hh, equal to d gx except for GRU's n gate."""
    T, B, H = y.shape
    G = NUM_GATES[cell]
    lstm, gru = cell == "lstm", cell == "gru"
    cdt = saved.dtype
    dev = y.device
    dgx = _new(T, B, G * H, device=dev, dtype=y.dtype)
    dgh = _new(T, B, G * H, device=dev, dtype=y.dtype) if gru else _new(0, device=dev, dtype=y.dtype)
    dgbuf = _new(2, B, G * H, device=dev, dtype=cdt)
    dhstate = dh_n.to(cdt, copy=True)
    dcstate = dc_n.to(cdt, copy=True) if lstm else _new(0, device=dev, dtype=cdt)
    if B > 0:
        cfg = config or choose_config(B, H, G, dev)
        _check_config(cfg, B, G, H)
        grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
        sync = cfg.mode == "persistent" and (grid[1] > 1 or cfg.force_sync)
        for begin, end in _steps(cfg, T + 1):
            counters = torch.zeros(grid[0] if sync else 1, device=dev, dtype=torch.int32)  # [n batch blocks]
            rnn_backward_kernel[grid](
                dy, w_hh, lengths if lengths is not None else dy, h0, y,
                c0 if lstm else h0, saved, c_all if lstm else saved,
                dgx, dgh if gru else dgx, dgbuf, dhstate, dcstate if lstm else dhstate, counters,
                T, B, H, begin, end,
                CELL=CELL_IDS[cell], G=G, NSAVE=NUM_SAVED[cell],
                HAS_LENGTHS=lengths is not None, REVERSE=reverse, SYNC=sync,
                CDT=_TL_DTYPES[cdt], DOT_DT=_dot_dtype(w_hh.dtype),
                BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    dh0 = dhstate.to(h0.dtype)
    dc0 = dcstate.to(h0.dtype) if lstm else _new(0, device=dev, dtype=h0.dtype)
    return dgx, dgh, dh0, dc0


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
