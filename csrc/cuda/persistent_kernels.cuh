// The persistent recurrence kernels: all T steps of one layer and direction in one cooperative
// launch. Kernel bodies only (no launches, no runtime API, no torch): csrc/cuda/persistent.cu
// launches them on a GPU, tests/emu/kernels_persistent.cpp runs them on CPU threads under the
// emulator (compat.cuh). The layout (blocks, units per block, shared bytes) is persistent_plan.h's.
//
// Ownership: block k owns hidden units [k*U, k*U + U) and every gate row of them, so the cell
// state and the pointwise math stay inside the block. Its slice of w_hh (forward: rows g*H + u,
// backward: columns u) sits in shared memory for the whole sequence — read from HBM/L2 once
// instead of once per step. Per step the block reads h_{t-1} (all of it, from L2), computes its
// G*U gate rows for every batch row, applies the cell, writes its part of h_t, then the whole grid
// meets at one barrier. h is double-buffered: step s reads h_buf[(s-1) & 1] and writes
// h_buf[s & 1], so a block that has passed the barrier and writes step s+1's h never overwrites
// what a slower block is still reading for step s. This first version multiplies on
// CUDA cores with fp32 accumulation; see benchmarks/NOTES.md for the floor, the prediction and what
// to measure first on a GPU.
//
// Backward per step: phase 1 (thread per (b, unit)): the cell's pointwise backward for own units,
// writing dG; grid barrier; phase 2 (warp per (b, unit)): dh_prev for own units = dG[t] . w_hh[:, u],
// with the column slice of w_hh in shared memory. Each step's dG goes to its own slot of dgx/dgh,
// so one barrier per step suffices.
#pragma once

#include "compat.cuh"

#include <type_traits>

#include "../persistent_params.h"
#include "../recurrence_step.h"
#include "conv_cuda.cuh"
#include "persistent_plan.h"

namespace fused_rnn {
namespace cuda {

constexpr int kWarps = kPersistentThreads / 32;

FR_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <Cell C, typename S>
FR_KERNEL void FR_LAUNCH_BOUNDS(kPersistentThreads) persistent_forward_kernel(PersistentForwardParams p, int U) {
  using L = Conv<S>;
  constexpr int G = gates_of<C>();
  FR_SHARED_DYNAMIC(S, w);  // [G*U, H]: row g*U + ul holds w_hh[g*H + u0 + ul, :]

  const int64_t T = p.T, B = p.B, H = p.H, GH = G * H;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t Uc = u0 >= H ? 0 : (H - u0 < U ? H - u0 : U);  // units this block owns
  const S* W = static_cast<const S*>(p.w_hh);
  for (int64_t i = threadIdx.x; i < G * Uc * H; i += blockDim.x) {
    const int64_t r = i / H, k = i % H, g = r / Uc, ul = r % Uc;
    w[(g * U + ul) * H + k] = W[(g * H + u0 + ul) * H + k];
  }
  const S* gx = static_cast<const S*>(p.gx);
  const S* bias = static_cast<const S*>(p.b_hh);
  const S* h0 = static_cast<const S*>(p.h0);
  S* y = static_cast<S*>(p.y);
  S* h_buf = static_cast<S*>(p.h_buf);
  float* c_state = static_cast<float*>(p.c_state);
  if (C == Cell::LSTM) {
    for (int64_t i = threadIdx.x; i < B * Uc; i += blockDim.x) {
      const int64_t idx = (i / Uc) * H + u0 + i % Uc;
      c_state[idx] = L::load(static_cast<const S*>(p.c0)[idx]);
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? T - 1 - s : s;
    const S* h_prev = s == 0 ? h0 : h_buf + ((s - 1) & 1) * B * H;
    S* h_cur = h_buf + (s & 1) * B * H;
    for (int64_t pair = warp; pair < B * Uc; pair += kWarps) {
      const int64_t b = pair / Uc, ul = pair % Uc, u = u0 + ul;
      const bool valid = row_valid(p.lengths, b, t);  // the same for the whole warp
      float acc[G];
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g] = 0.f;
      if (valid) {
        const S* hrow = h_prev + b * H;
        for (int64_t k = lane; k < H; k += 32) {
          const float hv = L::load(hrow[k]);
#pragma unroll
          for (int g = 0; g < G; ++g) acc[g] += hv * L::load(w[(g * U + ul) * H + k]);
        }
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] = warp_sum(acc[g]);
      }
      if (lane != 0) continue;
      const int64_t bu = b * H + u, tb = t * B + b;
      if (!valid) {  // frozen state, zero output; the saved tensors are outputs too, so written as well
        h_cur[bu] = h_prev[bu];
        y[tb * H + u] = L::store(0.f);
        if (p.gates) {
          S* sg = static_cast<S*>(p.gates) + tb * 4 * H;
          for (int k = 0; k < 4; ++k) sg[k * H + u] = L::store(0.f);
          if (C == Cell::LSTM) static_cast<float*>(p.cells)[tb * H + u] = c_state[bu];
        }
        continue;
      }
      const S* gxr = gx + tb * GH;
      float gh[G];
#pragma unroll
      for (int g = 0; g < G; ++g) gh[g] = acc[g] + (bias ? L::load(bias[g * H + u]) : 0.f);
      float hn;
      if constexpr (C == Cell::LSTM) {
        float i, f, gg, o, cn;
        lstm_step_forward<float>(L::load(gxr[u]) + gh[0], L::load(gxr[H + u]) + gh[1],
                                 L::load(gxr[2 * H + u]) + gh[2], L::load(gxr[3 * H + u]) + gh[3],
                                 c_state[bu], i, f, gg, o, cn, hn);
        if (p.gates) {
          S* sg = static_cast<S*>(p.gates) + tb * 4 * H;
          sg[u] = L::store(i);
          sg[H + u] = L::store(f);
          sg[2 * H + u] = L::store(gg);
          sg[3 * H + u] = L::store(o);
          static_cast<float*>(p.cells)[tb * H + u] = cn;
        }
        c_state[bu] = cn;
      } else if constexpr (C == Cell::GRU) {
        float r, z, n;
        gru_step_forward<float>(L::load(gxr[u]), L::load(gxr[H + u]), L::load(gxr[2 * H + u]), gh[0], gh[1],
                                gh[2], L::load(h_prev[bu]), r, z, n, hn);
        if (p.gates) {
          S* sg = static_cast<S*>(p.gates) + tb * 4 * H;
          sg[u] = L::store(r);
          sg[H + u] = L::store(z);
          sg[2 * H + u] = L::store(n);
          sg[3 * H + u] = L::store(gh[2]);
        }
      } else {
        hn = rnn_step_forward<C == Cell::RNN_RELU, float>(L::load(gxr[u]) + gh[0]);
      }
      h_cur[bu] = L::store(hn);
      y[tb * H + u] = L::store(hn);
    }
    fr_grid_sync();  // h_t complete everywhere before any block reads it
  }
  const S* h_last = h_buf + ((T - 1) & 1) * B * H;
  for (int64_t i = threadIdx.x; i < B * Uc; i += blockDim.x) {
    const int64_t idx = (i / Uc) * H + u0 + i % Uc;
    static_cast<S*>(p.h_n)[idx] = h_last[idx];
    if (C == Cell::LSTM) static_cast<S*>(p.c_n)[idx] = L::store(c_state[idx]);
  }
}

template <Cell C, typename S>
FR_KERNEL void FR_LAUNCH_BOUNDS(kPersistentThreads) persistent_backward_kernel(PersistentBackwardParams p, int U) {
  using L = Conv<S>;
  constexpr int G = gates_of<C>();
  FR_SHARED_DYNAMIC(S, wt);  // [U, G*H]: row ul holds w_hh[:, u0 + ul]

  const int64_t T = p.T, B = p.B, H = p.H, GH = G * H;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t Uc = u0 >= H ? 0 : (H - u0 < U ? H - u0 : U);
  const S* W = static_cast<const S*>(p.w_hh);
  for (int64_t i = threadIdx.x; i < Uc * GH; i += blockDim.x) {
    const int64_t row = i / Uc, ul = i % Uc;  // consecutive threads read consecutive columns
    wt[ul * GH + row] = W[row * H + u0 + ul];
  }
  float* dh_state = static_cast<float*>(p.dh_state);
  float* dc_state = static_cast<float*>(p.dc_state);
  for (int64_t i = threadIdx.x; i < B * Uc; i += blockDim.x) {
    const int64_t idx = (i / Uc) * H + u0 + i % Uc;
    dh_state[idx] = L::load(static_cast<const S*>(p.dh_n)[idx]);
    if (C == Cell::LSTM) dc_state[idx] = L::load(static_cast<const S*>(p.dc_n)[idx]);
  }
  __syncthreads();

  const S* dy = static_cast<const S*>(p.dy);
  const S* gates = static_cast<const S*>(p.gates);
  const S* y = static_cast<const S*>(p.y);
  S* dgx = static_cast<S*>(p.dgx);
  S* dgh = static_cast<S*>(p.dgh);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t s = 0; s < T; ++s) {
    // the forward's steps in reverse order
    const int64_t t = p.reverse ? s : T - 1 - s;
    const int64_t t_prev = p.reverse ? t + 1 : t - 1;  // the step processed before t in the forward
    // phase 1: pointwise backward of own units
    for (int64_t i = threadIdx.x; i < B * Uc; i += blockDim.x) {
      const int64_t b = i / Uc, u = u0 + i % Uc, bu = b * H + u, tb = t * B + b;
      S* dgx_r = dgx + tb * GH;
      S* dgh_r = dgh + tb * GH;
      if (!row_valid(p.lengths, b, t)) {  // nothing flows through a frozen step; dh, dc carried
#pragma unroll
        for (int g = 0; g < G; ++g) dgx_r[g * H + u] = dgh_r[g * H + u] = L::store(0.f);
        continue;
      }
      const int64_t len = p.lengths ? p.lengths[b] : T;
      const bool first = p.reverse ? t == len - 1 : t == 0;
      const float dh = L::load(dy[tb * H + u]) + dh_state[bu];
      if constexpr (C == Cell::LSTM) {
        const S* sg = gates + tb * 4 * H;
        const float* cells = static_cast<const float*>(p.cells);
        const float c_prev = first ? L::load(static_cast<const S*>(p.c0)[bu]) : cells[t_prev * B * H + bu];
        float di, df, dg, dout, dc_prev;
        lstm_step_backward<float>(L::load(sg[u]), L::load(sg[H + u]), L::load(sg[2 * H + u]),
                                  L::load(sg[3 * H + u]), c_prev, cells[tb * H + u], dh, dc_state[bu],
                                  di, df, dg, dout, dc_prev);
        dgx_r[u] = L::store(di);
        dgx_r[H + u] = L::store(df);
        dgx_r[2 * H + u] = L::store(dg);
        dgx_r[3 * H + u] = L::store(dout);
        dc_state[bu] = dc_prev;
        dh_state[bu] = 0.f;
      } else if constexpr (C == Cell::GRU) {
        const S* sg = gates + tb * 4 * H;
        const float h_prev = L::load(first ? static_cast<const S*>(p.h0)[bu] : y[t_prev * B * H + bu]);
        float dr, dz, dn, dghn, direct;
        gru_step_backward<float>(L::load(sg[u]), L::load(sg[H + u]), L::load(sg[2 * H + u]),
                                 L::load(sg[3 * H + u]), h_prev, dh, dr, dz, dn, dghn, direct);
        dgx_r[u] = dgh_r[u] = L::store(dr);
        dgx_r[H + u] = dgh_r[H + u] = L::store(dz);
        dgx_r[2 * H + u] = L::store(dn);
        dgh_r[2 * H + u] = L::store(dghn);
        dh_state[bu] = direct;
      } else {
        dgx_r[u] = L::store(rnn_step_backward<C == Cell::RNN_RELU, float>(L::load(y[tb * H + u]), dh));
        dh_state[bu] = 0.f;
      }
    }
    fr_grid_sync();  // dG[t] complete everywhere
    // phase 2: dh_prev[b, u] += dG_h[t, b, :] . w_hh[:, u] for own units
    for (int64_t pair = warp; pair < B * Uc; pair += kWarps) {
      const int64_t b = pair / Uc, ul = pair % Uc;
      if (!row_valid(p.lengths, b, t)) continue;  // dG is zero there
      const S* d = dgh + (t * B + b) * GH;
      const S* col = wt + ul * GH;
      float acc = 0.f;
      for (int64_t r = lane; r < GH; r += 32) acc += L::load(d[r]) * L::load(col[r]);
      acc = warp_sum(acc);
      if (lane == 0) dh_state[b * H + u0 + ul] += acc;
    }
    __syncthreads();  // phase 1 of the next step reads dh_state written here by other threads
  }
  for (int64_t i = threadIdx.x; i < B * Uc; i += blockDim.x) {
    const int64_t idx = (i / Uc) * H + u0 + i % Uc;
    static_cast<S*>(p.dh0)[idx] = L::store(dh_state[idx]);
    if (C == Cell::LSTM) static_cast<S*>(p.dc0)[idx] = L::store(dc_state[idx]);
  }
}

// Calls f(cell, storage) with the cell as a std::integral_constant and a value of the storage type:
// the one (cell, dtype) switch of the launcher and of the emulated driver. Float64 has no instance.
template <typename F> void dispatch_persistent(Cell cell, DType dtype, F&& f) {
  dispatch_cell(cell, [&](auto c) {
    switch (dtype) {
      case DType::Float32: f(c, float{}); break;
      case DType::Float16: f(c, __half{}); break;
      case DType::BFloat16: f(c, __nv_bfloat16{}); break;
      case DType::Float64: break;
    }
  });
}

}  // namespace cuda
}  // namespace fused_rnn
