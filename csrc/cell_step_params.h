// Plain parameter structs between the cell-step launcher (csrc/cell_step.cpp) and its CPU kernels
// (csrc/cpu/cell_step_cpu*.cpp): one step of LSTMCell / GRUCell / RNNCell with the input
// projection fused in. No torch types here.
//
// Names as in recurrence_params.h: B batch, I input size, H hidden, G gates, GH = G*H; "S" the
// storage dtype, "A" the accumulation dtype (double for Float64, float otherwise). Every [B, X]
// block is row-major and contiguous.
#pragma once

#include <cstdint>

#include "recurrence_params.h"

namespace fused_rnn {

// Forward of one step. The pre-activations are x @ w_ih.T (+ b_ih) and h @ w_hh.T (+ b_hh):
// with `dots`, the kernel computes them itself (each weight row read once for the whole batch,
// the cell math in the same pass over a slice of hidden units); otherwise the caller has put the
// GEMM results in pre_x / pre_h and the kernel only adds the biases and applies the cell math.
struct CellForwardParams {
  Cell cell;
  DType dtype;
  int64_t B, I, H;
  bool dots;
  const void* x;     // S [B, I]
  const void* h;     // S [B, H]    h_prev
  const void* c;     // S [B, H]    c_prev (LSTM)
  const void* w_ih;  // S [GH, I]   (read only when dots)
  const void* w_hh;  // S [GH, H]
  const void* b_ih;  // S [GH] or nullptr
  const void* b_hh;  // S [GH] or nullptr
  void* pre_x;       // A [B, GH]   x part; LSTM/RNN: the whole sum x@w_ih.T + h@w_hh.T
  void* pre_h;       // A [B, GH]   GRU: h @ w_hh.T (kept apart for n = tanh(x_n + r*h_n)); else unused
  void* h_out;       // S [B, H]
  void* c_out;       // S [B, H]    LSTM
  void* gates;       // S [B, 4H]   saved for the backward (LSTM i,f,g,o; GRU r,z,n,h_n) or nullptr
};

// Backward of one step. cell_backward, the pointwise part: the gradients of the pre-activations.
// Then the products dx = dg_x @ w_ih, dh_prev = dh_direct + dg_h @ w_hh, dw_ih = dg_xᵀ x,
// dw_hh = dg_hᵀ h_prev, db_ih = Σ_b dg_x, db_hh = Σ_b dg_h: at small batch (cell_products_pay)
// cell_backward_products, which reads each weight matrix and writes each weight gradient once for
// all four; otherwise the caller's GEMMs.
struct CellBackwardParams {
  Cell cell;
  DType dtype;
  int64_t B, H;
  int64_t I;           // cell_backward_products only
  const void* dh;      // S [B, H]    grad of h_out
  const void* dc;      // S [B, H]    grad of c_out (LSTM)
  const void* gates;   // S [B, 4H]   saved by the forward (LSTM, GRU)
  const void* c_prev;  // S [B, H]    LSTM
  const void* c_new;   // S [B, H]    LSTM: c_out
  const void* h_prev;  // S [B, H]    GRU; every cell in cell_backward_products
  const void* h_new;   // S [B, H]    RNN: h_out
  void* dg_x;          // S [B, GH]   grad of x @ w_ih.T + b_ih
  void* dg_h;          // S [B, GH]   GRU: grad of h @ w_hh.T + b_hh (== dg_x for LSTM/RNN: unused)
  void* dh_direct;     // S [B, H]    GRU: dh*z, the part of dh_prev that bypasses w_hh
  void* dc_prev;       // S [B, H]    LSTM
  // cell_backward_products only (float32 / float64; every array contiguous):
  const void* x;       // S [B, I]
  const void* w_ih;    // S [GH, I]
  const void* w_hh;    // S [GH, H]
  void* dx;            // S [B, I]
  void* dh_prev;       // S [B, H]    GRU: holds dh_direct on entry (the product adds to it)
  void* dw_ih;         // S [GH, I]
  void* dw_hh;         // S [GH, H]
  void* db_ih;         // S [GH]
  void* db_hh;         // S [GH]
};

namespace cpu {
// Whether cell_forward computes the pre-activations itself (dots) for this shape: at small batch
// it reads each weight row once for the whole batch; at large batch the GEMM library is faster.
bool cell_dots_pay(DType dtype, int64_t B, int64_t I, int64_t H, int64_t G);
void cell_forward(const CellForwardParams& p);
void cell_backward(const CellBackwardParams& p);
// Whether cell_backward_products runs this shape's backward products (else the GEMM library).
bool cell_products_pay(DType dtype, int64_t B, int64_t I, int64_t H, int64_t G);
void cell_backward_products(const CellBackwardParams& p);
}  // namespace cpu

}  // namespace fused_rnn
