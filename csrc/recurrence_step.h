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

// Forward step for row b, units [j0, j1). See ForwardStepParams for the pointers' shapes.
template <Cell C, typename S>
FR_HD void forward_row(const ForwardStepParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  const int64_t H = p.H, GH = gates_of<C>() * H;
  if (!row_valid(p.lengths, b, p.t)) {  // frozen state, zero output
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

// Backward step for row b, units [j0, j1). See BackwardStepParams.
template <Cell C, typename S>
FR_HD void backward_row(const BackwardStepParams& p, int64_t b, int64_t j0, int64_t j1) {
  using A = typename AccOf<S>::type;
  using CV = Conv<S>;
  const int64_t H = p.H, Hout = p.Hout, GH = gates_of<C>() * H;
  S* dgx = static_cast<S*>(p.dgx) + b * GH;  // may alias dgh (LSTM, RNN)
  S* dgh = static_cast<S*>(p.dgh) + b * GH;
  if (!row_valid(p.lengths, b, p.t)) {  // nothing flows through a frozen step: dh, dc carried
    for (int k = 0; k < gates_of<C>(); ++k)
      for (int64_t j = j0; j < j1; ++j) {
        dgx[k * H + j] = CV::store(A(0));
        dgh[k * H + j] = CV::store(A(0));
      }
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

}  // inline namespace FR_ISA_NS
}  // namespace fused_rnn
