// torch's GEMMs (at::mm, addmm) on bf16/fp16 CPU tensors, or the same product through fp32 where
// torch's own is slow. torch hands a 16-bit CPU GEMM to oneDNN only where the CPU has the
// instructions for it — bf16: AVX-512 BW/VL/DQ (oneDNN's avx512_core); fp16: AVX512_FP16 — and
// otherwise runs a scalar reference loop: ~1 GFLOP/s bf16, ~0.5 fp16 against ~36 for the same
// product on fp32 copies (Zen 3, AVX2, 2 threads, [1600, 512] x [512, 1024]); a bf16 LSTM's training
// step (T=100 B=64 H=256) took 4.0 s there, 90 % of it in those GEMMs. Where that is so, these
// helpers convert the operands to fp32, multiply, and round the product once: what torch's 16-bit
// GEMM computes (fp32 sums, one rounding at the end). Used by every CPU path's GEMMs outside the
// fused loop (whose own microkernel converts as it goes): recurrence.cpp, cell_step.cpp,
// compact_rows.h, and fused_rnn/ops/cpp/ops.py through _C.cpu_gemm_via_fp32.
// FUSED_RNN_CPU_GEMM16=fp32|torch forces one way (tests run both on any CPU).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

namespace fused_rnn {
namespace cpu {

// Whether torch runs 16-bit GEMMs of this dtype on oneDNN on this CPU (see above). Asked once.
inline bool torch_gemm16_native(at::ScalarType dtype) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  }();
  static const bool fp16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512fp16") != 0;
  }();
  return dtype == at::kBFloat16 ? bf16 : fp16;
#else
  return false;  // elsewhere: fp32 copies, never a scalar loop
#endif
}

// Whether a GEMM on CPU tensors of this dtype goes through fp32 copies.
inline bool gemm_via_fp32(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const char* mode = std::getenv("FUSED_RNN_CPU_GEMM16");
  if (mode != nullptr && std::string(mode) == "fp32") return true;
  if (mode != nullptr && std::string(mode) == "torch") return false;
  return !torch_gemm16_native(dtype);
}
inline bool gemm_via_fp32(const at::Tensor& t) { return t.is_cpu() && gemm_via_fp32(t.scalar_type()); }

inline at::Tensor fp32(const at::Tensor& t) { return t.to(at::kFloat); }

// a @ b, in a's dtype.
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  return gemm_via_fp32(a) ? at::mm(fp32(a), fp32(b)).to(a.scalar_type()) : at::mm(a, b);
}
// out = a @ b
inline void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (gemm_via_fp32(out))
    out.copy_(at::mm(fp32(a), fp32(b)));
  else
    at::mm_out(out, a, b);
}
// out = bias + a @ b (bias broadcast over the rows, as nn.Linear's)
inline void addmm_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (gemm_via_fp32(out))
    out.copy_(at::addmm(fp32(bias), fp32(a), fp32(b)));
  else
    at::addmm_out(out, bias, a, b);
}
// out += a @ b
inline void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (gemm_via_fp32(out))
    out.copy_(at::addmm(fp32(out), fp32(a), fp32(b)));
  else
    out.addmm_(a, b);
}

}  // namespace cpu
}  // namespace fused_rnn
