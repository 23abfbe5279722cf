"""Builds the C++/CUDA kernels as fused_rnn._C (package metadata lives in pyproject.toml).

- a CUDAExtension when torch is a CUDA build and nvcc is found (CUDA_HOME, else /usr/local/cuda);
- else a CppExtension (the `cpu` backend only);
- else, with FUSED_RNN_NO_EXT=1 or no C++ compiler, no extension: pure Python, and
  fused_rnn.available_backends() says why the `cpu`/`cuda` backends are missing.

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (ninja's parallelism),
FUSED_RNN_FORCE_CPU=1 (skip CUDA even when available). A compile error fails the build.
"""
import hashlib
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = "csrc"


def source_hash(csrc):
    """Hash of the kernel sources; fused_rnn/ops/cpp/ops.py recomputes it to detect a stale build."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(csrc).rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")):
        h.update(f.relative_to(csrc).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _write_source_hash_header():
    """build/generated/fused_rnn_source_hash.h, rewritten only when the hash changes (so that only
    csrc/python_module.cpp recompiles)."""
    out = ROOT / "build" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    header = out / "fused_rnn_source_hash.h"
    text = f'#define FUSED_RNN_SOURCE_HASH "{source_hash(ROOT / CSRC)}"\n'
    if not header.exists() or header.read_text() != text:
        header.write_text(text)
    return str(out)


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and Path("/usr/local/cuda/bin/nvcc").exists():
        home = "/usr/local/cuda"
    if home and (Path(home) / "bin" / "nvcc").exists():
        os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
        return home
    return None


def _extensions():
    if os.environ.get("FUSED_RNN_NO_EXT", "0") == "1":
        print("fused_rnn: FUSED_RNN_NO_EXT=1: building no C++ extension (pure Python)", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("fused_rnn: no C++ compiler found: building no C++ extension (pure Python)", file=sys.stderr)
        return [], {}
    cuda_home = None if os.environ.get("FUSED_RNN_FORCE_CPU", "0") == "1" else _find_nvcc()
    import torch
    from torch.utils import cpp_extension

    sources = [f"{CSRC}/recurrence.cpp", f"{CSRC}/layer_entry.cpp", f"{CSRC}/projected_autograd.cpp",
               f"{CSRC}/python_module.cpp"]
    sources += [f"{CSRC}/cpu/pointwise_cpu{isa}.cpp" for isa in ("", "_avx2", "_avx512")]
    sources += [f"{CSRC}/cpu/fused_cpu_avx512bf16.cpp"]
    sources += [f"{CSRC}/cell_step.cpp"] + [f"{CSRC}/cpu/cell_step_cpu{isa}.cpp" for isa in ("", "_avx2", "_avx512")]
    # -fno-trapping-math lets GCC vectorise the clamps in cell_math.h; -g0: no debug info (build time).
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into
    # this extension; without the flag every parallel_for here runs on one thread. libgomp.so.1 then
    # resolves to the copy torch has already loaded (same soname): one OpenMP runtime in the process.
    cxx = ["-O3", "-g0", "-fvisibility=hidden", "-fno-trapping-math", "-fopenmp"]
    link = ["-fopenmp"]
    depends = [str(p) for p in (ROOT / CSRC).rglob("*") if p.suffix in (".h", ".cuh")]
    include_dirs = [_write_source_hash_header()]
    if torch.version.cuda and cuda_home:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += [f"{CSRC}/cuda/pointwise_cuda.cu", f"{CSRC}/cuda/persistent.cu"]
        ext = cpp_extension.CUDAExtension(
            "fused_rnn._C", sources, depends=depends, include_dirs=include_dirs, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link)
        kind = f"CUDA (nvcc in {cuda_home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})"
    else:
        ext = cpp_extension.CppExtension("fused_rnn._C", sources, depends=depends, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link)
        why = ("FUSED_RNN_FORCE_CPU=1" if os.environ.get("FUSED_RNN_FORCE_CPU", "0") == "1"
               else "torch is not a CUDA build" if not torch.version.cuda else "nvcc not found")
        kind = f"CPU only ({why})"
    print(f"fused_rnn: building fused_rnn._C: {kind}", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
