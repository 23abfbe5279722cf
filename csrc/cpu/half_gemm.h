// torch's GEMMs (at::mm, addmm) on bf16/fp16 CPU tensors, or the same product through fp32 where
// torch's own is slow. torch hands a 16-bit CPU GEMM to oneDNN only where the CPU has the
// instructions for it — bf16: AVX-512 BW/VL/DQ (oneDNN's avx512_core); fp16: AVX512_FP16 — and
// otherwise runs a scalar reference loop: ~1 GFLOP/s bf16, ~0.5 fp16 against ~36 for the same
// product on fp32 copies (Zen 3, AVX2, 2 threads, [1600, 512] x [512, 1024]); a bf16 LSTM's training
// step (T=100 B=64 H=256) took 4.0 s there, 90 % of it in those GEMMs. Where that is so, these
// helpers convert the operands to fp32, multiply, and round the product once: what torch's 16-bit
// GEMM computes (fp32 sums, one rounding at the end) — a slice of the operands at a time
// (gemm_fp32_slices), so that the copies stay small. Used by every CPU path's GEMMs outside the
// fused loop (whose own microkernel converts as it goes): recurrence.cpp, cell_step.cpp,
// compact_rows.h, and fused_rnn/ops/cpp/ops.py through _C.cpu_gemm_via_fp32.
// FUSED_RNN_CPU_GEMM16=fp32|torch forces one way (tests run both on any CPU).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
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

// Elements of an operand converted to fp32 at a time (1 MB): whole, the fp32 copies of a bf16
// LSTM's d gx [T*B, 4H] took its training call's peak memory to 1.9x torch.nn's (T=100 B=64 H=256).
constexpr int64_t kFp32SliceElems = int64_t(1) << 18;

// out = a @ b (a [M, K], b [K, N]), plus out's own values (`accumulate`) or the row `bias`, on fp32
// copies of slices of the operands, rounded into out once. A long contraction (K > M: the weight
// gradients, K = T*B) sums the K slices in an fp32 [M, N]; otherwise b is converted once and a's
// rows a slice at a time (d x, the input projection).
inline void gemm_fp32_slices(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias,
                             bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (K > M) {
    at::Tensor acc = accumulate         ? fp32(out)
                     : bias != nullptr  ? fp32(*bias).expand({M, N}).clone()
                                        : at::zeros({M, N}, out.options().dtype(at::kFloat));
    const int64_t kc = std::max<int64_t>(1, kFp32SliceElems / std::max<int64_t>(M, 1));
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t n = std::min(kc, K - k0);
      acc.addmm_(fp32(a.narrow(1, k0, n)), fp32(b.narrow(0, k0, n)));
    }
    out.copy_(acc);
    return;
  }
  const at::Tensor b32 = fp32(b);
  const at::Tensor bias32 = bias != nullptr ? fp32(*bias) : at::Tensor();
  const int64_t mc = std::max<int64_t>(1, kFp32SliceElems / std::max<int64_t>(K, 1));
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t n = std::min(mc, M - m0);
    at::Tensor o = out.narrow(0, m0, n);
    const at::Tensor a32 = fp32(a.narrow(0, m0, n));
    o.copy_(accumulate ? at::addmm(fp32(o), a32, b32) : bias != nullptr ? at::addmm(bias32, a32, b32) : at::mm(a32, b32));
  }
}

// a @ b, in a's dtype.
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  if (!gemm_via_fp32(a)) return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_fp32_slices(out, a, b, nullptr, false);
  return out;
}
// out = a @ b
inline void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (gemm_via_fp32(out))
    gemm_fp32_slices(out, a, b, nullptr, false);
  else
    at::mm_out(out, a, b);
}
// out = bias + a @ b (bias broadcast over the rows, as nn.Linear's)
inline void addmm_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (gemm_via_fp32(out))
    gemm_fp32_slices(out, a, b, &bias, false);
  else
    at::addmm_out(out, bias, a, b);
}
// out += a @ b
inline void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (gemm_via_fp32(out))
    gemm_fp32_slices(out, a, b, nullptr, true);
  else
    out.addmm_(a, b);
}

}  // namespace cpu
}  // namespace fused_rnn
