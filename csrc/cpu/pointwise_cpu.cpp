// CPU kernels, baseline instruction set, and the runtime choice between the baseline, AVX2+FMA and
// AVX-512 builds of the same code: the per-step pointwise kernels (pointwise_cpu_kernels.h) and the
// fused recurrence (fused_cpu_kernels.h), whose FMA microkernel and cell math run at the widest
// vectors the CPU has.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

#define FR_ISA_NS isa_default
#include "pointwise_cpu_kernels.h"
#include "fused_cpu_kernels.h"

#include <cstdlib>
#include <string>

namespace fused_rnn {
namespace cpu {
namespace isa_avx2 {
void forward_step(const ForwardStepParams& p);
void proj_commit(const ProjCommitParams& p);
void backward_step(const BackwardStepParams& p);
void proj_backward_prep(const ProjBackwardPrepParams& p);
void fused_forward(const FusedForwardParams& p);
void fused_backward(const FusedBackwardParams& p);
}  // namespace isa_avx2
namespace isa_avx512 {
void forward_step(const ForwardStepParams& p);
void proj_commit(const ProjCommitParams& p);
void backward_step(const BackwardStepParams& p);
void proj_backward_prep(const ProjBackwardPrepParams& p);
void fused_forward(const FusedForwardParams& p);
void fused_backward(const FusedBackwardParams& p);
}  // namespace isa_avx512

namespace {
enum class Isa { Default, Avx2, Avx512 };
// The widest instruction set this CPU runs; FUSED_RNN_CPU_ISA=default|avx2|avx512 caps it (tests
// use it to run every variant on one machine).
Isa best_isa() {
  static const Isa isa = [] {
    const char* cap = std::getenv("FUSED_RNN_CPU_ISA");
    const std::string want = cap ? cap : "";
    if (want == "default") return Isa::Default;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (want == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::Avx2 : Isa::Default;
    if (__builtin_cpu_supports("avx512f")) return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
    return Isa::Default;
  }();
  return isa;
}
}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
#define FR_DISPATCH(fn, P)                                     \
  void fn(const P& p) {                                        \
    switch (best_isa()) {                                      \
      case Isa::Avx512: return isa_avx512::fn(p);              \
      case Isa::Avx2: return isa_avx2::fn(p);                  \
      default: return isa_default::fn(p);                      \
    }                                                          \
  }
#else
#define FR_DISPATCH(fn, P) \
  void fn(const P& p) { isa_default::fn(p); }
#endif
FR_DISPATCH(forward_step, ForwardStepParams)
FR_DISPATCH(proj_commit, ProjCommitParams)
FR_DISPATCH(backward_step, BackwardStepParams)
FR_DISPATCH(proj_backward_prep, ProjBackwardPrepParams)
FR_DISPATCH(fused_forward, FusedForwardParams)
FR_DISPATCH(fused_backward, FusedBackwardParams)
#undef FR_DISPATCH

}  // namespace cpu
}  // namespace fused_rnn
