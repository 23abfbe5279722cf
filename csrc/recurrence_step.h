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

  if constexpr (C == Cell::LSTM) {
    const S* __restrict__ gates = static_cast<const S*>(p.gates) + b * 4 * H;
    const A* __restrict__ cells = static_cast<const A*>(p.cells) + b * H;
    const A* __restrict__ c_prev =
        (first ? static_cast<const A*>(p.c0) : static_cast<const A*>(p.cells_prev)) + b * H;
    A* __restrict__ dc = static_cast<A*>(p.dc) + b * H;
    if (p.dr)  // with a projection dh arrives as dr = (dy + dh) @ w_hr, prepared before
      lstm_backward_loop<true, S>(nullptr, static_cast<const S*>(p.dr) + b * H, static_cast<A*>(nullptr), gates, c_prev, cells, dc,
                                  dgx, H, j0, j1);
    else
      lstm_backward_loop<false, S>(dy, nullptr, dh, gates, c_prev, cells, dc, dgx, H, j0, j1);
  } else if constexpr (C == Cell::GRU) {
    const S* __restrict__ gates = static_cast<const S*>(p.gates) + b * 4 * H;
    const S* h_prev = (first ? static_cast<const S*>(p.h0) : static_cast<const S*>(p.y_prev)) + b * Hout;
    gru_backward_loop<S>(dy, dh, gates, h_prev, dgx, dgh, H, j0, j1);
  } else {
    const S* __restrict__ y = static_cast<const S*>(p.y) + b * Hout;
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

struct Units {
  int64_t j0, j1, js;
};

struct WholeRow {
  template <typename A> FR_HD A sum(A x) const { return x; }
  FR_HD void sync() const {}
};

FR_HD float rsqrt_of(float x) { return 1.0f / sqrtf(x); }
FR_HD double rsqrt_of(double x) { return 1.0 / sqrt(x); }

// Zoneout of one unit: the training mask keeps prev exactly; eval blends with p (0 when off).
template <typename A> FR_HD A zone_out(const uint8_t* mask, double p, int64_t j, A prev, A next) {
  if (mask) return mask[j] ? prev : next;
  return next + A(p) * (prev - next);
}
template <typename A> FR_HD A keep_of(const uint8_t* mask, double p, int64_t j) { return mask ? A(mask[j]) : A(p); }

// One row's view of the StepOptions (b's masks and saved layer-norm values).
template <typename A> struct RowOptions {
  const uint8_t* keep_h;
  const uint8_t* keep_c;
  double keep_p;
  bool ln;
  A* hat;   // [(G + LSTM) * H]
  A* rstd;  // [1 + LSTM]
  FR_HD RowOptions(const StepOptions& o, int64_t b, int64_t H, int G, bool lstm)
      : keep_h(o.keep_h ? o.keep_h + b * H : nullptr),
        keep_c(o.keep_c ? o.keep_c + b * H : nullptr),
        keep_p(o.keep_p),
        ln(o.gain_hh != nullptr),
        hat(ln ? static_cast<A*>(o.ln_hat) + b * (G + lstm) * H : nullptr),
        rstd(ln ? static_cast<A*>(o.ln_rstd) + b * (1 + lstm) : nullptr) {}
};

// Mean and 1/sqrt(var + eps) of the K*H values v[k*H + j] of a row (two passes: no cancellation).
template <typename A, typename V, typename R>
FR_HD void row_mean_rstd(const V* v, int K, int64_t H, Units u, const R& r, A& mean, A& rstd) {
  A s = 0;
  for (int k = 0; k < K; ++k)
    for (int64_t j = u.j0; j < u.j1; j += u.js) s += A(v[k * H + j]);
  mean = r.sum(s) / A(K * H);
  A q = 0;
  for (int k = 0; k < K; ++k)
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      const A d = A(v[k * H + j]) - mean;
      q += d * d;
    }
  rstd = rsqrt_of(r.sum(q) / A(K * H) + A(kLayerNormEps));
}

// Forward step of row b with zoneout and/or layer norm (LSTM, GRU; no projection, Hout == H).
template <Cell C, typename S, typename R>
FR_HD void forward_row_options(const ForwardStepParams& p, int64_t b, Units u, const R& r) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr bool LSTM = C == Cell::LSTM;
  const int64_t H = p.H, GH = G * H;
  const StepOptions& o = p.opt;
  const RowOptions<A> ro(o, b, H, G, LSTM);
  const bool ln = ro.ln;
  A* hat = ro.hat;
  A* rstd_out = ro.rstd;
  if (!row_valid(p.lengths, b, p.t)) {
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      forward_frozen_row<C, S>(p, b, j, j + 1);
      if (ln)
        for (int k = 0; k < G + LSTM; ++k) hat[k * H + j] = A(0);
    }
    if (ln && u.j0 == 0)
      for (int k = 0; k < 1 + LSTM; ++k) rstd_out[k] = A(0);
    return;
  }
  const S* gx = static_cast<const S*>(p.gx) + b * GH;
  const A* gh = static_cast<const A*>(p.gh) + b * GH;
  const S* bias = static_cast<const S*>(p.b_hh);
  const S* gain = static_cast<const S*>(o.gain_hh);
  S* gates = static_cast<S*>(p.gates) + b * 4 * H;
  S* y = static_cast<S*>(p.y) + b * H;
  S* h = static_cast<S*>(p.h) + b * H;
  const uint8_t* keep_h = ro.keep_h;
  const uint8_t* keep_c = ro.keep_c;
  A mean = 0, rstd = 1;
  if (ln) row_mean_rstd<A>(gh, G, H, u, r, mean, rstd);
  // the recurrent part of gate k at unit j: LN(gh) * gain + b_hh, or gh + b_hh
  const auto rec = [&](int k, int64_t j) {
    const int64_t i = k * H + j;
    if (!ln) return gh[i] + CV::load(bias[i]);
    const A x = (gh[i] - mean) * rstd;
    hat[i] = x;
    return x * CV::load(gain[i]) + CV::load(bias[i]);
  };
  if constexpr (LSTM) {
    A* c = static_cast<A*>(p.c) + b * H;
    A* cells = static_cast<A*>(p.cells) + b * H;
    // h, c after zoneout: the state, the output and what the backward reads as h_{t-1}, c_{t-1}
    const auto commit = [&](int64_t j, A c_new, A h_new) {
      const A cz = zone_out(keep_c, o.keep_p, j, c[j], c_new);
      const A hz = zone_out(keep_h, o.keep_p, j, A(CV::load(h[j])), h_new);
      c[j] = cz;
      cells[j] = cz;
      y[j] = CV::store(hz);
      h[j] = CV::store(hz);
    };
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      const A pi = CV::load(gx[j]) + rec(0, j), pf = CV::load(gx[H + j]) + rec(1, j);
      const A pg = CV::load(gx[2 * H + j]) + rec(2, j), po = CV::load(gx[3 * H + j]) + rec(3, j);
      A i, f, g, og, cn, hn;
      lstm_step_forward<A>(pi, pf, pg, po, c[j], i, f, g, og, cn, hn);
      gates[j] = CV::store(i);
      gates[H + j] = CV::store(f);
      gates[2 * H + j] = CV::store(g);
      gates[3 * H + j] = CV::store(og);
      if (ln)
        cells[j] = cn;  // c~ until its own layer norm below
      else
        commit(j, cn, hn);
    }
    if (ln) {
      r.sync();
      A mean_c, rstd_c;
      row_mean_rstd<A>(cells, 1, H, u, r, mean_c, rstd_c);
      const S* gain_c = static_cast<const S*>(o.gain_c);
      const S* bias_c = static_cast<const S*>(o.bias_c);
      for (int64_t j = u.j0; j < u.j1; j += u.js) {
        const A x = (cells[j] - mean_c) * rstd_c;
        hat[GH + j] = x;
        const A hn = CV::load(gates[3 * H + j]) * tanh_act(x * CV::load(gain_c[j]) + CV::load(bias_c[j]));
        commit(j, cells[j], hn);
      }
      if (u.j0 == 0) rstd_out[1] = rstd_c;
    }
  } else {
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      const A gh_r = rec(0, j), gh_z = rec(1, j), gh_n = rec(2, j);
      const A h_prev = CV::load(h[j]);
      A rg, z, n, hn;
      gru_step_forward<A>(CV::load(gx[j]), CV::load(gx[H + j]), CV::load(gx[2 * H + j]), gh_r, gh_z, gh_n, h_prev,
                          rg, z, n, hn);
      gates[j] = CV::store(rg);
      gates[H + j] = CV::store(z);
      gates[2 * H + j] = CV::store(n);
      gates[3 * H + j] = CV::store(gh_n);
      const A hz = zone_out(keep_h, o.keep_p, j, h_prev, hn);
      y[j] = CV::store(hz);
      h[j] = CV::store(hz);
    }
  }
  if (ln && u.j0 == 0) rstd_out[0] = rstd;
}

// Backward step of row b with zoneout and/or layer norm. Out: dgx, dgh (grads of gx and of the
// recurrent part LN(gh) * gain + b_hh), with layer norm dmm (grad of gh = h_prev @ w_hh.T, what the
// caller's GEMM takes instead of dgh) and the LSTM's dcout; dh = its direct part keep_h * (dy + dh)
// (plus the GRU's dh * z); dc = grad of c_{t-1}.
template <Cell C, typename S, typename R>
FR_HD void backward_row_options(const BackwardStepParams& p, int64_t b, Units u, const R& r) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr bool LSTM = C == Cell::LSTM;
  const int64_t H = p.H, GH = G * H;
  const StepOptions& o = p.opt;
  const RowOptions<A> ro(o, b, H, G, LSTM);
  const bool ln = ro.ln;
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
  const A* hat = ro.hat;
  const A* rstd = ro.rstd;
  const S* gain = static_cast<const S*>(o.gain_hh);
  const uint8_t* keep_h = ro.keep_h;
  const uint8_t* keep_c = ro.keep_c;
  // with layer norm: the sums over the row of d = dgh * gain and of d * hat, for dmm
  A sum_d = 0, sum_dx = 0;
  const auto accumulate = [&](int k, int64_t j, A d_rec) {
    if (ln) {
      const A d = d_rec * CV::load(gain[k * H + j]);
      sum_d += d;
      sum_dx += d * hat[k * H + j];
    }
  };
  if constexpr (LSTM) {
    const A* c_prev = (first ? static_cast<const A*>(p.c0) : static_cast<const A*>(p.cells_prev)) + b * H;
    A* dc = static_cast<A*>(p.dc) + b * H;
    const S* gain_c = static_cast<const S*>(o.gain_c);
    const S* bias_c = static_cast<const S*>(o.bias_c);
    // grad of h~ (the cell's new h before zoneout), and with layer norm the grad of z = LN(c~) gain_c + bias_c
    const auto dh_new = [&](int64_t j) {
      return (A(1) - keep_of<A>(keep_h, o.keep_p, j)) * (CV::load(dy[j]) + dh[j]);
    };
    const auto z_of = [&](int64_t j) { return hat[GH + j] * CV::load(gain_c[j]) + CV::load(bias_c[j]); };
    A mean_dc = 0, mean_dcx = 0;  // LN(c~) backward: means of dz * gain_c and of that times c^
    if (ln) {
      A s = 0, sx = 0;
      for (int64_t j = u.j0; j < u.j1; j += u.js) {
        const A tz = tanh_act(z_of(j));
        const A d = dh_new(j) * CV::load(gates[3 * H + j]) * (A(1) - tz * tz) * CV::load(gain_c[j]);
        s += d;
        sx += d * hat[GH + j];
      }
      mean_dc = r.sum(s) / A(H);
      mean_dcx = r.sum(sx) / A(H);
    }
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      const A i = CV::load(gates[j]), f = CV::load(gates[H + j]), g = CV::load(gates[2 * H + j]);
      const A og = CV::load(gates[3 * H + j]);
      const A dh_v = CV::load(dy[j]) + dh[j], kh = keep_of<A>(keep_h, o.keep_p, j);
      const A dc_v = dc[j], kc = keep_of<A>(keep_c, o.keep_p, j);
      const A dhn = (A(1) - kh) * dh_v;
      A d_i, d_f, d_g, d_o, dc_prev;
      if (ln) {
        const A tz = tanh_act(z_of(j));
        const A dz = dhn * og * (A(1) - tz * tz);
        const A dct = rstd[1] * (dz * CV::load(gain_c[j]) - mean_dc - hat[GH + j] * mean_dcx);
        static_cast<S*>(p.dcout)[b * H + j] = CV::store(dz);
        A unused;
        lstm_step_backward<A>(i, f, g, og, c_prev[j], A(0), A(0), dct + (A(1) - kc) * dc_v, d_i, d_f, d_g, unused,
                              dc_prev);
        d_o = dhn * tz * og * (A(1) - og);
      } else {  // c~ recomputed: the saved c_t is after zoneout
        lstm_step_backward<A>(i, f, g, og, c_prev[j], f * c_prev[j] + i * g, dhn, (A(1) - kc) * dc_v, d_i, d_f,
                              d_g, d_o, dc_prev);
      }
      dgx[j] = CV::store(d_i);
      dgx[H + j] = CV::store(d_f);
      dgx[2 * H + j] = CV::store(d_g);
      dgx[3 * H + j] = CV::store(d_o);
      accumulate(0, j, d_i);
      accumulate(1, j, d_f);
      accumulate(2, j, d_g);
      accumulate(3, j, d_o);
      dc[j] = dc_prev + kc * dc_v;
      dh[j] = kh * dh_v;
    }
  } else {
    const S* h_prev = (first ? static_cast<const S*>(p.h0) : static_cast<const S*>(p.y_prev)) + b * H;
    for (int64_t j = u.j0; j < u.j1; j += u.js) {
      const A dh_v = CV::load(dy[j]) + dh[j], kh = keep_of<A>(keep_h, o.keep_p, j);
      A d_r, d_z, d_n, d_gh_n, dh_direct;
      gru_step_backward<A>(CV::load(gates[j]), CV::load(gates[H + j]), CV::load(gates[2 * H + j]),
                           CV::load(gates[3 * H + j]), CV::load(h_prev[j]), (A(1) - kh) * dh_v, d_r, d_z, d_n,
                           d_gh_n, dh_direct);
      dgx[j] = CV::store(d_r);
      dgx[H + j] = CV::store(d_z);
      dgx[2 * H + j] = CV::store(d_n);
      dgh[j] = CV::store(d_r);
      dgh[H + j] = CV::store(d_z);
      dgh[2 * H + j] = CV::store(d_gh_n);
      accumulate(0, j, d_r);
      accumulate(1, j, d_z);
      accumulate(2, j, d_gh_n);
      dh[j] = dh_direct + kh * dh_v;
    }
  }
  if (ln) {  // grad of gh through LN: rstd (d - mean(d) - hat mean(d hat)), d = dgh * gain_hh
    const A mean_d = r.sum(sum_d) / A(GH), mean_dx = r.sum(sum_dx) / A(GH);
    S* dmm = static_cast<S*>(p.dmm) + b * GH;
    for (int k = 0; k < G; ++k)
      for (int64_t j = u.j0; j < u.j1; j += u.js) {
        const int64_t i = k * H + j;
        dmm[i] = CV::store(rstd[0] * (CV::load(dgh[i]) * CV::load(gain[i]) - mean_d - hat[i] * mean_dx));
      }
  }
}

}  // inline namespace FR_ISA_NS
}  // namespace fused_rnn
