// The ops' string and dtype arguments as the kernels' enums (recurrence_params.h), shared by the
// tensor-facing launchers (csrc/recurrence.cpp, csrc/cell_step.cpp).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "recurrence_params.h"

namespace fused_rnn {

inline Cell parse_cell(c10::string_view name) {
  if (name == "lstm") return Cell::LSTM;
  if (name == "gru") return Cell::GRU;
  if (name == "rnn_tanh") return Cell::RNN_TANH;
  if (name == "rnn_relu") return Cell::RNN_RELU;
  TORCH_CHECK(false, "fused_rnn: unknown cell '", std::string(name), "' (lstm, gru, rnn_tanh, rnn_relu)");
}

inline DType to_dtype(c10::ScalarType s) {
  switch (s) {
    case c10::kFloat: return DType::Float32;
    case c10::kDouble: return DType::Float64;
    case c10::kHalf: return DType::Float16;
    case c10::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "fused_rnn: unsupported dtype ", s, " (float32, float64, float16, bfloat16)");
  }
}

// fp16/bf16 keep the cell state and accumulate in fp32.
inline c10::ScalarType acc_type(c10::ScalarType s) { return s == c10::kDouble ? c10::kDouble : c10::kFloat; }

}  // namespace fused_rnn
