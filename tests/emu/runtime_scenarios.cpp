// Small kernels that exercise the emulator (csrc/cuda/emu/), run by tests/test_cuda_emu_runtime.py.
//
//   runtime_scenarios <scenario> [bug | big | bigbug | skip=N] [stall_seconds]
//
// Correct scenarios check their own result against a host computation and print their outputs in hex (the
// test compares repeated runs bitwise); exit 0 when right, 1 when wrong. With "bug", a scenario plants the
// named defect instead (a missing barrier, an overrun, ...) and the test requires the emulator or a sanitizer
// to catch it.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"  // the cluster wrappers

namespace {

bool g_bug = false;
bool g_big = false;  // a launch of more threads than ThreadSanitizer tracks one by one (kTsanIdentities)
int g_skip = 0;  // barrier_loop: which barrier the planted bug removes (1-4), 0: none
double g_stall = 20;

int check(bool ok, const char* what) {
  std::printf("%s: %s\n", what, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}

void print_hex(const char* name, const std::vector<float>& v) {
  std::printf("%s", name);
  for (float x : v) {
    unsigned bits;
    std::memcpy(&bits, &x, 4);
    std::printf(" %08x", bits);
  }
  std::printf("\n");
}

fr_emu::LaunchConfig config(unsigned blocks, unsigned threads, bool cooperative = false, size_t dynamic_smem = 0) {
  fr_emu::LaunchConfig cfg;
  cfg.grid = dim3(blocks);
  cfg.block = dim3(threads);
  cfg.cooperative = cooperative;
  cfg.dynamic_smem = dynamic_smem;
  cfg.stall_seconds = g_stall;
  return cfg;
}

// ---- a block reduction through shared memory: static array for the tree, dynamic buffer for staging --------
FR_KERNEL void reduce_kernel(const float* in, float* out) {
  FR_SHARED_ARRAY(float, tree, 128);
  FR_SHARED_DYNAMIC(float, staging);
  const unsigned t = threadIdx.x;
  staging[t] = in[blockIdx.x * blockDim.x + t] * 2.0f;
  __syncthreads();
  tree[t] = staging[blockDim.x - 1 - t];  // another warp's element: needs the barrier above
  __syncthreads();
  for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
    if (t < k) tree[t] += tree[t + k];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = tree[0];
}

int reduce() {
  const unsigned blocks = 5, threads = 128;
  std::vector<float> in(blocks * threads), out(blocks, NAN);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>((i * 37) % 101) * 0.25f;
  fr_emu::launch(config(blocks, threads, false, threads * sizeof(float)), reduce_kernel, in.data(), out.data());
  bool ok = true;
  for (unsigned b = 0; b < blocks; ++b) {
    double expect = 0;
    for (unsigned i = 0; i < threads; ++i) expect += 2.0 * in[b * threads + i];
    ok &= out[b] == static_cast<float>(expect);  // small multiples of 0.25: exact in float
  }
  print_hex("out", out);
  return check(ok, "reduce");
}

// ---- grid-sync ping-pong: blocks exchange values through global memory, double-buffered ---------------------
FR_KERNEL void pingpong_kernel(float* buf, float* out, int rounds) {
  const unsigned b = blockIdx.x, n = gridDim.x, t = threadIdx.x, w = blockDim.x;
  float mine = static_cast<float>(b * w + t);
  for (int r = 0; r < rounds; ++r) {
    float* slot = buf + (r % 2) * n * w;
    slot[b * w + t] = mine;
    if (!(g_bug && r == 1)) fr_grid_sync();  // the planted bug: one missing grid sync
    mine = 0.5f * mine + slot[((b + 1) % n) * w + (w - 1 - t)];
  }
  out[b * w + t] = mine;
}

int pingpong() {
  const unsigned blocks = g_big ? 8 : 4, threads = g_big ? 128 : 64;
  const int rounds = 6;
  std::vector<float> buf(2 * blocks * threads, NAN), out(blocks * threads, NAN), expect(blocks * threads);
  for (unsigned i = 0; i < expect.size(); ++i) expect[i] = static_cast<float>(i);
  for (int r = 0; r < rounds; ++r) {
    std::vector<float> next(expect.size());
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < threads; ++t)
        next[b * threads + t] = 0.5f * expect[b * threads + t] + expect[((b + 1) % blocks) * threads + threads - 1 - t];
    expect = next;
  }
  fr_emu::launch(config(blocks, threads, true), pingpong_kernel, buf.data(), out.data(), rounds);
  print_hex("out", out);
  return check(out == expect, "pingpong");
}

// ---- every ordering barrier in a loop: TSan must see no race over many rounds (round-parity objects) ----------
FR_KERNEL void barrier_loop_kernel(float* g, float* out, int rounds) {
  FR_SHARED_ARRAY(float, s, 128);
  const unsigned t = threadIdx.x, lane = t % 32, w = t / 32, n = blockDim.x, b = blockIdx.x, nb = gridDim.x;
  float acc = 0;
  for (int r = 0; r < rounds; ++r) {
    s[t] = static_cast<float>(r) + static_cast<float>(lane);
    if (g_skip != 1) __syncwarp();
    acc += s[w * 32 + 31 - lane];
    __syncwarp();
    const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    s[t] = acc;
    if (g_skip != 2) __syncwarp(half);
    acc += s[w * 32 + (lane < 16 ? 15 - lane : 47 - lane)] * 0.5f;
    __syncwarp(half);
    float all[32];
    fr_emu::warp_allgather(0xffffffffu, &acc, sizeof acc, all);
    acc += all[(lane + 3) % 32] * 0.125f;
    s[t] = acc;
    if (g_skip != 3) __syncthreads();
    acc += s[n - 1 - t] * 0.5f;
    __syncthreads();
    g[b * n + t] = acc;  // one buffer, two grid syncs per round
    if (g_skip != 4) fr_grid_sync();
    acc = 0.25f * acc + g[((b + 1) % nb) * n + (n - 1 - t)];
    fr_grid_sync();
  }
  out[b * n + t] = acc;
}

int barrier_loop() {
  const unsigned blocks = 3, threads = 128;
  std::vector<float> g(blocks * threads, NAN), out(blocks * threads, NAN);
  fr_emu::launch(config(blocks, threads, true), barrier_loop_kernel, g.data(), out.data(), 12);
  bool ok = true;
  for (float x : out) ok &= std::isfinite(x);
  print_hex("out", out);
  return check(ok, "barrier_loop");
}

// ---- shuffles and votes against values computed on the host ----------------------------------------------
FR_KERNEL void warp_ops_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32), tid = static_cast<int>(threadIdx.x);
  const float f = 1.5f * tid;
  const double d = -0.25 * tid;
  int k = 0;
  int* o = out + tid * 16;
  o[k++] = static_cast<int>(__activemask());  // no lane has exited yet
  o[k++] = __shfl_sync(0xffffffffu, tid * 3, (lane * 7) % 32);
  o[k++] = static_cast<int>(__shfl_up_sync(0xffffffffu, f, 3));
  o[k++] = static_cast<int>(__shfl_down_sync(0xffffffffu, d, 5) * 4);
  o[k++] = static_cast<int>(__shfl_xor_sync(0xffffffffu, 1000u + tid, 6));
  o[k++] = static_cast<int>(__shfl_sync(0xffffffffu, 100LL * tid, 3, 8));         // width 8
  o[k++] = static_cast<int>(__shfl_xor_sync(0xffffffffu, tid, 4, 4));             // width 4: beyond segment
  o[k++] = static_cast<int>(__shfl_down_sync(0xffffffffu, 7ULL * tid, 2, 16));
  o[k++] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[k++] = __any_sync(0xffffffffu, tid == 40);
  o[k++] = __all_sync(0xffffffffu, lane < 31);
  if (lane < 16) {  // half-warp collectives with their own mask
    o[k++] = __shfl_xor_sync(0x0000ffffu, tid, 1);
    o[k++] = static_cast<int>(__ballot_sync(0x0000ffffu, lane & 1));
  } else {
    o[k++] = __shfl_up_sync(0xffff0000u, tid, 1, 16);
    o[k++] = __all_sync(0xffff0000u, 1);
  }
  __syncwarp();
}

int warp_ops() {
  const int threads = 64;
  std::vector<int> out(threads * 16, -1), expect(threads * 16, -1);
  fr_emu::launch(config(1, threads), warp_ops_kernel, out.data());
  for (int tid = 0; tid < threads; ++tid) {
    const int lane = tid % 32, base = tid - lane;
    int* e = expect.data() + tid * 16;
    int k = 0;
    e[k++] = -1;  // every lane live
    e[k++] = (base + (lane * 7) % 32) * 3;
    e[k++] = static_cast<int>(1.5f * (lane >= 3 ? tid - 3 : tid));
    e[k++] = static_cast<int>(-0.25 * (lane + 5 < 32 ? tid + 5 : tid) * 4);
    e[k++] = 1000 + (base + (lane ^ 6));
    e[k++] = 100 * (base + (lane & ~7) + 3);
    e[k++] = (lane ^ 4) <= (lane | 3) ? base + (lane ^ 4) : tid;  // a later segment is out of reach: own value
    e[k++] = 7 * ((lane % 16) + 2 < 16 ? tid + 2 : tid);
    unsigned ballot = 0;
    for (int j = 0; j < 32; ++j) ballot |= (j % 3 == 0 ? 1u : 0u) << j;
    e[k++] = static_cast<int>(ballot);
    e[k++] = (tid / 32 == 1) ? 1 : 0;
    e[k++] = 0;
    if (lane < 16) {
      e[k++] = base + (lane ^ 1);
      e[k++] = static_cast<int>(0xaaaau);
    } else {
      e[k++] = lane > 16 ? tid - 1 : tid;
      e[k++] = 1;
    }
  }
  for (int tid = 0; tid < threads; ++tid)
    for (int k = 0; k < 16; ++k)
      if (out[tid * 16 + k] != expect[tid * 16 + k]) {
        std::printf("thread %d value %d: got %d, expected %d\n", tid, k, out[tid * 16 + k], expect[tid * 16 + k]);
        return check(false, "warp_ops");
      }
  return check(true, "warp_ops");
}

// ---- atomics from every thread of several blocks -----------------------------------------------------------
FR_KERNEL void atomics_kernel(int* counter, unsigned long long* sum, float* fsum, double* dsum, int* maxv, int* minv,
                              unsigned* bits, int* cas_counter) {
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(counter, 1);
  atomicSub(counter, 2);
  atomicAdd(sum, static_cast<unsigned long long>(g));
  atomicAdd(fsum, 0.5f);
  atomicAdd(dsum, 0.25);
  atomicMax(maxv, (g * 7919) % 1000);
  atomicMin(minv, 500 - (g * 31) % 700);
  atomicOr(bits, 1u << (g % 32));
  for (;;) {  // an increment through compare-and-swap
    const int old = atomicCAS(cas_counter, -1, -1);  // an atomic read (a plain read would race)
    if (atomicCAS(cas_counter, old, old + 1) == old) break;
  }
}

int atomics() {
  const int blocks = 6, threads = 96, n = blocks * threads;
  int counter = 0, maxv = -1, minv = 1 << 30, cas_counter = 0;
  unsigned long long sum = 0;
  float fsum = 0;
  double dsum = 0;
  unsigned bits = 0;
  fr_emu::launch(config(blocks, threads), atomics_kernel, &counter, &sum, &fsum, &dsum, &maxv, &minv, &bits,
                 &cas_counter);
  int emax = -1, emin = 1 << 30;
  for (int g = 0; g < n; ++g) {
    emax = std::max(emax, (g * 7919) % 1000);
    emin = std::min(emin, 500 - (g * 31) % 700);
  }
  const bool ok = counter == -n && sum == 1ull * n * (n - 1) / 2 && fsum == 0.5f * n && dsum == 0.25 * n &&
                  maxv == emax && minv == emin && bits == 0xffffffffu && cas_counter == n;
  std::printf("counter %d sum %llu fsum %g dsum %g max %d min %d bits %08x cas %d\n", counter, sum, fsum, dsum, maxv,
              minv, bits, cas_counter);
  return check(ok, "atomics");
}

// ---- a flag between blocks: data, __threadfence, atomic flag ... atomic flag, __threadfence, data ------------------
FR_KERNEL void flag_kernel(float* data, int* flag, float* out) {
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 0) {
    for (int i = 0; i < 8; ++i) data[i] = 1.5f * i;
    if (!g_bug) __threadfence();  // the planted bug: no fence between the data and the flag
    atomicExch(flag, 1);
  } else {
    while (atomicCAS(flag, 1, 1) != 1) {
    }
    if (!g_bug) __threadfence();
    float sum = 0;
    for (int i = 0; i < 8; ++i) sum += data[i];
    out[0] = sum;
  }
}

int flag() {
  std::vector<float> data(8, NAN);
  int flag = 0;
  float out = NAN;
  fr_emu::launch(config(2, 32), flag_kernel, data.data(), &flag, &out);
  return check(out == 42.0f, "flag");
}

// ---- warp_allgather: full and partial masks ------------------------------------------------------------------
FR_KERNEL void allgather_kernel(long long* out) {
  const int lane = fr_emu::lane_id(), tid = static_cast<int>(threadIdx.x);
  long long all[32];
  for (long long& x : all) x = -7;
  const long long mine = 1000LL * tid + lane;
  fr_emu::warp_allgather(0xffffffffu, &mine, sizeof mine, all);
  long long acc = 0;
  for (int j = 0; j < 32; ++j) acc += all[j] * (j + 1);
  long long part[32];
  for (long long& x : part) x = -7;
  const unsigned mask = lane % 2 ? 0xaaaaaaaau : 0x55555555u;  // odd and even lanes gather separately
  fr_emu::warp_allgather(mask, &mine, sizeof mine, part);
  for (int j = 0; j < 32; ++j) acc += part[j] * (j + 3) * 1000003LL;
  out[tid] = acc;
}

int allgather() {
  const int threads = 64;
  std::vector<long long> out(threads, 0);
  fr_emu::launch(config(1, threads), allgather_kernel, out.data());
  bool ok = true;
  for (int tid = 0; tid < threads; ++tid) {
    const int lane = tid % 32, base = tid - lane;
    long long acc = 0;
    for (int j = 0; j < 32; ++j) acc += (1000LL * (base + j) + j) * (j + 1);
    for (int j = 0; j < 32; ++j)
      acc += ((j % 2 == lane % 2) ? 1000LL * (base + j) + j : -7) * (j + 3) * 1000003LL;
    ok &= out[tid] == acc;
  }
  return check(ok, "allgather");
}

// ---- shared memory starts as NaN: a read of an element nobody wrote is visible ---------------------------------
FR_KERNEL void nan_smem_kernel(float* out) {
  FR_SHARED_ARRAY(float, s, 64);
  FR_SHARED_DYNAMIC(double, dyn);
  const unsigned t = threadIdx.x;
  if (t < 63) s[t] = 1.0f;  // element 63 never written
  __syncthreads();
  out[blockIdx.x * 64 + t] = s[t] + static_cast<float>(dyn[t % 4]);
}

int nan_smem() {
  std::vector<float> out(128, 0.0f);
  fr_emu::launch(config(2, 64, false, 4 * sizeof(double)), nan_smem_kernel, out.data());
  unsigned bits;
  std::memcpy(&bits, &out[127], 4);
  std::printf("out[127] bits %08x\n", bits);
  bool ok = true;
  for (float x : out) ok &= std::isnan(x);  // the dynamic buffer is NaN everywhere, s[63] too
  return check(ok, "nan_smem");
}

// ---- planted: a shared buffer reused without the __syncthreads that separates the phases ------------------------
FR_KERNEL void smem_reuse_kernel(const float* a, const float* b, float* out) {
  FR_SHARED_ARRAY(float, s, 64);
  const unsigned t = threadIdx.x;
  s[t] = a[t];
  __syncthreads();
  const float first = s[t ^ 1];
  if (!g_bug) __syncthreads();  // every thread has read phase 1 before phase 2 overwrites it
  s[t] = b[t];
  __syncthreads();
  out[t] = first * 10.0f + s[t ^ 1];
}

int smem_reuse() {
  std::vector<float> a(64), b(64), out(64, NAN), expect(64);
  for (int i = 0; i < 64; ++i) {
    a[i] = static_cast<float>(i);
    b[i] = static_cast<float>(100 + i);
  }
  for (int i = 0; i < 64; ++i) expect[i] = a[i ^ 1] * 10.0f + b[i ^ 1];
  fr_emu::launch(config(1, 64), smem_reuse_kernel, a.data(), b.data(), out.data());
  return check(out == expect, "smem_reuse");
}

// ---- planted: lanes exchange through shared memory without __syncwarp -------------------------------------------
FR_KERNEL void syncwarp_kernel(float* out) {
  FR_SHARED_ARRAY(float, s, 256);
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  s[threadIdx.x] = static_cast<float>(lane) * 3.0f;
  if (!g_bug) __syncwarp();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[warp * 32 + 31 - lane];
}

int syncwarp() {
  const unsigned blocks = g_big ? 4 : 1, threads = g_big ? 256 : 32;
  std::vector<float> out(blocks * threads, 0.0f), expect(blocks * threads);
  for (unsigned i = 0; i < expect.size(); ++i) expect[i] = static_cast<float>(31 - i % 32) * 3.0f;
  fr_emu::launch(config(blocks, threads), syncwarp_kernel, out.data());
  return check(out == expect, "syncwarp");
}

// ---- planted: a global index one past the end (ASan) ---------------------------------------------------------
FR_KERNEL void oob_global_kernel(float* out, int n) {
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g < n + (g_bug ? 1 : 0)) out[g] = 1.0f;
}

int oob_global() {
  const int n = 100;
  float* out = new float[n];
  fr_emu::launch(config(2, 64), oob_global_kernel, out, n);
  const bool ok = out[0] == 1.0f && out[n - 1] == 1.0f;
  delete[] out;
  return check(ok, "oob_global");
}

// ---- planted: one element past a static shared array, or past the dynamic buffer (ASan) ------------------------
FR_KERNEL void smem_overrun_kernel(float* out, int dynamic) {
  FR_SHARED_ARRAY(float, s, 48);
  FR_SHARED_DYNAMIC(float, dyn);
  const unsigned t = threadIdx.x;
  float* buf = dynamic ? dyn : s;
  buf[t] = static_cast<float>(t);
  __syncthreads();
  if (t == 0) out[0] = buf[g_bug ? 48 : 47];
}

int smem_overrun(int dynamic) {
  float out = 0;
  fr_emu::launch(config(1, 48, false, 48 * sizeof(float)), smem_overrun_kernel, &out, dynamic);
  std::printf("out %g\n", out);
  return check(out == 47.0f, "smem_overrun");
}

// ---- misuse: deadlock, grid sync without a cooperative launch, an oversized cooperative grid, bad masks ----------
FR_KERNEL void skip_grid_sync_kernel(float* buf) {
  if (blockIdx.x == 2) return;  // this block never arrives: the others wait forever
  buf[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
  fr_grid_sync();
}

int skip_grid_sync() {
  std::vector<float> buf(4 * 64);
  fr_emu::launch(config(4, 64, true), skip_grid_sync_kernel, buf.data());
  return check(true, "skip_grid_sync");
}

FR_KERNEL void grid_sync_kernel(float* buf) {
  buf[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
  fr_grid_sync();
}

int grid_sync(bool cooperative) {
  std::vector<float> buf(2 * 64);
  fr_emu::launch(config(2, 64, cooperative), grid_sync_kernel, buf.data());
  return check(true, "grid_sync");
}

FR_KERNEL void grid_sync_static_smem_kernel(float* buf) {
  FR_SHARED_ARRAY(float, s, 512);  // 2 KB more per block, known only when the kernel runs
  s[threadIdx.x] = 1.0f;
  buf[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
  fr_grid_sync();
}

// A small device: 2 SMs of 256 threads, 64 KB of shared memory each. Blocks of 64 threads with 20 KB dynamic
// shared memory: 4 fit per SM by threads, 3 by shared memory ((20 + 1) KB each) -> at most 6 blocks at once;
// with 2 KB of static shared memory more, 2 per SM -> 4.
int cooperative_limit(unsigned blocks, bool static_smem) {
  fr_emu::LaunchConfig cfg = config(blocks, 64, true, 20 * 1024);
  cfg.device.sm_count = 2;
  cfg.device.max_threads_per_sm = 256;
  cfg.device.smem_per_sm = 64 * 1024;
  std::vector<float> buf(blocks * 64);
  if (static_smem)
    fr_emu::launch(cfg, grid_sync_static_smem_kernel, buf.data());
  else
    fr_emu::launch(cfg, grid_sync_kernel, buf.data());
  return check(true, "cooperative_limit");
}

FR_KERNEL void mask_exited_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (lane >= 16) return;
  out[lane] = __shfl_sync(0xffffffffu, lane, 0);  // names lanes 16-31, which have exited
}

FR_KERNEL void mask_diverged_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (lane < 16) out[lane] = __shfl_sync(0xffffffffu, lane, 0);  // lanes 16-31 wait at __syncthreads
  __syncthreads();
}

int mask_error(bool exited) {
  std::vector<int> out(32);
  if (exited)
    fr_emu::launch(config(1, 32), mask_exited_kernel, out.data());
  else
    fr_emu::launch(config(1, 32), mask_diverged_kernel, out.data());
  return check(true, "mask");
}

// ---- clusters: blocks exchange through each other's shared memory across the cluster barrier ---------------
// Grid (4,2) of 64 threads in clusters of (2,2): 2 clusters of 4 blocks ("big": grid (32,2), 16 clusters,
// more threads than one wave of a non-cooperative launch, so waves must hold whole clusters). Round r writes
// this block's slot (dynamic shared memory on even rounds, a static array on odd ones), waits at the cluster
// barrier, then reads the next rank's slot through mapa. The last barrier is split: arrive, then the result
// store, then wait — no block exits while another may still read its shared memory.
constexpr unsigned kClusterThreads = 64;

FR_KERNEL void cluster_exchange_kernel(float* out, unsigned* ranks, int rounds) {
  FR_SHARED_DYNAMIC(float, dyn);
  FR_SHARED_ARRAY(float, stat, kClusterThreads);
  const unsigned rank = fr_ptx::cluster_ctarank(), n = fr_ptx::cluster_nctarank(), t = threadIdx.x;
  const unsigned b = blockIdx.y * gridDim.x + blockIdx.x;
  if (t == 0) ranks[b] = rank * 100 + n;
  float mine = static_cast<float>(b * kClusterThreads + t);
  for (int r = 0; r < rounds; ++r) {
    float* slot = r % 2 ? stat : dyn;
    slot[t] = mine;
    if (!(g_bug && r == 1)) fr_ptx::cluster_sync();  // the planted bug: one missing cluster barrier
    const float* peer = fr_ptx::map_shared_rank(slot, (rank + 1) % n);
    mine = 0.5f * mine + peer[kClusterThreads - 1 - t];
  }
  fr_ptx::cluster_arrive_release();
  out[b * kClusterThreads + t] = mine;
  fr_ptx::cluster_wait_acquire();
}

int cluster_exchange() {
  const dim3 grid(g_big ? 32 : 4, 2), cluster(2, 2);
  const unsigned blocks = grid.x * grid.y, n = cluster.x * cluster.y, T = kClusterThreads;
  const int rounds = 5;
  // host model: the rank of each block and the block of each (cluster, rank)
  std::vector<unsigned> rank_of(blocks), peer_of(blocks);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx)
      rank_of[by * grid.x + bx] = bx % cluster.x + cluster.x * (by % cluster.y);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      const unsigned next = (rank_of[by * grid.x + bx] + 1) % n;
      const unsigned px = bx / cluster.x * cluster.x + next % cluster.x, py = by / cluster.y * cluster.y + next / cluster.x;
      peer_of[by * grid.x + bx] = py * grid.x + px;
    }
  std::vector<float> expect(blocks * T), out(blocks * T, NAN);
  for (unsigned i = 0; i < expect.size(); ++i) expect[i] = static_cast<float>(i);
  for (int r = 0; r < rounds; ++r) {
    std::vector<float> next(expect.size());
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < T; ++t) next[b * T + t] = 0.5f * expect[b * T + t] + expect[peer_of[b] * T + T - 1 - t];
    expect = next;
  }
  std::vector<unsigned> ranks(blocks, ~0u);
  fr_emu::LaunchConfig cfg;
  cfg.grid = grid;
  cfg.block = dim3(T);
  cfg.cluster = cluster;
  cfg.dynamic_smem = T * sizeof(float);
  cfg.stall_seconds = g_stall;
  fr_emu::launch(cfg, cluster_exchange_kernel, out.data(), ranks.data(), rounds);
  bool ranks_ok = true;
  for (unsigned b = 0; b < blocks; ++b) ranks_ok = ranks_ok && ranks[b] == rank_of[b] * 100 + n;
  print_hex("out", out);
  return check(ranks_ok && out == expect, "cluster_exchange");
}

// ---- cluster misuse: the grid not a whole number of clusters, too many blocks, a wait without an arrive,
// a rank outside the cluster, and a cluster of 16 with the non-portable opt-in (allowed) ------------------------
FR_KERNEL void cluster_misuse_kernel(int what) {
  if (what == 0) fr_ptx::cluster_wait_acquire();
  if (what == 1) {
    FR_SHARED_ARRAY(float, s, 32);
    s[threadIdx.x] = 1.0f;
    (void)fr_ptx::map_shared_rank(s, fr_ptx::cluster_nctarank());
  }
  if (what == 2) fr_ptx::cluster_sync();
}

int cluster_misuse(unsigned grid, unsigned cluster, bool non_portable, int what) {
  fr_emu::LaunchConfig cfg;
  cfg.grid = dim3(grid);
  cfg.block = dim3(32);
  cfg.cluster = dim3(cluster);
  cfg.non_portable_cluster_size = non_portable;
  cfg.stall_seconds = g_stall;
  fr_emu::launch(cfg, cluster_misuse_kernel, what);
  return check(true, "cluster_misuse");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <scenario> [bug] [stall_seconds]\n", argv[0]);
    return 2;
  }
  const std::string s = argv[1];
  const std::string variant = argc > 2 ? argv[2] : "";
  g_bug = variant.find("bug") != std::string::npos;
  g_big = variant.find("big") != std::string::npos;
  if (argc > 2 && std::string(argv[2]).rfind("skip=", 0) == 0) g_skip = std::atoi(argv[2] + 5);
  if (argc > 3) g_stall = std::atof(argv[3]);
  if (s == "reduce") return reduce();
  if (s == "pingpong") return pingpong();
  if (s == "barrier_loop") return barrier_loop();
  if (s == "warp_ops") return warp_ops();
  if (s == "atomics") return atomics();
  if (s == "allgather") return allgather();
  if (s == "flag") return flag();
  if (s == "nan_smem") return nan_smem();
  if (s == "smem_reuse") return smem_reuse();
  if (s == "syncwarp") return syncwarp();
  if (s == "oob_global") return oob_global();
  if (s == "smem_overrun") return smem_overrun(0);
  if (s == "dynamic_smem_overrun") return smem_overrun(1);
  if (s == "skip_grid_sync") return skip_grid_sync();
  if (s == "grid_sync_cooperative") return grid_sync(true);
  if (s == "grid_sync_not_cooperative") return grid_sync(false);
  if (s == "cooperative_fits") return cooperative_limit(6, false);
  if (s == "cooperative_too_large") return cooperative_limit(7, false);
  if (s == "cooperative_static_fits") return cooperative_limit(4, true);
  if (s == "cooperative_static_too_large") return cooperative_limit(5, true);
  if (s == "mask_exited") return mask_error(true);
  if (s == "mask_diverged") return mask_error(false);
  if (s == "cluster_exchange") return cluster_exchange();
  if (s == "cluster_16_non_portable") return cluster_misuse(32, 16, true, 2);
  if (s == "cluster_not_dividing") return cluster_misuse(6, 4, false, 2);
  if (s == "cluster_16_portable") return cluster_misuse(32, 16, false, 2);
  if (s == "cluster_wait_without_arrive") return cluster_misuse(4, 2, false, 0);
  if (s == "cluster_rank_outside") return cluster_misuse(4, 2, false, 1);
  std::fprintf(stderr, "unknown scenario %s\n", s.c_str());
  return 2;
}
