// Which CPU path runs a layer, from its shape and the FUSED_RNN_CPU_* settings: the fused recurrence or
// the per-step kernels, the input projection inside the fused loop or one GEMM first, the per-step
// GEMM's w_hh operand, and the packed-weight cache's switch and version key. Used by csrc/recurrence.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "cpu_isa.h"
#include "packed_weight_cache.h"

namespace fused_rnn {
namespace cpu {

// Whether the fused CPU recurrence (csrc/cpu/fused_cpu_kernels.h) runs this layer: CPU tensors
// without a projection, zoneout or layer norm (those run the per-step kernels), over at least
// min_steps steps. Below that the per-step kernels are faster: MKL's GEMMs read the weights as they
// are, where the fused forward compares them with the packed-weight cache's copy (or packs them) and
// the fused backward packs them on every call. Per-step time / fused time, op alone, T=1 -> 4,
// 2 threads, H 128-512, B 1-64: forward 0.5-1.2 -> 0.7-1.6, backward 0.3-0.9 -> 0.5-1.3; the
// backward reaches ~1 only at T=16-32 (benchmarks/NOTES.md). FUSED_RNN_CPU_KERNEL=per-step|fused
// forces one (tests compare the two at any T; either backward follows either forward).
constexpr int64_t kFusedForwardMinSteps = 4;
constexpr int64_t kFusedBackwardMinSteps = 16;
inline bool use_cpu_fused(const at::Tensor& like, bool proj, bool options, int64_t T, int64_t min_steps) {
  if (like.is_cuda() || proj || options) return false;
  const char* kernel = std::getenv("FUSED_RNN_CPU_KERNEL");
  if (kernel != nullptr && std::string(kernel) == "per-step") return false;
  if (kernel != nullptr && std::string(kernel) == "fused") return true;
  return T >= min_steps;
}

// The per-step forward's w_hh operand for MKL: a row-major copy of w_hh.T, on which MKL runs the small
// per-step GEMM ~20 % faster, where enough steps repay the copy (at H=256 B=1 it costs as much as ~10
// of those GEMMs, so a few dozen steps); else the transposed view.
inline at::Tensor per_step_weight(const at::Tensor& w_hh, int64_t T) {
  return w_hh.is_cpu() && T < 32 ? w_hh.t() : w_hh.t().contiguous();
}

// Whether recurrence_forward_projected's fused path projects inside the loop (projection_chunk in
// csrc/cpu/fused_cpu_kernels.h) or takes gx from one GEMM first (`loop_pays`: fp32_projects_inside,
// or a 16-bit dtype torch multiplies in a scalar loop, half_gemm.h). Elsewhere MKL's one GEMM into
// gx is faster than the loop's microkernel, at any size: gx comes from the recycling allocator
// (empty_large), so a large one is not page-faulted in afresh on every call as it was when the loop
// took every gx of >= 32 MB (first touch then cost ~15 ms of a 60 ms projection at T=100 B=64
// H=512). Since the allocator, outside / inside (LSTM fp32 T=100 no-grad, Intel Xeon AVX-512, 2
// threads, interleaved medians, ms; benchmarks/NOTES.md 2026-12-03 21:35): B=64 H=512 76.0 / 81.8,
// B=32 H=1024 158 / 184, B=128 H=256 40.9 / 40.4; GRU B=64 H=512 58.7 / 61.8; 1 thread B=64 H=512
// 152 / 164; training B=64 H=512 247 / 249. bf16 on AMX tiles projects outside too (oneDNN's bf16
// GEMM into gx beats the loop's tile GEMM and its rounding pass: LSTM bf16 T=100 2 threads, module
// no-grad, inside / outside: B=32 H=256 9.9 / 7.3 ms, B=64 H=256 12.7 / 9.0, B=64 H=1024 149 / 107),
// and so does bf16 on AVX512_BF16 pairs (Zen 4: B=64 H=256 31.3 / 23.8 ms).
// FUSED_RNN_CPU_PROJECTION=inside|outside overrides it (tests take the inside path at small sizes).
inline bool project_inside(bool loop_pays) {
  const char* mode = std::getenv("FUSED_RNN_CPU_PROJECTION");
  if (mode != nullptr && std::string(mode) == "inside") return true;
  if (mode != nullptr && std::string(mode) == "outside") return false;
  return loop_pays;
}

// Whether `like` is fp32 on a CPU where the loop's projection beats MKL's (project_inside).
// AMD, where MKL's fp32 GEMM runs its slower non-Intel path: with AVX-512 always (Zen 4: MKL ~70
// GFLOP/s a core against the loop's microkernel's ~90, 1 thread, B=64 H=256-512; the module's no-grad
// LSTM forward faster inside at each of 9 shapes, H 128-512, B 8-64, 2 threads, interleaved medians,
// 5-10 %, e.g. B=64 H=128 20.4 -> 18.5 ms, B=32 H=512 85.7 -> 77.7); with AVX2 only (Zen 3: 512 KB L2, where the loop's w_ih panel competes
// with w_hh's for it) while w_ih and w_hh together take at most 4 MB. Module fp32 T=100, 2 threads,
// interleaved medians, outside -> inside: LSTM no-grad H=128-256 (1-2 MB) 1.10-1.21x faster at B 8-64
// (B=64 H=256 72.6 -> 63.4 ms), H=512 (8 MB) 0.90-0.95x (B=32 132 -> 144 ms); GRU H=256 (1.5 MB)
// 1.05-1.16x, H=512 (6 MB) 1.01x; training 0.99-1.08x.
// Other CPUs with AVX-512 (an Intel Xeon, 2 MB L2, where MKL runs its AVX-512 code) while the weights
// take at most 1 MB: there the loop reads x and its w_ih panel while w_hh's stays in L2, and MKL's
// GEMM of a few hundred rows and K=I does not amortise its packing. Module fp32 T=100, 2 threads,
// interleaved medians of 9, outside / inside ms (benchmarks/NOTES.md 2026-12-03 19:20): LSTM no-grad
// H=128 (0.5 MB) B=8 1.20 / 1.13, B=32 4.97 / 4.83, B=64 9.05 / 7.60; training B=64 30.4 / 28.7;
// GRU no-grad B=32 3.60 / 3.08, B=64 7.26 / 6.17; H=256 (1.5-2 MB) within ±3 % either way; H=512
// (6-8 MB) inside 1-8 % slower (LSTM no-grad B=32 55.7 / 59.1).
constexpr int64_t kAvx2InsideWeightBytes = int64_t(4) << 20;
constexpr int64_t kAvx512InsideWeightBytes = int64_t(1) << 20;
inline bool fp32_projects_inside(const at::Tensor& like, int64_t weight_bytes) {
  if (!like.is_cpu() || like.scalar_type() != at::kFloat) return false;
  if (cpu_is_amd())
    return best_isa() >= Isa::Avx512 || (best_isa() == Isa::Avx2 && weight_bytes <= kAvx2InsideWeightBytes);
  return best_isa() >= Isa::Avx512 && weight_bytes <= kAvx512InsideWeightBytes;
}

// Whether the fused CPU kernels run this dtype on AMX tiles (fused_gemm.h amx_gemm_block): bf16 on a
// CPU with AMX (cpu_isa.h).
inline bool on_amx_tiles(const at::Tensor& like) {
  return like.is_cpu() && like.scalar_type() == at::kBFloat16 && best_isa() == Isa::AmxBf16;
}

// Whether the fused CPU forward keeps its packed weight panels between calls
// (csrc/cpu/packed_weight_cache.h); FUSED_RNN_CPU_WEIGHT_CACHE=0 turns it off.
inline bool cpu_weight_cache_on() {
  const char* flag = std::getenv("FUSED_RNN_CPU_WEIGHT_CACHE");
  return flag == nullptr || std::string(flag) != "0";
}

// A weight's version counter for the cache's fast reject; an inference tensor has none (reading it throws).
inline int64_t version_of(const at::Tensor& w) {
  return w.is_inference() ? kUnknownVersion : static_cast<int64_t>(w._version());
}

}  // namespace cpu
}  // namespace fused_rnn
