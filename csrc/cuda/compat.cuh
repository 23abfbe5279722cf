// One spelling of the CUDA kernel language for two compilers.
//
// Kernel headers (csrc/cuda/*.cuh) include this first and use only the names below, so that the same source
// compiles under nvcc (real kernels) and under a host C++17 compiler with -DFUSED_RNN_EMULATE, where
// csrc/cuda/emu/ runs every CUDA thread of a launch on CPU threads (tests/test_cuda_emulated.py).
// Why macros for shared memory: a bare `__shared__` array in C++ would be one variable for the whole process,
// while CUDA gives every block its own copy.
#pragma once

#if defined(__CUDACC__)

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define FR_KERNEL __global__
#define FR_DEVICE __device__ __forceinline__
#define FR_LAUNCH_BOUNDS(n) __launch_bounds__(n)
// A static shared array `type name[n]` of the block.
#define FR_SHARED_ARRAY(type, name, n) __shared__ type name[n]
// The block's dynamic shared memory (the launch's dynamic size) as `type* name`, 16-byte aligned.
#define FR_SHARED_DYNAMIC(type, name)                             \
  extern __shared__ __align__(16) unsigned char fr_dynamic_smem[]; \
  type* name = reinterpret_cast<type*>(fr_dynamic_smem)

// The grid-wide barrier of a cooperative launch. Outside one the grid group is invalid: trap (a launch error)
// rather than hang, as the emulator reports it.
__device__ __forceinline__ void fr_grid_sync() {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  if (!grid.is_valid()) __trap();
  grid.sync();
}

#elif defined(FUSED_RNN_EMULATE)

#include "emu/cuda_emu.h"

#define FR_KERNEL
#define FR_DEVICE inline
#define FR_LAUNCH_BOUNDS(n)
// The site key is the address of a local static: one per source site and per template instantiation, the same
// in every translation unit (inline functions share their statics), as `__shared__` variables are.
#define FR_SHARED_ARRAY(type, name, n)         \
  static const char fr_shared_site_##name = 0; \
  type* name = ::fr_emu::shared_static<type>(static_cast<size_t>(n), &fr_shared_site_##name)
#define FR_SHARED_DYNAMIC(type, name) type* name = ::fr_emu::shared_dynamic<type>()

inline void fr_grid_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::fr_emu::detail::grid_sync(file, line);
}

#else
#error "csrc/cuda/compat.cuh: compile with nvcc, or with a host compiler and -DFUSED_RNN_EMULATE (the emulator)"
#endif
