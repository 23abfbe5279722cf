// Plain parameter structs between the tensor-facing launcher (csrc/recurrence.cpp) and the
// pointwise kernels (csrc/cpu/pointwise_cpu.cpp, csrc/cuda/pointwise_cuda.cu).
// No torch types here: the .cu file must compile with CUDA headers only (DESIGN.md, build time).
//
// Names: B batch, H hidden, Hout = proj_size or H, G gates (LSTM 4, GRU 3, RNN 1).
// "S" = the storage dtype of the tensors (`dtype`); "A" = accumulation dtype (double for
// Float64, float otherwise). What is carried from step to step in a sum — the GEMM result gh and
// the gradient dh — is A, so fp16/bf16 rounding does not compound over T (and fp16 gh cannot
// overflow before gx is added); what is stored per step (y, gates) is S. Every [B, X] block is row-major and contiguous (row stride X).
#pragma once

#include <cstdint>

namespace fused_rnn {

enum class Cell : int32_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// The layer norm's epsilon: torch.nn.LayerNorm's default, as fused_rnn.cell_math.LAYER_NORM_EPS.
constexpr double kLayerNormEps = 1e-5;

// Zoneout and the layer-normalised LSTM/GRU (fused_rnn/reference.py, recurrence()), for LSTM and
// GRU without a projection; all null / 0 for the plain layer. Shared by the forward and backward.
//   zoneout   h_t = keep ? h_{t-1} : h~_t (training mask) or h~_t + p (h_{t-1} - h~_t) (eval), c alike
//   LN        gates = gx + LN(h_{t-1} @ w_hh.T) * gain_hh + b_hh, LN over each row's G*H values;
//             LSTM: h~_t = o * tanh(LN(c~_t) * gain_c + bias_c)
struct StepOptions {
  const uint8_t* keep_h;  // [B, H] training mask at t (1 = keep h_{t-1}), or nullptr
  const uint8_t* keep_c;  // [B, H] LSTM, likewise for c
  double keep_p;          // eval's p when keep_h is nullptr (0: no zoneout)
  const void* gain_hh;    // S [G*H] or nullptr (no layer norm)
  const void* gain_c;     // S [H] LSTM with layer norm
  const void* bias_c;     // S [H]
  void* ln_hat;           // A [B, (G + LSTM)*H] at t: the normalised values (forward writes, backward reads)
  void* ln_rstd;          // A [B, 1 + LSTM] at t: 1/std of the recurrent part (and of c~)
};

inline bool has_options(const StepOptions& o) { return o.keep_h || o.keep_p != 0 || o.gain_hh; }

inline int64_t num_gates(Cell c) { return c == Cell::LSTM ? 4 : c == Cell::GRU ? 3 : 1; }
// Columns saved per row per step in `gates`: LSTM i,f,g,o; GRU r,z,n,gh_n; RNN nothing (y is h).
inline int64_t num_saved(Cell c) { return c == Cell::LSTM ? 4 : c == Cell::GRU ? 4 : 0; }

// One forward step at time t. Row b is "valid" when lengths == nullptr or t < lengths[b];
// invalid rows keep their state and get y = 0.
struct ForwardStepParams {
  Cell cell;
  DType dtype;
  int64_t B, H, Hout, t;
  const int64_t* lengths;  // [B] or nullptr
  const void* gx;          // S [B, G*H]   gx[t]
  const void* gh;          // A [B, G*H]   h_prev @ w_hh.T (no bias), accumulated and kept in A
  const void* b_hh;        // S [G*H]      (zeros when the layer has no bias)
  void* h;                 // S [B, Hout]  state: read by GRU, overwritten on valid rows (not with proj)
  void* c;                 // A [B, H]     LSTM cell state, overwritten on valid rows
  void* y;                 // S [B, Hout]  y[t] (not with proj: commit writes it)
  void* gates;             // S [B, 4*H]   saved gates at t (LSTM, GRU); valid rows written
  void* cells;             // A [B, H]     saved c[t] (LSTM); valid rows written
  void* proj_in;           // S [B, H]     with proj: o*tanh(c) (0 on invalid rows); else nullptr
  StepOptions opt;         // zoneout / layer norm (per-step kernels only); saved c, y are after zoneout
};

// With proj: after tmp = proj_in @ w_hr.T, valid rows take tmp as h and y; others keep h, y = 0.
struct ProjCommitParams {
  DType dtype;
  int64_t B, Hout, t;
  const int64_t* lengths;
  const void* tmp;  // S [B, Hout]
  void* h;          // S [B, Hout]
  void* y;          // S [B, Hout]  y[t]
};

// One backward step at time t (steps are visited in the reverse of the forward order).
// first(t, b): t is row b's first processed step (reverse ? t == len_b - 1 : t == 0), where its
// previous state is h0/c0 rather than y/c at the previous step.
struct BackwardStepParams {
  Cell cell;
  DType dtype;
  int64_t B, H, Hout, t, T;
  bool reverse;
  const int64_t* lengths;  // [B] or nullptr
  const void* dy;          // S [B, Hout]  dy[t]; unused with proj (dr carries it)
  const void* dr;          // S [B, H]     with proj: (dy[t]+dh) @ w_hr; else nullptr
  void* dh;                // A [B, Hout]  in: grad of h after the step from later steps;
                           //              out: the part of dh_prev that does not go through
                           //              w_hh (GRU dh*z on valid rows, 0 otherwise; invalid
                           //              rows keep it). The caller then adds dG_h @ w_hh.
  void* dc;                // A [B, H]     LSTM: grad of c, updated in place (invalid rows keep it)
  const void* gates;       // S [B, 4*H]   saved at t
  const void* cells;       // A [B, H]     saved c[t]
  const void* cells_prev;  // A [B, H]     saved c[prev(t)]; nullptr when t is first for every row
  const void* c0;          // A [B, H]
  const void* y;           // S [B, Hout]  y[t] (RNN derivative)
  const void* y_prev;      // S [B, Hout]  y[prev(t)] (GRU h_prev); nullptr as for cells_prev
  const void* h0;          // S [B, Hout]
  void* dgx;               // S [B, G*H]   grad of gx[t] (0 on invalid rows)
  void* dgh;               // S [B, G*H]   grad of (h_prev @ w_hh.T + b_hh) at t; == dgx except GRU
  StepOptions opt;         // as the forward's; with zoneout dh's direct part is keep_h * (dy + dh)
  void* dmm;               // S [B, G*H]   layer norm: grad of h_prev @ w_hh.T (what the GEMM takes)
  void* dcout;             // S [B, H]     LSTM layer norm: grad of LN(c~) * gain_c + bias_c
  // Compact saved tensors (a packed batch, csrc/cpu/compact_rows.h): gates, cells, y, cells_prev and
  // y_prev point at the start of [N, ...] tensors holding only the valid (t, b) rows, and row b of
  // step t is at saved_rows[b] (of prev(t) at saved_rows_prev[b]); nullptr: row b of the per-step
  // pointers (the padded [T, B, ...] layout).
  const int64_t* saved_rows;       // [B] at t, -1 where invalid
  const int64_t* saved_rows_prev;  // [B] at prev(t), or nullptr
};

// With proj, before the cell backward: valid rows: dh_all[t] = dy[t] + dh, dh = 0;
// invalid rows: dh_all[t] = 0, dh kept (carried to the previous step).
struct ProjBackwardPrepParams {
  DType dtype;
  int64_t B, Hout, t;
  const int64_t* lengths;
  const void* dy;  // S [B, Hout]
  void* dh;        // A [B, Hout]  the carried grad of h
  void* dh_all;    // S [B, Hout]  dh_all[t], input of dr = dh_all[t] @ w_hr and of d w_hr
};

// The fused CPU recurrence (csrc/cpu/fused_cpu_kernels.h): all T steps in one parallel region,
// each thread keeping its packed slice of w_hh for all steps. No projection (Hout == H).
struct FusedForwardParams {
  ForwardStepParams step;  // cell, dtype, B, H, Hout, lengths, b_hh, c (A [B, H] state, c0 on entry);
                           // the per-step pointers are set by the kernel
  int64_t T;
  bool reverse, save;
  const void* gx;    // S [T, B, G*H], or nullptr: computed inside from x (the input projection)
  const void* x;     // S [T, B, I] when gx is nullptr: gx = x w_ih^T (+ b_ih), chunk by chunk
  const void* w_ih;  // S [G*H, I] contiguous (with x)
  const void* b_ih;  // S [G*H] or nullptr (with x)
  int64_t I;         // input size (with x)
  const void* w_hh;  // S [G*H, H] contiguous
  const void* h0;    // S [B, H]
  void* y;           // S [T, B, H]
  void* h_n;         // S [B, H]
  void* gates;       // S [T, B, 4*H] when save (LSTM, GRU), else unused
  void* cells;       // A [T, B, H] when save (LSTM), else unused
  // The packed-weight cache (csrc/cpu/packed_weight_cache.h): whether to use it, and the weights'
  // version counters (kUnknownVersion = -1 where there is none, as for inference tensors).
  bool cache_weights;
  int64_t w_hh_version, w_ih_version;
};

struct FusedBackwardParams {
  BackwardStepParams step;  // cell, dtype, B, H, Hout, T, reverse, lengths, dh (A, dh_n on entry,
                            // d h0 on exit), dc (A, likewise), c0 (A), h0 (S); per-step pointers
                            // are set by the kernel
  const void* w_hh;   // S [G*H, H] contiguous
  const void* dy;     // S [T, B, H]
  const void* gates;  // S [T, B, 4*H] as saved by the forward
  const void* cells;  // A [T, B, H]
  const void* y;      // S [T, B, H]
  void* dgx;          // S [T, B, G*H]
  void* dgh;          // S [T, B, G*H] (== dgx except GRU); with dgh_n: S [2, B, G*H], two steps' dG_h
  void* dgh_n;        // GRU or nullptr: S [T, B, H], the n gate's column of dG_h at every step (its r and
                      // z columns equal dgx's), so that the op holds one [T, B, H] instead of [T, B, G*H]
  bool need_dh0;      // false: the last step's dh_prev GEMM is skipped and dh is left partial
  // A packed batch's compact layout (csrc/cpu/compact_rows.h), or nullptr (padded): gates, cells, y
  // are [N, ...] with row (t, b) at saved_rows[t * B + b]; dgx (and dgh_n) are written there too,
  // [N, G*H] ([N, H]), and dG lives in a two-step ring for the GEMM (dgh: S [2, B, G*H] for every cell).
  const int64_t* saved_rows;  // [T * B], -1 for rows past their length
};

namespace cpu {
void fused_forward(const FusedForwardParams& q);
void fused_backward(const FusedBackwardParams& q);
void forward_step(const ForwardStepParams& p);
void proj_commit(const ProjCommitParams& p);
void backward_step(const BackwardStepParams& p);
void proj_backward_prep(const ProjBackwardPrepParams& p);
}  // namespace cpu

namespace cuda {
// `stream` is a cudaStream_t (the caller's current stream); launches are asynchronous.
void forward_step(const ForwardStepParams& p, void* stream);
void proj_commit(const ProjCommitParams& p, void* stream);
void backward_step(const BackwardStepParams& p, void* stream);
void proj_backward_prep(const ProjBackwardPrepParams& p, void* stream);
}  // namespace cuda

}  // namespace fused_rnn
