// Cell-step CPU kernels, baseline instruction set, and the runtime choice (cpu_isa.h) between the
// baseline, AVX2+FMA and AVX-512 builds of cell_step_cpu_kernels.h.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cpu_isa.h"

#define FR_ISA_NS isa_default
#include "cell_step_cpu_kernels.h"

namespace fused_rnn {
namespace cpu {
namespace isa_avx2 {
void cell_forward(const CellForwardParams& p);
void cell_backward(const CellBackwardParams& p);
void cell_backward_products(const CellBackwardParams& p);
}  // namespace isa_avx2
namespace isa_avx512 {
void cell_forward(const CellForwardParams& p);
void cell_backward(const CellBackwardParams& p);
void cell_backward_products(const CellBackwardParams& p);
}  // namespace isa_avx512

FR_DEFINE_ISA_DISPATCH(cell_forward, CellForwardParams)
FR_DEFINE_ISA_DISPATCH(cell_backward, CellBackwardParams)
FR_DEFINE_ISA_DISPATCH(cell_backward_products, CellBackwardParams)

// Measured on AMD EPYC Zen 4 (benchmarks/bench_cells.py, LSTMCell, H 128-512): the dot kernels beat
// MKL's GEMMs up to B=8 (at B=8, H=512 by ~1.8x on one thread: MKL packs the weights for every
// call); from B=32 MKL's packed GEMM runs near the FMA peak, where the dot kernels' horizontal sums
// and unpacked loads cost more.
// On an Intel Xeon with AVX-512 (2 MB L2 a core) in fp32 MKL's packing of the weights on every call
// costs more for longer, and its threads split these small GEMMs less well than the dots' split of
// the units: the dot kernels win up to B=16 on one thread and B=32 on two (the GRU's to 3/4 of that),
// and twice that where the weights are large (G*H*(I+H) >= 1M values, 4 MB: LSTM/GRU at H=512).
// Cell step, I = H, interleaved medians, MKL / dots µs, no-grad (benchmarks/NOTES.md 2026-12-03 21:15):
//   2 threads  LSTMCell H=128  B=16 38 / 29, B=32 52 / 47, B=48 66 / 70, B=64 79 / 90
//                       H=256  B=16 105 / 69, B=32 150 / 134, B=48 188 / 188, B=64 223 / 251
//                       H=512  B=16 583 / 319, B=32 746 / 525, B=48 911 / 717, B=64 975 / 912
//              GRUCell  H=128  B=24 37 / 34, B=32 42 / 46, B=64 62 / 82;  H=256  B=32 114 / 113
//                       H=512  B=32 548 / 418, B=64 757 / 748
//   1 thread   LSTMCell H=128  B=16 44 / 41, B=32 65 / 74;  H=512  B=32 1135 / 1000, B=64 1762 / 1790
//              GRUCell  H=128  B=16 37 / 38, B=32 52 / 69;  H=512  B=32 866 / 808, B=64 1331 / 1432
// With grad the same direction, smaller (the backward is the same). Not measured beyond 2 threads:
// more threads keep the two-thread limits.
constexpr int64_t kDotsMaxBatch = 8;
constexpr int64_t kLargeWeights = int64_t(1) << 20;
bool cell_dots_pay(DType dtype, int64_t B, int64_t I, int64_t H, int64_t G) {
  if (dtype == DType::Float16) return false;
  if (B <= kDotsMaxBatch) return true;
  if (dtype != DType::Float32 || cpu_is_amd() || best_isa() < Isa::Avx512) return false;
  const bool large = G * H * (I + H) >= kLargeWeights;
  int64_t limit = (at::get_num_threads() >= 2 ? 32 : 16) * (large ? 2 : 1);
  if (G == 3 && !large) limit = limit * 3 / 4;  // the GRU's dots sum x's and h's parts apart: twice the horizontal sums
  return B <= limit;
}

// Measured on an Intel Xeon with AVX-512 (LSTMCell step with grad, 1 thread, H = I, median µs,
// GEMMs / one pass): B=1 H=128 172 / 129, B=8 H=128 266 / 202, B=8 H=256 637 / 523; at B=16 no
// gain (H=512 2.5 / 2.9 ms): from there the GEMM library's blocking pays for the second pass.
// In fp32 on two threads MKL splits these small GEMMs less well, and the one pass keeps winning
// while the weights are small: to B=64 for G*H*(I+H) <= 128K values (H=128), to B=16 for <= 512K
// (H=256). Step with grad, I = H, interleaved medians, GEMMs / one pass µs (benchmarks/NOTES.md
// 2026-12-03 21:45):
//   2 threads  LSTMCell H=128  B=16 135 / 124, B=32 194 / 170, B=48 254 / 240, B=64 303 / 296
//                       H=256  B=16 374 / 348, B=32 544 / 577;  H=512  B=16 999 / 1102
//              GRUCell  H=128  B=16 117 / 102, B=64 271 / 244;  H=256  B=16 314 / 285, B=64 653 / 730
//              RNNCell  H=128  B=16 76 / 64, B=64 123 / 114;    H=256  B=32 165 / 160, B=64 258 / 268
//   1 thread   LSTMCell H=128  B=16 174 / 165, B=32 259 / 268;  H=256  B=16 558 / 614
//              RNNCell  H=128  B=16 76 / 70, B=32 98 / 96, B=64 134 / 141
constexpr int64_t kProductsMaxBatch = 8;
constexpr int64_t kSmallWeights = int64_t(1) << 17, kMidWeights = int64_t(1) << 19;
bool cell_products_pay(DType dtype, int64_t B, int64_t I, int64_t H, int64_t G) {
  if (dtype != DType::Float32 && dtype != DType::Float64) return false;
  if (B <= kProductsMaxBatch) return true;
  if (dtype != DType::Float32 || cpu_is_amd() || best_isa() < Isa::Avx512) return false;
  const bool two = at::get_num_threads() >= 2;
  const int64_t weights = G * H * (I + H);
  return (weights <= kSmallWeights && B <= (two ? 64 : 16)) || (weights <= kMidWeights && two && B <= 16);
}

}  // namespace cpu
}  // namespace fused_rnn
