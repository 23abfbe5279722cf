// CPU pointwise kernels of one recurrence step: the rows of a step split over threads with
// at::parallel_for, each row one vectorisable loop over the hidden units (recurrence_step.h).
// Included once per instruction set by pointwise_cpu.cpp (baseline + runtime dispatch),
// pointwise_cpu_avx2.cpp and pointwise_cpu_avx512.cpp, each under its own FR_ISA_NS.
// The includer has already included <ATen/Parallel.h> and the c10 headers below.
#pragma once

#include <algorithm>
#include <type_traits>

#include "../recurrence_step.h"

namespace fused_rnn {

template <> struct Conv<c10::BFloat16> {
  static float load(c10::BFloat16 x) { return static_cast<float>(x); }
  static c10::BFloat16 store(float x) { return c10::BFloat16(x); }
};
template <> struct Conv<c10::Half> {
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float x) { return c10::Half(x); }
};

namespace cpu {
inline namespace FR_ISA_NS {
namespace {

// Rows per task: enough elements per task that thread start-up is paid back.
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

template <typename F> void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::BFloat16: f(c10::BFloat16{}); break;
    case DType::Float16: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "fused_rnn: unsupported dtype on the CPU");
  }
}

// The rows of one step over threads: row(b) each, or with zoneout / layer norm (LSTM, GRU)
// options_row(b, k), k the OptionsFixed of p.opt (chosen once per step; the row's phases in one call).
template <Cell C, typename P, typename Row, typename OptionsRow>
void step_rows(const P& p, const Row& row, const OptionsRow& options_row) {
  const auto rows = [&](const auto& f) {
    at::parallel_for(0, p.B, grain_rows(gates_of<C>() * p.H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f(b);
    });
  };
  if constexpr (C == Cell::LSTM || C == Cell::GRU)
    if (has_options(p.opt)) {
      dispatch_options(p.opt, [&](auto k) { rows([&](int64_t b) { options_row(b, k); }); });
      return;
    }
  rows(row);
}

}  // namespace

void forward_step(const ForwardStepParams& p) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(p.cell, [&](auto c) {
      constexpr Cell C = decltype(c)::value;
      step_rows<C>(p, [&](int64_t b) { forward_row<C, S>(p, b, 0, p.H); },
                   [&](int64_t b, auto k) { forward_row_options<C, S>(p, b, Units{0, p.H, 1}, WholeRow{}, k); });
    });
  });
}

void backward_step(const BackwardStepParams& p) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(p.cell, [&](auto c) {
      constexpr Cell C = decltype(c)::value;
      step_rows<C>(p, [&](int64_t b) { backward_row<C, S>(p, b, 0, p.H); },
                   [&](int64_t b, auto k) { backward_row_options<C, S>(p, b, Units{0, p.H, 1}, WholeRow{}, k); });
    });
  });
}

void proj_commit(const ProjCommitParams& p) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    at::parallel_for(0, p.B, grain_rows(p.Hout), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) proj_commit_row<S>(p, b, 0, p.Hout);
    });
  });
}

void proj_backward_prep(const ProjBackwardPrepParams& p) {
  dispatch_dtype(p.dtype, [&](auto s) {
    using S = decltype(s);
    at::parallel_for(0, p.B, grain_rows(p.Hout), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) proj_backward_prep_row<S>(p, b, 0, p.Hout);
    });
  });
}

}  // inline namespace FR_ISA_NS
}  // namespace cpu
}  // namespace fused_rnn
