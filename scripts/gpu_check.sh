#!/usr/bin/env bash
# GPU check for fused_rnn in stages, each one call of the device tool (<= 8 minutes); see scripts/README.md.
#
#   scripts/gpu_check.sh stage1      build for this GPU (or use a carried build), the v2 kernels' GPU
#                                    program and ptx.cuh's golden tests, persistent-kernel tests, timings
#                                    vs cuDNN, smoke test of every kernel vs the float64 reference, the
#                                    CUDA tests of test_cpp_ops.py, Triton's GPU tests
#   scripts/gpu_check.sh stage2      the persistent and per-step tests in full, zoneout/layer norm/double
#                                    backward on cuda and triton, sync costs alone, a profile of a step,
#                                    persistent forward against H and B, compute-sanitizer memcheck of
#                                    the persistent kernels, the other CUDA tests, the sweep's core grid
#                                    (either stage builds when no working build is present)
#   scripts/gpu_check.sh --dry-run [stage1|stage2]   no GPU: syntax, tools, test selections collect
#
# Every step runs under `timeout`, capped so that the whole stage ends within FUSED_RNN_GPU_CHECK_STAGE_S
# (default 450 s); a failed build stops the stage. Each stage leaves two files in OUT_DIR ($OUT when the
# device tool runs it, else /tmp/fused_rnn_gpu_check): summary-<stage>.txt (versions, one line per step,
# timings, first failures) and logs-<stage>.tar.gz (every step's log; the device tool brings back <= 8 files).
# Environment: PYTHON (python3), CUDA_HOME (/usr/local/cuda), MAX_JOBS (all cores), TORCH_CUDA_ARCH_LIST
# (this GPU's capability), FUSED_RNN_GPU_CHECK_REBUILD=1 (build even when a working build is present).
# Exit status: 0 only if every step of the stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-}
DRY=0
if [ "$STAGE" = "--dry-run" ]; then DRY=1; STAGE=${2:-all}; fi
case "$STAGE" in
  stage1|stage2|all) ;;
  *) echo "usage: $0 stage1|stage2|--dry-run [stage1|stage2]" >&2; exit 2 ;;
esac
[ "$STAGE" = all ] && [ $DRY = 0 ] && { echo "give a stage: stage1 or stage2" >&2; exit 2; }

PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export FUSED_RNN_REQUIRE_EXT=1                                    # tests fail (not skip) without the extension
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # the tests' deterministic mode wants it
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT_DIR:-${OUT:-/tmp/fused_rnn_gpu_check}}
NAME=$STAGE
[ $DRY = 1 ] && NAME=dry-run
LOGS="$OUT_DIR/logs-$NAME"
mkdir -p "$LOGS"
SUMMARY="$OUT_DIR/summary-$NAME.txt"
: > "$SUMMARY"
STATUS=0
T_START=$SECONDS
STAGE_S=${FUSED_RNN_GPU_CHECK_STAGE_S:-450}

note() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME SECONDS LOG COMMAND...: run under timeout, log, record PASS/FAIL and the time taken
  local name=$1 limit=$2 log=$LOGS/$3; shift 3
  local left=$((STAGE_S - (SECONDS - T_START) - 15))
  if [ $left -lt 10 ]; then note "SKIP  $name (the stage's ${STAGE_S}s are spent)"; STATUS=1; return 1; fi
  [ $limit -gt $left ] && limit=$left
  echo "=== $name (limit ${limit}s, log $log)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0)) tail=""
  tail=$(grep -E "^(=+ )?[0-9]+ (passed|failed|errors?|skipped)|tests? collected|^smoke:|ERROR SUMMARY" "$log" 2>/dev/null | tail -1)
  if [ $rc -eq 0 ]; then note "PASS  $name (${dt}s)  $tail"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "TIME  $name (killed after ${limit}s)  $tail"; STATUS=1
  else note "FAIL  $name (rc=$rc, ${dt}s)  $tail"; STATUS=1; fi
  return $rc
}

finish() {
  note "stage $NAME: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL) in $((SECONDS - T_START))s; logs: $OUT_DIR/logs-$NAME.tar.gz"
  tar -czf "$OUT_DIR/logs-$NAME.tar.gz" -C "$OUT_DIR" "logs-$NAME" && rm -rf "$LOGS"
  exit $STATUS
}

# pytest selections of each stage (also collected by --dry-run)
SEL_PERSISTENT=(tests/test_cuda_persistent.py)
SEL_CPP_CUDA=(tests/test_cpp_ops.py -k "TestCUDA and not opcheck and not gradcheck")
SEL_TRITON_GPU=(tests/test_triton.py -k "gpu")
# the v2 persistent kernels' standalone GPU program (compiled at test time) and ptx.cuh's golden tests
SEL_V2_GPU=(tests/test_cuda_persistent_v2.py tests/test_cuda_emu_ptx.py -k "gpu")
# stage 2: zoneout, layer norm and double backward on the GPU backends
SEL_OPTIONS=(tests/test_zoneout.py tests/test_layer_norm.py tests/test_double_backward.py -k "cuda or triton")
# stage 2: persistent forward µs/step against H at B=16 and against B at H=768 (bf16, T=512)
SCAN=lstm:512:16:64:bf16,lstm:512:16:128:bf16,lstm:512:16:256:bf16,lstm:512:16:512:bf16,lstm:512:16:768:bf16
SCAN=$SCAN,lstm:512:16:1024:bf16,lstm:512:1:768:bf16,lstm:512:32:768:bf16,lstm:512:64:768:bf16
# stage 2: the rest of what runs on CUDA (CPU-only tests are CI's): every backend on cuda, Triton's
# other tests at their GPU shapes, the C++ ops' CUDA opcheck and gradcheck
SEL_REST=(tests/test_backends.py tests/test_triton.py tests/test_cpp_ops.py
          -k "(test_backends and cuda) or (test_triton and not gpu) or (TestCUDA and (opcheck or gradcheck))")

if [ $DRY = 1 ]; then
  note "dry run ($(date -u)): no GPU needed"
  bash -n "$0" && note "PASS  bash syntax" || { note "FAIL  bash syntax"; STATUS=1; }
  for tool in timeout nvidia-smi compute-sanitizer nvcc; do
    command -v $tool > /dev/null && note "ok    $tool: $(command -v $tool)" || note "note  $tool not found here"
  done
  step "scripts compile" 60 compile.log $PY -m py_compile scripts/gpu_smoke.py scripts/gpu_timings.py
  step "smoke configurations" 60 smoke.log $PY scripts/gpu_smoke.py --list
  step "timing cases" 60 timings.log $PY scripts/gpu_timings.py --list
  step "scan cases" 60 scan.log $PY scripts/gpu_timings.py --list --backends nn,persistent --passes forward --cases "$SCAN"
  for sel in SEL_PERSISTENT SEL_CPP_CUDA SEL_TRITON_GPU SEL_V2_GPU SEL_OPTIONS SEL_REST; do
    declare -n args=$sel
    step "collect $sel" 300 "collect_$sel.log" $PY -m pytest -q --collect-only "${args[@]}"
  done
  finish
fi

# ------------------------------------------------------------------ a GPU, or stop here
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  note "FAIL  no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run this on a lent GPU, see scripts/README.md"
  STATUS=1
  finish
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.sm,compute_cap --format=csv
  nvcc --version | tail -1
  $PY -c "import torch, sys, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'numpy', numpy.__version__, 'SMs', torch.cuda.get_device_properties(0).multi_processor_count)"
  git log -1 --format='commit %h %s' 2>/dev/null || true
  uptime
} > "$LOGS/env.txt" 2>&1
tee -a "$SUMMARY" < "$LOGS/env.txt"

# the extension loads, matches csrc/ and has CUDA kernels
EXT_OK=($PY -c "
import sys
from fused_rnn.ops.cpp import ops
err = ops.load_error()
print('fused_rnn._C:', err or ('ok, CUDA' if ops.built_with_cuda() else 'built without CUDA'))
sys.exit(0 if err is None and ops.built_with_cuda() else 1)")

# ------------------------------------------------------------------ build (or the carried one, or the one
# an earlier stage left on this machine)
if [ "${FUSED_RNN_GPU_CHECK_REBUILD:-0}" != 1 ] && "${EXT_OK[@]}" > "$LOGS/carried_build.log" 2>&1; then
  note "PASS  build: a working build is present ($(tail -1 "$LOGS/carried_build.log"))"
else
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    export TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  step "build fused_rnn._C for sm_${TORCH_CUDA_ARCH_LIST/./} with $MAX_JOBS jobs" 300 build.log \
    $PY setup.py build_ext --inplace || finish
  step "extension loads" 60 build_load.log "${EXT_OK[@]}" || finish
fi

if [ "$STAGE" = stage1 ]; then
  # ---------------------------------------------------------------- correctness, then timings
  # (in order of what a first run on new hardware most needs to see: the v2 kernels' fragment layouts,
  # the persistent kernels against the per-step path and torch.nn, their speed, then everything else)
  step "pytest: v2 kernels' GPU program and ptx.cuh golden tests" 90 pytest_v2_gpu.log \
    $PY -m pytest -q -rfEs "${SEL_V2_GPU[@]}"
  step "pytest: persistent kernels" 100 pytest_persistent.log \
    env FUSED_RNN_CUDA_PERSISTENT=1 $PY -m pytest -q -rfEs -x "${SEL_PERSISTENT[@]}"
  step "timings vs cuDNN (CUDA events)" 120 timings.log \
    $PY scripts/gpu_timings.py --csv "$LOGS/timings.csv"
  { echo; echo "timings (ms, median):"; sed -n '/^cell /,$p' "$LOGS/timings.log"; } >> "$SUMMARY"
  step "smoke: every kernel vs float64 reference (CUDA_LAUNCH_BLOCKING=1, NaN-filled)" 100 smoke.log \
    env CUDA_LAUNCH_BLOCKING=1 $PY scripts/gpu_smoke.py --workers "$(( $(nproc) < 12 ? $(nproc) : 12 ))"
  step "pytest: CUDA tests of test_cpp_ops (no opcheck/gradcheck)" 60 pytest_cpp_cuda.log \
    $PY -m pytest -q -rfEs "${SEL_CPP_CUDA[@]}"
  step "pytest: Triton GPU tests (incl. co-residency probe)" 60 pytest_triton_gpu.log \
    $PY -m pytest -q -rfEs "${SEL_TRITON_GPU[@]}"
  { echo; grep -E "^FAIL" "$LOGS/smoke.log" | head -20; grep -E "^(FAILED|ERROR) " "$LOGS"/pytest_*.log | head -30; } >> "$SUMMARY"
  finish
fi

# ------------------------------------------------------------------ stage 2
# what stage 1 leaves: the persistent and per-step tests in full, the options (zoneout, layer norm,
# double backward) on the cuda and triton backends, where a step's time goes (sync costs alone, a
# profile, persistent forward against H), compute-sanitizer, the rest of the CUDA tests, the sweep
# first: the sync costs decide the persistent kernel's next design (PERSISTENT_V2.md, "v2.1")
step "sync costs alone (benchmarks/sync_cost.cu)" 120 sync_cost.log \
  $PY -m benchmarks.sync_cost --out "$LOGS/sync_cost.csv"
{ echo; echo "sync costs:"; grep -E "^\|" "$LOGS/sync_cost.log"; } >> "$SUMMARY"
step "pytest: persistent kernels (all cases)" 100 pytest_persistent.log \
  env FUSED_RNN_CUDA_PERSISTENT=1 $PY -m pytest -q -rfEs "${SEL_PERSISTENT[@]}"
step "pytest: CUDA tests of test_cpp_ops (no opcheck/gradcheck)" 60 pytest_cpp_cuda.log \
  $PY -m pytest -q -rfEs "${SEL_CPP_CUDA[@]}"
step "pytest: zoneout, layer norm, double backward on cuda and triton" 90 pytest_options.log \
  $PY -m pytest -q -rfEs "${SEL_OPTIONS[@]}"
step "profile: per-step path, LSTM B=16 H=768 bf16 T=64" 40 profile_per_step.log \
  $PY scripts/gpu_profile.py --persistent 0
step "profile: persistent v2, LSTM B=16 H=768 bf16 T=64" 40 profile_persistent.log \
  $PY scripts/gpu_profile.py --persistent 1
grep -h "us/step (wall)" "$LOGS"/profile_*.log >> "$SUMMARY" 2>/dev/null
step "timings: persistent forward against H and B (bf16)" 60 scan.log \
  $PY scripts/gpu_timings.py --backends nn,persistent --passes forward --csv "$LOGS/scan.csv" --cases "$SCAN"
{ echo; echo "scan (ms, median):"; sed -n '/^cell /,$p' "$LOGS/scan.log"; } >> "$SUMMARY"
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  step "compute-sanitizer memcheck: persistent kernels, H in {8, 133}" 150 memcheck.log \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 1 --leak-check no \
    --kernel-name kns=persistent_ $PY scripts/gpu_smoke.py --workers 0 --no-kernel-check \
    --backends persistent --H 8,133
else
  note "SKIP  compute-sanitizer not found"
fi
XDIST=()
$PY -c "import xdist" 2> /dev/null && XDIST=(-n 8)   # pytest-xdist is on the GPU machine's image
step "pytest: the rest of the CUDA tests ${XDIST[*]}" 200 pytest_rest.log \
  $PY -m pytest -q -rfE "${XDIST[@]}" "${SEL_REST[@]}"
step "benchmark sweep, gpu-core grid (3 minutes, resumable)" 210 sweep.log \
  $PY -m benchmarks.sweep --grid gpu-core --max-minutes 3 --resume
cp benchmarks/results/sweep-*.md benchmarks/results/sweep-*.csv "$LOGS/" 2>/dev/null || true
{ echo; grep -E "^(FAILED|ERROR) " "$LOGS"/pytest_*.log | head -30; grep -E "ERROR SUMMARY" "$LOGS/memcheck.log"; } >> "$SUMMARY"
finish
