// CUDA pointwise kernels of one recurrence step: one thread per (row b, hidden unit j), a
// grid-stride loop with 64-bit indices; with zoneout or layer norm one block per row (the layer
// norm's statistics are a reduction over the row), the block's threads striding over its units. Kernel bodies only (no launches, no runtime API, no torch):
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

// Threads per block of a row-per-block launch: a power of two (BlockRow's tree) covering the row's
// W units, at least a warp, at most kPointwiseThreads (the threads then take several units each).
inline int row_block_threads(int64_t W) {
  int threads = 32;
  while (threads < W && threads < kPointwiseThreads) threads *= 2;
  return threads;
}

// Grid and block sizes of a launch of elementwise_kernel over B rows of width W (B * W > 0): a
// row per block (RowFn::kRows, at most 2^20 blocks: the kernel strides over the rest), else an
// element per thread.
template <typename RowFn> int64_t launch_blocks(int64_t B, int64_t W) {
  return RowFn::kRows ? (B < (int64_t(1) << 20) ? B : int64_t(1) << 20) : pointwise_blocks(B * W);
}
template <typename RowFn> int launch_threads(int64_t W) {
  return RowFn::kRows ? row_block_threads(W) : kPointwiseThreads;
}

// The reducer of recurrence_step.h's *_row_options in a row-per-block launch: sum() is the block's
// total of every thread's partial (a tree over shared memory; blockDim.x a power of two).
template <typename A> struct BlockRow {
  A* buf;  // blockDim.x entries of shared memory
  FR_DEVICE A sum(A x) const {
    buf[threadIdx.x] = x;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
      __syncthreads();
    }
    const A total = buf[0];
    __syncthreads();  // every thread has read the total before the next sum() overwrites buf
    return total;
  }
  FR_DEVICE void sync() const { __syncthreads(); }
};

// RowFn::kRows false: `row_fn(b, j)` for every (b, j) in [B, W), W = row width, one thread each.
// RowFn::kRows true: one block per row b (grid-stride over rows), `row_fn(b, units, reducer)`.
// idx is 64-bit throughout.
template <typename RowFn>
FR_KERNEL void FR_LAUNCH_BOUNDS(kPointwiseThreads) elementwise_kernel(int64_t B, int64_t W, RowFn row_fn) {
  if constexpr (RowFn::kRows) {
    FR_SHARED_ARRAY(typename RowFn::Acc, buf, kPointwiseThreads);
    const Units units{static_cast<int64_t>(threadIdx.x), W, static_cast<int64_t>(blockDim.x)};
    for (int64_t b = blockIdx.x; b < B; b += gridDim.x) row_fn(b, units, BlockRow<typename RowFn::Acc>{buf});
    return;
  }
  const int64_t n = B * W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += stride) {
    const int64_t b = idx / W;
    const int64_t j = idx - b * W;
    row_fn(b, j);
  }
}

// Functors (not extended lambdas: no --extended-lambda flag needed) carrying the params by value.
// kRows: a row per block (zoneout / layer norm, LSTM and GRU) or an element per thread.
template <Cell C, typename S, bool ROWS = false> struct ForwardFn {
  static constexpr bool kRows = ROWS;
  using Acc = typename AccOf<S>::type;
  ForwardStepParams p;
  FR_DEVICE void operator()(int64_t b, int64_t j) const { forward_row<C, S>(p, b, j, j + 1); }
  FR_DEVICE void operator()(int64_t b, Units u, BlockRow<Acc> r) const {
    if constexpr (C == Cell::LSTM || C == Cell::GRU) forward_row_options<C, S>(p, b, u, r);
  }
};
template <Cell C, typename S, bool ROWS = false> struct BackwardFn {
  static constexpr bool kRows = ROWS;
  using Acc = typename AccOf<S>::type;
  BackwardStepParams p;
  FR_DEVICE void operator()(int64_t b, int64_t j) const { backward_row<C, S>(p, b, j, j + 1); }
  FR_DEVICE void operator()(int64_t b, Units u, BlockRow<Acc> r) const {
    if constexpr (C == Cell::LSTM || C == Cell::GRU) backward_row_options<C, S>(p, b, u, r);
  }
};
template <typename S> struct CommitFn {
  static constexpr bool kRows = false;
  ProjCommitParams p;
  FR_DEVICE void operator()(int64_t b, int64_t j) const { proj_commit_row<S>(p, b, j, j + 1); }
};
template <typename S> struct PrepFn {
  static constexpr bool kRows = false;
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
// f(Fn<C, S, rows>{p}, p.H) for p's cell and dtype: a row per block when zoneout or layer norm is on
// (LSTM and GRU only: the op refuses them for RNN cells), an element per thread otherwise.
template <template <Cell, typename, bool> class Fn, typename P, typename F>
void dispatch_step(const P& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(p.cell, [&](auto c) {
      constexpr Cell C = decltype(c)::value;
      if (!has_options(p.opt)) {
        f(Fn<C, S, false>{p}, p.H);
      } else if constexpr (C == Cell::LSTM || C == Cell::GRU) {
        f(Fn<C, S, true>{p}, p.H);
      }
    });
  });
}
template <typename F> void forward_step_kernel(const ForwardStepParams& p, F&& f) {
  dispatch_step<ForwardFn>(p, f);
}
template <typename F> void backward_step_kernel(const BackwardStepParams& p, F&& f) {
  dispatch_step<BackwardFn>(p, f);
}
template <typename F> void proj_commit_kernel(const ProjCommitParams& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto s) { f(CommitFn<decltype(s)>{p}, p.Hout); });
}
template <typename F> void proj_backward_prep_kernel(const ProjBackwardPrepParams& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto s) { f(PrepFn<decltype(s)>{p}, p.Hout); });
}

}  // namespace cuda
}  // namespace fused_rnn
