// The kernels of benchmarks/sync_cost.cu (its header comment describes the cases): the step kernels of
// the grid, cluster and k-split cases with the constants, flag layout and poll helpers they share. Kernel
// bodies and their device helpers only, as csrc/cuda's *_kernels.cuh: the case tables, the launches and the
// two main()s (the GPU's, the emulator's) are in sync_cost.cu.
#pragma once

#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

#include <thread>

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
