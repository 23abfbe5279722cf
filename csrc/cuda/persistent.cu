// Launcher of the persistent recurrence kernels: the device queries that feed the plans
// (persistent_plan.h), the plan caches, the workspaces and the cooperative launches.
//
// csrc/recurrence.cpp asks persistent_plan (v1's plan: it depends on H only) whether a layer runs
// persistently, then calls persistent_forward / persistent_backward. Those launch v2
// (persistent_v2_kernels.cuh, through persistent_v2_launch.cuh) when v2's plan, which depends on the
// batch size too, fits the layer — bf16/fp16/fp32 without a projection on sm_80+; fp32 through TF32 when
// torch's TF32 matmul flag allows it, else 3xTF32 — and v1 (persistent_kernels.cuh) otherwise: layers
// whose v2 tiling does not fit the registers or whose v2 grid is not co-resident.
#include <ATen/Context.h>

#include "persistent_kernels.cuh"
#include "persistent_v2_launch.cuh"

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

// Resident blocks per SM of both kernels with `smem` bytes of dynamic shared memory (-1: a query
// failed). Each kernel's dynamic shared-memory limit is raised to the device's opt-in maximum first:
// raising it for one layer never lowers it below what a cached plan of another layer launches with.
// v2: the forward and the backward each with its own shared-memory size.
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
      ok = plan_persistent(
               cell, dtype, H, dev,
               [&](size_t smem) { return resident_blocks(k, dev, kPersistentThreads, smem, smem); }, &p) ==
           PlanVerdict::Persistent;
    }
    it = cache.plans.emplace(key, std::make_pair(ok, p)).first;
  }
  if (it->second.first) *plan = it->second.second;
  return it->second.first;
}

namespace {

// v2's plan of (device, cell, dtype, H, B, TF32 allowed), computed once (v2 takes no projection:
// recurrence.cpp never calls here with one).
struct V2PlanCache {
  std::mutex mutex;
  std::map<std::tuple<int, Cell, DType, int64_t, int64_t, bool>, std::pair<bool, PersistentV2Plan>> plans;
};

bool v2_plan(Cell cell, DType dtype, int64_t H, int64_t B, PersistentV2Plan* plan) {
  if (dtype == DType::Float64) return false;
  int device = 0;
  if (!query_ok(cudaGetDevice(&device))) return false;
  // fp32: TF32 MMAs when torch.backends.cuda.matmul.allow_tf32 says so (read at every call: it may change
  // between calls), else 3xTF32.
  const bool allow_tf32 = dtype == DType::Float32 && at::globalContext().allowTF32CuBLAS();
  static V2PlanCache cache;
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto key = std::make_tuple(device, cell, dtype, H, B, allow_tf32);
  auto it = cache.plans.find(key);
  if (it == cache.plans.end()) {
    PersistentV2Plan p;
    PersistentDevice dev;
    bool ok = false;
    if (query_device(device, &dev)) {
      const V2Math math = v2_math_of(dtype, allow_tf32);
      auto resident = [&](int tiling, size_t smem_forward, size_t smem_backward) {
        return resident_blocks(v2_kernels_of(cell, dtype, math, tiling), dev, kV2Threads, smem_forward,
                               smem_backward);
      };
      ok = plan_persistent_v2(cell, dtype, H, B, false, dev, resident, &p, allow_tf32) == PlanVerdict::Persistent;
    }
    it = cache.plans.emplace(key, std::make_pair(ok, p)).first;
  }
  if (it->second.first) *plan = it->second.second;
  return it->second.first;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fused_rnn: persistent v2 ") + what + " failed: " + cudaGetErrorString(err));
}

// Runs launch_v2_forward / launch_v2_backward with a workspace allocated on `stream` for this launch
// (stream-ordered: no host synchronisation, and capturable in a CUDA graph), its flags zeroed first.
template <typename LaunchV2>
void with_v2_workspace(const PersistentV2Plan& plan, bool backward, void* stream, LaunchV2&& launch_v2) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  auto align = [](size_t n) { return (n + 255) / 256 * 256; };
  const size_t h_off = 0, flag_off = align(plan.h_buf_bytes), part_off = flag_off + align(plan.flag_bytes);
  const size_t total = part_off + (backward ? plan.partial_bytes : 0);
  void* base = nullptr;
  check(cudaMallocAsync(&base, total, st), "workspace allocation");
  unsigned char* bytes = static_cast<unsigned char*>(base);
  V2Workspace ws;
  ws.h_buf = bytes + h_off;
  ws.flags = reinterpret_cast<unsigned*>(bytes + flag_off);
  ws.partials = backward ? reinterpret_cast<float*>(bytes + part_off) : nullptr;
  cudaError_t err = cudaMemsetAsync(ws.flags, 0, plan.flag_bytes, st);
  const char* what = "flag reset";
  if (err == cudaSuccess) {
    what = "kernel launch";
    launch_v2(ws, [&](auto kernel, dim3 grid, size_t smem, auto params, PersistentV2Layout lay) {
      void* args[] = {&params, &lay};
      err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, dim3(kV2Threads), args, smem, st);
    });
  }
  const cudaError_t freed = cudaFreeAsync(base, st);  // released whether or not the launch went
  check(err, what);
  check(freed, "workspace release");
}

}  // namespace

void persistent_forward(const PersistentForwardParams& p, const PersistentPlan& plan, void* stream) {
  PersistentV2Plan v2;
  if (v2_plan(p.cell, p.dtype, p.H, p.B, &v2)) {
    with_v2_workspace(v2, false, stream, [&](const V2Workspace& ws, auto&& launch) {
      launch_v2_forward(p, v2, ws, launch);
    });
    return;
  }
  PersistentForwardParams copy = p;
  launch(kernels_of(p.cell, p.dtype).forward, &copy, plan, stream);
}

void persistent_backward(const PersistentBackwardParams& p, const PersistentPlan& plan, void* stream) {
  PersistentV2Plan v2;
  if (v2_plan(p.cell, p.dtype, p.H, p.B, &v2)) {
    with_v2_workspace(v2, true, stream, [&](const V2Workspace& ws, auto&& launch) {
      launch_v2_backward(p, v2, ws, launch);
    });
    return;
  }
  PersistentBackwardParams copy = p;
  launch(kernels_of(p.cell, p.dtype).backward, &copy, plan, stream);
}

}  // namespace cuda
}  // namespace fused_rnn
