// Launcher of the persistent recurrence kernels (persistent_kernels.cuh): the device queries that
// feed the plan (persistent_plan.h), the plan cache, and the cooperative launches.
#include "persistent_kernels.cuh"

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

namespace fused_rnn {
namespace cuda {
namespace {

template <Cell C, typename S> const void* forward_kernel() {
  return reinterpret_cast<const void*>(persistent_forward_kernel<C, S>);
}
template <Cell C, typename S> const void* backward_kernel() {
  return reinterpret_cast<const void*>(persistent_backward_kernel<C, S>);
}

// The forward and backward kernel instances of (cell, dtype); nullptr for float64.
struct KernelPair {
  const void* forward = nullptr;
  const void* backward = nullptr;
};
KernelPair kernels_of(Cell cell, DType dtype) {
  KernelPair k;
  dispatch_persistent(cell, dtype, [&](auto c, auto s) {
    constexpr Cell C = decltype(c)::value;
    using S = decltype(s);
    k = {forward_kernel<C, S>(), backward_kernel<C, S>()};
  });
  return k;
}

void launch(const void* kernel, void* params, const PersistentPlan& plan, void* stream) {
  int units = plan.units;
  void* args[] = {params, &units};
  const cudaError_t err = cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), args,
                                                      plan.smem_bytes, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fused_rnn: persistent kernel launch failed: ") + cudaGetErrorString(err));
}

// A failed attribute or occupancy query leaves a CUDA error pending: clear it, so that the per-step
// kernels that run instead do not report it as theirs.
bool query_ok(cudaError_t err) {
  if (err == cudaSuccess) return true;
  cudaGetLastError();
  return false;
}

// The device's numbers for the plan; false when a query failed.
bool query_device(int device, PersistentDevice* dev) {
  int sms = 0, coop = 0, optin = 0;
  if (!query_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) ||
      !query_ok(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device)) ||
      !query_ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)))
    return false;
  *dev = PersistentDevice{sms, coop != 0, size_t(optin)};
  return true;
}

// Resident blocks per SM of both kernels with `smem` bytes of dynamic shared memory (-1: a query
// failed). Each kernel's dynamic shared-memory limit is raised to the device's opt-in maximum first:
// raising it for one layer never lowers it below what a cached plan of another layer launches with.
int resident_blocks(const KernelPair& k, const PersistentDevice& dev, size_t smem) {
  int fewest = -1;
  for (const void* kernel : {k.forward, k.backward}) {
    int per_sm = 0;
    if (!query_ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dev.smem_optin))) ||
        !query_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, smem)))
      return -1;
    fewest = fewest < 0 || per_sm < fewest ? per_sm : fewest;
  }
  return fewest;
}

// The plan of each (device, cell, dtype, H) seen, computed once: the queries cost microseconds
// each, and the answer cannot change while the process runs.
struct PlanCache {
  std::mutex mutex;
  std::map<std::tuple<int, Cell, DType, int64_t>, std::pair<bool, PersistentPlan>> plans;
};
PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

}  // namespace

bool persistent_plan(Cell cell, DType dtype, int64_t H, int device, PersistentPlan* plan) {
  PlanCache& cache = plan_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto key = std::make_tuple(device, cell, dtype, H);
  auto it = cache.plans.find(key);
  if (it == cache.plans.end()) {
    PersistentPlan p{};
    PersistentDevice dev;
    bool ok = false;
    if (dtype != DType::Float64 && query_device(device, &dev)) {
      const KernelPair k = kernels_of(cell, dtype);
      ok = plan_persistent(cell, dtype, H, dev, [&](size_t smem) { return resident_blocks(k, dev, smem); }, &p) ==
           PlanVerdict::Persistent;
    }
    it = cache.plans.emplace(key, std::make_pair(ok, p)).first;
  }
  if (it->second.first) *plan = it->second.second;
  return it->second.first;
}

void persistent_forward(const PersistentForwardParams& p, const PersistentPlan& plan, void* stream) {
  PersistentForwardParams copy = p;
  launch(kernels_of(p.cell, p.dtype).forward, &copy, plan, stream);
}

void persistent_backward(const PersistentBackwardParams& p, const PersistentPlan& plan, void* stream) {
  PersistentBackwardParams copy = p;
  launch(kernels_of(p.cell, p.dtype).backward, &copy, plan, stream);
}

}  // namespace cuda
}  // namespace fused_rnn
