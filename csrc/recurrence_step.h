// One step of the recurrence over a range of hidden units [j0, j1) of one batch row b: loads,
// masking by lengths, the cell math of cell_math.h, stores. Shared by the CPU kernels (a whole row
// per call, so the j loop vectorises) and the CUDA kernels (one element per thread).
//
// Each includer specialises Conv<S> for its 16-bit storage types (c10::BFloat16 on the CPU,
// __half / __nv_bfloat16 on the GPU) before instantiating these templates.
#pragma once

#include "cell_math.h"
#include "recurrence_params.h"

#include <type_traits>

namespace fused_rnn {
inline namespace FR_ISA_NS {

template <typename S> struct Conv;  // static A load(S); static S store(A)
template <> struct Conv<float> {
  FR_HD static float load(float x) { return x; }
  FR_HD static float store(float x) { return x; }
};
template <> struct Conv<double> {
  FR_HD static double load(double x) { return x; }
  FR_HD static double store(double x) { return x; }
};

template <typename S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <Cell C> FR_HD constexpr int64_t gates_of() {
  return C == Cell::LSTM ? 4 : C == Cell::GRU ? 3 : 1;
}

// Calls f with the cell as a compile-time constant: the one dispatch of the CPU and CUDA launchers.
template <typename F> void dispatch_cell(Cell c, F&& f) {
  switch (c) {
    case Cell::LSTM: f(std::integral_constant<Cell, Cell::LSTM>{}); break;
    case Cell::GRU: f(std::integral_constant<Cell, Cell::GRU>{}); break;
    case Cell::RNN_TANH: f(std::integral_constant<Cell, Cell::RNN_TANH>{}); break;
    case Cell::RNN_RELU: f(std::integral_constant<Cell, Cell::RNN_RELU>{}); break;
  }
}

FR_HD bool row_valid(const int64_t* lengths, int64_t b, int64_t t) {
  return lengths == nullptr || t < lengths[b];
}

// The LSTM forward loop over units [j0, j1) of one row; a separate function with plain pointer
// arguments and no branch inside, so that GCC vectorises it (exp included, see cell_math.h).
template <bool HAS_OUT2, typename S, typename A = typename AccOf<S>::type>
FR_HD void lstm_forward_loop(const S* __restrict__ gx, const A* __restrict__ gh, const S* __restrict__ bias,
                             A* __restrict__ c, A* __restrict__ cells, S* __restrict__ gates,
                             S* __restrict__ out1, S* __restrict__ out2, int64_t H, int64_t j0, int64_t j1) {
  using CV = Conv<S>;
  for (int64_t j = j0; j < j1; ++j) {
    const A pi = CV::load(gx[j]) + gh[j] + CV::load(bias[j]);
    const A pf = CV::load(gx[H + j]) + gh[H + j] + CV::load(bias[H + j]);
    const A pg = CV::load(gx[2 * H + j]) + gh[2 * H + j] + CV::load(bias[2 * H + j]);
    const A po = CV::load(gx[3 * H + j]) + gh[3 * H + j] + CV::load(bias[3 * H + j]);
    A i, f, g, o, cn, hn;
    lstm_step_forward<A>(pi, pf, pg, po, c[j], i, f, g, o, cn, hn);
    gates[j] = CV::store(i);
    gates[H + j] = CV::store(f);
    gates[2 * H + j] = CV::store(g);
    gates[3 * H + j] = CV::store(o);
    c[j] = cn;
    cells[j] = cn;
    out1[j] = CV::store(hn);
    if constexpr (HAS_OUT2) out2[j] = CV::store(hn);
  }
}

// GRU forward over units [j0, j1) of one row (h read and overwritten in place).
template <typename S, typename A = typename AccOf<S>::type>
FR_HD void gru_forward_loop(const S* __restrict__ gx, const A* __restrict__ gh, const S* __restrict__ bias,
                            S* __restrict__ h, S* __restrict__ y, S* __restrict__ gates, int64_t H, int64_t j0,
                            int64_t j1) {
  using CV = Conv<S>;
  for (int64_t j = j0; j < j1; ++j) {
    const A gh_r = gh[j] + CV::load(bias[j]);
    const A gh_z = gh[H + j] + CV::load(bias[H + j]);
    const A gh_n = gh[2 * H + j] + CV::load(bias[2 * H + j]);
    A r, z, n, hn;
    gru_step_forward<A>(CV::load(gx[j]), CV::load(gx[H + j]), CV::load(gx[2 * H + j]), gh_r, gh_z, gh_n,
                        CV::load(h[j]), r, z, n, hn);
    gates[j] = CV::store(r);
    gates[H + j] = CV::store(z);
    gates[2 * H + j] = CV::store(n);
    gates[3 * H + j] = CV::store(gh_n);
    y[j] = CV::store(hn);
    h[j] = CV::store(hn);
  }
}

// LSTM backward over units [j0, j1) of one row. PROJ: dh is dr (already summed with dy, and
// the caller's dh buffer is untouched); else dh = dy + dh, and dh is reset to 0 for the GEMM.
template <bool PROJ, typename S, typename A = typename AccOf<S>::type>
FR_HD void lstm_backward_loop(const S* __restrict__ dy, const S* __restrict__ dr, A* __restrict__ dh,
                              const S* __restrict__ gates, const A* __restrict__ c_prev,
                              const A* __restrict__ cells, A* __restrict__ dc, S* __restrict__ dgx, int64_t H,
                              int64_t j0, int64_t j1) {
  using CV = Conv<S>;
  for (int64_t j = j0; j < j1; ++j) {
    A dh_v;
    if constexpr (PROJ) {
      dh_v = CV::load(dr[j]);
    } else {
      dh_v = CV::load(dy[j]) + dh[j];
      dh[j] = A(0);
    }
    A d_i, d_f, d_g, d_o, dc_prev;
    lstm_step_backward<A>(CV::load(gates[j]), CV::load(gates[H + j]), CV::load(gates[2 * H + j]),
                          CV::load(gates[3 * H + j]), c_prev[j], cells[j], dh_v, dc[j], d_i, d_f, d_g, d_o,
                          dc_prev);
    dgx[j] = CV::store(d_i);
    dgx[H + j] = CV::store(d_f);
    dgx[2 * H + j] = CV::store(d_g);
    dgx[3 * H + j] = CV::store(d_o);
    dc[j] = dc_prev;
  }
}

// GRU backward over units [j0, j1) of one row; dh becomes the direct part dh*z.
template <typename S, typename A = typename AccOf<S>::type>
FR_HD void gru_backward_loop(const S* __restrict__ dy, A* __restrict__ dh, const S* __restrict__ gates,
                             const S* __restrict__ h_prev, S* __restrict__ dgx, S* __restrict__ dgh, int64_t H,
                             int64_t j0, int64_t j1) {
  using CV = Conv<S>;
  for (int64_t j = j0; j < j1; ++j) {
    const A dh_v = CV::load(dy[j]) + dh[j];
    A d_r, d_z, d_n, d_gh_n, dh_direct;
    gru_step_backward<A>(CV::load(gates[j]), CV::load(gates[H + j]), CV::load(gates[2 * H + j]),
                         CV::load(gates[3 * H + j]), CV::load(h_prev[j]), dh_v, d_r, d_z, d_n, d_gh_n, dh_direct);
    dgx[j] = CV::store(d_r);
    dgx[H + j] = CV::store(d_z);
    dgx[2 * H + j] = CV::store(d_n);
    dgh[j] = CV::store(d_r);
    dgh[H + j] = CV::store(d_z);
    dgh[2 * H + j] = CV::store(d_gh_n);
    dh[j] = dh_direct;
  }
}

// A row past its length at t: frozen state, zero output.
template <Cell C, typename S>
FR_HD void forward_frozen_row(const ForwardStepParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  const int64_t H = p.H;
  S* out = p.proj_in ? static_cast<S*>(p.proj_in) + b * H : static_cast<S*>(p.y) + b * p.Hout;
  for (int64_t j = j0; j < j1; ++j) out[j] = CV::store(A(0));
  // The saved tensors are op outputs too: write them (the backward never reads these rows).
  if constexpr (C == Cell::LSTM || C == Cell::GRU) {
    S* gates = static_cast<S*>(p.gates) + b * 4 * H;
    for (int k = 0; k < 4; ++k)
      for (int64_t j = j0; j < j1; ++j) gates[k * H + j] = CV::store(A(0));
  }
  if constexpr (C == Cell::LSTM) {
    A* cells = static_cast<A*>(p.cells) + b * H;
    const A* c = static_cast<const A*>(p.c) + b * H;
    for (int64_t j = j0; j < j1; ++j) cells[j] = c[j];
  }
}

// Forward step for row b, units [j0, j1). See ForwardStepParams for the pointers' shapes.
template <Cell C, typename S>
FR_HD void forward_row(const ForwardStepParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  const int64_t H = p.H, GH = gates_of<C>() * H;
  if (!row_valid(p.lengths, b, p.t)) {
    forward_frozen_row<C, S>(p, b, j0, j1);
    return;
  }
  const S* __restrict__ gx = static_cast<const S*>(p.gx) + b * GH;
  const A* __restrict__ gh = static_cast<const A*>(p.gh) + b * GH;
  const S* __restrict__ bias = static_cast<const S*>(p.b_hh);
  S* __restrict__ y = static_cast<S*>(p.y) + b * p.Hout;
  S* __restrict__ h = static_cast<S*>(p.h) + b * p.Hout;

  if constexpr (C == Cell::LSTM) {
    // With a projection h goes to proj_in (then through w_hr); else to y and the state h.
    S* out1 = p.proj_in ? static_cast<S*>(p.proj_in) + b * H : y;
    A* c = static_cast<A*>(p.c) + b * H;
    A* cells = static_cast<A*>(p.cells) + b * H;
    S* gates = static_cast<S*>(p.gates) + b * 4 * H;
    if (p.proj_in)
      lstm_forward_loop<false, S>(gx, gh, bias, c, cells, gates, out1, nullptr, H, j0, j1);
    else
      lstm_forward_loop<true, S>(gx, gh, bias, c, cells, gates, out1, h, H, j0, j1);
  } else if constexpr (C == Cell::GRU) {
    gru_forward_loop<S>(gx, gh, bias, h, y, static_cast<S*>(p.gates) + b * 4 * H, H, j0, j1);
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const A pre = CV::load(gx[j]) + gh[j] + CV::load(bias[j]);
      const A hn = rnn_step_forward<C == Cell::RNN_RELU, A>(pre);
      y[j] = CV::store(hn);
      h[j] = CV::store(hn);
    }
  }
}

// With proj: h, y[t] from tmp = o*tanh(c) @ w_hr.T on valid rows; y[t] = 0 elsewhere. j < Hout.
template <typename S>
FR_HD void proj_commit_row(const ProjCommitParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  const int64_t o = b * p.Hout;
  S* y = static_cast<S*>(p.y) + o;
  if (!row_valid(p.lengths, b, p.t)) {
    for (int64_t j = j0; j < j1; ++j) y[j] = Conv<S>::store(A(0));
    return;
  }
  const S* tmp = static_cast<const S*>(p.tmp) + o;
  S* h = static_cast<S*>(p.h) + o;
  for (int64_t j = j0; j < j1; ++j) {
    y[j] = tmp[j];
    h[j] = tmp[j];
  }
}

// With proj, before the cell backward: dh_all[t] = valid ? dy[t] + dh : 0; dh = valid ? 0 : dh.
template <typename S>
FR_HD void proj_backward_prep_row(const ProjBackwardPrepParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  const int64_t o = b * p.Hout;
  S* dh_all = static_cast<S*>(p.dh_all) + o;
  if (!row_valid(p.lengths, b, p.t)) {
    for (int64_t j = j0; j < j1; ++j) dh_all[j] = CV::store(A(0));
    return;
  }
  const S* dy = static_cast<const S*>(p.dy) + o;
  A* dh = static_cast<A*>(p.dh) + o;
  for (int64_t j = j0; j < j1; ++j) {
    dh_all[j] = CV::store(CV::load(dy[j]) + dh[j]);
    dh[j] = A(0);
  }
}

// A row past its length at t: nothing flows through a frozen step (dh, dc carried), zero grads.
template <Cell C, typename S>
FR_HD void backward_frozen_row(const BackwardStepParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  const int64_t H = p.H, GH = gates_of<C>() * H;
  S* dgx = static_cast<S*>(p.dgx) + b * GH;
  S* dgh = static_cast<S*>(p.dgh) + b * GH;
  S* dmm = p.opt.gain_hh ? static_cast<S*>(p.dmm) + b * GH : nullptr;
  for (int k = 0; k < gates_of<C>(); ++k)
    for (int64_t j = j0; j < j1; ++j) {
      dgx[k * H + j] = CV::store(A(0));
      dgh[k * H + j] = CV::store(A(0));
      if (dmm) dmm[k * H + j] = CV::store(A(0));
    }
  if constexpr (C == Cell::LSTM)
    if (p.opt.gain_hh)
      for (int64_t j = j0; j < j1; ++j) static_cast<S*>(p.dcout)[b * H + j] = CV::store(A(0));
}

// Backward step for row b, units [j0, j1). See BackwardStepParams.
template <Cell C, typename S>
FR_HD void backward_row(const BackwardStepParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  const int64_t H = p.H, Hout = p.Hout, GH = gates_of<C>() * H;
  S* dgx = static_cast<S*>(p.dgx) + b * GH;  // may alias dgh (LSTM, RNN)
  S* dgh = static_cast<S*>(p.dgh) + b * GH;
  if (!row_valid(p.lengths, b, p.t)) {
    backward_frozen_row<C, S>(p, b, j0, j1);
    return;
  }
  const int64_t t = p.t;
  const bool first = p.reverse ? (t == (p.lengths ? p.lengths[b] : p.T) - 1) : (t == 0);
  const S* __restrict__ dy = static_cast<const S*>(p.dy) + b * Hout;
  A* __restrict__ dh = static_cast<A*>(p.dh) + b * Hout;
  // the row of the saved tensors at t and at prev(t): b, or the compact layout's (a packed batch)
  const int64_t sb = p.saved_rows ? p.saved_rows[b] : b;
  const int64_t sp = first ? b : p.saved_rows_prev ? p.saved_rows_prev[b] : b;

  if constexpr (C == Cell::LSTM) {
    const S* __restrict__ gates = static_cast<const S*>(p.gates) + sb * 4 * H;
    const A* __restrict__ cells = static_cast<const A*>(p.cells) + sb * H;
    const A* __restrict__ c_prev =
        (first ? static_cast<const A*>(p.c0) : static_cast<const A*>(p.cells_prev)) + sp * H;
    A* __restrict__ dc = static_cast<A*>(p.dc) + b * H;
    if (p.dr)  // with a projection dh arrives as dr = (dy + dh) @ w_hr, prepared before
      lstm_backward_loop<true, S>(nullptr, static_cast<const S*>(p.dr) + b * H, static_cast<A*>(nullptr), gates, c_prev, cells, dc,
                                  dgx, H, j0, j1);
    else
      lstm_backward_loop<false, S>(dy, nullptr, dh, gates, c_prev, cells, dc, dgx, H, j0, j1);
  } else if constexpr (C == Cell::GRU) {
    const S* __restrict__ gates = static_cast<const S*>(p.gates) + sb * 4 * H;
    const S* h_prev = (first ? static_cast<const S*>(p.h0) : static_cast<const S*>(p.y_prev)) + sp * Hout;
    gru_backward_loop<S>(dy, dh, gates, h_prev, dgx, dgh, H, j0, j1);
  } else {
    const S* __restrict__ y = static_cast<const S*>(p.y) + sb * Hout;
    for (int64_t j = j0; j < j1; ++j) {
      const A dh_v = CV::load(dy[j]) + dh[j];
      dgx[j] = CV::store(rnn_step_backward<C == Cell::RNN_RELU, A>(CV::load(y[j]), dh_v));
      dh[j] = A(0);
    }
  }
}


// ---- Zoneout and the layer-normalised LSTM/GRU (StepOptions) -------------------------------------
// The layer norm needs statistics over a whole row between the phases of a step, so these row
// functions take the units a caller owns, j = j0, j0 + js, ... < j1, and a reducer R with
// `A R::sum(A partial)` (the row's total of every caller's partial, and a barrier) and
// `void R::sync()`: the CPU passes the whole row and WholeRow; the CUDA kernel one block per row,
// each thread its strided units and a block reduction (csrc/cuda/pointwise_kernels.cuh).
//
// Each phase is a loop over the units with __restrict__ pointers and no run-time branch inside:
// which options run is a type K — fixed at compile time on the CPU (OptionsFixed, one instantiation
// per combination, so GCC vectorises every loop, the row sums as simd reductions) and read from the
// StepOptions on CUDA (OptionsAtRunTime: one kernel for every combination, the branch uniform).

struct Units {
  int64_t j0, j1, js;
};

struct WholeRow {
  template <typename A> FR_HD A sum(A x) const { return x; }
  FR_HD void sync() const {}
};

template <bool LN, bool MASK> struct OptionsFixed {
  static constexpr bool ln = LN;    // layer norm of the recurrent part (and of the LSTM's c~)
  static constexpr bool mask = MASK;  // zoneout by training masks; else eval's blend with keep_p (0: none)
};
struct OptionsAtRunTime {
  bool ln, mask;
  FR_HD explicit OptionsAtRunTime(const StepOptions& o) : ln(o.gain_hh != nullptr), mask(o.keep_h != nullptr) {}
};

// Calls f with the OptionsFixed of o: the CPU launcher's dispatch, once per step.
template <typename F> void dispatch_options(const StepOptions& o, F&& f) {
  if (o.gain_hh != nullptr) {
    if (o.keep_h != nullptr) f(OptionsFixed<true, true>{}); else f(OptionsFixed<true, false>{});
  } else {
    if (o.keep_h != nullptr) f(OptionsFixed<false, true>{}); else f(OptionsFixed<false, false>{});
  }
}

// `omp simd` on the CPU (setup.py compiles with -fopenmp) before each loop over the units: the
// iterations are independent, which GCC cannot prove through a dozen pointers (its run-time alias
// checks stop at 10, and the __restrict__ of an inlined function's parameters is lost), and a float
// sum vectorises only when it may be reassociated (FR_SIMD_SUM). Nothing on CUDA.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define FR_PRAGMA(x) _Pragma(#x)
#define FR_SIMD FR_PRAGMA(omp simd)
#define FR_SIMD_SUM(...) FR_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define FR_SIMD
#define FR_SIMD_SUM(...)
#endif

FR_HD float rsqrt_of(float x) { return 1.0f / sqrtf(x); }
FR_HD double rsqrt_of(double x) { return 1.0 / sqrt(x); }

// Zoneout of one unit: the training mask keeps prev exactly; eval blends with p (0 when off).
template <typename K, typename A>
FR_HD A zone_out(const K& k, const uint8_t* keep, A p, int64_t j, A prev, A next) {
  if (k.mask) return keep[j] ? prev : next;
  return next + p * (prev - next);
}
template <typename K, typename A> FR_HD A keep_of(const K& k, const uint8_t* keep, A p, int64_t j) {
  return k.mask ? A(keep[j]) : p;
}

// One row's view of the StepOptions (b's masks and saved layer-norm values).
template <typename A> struct RowOptions {
  const uint8_t* keep_h;
  const uint8_t* keep_c;
  A keep_p;
  A* hat;   // [(G + LSTM) * H]
  A* rstd;  // [1 + LSTM]
  FR_HD RowOptions(const StepOptions& o, int64_t b, int64_t H, int G, bool lstm)
      : keep_h(o.keep_h ? o.keep_h + b * H : nullptr),
        keep_c(o.keep_c ? o.keep_c + b * H : nullptr),
        keep_p(A(o.keep_p)),
        hat(o.gain_hh ? static_cast<A*>(o.ln_hat) + b * (G + lstm) * H : nullptr),
        rstd(o.gain_hh ? static_cast<A*>(o.ln_rstd) + b * (1 + lstm) : nullptr) {}
};

// Mean and 1/sqrt(var + eps) of the K*H values v[k*H + j] of a row (two passes: no cancellation).
template <typename A, typename R>
FR_HD void row_mean_rstd(const A* __restrict__ v, int K, int64_t H, Units u, const R& r, A& mean, A& rstd) {
  A s = 0;
  for (int k = 0; k < K; ++k) {
    FR_SIMD_SUM(s)
    for (int64_t j = u.j0; j < u.j1; j += u.js) s += v[k * H + j];
  }
  mean = r.sum(s) / A(K * H);
  A q = 0;
  for (int k = 0; k < K; ++k) {
    FR_SIMD_SUM(q)
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      const A d = v[k * H + j] - mean;
      q += d * d;
    }
  }
  rstd = rsqrt_of(r.sum(q) / A(K * H) + A(kLayerNormEps));
}

// The recurrent part of a gate pre-activation at column i: LN(gh) * gain + b_hh (hat saved), or gh + b_hh.
template <typename K, typename S, typename A>
FR_HD A recurrent_part(const K& k, const A* gh, const S* bias, const S* gain, A mean, A rstd, A* hat, int64_t i) {
  if (!k.ln) return gh[i] + Conv<S>::load(bias[i]);
  const A x = (gh[i] - mean) * rstd;
  hat[i] = x;
  return x * Conv<S>::load(gain[i]) + Conv<S>::load(bias[i]);
}

// The LSTM's h, c after zoneout: the state, the output and what the backward reads as h_{t-1}, c_{t-1}.
template <typename K, typename S, typename A>
FR_HD void lstm_commit(const K& k, const uint8_t* keep_h, const uint8_t* keep_c, A p, int64_t j, A c_new, A h_new,
                       A* c, A* cells, S* y, S* h) {
  const A cz = zone_out(k, keep_c, p, j, c[j], c_new);
  const A hz = zone_out(k, keep_h, p, j, A(Conv<S>::load(h[j])), h_new);
  c[j] = cz;
  cells[j] = cz;
  y[j] = Conv<S>::store(hz);
  h[j] = Conv<S>::store(hz);
}

// LSTM forward with the options over units u: gates and, without layer norm, the new state; with
// it c~ goes to cells (its own layer norm comes next, lstm_options_ln_commit_loop).
template <typename K, typename S, typename A>
FR_HD void lstm_options_gates_loop(const K& k, const S* __restrict__ gx, const A* __restrict__ gh,
                                   const S* __restrict__ bias, const S* __restrict__ gain, A mean, A rstd,
                                   A* __restrict__ hat, A* __restrict__ c, A* __restrict__ cells,
                                   S* __restrict__ gates, const uint8_t* __restrict__ keep_h,
                                   const uint8_t* __restrict__ keep_c, A keep_p, S* __restrict__ y,
                                   S* __restrict__ h, int64_t H, Units u) {
  using CV = Conv<S>;
  FR_SIMD
  for (int64_t j = u.j0; j < u.j1; j += u.js) {
    const A pi = CV::load(gx[j]) + recurrent_part(k, gh, bias, gain, mean, rstd, hat, j);
    const A pf = CV::load(gx[H + j]) + recurrent_part(k, gh, bias, gain, mean, rstd, hat, H + j);
    const A pg = CV::load(gx[2 * H + j]) + recurrent_part(k, gh, bias, gain, mean, rstd, hat, 2 * H + j);
    const A po = CV::load(gx[3 * H + j]) + recurrent_part(k, gh, bias, gain, mean, rstd, hat, 3 * H + j);
    A i, f, g, og, cn, hn;
    lstm_step_forward<A>(pi, pf, pg, po, c[j], i, f, g, og, cn, hn);
    gates[j] = CV::store(i);
    gates[H + j] = CV::store(f);
    gates[2 * H + j] = CV::store(g);
    gates[3 * H + j] = CV::store(og);
    if (k.ln)
      cells[j] = cn;  // c~ until its own layer norm
    else
      lstm_commit(k, keep_h, keep_c, keep_p, j, cn, hn, c, cells, y, h);
  }
}

// The layer-normalised LSTM's h~ = o * tanh(LN(c~) gain_c + bias_c) over units u, then the commit.
template <typename K, typename S, typename A>
FR_HD void lstm_options_ln_commit_loop(const K& k, const S* __restrict__ gates, const S* __restrict__ gain_c,
                                       const S* __restrict__ bias_c, A mean_c, A rstd_c, A* __restrict__ hat_c,
                                       A* __restrict__ c, A* __restrict__ cells, const uint8_t* __restrict__ keep_h,
                                       const uint8_t* __restrict__ keep_c, A keep_p, S* __restrict__ y,
                                       S* __restrict__ h, int64_t H, Units u) {
  using CV = Conv<S>;
  FR_SIMD
  for (int64_t j = u.j0; j < u.j1; j += u.js) {
    const A ct = cells[j];
    const A x = (ct - mean_c) * rstd_c;
    hat_c[j] = x;
    const A hn = CV::load(gates[3 * H + j]) * tanh_act(x * CV::load(gain_c[j]) + CV::load(bias_c[j]));
    lstm_commit(k, keep_h, keep_c, keep_p, j, ct, hn, c, cells, y, h);
  }
}

// GRU forward with the options over units u (h read and overwritten in place).
template <typename K, typename S, typename A>
FR_HD void gru_options_forward_loop(const K& k, const S* __restrict__ gx, const A* __restrict__ gh,
                                    const S* __restrict__ bias, const S* __restrict__ gain, A mean, A rstd,
                                    A* __restrict__ hat, S* __restrict__ gates, const uint8_t* __restrict__ keep_h,
                                    A keep_p, S* __restrict__ y, S* __restrict__ h, int64_t H, Units u) {
  using CV = Conv<S>;
  FR_SIMD
  for (int64_t j = u.j0; j < u.j1; j += u.js) {
    const A gh_r = recurrent_part(k, gh, bias, gain, mean, rstd, hat, j);
    const A gh_z = recurrent_part(k, gh, bias, gain, mean, rstd, hat, H + j);
    const A gh_n = recurrent_part(k, gh, bias, gain, mean, rstd, hat, 2 * H + j);
    const A h_prev = CV::load(h[j]);
    A rg, z, n, hn;
    gru_step_forward<A>(CV::load(gx[j]), CV::load(gx[H + j]), CV::load(gx[2 * H + j]), gh_r, gh_z, gh_n, h_prev, rg,
                        z, n, hn);
    gates[j] = CV::store(rg);
    gates[H + j] = CV::store(z);
    gates[2 * H + j] = CV::store(n);
    gates[3 * H + j] = CV::store(gh_n);
    const A hz = zone_out(k, keep_h, keep_p, j, h_prev, hn);
    y[j] = CV::store(hz);
    h[j] = CV::store(hz);
  }
}

// Forward step of row b with zoneout and/or layer norm (LSTM, GRU; no projection, Hout == H).
template <Cell C, typename S, typename R, typename K>
FR_HD void forward_row_options(const ForwardStepParams& p, int64_t b, Units u, const R& r, const K& k) {
  using A = typename AccOf<S>::type;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr bool LSTM = C == Cell::LSTM;
  const int64_t H = p.H, GH = G * H;
  const StepOptions& o = p.opt;
  const RowOptions<A> ro(o, b, H, G, LSTM);
  if (!row_valid(p.lengths, b, p.t)) {
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      forward_frozen_row<C, S>(p, b, j, j + 1);
      if (k.ln)
        for (int q = 0; q < G + LSTM; ++q) ro.hat[q * H + j] = A(0);
    }
    if (k.ln && u.j0 == 0)
      for (int q = 0; q < 1 + LSTM; ++q) ro.rstd[q] = A(0);
    return;
  }
  const S* gx = static_cast<const S*>(p.gx) + b * GH;
  const A* gh = static_cast<const A*>(p.gh) + b * GH;
  const S* bias = static_cast<const S*>(p.b_hh);
  const S* gain = static_cast<const S*>(o.gain_hh);
  S* gates = static_cast<S*>(p.gates) + b * 4 * H;
  S* y = static_cast<S*>(p.y) + b * H;
  S* h = static_cast<S*>(p.h) + b * H;
  A mean = 0, rstd = 1;
  if (k.ln) row_mean_rstd<A>(gh, G, H, u, r, mean, rstd);
  if constexpr (LSTM) {
    A* c = static_cast<A*>(p.c) + b * H;
    A* cells = static_cast<A*>(p.cells) + b * H;
    lstm_options_gates_loop(k, gx, gh, bias, gain, mean, rstd, ro.hat, c, cells, gates, ro.keep_h, ro.keep_c,
                            ro.keep_p, y, h, H, u);
    if (k.ln) {
      r.sync();
      A mean_c, rstd_c;
      row_mean_rstd<A>(cells, 1, H, u, r, mean_c, rstd_c);
      lstm_options_ln_commit_loop(k, gates, static_cast<const S*>(o.gain_c), static_cast<const S*>(o.bias_c), mean_c,
                                  rstd_c, ro.hat + GH, c, cells, ro.keep_h, ro.keep_c, ro.keep_p, y, h, H, u);
      if (u.j0 == 0) ro.rstd[1] = rstd_c;
    }
  } else {
    gru_options_forward_loop(k, gx, gh, bias, gain, mean, rstd, ro.hat, gates, ro.keep_h, ro.keep_p, y, h, H, u);
  }
  if (k.ln && u.j0 == 0) ro.rstd[0] = rstd;
}

// The same, the options read from p.opt at run time (the CUDA kernels).
template <Cell C, typename S, typename R>
FR_HD void forward_row_options(const ForwardStepParams& p, int64_t b, Units u, const R& r) {
  forward_row_options<C, S>(p, b, u, r, OptionsAtRunTime(p.opt));
}

// The layer-normalised LSTM's backward through h~ = o tanh(z), z = LN(c~) gain_c + bias_c, over units u:
// the sums of d = dz * gain_c and of d * c^ (for the grad of c~ through the norm).
template <typename K, typename S, typename A>
FR_HD void lstm_options_ln_sums_loop(const K& k, const S* __restrict__ dy, const A* __restrict__ dh,
                                     const S* __restrict__ gates, const A* __restrict__ hat_c,
                                     const S* __restrict__ gain_c, const S* __restrict__ bias_c,
                                     const uint8_t* __restrict__ keep_h, A keep_p, int64_t H, Units u, A& sum_d,
                                     A& sum_dx) {
  using CV = Conv<S>;
  A s = 0, sx = 0;
  FR_SIMD_SUM(s, sx)
  for (int64_t j = u.j0; j < u.j1; j += u.js) {
    const A dhn = (A(1) - keep_of(k, keep_h, keep_p, j)) * (CV::load(dy[j]) + dh[j]);
    const A tz = tanh_act(hat_c[j] * CV::load(gain_c[j]) + CV::load(bias_c[j]));
    const A d = dhn * CV::load(gates[3 * H + j]) * (A(1) - tz * tz) * CV::load(gain_c[j]);
    s += d;
    sx += d * hat_c[j];
  }
  sum_d = s;
  sum_dx = sx;
}

// LSTM backward with the options over units u. Out: dgx (the grads of the four gates), dc, dh, with
// layer norm dcout (grad of z) and the sums of d = dgx * gain_hh and of d * hat (for dmm).
template <typename K, typename S, typename A>
FR_HD void lstm_options_backward_loop(const K& k, const S* __restrict__ dy, A* __restrict__ dh,
                                      const S* __restrict__ gates, const A* __restrict__ c_prev,
                                      A* __restrict__ dc, const S* __restrict__ gain, const A* __restrict__ hat,
                                      const S* __restrict__ gain_c, const S* __restrict__ bias_c, A rstd_c,
                                      A mean_dc, A mean_dcx, S* __restrict__ dcout,
                                      const uint8_t* __restrict__ keep_h, const uint8_t* __restrict__ keep_c,
                                      A keep_p, S* __restrict__ dgx, int64_t H, Units u, A& sum_d, A& sum_dx) {
  using CV = Conv<S>;
  const int64_t GH = 4 * H;
  A s = 0, sx = 0;
  FR_SIMD_SUM(s, sx)
  for (int64_t j = u.j0; j < u.j1; j += u.js) {
    const A i = CV::load(gates[j]), f = CV::load(gates[H + j]), g = CV::load(gates[2 * H + j]);
    const A og = CV::load(gates[3 * H + j]);
    const A dh_v = CV::load(dy[j]) + dh[j], kh = keep_of(k, keep_h, keep_p, j);
    const A dc_v = dc[j], kc = keep_of(k, keep_c, keep_p, j);
    const A dhn = (A(1) - kh) * dh_v;
    A d_i, d_f, d_g, d_o, dc_prev;
    if (k.ln) {
      const A tz = tanh_act(hat[GH + j] * CV::load(gain_c[j]) + CV::load(bias_c[j]));
      const A dz = dhn * og * (A(1) - tz * tz);
      const A dct = rstd_c * (dz * CV::load(gain_c[j]) - mean_dc - hat[GH + j] * mean_dcx);
      dcout[j] = CV::store(dz);
      A unused;
      lstm_step_backward<A>(i, f, g, og, c_prev[j], A(0), A(0), dct + (A(1) - kc) * dc_v, d_i, d_f, d_g, unused,
                            dc_prev);
      d_o = dhn * tz * og * (A(1) - og);
      const A d0 = d_i * CV::load(gain[j]), d1 = d_f * CV::load(gain[H + j]);
      const A d2 = d_g * CV::load(gain[2 * H + j]), d3 = d_o * CV::load(gain[3 * H + j]);
      s += d0 + d1 + d2 + d3;
      sx += d0 * hat[j] + d1 * hat[H + j] + d2 * hat[2 * H + j] + d3 * hat[3 * H + j];
    } else {  // c~ recomputed: the saved c_t is after zoneout
      lstm_step_backward<A>(i, f, g, og, c_prev[j], f * c_prev[j] + i * g, dhn, (A(1) - kc) * dc_v, d_i, d_f, d_g,
                            d_o, dc_prev);
    }
    dgx[j] = CV::store(d_i);
    dgx[H + j] = CV::store(d_f);
    dgx[2 * H + j] = CV::store(d_g);
    dgx[3 * H + j] = CV::store(d_o);
    dc[j] = dc_prev + kc * dc_v;
    dh[j] = kh * dh_v;
  }
  sum_d = s;
  sum_dx = sx;
}

// GRU backward with the options over units u: dgx, dgh, dh and (layer norm) the sums for dmm.
template <typename K, typename S, typename A>
FR_HD void gru_options_backward_loop(const K& k, const S* __restrict__ dy, A* __restrict__ dh,
                                     const S* __restrict__ gates, const S* __restrict__ h_prev,
                                     const S* __restrict__ gain, const A* __restrict__ hat,
                                     const uint8_t* __restrict__ keep_h, A keep_p, S* __restrict__ dgx,
                                     S* __restrict__ dgh, int64_t H, Units u, A& sum_d, A& sum_dx) {
  using CV = Conv<S>;
  A s = 0, sx = 0;
  FR_SIMD_SUM(s, sx)
  for (int64_t j = u.j0; j < u.j1; j += u.js) {
    const A dh_v = CV::load(dy[j]) + dh[j], kh = keep_of(k, keep_h, keep_p, j);
    A d_r, d_z, d_n, d_gh_n, dh_direct;
    gru_step_backward<A>(CV::load(gates[j]), CV::load(gates[H + j]), CV::load(gates[2 * H + j]),
                         CV::load(gates[3 * H + j]), CV::load(h_prev[j]), (A(1) - kh) * dh_v, d_r, d_z, d_n, d_gh_n,
                         dh_direct);
    dgx[j] = CV::store(d_r);
    dgx[H + j] = CV::store(d_z);
    dgx[2 * H + j] = CV::store(d_n);
    dgh[j] = CV::store(d_r);
    dgh[H + j] = CV::store(d_z);
    dgh[2 * H + j] = CV::store(d_gh_n);
    if (k.ln) {
      const A d0 = d_r * CV::load(gain[j]), d1 = d_z * CV::load(gain[H + j]), d2 = d_gh_n * CV::load(gain[2 * H + j]);
      s += d0 + d1 + d2;
      sx += d0 * hat[j] + d1 * hat[H + j] + d2 * hat[2 * H + j];
    }
    dh[j] = dh_direct + kh * dh_v;
  }
  sum_d = s;
  sum_dx = sx;
}

// Grad of gh through the layer norm over units u: rstd (d - mean(d) - hat mean(d hat)), d = dgh * gain_hh.
template <typename S, typename A>
FR_HD void ln_backward_loop(const S* __restrict__ dgh, const S* __restrict__ gain, const A* __restrict__ hat, A rstd,
                            A mean_d, A mean_dx, S* __restrict__ dmm, int G, int64_t H, Units u) {
  using CV = Conv<S>;
  for (int q = 0; q < G; ++q)
    FR_SIMD
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      const int64_t i = q * H + j;
      dmm[i] = CV::store(rstd * (CV::load(dgh[i]) * CV::load(gain[i]) - mean_d - hat[i] * mean_dx));
    }
}

// Backward step of row b with zoneout and/or layer norm. Out: dgx, dgh (grads of gx and of the
// recurrent part LN(gh) * gain + b_hh), with layer norm dmm (grad of gh = h_prev @ w_hh.T, what the
// caller's GEMM takes instead of dgh) and the LSTM's dcout; dh = its direct part keep_h * (dy + dh)
// (plus the GRU's dh * z); dc = grad of c_{t-1}.
template <Cell C, typename S, typename R, typename K>
FR_HD void backward_row_options(const BackwardStepParams& p, int64_t b, Units u, const R& r, const K& k) {
  using A = typename AccOf<S>::type;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr bool LSTM = C == Cell::LSTM;
  const int64_t H = p.H, GH = G * H;
  const StepOptions& o = p.opt;
  const RowOptions<A> ro(o, b, H, G, LSTM);
  if (!row_valid(p.lengths, b, p.t)) {
    for (int64_t j = u.j0; j < u.j1; j += u.js) backward_frozen_row<C, S>(p, b, j, j + 1);
    return;
  }
  const int64_t t = p.t;
  const bool first = p.reverse ? (t == (p.lengths ? p.lengths[b] : p.T) - 1) : (t == 0);
  const S* dy = static_cast<const S*>(p.dy) + b * H;
  A* dh = static_cast<A*>(p.dh) + b * H;
  const S* gates = static_cast<const S*>(p.gates) + b * 4 * H;
  S* dgx = static_cast<S*>(p.dgx) + b * GH;  // aliases dgh for the LSTM
  S* dgh = static_cast<S*>(p.dgh) + b * GH;
  const S* gain = static_cast<const S*>(o.gain_hh);
  A sum_d = 0, sum_dx = 0;  // with layer norm: the row sums of d = dgh * gain and of d * hat, for dmm
  if constexpr (LSTM) {
    const A* c_prev = (first ? static_cast<const A*>(p.c0) : static_cast<const A*>(p.cells_prev)) + b * H;
    const S* gain_c = static_cast<const S*>(o.gain_c);
    const S* bias_c = static_cast<const S*>(o.bias_c);
    A mean_dc = 0, mean_dcx = 0;  // LN(c~) backward: means of dz * gain_c and of that times c^
    if (k.ln) {
      A s, sx;
      lstm_options_ln_sums_loop(k, dy, dh, gates, ro.hat + GH, gain_c, bias_c, ro.keep_h, ro.keep_p, H, u, s, sx);
      mean_dc = r.sum(s) / A(H);
      mean_dcx = r.sum(sx) / A(H);
    }
    lstm_options_backward_loop(k, dy, dh, gates, c_prev, static_cast<A*>(p.dc) + b * H, gain, ro.hat, gain_c,
                               bias_c, k.ln ? ro.rstd[1] : A(0), mean_dc, mean_dcx,
                               k.ln ? static_cast<S*>(p.dcout) + b * H : nullptr, ro.keep_h, ro.keep_c, ro.keep_p,
                               dgx, H, u, sum_d, sum_dx);
  } else {
    const S* h_prev = (first ? static_cast<const S*>(p.h0) : static_cast<const S*>(p.y_prev)) + b * H;
    gru_options_backward_loop(k, dy, dh, gates, h_prev, gain, ro.hat, ro.keep_h, ro.keep_p, dgx, dgh, H, u, sum_d,
                              sum_dx);
  }
  if (k.ln) {
    const A mean_d = r.sum(sum_d) / A(GH), mean_dx = r.sum(sum_dx) / A(GH);
    ln_backward_loop(dgh, gain, ro.hat, ro.rstd[0], mean_d, mean_dx, static_cast<S*>(p.dmm) + b * GH, G, H, u);
  }
}

// The same, the options read from p.opt at run time (the CUDA kernels).
template <Cell C, typename S, typename R>
FR_HD void backward_row_options(const BackwardStepParams& p, int64_t b, Units u, const R& r) {
  backward_row_options<C, S>(p, b, u, r, OptionsAtRunTime(p.opt));
}

}  // inline namespace FR_ISA_NS
}  // namespace fused_rnn
