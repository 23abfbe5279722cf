// Launcher of the persistent recurrence kernels (persistent_v2_kernels.cuh): the device queries that
// feed the plan (persistent_plan.h), the plan cache and the cooperative launches.
//
// csrc/recurrence.cpp asks persistent_plan whether a layer runs persistently — bf16/fp16/fp32 without a
// projection on sm_80+, fp32 through TF32 when torch's TF32 matmul flag allows it, else 3xTF32; where the
// plan says no, the per-step kernels run — then allocates the workspace from torch's caching allocator
// and calls persistent_forward / persistent_backward.
#include <ATen/Context.h>

#include "persistent_v2_launch.cuh"

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

namespace fused_rnn {
namespace cuda {
namespace {

// The forward and backward kernel instances of one plan.
struct KernelPair {
  const void* forward = nullptr;
  const void* backward = nullptr;
};

// A failed attribute or occupancy query leaves a CUDA error pending: clear it, so that the per-step
// kernels that run instead do not report it as theirs.
bool query_ok(cudaError_t err) {
  if (err == cudaSuccess) return true;
  cudaGetLastError();
  return false;
}

// The device's numbers for the plan; false when a query failed.
bool query_device(int device, PersistentDevice* dev) {
  int sms = 0, coop = 0, optin = 0, major = 0, minor = 0;
  if (!query_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) ||
      !query_ok(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device)) ||
      !query_ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) ||
      !query_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) ||
      !query_ok(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device)))
    return false;
  *dev = PersistentDevice{sms, coop != 0, size_t(optin), 10 * major + minor};
  return true;
}

// Resident blocks per SM of the forward and the backward kernel (the fewer), each with its own bytes of
// dynamic shared memory (-1: a query failed). Each kernel's dynamic shared-memory limit is raised to the
// device's opt-in maximum first: raising it for one layer never lowers it below what a cached plan of
// another layer launches with.
int resident_blocks(const KernelPair& k, const PersistentDevice& dev, int threads, size_t smem_forward,
                    size_t smem_backward) {
  int fewest = -1;
  for (const auto& ks : {std::make_pair(k.forward, smem_forward), std::make_pair(k.backward, smem_backward)}) {
    int per_sm = 0;
    if (!query_ok(cudaFuncSetAttribute(ks.first, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dev.smem_optin))) ||
        !query_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ks.first, threads, ks.second)))
      return -1;
    fewest = fewest < 0 || per_sm < fewest ? per_sm : fewest;
  }
  return fewest;
}

// The v2 kernel instances of (cell, dtype, math, tiling); nullptr where none is compiled.
KernelPair v2_kernels_of(Cell cell, DType dtype, V2Math math, int tiling) {
  KernelPair k;
  dispatch_v2(cell, dtype, math, tiling, [&](auto c, auto s, auto i, auto m) {
    using K = V2Kernels<decltype(c)::value, decltype(s), decltype(i)::value, decltype(m)::value>;
    k = {reinterpret_cast<const void*>(K::forward), reinterpret_cast<const void*>(K::backward)};
  });
  return k;
}

// The plan of each (device, cell, dtype, H, B, projection, TF32 allowed) seen, computed once: the
// queries cost microseconds each, and the answer cannot change while the process runs.
struct PlanCache {
  std::mutex mutex;
  std::map<std::tuple<int, Cell, DType, int64_t, int64_t, bool, bool>, std::pair<PlanVerdict, PersistentV2Plan>>
      plans;
};

}  // namespace

PlanVerdict persistent_plan(Cell cell, DType dtype, int64_t H, int64_t B, bool proj, int device,
                            PersistentV2Plan* plan) {
  // fp32: TF32 MMAs when torch.backends.cuda.matmul.allow_tf32 says so (read at every call: it may change
  // between calls), else 3xTF32.
  const bool allow_tf32 = dtype == DType::Float32 && at::globalContext().allowTF32CuBLAS();
  static PlanCache cache;
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto key = std::make_tuple(device, cell, dtype, H, B, proj, allow_tf32);
  auto it = cache.plans.find(key);
  if (it == cache.plans.end()) {
    PersistentV2Plan p;
    PersistentDevice dev;
    PlanVerdict v = PlanVerdict::QueryFailed;
    if (query_device(device, &dev)) {
      const V2Math math = dtype == DType::Float64 ? V2Math::Mma16 : v2_math_of(dtype, allow_tf32);
      auto resident = [&](int tiling, size_t smem_forward, size_t smem_backward) {
        return resident_blocks(v2_kernels_of(cell, dtype, math, tiling), dev, kV2Threads, smem_forward,
                               smem_backward);
      };
      v = plan_persistent_v2(cell, dtype, H, B, proj, dev, resident, &p, allow_tf32);
    }
    it = cache.plans.emplace(key, std::make_pair(v, p)).first;
  }
  *plan = it->second.second;
  return it->second.first;
}

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fused_rnn: persistent v2 ") + what + " failed: " + cudaGetErrorString(err));
}

// Runs launch_v2_forward / launch_v2_backward on `stream` with the workspace at `base`, its flags zeroed
// first (stream-ordered: no host synchronisation, and capturable in a CUDA graph).
template <typename LaunchV2>
void with_v2_workspace(const PersistentV2Plan& plan, bool backward, void* base, void* stream, LaunchV2&& launch_v2) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const V2Workspace ws = v2_workspace_at(plan, backward, base);
  check(cudaMemsetAsync(ws.flags, 0, plan.flag_bytes, st), "flag reset");
  cudaError_t err = cudaSuccess;
  launch_v2(ws, [&](auto kernel, dim3 grid, size_t smem, auto params, PersistentV2Layout lay) {
    void* args[] = {&params, &lay};
    err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, dim3(kV2Threads), args, smem, st);
  });
  check(err, "kernel launch");
}

}  // namespace

void persistent_forward(const PersistentForwardParams& p, const PersistentV2Plan& plan, void* workspace,
                        void* stream) {
  with_v2_workspace(plan, false, workspace, stream, [&](const V2Workspace& ws, auto&& launch) {
    launch_v2_forward(p, plan, ws, launch);
  });
}

void persistent_backward(const PersistentBackwardParams& p, const PersistentV2Plan& plan, void* workspace,
                         void* stream) {
  with_v2_workspace(plan, true, workspace, stream, [&](const V2Workspace& ws, auto&& launch) {
    launch_v2_backward(p, plan, ws, launch);
  });
}

}  // namespace cuda
}  // namespace fused_rnn
