// Cell-step CPU kernels, baseline instruction set, and the runtime choice between the baseline,
// AVX2+FMA and AVX-512 builds of cell_step_cpu_kernels.h (the same choice, and the same
// FUSED_RNN_CPU_ISA cap, as the recurrence's pointwise kernels in pointwise_cpu.cpp).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define FR_ISA_NS isa_default
#include "cell_step_cpu_kernels.h"

#include <cstdlib>
#include <string>

namespace fused_rnn {
namespace cpu {
namespace isa_avx2 {
void cell_forward(const CellForwardParams& p);
void cell_backward(const CellBackwardParams& p);
}  // namespace isa_avx2
namespace isa_avx512 {
void cell_forward(const CellForwardParams& p);
void cell_backward(const CellBackwardParams& p);
}  // namespace isa_avx512

namespace {
enum class CellIsa { Default, Avx2, Avx512 };
CellIsa cell_isa() {
  static const CellIsa isa = [] {
    const char* cap = std::getenv("FUSED_RNN_CPU_ISA");
    const std::string want = cap ? cap : "";
    if (want == "default") return CellIsa::Default;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (want == "avx2") return avx2 ? CellIsa::Avx2 : CellIsa::Default;
    if (__builtin_cpu_supports("avx512f")) return CellIsa::Avx512;
    if (avx2) return CellIsa::Avx2;
#endif
    return CellIsa::Default;
  }();
  return isa;
}
}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
#define FR_DISPATCH(fn, P)                            \
  void fn(const P& p) {                               \
    switch (cell_isa()) {                             \
      case CellIsa::Avx512: return isa_avx512::fn(p); \
      case CellIsa::Avx2: return isa_avx2::fn(p);     \
      default: return isa_default::fn(p);             \
    }                                                 \
  }
#else
#define FR_DISPATCH(fn, P) \
  void fn(const P& p) { isa_default::fn(p); }
#endif
FR_DISPATCH(cell_forward, CellForwardParams)
FR_DISPATCH(cell_backward, CellBackwardParams)
#undef FR_DISPATCH

// Measured on AMD EPYC Zen 4 (benchmarks/bench_cells.py): the dot kernels beat MKL's small GEMMs
// while the step is bound by reading the weights.
bool cell_dots_pay(DType dtype, int64_t B, int64_t I, int64_t H, int64_t G) {
  (void)I, (void)H, (void)G;
  return dtype != DType::Float16 && B <= 8;
}

}  // namespace cpu
}  // namespace fused_rnn
