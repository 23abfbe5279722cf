"""Build and run programs that execute CUDA kernel source on the CPU (the emulator in csrc/cuda/emu/).

A driver is a host .cpp that includes a kernel header (through csrc/cuda/compat.cuh) and calls
fr_emu::launch. `build` compiles it with -DFUSED_RNN_EMULATE in one of three MODES, links the emulator's
runtime (csrc/cuda/emu/*.cpp) in, and caches the executable; `run` executes it with sanitizer options that turn
any report into a failure.

    exe = emu_build.build([Path("tests/emu/my_driver.cpp")], "tsan", "my_driver")
    proc = emu_build.run(exe, ["arg"])          # pytest.fail on a sanitizer report, a non-zero exit, a timeout

Modes: plain (-O1 -g), tsan (ThreadSanitizer, -O0), asan (AddressSanitizer + UndefinedBehaviorSanitizer, -O0).
Compiler: $FR_EMU_CXX if set, else clang++-16 when it has its sanitizer runtimes, else g++
(csrc/cuda/emu/README.md gives the measured reason; scripts/install_emu_toolchain.sh installs clang-16).
"""
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
RUNTIME_SOURCES = sorted((CSRC / "cuda" / "emu").glob("*.cpp"))
# $FR_EMU_BUILD_DIR: another tree's cache (scripts/test_other_torch.sh points its copy of the tree at the main
# tree's, so that the second run of the suite builds nothing the first one built: ~10 min of clang at 2 cores).
BUILD_DIR = Path(os.environ.get("FR_EMU_BUILD_DIR") or ROOT / "build" / "emu")
MODES = ("plain", "tsan", "asan")

# The sanitizer builds at -O0: at -O1 clang spends minutes instrumenting the unrolled tile loops of the
# persistent kernels (tests/emu/kernels_persistent.cpp under asan: 293 s at -O1, 12 s at -O0, 2-core AMD
# EPYC); the runs, a few tiny shapes each, take 1-2x as long. Both sanitizers see every access at -O0 too.
_MODE_FLAGS = {
    "plain": ["-O1"],
    "tsan": ["-O0", "-fsanitize=thread"],
    "asan": ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}
# Sanitizer reports end the program with exit code 66, distinct from the emulator's own 86 (deadlock) and
# 87 (misuse) and from a test's wrong-result exit (1).
SANITIZER_EXIT = 66
_ENV = {
    "TSAN_OPTIONS": f"halt_on_error=1 exitcode={SANITIZER_EXIT} second_deadlock_stack=1 report_signal_unsafe=0",
    # detect_leaks=0: LeakSanitizer needs ptrace, which containers often refuse; leaks are not what we test
    "ASAN_OPTIONS": f"halt_on_error=1 exitcode={SANITIZER_EXIT} detect_leaks=0 abort_on_error=0",
    "UBSAN_OPTIONS": f"halt_on_error=1 exitcode={SANITIZER_EXIT} print_stacktrace=1",
}
_REPORT_MARKERS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "runtime error:",
                   "ERROR: LeakSanitizer", "ThreadSanitizer: ", "UndefinedBehaviorSanitizer")


def _links(cxx, flags):
    """Whether `cxx` can compile and link a tiny program with `flags` (e.g. clang without its sanitizer runtimes
    cannot link -fsanitize=thread)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cpp"
        src.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
        r = subprocess.run([cxx, "-std=c++17", "-pthread", *flags, str(src), "-o", str(Path(d) / "t")],
                           capture_output=True, text=True)
        return r.returncode == 0


@functools.lru_cache(maxsize=None)
def compiler():
    """(path, why) of the C++ compiler for emulated programs, or (None, reason) when none can build them."""
    forced = os.environ.get("FR_EMU_CXX")
    if forced:
        path = shutil.which(forced)
        return (path, f"$FR_EMU_CXX={forced}") if path else (None, f"$FR_EMU_CXX={forced} not found")
    for name in ("clang++-16", "clang++"):
        path = shutil.which(name)
        if path and _links(path, ["-fsanitize=thread"]) and _links(path, ["-fsanitize=address,undefined"]):
            return path, f"{name}: its ThreadSanitizer runs the emulator several times faster than g++'s"
    path = shutil.which("g++")
    if path and _links(path, ["-fsanitize=thread"]):
        return path, "g++ (no clang++ with sanitizer runtimes; scripts/install_emu_toolchain.sh installs clang-16)"
    return None, "no C++ compiler that links -fsanitize=thread (g++ or clang++ with its runtimes)"


def _cuda_include():
    """The CUDA toolkit's include directory when present: its cuda_fp16.h/cuda_bf16.h are host-compilable and
    give the emulated kernels the real __half/__nv_bfloat16 (else csrc/cuda/emu/half.h)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    inc = Path(home) / "include"
    return inc if (inc / "cuda_fp16.h").exists() else None


def _flags(mode, defines, include_dirs):
    if mode not in _MODE_FLAGS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flags = ["-std=c++17", "-pthread", "-g", "-DFUSED_RNN_EMULATE", *_MODE_FLAGS[mode], f"-I{CSRC}"]
    flags += [f"-I{d}" for d in include_dirs]
    cuda = _cuda_include()
    if cuda is not None:
        flags.append(f"-isystem{cuda}")  # -isystem: the toolkit's own warnings are not ours
    flags += [f"-D{d}" for d in defines]
    return flags


def _digest(parts):
    """The cache key of `parts`, with this tree's path taken out (-I flags): two copies of the same sources
    share their builds."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).replace(str(ROOT), "<root>").encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx):
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def _headers_digest():
    """Every header under csrc/ (a driver may include any of them) and the runtime sources."""
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".hpp") or p in RUNTIME_SOURCES)
    return _digest(b for f in files for b in (f.relative_to(CSRC).as_posix().encode(), f.read_bytes()))


def _compile(cxx, flags, src, obj):
    """Starts compiling src -> obj (into a temporary name, renamed when done, so that concurrent builds never
    see half-written files)."""
    tmp = obj.with_name(f"{obj.name}.{os.getpid()}.tmp")
    return subprocess.Popen([cxx, *flags, "-c", str(src), "-o", str(tmp)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True), tmp, obj


def _finish(jobs):
    errors = []
    for proc, tmp, obj in jobs:
        out, _ = proc.communicate()
        if proc.returncode == 0:
            os.replace(tmp, obj)
        else:
            tmp.unlink(missing_ok=True)
            errors.append(out)
    if errors:
        pytest.fail("emulated build failed:\n" + "\n".join(errors), pytrace=False)


def build(sources, mode, name, defines=(), include_dirs=()):
    """Compiles the driver sources (and the emulator runtime) in `mode`; returns the executable's path.

    Cached under build/emu/<mode>/<name>/, keyed by the compiler, the flags, the sources and every header under
    csrc/. Runtime objects are cached separately per (compiler, mode), so a driver build compiles only its own
    sources. A compile error fails the calling test with the compiler's output."""
    cxx, why = compiler()
    if cxx is None:
        pytest.skip(f"emulated CUDA tests need a C++ compiler: {why}")
    sources = [Path(s).resolve() for s in sources]
    flags = _flags(mode, defines, include_dirs)
    base = _digest([cxx, _compiler_version(cxx), *flags, _headers_digest()])
    out_dir = BUILD_DIR / mode / name
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / name
    # the drivers' own headers (beside them or in include_dirs) count too, or an edit there would reuse a stale build
    local = sorted({h for d in {s.parent for s in sources} | {Path(d).resolve() for d in include_dirs}
                    for h in d.glob("*") if h.suffix in (".h", ".cuh", ".hpp")})
    key = _digest([base, *(s.read_bytes() for s in sources), *(h.read_bytes() for h in local)])
    stamp = out_dir / "key"
    if exe.exists() and stamp.exists() and stamp.read_text() == key:
        return exe

    runtime_dir = BUILD_DIR / mode / "runtime" / _digest([cxx, _compiler_version(cxx), *_flags(mode, (), ()),
                                                          _headers_digest()])
    runtime_dir.mkdir(parents=True, exist_ok=True)
    runtime_objs = [runtime_dir / (s.stem + ".o") for s in RUNTIME_SOURCES]
    driver_objs = [out_dir / f"{i}_{s.stem}.o" for i, s in enumerate(sources)]
    jobs = [_compile(cxx, _flags(mode, (), ()), s, o) for s, o in zip(RUNTIME_SOURCES, runtime_objs) if not o.exists()]
    jobs += [_compile(cxx, flags, s, o) for s, o in zip(sources, driver_objs)]
    _finish(jobs)
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    link = subprocess.run([cxx, *flags, *map(str, driver_objs + runtime_objs), "-o", str(tmp)],
                          capture_output=True, text=True)
    if link.returncode != 0:
        pytest.fail("emulated link failed:\n" + link.stdout + link.stderr, pytrace=False)
    os.replace(tmp, exe)
    stamp.write_text(key)
    return exe


def sanitizer_report(text):
    """The first line of a sanitizer report in `text`, or None."""
    for line in text.splitlines():
        if any(m in line for m in _REPORT_MARKERS):
            return line
    return None


def _symbolizer():
    """llvm-symbolizer next to the compiler (clang's sanitizers print bare addresses without one)."""
    cxx, _ = compiler()
    if cxx:
        candidate = Path(os.path.realpath(cxx)).parent / "llvm-symbolizer"
        if candidate.exists():
            return str(candidate)
    return shutil.which("llvm-symbolizer")


def run(exe, args=(), timeout=120, env=None, expect_ok=True):
    """Runs an emulated program with sanitizer options that halt with exit code 66 on any report.

    expect_ok=True: fails the calling test (pytest.fail) on a sanitizer report, a non-zero exit or a timeout,
    showing the program's stderr. expect_ok=False: returns the result for the caller to inspect (a timeout then
    gives returncode None)."""
    full_env = dict(os.environ)
    full_env.update(_ENV)
    symbolizer = _symbolizer()
    if symbolizer:
        for var in ("TSAN_OPTIONS", "ASAN_OPTIONS", "UBSAN_OPTIONS"):
            full_env[var] += f" external_symbolizer_path={symbolizer}"
    full_env.update(env or {})
    cmd = [str(exe), *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        if expect_ok:
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s\n{text(e.stderr)[-6000:]}", pytrace=False)
        return subprocess.CompletedProcess(cmd, None, text(e.stdout), text(e.stderr))
    if expect_ok:
        report = sanitizer_report(proc.stderr)
        if report or proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}"
                        f"{' with a sanitizer report: ' + report if report else ''}\n"
                        f"--- stderr (last 6000 chars) ---\n{proc.stderr[-6000:]}", pytrace=False)
    return proc


def nvcc():
    """Path of nvcc (CUDA_HOME, /usr/local/cuda, PATH) or None: the tests that compile real CUDA need it."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuobjdump():
    """Path of cuobjdump (PATH, the CUDA toolkit, or the copy triton's wheel ships) or None."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(str(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and Path(c).exists()), None)
