#!/usr/bin/env bash
# GPU check for fused_rnn: build in place, the whole test suite on CUDA, compute-sanitizer on a small
# forward+backward, a quick benchmark, and a short summary. Needs no internet.
#
#   scripts/gpu_check.sh                 # everything
#   SKIP_TESTS=1 SKIP_SANITIZER=1 SKIP_BENCH=1 scripts/gpu_check.sh    # skip parts
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default: this GPU's
# capability plus 8.0 and 9.0), OUT_DIR (logs; default $OUT, else /tmp/fused_rnn_gpu_check). Exit status: 0 only if
# every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export FUSED_RNN_REQUIRE_EXT=1          # tests fail (not skip) when the extension is missing
# tests/test_cpp_ops.py turns on deterministic mode (to NaN-fill C++ allocations); cuBLAS then wants this
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
OUT_DIR=${OUT_DIR:-${OUT:-/tmp/fused_rnn_gpu_check}}  # $OUT: the device tool brings it back
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
declare -a SUMMARY
STATUS=0

step() {  # step NAME LOGFILE COMMAND...: run, log, record PASS/FAIL with the time taken
  local name=$1 log=$2; shift 2
  echo "=== $name (log: $log)"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then SUMMARY+=("PASS  $name (${dt}s)"); else SUMMARY+=("FAIL  $name (rc=$rc, ${dt}s)"); STATUS=1; fi
  return "$rc"
}

# ------------------------------------------------------------------ environment
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null || nvidia-smi
  nvcc --version | tail -2
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton not installed"
} | tee "$OUT_DIR/env.txt"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "")
  export TORCH_CUDA_ARCH_LIST=$(printf '%s\n' 8.0 9.0 $CAP | sort -u | paste -sd';')
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# ------------------------------------------------------------------ build (in place, no pip, no internet)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step "build fused_rnn._C (CUDA)" "$OUT_DIR/build.log" $PY setup.py build_ext --inplace
$PY - <<'EOF' 2>&1 | tee -a "$OUT_DIR/build.log"
import torch
from fused_rnn.ops.cpp import ops, cuda_backend
print("load_error:", ops.load_error())
print("cuda backend:", cuda_backend.unavailable_reason(torch.device("cuda"), torch.float32, "lstm", False) or "available")
EOF

# ------------------------------------------------------------------ the whole suite on CUDA
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "pytest: whole suite" "$OUT_DIR/pytest.log" $PY -m pytest -q -rs tests/ --junitxml="$OUT_DIR/pytest.xml"
  step "pytest: C++/CUDA ops (verbose)" "$OUT_DIR/pytest_cpp_ops.log" $PY -m pytest -q -rA tests/test_cpp_ops.py -k "CUDA"
  # the persistent kernels (opt-in until verified): their own tests, then the backend tests through them
  step "pytest: persistent kernels" "$OUT_DIR/pytest_persistent.log" $PY -m pytest -q -rA tests/test_cuda_persistent.py
  step "pytest: backend tests with persistent kernels" "$OUT_DIR/pytest_backends_persistent.log" \
    env FUSED_RNN_CUDA_PERSISTENT=1 $PY -m pytest -q tests/test_backends.py -k cuda
fi

# ------------------------------------------------------------------ compute-sanitizer
SAN_CASE="$OUT_DIR/sanitize_case.py"
cat > "$SAN_CASE" <<'EOF'
# A small forward+backward of every cell through the cuda backend, with lengths, reverse and proj.
import torch
from fused_rnn.ops.cpp import cuda_backend
G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for cell in G:
        for reverse, proj in ((False, 0), (True, 3 if cell == "lstm" else 0)):
            T, B, H = 5, 3, 8
            Hout = proj or H
            r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)
            args = (r(T, B, G[cell] * H), r(B, Hout), r(B, H) if cell == "lstm" else None, r(G[cell] * H, Hout),
                    r(G[cell] * H), r(Hout, H) if proj else None,
                    torch.tensor([5, 2, 4], device="cuda"))
            y, h, c = cuda_backend.recurrence(cell, *args, reverse)
            loss = y.float().square().sum() + h.float().sum() + (c.float().sum() if c is not None else 0)
            loss.backward()
torch.cuda.synchronize()
print("sanitizer case done")
EOF
if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [ -x "$SAN" ]; then
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # lets memcheck see each allocation's true bounds
    step "compute-sanitizer memcheck" "$OUT_DIR/memcheck.log" \
      "$SAN" --tool memcheck --error-exitcode 1 --leak-check no $PY "$SAN_CASE"
    for tool in memcheck racecheck synccheck; do
      step "compute-sanitizer $tool (persistent kernels)" "$OUT_DIR/${tool}_persistent.log" \
        env FUSED_RNN_CUDA_PERSISTENT=1 "$SAN" --tool $tool --error-exitcode 1 $PY "$SAN_CASE"
    done
    step "compute-sanitizer racecheck (fused_rnn kernels)" "$OUT_DIR/racecheck.log" \
      "$SAN" --tool racecheck --error-exitcode 1 --kernel-name regex:fused_rnn $PY "$SAN_CASE"
    step "compute-sanitizer initcheck (fused_rnn kernels)" "$OUT_DIR/initcheck.log" \
      "$SAN" --tool initcheck --error-exitcode 1 --kernel-name regex:fused_rnn $PY "$SAN_CASE"
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
  else
    SUMMARY+=("SKIP  compute-sanitizer (not found in PATH or $CUDA_HOME/bin)")
  fi
fi

# ------------------------------------------------------------------ quick benchmark
BENCH="$OUT_DIR/quick_bench.py"
cat > "$BENCH" <<'EOF'
# Forward+backward time of one layer, fused_rnn backends vs torch.nn (cuDNN), CUDA events, median.
import torch
import fused_rnn

def timed(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]

print(f"{'case':42s} {'torch.nn':>10s} " + " ".join(f"{b:>10s}" for b in ("cuda", "triton")) + "   (ms, fwd+bwd)")
for cls, dtype, T, B, H in [("LSTM", torch.float32, 512, 64, 512), ("LSTM", torch.bfloat16, 512, 64, 512),
                            ("LSTM", torch.float16, 512, 16, 1024), ("GRU", torch.float32, 512, 64, 512),
                            ("LSTM", torch.float32, 128, 256, 1024), ("LSTM", torch.bfloat16, 512, 16, 256)]:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = getattr(torch.nn, cls)(H, H).cuda().to(dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    def run(m):
        return lambda: m(x)[0].float().sum().backward()
    row = [timed(run(ref))]
    for backend in ("cuda", "triton"):
        reason = fused_rnn.backends.unavailable_reason(backend, torch.device("cuda"), dtype, cls.lower(), False)
        if reason:
            row.append(float("nan"))
            continue
        m = getattr(fused_rnn, cls)(H, H, backend=backend).cuda().to(dtype)
        m.load_state_dict(ref.state_dict())
        row.append(timed(run(m)))
    name = f"{cls} {str(dtype)[6:]} T={T} B={B} H={H}"
    print(f"{name:42s} " + " ".join(f"{v:10.2f}" for v in row) + f"   cuda speedup x{row[0] / row[1]:.2f}")
EOF
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step "quick benchmark" "$OUT_DIR/bench.log" $PY "$BENCH"
fi

# ------------------------------------------------------------------ summary
{
  echo
  echo "================ fused_rnn gpu_check summary ================"
  cat "$OUT_DIR/env.txt"
  for s in "${SUMMARY[@]}"; do echo "$s"; done
  [ -f "$OUT_DIR/pytest.log" ] && echo "pytest: $(grep -E '[0-9]+ (passed|failed)' "$OUT_DIR/pytest.log" | tail -1)"
  [ -f "$OUT_DIR/memcheck.log" ] && echo "memcheck: $(grep -E 'ERROR SUMMARY' "$OUT_DIR/memcheck.log" | tail -1)"
  [ -f "$OUT_DIR/racecheck.log" ] && echo "racecheck: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT_DIR/racecheck.log" | tail -1)"
  [ -f "$OUT_DIR/bench.log" ] && { echo "benchmark (ms, fwd+bwd):"; cat "$OUT_DIR/bench.log"; }
  echo "overall: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL)   logs: $OUT_DIR"
} | tee "$OUT_DIR/summary.txt"
exit $STATUS
