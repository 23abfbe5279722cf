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
// The same file compiles with a host compiler and -DFUSED_RNN_EMULATE (tests/test_sync_cost.py copies it to
// a .cpp): the kernels then run in the CPU emulator (csrc/cuda/emu/) and main() runs one case with its checks.
#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

// Planted bugs, for tests/test_sync_cost.py only (each must be caught in the emulator): 1 the relaxed poll
// without its fence; 2 the k-split cases without their cluster barrier; 3 a tree leader that does not wait
// for its own group.
#ifndef SYNC_COST_MUTATION
#define SYNC_COST_MUTATION 0
#endif

#if defined(__CUDACC__)
#define SYNC_COST_KERNEL __global__ void __launch_bounds__(kThreads, 1)
#else
#define SYNC_COST_KERNEL void
#endif

constexpr int kThreads = 256, kWarps = kThreads / 32;  // v2's CTA (kV2Threads)
constexpr int kB = 16, kH = 768;                       // h_{t-1} of shape 1
constexpr int kHBytes = kB * kH * 2;                   // 24,576 bytes of bf16
constexpr int kVec = 8;                                // bf16 per 16-byte cp.async
constexpr int kRowPad = kH + kVec;                     // shared tile row, padded by 16 bytes as in v2
constexpr int kGates = 4;                              // G of an LSTM
constexpr int kKsplitCtas = 96, kKsplitUnits = kH / kKsplitCtas;  // shape 1's grid: U = 8 units per CTA
static_assert(kKsplitUnits * kKsplitCtas == kH, "the k-split grid divides H");
constexpr int kRing = 3;  // h epochs the k-split cases keep (the lag argument at ksplit_step_kernel)
constexpr int kCtaCounts[] = {2, 8, 16, 32, 64, 96, 128, 132};
constexpr int kClusterSizes[] = {2, 4, 8, 16};

// The flag words, one buffer zeroed before each launch. Counters that many CTAs poll sit on lines of
// their own (128 bytes); v2's per-CTA flags stay adjacent, as in v2.
constexpr int kLine = 32, kMaxGroups = 64;
constexpr int kFlagsAt = 0;                            // [CTA] epochs published (flags_*, ksplit_flags)
constexpr int kCounterAt = 1024;                       // arrivals of every CTA (counter*, ksplit_counter)
constexpr int kGroupAt = 2048;                         // [group] arrivals of the group's CTAs (tree*)
constexpr int kGoAt = kGroupAt + kMaxGroups * kLine;   // [group] epochs the group's leader released
constexpr int kTopAt = kGoAt + kMaxGroups * kLine;     // arrivals of the group leaders
constexpr int kFlagWords = kTopAt + kLine;

// The cluster kernels exist only in a build for sm_90 (nvcc -arch=sm_90a); __CUDA_ARCH_LIST__ is the
// list nvcc compiles for, visible to the host pass too. The emulator has clusters.
constexpr bool built_for_sm90() {
#if defined(__CUDACC__)
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int a : archs)
    if (a >= 900) return true;
  return false;
#else
  return true;
#endif
}

enum class Sync { None, GridSync, FlagsNeighbour, FlagsAll, Counter, Tree };
// How a flag is polled: ld.acquire with __nanosleep(64) between reads (ptx.cuh's wait_flag_geq_gpu, v2's);
// ld.acquire back to back; ld.relaxed with __nanosleep(64) between reads, then one fence.acq_rel.gpu.
enum class Poll { AcquireSleep, AcquireSpin, RelaxedThenFence };

// The value every producer writes for h element (b, k) of epoch e, so that a reader can tell a stale or
// misplaced element: small integers, exact in bf16 and in fp32 sums. The host writes epoch 0 with it.
__host__ __device__ inline float h_value(long long epoch, int b, int k) { return static_cast<float>((epoch + b + k) & 63); }

FR_DEVICE void count_error(unsigned* errors) { atomicAdd(errors, 1u); }
FR_DEVICE int smaller(int a, int b) { return a < b ? a : b; }

// Between two polls: __nanosleep(64) when asked; after 2^24 polls (> 1 s) a trap, so that a lost flag ends
// the launch with an error instead of hanging the GPU. In the emulator the OS thread yields (a lost flag is
// its deadlock report).
FR_DEVICE void back_off(unsigned polls, bool sleep) {
#if defined(FUSED_RNN_EMULATE)
  (void)polls;
  (void)sleep;
  std::this_thread::yield();
#elif defined(__CUDA_ARCH__)
  if (polls > (1u << 24)) __trap();
  if (sleep) __nanosleep(64);
#else
  (void)polls;
  (void)sleep;
#endif
}

// Spins until *flag (counted modulo 2^32) has reached target; the reads after it see what was released
// before the flag reached it.
template <Poll kPoll>
FR_DEVICE void wait_geq(const unsigned* flag, unsigned target) {
  for (unsigned polls = 0;; ++polls) {
    const unsigned v = kPoll == Poll::RelaxedThenFence ? fr_ptx::ld_relaxed_gpu(flag) : fr_ptx::ld_acquire_gpu(flag);
    if (static_cast<int>(v - target) >= 0) break;
    back_off(polls, kPoll != Poll::AcquireSpin);
  }
  if (kPoll == Poll::RelaxedThenFence && SYNC_COST_MUTATION != 1) fr_ptx::fence_acq_rel_gpu();
}

// Lane j of the calling warp polls the flags of CTAs first + j, first + j + 32, ... (mod n).
template <Poll kPoll>
FR_DEVICE void wait_flags(const unsigned* flags, int first, int count, int n, unsigned target) {
  for (int j = static_cast<int>(threadIdx.x) % 32; j < count; j += 32)
    wait_geq<kPoll>(flags + kFlagsAt + (first + j) % n, target);
  __syncwarp();
}

// The barrier of counter / tree for epoch e (every CTA published e; counted from 1), by thread 0 of the
// CTA; the caller's __syncthreads hands it to the other threads.
template <Sync kSync, Poll kPoll, int kGroup>
FR_DEVICE void wait_all_arrived(unsigned* flags, int x, int n, unsigned epoch) {
  if (kSync == Sync::Counter) {
    wait_geq<kPoll>(flags + kCounterAt, static_cast<unsigned>(n) * epoch);
  } else if (kSync == Sync::Tree) {
    const int group = x / kGroup, groups = (n + kGroup - 1) / kGroup;
    if (x % kGroup == 0) {  // the leader: its group, then every leader, then the go of its group
      const int size = smaller(kGroup, n - group * kGroup);
      if (SYNC_COST_MUTATION != 3) wait_geq<kPoll>(flags + kGroupAt + group * kLine, static_cast<unsigned>(size) * epoch);
      fr_ptx::red_release_add_gpu(flags + kTopAt, 1u);
      wait_geq<kPoll>(flags + kTopAt, static_cast<unsigned>(groups) * epoch);
      fr_ptx::st_release_gpu(flags + kGoAt + group * kLine, epoch);
    } else {
      wait_geq<kPoll>(flags + kGoAt + group * kLine, epoch);
    }
  }
}

// Thread 0 of CTA x publishes epoch e: every write of the CTA before the caller's __syncthreads is visible to
// whoever acquires it.
template <Sync kSync, int kGroup>
FR_DEVICE void publish(unsigned* flags, int x, unsigned epoch) {
  if (kSync == Sync::FlagsNeighbour || kSync == Sync::FlagsAll) fr_ptx::st_release_gpu(flags + kFlagsAt + x, epoch);
  if (kSync == Sync::Counter) fr_ptx::red_release_add_gpu(flags + kCounterAt, 1u);
  if (kSync == Sync::Tree) fr_ptx::red_release_add_gpu(flags + kGroupAt + (x / kGroup) * kLine, 1u);
}

// One kernel for every grid-level case. Epochs are counted from 1 (h0 is published before the loop; step s
// waits for epoch s + 1 and publishes s + 2, as v2 does). h_buf: [2][kB][kH] bf16, double-buffered by step
// parity: a CTA writing epoch s + 1 overwrites epoch s - 1, which every reader finished before publishing
// epoch s -- which this CTA has waited for (every case that exchanges h waits for all CTAs).
template <Sync kSync, Poll kPoll, int kGroup, bool kExchangeH>
SYNC_COST_KERNEL grid_step_kernel(unsigned* flags, __nv_bfloat16* h_buf, long long steps, unsigned* errors) {
  FR_SHARED_ARRAY(uint4, hs_chunks, kB * kRowPad / kVec);  // this CTA's copy of h_{t-1}, 16-byte aligned
  __nv_bfloat16* hs = reinterpret_cast<__nv_bfloat16*>(hs_chunks);
  const int n = static_cast<int>(gridDim.x), x = static_cast<int>(blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int units = (kH + n - 1) / n;  // U: the CTA owns units [x*U, x*U + U) of h
  // The warp's K slice (kH / 8 columns) and the CTAs that own it (v2: the producers it waits for).
  const int k_lo = warp * (kH / kWarps), k_hi = k_lo + kH / kWarps;
  const int first = kSync == Sync::FlagsAll ? k_lo / units : (x + 1) % n;
  const int last = (k_hi - 1) / units < n - 1 ? (k_hi - 1) / units : n - 1;
  const int count = kSync == Sync::FlagsAll ? last - first + 1 : 1;
  const bool by_warp = kSync == Sync::FlagsNeighbour || kSync == Sync::FlagsAll;
  const bool by_cta = kSync == Sync::Counter || kSync == Sync::Tree;
  if (threadIdx.x == 0) publish<kSync, kGroup>(flags, x, 1u);

  for (long long s = 0; s < steps; ++s) {
    if (kSync == Sync::GridSync) {
      fr_grid_sync();
      continue;
    }
    const unsigned epoch = static_cast<unsigned>(s + 1);
    if (by_warp) wait_flags<kPoll>(flags, first, count, n, epoch);  // 1. wait for epoch s + 1 of the producers
    if (by_cta) {
      if (threadIdx.x == 0) wait_all_arrived<kSync, kPoll, kGroup>(flags, x, n, epoch);
      __syncthreads();
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
      if (errors)  // the check: what this lane copied is epoch s
        for (int c = lane; c < kB * kChunks; c += 32) {
          const int r = c / kChunks, k = k_lo + (c % kChunks) * kVec;
          for (int i = 0; i < kVec; ++i)
            if (__bfloat162float(hs[r * kRowPad + k + i]) != h_value(s, r, k + i)) count_error(errors);
        }
    }
    __syncthreads();  // v2: the partial gate sums
    if (kExchangeH) {  // 3. this CTA's units of h_t into the other buffer (v2: one bf16 per (unit, row))
      __nv_bfloat16* h_next = h_buf + ((s + 1) & 1) * kB * kH;
      for (int i = static_cast<int>(threadIdx.x); i < units * kB; i += kThreads) {
        const int b = i / units, u = x * units + i % units;
        if (u < kH) h_next[b * kH + u] = __float2bfloat16(h_value(s + 1, b, u));
      }
    }
    __syncthreads();  // v2: every h of the epoch written before the release
    if (threadIdx.x == 0) publish<kSync, kGroup>(flags, x, static_cast<unsigned>(s + 2));
  }
}

// One kernel for the cluster cases. Dynamic shared memory: [2][kHBytes], h double-buffered by step
// parity (a peer writes buffer s & 1 in step s; its owner reads it in step s + 1, before the barrier
// of step s + 1 that the writer passes before writing it again in step s + 2).
template <bool kDsmem, bool kRelaxed>
SYNC_COST_KERNEL cluster_step_kernel(long long steps, unsigned* errors) {
  FR_SHARED_DYNAMIC(unsigned char, tiles);
  const unsigned rank = fr_ptx::cluster_ctarank(), size = fr_ptx::cluster_nctarank();
  const unsigned slice = kHBytes / 16 / size;  // 16-byte chunks of h this CTA owns
  unsigned seen = 0;
  for (long long s = 0; s < steps; ++s) {
    unsigned char* tile = tiles + (s & 1) * kHBytes;
    if (kDsmem) {  // broadcast this CTA's slice into every CTA of the cluster (itself included)
      const uint4 v{static_cast<unsigned>(s), rank, 0u, 0u};
      for (unsigned peer = 0; peer < size; ++peer) {
        uint4* dst = reinterpret_cast<uint4*>(fr_ptx::map_shared_rank(tile, peer)) + rank * slice;
        for (unsigned i = threadIdx.x; i < slice; i += kThreads) dst[i] = v;
      }
    }
    if (kRelaxed) {
      if (kDsmem) fr_ptx::fence_acq_rel_cluster();
      fr_ptx::cluster_arrive_relaxed();
    } else {
      fr_ptx::cluster_arrive_release();
    }
    fr_ptx::cluster_wait_acquire();
    if (kDsmem) {  // read what the peers wrote: chunk threadIdx.x comes from rank threadIdx.x / slice
      const uint4 got = reinterpret_cast<const uint4*>(tile)[threadIdx.x];
      seen += got.x;
      if (errors && (got.x != static_cast<unsigned>(s) || got.y != threadIdx.x / slice)) count_error(errors);
    }
  }
  if (seen == 0xFFFFFFFFu && errors) count_error(errors);  // keeps the reads
}

// The K-split cluster exchange (sm_90), with flags (each CTA waits for the producers of its K slice) or the
// arrival counter. Grid: n CTAs in clusters of C = %cluster_nctarank; CTA x (rank r) owns units
// [x*U, x*U + U), U = hidden / n, and multiplies K slice r (cols = hidden / C columns of h). h_buf:
// [kRing][kB][hidden] bf16. Dynamic shared memory: the partials [2][C][G*U*kB] fp32 (by step parity, one
// slot per source rank), then the slice of h, [kB][cols + kVec] bf16.
// Why three h epochs (kRing) and not two: with flags a CTA waits only for the producers of its own slice, not
// for the readers of its units. But those producers passed the cluster barrier of their previous step, so
// every CTA of their clusters (every rank, so every slice) had waited for all producers of the step before:
// when a CTA writes epoch s + 1 every CTA has finished step s - 2, where epoch s - 2 was last read.
// The partials are double-buffered by parity: a peer writes slot s & 1 again in step s + 2, after the
// barrier of step s + 1, which the owner reaches after its reads of step s.
template <Sync kSync>
SYNC_COST_KERNEL ksplit_step_kernel(unsigned* flags, __nv_bfloat16* h_buf, long long steps, unsigned* errors,
                                    int hidden) {
  FR_SHARED_DYNAMIC(unsigned char, smem);
  const int rank = static_cast<int>(fr_ptx::cluster_ctarank()), size = static_cast<int>(fr_ptx::cluster_nctarank());
  const int n = static_cast<int>(gridDim.x), x = static_cast<int>(blockIdx.x), tid = static_cast<int>(threadIdx.x);
  const int units = hidden / n, cols = hidden / size, k_lo = rank * cols, row_pad = cols + kVec;
  const int part = kGates * units * kB;  // fp32 values of one CTA's gate sums: rows (gate, unit) x batch
  float* parts = reinterpret_cast<float*>(smem);
  __nv_bfloat16* hs = reinterpret_cast<__nv_bfloat16*>(parts + 2 * size * part);
  const int first = k_lo / units, last = smaller((k_lo + cols - 1) / units, n - 1);  // producers of the slice
  if (tid == 0) publish<kSync, 1>(flags, x, 1u);
  float seen = 0.f;

  for (long long s = 0; s < steps; ++s) {
    const unsigned epoch = static_cast<unsigned>(s + 1);
    // 1. wait for epoch s + 1 of the slice's producers (warp 0) or of every CTA (thread 0)
    if (kSync == Sync::FlagsAll && tid < 32) wait_flags<Poll::AcquireSleep>(flags, first, last - first + 1, n, epoch);
    if (kSync == Sync::Counter && tid == 0) wait_all_arrived<Sync::Counter, Poll::AcquireSleep, 1>(flags, x, n, epoch);
    __syncthreads();
    // 2. the CTA's K slice of every batch row of h_{t-1}: global -> shared
    const __nv_bfloat16* h_prev = h_buf + (s % kRing) * kB * hidden;
    const int chunks = cols / kVec;
    for (int c = tid; c < kB * chunks; c += kThreads) {
      const int b = c / chunks, k = (c % chunks) * kVec;
      fr_ptx::cp_async_cg16(hs + b * row_pad + k, h_prev + b * hidden + k_lo + k);
    }
    fr_ptx::cp_async_wait_all();
    __syncthreads();
    if (errors)
      for (int i = tid; i < kB * cols; i += kThreads)
        if (__bfloat162float(hs[(i / cols) * row_pad + i % cols]) != h_value(s, i / cols, k_lo + i % cols))
          count_error(errors);
    // 3. partial gate sums of every (gate, unit) row of the cluster over this slice, into the owner's slot
    //    `rank` of buffer s & 1; value (row, b) for owner q: h_{t-1}[b][k_lo + (7 row + 3 q) % cols] + rank,
    //    one shared-memory read each (the MMAs' stand-in), 4 batch rows per float4 store
    float* slots = parts + (s & 1) * size * part;
    for (int e = 4 * tid; e < size * part; e += 4 * kThreads) {
      const int q = e / part, i = e % part, row = i / kB, b = i % kB;
      const int k = (7 * row + 3 * q) % cols;
      float4 v;
      v.x = __bfloat162float(hs[(b + 0) * row_pad + k]) + static_cast<float>(rank);
      v.y = __bfloat162float(hs[(b + 1) * row_pad + k]) + static_cast<float>(rank);
      v.z = __bfloat162float(hs[(b + 2) * row_pad + k]) + static_cast<float>(rank);
      v.w = __bfloat162float(hs[(b + 3) * row_pad + k]) + static_cast<float>(rank);
      float* dst = slots + rank * part + i;
      if (q != rank) dst = fr_ptx::map_shared_rank(dst, static_cast<unsigned>(q));
      *reinterpret_cast<float4*>(dst) = v;
    }
    // 4. every peer's partials for this CTA's rows are in
    if (SYNC_COST_MUTATION != 2) {
      fr_ptx::cluster_arrive_release();
      fr_ptx::cluster_wait_acquire();
    }
    // 5. the gate sums of this CTA's rows: the C partials added (the cell math's input)
    for (int i = tid; i < part; i += kThreads) {
      float sum = 0.f;
      for (int src = 0; src < size; ++src) sum += slots[src * part + i];
      seen += sum;
      if (errors) {
        const int row = i / kB, b = i % kB, k = (7 * row + 3 * rank) % cols;
        float expect = 0.f;
        for (int src = 0; src < size; ++src) expect += h_value(s, b, src * cols + k) + static_cast<float>(src);
        if (sum != expect) count_error(errors);
      }
    }
    // 6. this CTA's units of h_t into ring slot s + 1, then the release
    __nv_bfloat16* h_next = h_buf + ((s + 1) % kRing) * kB * hidden;
    for (int i = tid; i < units * kB; i += kThreads) {
      const int b = i / units, u = x * units + i % units;
      h_next[b * hidden + u] = __float2bfloat16(h_value(s + 1, b, u));
    }
    __syncthreads();
    if (tid == 0) publish<kSync, 1>(flags, x, static_cast<unsigned>(s + 2));
  }
  if (seen < 0.f && errors) count_error(errors);  // keeps the reads (the sums are never negative)
}

// Shared memory of ksplit_step_kernel for n CTAs in clusters of `size`.
constexpr size_t ksplit_smem_bytes(int hidden, int n, int size) {
  return sizeof(float) * 2 * size * kGates * (hidden / n) * kB + 2 * kB * (hidden / size + kVec);
}

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
