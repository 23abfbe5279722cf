// CUDA pointwise kernels of one recurrence step: one thread per (row b, hidden unit j), a
// grid-stride loop with 64-bit indices, launched on the caller's stream. CUDA headers only
// (no torch): the tensor-facing launcher is csrc/recurrence.cpp, which also runs the cuBLAS
// GEMMs between these kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../recurrence_step.h"
#include "conv_cuda.cuh"

namespace fused_rnn {

namespace cuda {
namespace {

constexpr int kThreads = 256;

// `row_fn(b, j)` for every (b, j) in [B, W), W = row width; idx is 64-bit throughout.
template <typename RowFn>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(int64_t B, int64_t W, RowFn row_fn) {
  const int64_t n = B * W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += stride) {
    const int64_t b = idx / W;
    const int64_t j = idx - b * W;
    row_fn(b, j);
  }
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fused_rnn: CUDA kernel launch failed: ") + cudaGetErrorString(err));
}

template <typename RowFn> void launch(int64_t B, int64_t W, void* stream, RowFn row_fn) {
  const int64_t n = B * W;
  if (n == 0) return;  // a zero-sized grid is a launch error
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
  elementwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(B, W, row_fn);
  check_launch();
}

template <typename F> void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default: throw std::runtime_error("fused_rnn: unsupported dtype on CUDA");
  }
}

// Functors (not extended lambdas: no --extended-lambda flag needed) carrying the params by value.
template <Cell C, typename S> struct ForwardFn {
  ForwardStepParams p;
  __device__ void operator()(int64_t b, int64_t j) const { forward_row<C, S>(p, b, j, j + 1); }
};
template <Cell C, typename S> struct BackwardFn {
  BackwardStepParams p;
  __device__ void operator()(int64_t b, int64_t j) const { backward_row<C, S>(p, b, j, j + 1); }
};
template <typename S> struct CommitFn {
  ProjCommitParams p;
  __device__ void operator()(int64_t b, int64_t j) const { proj_commit_row<S>(p, b, j, j + 1); }
};
template <typename S> struct PrepFn {
  ProjBackwardPrepParams p;
  __device__ void operator()(int64_t b, int64_t j) const { proj_backward_prep_row<S>(p, b, j, j + 1); }
};

}  // namespace

void forward_step(const ForwardStepParams& p, void* stream) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(p.cell, [&](auto c) {
      constexpr Cell C = decltype(c)::value;
      launch(p.B, p.H, stream, ForwardFn<C, S>{p});
    });
  });
}

void backward_step(const BackwardStepParams& p, void* stream) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(p.cell, [&](auto c) {
      constexpr Cell C = decltype(c)::value;
      launch(p.B, p.H, stream, BackwardFn<C, S>{p});
    });
  });
}

void proj_commit(const ProjCommitParams& p, void* stream) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    launch(p.B, p.Hout, stream, CommitFn<S>{p});
  });
}

void proj_backward_prep(const ProjBackwardPrepParams& p, void* stream) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    launch(p.B, p.Hout, stream, PrepFn<S>{p});
  });
}

}  // namespace cuda
}  // namespace fused_rnn
