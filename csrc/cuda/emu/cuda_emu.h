// The CUDA names kernel headers use, for a host C++17 compiler: the emulator's public header.
//
// Included by csrc/cuda/compat.cuh under -DFUSED_RNN_EMULATE. A launch (fr_emu::launch) runs every CUDA thread
// of the grid on the CPU: one OS thread per warp, the warp's 32 lanes as fibers of that thread that switch only
// at barriers, warp collectives and exit (csrc/cuda/emu/README.md). The intrinsics below are thin: they forward
// to the runtime (csrc/cuda/emu/*.cpp, compiled in by tests/emu_build.py), which knows the calling lane.
//
// Every blocking intrinsic takes the caller's file and line as hidden default arguments (__builtin_FILE /
// __builtin_LINE, supported by g++ and clang++), so that a deadlock or membermask report names the call site.
#pragma once

#include <math.h>  // expf, tanhf, fminf, ... in the global namespace, as CUDA spells them

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- vector types, half precision: the CUDA toolkit's host-compilable headers when on the include path ------
#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>) && !defined(FR_EMU_OWN_HALF)
#ifdef FR_EMU_RUNTIME_SOURCE
#include <vector_types.h>  // the runtime's own sources need only dim3/uint3: skip the large half headers
#else
#include <cuda_bf16.h>  // also brings vector_types.h (dim3, uint3) and host_defines.h (__host__, ...)
#include <cuda_fp16.h>
#endif
#else
#include "half.h"  // the emulator's own dim3, uint3, __half, __nv_bfloat16
#endif

#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#ifndef __restrict__
#define __restrict__ __restrict
#endif
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

namespace fr_emu {

// The device a launch pretends to run on: what the co-residency check of a cooperative launch uses.
struct Device {  // defaults: one H100/H200 SM budget
  int sm_count = 132;
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
  size_t smem_per_sm = 228 * 1024;
  size_t smem_per_block_optin = 227 * 1024;
  int regs_per_sm = 65536;
};

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem = 0;
  bool cooperative = false;    // cudaLaunchCooperativeKernel: refused when the grid could not be co-resident on
                               // `device` (threads, blocks, shared memory, registers per SM)
  Device device{};
  int regs_per_thread = 0;     // 0: not checked
  // Thread block clusters (sm_90, cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension): blocks in
  // groups of cluster.x * cluster.y * cluster.z that run together, share a hardware barrier and map each
  // other's shared memory. The grid must be a whole number of clusters; at most 8 blocks per cluster, 16 with
  // non_portable_cluster_size (cudaFuncAttributeNonPortableClusterSizeAllowed).
  dim3 cluster{1, 1, 1};
  bool non_portable_cluster_size = false;
  double stall_seconds = 20;   // no barrier progress for this long => deadlock report on stderr, then exit(86)
};

namespace detail {
// Prints "fr_emu: error: <message>" and exits 87: a use of CUDA that the GPU would refuse or leave undefined
// (also for emulations built on the runtime, such as ptx.cuh's).
[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

// Runs body() once per CUDA thread of the launch (csrc/cuda/emu/launch.cpp). Returns when every thread exited.
void launch_impl(const LaunchConfig& cfg, const std::function<void()>& body);

// The calling lane's coordinates, set by its warp thread before each switch into a lane (thread-local: every
// lane of a warp runs on the warp's OS thread).
extern thread_local uint3 tls_thread_idx;
extern thread_local uint3 tls_block_idx;
extern thread_local uint3 tls_block_dim;
extern thread_local uint3 tls_grid_dim;

// Barriers and warp collectives (csrc/cuda/emu/lane.cpp). `file`/`line`: the call site, for reports.
void syncthreads(const char* file, int line);
void grid_sync(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
enum class Shuffle { Idx, Up, Down, Xor };
uint64_t shuffle(unsigned mask, uint64_t value, Shuffle kind, int arg, int width, const char* file, int line);
enum class Vote { Ballot, Any, All };
unsigned vote(unsigned mask, bool predicate, Vote kind, const char* file, int line);
unsigned active_mask();
void* shared_static(size_t bytes, const void* site);  // the block's buffer for `site`, 0xFF-filled at first use
void* shared_dynamic();
void fence();  // __threadfence*: a sequentially consistent fence (and, under TSan, its happens-before)
// Clusters (cluster.cpp): the block's rank in its cluster (%cluster_ctarank, x fastest), the cluster's size
// (%cluster_nctarank); the split cluster barrier (barrier.cluster.arrive.release / wait.acquire: every
// thread of the cluster arrives, then waits until all have; exited threads count as arrived); and mapa: the
// address, in the shared memory of the cluster's block `rank`, of the shared-memory address `p` of the
// calling block.
unsigned cluster_rank();
unsigned cluster_size();
void cluster_arrive(const char* file, int line);
void cluster_wait(const char* file, int line);
void* map_shared_rank(const void* p, unsigned rank, const char* file, int line);
void atomic_touched(const void* address);  // under TSan: the other half of the fence model (lane.cpp)
}  // namespace detail

// The block's static shared array for a source site (FR_SHARED_ARRAY): the same memory for every thread of the
// block, its own exact-size allocation (so that AddressSanitizer sees an overrun), filled with 0xFF bytes (NaN
// for floating point) before first use.
template <typename T>
T* shared_static(size_t n, const void* site) {
  return static_cast<T*>(detail::shared_static(n * sizeof(T), site));
}
// The block's dynamic shared memory (FR_SHARED_DYNAMIC): LaunchConfig::dynamic_smem bytes, 16-byte aligned,
// filled with 0xFF bytes at launch.
template <typename T>
T* shared_dynamic() {
  return static_cast<T*>(detail::shared_dynamic());
}

// Runs kernel(args...) for every thread of the grid on CPU threads (one OS thread per warp, its 32 lanes as
// fibers switching only at barriers, warp collectives and exit), returns when every thread has exited.
// Misuse (grid sync outside a cooperative launch, a cooperative grid that cannot be co-resident, a membermask
// mismatch, dynamic smem above the opt-in limit) prints "fr_emu: error: ..." on stderr and exits(87).
template <typename... KArgs, typename... Args>
void launch(const LaunchConfig& cfg, void (*kernel)(KArgs...), Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "fr_emu::launch: argument count differs from the kernel's");
  // One copy of the arguments for the launch (CUDA's parameter space); every thread receives its own by-value
  // copy when it calls the kernel.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  detail::launch_impl(cfg, [&] { std::apply(kernel, params); });
}

// For ptx.cuh's emulation: one warp-collective round in which every lane named in `mask` deposits `bytes`
// bytes and receives all 32 lanes' deposits (out[lane*bytes ...]; lanes not in mask left untouched).
// A barrier for the lanes in mask (with TSan happens-before among them), like __syncwarp.
void warp_allgather(unsigned mask, const void* mine, size_t bytes, void* out, const char* file = __builtin_FILE(),
                    int line = __builtin_LINE());
int lane_id();  // threadIdx linear % 32 of the calling lane

}  // namespace fr_emu

// ---- CUDA built-in variables -----------------------------------------------------------------------------
#define threadIdx (::fr_emu::detail::tls_thread_idx)
#define blockIdx (::fr_emu::detail::tls_block_idx)
#define blockDim (::fr_emu::detail::tls_block_dim)
#define gridDim (::fr_emu::detail::tls_grid_dim)
static constexpr int warpSize = 32;

// ---- barriers ---------------------------------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::fr_emu::detail::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::fr_emu::detail::syncwarp(mask, file, line);
}
inline void __threadfence() { ::fr_emu::detail::fence(); }
inline void __threadfence_block() { ::fr_emu::detail::fence(); }
inline void __threadfence_system() { ::fr_emu::detail::fence(); }

// ---- warp shuffles (any trivially copyable type of at most 8 bytes: int, unsigned, float, double, ...) --------
namespace fr_emu {
namespace detail {
template <typename T>
T shuffle_as(unsigned mask, T var, Shuffle kind, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle: a value of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle(mask, bits, kind, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace detail
}  // namespace fr_emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return ::fr_emu::detail::shuffle_as(mask, var, ::fr_emu::detail::Shuffle::Idx, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return ::fr_emu::detail::shuffle_as(mask, var, ::fr_emu::detail::Shuffle::Up, static_cast<int>(delta), width,
                                      file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return ::fr_emu::detail::shuffle_as(mask, var, ::fr_emu::detail::Shuffle::Down, static_cast<int>(delta), width,
                                      file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return ::fr_emu::detail::shuffle_as(mask, var, ::fr_emu::detail::Shuffle::Xor, lane_mask, width, file, line);
}

// ---- warp votes -------------------------------------------------------------------------------------------
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return ::fr_emu::detail::vote(mask, predicate != 0, ::fr_emu::detail::Vote::Ballot, file, line);
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::fr_emu::detail::vote(mask, predicate != 0, ::fr_emu::detail::Vote::Any, file, line));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::fr_emu::detail::vote(mask, predicate != 0, ::fr_emu::detail::Vote::All, file, line));
}
// The lanes of the warp that have not exited (the emulator cannot know which lanes a GPU would have converged).
inline unsigned __activemask() { return ::fr_emu::detail::active_mask(); }

// ---- atomics: relaxed read-modify-writes, as CUDA documents for atomicAdd & co. (device scope) ---------------
#if defined(__SANITIZE_THREAD__)
#define FR_EMU_TSAN_FENCES 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FR_EMU_TSAN_FENCES 1
#endif
#endif

namespace fr_emu {
namespace detail {
// Every atomic tells the runtime its address under ThreadSanitizer, which ignores fences: a fence then releases
// the lane's history at its next atomics and acquires what was released at its last atomic (lane.cpp).
inline void atomic_hook(const void* address) {
#ifdef FR_EMU_TSAN_FENCES
  atomic_touched(address);
#else
  (void)address;
#endif
}

// Read-modify-write through a compare-and-swap loop, for the operations GCC has no builtin for.
template <typename T, typename F>
T atomic_update(T* address, F f) {
  atomic_hook(address);
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired = f(old);
  while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    desired = f(old);
  return old;
}
}  // namespace detail
}  // namespace fr_emu

// A relaxed read-modify-write through a GCC/clang builtin.
#define FR_EMU_RMW(T, name, builtin)       \
  inline T name(T* a, T v) {               \
    ::fr_emu::detail::atomic_hook(a);      \
    return builtin(a, v, __ATOMIC_RELAXED); \
  }
#define FR_EMU_INTEGER_ATOMICS(T)                                                          \
  FR_EMU_RMW(T, atomicAdd, __atomic_fetch_add)                                             \
  FR_EMU_RMW(T, atomicSub, __atomic_fetch_sub)                                             \
  FR_EMU_RMW(T, atomicExch, __atomic_exchange_n)                                           \
  FR_EMU_RMW(T, atomicOr, __atomic_fetch_or)                                               \
  FR_EMU_RMW(T, atomicAnd, __atomic_fetch_and)                                             \
  FR_EMU_RMW(T, atomicXor, __atomic_fetch_xor)                                             \
  inline T atomicMax(T* a, T v) {                                                          \
    return ::fr_emu::detail::atomic_update(a, [v](T old) { return old > v ? old : v; });  \
  }                                                                                        \
  inline T atomicMin(T* a, T v) {                                                          \
    return ::fr_emu::detail::atomic_update(a, [v](T old) { return old < v ? old : v; });  \
  }                                                                                        \
  inline T atomicCAS(T* a, T compare, T v) {                                               \
    ::fr_emu::detail::atomic_hook(a);                                                      \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); \
    return compare;                                                                        \
  }
FR_EMU_INTEGER_ATOMICS(int)
FR_EMU_INTEGER_ATOMICS(unsigned)
FR_EMU_INTEGER_ATOMICS(unsigned long long)
FR_EMU_INTEGER_ATOMICS(long long)
#undef FR_EMU_INTEGER_ATOMICS
#undef FR_EMU_RMW

inline float atomicAdd(float* a, float v) {
  return ::fr_emu::detail::atomic_update(a, [v](float old) { return old + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::fr_emu::detail::atomic_update(a, [v](double old) { return old + v; });
}
inline float atomicExch(float* a, float v) {
  ::fr_emu::detail::atomic_hook(a);
  float old;
  __atomic_exchange(a, &v, &old, __ATOMIC_RELAXED);
  return old;
}

// ---- device math: the host's <cmath> (last-ulp differences from the GPU's, see README) ---------------------
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
