#!/usr/bin/env bash
# The whole test suite on another torch version (default 2.11.0: the GPU machine's torch, which
# brings triton 3.6), without touching the main environment or the in-place build:
#
#   scripts/test_other_torch.sh [TORCH_VERSION] [pytest args...]
#
# Default: 2.11.0, `-q tests -m "not torch_free"`: every test but those of programs that link no torch
# (the emulated CUDA kernels, the nvcc/SASS checks; pyproject.toml's markers), whose results do not
# depend on torch and which the main run has run.
#
# 1. a venv with that torch (kept and reused: FUSED_RNN_VENV_DIR, default build/venv-torch-VERSION);
# 2. a copy of this working tree without build outputs (tracked and untracked-but-not-ignored files),
#    so the extension is built against that torch there and the in-place fused_rnn/_C*.so of the main
#    environment is not clobbered;
# 3. the extension built in the copy (CPU + CUDA when nvcc is found, as CI's main build), then pytest.
# Exit status: pytest's (or the failing step's). Times: README.md / scripts/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERSION=${1:-2.11.0}
shift || true
PYTEST_ARGS=("$@")
[ ${#PYTEST_ARGS[@]} -gt 0 ] || PYTEST_ARGS=(-q tests -m "not torch_free")
VENV=${FUSED_RNN_VENV_DIR:-$ROOT/build/venv-torch-$VERSION}
PY=${PYTHON:-python3}
t0=$SECONDS
say() { echo "[test_other_torch $VERSION, $((SECONDS - t0))s] $*"; }

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$VERSION')" 2>/dev/null; then
  say "creating $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  timeout 1200 "$VENV/bin/python" -m pip install -q "torch==$VERSION" "setuptools<82" wheel ninja numpy \
    pytest pytest-benchmark matplotlib tqdm sacrebleu sentencepiece
fi
"$VENV/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

COPY=$(mktemp -d "${TMPDIR:-/tmp}/fused_rnn-torch-$VERSION.XXXXXX")
trap 'rm -rf "$COPY"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -cf - -T - | tar -xf - -C "$COPY"
say "copied the working tree to $COPY"

cd "$COPY"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
# the CUDA kernels for the GPU machine's architecture (sm_90) only: what this build checks is that they
# compile against this torch's headers; the main build covers sm_80 (~1 min less of nvcc at 2 cores)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
timeout 1800 "$VENV/bin/python" setup.py -q build_ext --inplace > build.log 2>&1 || { tail -50 build.log; say "build FAILED"; exit 1; }
say "built $(ls fused_rnn/_C*.so)"
export FUSED_RNN_REQUIRE_EXT=1
# the emulated CUDA programs: the main tree's cache (keyed by the sources' bytes, not their path), so
# that what the main suite built is not built again here
export FR_EMU_BUILD_DIR=${FR_EMU_BUILD_DIR:-$ROOT/build/emu}
# the copy is the fused_rnn every process imports (the examples' torchrun workers too), not an
# installed one of the main environment
export PYTHONPATH="$COPY${PYTHONPATH:+:$PYTHONPATH}"
set +e
timeout 3600 "$VENV/bin/python" -m pytest "${PYTEST_ARGS[@]}"
rc=$?
say "pytest exit status $rc"
exit $rc
