// Launcher of the per-step pointwise kernels (pointwise_kernels.cuh) on the caller's stream; the
// tensor-facing loop and the cuBLAS GEMMs between the launches are csrc/recurrence.cpp's.
#include "pointwise_kernels.cuh"

#include <string>

namespace fused_rnn {
namespace cuda {
namespace {

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fused_rnn: CUDA kernel launch failed: ") + cudaGetErrorString(err));
}

// A launcher for step_kernel's f(row functor, row width): B rows on `stream`.
struct Launch {
  int64_t B;
  void* stream;
  template <typename RowFn> void operator()(RowFn row_fn, int64_t W) const {
    const int64_t n = B * W;
    if (n == 0) return;  // a zero-sized grid is a launch error
    elementwise_kernel<<<static_cast<unsigned>(launch_blocks<RowFn>(B, W)), launch_threads<RowFn>(W), 0,
                         static_cast<cudaStream_t>(stream)>>>(B, W, row_fn);
    check_launch();
  }
};

}  // namespace

void forward_step(const ForwardStepParams& p, void* stream) { forward_step_kernel(p, Launch{p.B, stream}); }
void backward_step(const BackwardStepParams& p, void* stream) { backward_step_kernel(p, Launch{p.B, stream}); }
void proj_commit(const ProjCommitParams& p, void* stream) { proj_commit_kernel(p, Launch{p.B, stream}); }
void proj_backward_prep(const ProjBackwardPrepParams& p, void* stream) {
  proj_backward_prep_kernel(p, Launch{p.B, stream});
}

}  // namespace cuda
}  // namespace fused_rnn
