// Temporary stand-in for the emulator's compat.cuh (names as agreed in the emulator contract);
// replaced by the runtime's file when it lands.
#pragma once
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FR_KERNEL __global__
#define FR_DEVICE __device__ __forceinline__
#define FR_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define FR_SHARED_ARRAY(type, name, n) __shared__ type name[n]
#define FR_SHARED_DYNAMIC(type, name)                         \
  extern __shared__ __align__(16) unsigned char fr_smem_raw_[]; \
  type* name = reinterpret_cast<type*>(fr_smem_raw_)
__device__ __forceinline__ void fr_grid_sync() { cooperative_groups::this_grid().sync(); }
#elif defined(FUSED_RNN_EMULATE)
#include "emu/cuda_emu.h"
#else
#error "compat.cuh: compile with nvcc, or with -DFUSED_RNN_EMULATE on the host"
#endif
