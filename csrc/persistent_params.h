// Parameters of the persistent CUDA kernels (csrc/cuda/persistent_kernels.cuh): one cooperative launch runs
// every time step of one layer and direction, each block keeping its slice of w_hh in shared memory
// for the whole sequence and exchanging h through global memory with one grid-wide barrier per step.
// No torch types (DESIGN.md, build time). Shapes as in recurrence_params.h; no projection (proj
// falls back to the per-step kernels). S = storage dtype, A = float (fp32 accumulation and state).
#pragma once

#include "recurrence_params.h"

namespace fused_rnn {

struct PersistentForwardParams {
  Cell cell;
  DType dtype;             // Float32, Float16 or BFloat16
  int64_t T, B, H;
  bool reverse;
  const int64_t* lengths;  // [B] or nullptr
  const void* gx;          // S [T, B, G*H]
  const void* w_hh;        // S [G*H, H] contiguous
  const void* b_hh;        // S [G*H] or nullptr
  const void* h0;          // S [B, H]
  const void* c0;          // S [B, H] (LSTM)
  void* y;                 // S [T, B, H]
  void* h_n;               // S [B, H]
  void* c_n;               // S [B, H] (LSTM)
  void* gates;             // S [T, B, 4*H] saved for the backward (LSTM i,f,g,o; GRU r,z,n,gh_n);
                           //   valid rows written; nullptr for RNN
  void* cells;             // A [T, B, H] saved c after each step (LSTM), valid rows written
  void* h_buf;             // S [2, B, H] workspace: h exchanged between blocks, double-buffered
  void* c_state;           // A [B, H] workspace: the running cell state (LSTM)
};

struct PersistentBackwardParams {
  Cell cell;
  DType dtype;
  int64_t T, B, H;
  bool reverse;            // of the forward pass
  const int64_t* lengths;  // [B] or nullptr
  const void* w_hh;        // S [G*H, H] contiguous
  const void* dy;          // S [T, B, H]
  const void* dh_n;        // S [B, H]
  const void* dc_n;        // S [B, H] (LSTM)
  const void* gates;       // S [T, B, 4*H] as saved by the forward
  const void* cells;       // A [T, B, H] (LSTM)
  const void* y;           // S [T, B, H] the forward's output (GRU h_prev, RNN h)
  const void* h0;          // S [B, H]
  const void* c0;          // S [B, H] (LSTM)
  void* dgx;               // S [T, B, G*H] grad of gx
  void* dgh;               // S [T, B, G*H] grad of h_prev @ w_hh.T + b_hh (== dgx except GRU)
  void* dh0;               // S [B, H]
  void* dc0;               // S [B, H] (LSTM)
  void* dh_state;          // A [B, H] workspace: the gradient carried to the previous step
  void* dc_state;          // A [B, H] workspace (LSTM)
};

// How a persistent launch is laid out: `blocks` blocks of `threads` threads, each owning `units`
// consecutive hidden units (all G gate rows of them) and `smem_bytes` of shared memory.
struct PersistentPlan {
  int blocks, threads, units;
  size_t smem_bytes;
};

namespace cuda {
// Whether the persistent kernels can run this layer on `device`; fills `plan` when they can.
// They cannot in float64, when w_hh's slices do not fit in shared memory, when the device lacks
// cooperative launch or cannot hold the grid at once, or when a device query fails
// (csrc/cuda/persistent_plan.h). Computed once per (device, cell, dtype, H), then cached.
bool persistent_plan(Cell cell, DType dtype, int64_t H, int device, PersistentPlan* plan);
// Launch on `stream` (a cudaStream_t); asynchronous. `plan` must come from persistent_plan.
void persistent_forward(const PersistentForwardParams& p, const PersistentPlan& plan, void* stream);
void persistent_backward(const PersistentBackwardParams& p, const PersistentPlan& plan, void* stream);
}  // namespace cuda

}  // namespace fused_rnn
