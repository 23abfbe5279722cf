// Persistent recurrence, version 2: tensor cores, w_hh resident in registers, per-step flags.
// Kernel bodies only (no launches, no runtime API, no torch): compiled by nvcc for the GPU and by a
// host compiler under the CPU emulator (compat.cuh, ptx.cuh; tests/test_cuda_persistent_v2.py).
// The budget this is written to, shape by shape: benchmarks/PERSISTENT_V2.md.
//
// Ownership. CTA (x, y) owns hidden units [x*U, x*U + U) with all G gate rows of them — so the cell
// state and the gate pointwise stay in the CTA — for batch rows [y*8*NT, y*8*NT + 8*NT). Its G*U
// rows of w_hh, gate-major (row g*U + ul is w_hh[g*H + x*U + ul, :]), padded with zeros to MT
// m-tiles of 16, are the A operand of mma.sync.m16n8k16 (bf16 or fp16 in, fp32 accumulation).
//
// Warps split K. Warp w owns k-tiles [w*KT, w*KT + KT) of the ceil(H/16) k-tiles: its A fragments
// (MT*KT*4 registers per thread) are loaded once and stay in registers for all T steps. Per step it
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

// Planted bugs for the mutation tests (tests/test_cuda_persistent_v2.py); 0 in every real build.
//   1: a warp reads h without waiting for its producers' flags
//   2: a CTA publishes its flag before writing the h it announces
#ifndef FR_PERSISTENT_V2_MUTATION
#define FR_PERSISTENT_V2_MUTATION 0
#endif

namespace fused_rnn {
namespace cuda {

constexpr int kV2Threads = 256;
constexpr int kV2Warps = kV2Threads / 32;

// What the launch adds to PersistentForwardParams. h_buf there is S [2, B, 16*k_tiles] (rows padded
// to whole k-tiles, so that every 16-byte copy is aligned; the padding is never read).
struct PersistentV2Layout {
  int units;        // U: hidden units per CTA (G*U <= 16*MT)
  int k_tiles;      // ceil(H / 16) (<= 8*KT)
  unsigned* flags;  // [gridDim.y * gridDim.x], zero at launch
};

// Dynamic shared memory of one CTA: the h tile [8*NT][16*k_tiles + 8] of 16-bit values (rows padded
// by 16 bytes: the 8 row addresses of one ldmatrix fall in different banks), then the partial sums
// [warps][16*MT][8*NT] fp32.
template <int MT, int NT>
constexpr size_t v2_forward_smem_bytes(int k_tiles) {
  return size_t(8 * NT) * size_t(16 * k_tiles + 8) * 2 + size_t(kV2Warps) * 16 * MT * 8 * NT * 4;
}

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

template <Cell C, typename S, int MT, int KT, int NT>
FR_KERNEL void FR_LAUNCH_BOUNDS(kV2Threads)
    persistent_v2_forward_kernel(PersistentForwardParams p, PersistentV2Layout lay) {
  static_assert(std::is_same<S, __nv_bfloat16>::value || std::is_same<S, __half>::value,
                "the tensor-core forward takes bf16 or fp16 storage");
  using L = Conv<S>;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr int NB = 8 * NT;                                    // batch rows per CTA
  constexpr int MR = 16 * MT;                                   // w_hh rows per CTA, padded
  constexpr int PP = ((MR / G) * NB + kV2Threads - 1) / kV2Threads;  // (unit, row) pairs per thread

  const int64_t T = p.T, B = p.B, H = p.H, GH = G * H;
  const int U = lay.units, KTILES = lay.k_tiles;
  if (U <= 0 || G * U > MR || KTILES != (H + 15) / 16 || KTILES > kV2Warps * KT) v2_trap();
  const int64_t Hs = 16 * int64_t(KTILES), RS = Hs + 8;  // exchange-buffer row, shared-tile row
  const int64_t u0 = int64_t(blockIdx.x) * U, b0 = int64_t(blockIdx.y) * NB;
  const int Uc = int(H - u0 < U ? H - u0 : U);     // units this CTA owns (the last may own fewer)
  const int Bc = int(B - b0 < NB ? B - b0 : NB);   // batch rows it owns
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int gq = lane / 4, tq = lane % 4;          // the mma fragment tables' groupID, threadID_in_group

  FR_SHARED_DYNAMIC(unsigned char, smem);
  S* hs = reinterpret_cast<S*>(smem);                                          // [NB][RS]
  float* part = reinterpret_cast<float*>(smem + size_t(NB) * size_t(RS) * sizeof(S));  // [warps][MR][NB]

  const S* W = static_cast<const S*>(p.w_hh);
  const S* gx = static_cast<const S*>(p.gx);
  S* y = static_cast<S*>(p.y);
  S* h_buf = static_cast<S*>(p.h_buf);
  unsigned* my_flag = lay.flags + blockIdx.y * gridDim.x + blockIdx.x;

  // ---- w_hh rows -> A fragments: a[i] = A[gq + 8(i&1)][2tq + 8(i>>1) + {0,1}] of each 16x16 tile
  auto w_at = [&](int row, int64_t k) -> S {
    const int g = row / U, ul = row % U;
    if (g >= G || ul >= Uc || k >= H) return L::store(0.f);
    return W[(g * H + u0 + ul) * H + k];
  };
  uint32_t a[MT][KT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kt = 0; kt < KT; ++kt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = mt * 16 + gq + 8 * (i & 1);
        const int64_t k = int64_t(warp * KT + kt) * 16 + 2 * tq + 8 * (i >> 1);
        a[mt][kt][i] = pack_pair(w_at(row, k), w_at(row, k + 1));
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
    const int q = int(threadIdx.x) + i * kV2Threads;
    if (q >= Uc * Bc) continue;
    const int64_t u = u0 + q % Uc, b = b0 + q / Uc;
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
      const int q = int(threadIdx.x) + i * kV2Threads;
      alive[i] = q < Uc * Bc && row_valid(p.lengths, b0 + q / Uc, t);
#pragma unroll
      for (int g = 0; g < G; ++g)
        gxv[i][g] = alive[i] ? L::load(gx[(t * B + b0 + q / Uc) * GH + g * H + u0 + q % Uc]) : 0.f;
    }

    float acc[MT][NT][4] = {};

    if (warp_works) {
      // 1. wait for epoch s of exactly the units this warp reads
#if FR_PERSISTENT_V2_MUTATION != 1
      for (int j = lane; j < n_producers; j += 32) fr_ptx::wait_flag_geq_gpu(producer_flags + j, unsigned(s + 1));
#endif
      __syncwarp();
      // 2. its K slice of the batch tile, h_{t-1}, into shared memory: 16-byte chunks of 8 values
      const S* h_prev = h_buf + (s & 1) * B * Hs;
      constexpr int kChunks = 2 * KT;  // per batch row
      for (int c = lane; c < NB * kChunks; c += 32) {
        const int r = c / kChunks;
        const int64_t k = k_lo + (c % kChunks) * 8;
        if (k >= Hs) continue;  // past the last k-tile: never read
        const int64_t b = b0 + r;
        const int64_t valid = b < B ? (H - k < 8 ? (H - k > 0 ? H - k : 0) : 8) : 0;
        fr_ptx::cp_async_cg16(hs + r * RS + k, h_prev + (b < B ? b : 0) * Hs + k, unsigned(valid * 2));
      }
      fr_ptx::cp_async_wait_all();
      __syncwarp();
      // 3. MMAs over this warp's k-tiles; B fragments by ldmatrix from the [n][k] tile:
      //    b[i] = B[2tq + 8i + {0,1}][gq] = h[n = gq][k = 2tq + 8i + {0,1}]
#pragma unroll
      for (int kt = 0; kt < KT; ++kt) {
        const int kg = warp * KT + kt;
        if (kg >= KTILES) break;
        uint32_t bf[NT][2];
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {  // two n-tiles per ldmatrix.x4
          const int j = lane / 8;
          uint32_t r4[4];
          fr_ptx::ldmatrix<4>(r4, hs + (np * 16 + (j / 2) * 8 + lane % 8) * RS + kg * 16 + (j % 2) * 8);
          bf[2 * np][0] = r4[0];
          bf[2 * np][1] = r4[1];
          bf[2 * np + 1][0] = r4[2];
          bf[2 * np + 1][1] = r4[3];
        }
        if constexpr (NT % 2 == 1) {
          const int j = (lane / 8) % 2;
          uint32_t r2[2];
          fr_ptx::ldmatrix<2>(r2, hs + ((NT - 1) * 8 + lane % 8) * RS + kg * 16 + j * 8);
          bf[NT - 1][0] = r2[0];
          bf[NT - 1][1] = r2[1];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) fr_ptx::mma_m16n8k16<S>(acc[mt][nt], a[mt][kt], bf[nt], acc[mt][nt]);
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
#if FR_PERSISTENT_V2_MUTATION == 2
    if (threadIdx.x == 0) fr_ptx::st_release_gpu(my_flag, unsigned(s + 2));
#endif

    // ---- pointwise on every thread: sum the partials, the cell, the stores
    S* h_next = h_buf + ((s + 1) & 1) * B * Hs;
#pragma unroll
    for (int i = 0; i < PP; ++i) {
      const int q = int(threadIdx.x) + i * kV2Threads;
      if (q >= Uc * Bc) continue;
      const int ul = q % Uc, bl = q / Uc;
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
#if FR_PERSISTENT_V2_MUTATION != 2
    if (threadIdx.x == 0) fr_ptx::st_release_gpu(my_flag, unsigned(s + 2));
#endif
  }

#pragma unroll
  for (int i = 0; i < PP; ++i) {
    const int q = int(threadIdx.x) + i * kV2Threads;
    if (q >= Uc * Bc) continue;
    const int64_t idx = (b0 + q / Uc) * H + u0 + q % Uc;
    static_cast<S*>(p.h_n)[idx] = L::store(h_reg[i]);
    if (C == Cell::LSTM) static_cast<S*>(p.c_n)[idx] = L::store(c_reg[i]);
  }
}

}  // namespace cuda
}  // namespace fused_rnn
