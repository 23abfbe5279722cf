// Where the cell step adds its biases: the GEMM path (not `dots`) with both biases leaves them
// to the cell-math pass (csrc/cpu/cell_step_cpu_kernels.h), which reads each once, instead of
// broadcasting one into the GEMM's output and adding the other in a pass of its own
// (csrc/cell_step.cpp). One decision, read by both sides.
#pragma once

#include "../cell_step_params.h"

namespace fused_rnn {
namespace cpu {

inline bool bias_in_epilogue(const CellForwardParams& p) {
  return !p.dots && p.b_ih != nullptr && p.b_hh != nullptr;
}

}  // namespace cpu
}  // namespace fused_rnn
