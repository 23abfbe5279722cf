// A packed batch's compact layout: of the [T, B, ...] tensors the forward saves, only the rows of
// valid steps (t < lengths[b]), in t-major order (row t*B + b before t*B + b' > it, and before every
// row of t + 1). fused_rnn/ops/cpp/ops.py keeps the saved y, gates and cells so between forward and
// backward (_compact); the fused CPU backward reads them in place and writes d gx the same way,
// so that a training call never holds the padded copies (its peak memory, benchmarks/NOTES.md).
// Used by csrc/recurrence.cpp; the kernels take `rows` (csrc/recurrence_params.h, saved_rows).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "half_gemm.h"

namespace fused_rnn {
namespace cpu {

struct CompactRows {
  at::Tensor rows;   // int64 [T * B]: the compact row of (t, b), -1 where t >= lengths[b]
  at::Tensor valid;  // int64 [N]: t * B + b of each compact row, in order
  int64_t N = 0;
};

// lengths: int64 [B] on the CPU, each in [1, T].
inline CompactRows compact_rows(const at::Tensor& lengths_in, int64_t T, int64_t B) {
  TORCH_CHECK(lengths_in.scalar_type() == at::kLong && lengths_in.dim() == 1 && lengths_in.size(0) == B,
              "fused_rnn: lengths must be int64 [B]");
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= T, "fused_rnn: lengths must be in [1, ", T, "], got ", len[b]);
  CompactRows c;
  c.rows = at::empty({T * B}, lengths.options());
  int64_t* rows = c.rows.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < B; ++b) rows[t * B + b] = t < len[b] ? c.N++ : -1;
  c.valid = at::empty({c.N}, lengths.options());
  int64_t* valid = c.valid.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * B; ++i)
    if (rows[i] >= 0) valid[rows[i]] = i;
  return c;
}

// [N, X] -> [T, B, X], zeros in the rows past their length (what the forward writes there, or a
// value the backward never reads): for the paths that read the padded layout.
inline at::Tensor restore_rows(const at::Tensor& compact, const CompactRows& c, int64_t T, int64_t B) {
  if (!compact.defined() || compact.dim() != 2) return compact;  // absent ([0]): nothing saved
  return compact.new_zeros({T * B, compact.size(1)}).index_copy_(0, c.valid, compact).view({T, B, compact.size(1)});
}

// An LSTM's y = o * tanh(c) ([N, H] in `dtype`) from its saved gates (i, f, g, o) and cells: what a
// packed batch's LSTM without projection saves instead of y (ops.py), y being needed by the backward
// only as h_prev in d w_hh. Between forward and backward the op then holds 5 of [N, H], not 6.
inline at::Tensor lstm_outputs(const at::Tensor& gates, const at::Tensor& cells, int64_t H, at::ScalarType dtype) {
  return (gates.narrow(-1, 3 * H, H).to(cells.scalar_type()) * cells.tanh()).to(dtype);
}

// [N, Hout]: h_{t-1} of each compact row, the operand of d w_hh = dG_h^T h_prev. That is y at the
// previous step, or h0 at a row's first step (t = 0, or t = lengths[b] - 1 when reverse).
inline at::Tensor previous_h_rows(const at::Tensor& y, const at::Tensor& h0, const CompactRows& c, int64_t T,
                                  int64_t B, bool reverse) {
  const at::Tensor y_c = y.contiguous(), h0_c = h0.contiguous();
  at::Tensor out = at::empty({c.N, y.size(1)}, y.options());
  const int64_t bytes = y.size(1) * y.element_size();
  const char* ys = static_cast<const char*>(y_c.data_ptr());
  const char* hs = static_cast<const char*>(h0_c.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t* rows = c.rows.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t prev = reverse ? t + 1 : t - 1;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = rows[t * B + b];
      if (r < 0) continue;
      const int64_t rp = prev >= 0 && prev < T ? rows[prev * B + b] : -1;  // -1: b's first step
      std::memcpy(o + r * bytes, rp >= 0 ? ys + rp * bytes : hs + b * bytes, bytes);
    }
  }
  return out;
}

// d w_hh = dG_h^T h_prev over the N valid rows, one GEMM per block of dG_h's columns (the GRU's r, z
// columns from d gx and its n column from dgh_n; the others' all from d gx): d w_hh's rows in that
// order. Returns d b_hh, the columns' sums.
inline at::Tensor w_hh_grads(std::initializer_list<at::Tensor> dg_blocks, const at::Tensor& h_prev,
                             at::Tensor& d_w_hh) {
  std::vector<at::Tensor> d_b;
  int64_t row = 0;
  for (const at::Tensor& dg : dg_blocks) {
    at::Tensor out = d_w_hh.narrow(0, row, dg.size(1));
    cpu::mm_out(out, dg.t(), h_prev);
    d_b.push_back(dg.sum(0));
    row += dg.size(1);
  }
  return d_b.size() == 1 ? d_b[0] : at::cat(d_b);
}

}  // namespace cpu
}  // namespace fused_rnn
