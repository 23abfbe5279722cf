// Parameters of the persistent CUDA kernels (csrc/cuda/persistent_v2_kernels.cuh): one cooperative launch
// runs every time step of one layer and direction, each CTA keeping its rows of w_hh in registers for the
// whole sequence and exchanging h through global memory, each CTA waiting on per-step flags of only the
// CTAs it reads. No torch types (DESIGN.md, build time). Shapes as in recurrence_params.h; no projection
// (proj runs the per-step kernels). S = storage dtype, A = float (fp32 accumulation and state).
#pragma once

#include "cuda/persistent_plan.h"
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
};

namespace cuda {
// Whether the persistent kernels run a layer of (cell, dtype, H, B, projection) on `device`:
// PlanVerdict::Persistent with `plan` filled, or why the per-step kernels run it instead
// (csrc/cuda/persistent_plan.h, plan_persistent_v2, with the device's attributes and occupancy). fp32
// layers follow torch.backends.cuda.matmul.allow_tf32 (TF32 or 3xTF32 MMAs), read at every call.
// Computed once per (device, cell, dtype, H, B, TF32 allowed), then cached.
PlanVerdict persistent_plan(Cell cell, DType dtype, int64_t H, int64_t B, bool proj, int device,
                            PersistentV2Plan* plan);
// Launch on `stream` (a cudaStream_t); asynchronous. `plan` comes from persistent_plan; `workspace` is
// v2_workspace_offsets(plan, backward).total bytes of device memory (at least 256-byte aligned) that
// stays allocated until the kernel finishes on `stream`: the launcher zeroes its flags first.
void persistent_forward(const PersistentForwardParams& p, const PersistentV2Plan& plan, void* workspace,
                        void* stream);
void persistent_backward(const PersistentBackwardParams& p, const PersistentV2Plan& plan, void* workspace,
                         void* stream);
}  // namespace cuda

}  // namespace fused_rnn
