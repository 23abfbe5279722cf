// CPU kernels of one cell step (LSTMCell / GRUCell / RNNCell), see cell_step_params.h.
//
// Forward at small batch ("dots"): the hidden units are split over threads; each thread computes
// all G gate rows of its units, x @ w_ih.T + h @ w_hh.T, as dot products that read every weight row
// once for the whole batch (register tiles of RB rows x BB batch rows, fp32/fp64 accumulators),
// then applies the cell math of cell_math.h to its units right away, so the pre-activations never
// leave the thread. At B=1 the step is bound by reading the weights; split over the cores' L2.
// At larger batch the caller runs the GEMMs and only the epilogue (bias + cell math) runs here.
// Backward: the pointwise derivative per batch row, then at small batch the four products in one
// pass over each weight matrix (backward_products_impl); at larger batch the caller's GEMMs.
//
// Included once per instruction set by cell_step_cpu.cpp (baseline + runtime dispatch),
// cell_step_cpu_avx2.cpp and cell_step_cpu_avx512.cpp, each under its own FR_ISA_NS and with
// FR_CELL_VEC_BYTES = its vector width. The includer has included <ATen/Parallel.h> and c10's
// BFloat16/Half/Exception headers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../cell_math.h"
#include "../cell_step_params.h"
#include "cell_step_bias.h"  // the ISA builds include it before their target pragma

#ifndef FR_CELL_VEC_BYTES
#define FR_CELL_VEC_BYTES 16
#endif

namespace fused_rnn {
namespace cpu {
inline namespace FR_ISA_NS {
namespace {

constexpr int64_t gates_of_cell(Cell c) { return c == Cell::LSTM ? 4 : c == Cell::GRU ? 3 : 1; }

// ---------------------------------------------------------------- scalar and vector loads
template <typename S> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

FR_HD float load1(float v) { return v; }
FR_HD double load1(double v) { return v; }
FR_HD float load1(c10::BFloat16 v) { return static_cast<float>(v); }
FR_HD float load1(c10::Half v) { return static_cast<float>(v); }
template <typename S, typename A> FR_HD S store1(A v) { return static_cast<S>(v); }

// One machine vector of accumulators (GCC vector extensions: the same source for every ISA).
typedef float vfloat __attribute__((vector_size(FR_CELL_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(FR_CELL_VEC_BYTES)));
typedef uint16_t vhalfwords __attribute__((vector_size(FR_CELL_VEC_BYTES / 2)));
typedef uint32_t vwords __attribute__((vector_size(FR_CELL_VEC_BYTES)));
template <typename A> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };

FR_HD vfloat load_vec(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FR_HD vdouble load_vec(const double* p) {
  vdouble v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FR_HD vfloat load_vec(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  vhalfwords raw;
  std::memcpy(&raw, p, sizeof raw);
  const vwords bits = __builtin_convertvector(raw, vwords) << 16;
  vfloat v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Register tile: RB weight rows x BB batch rows; 4 x 4 AVX-512 accumulators (+ 4 x, 1 w) fit in
// the 32 zmm registers, 2 x 4 fit in the 16 ymm/xmm of AVX2/SSE.
constexpr int kRB = FR_CELL_VEC_BYTES >= 64 ? 4 : 2;
constexpr int kBB = 4;

// acc[r][b] += w[r*K + k] * x[b*K + k] over k < K, lane-wise; the last K % L products go to tail.
template <typename S, int RB, int BB, typename A = typename AccT<S>::type, typename V = typename VecOf<A>::type>
FR_HD void dot_accumulate(const S* __restrict__ w, const S* __restrict__ x, int64_t K, V (&acc)[RB][BB],
                          A (&tail)[RB][BB]) {
  constexpr int L = sizeof(V) / sizeof(A);
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V xv[BB];
#pragma GCC unroll 4
    for (int b = 0; b < BB; ++b) xv[b] = load_vec(x + b * K + k);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const V wv = load_vec(w + r * K + k);
#pragma GCC unroll 4
      for (int b = 0; b < BB; ++b) acc[r][b] += wv * xv[b];
    }
  }
  for (; k < K; ++k)
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < BB; ++b) tail[r][b] += load1(w[r * K + k]) * load1(x[b * K + k]);
}

// Lane i of the result = the sum of the lanes of v[i], for L vectors of L lanes: log2(L) levels,
// each folding pairs of vectors into one (two shuffles and an add), so a tile's RB*BB sums cost a
// few instructions each instead of a log2(L)-step horizontal reduction apiece.
constexpr int fold_index(int i, int L, int W) {  // lane i of the "low halves" of x (i < L/2) and y
  const int half = L / 2, j = i % half;
  return (i < half ? 0 : L) + (j / (W / 2)) * W + j % (W / 2);
}
template <int L, int W, typename V, size_t... I>
FR_HD V fold_pair(V x, V y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, fold_index(I, L, W)...) +
         __builtin_shufflevector(x, y, (fold_index(I, L, W) + W / 2)...);
}
template <int L, int W, typename V>
FR_HD void fold_levels(V* v, int n) {
  if constexpr (W > 1) {
    for (int p = 0; p < n / 2; ++p) v[p] = fold_pair<L, W>(v[2 * p], v[2 * p + 1], std::make_index_sequence<L>{});
    fold_levels<L, W / 2>(v, n / 2);
  }
}

// out[b*ld + r] = sum of the lanes of acc[r][b] + tail[r][b] + bias[r] (bias may be null); resets acc.
template <typename S, int RB, int BB, typename A = typename AccT<S>::type, typename V = typename VecOf<A>::type>
FR_HD void dot_store(V (&acc)[RB][BB], A (&tail)[RB][BB], const S* bias, A* out, int64_t ld) {
  constexpr int L = sizeof(V) / sizeof(A);
  A sums[RB * BB];  // [b][r]
  if constexpr ((RB * BB) % L == 0) {
    V v[RB * BB];
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < BB; ++b) v[b * RB + r] = acc[r][b];
    for (int g = 0; g < RB * BB; g += L) {
      fold_levels<L, L>(v + g, L);
      for (int l = 0; l < L; ++l) sums[g + l] = v[g][l];
    }
  } else {
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < BB; ++b) {
        A s = 0;
        for (int l = 0; l < L; ++l) s += acc[r][b][l];
        sums[b * RB + r] = s;
      }
  }
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < BB; ++b) {
      out[b * ld + r] = sums[b * RB + r] + tail[r][b] + (bias ? load1(bias[r]) : A(0));
      acc[r][b] = V{};
      tail[r][b] = A(0);
    }
}

// Pre-activations of RB stacked-gate rows (from row r) for BB batch rows (from b): LSTM/RNN sum
// x@w_ih.T + h@w_hh.T + biases into pre_x; GRU (SPLIT) keeps the h part apart in pre_h.
template <bool SPLIT, typename S, int RB, int BB, typename A = typename AccT<S>::type>
FR_HD void dot_tile(const CellForwardParams& p, int64_t r, int64_t b) {
  using V = typename VecOf<A>::type;
  const int64_t I = p.I, H = p.H, GH = gates_of_cell(p.cell) * H;
  V acc[RB][BB] = {};
  A tail[RB][BB] = {};
  const S* b_ih = p.b_ih ? static_cast<const S*>(p.b_ih) + r : nullptr;
  const S* b_hh = p.b_hh ? static_cast<const S*>(p.b_hh) + r : nullptr;
  A* pre_x = static_cast<A*>(p.pre_x) + b * GH + r;
  dot_accumulate<S, RB, BB>(static_cast<const S*>(p.w_ih) + r * I, static_cast<const S*>(p.x) + b * I, I, acc, tail);
  if constexpr (SPLIT) dot_store<S, RB, BB>(acc, tail, b_ih, pre_x, GH);
  dot_accumulate<S, RB, BB>(static_cast<const S*>(p.w_hh) + r * H, static_cast<const S*>(p.h) + b * H, H, acc, tail);
  if constexpr (SPLIT) {
    dot_store<S, RB, BB>(acc, tail, b_hh, static_cast<A*>(p.pre_h) + b * GH + r, GH);
  } else {
    for (int i = 0; i < RB; ++i)  // both biases: fold b_ih into the tail, dot_store adds b_hh
      for (int j = 0; j < BB; ++j) tail[i][j] += b_ih ? load1(b_ih[i]) : A(0);
    dot_store<S, RB, BB>(acc, tail, b_hh, pre_x, GH);
  }
}

template <bool SPLIT, typename S, int RB>
FR_HD void dot_tile_any_batch(const CellForwardParams& p, int64_t r, int64_t b, int64_t nb) {
  switch (nb) {
    case 1: return dot_tile<SPLIT, S, RB, 1>(p, r, b);
    case 2: return dot_tile<SPLIT, S, RB, 2>(p, r, b);
    case 3: return dot_tile<SPLIT, S, RB, 3>(p, r, b);
    default: return dot_tile<SPLIT, S, RB, kBB>(p, r, b);
  }
}

// Pre-activations of stacked-gate rows [r0, r1) for every batch row: row tiles outside, so a tile
// of weight rows stays in L1 while every batch row passes over it.
template <bool SPLIT, typename S>
void gate_dots(const CellForwardParams& p, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRB <= r1; r += kRB)
    for (int64_t b = 0; b < p.B; b += kBB) dot_tile_any_batch<SPLIT, S, kRB>(p, r, b, std::min<int64_t>(kBB, p.B - b));
  for (; r < r1; ++r)
    for (int64_t b = 0; b < p.B; b += kBB) dot_tile_any_batch<SPLIT, S, 1>(p, r, b, std::min<int64_t>(kBB, p.B - b));
}

// ---------------------------------------------------------------- cell math per batch row
// Units [j0, j1) of batch row b: pre-activations -> h_out (c_out) and, when SAVE, what the
// backward reads. Plain loops over j with no branch, so GCC vectorises them.
//
// Every cell takes its biases here when BIAS (the GEMM path leaves them to this pass: one read of
// each instead of a pass over pre per bias, see cell_step_bias.h). LSTM runs fp32 with 512-bit
// vectors a vector of units at a time: lstm_step_forward on vector lanes, whose activations
// (cell_math.h) then use rcp14 in place of divisions. lstm_forward_unit is the one body: F = A for
// one unit, F = vfloat for a vector.
template <typename F, typename S> struct Lanes {  // one unit
  using A = typename AccT<S>::type;
  static FR_HD A load(const A* p) { return *p; }
  static FR_HD A load_s(const S* p) { return load1(*p); }
  static FR_HD void store(S* p, A v) { *p = store1<S>(v); }
};
template <> struct Lanes<vfloat, float> {  // a vector of units
  static FR_HD vfloat load(const float* p) { return load_vec(p); }
  static FR_HD vfloat load_s(const float* p) { return load_vec(p); }
  static FR_HD void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
};
template <> struct Lanes<vdouble, double> {  // a vector of units (fp64: the backward products)
  static FR_HD vdouble load(const double* p) { return load_vec(p); }
  static FR_HD vdouble load_s(const double* p) { return load_vec(p); }
  static FR_HD void store(double* p, vdouble v) { std::memcpy(p, &v, sizeof v); }
};
template <typename S> constexpr bool kVecUnits = std::is_same<S, float>::value && sizeof(vfloat) == 64;
constexpr int kVecLanes = sizeof(vfloat) / sizeof(float);

template <bool SAVE, bool BIAS, typename F, typename S, typename A>
FR_HD void lstm_forward_unit(const A* pre, const S* bx, const S* bh, const S* c, S* h_out, S* c_out, S* gates,
                             int64_t H, int64_t j) {
  using L = Lanes<F, S>;
  F p[4];
  for (int k = 0; k < 4; ++k) {
    p[k] = L::load(pre + k * H + j);
    if constexpr (BIAS) p[k] += L::load_s(bx + k * H + j) + L::load_s(bh + k * H + j);
  }
  F i, f, g, o, cn, hn;
  lstm_step_forward<F>(p[0], p[1], p[2], p[3], L::load_s(c + j), i, f, g, o, cn, hn);
  L::store(h_out + j, hn);
  L::store(c_out + j, cn);
  if constexpr (SAVE) {
    L::store(gates + j, i);
    L::store(gates + H + j, f);
    L::store(gates + 2 * H + j, g);
    L::store(gates + 3 * H + j, o);
  }
}

template <bool SAVE, bool BIAS, typename S, typename A = typename AccT<S>::type>
FR_HD void lstm_forward_row(const A* __restrict__ pre, const S* __restrict__ bx, const S* __restrict__ bh,
                            const S* __restrict__ c, S* __restrict__ h_out, S* __restrict__ c_out,
                            S* __restrict__ gates, int64_t H, int64_t j0, int64_t j1) {
  int64_t j = j0;
  if constexpr (kVecUnits<S>)
    for (; j + kVecLanes <= j1; j += kVecLanes)
      lstm_forward_unit<SAVE, BIAS, vfloat, S>(pre, bx, bh, c, h_out, c_out, gates, H, j);
  for (; j < j1; ++j) lstm_forward_unit<SAVE, BIAS, A, S>(pre, bx, bh, c, h_out, c_out, gates, H, j);
}

// pre[at] + b[at] when BIAS (b is then not null), else pre[at].
template <bool BIAS, typename S, typename A> FR_HD A with_bias(const A* pre, const S* b, int64_t at) {
  if constexpr (BIAS) return pre[at] + load1(b[at]);
  return pre[at];
}

template <bool SAVE, bool BIAS, typename S, typename A = typename AccT<S>::type>
FR_HD void gru_forward_row(const A* __restrict__ px, const A* __restrict__ ph, const S* __restrict__ bx,
                           const S* __restrict__ bh, const S* __restrict__ h, S* __restrict__ h_out,
                           S* __restrict__ gates, int64_t H, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    A r, z, n, hn;
    const A ph_n = with_bias<BIAS>(ph, bh, 2 * H + j);
    gru_step_forward<A>(with_bias<BIAS>(px, bx, j), with_bias<BIAS>(px, bx, H + j), with_bias<BIAS>(px, bx, 2 * H + j),
                        with_bias<BIAS>(ph, bh, j), with_bias<BIAS>(ph, bh, H + j), ph_n, load1(h[j]), r, z, n, hn);
    h_out[j] = store1<S>(hn);
    if constexpr (SAVE) {
      gates[j] = store1<S>(r);
      gates[H + j] = store1<S>(z);
      gates[2 * H + j] = store1<S>(n);
      gates[3 * H + j] = store1<S>(ph_n);
    }
  }
}

template <bool RELU, bool BIAS, typename S, typename A = typename AccT<S>::type>
FR_HD void rnn_forward_row(const A* __restrict__ pre, const S* __restrict__ bx, const S* __restrict__ bh,
                           S* __restrict__ h_out, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    A v = with_bias<BIAS>(pre, bx, j);
    if constexpr (BIAS) v += load1(bh[j]);
    h_out[j] = store1<S>(rnn_step_forward<RELU, A>(v));
  }
}

template <Cell C, bool SAVE, typename S>
void forward_row(const CellForwardParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccT<S>::type;
  const int64_t H = p.H, GH = gates_of_cell(C) * H;
  const A* pre_x = static_cast<const A*>(p.pre_x) + b * GH;
  S* h_out = static_cast<S*>(p.h_out) + b * H;
  S* gates = SAVE ? static_cast<S*>(p.gates) + b * 4 * H : nullptr;
  const S* bx = static_cast<const S*>(p.b_ih);
  const S* bh = static_cast<const S*>(p.b_hh);
  const A* pre_h = C == Cell::GRU ? static_cast<const A*>(p.pre_h) + b * GH : nullptr;
  const auto rows = [&](auto bias) {
    constexpr bool BIAS = decltype(bias)::value;
    if constexpr (C == Cell::LSTM)
      lstm_forward_row<SAVE, BIAS, S>(pre_x, bx, bh, static_cast<const S*>(p.c) + b * H, h_out,
                                      static_cast<S*>(p.c_out) + b * H, gates, H, j0, j1);
    else if constexpr (C == Cell::GRU)
      gru_forward_row<SAVE, BIAS, S>(pre_x, pre_h, bx, bh, static_cast<const S*>(p.h) + b * H, h_out, gates, H, j0, j1);
    else
      rnn_forward_row<C == Cell::RNN_RELU, BIAS, S>(pre_x, bx, bh, h_out, j0, j1);
  };
  if (bias_in_epilogue(p))
    rows(std::true_type{});
  else
    rows(std::false_type{});
}

// Unit j of an LSTM row's backward (F: one unit, or a vector of units as lstm_forward_unit's): its
// tanh(c') keeps the scalar loop from vectorising, so float runs whole vectors explicitly.
template <typename F, typename S>
FR_HD void lstm_backward_unit(const S* __restrict__ gates, const S* __restrict__ c_prev, const S* __restrict__ c_new,
                              const S* __restrict__ dh, const S* __restrict__ dc, S* __restrict__ dg,
                              S* __restrict__ dc_prev, int64_t H, int64_t j) {
  using L = Lanes<F, S>;
  F d_i, d_f, d_g, d_o, dcp;
  lstm_step_backward<F>(L::load_s(gates + j), L::load_s(gates + H + j), L::load_s(gates + 2 * H + j),
                        L::load_s(gates + 3 * H + j), L::load_s(c_prev + j), L::load_s(c_new + j), L::load_s(dh + j),
                        L::load_s(dc + j), d_i, d_f, d_g, d_o, dcp);
  L::store(dg + j, d_i);
  L::store(dg + H + j, d_f);
  L::store(dg + 2 * H + j, d_g);
  L::store(dg + 3 * H + j, d_o);
  L::store(dc_prev + j, dcp);
}

template <Cell C, typename S, typename A = typename AccT<S>::type>
void backward_row(const CellBackwardParams& p, int64_t b) {
  const int64_t H = p.H, GH = gates_of_cell(C) * H, o = b * H;
  const S* __restrict__ dh = static_cast<const S*>(p.dh) + o;
  S* __restrict__ dg = static_cast<S*>(p.dg_x) + b * GH;
  if constexpr (C == Cell::LSTM) {
    const S* gates = static_cast<const S*>(p.gates) + b * 4 * H;
    const S* dc = static_cast<const S*>(p.dc) + o;
    const S* c_prev = static_cast<const S*>(p.c_prev) + o;
    const S* c_new = static_cast<const S*>(p.c_new) + o;
    S* dc_prev = static_cast<S*>(p.dc_prev) + o;
    int64_t j = 0;
    if constexpr (kVecUnits<S>)
      for (; j + kVecLanes <= H; j += kVecLanes)
        lstm_backward_unit<vfloat, S>(gates, c_prev, c_new, dh, dc, dg, dc_prev, H, j);
    for (; j < H; ++j) lstm_backward_unit<A, S>(gates, c_prev, c_new, dh, dc, dg, dc_prev, H, j);
  } else if constexpr (C == Cell::GRU) {
    const S* __restrict__ gates = static_cast<const S*>(p.gates) + b * 4 * H;
    const S* __restrict__ h_prev = static_cast<const S*>(p.h_prev) + o;
    S* __restrict__ dgh = static_cast<S*>(p.dg_h) + b * GH;
    S* __restrict__ dh_direct = static_cast<S*>(p.dh_direct) + o;
    for (int64_t j = 0; j < H; ++j) {
      A d_r, d_z, d_n, d_gh_n, dhd;
      gru_step_backward<A>(load1(gates[j]), load1(gates[H + j]), load1(gates[2 * H + j]), load1(gates[3 * H + j]),
                           load1(h_prev[j]), load1(dh[j]), d_r, d_z, d_n, d_gh_n, dhd);
      dg[j] = store1<S>(d_r);
      dg[H + j] = store1<S>(d_z);
      dg[2 * H + j] = store1<S>(d_n);
      dgh[j] = store1<S>(d_r);
      dgh[H + j] = store1<S>(d_z);
      dgh[2 * H + j] = store1<S>(d_gh_n);
      dh_direct[j] = store1<S>(dhd);
    }
  } else {
    const S* __restrict__ h_new = static_cast<const S*>(p.h_new) + o;
    for (int64_t j = 0; j < H; ++j)
      dg[j] = store1<S>(rnn_step_backward<C == Cell::RNN_RELU, A>(load1(h_new[j]), load1(dh[j])));
  }
}

// Work per task so that waking a second thread pays (multiply-adds).
constexpr int64_t kTaskWork = 1 << 15;

// ---------------------------------------------------------------- backward products at small batch
// For one weight matrix w [rows, K] of the step, the input a [B, K] it multiplied (x or h_prev) and
// the gradient dg [B, rows] (row stride ldg) of that product, over columns [k0, k1) of w:
//   d_a[b, k] (+)= Σ_r dg[b, r] w[r, k]     (dx, or dh_prev, which may hold dh_direct already)
//   d_w[r, k]   = Σ_b dg[b, r] a[b, k]     (d w_ih, d w_hh)
// At small batch both products are bound by streaming w and d_w; done together, w is read and d_w
// written once, in order, rows outside: for kPRows weight rows at a time, each vector of columns
// keeps BB batch rows of a and d_a in registers. A batch of more than BB rows passes over w again,
// adding into d_w. Every element is summed in the same order whatever the column split, so the
// result does not depend on the thread count.
constexpr int kPRows = 4;
constexpr int kPBatch = FR_CELL_VEC_BYTES >= 64 ? 8 : 4;  // 2*BB + 2 vectors fit in the registers

// Columns [k, k + lanes of V) of rows [r, r + NR) for batch rows [0, BB) (pointers offset to them).
template <typename S, int BB, int NR, typename V>
FR_HD void products_tile(const S* __restrict__ dg, int64_t ldg, const S* __restrict__ w, const S* __restrict__ a,
                         S* __restrict__ d_a, S* __restrict__ d_w, int64_t K, int64_t r, int64_t k, bool add_w) {
  using L = Lanes<V, S>;  // V = S: one column
  V av[BB], dav[BB];
#pragma GCC unroll 8
  for (int b = 0; b < BB; ++b) {
    av[b] = L::load_s(a + b * K + k);
    dav[b] = L::load_s(d_a + b * K + k);
  }
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i) {
    const V wv = L::load_s(w + (r + i) * K + k);
    V dw = add_w ? L::load_s(d_w + (r + i) * K + k) : V{};
#pragma GCC unroll 8
    for (int b = 0; b < BB; ++b) {
      const S g = dg[b * ldg + r + i];
      dav[b] += g * wv;
      dw += g * av[b];
    }
    L::store(d_w + (r + i) * K + k, dw);
  }
#pragma GCC unroll 8
  for (int b = 0; b < BB; ++b) L::store(d_a + b * K + k, dav[b]);
}

template <typename S, int BB, int NR>
FR_HD void products_rows(const S* dg, int64_t ldg, const S* w, const S* a, S* d_a, S* d_w, int64_t K, int64_t r,
                         int64_t k0, int64_t k1, bool add_w) {
  using V = typename VecOf<S>::type;
  constexpr int L = sizeof(V) / sizeof(S);
  int64_t k = k0;
  for (; k + L <= k1; k += L) products_tile<S, BB, NR, V>(dg, ldg, w, a, d_a, d_w, K, r, k, add_w);
  for (; k < k1; ++k) products_tile<S, BB, NR, S>(dg, ldg, w, a, d_a, d_w, K, r, k, add_w);
}

template <typename S, int BB>
void products_batch(const S* dg, int64_t ldg, const S* w, const S* a, S* d_a, S* d_w, int64_t rows, int64_t K,
                    int64_t k0, int64_t k1, bool add_w) {
  int64_t r = 0;
  for (; r + kPRows <= rows; r += kPRows) products_rows<S, BB, kPRows>(dg, ldg, w, a, d_a, d_w, K, r, k0, k1, add_w);
  for (; r < rows; ++r) products_rows<S, BB, 1>(dg, ldg, w, a, d_a, d_w, K, r, k0, k1, add_w);
}

template <typename S, int BB = kPBatch>
void products_any_batch(const S* dg, int64_t ldg, const S* w, const S* a, S* d_a, S* d_w, int64_t rows, int64_t K,
                        int64_t k0, int64_t k1, int64_t nb, bool add_w) {
  if constexpr (BB > 1)
    if (nb < BB) return products_any_batch<S, BB - 1>(dg, ldg, w, a, d_a, d_w, rows, K, k0, k1, nb, add_w);
  products_batch<S, BB>(dg, ldg, w, a, d_a, d_w, rows, K, k0, k1, add_w);
}

// Both products of one weight matrix over columns [k0, k1), every batch row; d_a is zeroed there
// first unless it accumulates (GRU's dh_prev).
template <typename S>
void products_columns(const S* dg, int64_t ldg, const S* w, const S* a, S* d_a, S* d_w, int64_t B, int64_t rows,
                      int64_t K, int64_t k0, int64_t k1, bool accumulate) {
  if (k0 >= k1) return;
  if (!accumulate)
    for (int64_t b = 0; b < B; ++b) std::fill(d_a + b * K + k0, d_a + b * K + k1, S(0));
  for (int64_t b = 0; b < B; b += kPBatch)
    products_any_batch<S>(dg + b * ldg, ldg, w, a + b * K, d_a + b * K, d_w, rows, K, k0, k1,
                          std::min<int64_t>(kPBatch, B - b), b > 0);
}

template <Cell C, typename S>
void backward_products_impl(const CellBackwardParams& p) {
  const int64_t B = p.B, I = p.I, H = p.H, GH = gates_of_cell(C) * H;
  const S* dg_x = static_cast<const S*>(p.dg_x);
  const S* dg_h = static_cast<const S*>(p.dg_h);
  S* db_ih = static_cast<S*>(p.db_ih);
  S* db_hh = static_cast<S*>(p.db_hh);
  for (int64_t r = 0; r < GH; ++r) db_ih[r] = db_hh[r] = S(0);
  for (int64_t b = 0; b < B; ++b)  // rows of dg in order: the sums as the GEMM path's sum(0) takes them
    for (int64_t r = 0; r < GH; ++r) {
      db_ih[r] += dg_x[b * GH + r];
      db_hh[r] += dg_h[b * GH + r];
    }
  // Threads split the columns of both matrices (blocks of one vector): x's columns, then h's.
  constexpr int64_t L = sizeof(typename VecOf<S>::type) / sizeof(S);
  const int64_t nI = (I + L - 1) / L, nH = (H + L - 1) / L;
  at::parallel_for(0, nI + nH, std::max<int64_t>(1, kTaskWork / (2 * B * GH * L)), [&](int64_t c0, int64_t c1) {
    products_columns<S>(dg_x, GH, static_cast<const S*>(p.w_ih), static_cast<const S*>(p.x), static_cast<S*>(p.dx),
                        static_cast<S*>(p.dw_ih), B, GH, I, std::min(c0 * L, I), std::min(c1 * L, I), false);
    products_columns<S>(dg_h, GH, static_cast<const S*>(p.w_hh), static_cast<const S*>(p.h_prev),
                        static_cast<S*>(p.dh_prev), static_cast<S*>(p.dw_hh), B, GH, H,
                        std::min(std::max<int64_t>(c0 - nI, 0) * L, H), std::min(std::max<int64_t>(c1 - nI, 0) * L, H),
                        C == Cell::GRU);
  });
}

// ---------------------------------------------------------------- dispatch
template <typename F> void dispatch_cell_dtype(Cell cell, DType d, F&& f) {
  const auto with_cell = [&](auto s) {
    switch (cell) {
      case Cell::LSTM: return f(std::integral_constant<Cell, Cell::LSTM>{}, s);
      case Cell::GRU: return f(std::integral_constant<Cell, Cell::GRU>{}, s);
      case Cell::RNN_TANH: return f(std::integral_constant<Cell, Cell::RNN_TANH>{}, s);
      case Cell::RNN_RELU: return f(std::integral_constant<Cell, Cell::RNN_RELU>{}, s);
    }
  };
  switch (d) {
    case DType::Float32: return with_cell(float{});
    case DType::Float64: return with_cell(double{});
    case DType::BFloat16: return with_cell(c10::BFloat16{});
    case DType::Float16: return with_cell(c10::Half{});
  }
  TORCH_CHECK(false, "fused_rnn: unsupported dtype in the cell step");
}

template <Cell C, bool SAVE, typename S>
void forward_impl(const CellForwardParams& p) {
  const int64_t G = gates_of_cell(C), H = p.H;
  if (p.dots) {
    if constexpr (!std::is_same_v<S, c10::Half>) {
      const int64_t per_unit = std::max<int64_t>(1, G * (p.I + H) * p.B);
      at::parallel_for(0, H, std::max<int64_t>(1, kTaskWork / per_unit), [&](int64_t j0, int64_t j1) {
        for (int64_t k = 0; k < G; ++k) gate_dots<C == Cell::GRU, S>(p, k * H + j0, k * H + j1);
        for (int64_t b = 0; b < p.B; ++b) forward_row<C, SAVE, S>(p, b, j0, j1);
      });
      return;
    }
    TORCH_CHECK(false, "fused_rnn: the cell-step dot kernels do not take float16");
  }
  at::parallel_for(0, p.B, std::max<int64_t>(1, kTaskWork / (G * H)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) forward_row<C, SAVE, S>(p, b, 0, H);
  });
}

}  // namespace

void cell_forward(const CellForwardParams& p) {
  dispatch_cell_dtype(p.cell, p.dtype, [&](auto c, auto s) {
    constexpr Cell C = decltype(c)::value;
    using S = decltype(s);
    if (p.gates != nullptr)  // saved for the backward (never for RNN: its backward reads h_out)
      forward_impl<C, true, S>(p);
    else
      forward_impl<C, false, S>(p);
  });
}

void cell_backward(const CellBackwardParams& p) {
  dispatch_cell_dtype(p.cell, p.dtype, [&](auto c, auto s) {
    constexpr Cell C = decltype(c)::value;
    using S = decltype(s);
    at::parallel_for(0, p.B, std::max<int64_t>(1, kTaskWork / (gates_of_cell(C) * p.H)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) backward_row<C, S>(p, b);
    });
  });
}

void cell_backward_products(const CellBackwardParams& p) {
  dispatch_cell_dtype(p.cell, p.dtype, [&](auto c, auto s) {
    constexpr Cell C = decltype(c)::value;
    using S = decltype(s);
    if constexpr (std::is_same<S, float>::value || std::is_same<S, double>::value)
      backward_products_impl<C, S>(p);
    else
      TORCH_CHECK(false, "fused_rnn: the cell-step backward products take float32 and float64 only");
  });
}

}  // inline namespace FR_ISA_NS
}  // namespace cpu
}  // namespace fused_rnn
