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
// On the host, float uses a branch-free exp (Cephes polynomial, ~1 ulp) so GCC vectorises the
// row loops; glibc's scalar expf/tanhf would cost more than the GEMMs at H=256.
// Inputs are clamped so +-1e4 (or inf) never produce NaN.

#if !defined(__CUDA_ARCH__)
// The host float activations are templates over F = float or a GCC vector of floats (the fused
// CPU kernels in csrc/cpu/ run the cell math one vector of hidden units at a time): one source,
// the same polynomial in every lane.
#if !defined(__CUDACC__)
template <typename F> using host_int_of = decltype(F{} < F{});  // vector compares give int lanes
template <typename F> FR_HD host_int_of<F> host_to_int(F x) { return __builtin_convertvector(x, host_int_of<F>); }
#endif
FR_HD int32_t host_to_int(float x) { return static_cast<int32_t>(x); }

template <typename F> FR_HD F host_exp(F x) {
  x = x < -87.0f ? F{} - 87.0f : x;  // simple selects, no && or nested ?: (those stop vectorisation)
  x = x > 88.0f ? F{} + 88.0f : x;
  const F fx = x * 1.44269504088896341f;
  const F rnd = (fx + 12582912.0f) - 12582912.0f;  // round to nearest without floor()
  const auto n = host_to_int(rnd);
  F r = x - rnd * 0.693359375f;
  r = r + rnd * 2.12194440e-4f;
  const F r2 = r * r;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const auto bits = (n + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1/d for d >= 1. Scalar: a division. A 512-bit vector: rcp14 (relative error < 2^-14) and one
// Newton step (error ~2^-28, below float rounding) — a quarter of a vdivps's cost, which would
// otherwise be half of the LSTM epilogue. Other vectors: a division.
FR_HD float host_recip(float d) { return 1.0f / d; }
#if !defined(__CUDACC__)
template <typename F> FR_HD F host_recip(F d) {
#if defined(__x86_64__) && defined(__GNUC__)  // 64-byte vectors exist only in the AVX-512 builds
  if constexpr (sizeof(F) == 64) {
    const F r = __builtin_ia32_rcp14ps512_mask(d, d, static_cast<unsigned short>(0xFFFF));
    return r * (2.0f - d * r);
  }
#endif
  return 1.0f / d;
}
#endif

template <typename F> FR_HD F host_sigmoid(F x) { return host_recip(1.0f + host_exp(-x)); }

template <typename F> FR_HD F host_tanh(F x) {
  // 1 - 2/(1+e^{2x}) loses relative accuracy near 0: use the odd Taylor series there.
  const F big = 1.0f - 2.0f * host_recip(1.0f + host_exp(2.0f * x));
  const F x2 = x * x;
  const F small = x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  return (x < 0.125f) & (x > -0.125f) ? small : big;
}
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
  const A tc = tanh_act(c);
  const A dct = dc + dh * o * (A(1) - tc * tc);
  d_i = dct * g * i * (A(1) - i);
  d_f = dct * c_prev * f * (A(1) - f);
  d_g = dct * i * (A(1) - g * g);
  d_o = dh * tc * o * (A(1) - o);
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
