// Test kernels for csrc/cuda/ptx.cuh and the host side shared by the emulated driver
// (ptx_emu_driver.cpp) and the GPU golden program (ptx_golden.cu): both run the same kernels on
// the same input file and write the same output file, which tests/test_cuda_emu_ptx.py checks
// against plain matrix products / expected copies.
//
// Each kernel loads and stores fragments straight from global memory with the PTX ISA's tables
// (the same tables the emulation follows), so the emulated run checks the wrappers' plumbing and
// the emulation's arithmetic, and the GPU run checks the tables themselves.
#pragma once

#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#if defined(FUSED_RNN_EMULATE)
#include <thread>
#endif

namespace ptx_test {

// ---- mma.m16n8k16: `tiles` independent problems, each D = sum_ks A_ks B_ks + C ------------------
// A: [tiles][16][16*ksteps] row-major 16-bit, B: [tiles][16*ksteps][8] row-major, C, D: [tiles][16][8].
// One warp per tile; the accumulator is updated in place (d aliases c) across the K steps.
template <typename S>
FR_KERNEL void mma_k16_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D, int tiles,
                              int ksteps) {
  const int tile = int(blockIdx.x) * int(blockDim.x / 32) + int(threadIdx.x / 32);
  if (tile >= tiles) return;  // whole warps only
  const int lane = int(threadIdx.x % 32), g = lane / 4, t = lane % 4, K = 16 * ksteps;
  const uint16_t* a_tile = A + size_t(tile) * 16 * K;
  const uint16_t* b_tile = B + size_t(tile) * K * 8;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[size_t(tile) * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  for (int ks = 0; ks < ksteps; ++ks) {
    uint32_t a[4], b[2];
    for (int i = 0; i < 4; ++i) {
      const uint16_t* p = a_tile + (g + 8 * (i & 1)) * K + 16 * ks + 2 * t + 8 * (i >> 1);
      a[i] = uint32_t(p[0]) | (uint32_t(p[1]) << 16);
    }
    for (int i = 0; i < 2; ++i) {
      const int k = 16 * ks + 2 * t + 8 * i;
      b[i] = uint32_t(b_tile[k * 8 + g]) | (uint32_t(b_tile[(k + 1) * 8 + g]) << 16);
    }
    fr_ptx::mma_m16n8k16<S>(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) D[size_t(tile) * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// ---- mma.m16n8k8 tf32: A [tiles][16][8*ksteps] fp32, B [tiles][8*ksteps][8], C, D [tiles][16][8] ----
// convert != 0: operands through cvt_tf32 (round to nearest); 0: raw fp32 bits (the tensor core
// ignores the low 13 bits).
FR_KERNEL void mma_tf32_kernel(const float* A, const float* B, const float* C, float* D, int tiles, int ksteps,
                               int convert) {
  const int tile = int(blockIdx.x) * int(blockDim.x / 32) + int(threadIdx.x / 32);
  if (tile >= tiles) return;
  const int lane = int(threadIdx.x % 32), g = lane / 4, t = lane % 4, K = 8 * ksteps;
  const float* a_tile = A + size_t(tile) * 16 * K;
  const float* b_tile = B + size_t(tile) * K * 8;
  auto operand = [convert](float x) -> uint32_t {
    if (convert) return fr_ptx::cvt_tf32(x);
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
  };
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[size_t(tile) * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  for (int ks = 0; ks < ksteps; ++ks) {
    uint32_t a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = operand(a_tile[(g + 8 * (i & 1)) * K + 8 * ks + t + 4 * (i >> 1)]);
    for (int i = 0; i < 2; ++i) b[i] = operand(b_tile[(8 * ks + t + 4 * i) * 8 + g]);
    fr_ptx::mma_m16n8k8_tf32(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) D[size_t(tile) * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = acc[i];
}

FR_KERNEL void cvt_tf32_kernel(const float* x, uint32_t* out, int n) {
  for (int i = int(blockIdx.x * blockDim.x + threadIdx.x); i < n; i += int(gridDim.x * blockDim.x))
    out[i] = fr_ptx::cvt_tf32(x[i]);
}

// ---- ldmatrix.xN(.trans): src [tiles][8N][8] 16-bit, out [tiles][32 lanes][N] ------------------
// Each warp stores its tile's rows into shared memory in a scrambled order with a padded stride,
// so a lane must pass the right row's address; lane 8j + r addresses row r of matrix j (src row
// 8j + r). Lanes above 8N pass valid addresses too (row (lane % 8N)), which the instruction ignores.
struct alignas(16) Row16 {
  uint16_t e[8];
};
constexpr int kLdmWarps = 2, kLdmSlots = 40;  // 32 rows + padding slots per warp
FR_DEVICE int ldm_slot(int row, int rows) { return (row * 7 + 3) % rows + (row & 1) * 8; }  // rows | 8, < 40

template <int N, bool Trans>
FR_KERNEL void ldmatrix_kernel(const uint16_t* src, uint32_t* out, int tiles) {
  FR_SHARED_ARRAY(Row16, rows, kLdmWarps * kLdmSlots);
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  const int tile = int(blockIdx.x) * kLdmWarps + warp;
  const int nrows = 8 * N;
  Row16* mine = rows + warp * kLdmSlots;
  if (tile < tiles && lane < nrows)
    for (int c = 0; c < 8; ++c) mine[ldm_slot(lane, nrows)].e[c] = src[(size_t(tile) * nrows + lane) * 8 + c];
  __syncthreads();
  if (tile >= tiles) return;
  uint32_t r[N];
  fr_ptx::ldmatrix<N, Trans>(r, &mine[ldm_slot(lane % nrows, nrows)]);
  for (int j = 0; j < N; ++j) out[(size_t(tile) * 32 + lane) * N + j] = r[j];
}

// ---- ldmatrix feeding mma, the tensor-core kernels' pattern: D = A B + C for bf16 tiles ---------
// A [tiles][16][16] and B [tiles][16][8] (row-major) staged in shared memory by the warp; the A
// fragment by ldmatrix.x4 (lane l addresses row l % 16, columns 8 (l / 16) .. +7), the B fragment by
// ldmatrix.x2.trans (lane l addresses row l % 16 of B). One warp per tile.
FR_KERNEL void ldmatrix_mma_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D) {
  FR_SHARED_ARRAY(Row16, a_rows, 32);  // row r, columns 8h..8h+7 at a_rows[2r + h]
  FR_SHARED_ARRAY(Row16, b_rows, 16);
  const int tile = int(blockIdx.x), lane = int(threadIdx.x), g = lane / 4, t = lane % 4;
  const int r = lane % 16, h = lane / 16;
  for (int c = 0; c < 8; ++c) a_rows[2 * r + h].e[c] = A[size_t(tile) * 256 + r * 16 + 8 * h + c];
  if (lane < 16)
    for (int c = 0; c < 8; ++c) b_rows[lane].e[c] = B[size_t(tile) * 128 + lane * 8 + c];
  __syncwarp();
  uint32_t a[4], b[2];
  fr_ptx::ldmatrix<4>(a, &a_rows[2 * r + h]);
  fr_ptx::ldmatrix<2, true>(b, &b_rows[r]);
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[size_t(tile) * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  fr_ptx::mma_m16n8k16<__nv_bfloat16>(acc, a, b, acc);
  for (int i = 0; i < 4; ++i) D[size_t(tile) * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// ---- cp.async: 64 threads, each copies 3 chunks (one group each) of its own into shared memory --
// src: [3 groups][64 threads][chunk] floats, out: same shape. After each wait the block syncs and
// thread i writes out the chunk of thread (i + 1) % 64, so the data crosses threads.
enum CpMode : int {
  kCpCg16 = 0,       // cg 16 bytes, wait_group<0> after all three commits
  kCpCa4 = 1,        // ca 4 bytes, wait_all
  kCpCa8 = 2,        // ca 8 bytes, wait_all
  kCpCa16 = 3,       // ca 16 bytes, wait_all
  kCpPipeline = 4,   // cg 16: wait_group<2>, read group 0; <1>, group 1; <0>, group 2
  kCpZfill = 5,      // cg 16 with src_bytes = 4 * (thread % 5): the rest of the 16 bytes zero
  kCpNoWait = 6,     // emulator only: commit, no wait -> every chunk stale
  kCpWeakWait = 7,   // emulator only: wait_group<1> then read all -> group 2 stale
  kCpNoCommit = 8,   // emulator only: no commit_group before wait_group<0> -> every chunk stale
};
constexpr int kCpThreads = 64, kCpGroups = 3;
FR_DEVICE int cp_chunk_floats(int mode) { return mode == kCpCa4 ? 1 : mode == kCpCa8 ? 2 : 4; }

struct alignas(16) Chunk16 {
  float f[4];
};

FR_KERNEL void cp_async_kernel(const float* src, float* out, int mode) {
  FR_SHARED_ARRAY(Chunk16, chunks, kCpGroups * kCpThreads);
  const int i = int(threadIdx.x), cf = cp_chunk_floats(mode);
  for (int grp = 0; grp < kCpGroups; ++grp) {
    Chunk16* dst = &chunks[grp * kCpThreads + i];
    const float* s = src + (grp * kCpThreads + i) * cf;
    if (mode == kCpCa4)
      fr_ptx::cp_async_ca<4>(dst, s);
    else if (mode == kCpCa8)
      fr_ptx::cp_async_ca<8>(dst, s);
    else if (mode == kCpCa16)
      fr_ptx::cp_async_ca<16>(dst, s);
    else if (mode == kCpZfill)
      fr_ptx::cp_async_cg16(dst, s, 4u * unsigned(i % 5));
    else
      fr_ptx::cp_async_cg16(dst, s);
    if (mode != kCpNoCommit) fr_ptx::cp_async_commit();
  }
  auto publish = [&](int grp) {
    __syncthreads();
    for (int c = 0; c < cf; ++c) out[(grp * kCpThreads + i) * cf + c] = chunks[grp * kCpThreads + (i + 1) % kCpThreads].f[c];
  };
  if (mode == kCpPipeline) {
    fr_ptx::cp_async_wait<2>();
    publish(0);
    fr_ptx::cp_async_wait<1>();
    publish(1);
    fr_ptx::cp_async_wait<0>();
    publish(2);
    return;
  }
  if (mode == kCpCa4 || mode == kCpCa8 || mode == kCpCa16)
    fr_ptx::cp_async_wait_all();
  else if (mode == kCpWeakWait)
    fr_ptx::cp_async_wait<1>();
  else if (mode != kCpNoWait)
    fr_ptx::cp_async_wait<0>();
  for (int grp = 0; grp < kCpGroups; ++grp) publish(grp);
}

// ---- release/acquire flags: a ring of blocks, each step reading its left neighbour's last step --
// data [steps][blocks][64]: step 0 = seed; step s: 3 * left[s-1][(i+1) % 64] + own[s-1][i] + s
// (uint32, wrapping). flags[b] = s + 1 once block b has written step s (st.release.gpu, waited on
// with ld.acquire.gpu). At the end every block adds 1 to `counter` (red.release.sys) and block 0,
// once it reads all of them (ld.acquire.sys), writes total[i] = sum over blocks of the last step.
// Needs every block resident at once: launched cooperatively.
// relaxed (emulator only): the step flags are published and read with relaxed atomics instead, the
// planted bug ThreadSanitizer must report (the data reads are then unordered with their writes).
constexpr int kFlagThreads = 64;
FR_DEVICE void publish_step(unsigned* flag, unsigned v, int relaxed) {
#if defined(FUSED_RNN_EMULATE)
  if (relaxed) return __atomic_store_n(flag, v, __ATOMIC_RELAXED);
#endif
  (void)relaxed;
  fr_ptx::st_release_gpu(flag, v);
}
FR_DEVICE void wait_step(const unsigned* flag, unsigned v, int relaxed) {
#if defined(FUSED_RNN_EMULATE)
  if (relaxed) {
    while (__atomic_load_n(flag, __ATOMIC_RELAXED) < v) std::this_thread::yield();
    return;
  }
#endif
  fr_ptx::wait_flag_geq_gpu(flag, v);
}
FR_KERNEL void flags_kernel(const unsigned* seed, unsigned* data, unsigned* flags, unsigned* counter,
                            unsigned* total, int steps, int relaxed) {
  const int nb = int(gridDim.x), b = int(blockIdx.x), i = int(threadIdx.x), left = (b + nb - 1) % nb;
  auto at = [&](int s, int blk, int k) { return data + (size_t(s) * nb + blk) * kFlagThreads + k; };
  for (int s = 0; s < steps; ++s) {
    unsigned v;
    if (s == 0) {
      v = seed[b * kFlagThreads + i];
    } else {
      if (i == 0) wait_step(&flags[left], unsigned(s), relaxed);
      __syncthreads();
      v = 3u * *at(s - 1, left, (i + 1) % kFlagThreads) + *at(s - 1, b, i) + unsigned(s);
    }
    *at(s, b, i) = v;
    __syncthreads();
    if (i == 0) publish_step(&flags[b], unsigned(s + 1), relaxed);
  }
  if (i == 0) fr_ptx::red_release_add_sys(counter, 1u);
  if (b != 0) return;
  if (i == 0) fr_ptx::wait_flag_geq_sys(counter, unsigned(nb));
  __syncthreads();
  unsigned sum = 0;
  for (int q = 0; q < nb; ++q) sum += *at(steps - 1, q, i);
  total[i] = sum;
}

// ---- misuse the emulator must refuse (emulator only: a GPU's behaviour is undefined) ---------------
// what 0: ldmatrix with a row address 2 bytes off 16-byte alignment; 1: cp.async.cg 16 bytes to a
// destination 4 bytes off.
FR_KERNEL void misaligned_kernel(const float* src, int what) {
  FR_SHARED_ARRAY(Row16, rows, 32);
  const int lane = int(threadIdx.x);
  if (what == 0) {
    uint32_t r[1];
    fr_ptx::ldmatrix<1>(r, reinterpret_cast<const char*>(&rows[lane % 8]) + 2);
  } else {
    fr_ptx::cp_async_cg16(reinterpret_cast<char*>(&rows[lane]) + 4, src);
    fr_ptx::cp_async_wait_all();
  }
}

// ---- host side: one case per run ----------------------------------------------------------------
// prog CASE IN_FILE OUT_FILE PARAMS...: reads the inputs (raw arrays, concatenated, in the order
// below), runs the case through Dev (emulator or GPU), writes the outputs (raw, concatenated).
//   mma_bf16 | mma_f16 TILES KSTEPS   in: A u16, B u16, C f32             out: D f32
//   mma_tf32 TILES KSTEPS CONVERT     in: A f32, B f32, C f32             out: D f32
//   cvt_tf32 N                        in: x f32                           out: u32
//   ldmatrix NUM TRANS TILES          in: src u16 [TILES][8 NUM][8]       out: u32 [TILES][32][NUM]
//   ldmatrix_mma TILES                in: A u16, B u16, C f32 (bf16 tiles)   out: D f32
//   cp_async MODE                     in: src f32 [3][64][chunk]          out: f32, same shape
//   misaligned WHAT                   in: nothing; must end with an emulator error
//   flags BLOCKS STEPS RELAXED        in: seed u32 [BLOCKS][64]           out: data u32, total u32 [64]
// Dev provides alloc<T>(n) (filled with 0xFF bytes), upload(vector), download(ptr, n), and
// launch(grid, block, cooperative, kernel, args...).
class Input {
 public:
  explicit Input(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) die("cannot open input");
    for (int c; (c = std::fgetc(f)) != EOF;) bytes_.push_back(char(c));
    std::fclose(f);
  }
  template <typename T>
  std::vector<T> take(size_t n) {
    if (pos_ + n * sizeof(T) > bytes_.size()) die("input file too short");
    std::vector<T> v(n);
    std::memcpy(v.data(), bytes_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return v;
  }
  void check_consumed() const {
    if (pos_ != bytes_.size()) die("input file too long");
  }
  [[noreturn]] static void die(const char* why) {
    std::fprintf(stderr, "ptx test driver: %s\n", why);
    std::exit(2);
  }

 private:
  std::vector<char> bytes_;
  size_t pos_ = 0;
};

template <typename T>
void append(std::vector<char>& out, const std::vector<T>& v) {
  const char* p = reinterpret_cast<const char*>(v.data());
  out.insert(out.end(), p, p + v.size() * sizeof(T));
}

template <int N, class Dev>
void run_ldmatrix(Dev& dev, bool trans, int tiles, const uint16_t* src, uint32_t* out) {
  const dim3 grid((tiles + kLdmWarps - 1) / kLdmWarps), block(32 * kLdmWarps);
  if (trans)
    dev.launch(grid, block, false, ldmatrix_kernel<N, true>, src, out, tiles);
  else
    dev.launch(grid, block, false, ldmatrix_kernel<N, false>, src, out, tiles);
}

template <class Dev>
int run_case(Dev& dev, int argc, char** argv) {
  if (argc < 4) Input::die("usage: CASE IN_FILE OUT_FILE PARAMS...");
  const std::string name = argv[1];
  Input in(argv[2]);
  auto param = [&](int k) {
    if (4 + k >= argc) Input::die("missing parameter");
    return std::atoi(argv[4 + k]);
  };
  std::vector<char> out;
  if (name == "mma_bf16" || name == "mma_f16" || name == "mma_tf32") {
    const int tiles = param(0), ks = param(1), K = (name == "mma_tf32" ? 8 : 16) * ks;
    const dim3 grid((tiles + 1) / 2), block(64);
    float* D = dev.template alloc<float>(size_t(tiles) * 128);
    if (name == "mma_tf32") {
      auto A = in.take<float>(size_t(tiles) * 16 * K);
      auto B = in.take<float>(size_t(tiles) * K * 8);
      auto Cv = in.take<float>(size_t(tiles) * 128);
      dev.launch(grid, block, false, mma_tf32_kernel, dev.upload(A), dev.upload(B), dev.upload(Cv), D, tiles, ks,
                 param(2));
    } else {
      auto A = in.take<uint16_t>(size_t(tiles) * 16 * K);
      auto B = in.take<uint16_t>(size_t(tiles) * K * 8);
      auto Cv = in.take<float>(size_t(tiles) * 128);
      if (name == "mma_bf16")
        dev.launch(grid, block, false, mma_k16_kernel<__nv_bfloat16>, dev.upload(A), dev.upload(B), dev.upload(Cv), D, tiles,
                   ks);
      else
        dev.launch(grid, block, false, mma_k16_kernel<__half>, dev.upload(A), dev.upload(B), dev.upload(Cv), D, tiles,
                   ks);
    }
    append(out, dev.download(D, size_t(tiles) * 128));
  } else if (name == "cvt_tf32") {
    const int n = param(0);
    uint32_t* r = dev.template alloc<uint32_t>(size_t(n));
    dev.launch(dim3(2), dim3(64), false, cvt_tf32_kernel, dev.upload(in.take<float>(size_t(n))), r, n);
    append(out, dev.download(r, size_t(n)));
  } else if (name == "ldmatrix") {
    const int num = param(0), trans = param(1), tiles = param(2);
    const uint16_t* src = dev.upload(in.take<uint16_t>(size_t(tiles) * 8 * num * 8));
    uint32_t* r = dev.template alloc<uint32_t>(size_t(tiles) * 32 * num);
    if (num == 1)
      run_ldmatrix<1>(dev, trans != 0, tiles, src, r);
    else if (num == 2)
      run_ldmatrix<2>(dev, trans != 0, tiles, src, r);
    else if (num == 4)
      run_ldmatrix<4>(dev, trans != 0, tiles, src, r);
    else
      Input::die("ldmatrix: NUM must be 1, 2 or 4");
    append(out, dev.download(r, size_t(tiles) * 32 * num));
  } else if (name == "ldmatrix_mma") {
    const int tiles = param(0);
    auto A = in.take<uint16_t>(size_t(tiles) * 256);
    auto B = in.take<uint16_t>(size_t(tiles) * 128);
    auto C = in.take<float>(size_t(tiles) * 128);
    float* D = dev.template alloc<float>(size_t(tiles) * 128);
    dev.launch(dim3(unsigned(tiles)), dim3(32), false, ldmatrix_mma_kernel, dev.upload(A), dev.upload(B),
               dev.upload(C), D);
    append(out, dev.download(D, size_t(tiles) * 128));
  } else if (name == "cp_async") {
    const int mode = param(0);
    const size_t n = size_t(kCpGroups) * kCpThreads * size_t(mode == kCpCa4 ? 1 : mode == kCpCa8 ? 2 : 4);
    float* r = dev.template alloc<float>(n);
    dev.launch(dim3(1), dim3(kCpThreads), false, cp_async_kernel, dev.upload(in.take<float>(n)), r, mode);
    append(out, dev.download(r, n));
  } else if (name == "misaligned") {
    dev.launch(dim3(1), dim3(32), false, misaligned_kernel, dev.upload(std::vector<float>(4, 1.f)), param(0));
  } else if (name == "flags") {
    const int nb = param(0), steps = param(1);
    const size_t n = size_t(steps) * nb * kFlagThreads;
    unsigned* data = dev.template alloc<unsigned>(n);
    unsigned* flags = dev.upload(std::vector<unsigned>(size_t(nb), 0u));
    unsigned* counter = dev.upload(std::vector<unsigned>(1, 0u));
    unsigned* total = dev.template alloc<unsigned>(kFlagThreads);
    dev.launch(dim3(unsigned(nb)), dim3(kFlagThreads), true, flags_kernel,
               dev.upload(in.take<unsigned>(size_t(nb) * kFlagThreads)), data, flags, counter, total, steps,
               param(2));
    append(out, dev.download(data, n));
    append(out, dev.download(total, kFlagThreads));
  } else {
    Input::die("unknown case");
  }
  in.check_consumed();
  FILE* f = std::fopen(argv[3], "wb");
  if (!f || std::fwrite(out.data(), 1, out.size(), f) != out.size() || std::fclose(f) != 0)
    Input::die("cannot write output");
  return 0;
}

}  // namespace ptx_test
