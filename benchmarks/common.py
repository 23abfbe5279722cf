"""What the pytest-benchmark suite and the sweep share: which backends to time, the inputs of each
case, peak memory, and a description of the machine.

The timing itself is fused_rnn/timing.py, the code `python -m fused_rnn` uses: layers from
timing.make_layer (torch.nn and fused_rnn with the same seed, so the same weights), random (never
zero) inputs rotated between runs, warm-up excluded, every sample kept (timing.sample_times), CUDA
events around each run on a GPU, parameter gradients cleared outside the timed region
(timing.make_pass). This file adds the cases: packed variable-length inputs, stacks, dtypes.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
from fused_rnn import backends as fr_backends
from fused_rnn import timing
from fused_rnn.timing import _sync, make_pass, sample_times, summarize  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parent.parent
MODES = tuple(timing.MODES)            # LSTM, GRU, RNN
PASSES = timing.PASSES                 # forward, forward+backward, inference
CELL = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
NN = "nn"                              # torch.nn's own layer (cuDNN on a GPU), the baseline of every ratio


# ----------------------------------------------------------------------------------------- backends

def fused_backends(device, dtype, mode="LSTM", include=None, exclude=("reference",)):
    """fused_rnn backends that can run `mode` on `device` in `dtype`, in registry order, and a
    dict name -> reason for those that cannot. On a CPU device Triton would run in its interpreter,
    which checks correctness but says nothing about speed, so it is never timed there."""
    device = torch.device(device)
    names = [n for n in fr_backends.BACKENDS if (n in include if include is not None else n not in exclude)]
    ok, skipped = [], {}
    for name in names:
        if name == "triton" and device.type != "cuda":
            skipped[name] = "Triton on a CPU device runs in the interpreter: not a speed measurement"
            continue
        reason = fr_backends.unavailable_reason(name, device, dtype, CELL[mode], False)
        if reason is None:
            ok.append(name)
        else:
            skipped[name] = reason
    return ok, skipped


def backend_label(name):
    return "torch.nn" if name == NN else name


# ------------------------------------------------------------------------------------------ precision

def precision_label(dtype_name, tf32):
    """One label per numeric setting, used for panels and table rows: fp32 (exact), tf32, bf16, fp16."""
    if dtype_name == "float32":
        return "tf32" if tf32 else "fp32"
    return {"bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}[dtype_name]


@contextlib.contextmanager
def tf32_mode(enabled, device):
    """float32 matmuls and cuDNN (torch.nn's RNN) on TF32 tensor cores or exact; restored after.
    Both flags move together so torch.nn and the fused backends (cuBLAS via torch) compare like with like."""
    if torch.device(device).type != "cuda" or enabled is None:
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One layer shape: `single` (1 layer, 1 direction), `bidir2` (2 layers, bidirectional) or
    `packed` (1 layer, 1 direction, a PackedSequence of unsorted lengths in [T/4, T])."""
    name: str
    mode: str
    T: int
    B: int
    H: int
    I: int
    dtype: str = "float32"
    tf32: bool | None = None

    @property
    def num_layers(self):
        return 2 if self.name == "bidir2" else 1

    @property
    def bidirectional(self):
        return self.name == "bidir2"

    @property
    def packed(self):
        return self.name == "packed"

    @property
    def precision(self):
        return precision_label(self.dtype, self.tf32)


def packed_lengths(T, B, seed=0):
    """Unsorted lengths uniform in [max(1, T//4), T], the first one T (so the padded length is T)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    if B:
        lengths[0] = T
    return lengths


def make_inputs(case, what, device, n_inputs):
    """n_inputs (input, output-gradient) pairs of random values. The input is a leaf that requires
    grad for forward+backward, so d input is computed as in training a stacked model."""
    dtype = DTYPES[case.dtype]
    rg = what == "forward+backward"
    out_features = case.H * (2 if case.bidirectional else 1)
    pairs = []
    for _ in range(n_inputs):
        x = torch.randn(case.T, case.B, case.I, device=device, dtype=dtype)
        if case.packed:
            p = pack_padded_sequence(x, packed_lengths(case.T, case.B), enforce_sorted=False)
            x = PackedSequence(p.data.detach().requires_grad_(rg), p.batch_sizes, p.sorted_indices,
                               p.unsorted_indices)
            grad = torch.randn(p.data.shape[0], out_features, device=device, dtype=dtype)
        else:
            x.requires_grad_(rg)
            grad = torch.randn(case.T, case.B, out_features, device=device, dtype=dtype)
        pairs.append((x, grad))
    return pairs


def n_inputs_for(case, budget_bytes=256 << 20):
    """Three rotating input sets, two when they are large (each far beyond any cache already)."""
    out_features = case.H * (2 if case.bidirectional else 1)
    per_set = case.T * case.B * (case.I + out_features) * DTYPES[case.dtype].itemsize   # input + output grad
    return 3 if 3 * per_set <= budget_bytes else 2


def build_layer(case, backend, device):
    """timing.make_layer (same seed -> same weights for torch.nn and every backend), in training mode."""
    return timing.make_layer(case.mode, backend, case.I, case.H, case.num_layers, case.bidirectional,
                             device, DTYPES[case.dtype])


def peak_memory_bytes(run, reset, device):
    """Peak CUDA memory of one run above what was allocated before it (None off CUDA)."""
    if torch.device(device).type != "cuda":
        return None
    reset(0)
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run(0)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# -------------------------------------------------------------------------------------------- machine

def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info(device):
    """Everything a row needs to be compared with another machine's: hardware, versions, date, commit."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any failure means no usable Triton
        triton_version = ""
    commit = _git("rev-parse", "HEAD")
    # dirty: tracked files changed, or code the timings depend on not yet committed (untracked included)
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")
                 or _git("status", "--porcelain", "--", "fused_rnn", "csrc", "setup.py")) if commit else False
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit[:12] + ("+dirty" if dirty else ""),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fused_rnn": fused_rnn.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if torch.backends.cudnn.is_available() else "",
        "triton": triton_version,
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "gpu_name": "",
        "gpu_sms": "",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_sms=props.multi_processor_count)
    info["device_slug"] = (slug(info["gpu_name"]) if device.type == "cuda"
                           else f"cpu-{slug(info['cpu_name'])}-{info['threads']}t")
    return info
