// CUDA pointwise kernels of one recurrence step: one thread per (row b, hidden unit j), a
// grid-stride loop with 64-bit indices. Kernel bodies only (no launches, no runtime API, no torch):
// csrc/cuda/pointwise_cuda.cu launches them on the caller's stream between the cuBLAS GEMMs of
// csrc/recurrence.cpp; tests/emu/kernels_pointwise.cpp runs them on CPU threads under the emulator
// (compat.cuh) with a host GEMM in between.
#pragma once

#include "compat.cuh"

#include <cstdint>
#include <stdexcept>

#include "../recurrence_step.h"
#include "conv_cuda.cuh"

namespace fused_rnn {
namespace cuda {

constexpr int kPointwiseThreads = 256;

// Blocks of a launch over n = B * W elements: one thread per element, at most 2^20 blocks (the
// grid-stride loop covers the rest). n > 0: a zero-sized grid is a launch error.
inline int64_t pointwise_blocks(int64_t n) {
  const int64_t blocks = (n + kPointwiseThreads - 1) / kPointwiseThreads;
  return blocks < (int64_t(1) << 20) ? blocks : int64_t(1) << 20;
}

// `row_fn(b, j)` for every (b, j) in [B, W), W = row width; idx is 64-bit throughout.
template <typename RowFn>
FR_KERNEL void FR_LAUNCH_BOUNDS(kPointwiseThreads) elementwise_kernel(int64_t B, int64_t W, RowFn row_fn) {
  const int64_t n = B * W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += stride) {
    const int64_t b = idx / W;
    const int64_t j = idx - b * W;
    row_fn(b, j);
  }
}

// Functors (not extended lambdas: no --extended-lambda flag needed) carrying the params by value.
template <Cell C, typename S> struct ForwardFn {
  ForwardStepParams p;
  FR_DEVICE void operator()(int64_t b, int64_t j) const { forward_row<C, S>(p, b, j, j + 1); }
};
template <Cell C, typename S> struct BackwardFn {
  BackwardStepParams p;
  FR_DEVICE void operator()(int64_t b, int64_t j) const { backward_row<C, S>(p, b, j, j + 1); }
};
template <typename S> struct CommitFn {
  ProjCommitParams p;
  FR_DEVICE void operator()(int64_t b, int64_t j) const { proj_commit_row<S>(p, b, j, j + 1); }
};
template <typename S> struct PrepFn {
  ProjBackwardPrepParams p;
  FR_DEVICE void operator()(int64_t b, int64_t j) const { proj_backward_prep_row<S>(p, b, j, j + 1); }
};

// Calls f with a value of the storage type of `d`: the one dtype switch of the launcher and of the
// emulated driver.
template <typename F> void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default: throw std::runtime_error("fused_rnn: unsupported dtype on CUDA");
  }
}

// The kernel and its functor for each step pass, so that the launcher and the driver name the same
// instances: f(row functor, row width).
template <typename F> void forward_step_kernel(const ForwardStepParams& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(p.cell, [&](auto c) { f(ForwardFn<decltype(c)::value, S>{p}, p.H); });
  });
}
template <typename F> void backward_step_kernel(const BackwardStepParams& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(p.cell, [&](auto c) { f(BackwardFn<decltype(c)::value, S>{p}, p.H); });
  });
}
template <typename F> void proj_commit_kernel(const ProjCommitParams& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto s) { f(CommitFn<decltype(s)>{p}, p.Hout); });
}
template <typename F> void proj_backward_prep_kernel(const ProjBackwardPrepParams& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto s) { f(PrepFn<decltype(s)>{p}, p.Hout); });
}

}  // namespace cuda
}  // namespace fused_rnn
