"""Compile the kernels for a GPU target without a GPU, and report registers and spills.

    TRITON_INTERPRET=0 python -m fused_rnn.ops.triton_rnn.compile_check [--arch 90] [--quick]

The interpreter never runs Triton's compiler, so this is what catches an error that only the
compiled path sees (types, layouts, the barrier's atomics) on a machine without a GPU; on any
machine it prints ptxas's resource use (registers, stack = spills) per variant, as PERF.md asks.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels as K

_TL = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}


def _compile(fn, pointers, consts, arch, num_warps, num_stages=None):
    signature = {name: "*" + ty for name, ty in pointers.items()}
    signature.update({name: "i32" for name in ("T", "B", "H", "step_begin", "step_end", "spin_limit")})
    signature.update({name: "constexpr" for name in consts})
    names = list(signature)
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _precision(dtype, tf32):
    return "tf32" if tf32 and dtype == "fp32" else "ieee"


def _option_pointers(dtype, cdt, zoneout):
    """The zoneout and layer-norm pointers shared by both kernels (uint8 masks, or p in cdt)."""
    keep = "u8" if zoneout == K.ZONEOUT_MODES["mask"] else cdt
    return {"keep_h_ptr": keep, "keep_c_ptr": keep, "gain_hh_ptr": dtype, "gain_c_ptr": dtype, "bias_c_ptr": dtype,
            "lnhat_ptr": cdt, "lnrstd_ptr": cdt}


def _option_consts(cell, zoneout, layer_norm):
    return {"ZONEOUT": zoneout, "LAYER_NORM": layer_norm, "NLN": K.NUM_GATES[cell] + (cell == "lstm")}


def compile_forward(cell, dtype, sync, block_b=16, block_h=16, block_k=32, num_warps=4, num_stages=None, arch=90,
                    tf32=False, zoneout=0, layer_norm=False):
    cdt = "fp64" if dtype == "fp64" else "fp32"
    pointers = {"gx_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "len_ptr": "i64", "y_ptr": dtype, "hbuf_ptr": dtype,
                "hstate_ptr": cdt, "cstate_ptr": cdt, "saved_ptr": cdt, "call_ptr": cdt, "cnt_ptr": "i32", "gh0_ptr": dtype,
                **_option_pointers(dtype, cdt, zoneout)}
    consts = {"CELL": K.CELL_IDS[cell], "G": K.NUM_GATES[cell], "NSAVE": K.NUM_SAVED[cell], "HAS_BIAS": True,
              "HAS_LENGTHS": True, "REVERSE": False, "HAS_GH0": cell == "lstm" and not (zoneout or layer_norm),
              "SAVE": True, "SYNC": sync, "CDT": _TL[cdt],
              "DOT_DT": _TL[dtype], "DOT_PREC": _precision(dtype, tf32), **_option_consts(cell, zoneout, layer_norm),
              "EPS": 1e-5, "BLOCK_B": block_b, "BLOCK_H": block_h, "BLOCK_K": block_k}
    return _compile(K.rnn_forward_kernel, pointers, consts, arch, num_warps, num_stages)


def compile_backward(cell, dtype, sync, block_b=16, block_h=16, block_k=32, num_warps=4, num_stages=None, arch=90,
                     tf32=False, zoneout=0, layer_norm=False):
    cdt = "fp64" if dtype == "fp64" else "fp32"
    pointers = {"dy_ptr": dtype, "w_ptr": dtype, "len_ptr": "i64", "h0_ptr": dtype, "y_ptr": dtype, "c0_ptr": dtype,
                "saved_ptr": cdt, "call_ptr": cdt, "dgx_ptr": dtype, "dgh_ptr": dtype, "dgbuf_ptr": dtype,
                "dhstate_ptr": cdt, "dcstate_ptr": cdt, "cnt_ptr": "i32", **_option_pointers(dtype, cdt, zoneout),
                "dmm_ptr": dtype, "dcout_ptr": dtype}
    consts = {"CELL": K.CELL_IDS[cell], "G": K.NUM_GATES[cell], "NSAVE": K.NUM_SAVED[cell], "HAS_LENGTHS": True,
              "REVERSE": True, "SYNC": sync, "CDT": _TL[cdt], "DOT_DT": _TL[dtype],
              "DOT_PREC": _precision(dtype, tf32), **_option_consts(cell, zoneout, layer_norm),
              "BLOCK_B": block_b, "BLOCK_H": block_h, "BLOCK_K": block_k}
    return _compile(K.rnn_backward_kernel, pointers, consts, arch, num_warps, num_stages)


def resource_usage(compiled) -> str:
    """'REG:n STACK:n SHARED:n' from cuobjdump (bundled with triton), or '' when unavailable."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], check=False, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+", out)
    return m.group(0) if m else ""


# opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability
SHARED_PER_BLOCK_OPTIN = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def fit_layer_norm(cell, dtype, H, arch):
    """-> [(direction, config, shared bytes)]: the launch configuration the launcher settles on for a
    layer-normalised layer (one program per whole row) on `arch`, found the launcher's way
    (launcher.shared_fitting_config) from kernels compiled here; a ValueError when none fits."""
    from .launcher import choose_config, shared_fitting_config

    start = choose_config(16, H, K.NUM_GATES[cell], "cuda", whole_row=True)
    limit = SHARED_PER_BLOCK_OPTIN[arch]
    fitted = []
    for name, fn in (("forward", compile_forward), ("backward", compile_backward)):
        def shared_of(cfg, fn=fn):
            return fn(cell, dtype, False, block_b=cfg.block_b, block_h=cfg.block_h, block_k=cfg.block_k,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, arch=arch, zoneout=2,
                      layer_norm=True).metadata.shared
        cfg = shared_fitting_config(start, shared_of, limit)
        fitted.append((name, cfg, shared_of(cfg)))
    return fitted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--quick", action="store_true", help="bf16 and fp32 only, with the barrier")
    parser.add_argument("--num-warps", type=int, default=4, help="warps per program (the launcher's default: 4)")
    parser.add_argument("--fit-layer-norm", type=int, metavar="H", default=0,
                        help="only print the configuration the launcher picks for layer-normalised LSTM/GRU "
                             "layers of hidden size H (bf16, fp32) and its shared memory vs the device's limit")
    args = parser.parse_args(argv)
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(K.rnn_forward_kernel, InterpretedFunction):
        print("run with TRITON_INTERPRET=0: the kernels were decorated for the interpreter", file=sys.stderr)
        return 2
    if args.fit_layer_norm:
        limit = SHARED_PER_BLOCK_OPTIN[args.arch]
        for cell, dtype in itertools.product(("lstm", "gru"), ("fp32", "bf16")):
            for name, cfg, shared in fit_layer_norm(cell, dtype, args.fit_layer_norm, args.arch):
                print(f"sm_{args.arch} {name:8s} {cell:4s} {dtype} H={args.fit_layer_norm} block_k={cfg.block_k} "
                      f"num_stages={cfg.num_stages} shared={shared} limit={limit}", flush=True)
        return 0
    # "tf32": fp32 operands on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
    dtypes = ["bf16", "fp32"] if args.quick else ["fp16", "bf16", "fp32", "tf32", "fp64"]
    syncs = [True] if args.quick else [False, True]
    failed = 0
    for cell, dtype, sync in itertools.product(K.CELL_IDS, dtypes, syncs):
        for name, fn in (("forward", compile_forward), ("backward", compile_backward)):
            try:
                compiled = fn(cell, "fp32" if dtype == "tf32" else dtype, sync, num_warps=args.num_warps,
                              arch=args.arch, tf32=dtype == "tf32")
                usage = resource_usage(compiled)
                print(f"sm_{args.arch} {name:8s} {cell:8s} {dtype} sync={sync!s:5s} ok   {usage}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every variant, fail at the end
                failed += 1
                print(f"sm_{args.arch} {name:8s} {cell:8s} {dtype} sync={sync!s:5s} FAIL {type(e).__name__}: {e}",
                      flush=True)
    # zoneout (masks; eval's p) and the layer norm (one program holds the whole row: block_h = H = 64,
    # 8 warps as launcher.choose_config) on the cells that have them, bf16 and fp32
    for cell, dtype, zoneout, layer_norm in itertools.product(("lstm", "gru"), ["bf16", "fp32"], (1, 2), (False, True)):
        for name, fn in (("forward", compile_forward), ("backward", compile_backward)):
            what = f"sm_{args.arch} {name:8s} {cell:8s} {dtype} zoneout={zoneout} layer_norm={layer_norm!s:5s}"
            try:
                compiled = fn(cell, dtype, False, block_h=64 if layer_norm else 16,
                              num_warps=8 if layer_norm else args.num_warps,  # the launcher's whole-row choice
                              arch=args.arch, zoneout=zoneout, layer_norm=layer_norm)
                print(f"{what} ok   {resource_usage(compiled)}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every variant, fail at the end
                failed += 1
                print(f"{what} FAIL {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
