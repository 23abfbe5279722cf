// Inline PTX, only behind these small wrappers: tensor-core MMA, ldmatrix, cp.async and the
// release/acquire flag operations of the persistent kernels.
//
//   fr_ptx::mma_m16n8k16<S>(d, a, b, c)        S = __nv_bfloat16 or __half, fp32 accumulate
//   fr_ptx::mma_m16n8k8_tf32(d, a, b, c)       with fr_ptx::cvt_tf32(x) for the operands
//   fr_ptx::ldmatrix<N, Trans>(regs, smem_row) N = 1, 2, 4 matrices of 8x8 16-bit
//   fr_ptx::cp_async_cg16 / cp_async_ca<4|8|16>, cp_async_commit, cp_async_wait<N>, cp_async_wait_all
//   fr_ptx::ld_acquire_gpu / st_release_gpu / red_release_add_gpu / wait_flag_geq_gpu (and _sys)
//   fr_ptx::ld_relaxed_gpu / fence_acq_rel_gpu  (poll relaxed, order once after the poll)
//   fr_ptx::cluster_ctarank / cluster_nctarank / cluster_arrive_release / cluster_wait_acquire /
//           cluster_sync / map_shared_rank / cluster_arrive_relaxed / fence_acq_rel_cluster
//           (thread block clusters, sm_90)
//
// Under nvcc each wrapper is one PTX instruction (sm_80 and newer; the build targets 8.0 and 9.0).
// Under a host compiler with FUSED_RNN_EMULATE each wrapper is emulated on the CPU emulator
// (csrc/cuda/emu/): a warp-wide instruction is one fr_emu::warp_allgather round in which every
// lane deposits its operands and computes its own results from all 32 deposits, following the
// fragment tables of the PTX ISA ("Matrix fragments for mma.m16n8k16 / mma.m16n8k8",
// "Warp-level matrix load instruction: ldmatrix"), copied next to each wrapper below.
//
// Notation of the tables: lane = %laneid, g = lane / 4 ("groupID"), t = lane % 4
// ("threadID_in_group"). A .b32 register holding two 16-bit elements keeps the element with the
// lower index in its low 16 bits.
//
// Exactness of the emulation: a bf16 or fp16 (and tf32) product is exact in fp32 and in double;
// the emulated MMA adds the 16 (or 8) products and C in double and rounds once to fp32. The
// tensor core adds in its own order and precision, so fp32 results may differ from the GPU's in
// the last bits (compare with a tolerance of a few fp32 ulps of sum|a*b| + |c|). A layout
// misreading shared by a kernel and this emulation cannot be seen on a CPU: the GPU golden tests
// (tests/test_cuda_emu_ptx.py) run the same wrappers on a GPU against the same expected values.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define FR_PTX_NVCC 1
#elif defined(FUSED_RNN_EMULATE)
#define FR_PTX_EMULATE 1
#include <cmath>
#include <cstring>
#include <thread>
#else
#error "ptx.cuh: compile with nvcc, or with a host compiler and -DFUSED_RNN_EMULATE (after compat.cuh)"
#endif

// Under nvcc on an architecture older than sm_80 the wrappers compile to a trap: the launchers
// never choose these kernels there (the build targets sm_80 and sm_90 only).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FR_PTX_SM80 0
#else
#define FR_PTX_SM80 1
#endif
// The cluster wrappers need sm_90; older architectures compile them to a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FR_PTX_SM90 0
#else
#define FR_PTX_SM90 1
#endif

// In the emulator the warp-wide wrappers take the caller's file and line as hidden default arguments,
// as the runtime's own intrinsics do, so that a membermask or deadlock report names the kernel's line.
#if defined(FR_PTX_EMULATE)
#define FR_PTX_CALL_SITE_ONLY const char *file = __builtin_FILE(), int line = __builtin_LINE()
#define FR_PTX_CALL_SITE , FR_PTX_CALL_SITE_ONLY
#else
#define FR_PTX_CALL_SITE_ONLY
#define FR_PTX_CALL_SITE
#endif

namespace fr_ptx {

#if defined(FR_PTX_EMULATE)
namespace emu {

// A misuse the GPU would leave undefined: "fr_emu: error: ..." and exit 87, through the runtime.
[[noreturn]] inline void fail(const char* what, const char* file, int line) {
  ::fr_emu::detail::fail("%s (%s:%d)", what, file, line);
}

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline double bf16_value(uint32_t h) { return float_of((h & 0xFFFFu) << 16); }
inline double f16_value(uint32_t h) {
  const int exp = int((h >> 10) & 0x1F), man = int(h & 0x3FF);
  double v = exp == 0    ? std::ldexp(double(man), -24)                       // zero, subnormal
             : exp == 31 ? (man ? double(NAN) : double(INFINITY))              // inf, NaN
                         : std::ldexp(double(man | 0x400), exp - 25);          // normal
  return (h & 0x8000u) ? -v : v;
}
// The tensor core reads a .tf32 operand's sign, exponent and top 10 mantissa bits and ignores the
// low 13 bits (round towards zero); feed it cvt_tf32 results to get round-to-nearest.
inline double tf32_value(uint32_t u) { return float_of(u & 0xFFFFE000u); }
inline double low_half(uint32_t r, bool bf16) { return bf16 ? bf16_value(r & 0xFFFF) : f16_value(r & 0xFFFF); }
inline double high_half(uint32_t r, bool bf16) { return bf16 ? bf16_value(r >> 16) : f16_value(r >> 16); }

inline bool aligned(const void* p, uintptr_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

}  // namespace emu
#endif

// The three mma shapes below share one operand list: D 4 x f32, A 4 x b32, B 2 x b32, C 4 x f32.
#define FR_PTX_MMA_4x2x4(INSTR)                                                                        \
  asm volatile(INSTR " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"          \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
                 "f"(c[2]), "f"(c[3]))

// ------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32   D = A(16x16) * B(16x8) + C
//
//   A (row-major 16x16, 4 x .b32 = 8 elements)   a[i] = A[g + 8*(i&1)][2t + 8*(i>>1) + {0,1}]
//   B (col-major 16x8,  2 x .b32 = 4 elements)   b[i] = B[2t + 8*i + {0,1}][g]
//   C, D (16x8 fp32, 4 floats)                   c[i] = C[g + 8*(i>>1)][2t + (i&1)]
//
// d may alias c (accumulate in place).
// ------------------------------------------------------------------------------------------------
#if defined(FR_PTX_EMULATE)
namespace emu {
struct MmaOperands {
  uint32_t a[4], b[2];
  float c[4];
};
// One warp-wide MMA: gathers every lane's operands, rebuilds A (16 x K) and B (K x 8) with the
// fragment table (place(A, B, g, t, operands of lane 4g + t)), and computes this lane's D elements.
template <int K, class Place>
inline void mma_m16n8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                      Place place, const char* file, int line) {
  MmaOperands mine, all[32];
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  fr_emu::warp_allgather(0xFFFFFFFFu, &mine, sizeof mine, all, file, line);
  double A[16][K], B[K][8];
  for (int l = 0; l < 32; ++l) place(A, B, l / 4, l % 4, all[l]);
  const int lane = fr_emu::lane_id(), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {  // c[i] = C[g + 8*(i>>1)][2t + (i&1)]
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double s = mine.c[i];
    for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
    d[i] = float(s);
  }
}
template <bool Bf16>
inline void place_m16n8k16(double (&A)[16][16], double (&B)[16][8], int g, int t, const MmaOperands& o) {
  for (int i = 0; i < 4; ++i) {
    A[g + 8 * (i & 1)][2 * t + 8 * (i >> 1)] = low_half(o.a[i], Bf16);
    A[g + 8 * (i & 1)][2 * t + 8 * (i >> 1) + 1] = high_half(o.a[i], Bf16);
  }
  for (int i = 0; i < 2; ++i) {
    B[2 * t + 8 * i][g] = low_half(o.b[i], Bf16);
    B[2 * t + 8 * i + 1][g] = high_half(o.b[i], Bf16);
  }
}
}  // namespace emu
#endif

// S is the 16-bit input type: __nv_bfloat16 or __half.
template <typename S>
FR_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4] FR_PTX_CALL_SITE) {
  constexpr bool bf16 = std::is_same<S, __nv_bfloat16>::value;
  static_assert(bf16 || std::is_same<S, __half>::value, "mma m16n8k16 takes __nv_bfloat16 or __half inputs");
#if defined(FR_PTX_EMULATE)
  emu::mma_m16n8<16>(d, a, b, c, emu::place_m16n8k16<bf16>, file, line);
#elif FR_PTX_SM80
  if constexpr (bf16)
    FR_PTX_MMA_4x2x4("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
  else
    FR_PTX_MMA_4x2x4("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// cvt.rna.tf32.f32: round an fp32 value to tf32 (10 mantissa bits), to nearest with ties away from
// zero; the result is a .b32 with the low 13 bits zero, ready as an mma .tf32 operand.
// Emulated bit-exactly as ptxas (CUDA 13, sm_80/sm_90) compiles it: a finite value gets 0x1000
// added to its bits (half a tf32 ulp; may carry into the exponent, up to inf), then every value
// has its low 13 bits cleared — so a NaN whose payload lies only in those bits becomes an inf.
// ------------------------------------------------------------------------------------------------
FR_DEVICE uint32_t cvt_tf32(float x) {
#if defined(FR_PTX_EMULATE)
  const uint32_t u = emu::bits_of(x);
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  return (finite ? u + 0x1000u : u) & 0xFFFFE000u;
#elif FR_PTX_SM80
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  __trap();
  return 0;
#endif
}

// ------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32   D = A(16x8) * B(8x8) + C
//
//   A (row-major 16x8, 4 x .b32 tf32)   a[i] = A[g + 8*(i&1)][t + 4*(i>>1)]
//   B (col-major 8x8,  2 x .b32 tf32)   b[i] = B[t + 4*i][g]
//   C, D (16x8 fp32, 4 floats)          c[i] = C[g + 8*(i>>1)][2t + (i&1)]
//
// Operands are tf32 bit patterns (cvt_tf32); d may alias c.
// ------------------------------------------------------------------------------------------------
FR_DEVICE void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                const float (&c)[4] FR_PTX_CALL_SITE) {
#if defined(FR_PTX_EMULATE)
  emu::mma_m16n8<8>(d, a, b, c, [](double (&A)[16][8], double (&B)[8][8], int g, int t, const emu::MmaOperands& o) {
    for (int i = 0; i < 4; ++i) A[g + 8 * (i & 1)][t + 4 * (i >> 1)] = emu::tf32_value(o.a[i]);
    for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = emu::tf32_value(o.b[i]);
  }, file, line);
#elif FR_PTX_SM80
  FR_PTX_MMA_4x2x4("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32");
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16   (N = 1, 2, 4 matrices of 8x8 16-bit elements)
//
//   addresses: lane 8*j + r passes the shared address of row r of matrix j (16 contiguous bytes,
//              16-byte aligned); only lanes 0..8N-1 are read (.x1: 0-7, .x2: 0-15, .x4: all).
//   result:    reg[j] of lane l = M_j[l/4][2*(l%4) + {0,1}]                  (plain)
//              reg[j] of lane l = M_j[2*(l%4) + {0,1}][l/4]                  (.trans)
//   where M_j[r][c] is element c of the row that lane 8*j + r addressed.
//
// The plain form of an x4 over a row-major 16x16 tile (rows 0-7 / 8-15 x columns 0-7 / 8-15 as
// matrices 0, 1, 2, 3) yields exactly the m16n8k16 A fragment; .trans over a row-major K x N tile
// yields B fragments.
// ------------------------------------------------------------------------------------------------
template <int N, bool Trans = false>
FR_DEVICE void ldmatrix(uint32_t (&r)[N], const void* smem_row FR_PTX_CALL_SITE) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(FR_PTX_EMULATE)
  // Each addressing lane reads its row inside the instruction (before the collective completes,
  // so a write after the ldmatrix cannot race with it), then every lane picks its elements.
  struct Row {
    unsigned char bytes[16];
  } mine{}, rows[32];
  const int l = fr_emu::lane_id();
  if (l < 8 * N) {
    if (!emu::aligned(smem_row, 16)) emu::fail("ldmatrix: a row address is not 16-byte aligned", file, line);
    std::memcpy(mine.bytes, smem_row, 16);
  }
  fr_emu::warp_allgather(0xFFFFFFFFu, &mine, sizeof mine, rows, file, line);
  for (int j = 0; j < N; ++j) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = Trans ? 2 * (l % 4) + h : l / 4, col = Trans ? l / 4 : 2 * (l % 4) + h;
      std::memcpy(&e[h], rows[8 * j + row].bytes + 2 * col, 2);
    }
    r[j] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  }
#elif FR_PTX_SM80
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (N == 1 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s) : "memory");
  else if constexpr (N == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s) : "memory");
  else if constexpr (N == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(s) : "memory");
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(s) : "memory");
  else if constexpr (!Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// cp.async: per-thread asynchronous copies global -> shared.
//   cp.async.cg.shared.global [dst], [src], 16{, src_bytes};   (L2 only; 16 bytes)
//   cp.async.ca.shared.global [dst], [src], 4|8|16;           (L1 and L2)
//   cp.async.commit_group;  cp.async.wait_group N;  cp.async.wait_all;
// A copy may land any time before the wait that covers it: wait_group N returns once at most N of
// this thread's committed groups are still in flight; wait_all covers every copy issued so far.
// Other threads see the data only after a barrier that follows the wait. With src_bytes < 16 the
// copy reads src_bytes bytes and fills the rest of the 16 with zeros (edge tiles).
//
// Emulation: the copy happens at the wait, never earlier, so a missing or too-weak wait leaves
// the destination as it was (shared memory starts as 0xFF bytes: NaN) and shows as a wrong result.
// ------------------------------------------------------------------------------------------------
#if defined(FR_PTX_EMULATE)
namespace emu {
struct PendingCopy {
  void* dst;
  const void* src;
  unsigned bytes, src_bytes;
};
// This CUDA thread's copies in issue order; group_end[i]: one past the last copy of committed group i
// (oldest first); copies from group_end[n_groups - 1] on are not committed yet. Fixed capacity and
// trivially constructible, so that the thread_local below needs no initialisation guard (lanes are
// fibers of one OS thread: ThreadSanitizer would see a guard shared by them as a race).
constexpr unsigned kMaxCopiesInFlight = 128, kMaxGroupsInFlight = 16;
struct AsyncCopies {
  PendingCopy copy[kMaxCopiesInFlight];
  unsigned group_end[kMaxGroupsInFlight];
  unsigned n_copies, n_groups;
};
// This lane's copies. Every warp of a launch runs on an OS thread of its own that ends with the warp
// (csrc/cuda/emu/launch.cpp), so copies a thread never waited for die with it, as on the GPU.
inline AsyncCopies& async_copies_of_this_thread() {
  thread_local AsyncCopies lanes[32];
  return lanes[fr_emu::lane_id()];
}
inline void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes, const char* file, int line) {
  if (!aligned(dst, bytes) || !aligned(src, bytes)) fail("cp.async: address not aligned to the copy size", file, line);
  if (src_bytes > bytes) fail("cp.async: src_bytes larger than the copy size", file, line);
  AsyncCopies& a = async_copies_of_this_thread();
  if (a.n_copies == kMaxCopiesInFlight)
    fail("cp.async: more copies in flight in one thread than ptx.cuh keeps", file, line);
  a.copy[a.n_copies++] = PendingCopy{dst, src, bytes, src_bytes};
}
inline void commit(const char* file, int line) {  // an empty group counts, as on the GPU
  AsyncCopies& a = async_copies_of_this_thread();
  if (a.n_groups == kMaxGroupsInFlight)
    fail("cp.async: more groups in flight in one thread than ptx.cuh keeps", file, line);
  a.group_end[a.n_groups++] = a.n_copies;
}
// Performs the oldest committed groups until at most n remain in flight.
inline void wait_group(unsigned n) {
  AsyncCopies& a = async_copies_of_this_thread();
  if (a.n_groups <= n) return;
  const unsigned groups_done = a.n_groups - n, copies_done = a.group_end[groups_done - 1];
  for (unsigned i = 0; i < copies_done; ++i) {
    const PendingCopy& c = a.copy[i];
    if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);  // src_bytes 0: src is not read
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
  }
  for (unsigned i = copies_done; i < a.n_copies; ++i) a.copy[i - copies_done] = a.copy[i];
  for (unsigned g = groups_done; g < a.n_groups; ++g) a.group_end[g - groups_done] = a.group_end[g] - copies_done;
  a.n_copies -= copies_done;
  a.n_groups = n;
}
}  // namespace emu
#endif

// 16 bytes, L2 only (.cg); src_bytes < 16 reads that many and zero-fills the rest.
FR_DEVICE void cp_async_cg16(void* smem_dst, const void* gmem_src, unsigned src_bytes = 16 FR_PTX_CALL_SITE) {
#if defined(FR_PTX_EMULATE)
  emu::cp_async(smem_dst, gmem_src, 16, src_bytes, file, line);
#elif FR_PTX_SM80
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(s), "l"(gmem_src), "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

// 4, 8 or 16 bytes through L1 (.ca).
template <int Bytes>
FR_DEVICE void cp_async_ca(void* smem_dst, const void* gmem_src FR_PTX_CALL_SITE) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(FR_PTX_EMULATE)
  emu::cp_async(smem_dst, gmem_src, Bytes, Bytes, file, line);
#elif FR_PTX_SM80
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" :: "r"(s), "l"(gmem_src), "n"(Bytes) : "memory");
#else
  __trap();
#endif
}

FR_DEVICE void cp_async_commit(FR_PTX_CALL_SITE_ONLY) {
#if defined(FR_PTX_EMULATE)
  emu::commit(file, line);
#elif FR_PTX_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
FR_DEVICE void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a count of groups");
#if defined(FR_PTX_EMULATE)
  emu::wait_group(N);
#elif FR_PTX_SM80
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#else
  __trap();
#endif
}

// Commit the open copies and wait for all of them (cp.async.wait_all = commit_group + wait_group 0).
FR_DEVICE void cp_async_wait_all(FR_PTX_CALL_SITE_ONLY) {
#if defined(FR_PTX_EMULATE)
  emu::commit(file, line);
  emu::wait_group(0);
#elif FR_PTX_SM80
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// Flags between blocks: 32-bit loads with acquire, stores and adds with release, at GPU scope
// (every block of the launch) or system scope (host and peers too).
//   ld.acquire.gpu.u32   st.release.gpu.u32   red.release.gpu.add.u32   (and .sys)
// A release publishes every write of this thread that precedes it (program order, and what it
// saw through earlier acquires or barriers); the acquire that reads the value sees them. For a
// block-wide handoff: __syncthreads(), then one thread releases; one thread acquires, then
// __syncthreads().
// Cost (SASS of sm_90, CUDA 13): a release is MEMBAR.ALL.GPU + ST.STRONG.GPU, an acquire is
// LD.STRONG.GPU + CCTL.IVALL (the SM's L1 invalidated): one thread per block, once per step.
// Emulation: C++ atomics with the same orders (ThreadSanitizer sees the happens-before edge).
// ------------------------------------------------------------------------------------------------
#if defined(FR_PTX_EMULATE)
#define FR_PTX_FLAG_OPS(SCOPE)                                                                  \
  FR_DEVICE unsigned ld_acquire_##SCOPE(const unsigned* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); } \
  FR_DEVICE void st_release_##SCOPE(unsigned* p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); } \
  FR_DEVICE void red_release_add_##SCOPE(unsigned* p, unsigned v) { (void)__atomic_fetch_add(p, v, __ATOMIC_RELEASE); }
#elif FR_PTX_SM80
#define FR_PTX_FLAG_OPS(SCOPE)                                                                  \
  FR_DEVICE unsigned ld_acquire_##SCOPE(const unsigned* p) {                                    \
    unsigned v;                                                                                 \
    asm volatile("ld.acquire." #SCOPE ".u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");        \
    return v;                                                                                   \
  }                                                                                             \
  FR_DEVICE void st_release_##SCOPE(unsigned* p, unsigned v) {                                  \
    asm volatile("st.release." #SCOPE ".u32 [%0], %1;\n" :: "l"(p), "r"(v) : "memory");         \
  }                                                                                             \
  FR_DEVICE void red_release_add_##SCOPE(unsigned* p, unsigned v) {                             \
    asm volatile("red.release." #SCOPE ".add.u32 [%0], %1;\n" :: "l"(p), "r"(v) : "memory");    \
  }
#else
#define FR_PTX_FLAG_OPS(SCOPE)                                                                  \
  FR_DEVICE unsigned ld_acquire_##SCOPE(const unsigned*) { __trap(); return 0; }               \
  FR_DEVICE void st_release_##SCOPE(unsigned*, unsigned) { __trap(); }                         \
  FR_DEVICE void red_release_add_##SCOPE(unsigned*, unsigned) { __trap(); }
#endif
FR_PTX_FLAG_OPS(gpu)
FR_PTX_FLAG_OPS(sys)
#undef FR_PTX_FLAG_OPS

// ------------------------------------------------------------------------------------------------
// A poll without ordering, and the fence that orders it afterwards:
//   ld.relaxed.gpu.u32   fence.acq_rel.gpu
// Polling with relaxed loads and fencing once after the value arrived gives the acquire of the last
// read (the PTX memory model's fence-based synchronisation: a release, or red.release, observed
// by a relaxed load followed by fence.acq_rel), without ld.acquire's L1 invalidation on every read.
// Emulation: a relaxed C++ atomic load that tells the runtime its address, then __threadfence(),
// which under ThreadSanitizer acquires what was released at that address (csrc/cuda/emu/README.md).
// ------------------------------------------------------------------------------------------------
FR_DEVICE unsigned ld_relaxed_gpu(const unsigned* p) {
#if defined(FR_PTX_EMULATE)
  ::fr_emu::detail::atomic_hook(p);
  return __atomic_load_n(p, __ATOMIC_RELAXED);
#elif FR_PTX_SM80
  unsigned v;
  asm volatile("ld.relaxed.gpu.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
#else
  (void)p;
  __trap();
  return 0;
#endif
}

FR_DEVICE void fence_acq_rel_gpu() {
#if defined(FR_PTX_EMULATE)
  __threadfence();
#elif FR_PTX_SM80
  asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
#else
  __trap();
#endif
}

// Spin until the flag, read with acquire, has reached `target` (counted modulo 2^32, so a step
// counter may wrap); returns the value read. Backs off between reads: __nanosleep on the GPU; in
// the emulator the OS thread yields, so the warps that will set the flag can run. A lane waiting
// for a flag that another lane of its own warp sets deadlocks in the emulator (lanes switch only
// at collectives), which the emulator reports as a stall.
template <bool Sys>
FR_DEVICE unsigned wait_flag_geq(const unsigned* flag, unsigned target) {
  for (;;) {
    const unsigned v = Sys ? ld_acquire_sys(flag) : ld_acquire_gpu(flag);
    if (static_cast<int>(v - target) >= 0) return v;
#if defined(FR_PTX_EMULATE)
    std::this_thread::yield();
#elif FR_PTX_SM80
    __nanosleep(64);
#endif
  }
}
FR_DEVICE unsigned wait_flag_geq_gpu(const unsigned* flag, unsigned target) { return wait_flag_geq<false>(flag, target); }
FR_DEVICE unsigned wait_flag_geq_sys(const unsigned* flag, unsigned target) { return wait_flag_geq<true>(flag, target); }

// ------------------------------------------------------------------------------------------------
// Thread block clusters (sm_90): the block's rank in its cluster and the cluster's size, the
// split hardware cluster barrier, and distributed shared memory (another block's shared memory).
//   mov.u32 %cluster_ctarank / %cluster_nctarank
//   barrier.cluster.arrive.release.aligned   barrier.cluster.wait.acquire.aligned
//   mapa.u64 (generic address of the same shared-memory offset in block `rank` of the cluster)
// Every thread of the cluster must arrive before any wait returns; .aligned: every thread of the
// warp executes the same instruction. The release/acquire pair orders shared-memory writes of
// one block before the other blocks' reads after the wait, and a block must not exit while others
// may still access its shared memory: end with a cluster barrier.
// Cost (SASS of sm_90, CUDA 13): arrive.release is MEMBAR.ALL.GPU + CGAERRBAR + UCGABAR_ARV, wait
// is UCGABAR_WAIT + CCTL.IVALL; mapa is a PRMT that puts the target CTA's id into the shared
// window's address, read and written with generic LD/ST. The cluster dimensions come from the
// launch (cudaLaunchKernelEx, cudaLaunchAttributeClusterDimension).
// Emulation: csrc/cuda/emu/cluster.cpp (LaunchConfig::cluster); off sm_90 the wrappers trap.
// ------------------------------------------------------------------------------------------------
#if defined(FR_PTX_EMULATE)
FR_DEVICE unsigned cluster_ctarank() { return ::fr_emu::detail::cluster_rank(); }
FR_DEVICE unsigned cluster_nctarank() { return ::fr_emu::detail::cluster_size(); }
#elif FR_PTX_SM90
#define FR_PTX_SPECIAL_REGISTER(NAME)                                 \
  FR_DEVICE unsigned NAME() {                                         \
    unsigned v;                                                       \
    asm volatile("mov.u32 %0, %%" #NAME ";\n" : "=r"(v));              \
    return v;                                                         \
  }
FR_PTX_SPECIAL_REGISTER(cluster_ctarank)
FR_PTX_SPECIAL_REGISTER(cluster_nctarank)
#undef FR_PTX_SPECIAL_REGISTER
#else
FR_DEVICE unsigned cluster_ctarank() { __trap(); return 0; }
FR_DEVICE unsigned cluster_nctarank() { __trap(); return 0; }
#endif

FR_DEVICE void cluster_arrive_release(FR_PTX_CALL_SITE_ONLY) {
#if defined(FR_PTX_EMULATE)
  ::fr_emu::detail::cluster_arrive(file, line);
#elif FR_PTX_SM90
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

FR_DEVICE void cluster_wait_acquire(FR_PTX_CALL_SITE_ONLY) {
#if defined(FR_PTX_EMULATE)
  ::fr_emu::detail::cluster_wait(file, line);
#elif FR_PTX_SM90
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// barrier.cluster.arrive.relaxed.aligned: an arrive that orders nothing (no gpu-scope fence: the SASS is
// UCGABAR_ARV alone). With data to publish, fence_acq_rel_cluster() first; the wait stays .acquire.
// Emulation: the emulator's arrive, which releases (a little more ordering than .relaxed promises).
FR_DEVICE void cluster_arrive_relaxed(FR_PTX_CALL_SITE_ONLY) {
#if defined(FR_PTX_EMULATE)
  ::fr_emu::detail::cluster_arrive(file, line);
#elif FR_PTX_SM90
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// fence.acq_rel.cluster: orders this thread's earlier writes (shared memory of the cluster's blocks
// included) before its later ones at cluster scope. ptxas (CUDA 13, sm_90) compiles it to
// MEMBAR.ALL.GPU, as the arrive.release's fence. Emulation: __threadfence().
FR_DEVICE void fence_acq_rel_cluster() {
#if defined(FR_PTX_EMULATE)
  __threadfence();
#elif FR_PTX_SM90
  asm volatile("fence.acq_rel.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}

// Arrive and wait: every thread of the cluster has reached this point, its writes visible.
FR_DEVICE void cluster_sync(FR_PTX_CALL_SITE_ONLY) {
#if defined(FR_PTX_EMULATE)
  cluster_arrive_release(file, line);
  cluster_wait_acquire(file, line);
#else
  cluster_arrive_release();
  cluster_wait_acquire();
#endif
}

// The address of *p (in this block's shared memory) in the shared memory of block `rank` of the
// cluster: plain loads and stores through it reach that block's copy.
template <typename T>
FR_DEVICE T* map_shared_rank(T* p, unsigned rank FR_PTX_CALL_SITE) {
#if defined(FR_PTX_EMULATE)
  return static_cast<T*>(::fr_emu::detail::map_shared_rank(p, rank, file, line));
#elif FR_PTX_SM90
  uint64_t out;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(out) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<T*>(out);
#else
  (void)rank;
  __trap();
  return p;
#endif
}

}  // namespace fr_ptx

#undef FR_PTX_MMA_4x2x4
#undef FR_PTX_CALL_SITE
#undef FR_PTX_CALL_SITE_ONLY
