// The synchronisation a persistent recurrence pays per step, alone: no MMAs, no cell math, just the
// barriers, flags and h exchanges of csrc/cuda/persistent_v2_kernels.cuh and of the candidates for its
// next version, each in one persistent launch of `steps` steps (benchmarks/PERSISTENT_V2.md, "What the GPU
// must measure", item 5, and "v2.1 design from the measured costs"). Built and run by
// `python -m benchmarks.sync_cost`, which prints the table.
//
// Timing: CUDA events around one launch of `steps` steps (default 10,000), divided by steps; the median
// of 3 launches after a warm-up launch. The launch overhead (~5-10 us, and the memset of the flags before
// each launch) adds < 0.002 us per step. The warm-up launch (steps / 10) is also the check: it runs with an
// error counter, every CTA compares the h it read (and the k-split cases the reduced partial sums) with
// the values the producers wrote, and the counters are compared with their final values after it; a
// mismatch prints a `fail` line. The timed launches run without the checks (a null error counter).
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
//   counter          one arrival counter for the batch group: thread 0 of every CTA adds 1 with
//                    red.release.gpu.add after the step; one thread per CTA polls it (ld.acquire.gpu)
//                    until all CTAs arrived, then __syncthreads: one poller per CTA instead of one per
//                    producer per warp
//   counter_h        counter plus flags_all_h's exchange of h
//   counter_spin     counter polled without __nanosleep between the reads
//   counter_relaxed  counter polled with ld.relaxed.gpu, then one fence.acq_rel.gpu after the poll
//   counter_relaxed_h counter_relaxed plus the exchange of h
//   tree4/8/16       a two-level barrier: CTAs in groups of G; each adds 1 to its group's counter; the
//                    group's first CTA gathers the group (acquire), adds 1 to the top counter, waits for
//                    every group, then releases its group's go flag, which the group's other CTAs poll
//   tree8_h          tree8 plus flags_all_h's exchange of h
//   cluster_barrier          (sm_90) barrier.cluster.arrive.release + wait.acquire once per step
//   cluster_barrier_relaxed  (sm_90) arrive.relaxed + wait.acquire: the barrier without the gpu fence
//   cluster_dsmem            (sm_90) each CTA writes its slice of h (24 KB / cluster size) into every
//                            CTA of its cluster through mapa + st (DSMEM), then arrive.release +
//                            wait.acquire: the all-to-all exchange of h
//   cluster_dsmem_relaxed    (sm_90) the same with fence.acq_rel.cluster + arrive.relaxed
//   ksplit_flags     (sm_90) the K-split cluster exchange: 96 CTAs (U = 8 units each) in clusters of C;
//                    cluster j owns units [j*C*U, (j+1)*C*U), its CTA of rank r holds the w_hh columns
//                    of K slice r (H / C columns) for all those units. Per step a CTA waits (flags, polled
//                    by warp 0) for the producers of its slice only, copies B x H/C of h_{t-1} by
//                    cp.async (24 KB / C), computes partial gate sums for the cluster's G*C*U rows x B
//                    (here one shared-memory read per value stands in for the MMAs), writes each peer's
//                    share (G*U*B fp32 = 2 KB per peer) into the peer's shared memory through mapa
//                    (float4 stores), cluster barrier (arrive.release + wait.acquire), sums the C partials
//                    of its own G*U*B values, writes its U units of h_t, releases its flag
//   ksplit_counter   (sm_90) the same with counter's arrival counter instead of the flags
// Output: one line per measurement, `row,case,ctas,cluster,clusters,us_per_step,note`; `skip,...`
// for a case that cannot run here (with its reason in the note), `fail,...` for a failed check,
// `info,...` for the device.
//
// The kernels are in sync_cost_kernels.cuh. The same file compiles with a host compiler and
// -DFUSED_RNN_EMULATE (tests/test_sync_cost.py copies it to a .cpp, with benchmarks/ on the include path):
// the kernels then run in the CPU emulator (csrc/cuda/emu/) and main() runs one case with its checks.
#include "sync_cost_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// ---- the cases ----------------------------------------------------------------------------------------

using GridKernel = void (*)(unsigned*, __nv_bfloat16*, long long, unsigned*);
using ClusterKernel = void (*)(long long, unsigned*);
using KsplitKernel = void (*)(unsigned*, __nv_bfloat16*, long long, unsigned*, int);

struct GridCase {
  const char* name;
  GridKernel kernel;
  Sync sync;
  int group;  // tree: CTAs per group
  const char* note;
};
static const GridCase kGridCases[] = {
    {"empty", grid_step_kernel<Sync::None, Poll::AcquireSleep, 1, false>, Sync::None, 1, "two __syncthreads per step"},
    {"grid_sync", grid_step_kernel<Sync::GridSync, Poll::AcquireSleep, 1, false>, Sync::GridSync, 1,
     "cooperative grid.sync()"},
    {"flags_neighbour", grid_step_kernel<Sync::FlagsNeighbour, Poll::AcquireSleep, 1, false>, Sync::FlagsNeighbour, 1,
     "release/acquire; waits for 1 CTA"},
    {"flags_all", grid_step_kernel<Sync::FlagsAll, Poll::AcquireSleep, 1, false>, Sync::FlagsAll, 1,
     "v2 flags; waits for every owner of h"},
    {"flags_all_h", grid_step_kernel<Sync::FlagsAll, Poll::AcquireSleep, 1, true>, Sync::FlagsAll, 1,
     "v2 flags + 24 KB cp.async + own slice"},
    {"counter", grid_step_kernel<Sync::Counter, Poll::AcquireSleep, 1, false>, Sync::Counter, 1,
     "one arrival counter (red.release.add); 1 poller per CTA"},
    {"counter_h", grid_step_kernel<Sync::Counter, Poll::AcquireSleep, 1, true>, Sync::Counter, 1,
     "counter + 24 KB cp.async + own slice"},
    {"counter_spin", grid_step_kernel<Sync::Counter, Poll::AcquireSpin, 1, false>, Sync::Counter, 1,
     "counter; ld.acquire without nanosleep"},
    {"counter_relaxed", grid_step_kernel<Sync::Counter, Poll::RelaxedThenFence, 1, false>, Sync::Counter, 1,
     "counter; ld.relaxed polls + fence.acq_rel.gpu"},
    {"counter_relaxed_h", grid_step_kernel<Sync::Counter, Poll::RelaxedThenFence, 1, true>, Sync::Counter, 1,
     "counter_relaxed + 24 KB cp.async + own slice"},
    {"tree4", grid_step_kernel<Sync::Tree, Poll::AcquireSleep, 4, false>, Sync::Tree, 4,
     "two-level barrier; groups of 4"},
    {"tree8", grid_step_kernel<Sync::Tree, Poll::AcquireSleep, 8, false>, Sync::Tree, 8,
     "two-level barrier; groups of 8"},
    {"tree16", grid_step_kernel<Sync::Tree, Poll::AcquireSleep, 16, false>, Sync::Tree, 16,
     "two-level barrier; groups of 16"},
    {"tree8_h", grid_step_kernel<Sync::Tree, Poll::AcquireSleep, 8, true>, Sync::Tree, 8,
     "tree8 + 24 KB cp.async + own slice"},
};

struct ClusterCase {
  const char* name;
  ClusterKernel kernel;
  const char* note;
};
static const ClusterCase kClusterCases[] = {
    {"cluster_barrier", cluster_step_kernel<false, false>, "arrive.release + wait.acquire"},
    {"cluster_barrier_relaxed", cluster_step_kernel<false, true>, "arrive.relaxed + wait.acquire"},
    {"cluster_dsmem", cluster_step_kernel<true, false>, "24 KB / size to each peer by mapa; arrive.release"},
    {"cluster_dsmem_relaxed", cluster_step_kernel<true, true>, "same; fence.acq_rel.cluster + arrive.relaxed"},
};

struct KsplitCase {
  const char* name;
  KsplitKernel kernel;
  Sync sync;
  const char* note;
};
static const KsplitCase kKsplitCases[] = {
    {"ksplit_flags", ksplit_step_kernel<Sync::FlagsAll>, Sync::FlagsAll,
     "K-split: 24 KB / C from L2 + 2 KB fp32 to each peer + cluster barrier; flags of the slice"},
    {"ksplit_counter", ksplit_step_kernel<Sync::Counter>, Sync::Counter,
     "K-split as ksplit_flags; one arrival counter"},
};

// h_buf's epoch 0 (the other slots NaN-filled: an unwritten element fails the check).
static std::vector<__nv_bfloat16> initial_h(int slots, int hidden) {
  std::vector<__nv_bfloat16> h(static_cast<size_t>(slots) * kB * hidden, __float2bfloat16(NAN));
  for (int b = 0; b < kB; ++b)
    for (int k = 0; k < hidden; ++k) h[static_cast<size_t>(b) * hidden + k] = __float2bfloat16(h_value(0, b, k));
  return h;
}

// The flag words after a launch of `steps` steps of n CTAs, against what each protocol ends with; returns the
// number of words that differ.
static int check_counters(Sync sync, int group, const std::vector<unsigned>& f, int n, long long steps) {
  const unsigned epochs = static_cast<unsigned>(steps + 1);  // h0 and one per step
  int bad = 0;
  if (sync == Sync::FlagsNeighbour || sync == Sync::FlagsAll)
    for (int x = 0; x < n; ++x) bad += f[kFlagsAt + x] != epochs;
  if (sync == Sync::Counter) bad += f[kCounterAt] != static_cast<unsigned>(n) * epochs;
  if (sync == Sync::Tree) {
    const int groups = (n + group - 1) / group;
    for (int g = 0; g < groups; ++g) {
      bad += f[kGroupAt + g * kLine] != static_cast<unsigned>(std::min(group, n - g * group)) * epochs;
      bad += f[kGoAt + g * kLine] != static_cast<unsigned>(steps);  // the last epoch is published, never gathered
    }
    bad += f[kTopAt] != static_cast<unsigned>(groups * steps);
  }
  return bad;
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

#if defined(FUSED_RNN_EMULATE)

// ---- the emulator's main: one case, a few steps, with every check ---------------------------------------
//   sync_cost CASE CTAS CLUSTER STEPS   (CLUSTER 0 for the grid cases)
// Exits 0 and prints `ok,...` when the exchanged data and the counters are right, 1 otherwise; a lost flag
// or barrier is the emulator's deadlock report (exit 86).
int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s CASE CTAS CLUSTER STEPS\n", argv[0]);
    return 2;
  }
  const std::string name = argv[1];
  const int n = std::atoi(argv[2]), size = std::atoi(argv[3]);
  const long long steps = std::atoll(argv[4]);
  std::vector<unsigned> flags(kFlagWords, 0u);
  unsigned errors = 0;
  fr_emu::LaunchConfig cfg;
  cfg.grid = dim3(static_cast<unsigned>(n));
  cfg.block = dim3(kThreads);
  cfg.cooperative = true;  // every CTA at once, as the GPU's one CTA per SM
  cfg.stall_seconds = 60;
  int bad = -1;
  for (const GridCase& c : kGridCases)
    if (name == c.name) {
      std::vector<__nv_bfloat16> h = initial_h(2, kH);
      fr_emu::launch(cfg, c.kernel, flags.data(), h.data(), steps, &errors);
      bad = check_counters(c.sync, c.group, flags, n, steps);
    }
  for (const ClusterCase& c : kClusterCases)
    if (name == c.name) {
      cfg.cluster = dim3(static_cast<unsigned>(size));
      cfg.non_portable_cluster_size = size > 8;
      cfg.dynamic_smem = 2 * kHBytes;
      fr_emu::launch(cfg, c.kernel, steps, &errors);
      bad = 0;
    }
  for (const KsplitCase& c : kKsplitCases)
    if (name == c.name) {  // shape 1's U = 8 units per CTA, H = 8 n (so that a few CTAs make a small test)
      const int hidden = kKsplitUnits * n;
      cfg.cluster = dim3(static_cast<unsigned>(size));
      cfg.non_portable_cluster_size = size > 8;
      cfg.dynamic_smem = ksplit_smem_bytes(hidden, n, size);
      std::vector<__nv_bfloat16> h = initial_h(kRing, hidden);
      fr_emu::launch(cfg, c.kernel, flags.data(), h.data(), steps, &errors, hidden);
      bad = check_counters(c.sync, 1, flags, n, steps);
    }
  if (bad < 0) {
    std::fprintf(stderr, "sync_cost: no case %s\n", name.c_str());
    return 2;
  }
  std::printf("%s,%s,%d,%d,%lld,errors=%u,counters_off=%d\n", errors == 0 && bad == 0 ? "ok" : "wrong", name.c_str(),
              n, size, steps, errors, bad);
  return errors == 0 && bad == 0 ? 0 : 1;
}

#else  // nvcc: the benchmark

#define CHECK(call)                                                                                  \
  do {                                                                                               \
    const cudaError_t err_ = (call);                                                                 \
    if (err_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "sync_cost: %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

// Device buffers every case uses: the flag words, h (kRing slots of the largest hidden size), the error count.
struct Buffers {
  unsigned* flags = nullptr;
  __nv_bfloat16* h = nullptr;
  unsigned* errors = nullptr;
};

// Before the checked launch: flags zero, errors zero, h's epoch 0 in slot 0.
static void reset(const Buffers& d, int slots, int hidden) {
  const std::vector<__nv_bfloat16> h = initial_h(slots, hidden);
  CHECK(cudaMemcpy(d.h, h.data(), h.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(d.errors, 0, sizeof(unsigned)));
}

// After the checked launch: a `fail` line when the data or the counters were wrong.
static void report_check(const Buffers& d, Row row, Sync sync, int group, int n, long long steps) {
  unsigned errors = 0;
  std::vector<unsigned> flags(kFlagWords);
  CHECK(cudaMemcpy(&errors, d.errors, sizeof(unsigned), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(flags.data(), d.flags, sizeof(unsigned) * kFlagWords, cudaMemcpyDeviceToHost));
  const int bad = check_counters(sync, group, flags, n, steps);
  if (errors == 0 && bad == 0) return;
  static char note[160];
  std::snprintf(note, sizeof note, "CHECK FAILED: %u wrong values%s %d wrong counters", errors, ",", bad);
  row.note = note;
  print_row("fail", row);
}

// Median us/step over 3 timed launches of `steps` steps, after one checked warm-up launch of steps / 10
// (launch(n_steps, checked)); `checked_steps` receives that launch's step count.
template <class Launch>
static double us_per_step(Launch launch, long long steps, long long* checked_steps) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  *checked_steps = std::max(1LL, steps / 10);
  launch(*checked_steps, true);
  CHECK(cudaDeviceSynchronize());
  std::vector<double> us;
  for (int rep = 0; rep < 3; ++rep) {
    CHECK(cudaEventRecord(start));
    launch(steps, false);
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

static void run_grid_cases(const Buffers& d, long long steps, int sms) {
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
      auto launch = [&](long long n_steps, bool checked) {
        if (checked) reset(d, 2, kH);
        CHECK(cudaMemsetAsync(d.flags, 0, sizeof(unsigned) * kFlagWords));
        unsigned* flags = d.flags;
        __nv_bfloat16* h = d.h;
        unsigned* errors = checked ? d.errors : nullptr;
        void* args[] = {&flags, &h, &n_steps, &errors};
        CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(c.kernel), dim3(ctas), dim3(kThreads),
                                          args, 0, nullptr));
        CHECK(cudaGetLastError());
      };
      long long checked_steps = 0;
      row.us = us_per_step(launch, steps, &checked_steps);
      print_row("row", row);
      report_check(d, row, c.sync, c.group, ctas, checked_steps);
    }
  }
}

// A launch configuration of `ctas` CTAs in clusters of `size` (cudaLaunchKernelEx); attr is kept by the caller.
static cudaLaunchConfig_t cluster_config(cudaLaunchAttribute* attr, int ctas, int size, size_t smem) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(size);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of `size` run at once for `kernel` with `smem` bytes (cudaOccupancyMaxActiveClusters), after
// allowing 16-CTA clusters and the shared memory; 0 with a `skip` line (its reason) when the GPU refuses.
template <class Kernel>
static int max_active_clusters(Kernel kernel, Row row, size_t smem, const cudaDeviceProp& prop) {
  cudaFuncAttributes attr;
  CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (prop.major < 9 || attr.binaryVersion < 90) {
    row.note = prop.major < 9 ? "the GPU has no clusters (sm_90+)" : "binary not built for sm_90";
    print_row("skip", row);
    return 0;
  }
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchAttribute cluster_dim;
  const cudaLaunchConfig_t cfg = cluster_config(&cluster_dim, row.cluster, row.cluster, smem);
  int max_clusters = 0;
  const cudaError_t occupancy = cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg);
  if (occupancy != cudaSuccess) {  // a cluster size the GPU refuses is a row with its reason, not the end of the run
    (void)cudaGetLastError();
    row.note = cudaGetErrorString(occupancy);
    print_row("skip", row);
    return 0;
  }
  if (max_clusters < 1) {
    row.note = "cudaOccupancyMaxActiveClusters = 0";
    print_row("skip", row);
  }
  return max_clusters;
}

static void run_cluster_cases(const Buffers& d, long long steps, int sms, const cudaDeviceProp& prop) {
  for (const ClusterCase& c : kClusterCases) {
    for (int size : kClusterSizes) {
      Row row{c.name, 0, size, 0, 0.0, c.note};
      const int max_clusters = max_active_clusters(c.kernel, row, 2 * kHBytes, prop);
      if (max_clusters < 1) continue;
      row.clusters = std::min(max_clusters, sms / size);  // as many as run at once, one CTA per SM
      row.ctas = row.clusters * size;
      std::printf("info,max_active_clusters,%d,%d,%d,,cudaOccupancyMaxActiveClusters for %s\n", row.ctas, size,
                  max_clusters, c.name);
      cudaLaunchAttribute cluster_dim;
      const cudaLaunchConfig_t cfg = cluster_config(&cluster_dim, row.ctas, size, 2 * kHBytes);
      auto launch = [&](long long n_steps, bool checked) {
        if (checked) reset(d, 2, kH);
        CHECK(cudaLaunchKernelEx(&cfg, c.kernel, n_steps, checked ? d.errors : nullptr));
        CHECK(cudaGetLastError());
      };
      long long checked_steps = 0;
      row.us = us_per_step(launch, steps, &checked_steps);
      print_row("row", row);
      report_check(d, row, Sync::None, 1, row.ctas, checked_steps);
    }
  }
}

static void run_ksplit_cases(const Buffers& d, long long steps, const cudaDeviceProp& prop) {
  for (const KsplitCase& c : kKsplitCases) {
    for (int size : kClusterSizes) {
      Row row{c.name, kKsplitCtas, size, kKsplitCtas / size, 0.0, c.note};
      const size_t smem = ksplit_smem_bytes(kH, kKsplitCtas, size);
      const int max_clusters = max_active_clusters(c.kernel, row, smem, prop);
      if (max_clusters < 1) continue;
      std::printf("info,max_active_clusters,%d,%d,%d,,cudaOccupancyMaxActiveClusters for %s\n", row.ctas, size,
                  max_clusters, c.name);
      if (max_clusters < row.clusters) {  // the flags need every CTA resident at once
        row.note = "fewer clusters fit than the 96 CTAs need";
        print_row("skip", row);
        continue;
      }
      cudaLaunchAttribute cluster_dim;
      const cudaLaunchConfig_t cfg = cluster_config(&cluster_dim, row.ctas, size, smem);
      auto launch = [&](long long n_steps, bool checked) {
        if (checked) reset(d, kRing, kH);
        CHECK(cudaMemsetAsync(d.flags, 0, sizeof(unsigned) * kFlagWords));
        CHECK(cudaLaunchKernelEx(&cfg, c.kernel, d.flags, d.h, n_steps, checked ? d.errors : nullptr, kH));
        CHECK(cudaGetLastError());
      };
      long long checked_steps = 0;
      row.us = us_per_step(launch, steps, &checked_steps);
      print_row("row", row);
      report_check(d, row, c.sync, 1, row.ctas, checked_steps);
    }
  }
}

// The cluster cases of a build without sm_90 code: one skip line each, with the reason.
static void skip_cluster_cases() {
  const char* why = "built without sm_90: cluster cases need -arch=sm_90a";
  for (const ClusterCase& c : kClusterCases)
    for (int size : kClusterSizes) print_row("skip", Row{c.name, 0, size, 0, 0.0, why});
  for (const KsplitCase& c : kKsplitCases)
    for (int size : kClusterSizes) print_row("skip", Row{c.name, kKsplitCtas, size, kKsplitCtas / size, 0.0, why});
}

// --list: the measurements this build would make, without touching a GPU.
static void list_cases() {
  for (const GridCase& c : kGridCases)
    for (int ctas : kCtaCounts) print_row("plan", Row{c.name, ctas, 0, 0, 0.0, c.note});
  if constexpr (built_for_sm90()) {
    for (const ClusterCase& c : kClusterCases)
      for (int size : kClusterSizes) print_row("plan", Row{c.name, 0, size, 0, 0.0, c.note});
    for (const KsplitCase& c : kKsplitCases)
      for (int size : kClusterSizes) print_row("plan", Row{c.name, kKsplitCtas, size, kKsplitCtas / size, 0.0, c.note});
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
  Buffers d;
  CHECK(cudaMalloc(&d.flags, sizeof(unsigned) * kFlagWords));
  CHECK(cudaMalloc(&d.h, static_cast<size_t>(kRing) * kHBytes));
  CHECK(cudaMalloc(&d.errors, sizeof(unsigned)));
  run_grid_cases(d, steps, prop.multiProcessorCount);
  if constexpr (built_for_sm90()) {
    run_cluster_cases(d, steps, prop.multiProcessorCount, prop);
    run_ksplit_cases(d, steps, prop);
  } else {
    skip_cluster_cases();
  }
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaFree(d.flags));
  CHECK(cudaFree(d.h));
  CHECK(cudaFree(d.errors));
  return 0;
}

#endif
