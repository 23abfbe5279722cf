// Instantiates the v2 forward and backward kernels for nvcc, to read its resource use (ptxas -v) and its SASS
// (tests/test_cuda_persistent_v2.py): the tilings of benchmarks/PERSISTENT_V2.md's shapes.
#include "cuda/persistent_v2_kernels.cuh"

namespace fused_rnn {
namespace cuda {
#define FR_V2_INSTANCE(C, S, MT, KT, NT)                                                                   \
  template __global__ void persistent_v2_forward_kernel<C, S, MT, KT, NT>(PersistentForwardParams, PersistentV2Layout); \
  template __global__ void persistent_v2_backward_kernel<C, S, MT, KT, NT>(PersistentBackwardParams, PersistentV2Layout);
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 2, 6, 2)   // B=16 H=768
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 4, 4, 2)   // B=64 H=512, 4 batch groups
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 1, 2, 2)   // B=16 H=256
FR_V2_INSTANCE(Cell::LSTM, __nv_bfloat16, 2, 8, 2)   // B=16 H=1024
FR_V2_INSTANCE(Cell::GRU, __half, 2, 8, 2)
FR_V2_INSTANCE(Cell::RNN_TANH, __nv_bfloat16, 1, 8, 2)
}  // namespace cuda
}  // namespace fused_rnn
