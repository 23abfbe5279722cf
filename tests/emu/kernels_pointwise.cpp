// Runs the per-step pointwise kernels (csrc/cuda/pointwise_kernels.cuh) on CPU threads under the
// emulator, through the same step loop as csrc/recurrence.cpp with a host GEMM where it calls
// cuBLAS: forward (with the projection's commit pass) and backward (with the projection's prep
// pass); with zoneout (arrays keep_h, keep_c: uint8 masks [T,B,H], or param keep_p_ppm: eval's p in
// millionths) and layer norm (arrays gain_hh, gain_c, bias_c) the row-per-block kernels, whose saved
// ln_hat, ln_rstd and grads dmm (what the GEMM then takes), dcout are outputs too. Driven by
// tests/test_cuda_emulated.py and tests/test_cuda_emulated_features.py:
//
//   kernels pointwise <in> <out>   inputs and params from <in> (kernels_io.h), outputs to <out>
#include "cuda/pointwise_kernels.cuh"

#include <string>

#include "kernels_io.h"

using namespace fused_rnn;
using kernels_io::Array;
using kernels_io::File;
using kernels_io::fail;

namespace {

void* ptr(Array* a) { return a ? a->bytes.get() : nullptr; }
template <typename T> T* at(Array& a, int64_t offset) { return a.as<T>() + offset; }

// c[m, n] = (add ? c[m, n] : 0) + sum_k a(m, k) * b(k, n), accumulated in A and rounded once to
// C's type, as cuBLAS does with fp32 compute (gh and the carried dh are A: no rounding at all).
template <typename A, typename C, typename FA, typename FB>
void gemm(int64_t M, int64_t N, int64_t K, FA a, FB b, C* c, bool add) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      A acc = add ? A(Conv<C>::load(c[m * N + n])) : A(0);
      for (int64_t k = 0; k < K; ++k) acc += a(m, k) * b(k, n);
      c[m * N + n] = Conv<C>::store(acc);
    }
}

// Copies n elements of type From into a new array of type To (the recurrence's .to(dtype)).
template <typename To, typename From> Array& convert(File& f, const std::string& name, const From* src, int64_t n) {
  Array& out = f.add(name, sizeof(To), n);
  for (int64_t i = 0; i < n; ++i) out.as<To>()[i] = Conv<To>::store(Conv<From>::load(src[i]));
  return out;
}

// The (cell, storage) instance a row functor belongs to (the projection's passes: LSTM).
template <typename F> struct InstanceOf;
template <Cell C, typename S> struct Instance {
  static constexpr Cell cell = C;
  using type = S;
};
template <Cell C, typename S, bool R> struct InstanceOf<cuda::ForwardFn<C, S, R>> : Instance<C, S> {};
template <Cell C, typename S, bool R> struct InstanceOf<cuda::BackwardFn<C, S, R>> : Instance<C, S> {};
template <typename S> struct InstanceOf<cuda::CommitFn<S>> : Instance<Cell::LSTM, S> {};
template <typename S> struct InstanceOf<cuda::PrepFn<S>> : Instance<Cell::LSTM, S> {};

struct Launcher {
  int64_t B, grid_cap;
  // One launch of elementwise_kernel over B rows of width W, grid as pointwise_cuda.cu sizes it
  // (capped at grid_cap blocks when > 0, to make the grid-stride loop take more than one turn).
  template <typename RowFn> void operator()(RowFn row_fn, int64_t W) const {
    if constexpr (kernels_io::built<InstanceOf<RowFn>::cell, typename InstanceOf<RowFn>::type>()) {
      launch(row_fn, W);
    } else {
      fail("this build leaves these kernels out (FR_INSTANCES)");
    }
  }
  template <typename RowFn> void launch(RowFn row_fn, int64_t W) const {
    const int64_t n = B * W;
    if (n == 0) return;
    int64_t blocks = cuda::launch_blocks<RowFn>(B, W);
    if (grid_cap > 0 && blocks > grid_cap) blocks = grid_cap;
    fr_emu::LaunchConfig cfg;
    cfg.grid = dim3(unsigned(blocks));
    cfg.block = dim3(unsigned(cuda::launch_threads<RowFn>(W)));
    fr_emu::launch(cfg, cuda::elementwise_kernel<RowFn>, B, W, row_fn);
  }
};

template <typename S> File run(File& in) {
  using A = typename AccOf<S>::type;
  const Cell cell = Cell(in.param("cell"));
  const DType dtype = DType(in.param("dtype"));
  const int64_t T = in.param("T"), B = in.param("B"), H = in.param("H"), Hout = in.param("Hout");
  const int64_t G = num_gates(cell), GH = G * H;
  const bool reverse = in.param("reverse") != 0, save = in.param("save") != 0, proj = Hout != H;
  const bool lstm = cell == Cell::LSTM, has_gates = lstm || cell == Cell::GRU;
  const Launcher launch{B, in.param("grid_cap")};
  Array* lengths = in.find("lengths");
  const int64_t* len = lengths ? lengths->as<int64_t>() : nullptr;
  const S* w_hh = in.get("w_hh").as<S>();                     // [GH, Hout]
  const S* w_hr = proj ? in.get("w_hr").as<S>() : nullptr;    // [Hout, H]
  const size_t s = sizeof(S), a = sizeof(A);
  File out, work;

  // ---- forward, as recurrence_forward
  Array* b_in = in.find("b_hh");
  Array& b_hh = b_in ? *b_in : work.add("b_hh", s, GH);
  if (!b_in)
    for (int64_t i = 0; i < GH; ++i) b_hh.as<S>()[i] = Conv<S>::store(A(0));
  Array& h = convert<S>(out, "h_n", in.get("h0").as<S>(), B * Hout);  // the state, h_n at the end
  Array* c = lstm ? &convert<A>(work, "c", in.get("c0").as<S>(), B * H) : nullptr;
  Array& gh = work.add("gh", a, B * GH);  // h @ w_hh.T, kept in A
  const int64_t TS = save ? T : 1;
  Array& y = out.add("y", s, T * B * Hout);
  Array* gates = has_gates ? &out.add("gates", s, TS * B * 4 * H) : nullptr;
  Array* cells = lstm ? &out.add("cells", a, TS * B * H) : nullptr;
  Array* proj_in = proj ? &out.add("proj_in", s, TS * B * H) : nullptr;
  Array* tmp = proj ? &work.add("tmp", s, B * Hout) : nullptr;
  // zoneout and layer norm (no projection)
  Array* keep_h = in.find("keep_h");
  Array* keep_c = in.find("keep_c");
  Array* gain_hh = in.find("gain_hh");
  const bool ln = gain_hh != nullptr;
  Array* ln_hat = ln ? &out.add("ln_hat", a, TS * B * (G + lstm) * H) : nullptr;
  Array* ln_rstd = ln ? &out.add("ln_rstd", a, TS * B * (1 + lstm)) : nullptr;
  const auto options = [&](int64_t t, int64_t ts) {
    StepOptions o{};
    o.keep_h = keep_h ? at<uint8_t>(*keep_h, t * B * H) : nullptr;
    o.keep_c = keep_c ? at<uint8_t>(*keep_c, t * B * H) : nullptr;
    o.keep_p = in.params.count("keep_p_ppm") ? double(in.param("keep_p_ppm")) * 1e-6 : 0.0;
    if (ln) {
      o.gain_hh = ptr(gain_hh);
      o.gain_c = ptr(in.find("gain_c"));
      o.bias_c = ptr(in.find("bias_c"));
      o.ln_hat = at<A>(*ln_hat, ts * B * (G + lstm) * H);
      o.ln_rstd = at<A>(*ln_rstd, ts * B * (1 + lstm));
    }
    return o;
  };
  ForwardStepParams p{};
  p.cell = cell;
  p.dtype = dtype;
  p.B = B;
  p.H = H;
  p.Hout = Hout;
  p.lengths = len;
  p.gh = ptr(&gh);
  p.b_hh = ptr(&b_hh);
  p.h = ptr(&h);
  p.c = ptr(c);
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k, ts = save ? t : 0;
    const S* hs = h.as<S>();
    gemm<A>(B, GH, Hout, [&](int64_t m, int64_t j) { return A(Conv<S>::load(hs[m * Hout + j])); },
            [&](int64_t j, int64_t r) { return A(Conv<S>::load(w_hh[r * Hout + j])); }, gh.as<A>(), false);
    p.t = t;
    p.gx = at<S>(in.get("gx"), t * B * GH);
    p.y = at<S>(y, t * B * Hout);
    p.gates = gates ? at<S>(*gates, ts * B * 4 * H) : nullptr;
    p.cells = cells ? at<A>(*cells, ts * B * H) : nullptr;
    p.proj_in = proj ? at<S>(*proj_in, ts * B * H) : nullptr;
    p.opt = options(t, ts);
    cuda::forward_step_kernel(p, launch);
    if (proj) {
      const S* pi = at<S>(*proj_in, ts * B * H);
      gemm<A>(B, Hout, H, [&](int64_t m, int64_t j) { return A(Conv<S>::load(pi[m * H + j])); },
              [&](int64_t j, int64_t o) { return A(Conv<S>::load(w_hr[o * H + j])); }, tmp->as<S>(), false);
      const ProjCommitParams q{dtype, B, Hout, t, len, ptr(tmp), ptr(&h), p.y};
      cuda::proj_commit_kernel(q, launch);
    }
  }
  if (lstm) convert<S>(out, "c_n", c->as<A>(), B * H);
  if (!save) return out;

  // ---- backward, as recurrence_backward
  Array& dh = convert<A>(work, "dh", in.get("dh_n").as<S>(), B * Hout);  // the carried dh, in A
  Array* dc = lstm ? &convert<A>(work, "dc", in.get("dc_n").as<S>(), B * H) : nullptr;
  Array* c0 = lstm ? &convert<A>(work, "c0", in.get("c0").as<S>(), B * H) : nullptr;
  Array& dgx = out.add("dgx", s, T * B * GH);
  Array& dgh = cell == Cell::GRU ? out.add("dgh", s, T * B * GH) : dgx;
  Array* dh_all = proj ? &out.add("dh_all", s, T * B * Hout) : nullptr;
  Array* dr = proj ? &work.add("dr", s, B * H) : nullptr;
  Array& dmm = ln ? out.add("dmm", s, T * B * GH) : dgh;  // the grad the GEMM takes
  Array* dcout = ln && lstm ? &out.add("dcout", s, T * B * H) : nullptr;
  BackwardStepParams q{};
  q.cell = cell;
  q.dtype = dtype;
  q.B = B;
  q.H = H;
  q.Hout = Hout;
  q.T = T;
  q.reverse = reverse;
  q.lengths = len;
  q.dh = ptr(&dh);
  q.dc = ptr(dc);
  q.c0 = ptr(c0);
  q.h0 = ptr(&in.get("h0"));
  q.dr = ptr(dr);
  Array& dy = in.get("dy");
  for (int64_t k = T - 1; k >= 0; --k) {
    const int64_t t = reverse ? T - 1 - k : k, prev = reverse ? t + 1 : t - 1;
    const bool has_prev = prev >= 0 && prev < T;
    if (proj) {
      const ProjBackwardPrepParams r{dtype, B, Hout, t, len, at<S>(dy, t * B * Hout), ptr(&dh),
                                     at<S>(*dh_all, t * B * Hout)};
      cuda::proj_backward_prep_kernel(r, launch);
      const S* da = at<S>(*dh_all, t * B * Hout);
      gemm<A>(B, H, Hout, [&](int64_t m, int64_t o) { return A(Conv<S>::load(da[m * Hout + o])); },
              [&](int64_t o, int64_t j) { return A(Conv<S>::load(w_hr[o * H + j])); }, dr->as<S>(), false);
    }
    q.t = t;
    q.dy = at<S>(dy, t * B * Hout);
    q.gates = gates ? at<S>(*gates, t * B * 4 * H) : nullptr;
    q.cells = cells ? at<A>(*cells, t * B * H) : nullptr;
    q.cells_prev = cells && has_prev ? at<A>(*cells, prev * B * H) : nullptr;
    q.y = at<S>(y, t * B * Hout);
    q.y_prev = has_prev ? at<S>(y, prev * B * Hout) : nullptr;
    q.dgx = at<S>(dgx, t * B * GH);
    q.dgh = at<S>(dgh, t * B * GH);
    q.opt = options(t, t);
    q.dmm = ln ? at<S>(dmm, t * B * GH) : nullptr;
    q.dcout = dcout ? at<S>(*dcout, t * B * H) : nullptr;
    cuda::backward_step_kernel(q, launch);
    const S* dg = at<S>(dmm, t * B * GH);
    gemm<A>(B, Hout, GH, [&](int64_t m, int64_t r) { return A(Conv<S>::load(dg[m * GH + r])); },
            [&](int64_t r, int64_t o) { return A(Conv<S>::load(w_hh[r * Hout + o])); }, dh.as<A>(), true);
  }
  convert<S>(out, "dh0", dh.as<A>(), B * Hout);
  if (lstm) convert<S>(out, "dc0", dc->as<A>(), B * H);
  return out;
}

}  // namespace

int pointwise_main(int argc, char** argv) {
  if (argc != 4) fail("usage: kernels pointwise <in> <out>");
  File in = kernels_io::read(argv[2]);
  const int64_t repeats = in.param("repeats");
  File first;
  cuda::dispatch_dtype(DType(in.param("dtype")), [&](auto s) {
    using S = decltype(s);
    first = run<S>(in);
    for (int64_t r = 1; r < repeats; ++r) {
      File again = run<S>(in);
      kernels_io::require_same(first, again, r);
    }
  });
  kernels_io::write(argv[3], first);
  return 0;
}
