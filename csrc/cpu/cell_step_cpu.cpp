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
bool cell_dots_pay(DType dtype, int64_t B, int64_t I, int64_t H, int64_t G) {
  (void)I, (void)H, (void)G;
  return dtype != DType::Float16 && B <= 8;
}

// Measured on an Intel Xeon with AVX-512 (LSTMCell step with grad, 1 thread, H = I, median µs,
// GEMMs / one pass): B=1 H=128 172 / 129, B=8 H=128 266 / 202, B=8 H=256 637 / 523; at B=16 no
// gain (H=512 2.5 / 2.9 ms): from there the GEMM library's blocking pays for the second pass.
bool cell_products_pay(DType dtype, int64_t B, int64_t I, int64_t H, int64_t G) {
  (void)I, (void)H, (void)G;
  return (dtype == DType::Float32 || dtype == DType::Float64) && B <= 8;
}

}  // namespace cpu
}  // namespace fused_rnn
