// Persistent recurrence, version 2: tensor cores, w_hh resident in registers, per-step flags.
// Kernel bodies only (no launches, no runtime API, no torch): compiled by nvcc for the GPU and by a
// host compiler under the CPU emulator (compat.cuh, ptx.cuh; tests/test_cuda_persistent_v2.py).
// The budget this is written to, shape by shape: benchmarks/PERSISTENT_V2.md.
//
// Ownership. CTA (x, y) owns hidden units [x*U, x*U + U) with all G gate rows of them — so the cell
// state and the gate pointwise stay in the CTA — for batch rows [y*8*NT, y*8*NT + 8*NT). Its G*U
// rows of w_hh, gate-major (row g*U + ul is w_hh[g*H + x*U + ul, :]), padded with zeros to MT
// m-tiles of 16, are the A operand of the MMAs (fp32 accumulation). The MMA is the template parameter M
// (V2Mma below): mma.m16n8k16 for bf16/fp16; for fp32 mma.m16n8k8 on tf32 operands, once (TF32) or
// three times on a big + small split of each operand (3xTF32, fp32-accurate).
//
// Warps split K. Warp w owns k-tiles [w*KT, w*KT + KT) of 16 of the ceil(H/16) k-tiles: its A fragments
// (MT*KT*4, *8 or *16 registers per thread) are loaded once and stay in registers for all T steps. Per step it
//   1. polls, with acquire, the flags of just the CTAs that produce its K slice of h_{t-1};
//   2. copies that slice of its batch rows from the exchange buffer into shared memory (cp.async,
//      zero-filled past H and past B) and reads it back with ldmatrix as B fragments;
//   3. runs MT*KT*NT MMAs and stores its partial gate sums in shared memory.
// No CTA barrier sits between the wait and the MMAs: a warp is the only reader of its slice.
// Then every thread sums the partials of its (unit, batch row) pairs, adds b_hh and gx (whose loads
// were issued before the wait, so they overlap it and the MMAs), runs the cell math of
// cell_math.h with c and h in registers, writes h into the exchange buffer, y and the saved gates;
// a barrier; thread 0 releases the CTA's flag. No grid-wide barrier anywhere.
//
// Flags and the exchange buffer. flags[y * gridDim.x + x] counts the h epochs CTA (x, y) has
// published: h0 is epoch 0, step s publishes epoch s + 1 into h_buf[(s + 1) & 1]. A warp waits only
// for the producers of its own K slice, but the 8 warps together read all of K, so by the barrier
// after the MMAs the CTA has acquired epoch s from every CTA of its batch group. Writing epoch s + 1
// therefore never overwrites a value still to be read: it replaces epoch s - 1, which every reader
// consumed during its step s - 1, before it published epoch s.
//
// Lengths and reverse as the per-step path: a finished row keeps h and c, outputs zeros, and its
// saved gates are written too (zeros; cells keep c), so either path's backward can follow.
#pragma once

#include "compat.cuh"
#include "ptx.cuh"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../persistent_params.h"
#include "../recurrence_step.h"
#include "conv_cuda.cuh"
#include "persistent_plan.h"  // kV2Threads, the tilings, the shared-memory sizes

// Planted bugs for the mutation tests (tests/test_cuda_persistent_v2.py): the literal 0 in every real
// build (the branches below fold away); the emulated mutation driver defines it as a variable.
//   1: a warp reads h without waiting for its producers' flags
//   2: a CTA publishes its flag before writing the h it announces
//   3: the backward sums the partial dh of other CTAs without waiting for their flags
#ifndef FR_PERSISTENT_V2_MUTATION
#define FR_PERSISTENT_V2_MUTATION 0
#endif

namespace fused_rnn {
namespace cuda {

// One CTA per SM by design (its w_hh rows fill the registers): tell ptxas it may use all 255
// registers per thread (without the 1 it aimed at 128 for one instance and spilled).
#if defined(__CUDACC__)
#define FR_V2_LAUNCH_BOUNDS __launch_bounds__(kV2Threads, 1)
#else
#define FR_V2_LAUNCH_BOUNDS
#endif

// What the launch adds to the parameters: the plan's layout and the workspace (persistent_plan.h).
struct PersistentV2Layout {
  int units;        // U: hidden units per CTA (G*U <= 16*MT)
  int k_tiles;      // ceil(H / 16) (<= 8*KT)
  unsigned* flags;  // [gridDim.y * gridDim.x], zero at launch
  float* partials;  // backward only: [2][gridDim.y][gridDim.x][8*NT][16*k_tiles] partial dh of each CTA
  void* h_buf;      // forward only: S [2, B, 16*k_tiles], rows padded to whole k-tiles so that every
                    // 16-byte copy is aligned (the padding is never read)
};

// Dynamic shared memory: v2_forward_smem_bytes / v2_backward_smem_bytes (persistent_plan.h).

template <typename S>
FR_DEVICE uint32_t pack_pair(S lo, S hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return uint32_t(l) | (uint32_t(h) << 16);
}

FR_DEVICE void v2_trap() {
#if defined(__CUDACC__)
  __trap();
#else
  std::abort();
#endif
}

// What CTA (blockIdx.x, blockIdx.y) owns, and this thread's place in the mma fragment tables.
struct V2Slice {
  int64_t u0, b0;  // first hidden unit, first batch row
  int Uc, Bc;      // units and batch rows owned (the last CTAs may own fewer)
  int warp, lane, gq, tq;  // gq = groupID = lane / 4, tq = threadID_in_group = lane % 4
  // Pair i of this thread: unit u0 + ul, batch row b0 + bl; false when the thread has no pair i.
  FR_DEVICE bool pair(int i, int& ul, int& bl) const {
    const int q = int(threadIdx.x) + i * kV2Threads;
    ul = q % Uc;
    bl = q / Uc;
    return q < Uc * Bc;
  }
};

template <int NB>
FR_DEVICE V2Slice v2_slice(int64_t H, int64_t B, int U) {
  V2Slice sl;
  sl.u0 = int64_t(blockIdx.x) * U;
  sl.b0 = int64_t(blockIdx.y) * NB;
  sl.Uc = int(H - sl.u0 < U ? H - sl.u0 : U);
  sl.Bc = int(B - sl.b0 < NB ? B - sl.b0 : NB);
  sl.warp = int(threadIdx.x) / 32;
  sl.lane = int(threadIdx.x) % 32;
  sl.gq = sl.lane / 4;
  sl.tq = sl.lane % 4;
  return sl;
}

// Element (row, k) of the CTA's gate-major slice of w_hh (row g*U + ul is w_hh[g*H + u0 + ul, :]); zero
// in the padding (rows past G*Uc, columns past H).
template <int G, typename S>
FR_DEVICE S w_slice_at(const S* W, int64_t H, int U, const V2Slice& sl, int row, int64_t k) {
  const int g = row / U, ul = row % U;
  if (g >= G || ul >= sl.Uc || k >= H) return Conv<S>::store(0.f);
  return W[(g * H + sl.u0 + ul) * H + k];
}

// B fragments of mma.m16n8k16 for NT n-tiles and one k16 step at column k0, from a row-major tile of
// 16-bit values in shared memory whose row n holds B[k][n] along k (row stride `stride` elements,
// 16-byte aligned rows): b[nt][i] = B[k0 + 2tq + 8i + {0,1}][nt*8 + gq] = tile[nt*8 + gq][k0 + 2tq + 8i + {0,1}].
// ldmatrix.x4 loads two n-tiles at once (matrices: n-tile 2np at k0 and k0+8, n-tile 2np+1 likewise).
template <int NT, typename S>
FR_DEVICE void load_b_fragments(uint32_t (&bf)[NT][2], const S* tile, int64_t stride, int64_t k0, int lane) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    const int j = lane / 8;  // lane 8j + r addresses row r of matrix j
    uint32_t r4[4];
    fr_ptx::ldmatrix<4>(r4, tile + (np * 16 + (j / 2) * 8 + lane % 8) * stride + k0 + (j % 2) * 8);
    bf[2 * np][0] = r4[0];
    bf[2 * np][1] = r4[1];
    bf[2 * np + 1][0] = r4[2];
    bf[2 * np + 1][1] = r4[3];
  }
  if constexpr (NT % 2 == 1) {
    uint32_t r2[2];
    fr_ptx::ldmatrix<2>(r2, tile + ((NT - 1) * 8 + lane % 8) * stride + k0 + ((lane / 8) % 2) * 8);
    bf[NT - 1][0] = r2[0];
    bf[NT - 1][1] = r2[1];
  }
}

FR_DEVICE float float_of_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// The MMAs of one 16x16 (rows x k) tile of A times a 16 (k) x 8 (n) tile of B into fp32 accumulators,
// for storage S and math M (persistent_plan.h V2Math): the one thing the kernels below do differently per
// dtype. load_a fills the kA registers of one A tile from at(row, k) (row, k in 0..15 of the tile);
// load_b fills kB registers per n-tile from a shared [n][k] tile (rows `stride` elements, 16-byte
// aligned) at column k0; mma accumulates.
template <typename S, V2Math M> struct V2Mma;

// bf16/fp16: one m16n8k16. a[i] = A[gq + 8(i&1)][2tq + 8(i>>1) + {0,1}].
template <typename S> struct V2Mma<S, V2Math::Mma16> {
  static_assert(std::is_same<S, __nv_bfloat16>::value || std::is_same<S, __half>::value,
                "mma.m16n8k16 takes bf16 or fp16 storage");
  static constexpr int kA = 4, kB = 2;
  template <typename At> FR_DEVICE static void load_a(uint32_t (&a)[kA], int gq, int tq, At&& at) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = gq + 8 * (i & 1), k = 2 * tq + 8 * (i >> 1);
      a[i] = pack_pair(at(r, k), at(r, k + 1));
    }
  }
  template <int NT> FR_DEVICE static void load_b(uint32_t (&bf)[NT][kB], const S* tile, int64_t stride, int64_t k0,
                                                 int lane) {
    load_b_fragments<NT>(bf, tile, stride, k0, lane);
  }
  FR_DEVICE static void mma(float (&acc)[4], const uint32_t (&a)[kA], const uint32_t (&b)[kB]) {
    fr_ptx::mma_m16n8k16<S>(acc, a, b, acc);
  }
};

// fp32: two k8 halves of mma.m16n8k8 tf32 per 16x16 tile; operands rounded to tf32 (cvt.rna). With Tf32x3
// each fp32 x is split into big = tf32(x) and small = tf32(x - big), and a*b ~ big*big' + big*small' +
// small*big' (small*small', ~2^-22 relative, dropped): registers p*8 + h*4 + i hold part p (0 big,
// 1 small) of k-half h. A: a[i] = A[gq + 8(i&1)][8h + tq + 4(i>>1)]; B: b[j] = B[8h + tq + 4j][gq].
template <V2Math M> struct V2Mma<float, M> {
  static_assert(M == V2Math::Tf32 || M == V2Math::Tf32x3, "fp32 storage takes the tf32 MMAs");
  static constexpr int kParts = M == V2Math::Tf32x3 ? 2 : 1;
  static constexpr int kA = 8 * kParts, kB = 4 * kParts;
  // parts[0], parts[kParts * 4 ...]: the tf32 big (and small) part of x at register index j (stride 8 for A, 4 for B)
  template <int kStride, int N> FR_DEVICE static void split(uint32_t (&r)[N], int j, float x) {
    const uint32_t big = fr_ptx::cvt_tf32(x);
    r[j] = big;
    if constexpr (kParts == 2) r[kStride + j] = fr_ptx::cvt_tf32(x - float_of_bits(big));
  }
  template <typename At> FR_DEVICE static void load_a(uint32_t (&a)[kA], int gq, int tq, At&& at) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) split<8>(a, h * 4 + i, at(gq + 8 * (i & 1), 8 * h + tq + 4 * (i >> 1)));
  }
  // ldmatrix of 8x8 b16 matrices on fp32 data: matrix j = rows n, columns k0 + 4j .. k0 + 4j + 3 (fp32), and
  // lane 4gq + tq receives row gq, fp32 column tq: B[k0 + 4j + tq][n] — the tf32 B fragment of k-half j/2.
  template <int NT> FR_DEVICE static void load_b(uint32_t (&bf)[NT][kB], const float* tile, int64_t stride,
                                                 int64_t k0, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t r4[4];
      fr_ptx::ldmatrix<4>(r4, tile + (nt * 8 + lane % 8) * stride + k0 + (lane / 8) * 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) split<4>(bf[nt], j, float_of_bits(r4[j]));
    }
  }
  FR_DEVICE static void mma(float (&acc)[4], const uint32_t (&a)[kA], const uint32_t (&b)[kB]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a_big[4] = {a[4 * h], a[4 * h + 1], a[4 * h + 2], a[4 * h + 3]};
      const uint32_t b_big[2] = {b[2 * h], b[2 * h + 1]};
      if constexpr (kParts == 2) {  // the small products first, so that they are not lost beside the big one
        const uint32_t a_small[4] = {a[8 + 4 * h], a[8 + 4 * h + 1], a[8 + 4 * h + 2], a[8 + 4 * h + 3]};
        const uint32_t b_small[2] = {b[4 + 2 * h], b[4 + 2 * h + 1]};
        fr_ptx::mma_m16n8k8_tf32(acc, a_small, b_big, acc);
        fr_ptx::mma_m16n8k8_tf32(acc, a_big, b_small, acc);
      }
      fr_ptx::mma_m16n8k8_tf32(acc, a_big, b_big, acc);
    }
  }
};

// Spins until flags[j] >= target (acquire) for j = me, me + stride, ... < n.
FR_DEVICE void wait_flags(const unsigned* flags, int n, unsigned target, int me, int stride) {
  for (int j = me; j < n; j += stride) fr_ptx::wait_flag_geq_gpu(flags + j, target);
}

template <Cell C, typename S, int MT, int KT, int NT, V2Math M = V2Math::Mma16>
FR_KERNEL void FR_V2_LAUNCH_BOUNDS
    persistent_v2_forward_kernel(PersistentForwardParams p, PersistentV2Layout lay) {
  using L = Conv<S>;
  using Mma = V2Mma<S, M>;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr int NB = 8 * NT;                                    // batch rows per CTA
  constexpr int MR = 16 * MT;                                   // w_hh rows per CTA, padded
  constexpr int PP = ((MR / G) * NB + kV2Threads - 1) / kV2Threads;  // (unit, row) pairs per thread

  const int64_t T = p.T, B = p.B, H = p.H, GH = G * H;
  const int U = lay.units, KTILES = lay.k_tiles;
  if (U <= 0 || G * U > MR || KTILES != (H + 15) / 16 || KTILES > kV2Warps * KT) v2_trap();
  constexpr int kVec = 16 / int(sizeof(S));  // elements per 16 bytes: one cp.async, and the row padding
  const int64_t Hs = 16 * int64_t(KTILES), RS = Hs + kVec;  // exchange-buffer row, shared-tile row
  const V2Slice sl = v2_slice<NB>(H, B, U);
  const int64_t u0 = sl.u0, b0 = sl.b0;
  const int warp = sl.warp, lane = sl.lane, gq = sl.gq, tq = sl.tq;

  FR_SHARED_DYNAMIC(unsigned char, smem);
  S* hs = reinterpret_cast<S*>(smem);                                          // [NB][RS]
  float* part = reinterpret_cast<float*>(smem + size_t(NB) * size_t(RS) * sizeof(S));  // [warps][MR][NB]

  const S* W = static_cast<const S*>(p.w_hh);
  const S* gx = static_cast<const S*>(p.gx);
  S* y = static_cast<S*>(p.y);
  S* h_buf = static_cast<S*>(lay.h_buf);
  unsigned* my_flag = lay.flags + blockIdx.y * gridDim.x + blockIdx.x;

  // ---- w_hh rows -> A fragments of each 16x16 tile (row, k), as V2Mma lays them out
  uint32_t a[MT][KT][Mma::kA];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int64_t k0 = int64_t(warp * KT + kt) * 16;
      Mma::load_a(a[mt][kt], gq, tq, [&](int r, int k) { return w_slice_at<G>(W, H, U, sl, mt * 16 + r, k0 + k); });
    }

  // This warp's K slice and the CTAs that produce it (all in this CTA's batch group).
  const int64_t k_lo = int64_t(warp) * KT * 16;
  const int64_t k_hi = k_lo + KT * 16 < H ? k_lo + KT * 16 : H;
  const bool warp_works = k_lo < H;
  const int x_lo = warp_works ? int(k_lo / U) : 0;
  const int n_producers = warp_works ? int((k_hi - 1) / U) - x_lo + 1 : 0;
  const unsigned* producer_flags = lay.flags + blockIdx.y * gridDim.x + x_lo;

  // ---- this thread's (unit, batch row) pairs: bias, h and c in registers for all T steps
  float bias[PP][G], h_reg[PP], c_reg[PP];
#pragma unroll
  for (int i = 0; i < PP; ++i) {
    int ul, bl;
    if (!sl.pair(i, ul, bl)) continue;
    const int64_t u = u0 + ul, b = b0 + bl;
#pragma unroll
    for (int g = 0; g < G; ++g) bias[i][g] = p.b_hh ? L::load(static_cast<const S*>(p.b_hh)[g * H + u]) : 0.f;
    const S h0 = static_cast<const S*>(p.h0)[b * H + u];
    h_reg[i] = L::load(h0);
    c_reg[i] = C == Cell::LSTM ? L::load(static_cast<const S*>(p.c0)[b * H + u]) : 0.f;
    h_buf[b * Hs + u] = h0;  // epoch 0 = h0
  }
  __syncthreads();
  if (threadIdx.x == 0) fr_ptx::st_release_gpu(my_flag, 1u);

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? T - 1 - s : s;
    // gx of this step: loads issued now, used after the wait and the MMAs.
    float gxv[PP][G];
    bool alive[PP];
#pragma unroll
    for (int i = 0; i < PP; ++i) {
      int ul, bl;
      alive[i] = sl.pair(i, ul, bl) && row_valid(p.lengths, b0 + bl, t);
#pragma unroll
      for (int g = 0; g < G; ++g) gxv[i][g] = alive[i] ? L::load(gx[(t * B + b0 + bl) * GH + g * H + u0 + ul]) : 0.f;
    }

    float acc[MT][NT][4] = {};

    if (warp_works) {
      // 1. wait for epoch s of exactly the units this warp reads
      if (FR_PERSISTENT_V2_MUTATION != 1) wait_flags(producer_flags, n_producers, unsigned(s + 1), lane, 32);
      __syncwarp();
      // 2. its K slice of the batch tile, h_{t-1}, into shared memory: 16-byte chunks of kVec values
      const S* h_prev = h_buf + (s & 1) * B * Hs;
      constexpr int kChunks = 16 * KT / kVec;  // per batch row
      for (int c = lane; c < NB * kChunks; c += 32) {
        const int r = c / kChunks;
        const int64_t k = k_lo + (c % kChunks) * kVec;
        if (k >= Hs) continue;  // past the last k-tile: never read
        const int64_t b = b0 + r;
        const int64_t valid = b < B ? (H - k < kVec ? (H - k > 0 ? H - k : 0) : kVec) : 0;
        fr_ptx::cp_async_cg16(hs + r * RS + k, h_prev + (b < B ? b : 0) * Hs + k, unsigned(valid * sizeof(S)));
      }
      fr_ptx::cp_async_wait_all();
      __syncwarp();
      // 3. MMAs over this warp's k-tiles; B fragments by ldmatrix from the [n][k] tile:
      //    B[k][n] = h[n][k]
#pragma unroll
      for (int kt = 0; kt < KT; ++kt) {
        const int kg = warp * KT + kt;
        if (kg >= KTILES) break;
        uint32_t bf[NT][Mma::kB];
        Mma::template load_b<NT>(bf, hs, RS, kg * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) Mma::mma(acc[mt][nt], a[mt][kt], bf[nt]);
      }
    }
    // partial sums: c[i] = C[gq + 8(i>>1)][2tq + (i&1)] -> part[warp][row][n]
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          part[(warp * MR + mt * 16 + gq + 8 * (i >> 1)) * NB + nt * 8 + 2 * tq + (i & 1)] = acc[mt][nt][i];
    __syncthreads();
    if (FR_PERSISTENT_V2_MUTATION == 2 && threadIdx.x == 0) fr_ptx::st_release_gpu(my_flag, unsigned(s + 2));

    // ---- pointwise on every thread: sum the partials, the cell, the stores
    S* h_next = h_buf + ((s + 1) & 1) * B * Hs;
#pragma unroll
    for (int i = 0; i < PP; ++i) {
      int ul, bl;
      if (!sl.pair(i, ul, bl)) continue;
      const int64_t u = u0 + ul, b = b0 + bl, tb = t * B + b;
      S* sg = p.gates ? static_cast<S*>(p.gates) + tb * 4 * H : nullptr;
      if (alive[i]) {
        float gh[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float v = bias[i][g];
#pragma unroll
          for (int w = 0; w < kV2Warps; ++w) v += part[(w * MR + g * U + ul) * NB + bl];
          gh[g] = v;
        }
        float hn;
        if constexpr (C == Cell::LSTM) {
          float ig, fg, gg, og, cn;
          lstm_step_forward<float>(gxv[i][0] + gh[0], gxv[i][1] + gh[1], gxv[i][2] + gh[2], gxv[i][3] + gh[3],
                                   c_reg[i], ig, fg, gg, og, cn, hn);
          c_reg[i] = cn;
          if (sg) {
            sg[u] = L::store(ig);
            sg[H + u] = L::store(fg);
            sg[2 * H + u] = L::store(gg);
            sg[3 * H + u] = L::store(og);
            static_cast<float*>(p.cells)[tb * H + u] = cn;
          }
        } else if constexpr (C == Cell::GRU) {
          float r, z, n;
          gru_step_forward<float>(gxv[i][0], gxv[i][1], gxv[i][2], gh[0], gh[1], gh[2], h_reg[i], r, z, n, hn);
          if (sg) {
            sg[u] = L::store(r);
            sg[H + u] = L::store(z);
            sg[2 * H + u] = L::store(n);
            sg[3 * H + u] = L::store(gh[2]);
          }
        } else {
          hn = rnn_step_forward<C == Cell::RNN_RELU, float>(gxv[i][0] + gh[0]);
        }
        const S hs_out = L::store(hn);
        h_reg[i] = L::load(hs_out);  // the next step multiplies the stored (rounded) h, as the per-step path
        y[tb * H + u] = hs_out;
      } else {  // finished row: state frozen, output zero, saved tensors written all the same
        y[tb * H + u] = L::store(0.f);
        if (sg) {
          for (int g = 0; g < 4; ++g) sg[g * H + u] = L::store(0.f);
          if (C == Cell::LSTM) static_cast<float*>(p.cells)[tb * H + u] = c_reg[i];
        }
      }
      h_next[b * Hs + u] = L::store(h_reg[i]);
    }
    __syncthreads();  // every h of the epoch written (and every partial read) before the release
    if (FR_PERSISTENT_V2_MUTATION != 2 && threadIdx.x == 0) fr_ptx::st_release_gpu(my_flag, unsigned(s + 2));
  }

#pragma unroll
  for (int i = 0; i < PP; ++i) {
    int ul, bl;
    if (!sl.pair(i, ul, bl)) continue;
    const int64_t idx = (b0 + bl) * H + u0 + ul;
    static_cast<S*>(p.h_n)[idx] = L::store(h_reg[i]);
    if (C == Cell::LSTM) static_cast<S*>(p.c_n)[idx] = L::store(c_reg[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: the forward's steps in reverse order, with the same ownership and the same tiling.
//
// Per step, every thread runs the cell's pointwise backward for its (unit, batch row) pairs from the
// saved gates and cells (the per-step path's, so either forward may precede), writes dgx / dgh, and
// puts the CTA's dG_h (the G*U values that multiply w_hh) into shared memory. The CTA's rows of w_hh
// are resident transposed — warp w holds W_rows^T for its k-tiles as A fragments (M = k, K = rows) —
// so its MMAs give the CTA's partial dh_prev[b, k] = sum over its rows r of dG_h[b, r] * W[r, k] for
// the warp's k. Each CTA writes its partial [8*NT][16*k_tiles] to its own slot, releases its flag;
// then the owner of units [x*U, x*U + U) acquires every flag of its batch group and sums the slots
// in CTA order 0, 1, 2, ... — a deterministic reduce-scatter through L2. The carried dh and dc stay
// in registers. Partial slots are double-buffered by step parity, safe for the forward's reason.
// d w_hh (one GEMM over all steps) and d b_hh (a sum of dgh) stay outside.
// ------------------------------------------------------------------------------------------------
template <Cell C, typename S, int MT, int KT, int NT, V2Math M = V2Math::Mma16>
FR_KERNEL void FR_V2_LAUNCH_BOUNDS
    persistent_v2_backward_kernel(PersistentBackwardParams p, PersistentV2Layout lay) {
  using L = Conv<S>;
  using Mma = V2Mma<S, M>;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr int NB = 8 * NT, MR = 16 * MT, MRS = MR + 16 / int(sizeof(S));  // rows padded by 16 bytes
  constexpr int PP = ((MR / G) * NB + kV2Threads - 1) / kV2Threads;

  const int64_t T = p.T, B = p.B, H = p.H, GH = G * H;
  const int U = lay.units, KTILES = lay.k_tiles;
  if (U <= 0 || G * U > MR || KTILES != (H + 15) / 16 || KTILES > kV2Warps * KT) v2_trap();
  const int64_t Hs = 16 * int64_t(KTILES);
  const V2Slice sl = v2_slice<NB>(H, B, U);
  const int warp = sl.warp, lane = sl.lane, gq = sl.gq, tq = sl.tq;
  const int n_cta = int(gridDim.x);

  FR_SHARED_DYNAMIC(S, dgs);  // [NB][MRS]: dG_h of this CTA's rows, batch-major
  for (int i = int(threadIdx.x); i < NB * MRS; i += kV2Threads) dgs[i] = L::store(0.f);  // padding stays 0

  // ---- W_rows^T -> A fragments of each 16x16 tile, A[m = k][kk = row] = W[row][k]
  const S* W = static_cast<const S*>(p.w_hh);
  uint32_t a[KT][MT][Mma::kA];
#pragma unroll
  for (int kt = 0; kt < KT; ++kt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int64_t k0 = int64_t(warp * KT + kt) * 16;
      Mma::load_a(a[kt][mt], gq, tq, [&](int m, int kk) { return w_slice_at<G>(W, H, U, sl, mt * 16 + kk, k0 + m); });
    }

  float dh_reg[PP], dc_reg[PP];
#pragma unroll
  for (int i = 0; i < PP; ++i) {
    int ul, bl;
    if (!sl.pair(i, ul, bl)) continue;
    const int64_t idx = (sl.b0 + bl) * H + sl.u0 + ul;
    dh_reg[i] = L::load(static_cast<const S*>(p.dh_n)[idx]);
    dc_reg[i] = C == Cell::LSTM ? L::load(static_cast<const S*>(p.dc_n)[idx]) : 0.f;
  }
  __syncthreads();

  const S* dy = static_cast<const S*>(p.dy);
  const S* gates = static_cast<const S*>(p.gates);
  const S* y = static_cast<const S*>(p.y);
  S* dgx = static_cast<S*>(p.dgx);
  S* dgh = static_cast<S*>(p.dgh);
  unsigned* group_flags = lay.flags + blockIdx.y * gridDim.x;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? s : T - 1 - s;          // the forward's steps, last first
    const int64_t t_prev = p.reverse ? t + 1 : t - 1;     // the step the forward ran before t
    // ---- 1. pointwise backward of own pairs -> dgx, dgh, and dG_h into shared memory
    float direct[PP];
    bool alive[PP];
#pragma unroll
    for (int i = 0; i < PP; ++i) {
      int ul, bl;
      alive[i] = false;
      direct[i] = 0.f;
      if (!sl.pair(i, ul, bl)) continue;
      const int64_t u = sl.u0 + ul, b = sl.b0 + bl, bu = b * H + u, tb = t * B + b;
      S* dgx_r = dgx + tb * GH;
      S* dgh_r = dgh + tb * GH;
      float dgate[G];
      alive[i] = row_valid(p.lengths, b, t);
      if (!alive[i]) {  // nothing flows through a finished step; dh and dc are carried past it
#pragma unroll
        for (int g = 0; g < G; ++g) dgate[g] = 0.f;
#pragma unroll
        for (int g = 0; g < G; ++g) dgx_r[g * H + u] = dgh_r[g * H + u] = L::store(0.f);
      } else {
        const int64_t len = p.lengths ? p.lengths[b] : T;
        const bool first = p.reverse ? t == len - 1 : t == 0;
        const float dh = L::load(dy[tb * H + u]) + dh_reg[i];
        const S* sg = gates ? gates + tb * 4 * H : nullptr;  // RNN saves no gates
        if constexpr (C == Cell::LSTM) {
          const float* cells = static_cast<const float*>(p.cells);
          const float c_prev = first ? L::load(static_cast<const S*>(p.c0)[bu]) : cells[t_prev * B * H + bu];
          lstm_step_backward<float>(L::load(sg[u]), L::load(sg[H + u]), L::load(sg[2 * H + u]), L::load(sg[3 * H + u]),
                                    c_prev, cells[tb * H + u], dh, dc_reg[i], dgate[0], dgate[1], dgate[2], dgate[3],
                                    dc_reg[i]);
        } else if constexpr (C == Cell::GRU) {
          const float h_prev = L::load(first ? static_cast<const S*>(p.h0)[bu] : y[t_prev * B * H + bu]);
          float d_gx_n;
          gru_step_backward<float>(L::load(sg[u]), L::load(sg[H + u]), L::load(sg[2 * H + u]), L::load(sg[3 * H + u]),
                                   h_prev, dh, dgate[0], dgate[1], d_gx_n, dgate[2], direct[i]);
          dgx_r[2 * H + u] = L::store(d_gx_n);  // the input part; dgate[2] is d gh_n = d_gx_n * r
        } else {
          dgate[0] = rnn_step_backward<C == Cell::RNN_RELU, float>(L::load(y[tb * H + u]), dh);
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (C != Cell::GRU || g != 2) dgx_r[g * H + u] = L::store(dgate[g]);
          if (dgh != dgx) dgh_r[g * H + u] = L::store(dgate[g]);
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) dgs[bl * MRS + g * U + ul] = L::store(dgate[g]);
    }
    __syncthreads();

    // ---- 2. partial dh_prev of this CTA's rows for the warp's k-tiles -> its slot in L2
    float* slot = lay.partials + ((size_t(s & 1) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * NB * Hs;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int kg = warp * KT + kt;
      if (kg >= KTILES) break;
      float acc[NT][4] = {};
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t bf[NT][Mma::kB];  // B[kk = row][n = b] = dG_h[b][row]
        Mma::template load_b<NT>(bf, dgs, MRS, mt * 16, lane);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Mma::mma(acc[nt], a[kt][mt], bf[nt]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)  // d[i] = D[m = k: gq + 8(i>>1)][n = b: 2tq + (i&1)]
#pragma unroll
        for (int i = 0; i < 4; ++i)
          slot[(nt * 8 + 2 * tq + (i & 1)) * Hs + kg * 16 + gq + 8 * (i >> 1)] = acc[nt][i];
    }
    __syncthreads();  // the whole slot written, and every dG_h read, before the release
    if (threadIdx.x == 0) fr_ptx::st_release_gpu(group_flags + blockIdx.x, unsigned(s + 1));

    // ---- 3. reduce: dh_prev of own units = sum of every CTA's partial, in CTA order
    if (FR_PERSISTENT_V2_MUTATION != 3) wait_flags(group_flags, n_cta, unsigned(s + 1), int(threadIdx.x), kV2Threads);
    __syncthreads();
    const float* slots = lay.partials + (size_t(s & 1) * gridDim.y + blockIdx.y) * gridDim.x * NB * Hs;
#pragma unroll
    for (int i = 0; i < PP; ++i) {
      int ul, bl;
      if (!sl.pair(i, ul, bl)) continue;
      float sum = 0.f;
      for (int x = 0; x < n_cta; ++x) sum += slots[(size_t(x) * NB + bl) * Hs + sl.u0 + ul];
      dh_reg[i] = (alive[i] ? direct[i] : dh_reg[i]) + sum;
    }
  }

#pragma unroll
  for (int i = 0; i < PP; ++i) {
    int ul, bl;
    if (!sl.pair(i, ul, bl)) continue;
    const int64_t idx = (sl.b0 + bl) * H + sl.u0 + ul;
    static_cast<S*>(p.dh0)[idx] = L::store(dh_reg[i]);
    if (C == Cell::LSTM) static_cast<S*>(p.dc0)[idx] = L::store(dc_reg[i]);
  }
}

}  // namespace cuda
}  // namespace fused_rnn
