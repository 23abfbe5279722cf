// Pointwise math of one recurrent step, per hidden unit, written once for the CPU and CUDA kernels.
//
// Mirrors fused_rnn/cell_math.py function by function. Every function works on ONE element
// (one batch row b, one hidden unit j) of tensors shaped:
//   pre / gates  [B, G*H]   gate k of unit j lives at column k*H + j (PyTorch order:
//                           LSTM i,f,g,o ; GRU r,z,n)
//   c, h         [B, H]
// "pre" = pre-activation (x and h contributions summed), "A" = the accumulation type
// (float for fp16/bf16/fp32 storage, double for fp64). No torch, no CUDA runtime headers:
// this file is included by plain C++ and by nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline __attribute__((always_inline))
#endif

// Each CPU instruction-set variant (csrc/cpu/pointwise_cpu*.cpp) compiles these inline functions
// under its own inline namespace, so identical-looking instantiations never merge across ISAs.
#ifndef FR_ISA_NS
#define FR_ISA_NS isa_default
#endif

namespace fused_rnn {
inline namespace FR_ISA_NS {

// ---------------------------------------------------------------- activations
// On the host, float tanh is a rational function and sigmoid(x) = (1 + tanh(x/2)) / 2: no exp, no
// branch, so GCC vectorises the row loops (glibc's scalar expf/tanhf would cost more than the GEMMs
// at H=256), and one vector of units costs ~18 instructions per activation, where the exp-based
// forms took ~23 (sigmoid) and ~34 (tanh): the LSTM's cell math on 16 units in AVX-512, 35.5 -> 23.6
// ns on an AMD EPYC Zen 4.

#if !defined(__CUDA_ARCH__)
// The host float activations are templates over F = float or a GCC vector of floats (the fused
// CPU kernels in csrc/cpu/ run the cell math one vector of hidden units at a time): one source,
// the same arithmetic in every lane.

// max(lo, x) and min(hi, x), x itself where it is NaN (so NaN propagates, as torch's activations
// do). A 512-bit vector: one vmaxps / vminps (GCC turns the selects into a compare and a blend).
template <typename F> FR_HD F host_at_least(F x, float lo) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)  // 64-byte vectors: AVX-512 builds only
  if constexpr (sizeof(F) == 64)
    return __builtin_ia32_maxps512_mask(F{} + lo, x, x, static_cast<unsigned short>(0xFFFF), 4);
#endif
  return x < lo ? F{} + lo : x;
}
template <typename F> FR_HD F host_at_most(F x, float hi) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
  if constexpr (sizeof(F) == 64)
    return __builtin_ia32_minps512_mask(F{} + hi, x, x, static_cast<unsigned short>(0xFFFF), 4);
#endif
  return x > hi ? F{} + hi : x;
}

// 1/d for d >= 1. Scalar: a division. A 512-bit vector: rcp14 (relative error < 2^-14) and one
// Newton step (error ~2^-28, below float rounding) — a quarter of a vdivps's cost, which would
// otherwise be half of the LSTM epilogue. Other vectors: a division.
FR_HD float host_recip(float d) { return 1.0f / d; }
#if !defined(__CUDACC__)
template <typename F> FR_HD F host_recip(F d) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (sizeof(F) == 64) {
    const F r = __builtin_ia32_rcp14ps512_mask(d, d, static_cast<unsigned short>(0xFFFF));
    return r * (2.0f - d * r);
  }
#endif
  return 1.0f / d;
}
#endif

// tanh(x) = x P(x^2) / Q(x^2) on |x| <= 9, P and Q of degree 4 with positive coefficients (so Q >= 1
// and nothing cancels), fitted to tanh's relative error (2e-8 in exact arithmetic); in float, with
// FMAs, within 7 ulp and 3.7e-7 of tanh (every 7th float in [-20, 20] against double, scalar and
// AVX-512 alike; the exp-based form it replaces was within 15 ulp, 1.8e-7). Past |x| = 9 float tanh
// is +-1: x is clamped there, and the result to [-1, 1] (it may round a hair past 1).
template <typename F> FR_HD F host_tanh(F x) {
  x = host_at_most(host_at_least(x, -9.0f), 9.0f);
  const F s = x * x;
  F p = s * 1.335566413e-08f + 2.060985753e-05f;
  p = p * s + 3.495637560e-03f;
  p = p * s + 1.338106841e-01f;
  p = p * s + 1.0f;
  F q = s * 7.776983466e-07f + 3.285713901e-04f;
  q = q * s + 2.587717213e-02f;
  q = q * s + 4.671438336e-01f;
  q = q * s + 1.0f;
  return host_at_most(host_at_least(x * p * host_recip(q), -1.0f), 1.0f);
}

// sigmoid(x) = (1 + tanh(x/2)) / 2: within 2e-7 of it, in [0, 1].
template <typename F> FR_HD F host_sigmoid(F x) { return 0.5f * host_tanh(0.5f * x) + 0.5f; }
#endif

FR_HD float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));  // expf(+big) = inf -> 1/inf = 0: no NaN
#else
  return host_sigmoid(x);
#endif
}
FR_HD double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

FR_HD float tanh_act(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return host_tanh(x);
#endif
}
FR_HD double tanh_act(double x) { return tanh(x); }

#if !defined(__CUDACC__)
// A GCC vector of floats (the fused CPU kernels' cell math on a vector of units).
template <typename F> using if_host_vec = decltype(std::declval<F>()[0] + 0.0f);
template <typename F, typename = if_host_vec<F>> FR_HD F sigmoid(F x) { return host_sigmoid(x); }
template <typename F, typename = if_host_vec<F>> FR_HD F tanh_act(F x) { return host_tanh(x); }
#endif

template <typename A> FR_HD A relu_act(A x) { return x > A(0) ? x : A(0); }

// ---------------------------------------------------------------- LSTM
// Forward: pre_{i,f,g,o} [B,4H] element, c_prev [B,H] element
//   -> post-activation gates i,f,g,o, c = f*c_prev + i*g, h = o*tanh(c) (before any projection).
template <typename A>
FR_HD void lstm_step_forward(A pre_i, A pre_f, A pre_g, A pre_o, A c_prev,
                             A& i, A& f, A& g, A& o, A& c, A& h) {
  i = sigmoid(pre_i);
  f = sigmoid(pre_f);
  g = tanh_act(pre_g);
  o = sigmoid(pre_o);
  c = f * c_prev + i * g;
  h = o * tanh_act(c);
}

// Backward: saved gates i,f,g,o, c_prev and c (before/after the step), dh = grad of h (before
// projection), dc = grad of c from later steps -> d_pre_{i,f,g,o} and dc_prev.
template <typename A>
FR_HD void lstm_step_backward(A i, A f, A g, A o, A c_prev, A c, A dh, A dc,
                              A& d_i, A& d_f, A& d_g, A& d_o, A& dc_prev) {
  const A one = A{} + 1.0f;  // A may be a GCC vector of floats (the CPU kernels' vector of units)
  const A tc = tanh_act(c);
  const A dct = dc + dh * o * (one - tc * tc);
  d_i = dct * g * i * (one - i);
  d_f = dct * c_prev * f * (one - f);
  d_g = dct * i * (one - g * g);
  d_o = dh * tc * o * (one - o);
  dc_prev = dct * f;
}

// ---------------------------------------------------------------- GRU
// Forward: gx_{r,z,n} input part [B,3H] element, gh_{r,z,n} = (h_prev @ w_hh.T + b_hh) element,
// h_prev [B,H] element -> r, z, n, h = (1-z)*n + z*h_prev. gh_n must be saved for the backward.
template <typename A>
FR_HD void gru_step_forward(A gx_r, A gx_z, A gx_n, A gh_r, A gh_z, A gh_n, A h_prev,
                            A& r, A& z, A& n, A& h) {
  r = sigmoid(gx_r + gh_r);
  z = sigmoid(gx_z + gh_z);
  n = tanh_act(gx_n + r * gh_n);
  h = n + z * (h_prev - n);
}

// Backward: saved r,z,n, gh_n, h_prev, dh -> d_gx_{r,z,n} (grad of the input part; the hidden
// part's grad equals it except d_gh_n = d_gx_n * r) and dh_direct = dh*z (flows to h_prev
// around w_hh).
template <typename A>
FR_HD void gru_step_backward(A r, A z, A n, A gh_n, A h_prev, A dh,
                             A& d_r, A& d_z, A& d_n, A& d_gh_n, A& dh_direct) {
  d_n = dh * (A(1) - z) * (A(1) - n * n);
  d_z = dh * (h_prev - n) * z * (A(1) - z);
  d_r = d_n * gh_n * r * (A(1) - r);
  d_gh_n = d_n * r;
  dh_direct = dh * z;
}

// ---------------------------------------------------------------- RNN (tanh / relu)
// Forward: pre [B,H] element -> h.  Backward: the step's output h and dh -> d_pre.
template <bool RELU, typename A> FR_HD A rnn_step_forward(A pre) {
  return RELU ? relu_act(pre) : tanh_act(pre);
}
template <bool RELU, typename A> FR_HD A rnn_step_backward(A h, A dh) {
  return RELU ? (h > A(0) ? dh : A(0)) : dh * (A(1) - h * h);
}

}  // inline namespace FR_ISA_NS
}  // namespace fused_rnn
