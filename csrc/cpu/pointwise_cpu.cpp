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

#include "cpu_isa.h"

#define FR_ISA_NS isa_default
#include "pointwise_cpu_kernels.h"
#include "fused_cpu_kernels.h"


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
namespace isa_avx512bf16 {
void fused_forward(const FusedForwardParams& p);
void fused_backward(const FusedBackwardParams& p);
}  // namespace isa_avx512bf16

FR_DEFINE_ISA_DISPATCH(forward_step, ForwardStepParams)
FR_DEFINE_ISA_DISPATCH(proj_commit, ProjCommitParams)
FR_DEFINE_ISA_DISPATCH(backward_step, BackwardStepParams)
FR_DEFINE_ISA_DISPATCH(proj_backward_prep, ProjBackwardPrepParams)

// bf16 layers on a CPU with AVX512_BF16: the build whose GEMMs multiply bf16 pairs, or tiles with
// AMX (fused_cpu_avx512bf16.cpp); everything else as above.
#ifdef FR_HAVE_BF16_BUILD
#define FR_DEFINE_FUSED_DISPATCH(fn, P)                                           \
  namespace by_isa {                                                              \
  FR_DEFINE_ISA_DISPATCH(fn, P)                                                   \
  }                                                                               \
  void fn(const P& p) {                                                           \
    if (best_isa() >= Isa::Avx512Bf16 && p.step.dtype == DType::BFloat16)         \
      return isa_avx512bf16::fn(p);                                               \
    by_isa::fn(p);                                                                \
  }
#else
#define FR_DEFINE_FUSED_DISPATCH(fn, P) FR_DEFINE_ISA_DISPATCH(fn, P)
#endif
FR_DEFINE_FUSED_DISPATCH(fused_forward, FusedForwardParams)
FR_DEFINE_FUSED_DISPATCH(fused_backward, FusedBackwardParams)

}  // namespace cpu
}  // namespace fused_rnn
