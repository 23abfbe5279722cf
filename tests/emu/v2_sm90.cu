// Instantiates the v2 forward and backward kernels for nvcc, to read its resource use (ptxas -v) and its SASS
// (tests/test_cuda_persistent_v2.py): the tilings of benchmarks/PERSISTENT_V2.md's shapes.
#include "cuda/persistent_v2_kernels.cuh"

namespace fused_rnn {
namespace cuda {
#define FR_V2_INSTANCE(C, S, MT, KT, NT, M)                                                                 \
  template __global__ void persistent_v2_forward_kernel<C, S, MT, KT, NT, V2Math::M>(PersistentForwardParams,  \
                                                                                     PersistentV2Layout);      \
  template __global__ void persistent_v2_backward_kernel<C, S, MT, KT, NT, V2Math::M>(PersistentBackwardParams, \
                                                                                      PersistentV2Layout);
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 2, 6, 2, Mma16)   // B=16 H=768
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 4, 4, 2, Mma16)   // B=64 H=512, 4 batch groups
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 1, 2, 2, Mma16)   // B=16 H=256
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 2, 8, 2, Mma16)   // B=16 H=1024
FR_V2_INSTANCE(Cell::GRU, __half, 2, 8, 2, Mma16)
FR_V2_INSTANCE(Cell::RNN_TANH, __nv_bfloat16, 1, 8, 2, Mma16)
FR_V2_INSTANCE(Cell::LSTM, float, 2, 4, 4, Tf32)      // B=64 H=512 fp32 TF32, 2 batch groups
FR_V2_INSTANCE(Cell::LSTM, float, 1, 4, 8, Tf32x3)    // B=64 H=512 fp32 exact (3xTF32), 1 batch group
FR_V2_INSTANCE(Cell::GRU, float, 1, 4, 8, Tf32)
FR_V2_INSTANCE(Cell::RNN_TANH, float, 1, 4, 8, Tf32x3)
}  // namespace cuda
}  // namespace fused_rnn
