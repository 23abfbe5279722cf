#!/usr/bin/env bash
# Installs the compiler the CUDA-on-CPU emulator tests prefer: Debian's clang-16 with its sanitizer runtimes
# (libclang-rt-16-dev). Its ThreadSanitizer runs the emulated kernels several times faster than g++ 12's
# (csrc/cuda/emu/README.md has the numbers). Installs only when run as root with apt-get available and
# something is missing; otherwise it says what the tests will use. Never fails the caller: without clang the
# tests fall back to g++ (tests/emu_build.py chooses).
set -u

have_clang() {
  command -v clang++-16 >/dev/null 2>&1 || return 1
  # the sanitizer runtimes live in libclang-rt-16-dev; without them -fsanitize=thread cannot link
  local rt
  rt=$(clang++-16 -print-file-name=libclang_rt.tsan-x86_64.a 2>/dev/null)
  [ -n "$rt" ] && [ -f "$rt" ] && return 0
  rt=$(clang++-16 -print-runtime-dir 2>/dev/null)
  [ -n "$rt" ] && ls "$rt"/libclang_rt.tsan*.a >/dev/null 2>&1
}

if have_clang; then
  echo "install_emu_toolchain: using $(command -v clang++-16) (clang 16 with sanitizer runtimes)"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_emu_toolchain: installing clang-16 libclang-rt-16-dev with apt-get"
  if DEBIAN_FRONTEND=noninteractive apt-get update -qq \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang-16 libclang-rt-16-dev; then
    if have_clang; then
      echo "install_emu_toolchain: using $(command -v clang++-16)"
      exit 0
    fi
  fi
  echo "install_emu_toolchain: apt-get could not install clang-16; the emulator tests will use g++" >&2
  exit 0
fi
echo "install_emu_toolchain: clang-16 with sanitizer runtimes not found and cannot install (not root or no apt-get);" \
     "the emulator tests will use $(command -v g++ || echo 'no compiler: they will skip')"
exit 0
