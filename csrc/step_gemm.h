// The GEMMs of recurrence.cpp's per-step loop: a weight operand (w_hh, or proj_size's w_hr) used
// once per step, with a small per-step operand (one step's [B, K] rows).
#pragma once

#include <ATen/ATen.h>

namespace fused_rnn {

// `out (A) = a (S) @ w (S)` or `acc (A) += a @ w` with the product in the accumulation dtype A, so
// that gh and the carried dh never round to fp16/bf16 between steps; and `out (S) = a @ w` rounded
// once (proj_size's h_r = proj_in @ w_hr.T, dr = dh @ w_hr). fp16/bf16 on CUDA: cuBLAS's
// fp32-output GEMM (aten::mm.dtype_out, torch >= 2.8); on the CPU, where that overload has no
// kernel, an fp32 copy of w made once per call — not once per step, which at T=100 converted the
// whole weight 100 times — and `a` converted per step.
struct AccGemm {
  at::Tensor w;              // [K, N] operand
  bool mixed_cuda = false;   // 16-bit operands, fp32 result through mm.dtype_out
  at::Tensor scratch;        // [M, N] A: the product before it is added (mixed_cuda's add_mm, made on first use)

  explicit AccGemm(const at::Tensor& w_in) {
    const bool half = w_in.scalar_type() == at::kHalf || w_in.scalar_type() == at::kBFloat16;
    mixed_cuda = half && w_in.is_cuda();
    w = half && !mixed_cuda ? w_in.to(at::kFloat) : w_in;
  }
  at::Tensor operand(const at::Tensor& a) const {
    return a.scalar_type() == w.scalar_type() ? a : a.to(w.scalar_type());
  }
  // out (A) = a @ w
  void mm(at::Tensor& out, const at::Tensor& a) const {
    if (mixed_cuda)
      at::mm_out(out, a, w, at::kFloat);
    else
      at::mm_out(out, operand(a), w);
  }
  // acc (A) += a @ w
  void add_mm(at::Tensor& acc, const at::Tensor& a) {
    if (mixed_cuda) {
      if (!scratch.defined()) scratch = at::empty({a.size(0), w.size(1)}, w.options().dtype(at::kFloat));
      at::mm_out(scratch, a, w, at::kFloat);
      acc.add_(scratch);
    } else {
      acc.addmm_(operand(a), w);
    }
  }
  // out (S, a's dtype) = a @ w, summed in A and rounded once: fp32/fp64 anywhere and 16-bit on
  // CUDA multiply as they are; 16-bit on the CPU multiplies fp32 copies (see cpu/half_gemm.h).
  void mm_rounded(at::Tensor& out, const at::Tensor& a) const {
    if (out.scalar_type() == w.scalar_type())
      at::mm_out(out, a, w);
    else
      out.copy_(at::mm(operand(a), w));
  }
};

}  // namespace fused_rnn
