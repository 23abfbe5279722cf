// ptx.cuh's cluster wrappers under nvcc for sm_90 (tests/test_cuda_emu_cluster.py reads the SASS): the
// cluster exchange of tests/emu/runtime_scenarios.cpp, with the cluster shape fixed at compile time.
#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

constexpr unsigned kThreads = 64;

__global__ void __cluster_dims__(2, 2, 1) cluster_exchange_sm90(float* out, int rounds) {
  FR_SHARED_DYNAMIC(float, dyn);
  __shared__ float stat[kThreads];
  const unsigned rank = fr_ptx::cluster_ctarank(), n = fr_ptx::cluster_nctarank(), t = threadIdx.x;
  const unsigned b = blockIdx.y * gridDim.x + blockIdx.x;
  float mine = static_cast<float>(b * kThreads + t);
  for (int r = 0; r < rounds; ++r) {
    float* slot = r % 2 ? stat : dyn;
    slot[t] = mine;
    fr_ptx::cluster_sync();
    const float* peer = fr_ptx::map_shared_rank(slot, (rank + 1) % n);
    mine = 0.5f * mine + peer[kThreads - 1 - t];
  }
  fr_ptx::cluster_arrive_release();
  out[b * kThreads + t] = mine;
  fr_ptx::cluster_wait_acquire();
}
