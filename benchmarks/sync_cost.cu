// The synchronisation a persistent recurrence pays per step, alone: no MMAs, no cell math, just the
// barriers, flags and h exchanges of csrc/cuda/persistent_v2_kernels.cuh and of the planned cluster
// variant, each in one persistent launch of `steps` steps (benchmarks/PERSISTENT_V2.md, "What the GPU
// must measure", item 5). Built and run by `python -m benchmarks.sync_cost`, which prints the table.
//
// Timing: CUDA events around one launch of `steps` steps (default 10,000), divided by steps; the median
// of 3 launches after a warm-up launch. The launch overhead (~5-10 us, and the memset of the flags before
// each launch) adds < 0.002 us per step.
// The barriers and flag operations are ptx.cuh's own wrappers, so the instructions are the kernels'.
//
// Cases (one CTA of 256 threads per SM, as v2; h_{t-1} is shape 1's: B=16 x H=768 bf16 = 24 KB):
//   empty            the step skeleton of v2 without sync: two __syncthreads per step (the floor)
//   grid_sync        cooperative_groups::this_grid().sync() once per step
//   flags_neighbour  v2's flag handoff, but each warp waits for one CTA only (the next one, a ring):
//                    the cost of one release -> acquire through L2 without the fan-in
//   flags_all        v2's flag handoff: thread 0 releases the CTA's step counter (st.release.gpu),
//                    each warp polls with ld.acquire.gpu the producers of its K slice -- together
//                    the CTA waits for every CTA that owns units of h
//   flags_all_h      flags_all plus the exchange of h: after its wait each warp copies its K slice of
//                    the whole h_{t-1} (24 KB per CTA) from global memory with cp.async.cg, and before
//                    the release each CTA stores its own units of h_t (v2's exchange buffer)
//   cluster_barrier          (sm_90) barrier.cluster.arrive.release + wait.acquire once per step
//   cluster_barrier_relaxed  (sm_90) arrive.relaxed + wait.acquire: the barrier without the gpu fence
//   cluster_dsmem            (sm_90) each CTA writes its slice of h (24 KB / cluster size) into every
//                            CTA of its cluster through mapa + st (DSMEM), then arrive.release +
//                            wait.acquire: the cluster variant's per-step exchange
//   cluster_dsmem_relaxed    (sm_90) the same with fence.acq_rel.cluster + arrive.relaxed
// Output: one line per measurement, `row,case,ctas,cluster,clusters,us_per_step,note`; `skip,...`
// for a case that cannot run here (with its reason in the note), `info,...` for the device.
#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call)                                                                                  \
  do {                                                                                               \
    const cudaError_t err_ = (call);                                                                 \
    if (err_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "sync_cost: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

constexpr int kThreads = 256, kWarps = kThreads / 32;  // v2's CTA (kV2Threads)
constexpr int kB = 16, kH = 768;                       // h_{t-1} of shape 1
constexpr int kHBytes = kB * kH * 2;                   // 24,576 bytes of bf16
constexpr int kVec = 8;                                // bf16 per 16-byte cp.async
constexpr int kRowPad = kH + kVec;                     // shared tile row, padded by 16 bytes as in v2
constexpr int kCtaCounts[] = {2, 8, 16, 32, 64, 96, 128, 132};
constexpr int kClusterSizes[] = {2, 4, 8, 16};

// The cluster kernels exist only in a build for sm_90 (nvcc -arch=sm_90a); __CUDA_ARCH_LIST__ is the
// list nvcc compiles for, visible to the host pass too.
constexpr bool built_for_sm90() {
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int a : archs)
    if (a >= 900) return true;
  return false;
}

// fr_ptx::wait_flag_geq_gpu's loop (ld.acquire.gpu, __nanosleep(64) between reads), with a bound: after
// 2^24 polls (> 1 s) it traps, so a lost flag ends the launch with an error instead of hanging the GPU.
__device__ void wait_geq(const unsigned* flag, unsigned target) {
  for (unsigned polls = 0;; ++polls) {
    if (static_cast<int>(fr_ptx::ld_acquire_gpu(flag) - target) >= 0) return;
    if (polls > (1u << 24)) __trap();
    __nanosleep(64);
  }
}

enum class Wait { None, Neighbour, AllProducers };

// One kernel for every grid-level case. flags[n] counts the epochs each CTA published (0 at launch;
// epoch 0 is published before the loop, step s waits for s + 1 and publishes s + 2, as v2 does).
// h_buf: [2][kB][kH] bf16, double-buffered by step parity.
template <bool kGridSync, Wait kWait, bool kExchangeH>
__global__ void __launch_bounds__(kThreads, 1)
    grid_step_kernel(unsigned* flags, __nv_bfloat16* h_buf, long long steps) {
  __shared__ __align__(16) __nv_bfloat16 hs[kB * kRowPad];  // this CTA's copy of h_{t-1}
  const int n = static_cast<int>(gridDim.x), x = static_cast<int>(blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int units = (kH + n - 1) / n;  // U: the CTA owns units [x*U, x*U + U) of h
  // The warp's K slice (kH / 8 columns) and the CTAs that own it (v2: the producers it waits for).
  const int k_lo = warp * (kH / kWarps), k_hi = k_lo + kH / kWarps;
  const int first = kWait == Wait::AllProducers ? k_lo / units : (x + 1) % n;
  const int last = (k_hi - 1) / units < n - 1 ? (k_hi - 1) / units : n - 1;
  const int count = kWait == Wait::AllProducers ? last - first + 1 : 1;
  unsigned* my_flag = flags + x;
  if (kWait != Wait::None && threadIdx.x == 0) fr_ptx::st_release_gpu(my_flag, 1u);

  for (long long s = 0; s < steps; ++s) {
    if (kGridSync) {
      fr_grid_sync();
      continue;
    }
    if (kWait != Wait::None) {  // 1. wait for epoch s of the producers (lane j polls the j-th)
      for (int j = lane; j < count; j += 32) wait_geq(flags + (first + j) % n, static_cast<unsigned>(s + 1));
      __syncwarp();
    }
    if (kExchangeH) {  // 2. the warp's K slice of every batch row of h_{t-1}: global -> shared
      const __nv_bfloat16* h_prev = h_buf + (s & 1) * kB * kH;
      constexpr int kChunks = kH / kWarps / kVec;  // 16-byte chunks per row of the slice
      for (int c = lane; c < kB * kChunks; c += 32) {
        const int r = c / kChunks, k = k_lo + (c % kChunks) * kVec;
        fr_ptx::cp_async_cg16(hs + r * kRowPad + k, h_prev + r * kH + k);
      }
      fr_ptx::cp_async_wait_all();
      __syncwarp();
    }
    __syncthreads();  // v2: the partial gate sums
    if (kExchangeH) {  // 3. this CTA's units of h_t into the other buffer (v2: one bf16 per (unit, row))
      __nv_bfloat16* h_next = h_buf + ((s + 1) & 1) * kB * kH;
      for (int i = static_cast<int>(threadIdx.x); i < units * kB; i += kThreads) {
        const int b = i / units, u = x * units + i % units;
        if (u < kH) h_next[b * kH + u] = hs[b * kRowPad + u];
      }
    }
    __syncthreads();  // v2: every h of the epoch written before the release
    if (kWait != Wait::None && threadIdx.x == 0) fr_ptx::st_release_gpu(my_flag, static_cast<unsigned>(s + 2));
  }
}

// barrier.cluster.arrive.relaxed (no ordering: not in ptx.cuh, written as its wrappers are); with data
// to publish it follows a cluster-scope fence instead of the arrive.release's gpu-scope one.
__device__ __forceinline__ void cluster_arrive_relaxed(bool fence) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (fence) asm volatile("fence.acq_rel.cluster;\n" ::: "memory");
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#else
  (void)fence;
  __trap();
#endif
}

// One kernel for the cluster cases. Dynamic shared memory: [2][kHBytes], h double-buffered by step
// parity (a peer writes buffer s & 1 in step s; its owner reads it in step s + 1, before the barrier
// of step s + 1 that the writer passes before writing it again in step s + 2).
template <bool kDsmem, bool kRelaxed>
__global__ void __launch_bounds__(kThreads, 1) cluster_step_kernel(unsigned* sink, long long steps) {
  FR_SHARED_DYNAMIC(unsigned char, tiles);
  const unsigned rank = fr_ptx::cluster_ctarank(), size = fr_ptx::cluster_nctarank();
  const unsigned slice = kHBytes / 16 / size;  // 16-byte chunks of h this CTA owns
  unsigned seen = 0;
  for (long long s = 0; s < steps; ++s) {
    unsigned char* tile = tiles + (s & 1) * kHBytes;
    if (kDsmem) {  // broadcast this CTA's slice into every CTA of the cluster (itself included)
      const uint4 v = make_uint4(static_cast<unsigned>(s), rank, 0u, 0u);
      for (unsigned peer = 0; peer < size; ++peer) {
        uint4* dst = reinterpret_cast<uint4*>(fr_ptx::map_shared_rank(tile, peer)) + rank * slice;
        for (unsigned i = threadIdx.x; i < slice; i += kThreads) dst[i] = v;
      }
    }
    if (kRelaxed)
      cluster_arrive_relaxed(kDsmem);
    else
      fr_ptx::cluster_arrive_release();
    fr_ptx::cluster_wait_acquire();
    if (kDsmem) seen += reinterpret_cast<const uint4*>(tile)[threadIdx.x].x;  // read what the peers wrote
  }
  if (seen == 0xFFFFFFFFu) *sink = seen;  // keeps the reads
}

struct Row {
  const char* name;
  int ctas, cluster, clusters;
  double us;
  const char* note;
};

static void print_row(const char* kind, const Row& r) {
  std::printf("%s,%s,%d,%d,%d,%.4f,%s\n", kind, r.name, r.ctas, r.cluster, r.clusters, r.us, r.note);
}

// Median us/step over 3 timed launches of `steps` steps, after one warm-up launch.
template <class Launch>
static double us_per_step(Launch launch, long long steps) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  launch(std::max(1LL, steps / 10));
  CHECK(cudaDeviceSynchronize());
  std::vector<double> us;
  for (int rep = 0; rep < 3; ++rep) {
    CHECK(cudaEventRecord(start));
    launch(steps);
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    us.push_back(1000.0 * ms / static_cast<double>(steps));
  }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  std::sort(us.begin(), us.end());
  return us[1];
}

struct GridCase {
  const char* name;
  void (*kernel)(unsigned*, __nv_bfloat16*, long long);
  const char* note;
};
static const GridCase kGridCases[] = {
    {"empty", grid_step_kernel<false, Wait::None, false>, "two __syncthreads per step"},
    {"grid_sync", grid_step_kernel<true, Wait::None, false>, "cooperative grid.sync()"},
    {"flags_neighbour", grid_step_kernel<false, Wait::Neighbour, false>, "release/acquire; waits for 1 CTA"},
    {"flags_all", grid_step_kernel<false, Wait::AllProducers, false>, "v2 flags; waits for every owner of h"},
    {"flags_all_h", grid_step_kernel<false, Wait::AllProducers, true>, "v2 flags + 24 KB cp.async + own slice"},
};

struct ClusterCase {
  const char* name;
  void (*kernel)(unsigned*, long long);
  const char* note;
};
static const ClusterCase kClusterCases[] = {
    {"cluster_barrier", cluster_step_kernel<false, false>, "arrive.release + wait.acquire"},
    {"cluster_barrier_relaxed", cluster_step_kernel<false, true>, "arrive.relaxed + wait.acquire"},
    {"cluster_dsmem", cluster_step_kernel<true, false>, "24 KB / size to each peer by mapa; arrive.release"},
    {"cluster_dsmem_relaxed", cluster_step_kernel<true, true>, "same; fence.acq_rel.cluster + arrive.relaxed"},
};

static void run_grid_cases(long long steps, int sms) {
  unsigned* flags = nullptr;
  __nv_bfloat16* h_buf = nullptr;
  CHECK(cudaMalloc(&flags, sizeof(unsigned) * 1024));
  CHECK(cudaMalloc(&h_buf, 2 * kHBytes));
  CHECK(cudaMemset(h_buf, 0, 2 * kHBytes));
  for (const GridCase& c : kGridCases) {
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, c.kernel, kThreads, 0));
    for (int ctas : kCtaCounts) {
      Row row{c.name, ctas, 0, 0, 0.0, c.note};
      if (ctas > sms || ctas > per_sm * sms) {
        row.note = "more CTAs than SMs";
        print_row("skip", row);
        continue;
      }
      auto launch = [&](long long n_steps) {
        CHECK(cudaMemsetAsync(flags, 0, sizeof(unsigned) * 1024));
        void* args[] = {&flags, &h_buf, &n_steps};
        CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(c.kernel), dim3(ctas), dim3(kThreads),
                                          args, 0, nullptr));
        CHECK(cudaGetLastError());
      };
      row.us = us_per_step(launch, steps);
      print_row("row", row);
    }
  }
  CHECK(cudaFree(flags));
  CHECK(cudaFree(h_buf));
}

static void run_cluster_cases(long long steps, int sms, const cudaDeviceProp& prop) {
  unsigned* sink = nullptr;
  CHECK(cudaMalloc(&sink, sizeof(unsigned)));
  for (const ClusterCase& c : kClusterCases) {
    cudaFuncAttributes attr;
    CHECK(cudaFuncGetAttributes(&attr, c.kernel));
    for (int size : kClusterSizes) {
      Row row{c.name, 0, size, 0, 0.0, c.note};
      if (prop.major < 9 || attr.binaryVersion < 90) {
        row.note = prop.major < 9 ? "the GPU has no clusters (sm_90+)" : "binary not built for sm_90";
        print_row("skip", row);
        continue;
      }
      CHECK(cudaFuncSetAttribute(c.kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      CHECK(cudaFuncSetAttribute(c.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 2 * kHBytes));
      cudaLaunchAttribute cluster_dim;
      cluster_dim.id = cudaLaunchAttributeClusterDimension;
      cluster_dim.val.clusterDim.x = static_cast<unsigned>(size);
      cluster_dim.val.clusterDim.y = 1;
      cluster_dim.val.clusterDim.z = 1;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(static_cast<unsigned>(size));
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = 2 * kHBytes;
      cfg.attrs = &cluster_dim;
      cfg.numAttrs = 1;
      // A cluster size the GPU refuses is a row with its reason, not the end of the run.
      int max_clusters = 0;
      const cudaError_t occupancy = cudaOccupancyMaxActiveClusters(&max_clusters, c.kernel, &cfg);
      if (occupancy != cudaSuccess) {
        (void)cudaGetLastError();  // clear it: the next cases still run
        row.note = cudaGetErrorString(occupancy);
        print_row("skip", row);
        continue;
      }
      row.clusters = std::min(max_clusters, sms / size);  // as many as run at once, one CTA per SM
      if (row.clusters < 1) {
        row.note = "cudaOccupancyMaxActiveClusters = 0";
        print_row("skip", row);
        continue;
      }
      row.ctas = row.clusters * size;
      cfg.gridDim = dim3(static_cast<unsigned>(row.ctas));
      std::printf("info,max_active_clusters,%d,%d,%d,,cudaOccupancyMaxActiveClusters for %s\n", row.ctas, size,
                  max_clusters, c.name);
      auto launch = [&](long long n_steps) {
        CHECK(cudaLaunchKernelEx(&cfg, c.kernel, sink, n_steps));
        CHECK(cudaGetLastError());
      };
      row.us = us_per_step(launch, steps);
      print_row("row", row);
    }
  }
  CHECK(cudaFree(sink));
}

// The cluster cases of a build without sm_90 code: one skip line each, with the reason.
static void skip_cluster_cases() {
  for (const ClusterCase& c : kClusterCases)
    for (int size : kClusterSizes)
      print_row("skip", Row{c.name, 0, size, 0, 0.0, "built without sm_90: cluster cases need -arch=sm_90a"});
}

// --list: the measurements this build would make, without touching a GPU.
static void list_cases() {
  for (const GridCase& c : kGridCases)
    for (int ctas : kCtaCounts) print_row("plan", Row{c.name, ctas, 0, 0, 0.0, c.note});
  if constexpr (built_for_sm90()) {
    for (const ClusterCase& c : kClusterCases)
      for (int size : kClusterSizes) print_row("plan", Row{c.name, 0, size, 0, 0.0, c.note});
  } else {
    skip_cluster_cases();
  }
}

int main(int argc, char** argv) {
  long long steps = 10000;
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--list")) {
      list = true;
    } else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) {
      steps = std::atoll(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--list] [--steps N]\n", argv[0]);
      return 2;
    }
  }
  if (list) {
    list_cases();
    return 0;
  }
  if (steps < 10) {
    std::fprintf(stderr, "sync_cost: --steps must be at least 10\n");
    return 2;
  }
  int device = 0;
  CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, device));
  int coop = 0;
  CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  if (!coop) {
    std::fprintf(stderr, "sync_cost: the device has no cooperative launch\n");
    return 1;
  }
  std::printf("info,device,%d,%d,%d,,%s sm_%d%d steps=%lld\n", prop.multiProcessorCount, prop.major, prop.minor,
              prop.name, prop.major, prop.minor, steps);
  run_grid_cases(steps, prop.multiProcessorCount);
  if constexpr (built_for_sm90())
    run_cluster_cases(steps, prop.multiProcessorCount, prop);
  else
    skip_cluster_cases();
  CHECK(cudaDeviceSynchronize());
  return 0;
}
