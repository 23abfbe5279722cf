// The recurrence ops: schemas (TORCH_LIBRARY) and the one time loop shared by the CPU and CUDA
// implementations. The Python module fused_rnn._C that loads them is csrc/python_module.cpp.
//
// Per step: one GEMM (at::mm_out into a preallocated buffer: MKL/oneDNN on the CPU, cuBLAS on the
// current CUDA stream) and one fused pointwise pass (csrc/cpu/pointwise_cpu.cpp or
// csrc/cuda/pointwise_cuda.cu) that reads the plain structs of recurrence_params.h. The weight
// gradients are single GEMMs after the loop. No host synchronisation anywhere, so the CUDA
// version can be captured in a CUDA graph. The algorithm is fused_rnn/ops/torch_bptt's.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <array>
#include <cstdlib>
#include <string>

#include "cpu/compact_rows.h"
#include "cpu/cpu_routes.h"
#include "cpu/half_gemm.h"
#include "cpu/packed_weight_cache.h"
#include "cpu/recycling_allocator.h"
#include "op_args.h"
#include "persistent_params.h"
#include "recurrence_params.h"
#include "step_gemm.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

// Address of x[t] for a contiguous x of shape [T, ...]; 64-bit byte offsets.
void* step_ptr(const Tensor& x, int64_t t) {
  return static_cast<char*>(x.data_ptr()) + t * x.stride(0) * static_cast<int64_t>(x.element_size());
}

// Runs the pointwise passes on the tensors' device: the CPU kernels, or the CUDA kernels on the
// current stream of that device.
struct Pointwise {
  bool on_cuda = false;
  void* stream = nullptr;

  explicit Pointwise(const Tensor& like) {
    if (like.is_cuda()) {
#ifdef WITH_CUDA
      on_cuda = true;
      stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
#else
      TORCH_CHECK(false, "fused_rnn._C was built without CUDA");
#endif
    }
  }
#ifdef WITH_CUDA
#define FR_POINTWISE(fn, P) \
  void fn(const P& p) const { on_cuda ? cuda::fn(p, stream) : cpu::fn(p); }
#else
#define FR_POINTWISE(fn, P) \
  void fn(const P& p) const { cpu::fn(p); }
#endif
  FR_POINTWISE(forward_step, ForwardStepParams)
  FR_POINTWISE(proj_commit, ProjCommitParams)
  FR_POINTWISE(backward_step, BackwardStepParams)
  FR_POINTWISE(proj_backward_prep, ProjBackwardPrepParams)
#undef FR_POINTWISE
};

// Every length in [1, T], as pack_padded_sequence requires: a 0 or a length past T would index
// outside the saved tensors. On CUDA this reads the lengths back (one sync), except while the
// stream is being captured into a CUDA graph, where no sync is allowed: the caller's lengths are
// then trusted (fused_rnn.functional checks them before every call).
void check_lengths_range(const Tensor& lengths, int64_t T) {
  if (lengths.numel() == 0) return;
#ifdef WITH_CUDA
  if (lengths.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return;
#endif
  const auto [lo, hi] = at::aminmax(lengths);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK(lo_v >= 1, "fused_rnn: lengths must be >= 1 (pack_padded_sequence refuses empty sequences), got ", lo_v);
  TORCH_CHECK(hi_v <= T, "fused_rnn: lengths must not exceed the sequence length ", T, ", got ", hi_v);
}

struct Shapes {
  Cell cell;
  int64_t T, B, G, H, Hout;
  bool proj;
};

// Checks the contract's shapes, dtypes and devices (fused_rnn/backends.py documents them). gx's
// sizes, and `like` (gx, or x when the op computes gx from it) for the dtype and device.
Shapes check_inputs(c10::string_view cell_name, c10::IntArrayRef gx_sizes, const Tensor& like, const char* like_name,
                    const Tensor& h0, const optional<Tensor>& c0,
                    const Tensor& w_hh, const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                    const optional<Tensor>& lengths) {
  Shapes s;
  s.cell = parse_cell(cell_name);
  s.G = num_gates(s.cell);
  TORCH_CHECK(gx_sizes.size() == 3, "fused_rnn: gx must be [T, B, G*H], got ", gx_sizes);
  s.T = gx_sizes[0];
  s.B = gx_sizes[1];
  TORCH_CHECK(s.T >= 1, "fused_rnn: need at least one time step");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % s.G == 0, "fused_rnn: w_hh must be [G*H, Hout], got ", w_hh.sizes());
  s.H = w_hh.size(0) / s.G;
  s.Hout = w_hh.size(1);
  TORCH_CHECK(gx_sizes[2] == s.G * s.H, "fused_rnn: gx is ", gx_sizes, " but w_hh is ", w_hh.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == s.B && h0.size(1) == s.Hout, "fused_rnn: h0 must be [B, Hout] = [",
              s.B, ", ", s.Hout, "], got ", h0.sizes());
  to_dtype(like.scalar_type());
  const auto check_like = [&](const Tensor& x, const char* name) {
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "fused_rnn: ", name, " is ", x.scalar_type(), " but ",
                like_name, " is ", like.scalar_type());
    TORCH_CHECK(x.device() == like.device(), "fused_rnn: ", name, " is on ", x.device(), " but ", like_name, " is on ",
                like.device());
  };
  check_like(h0, "h0");
  check_like(w_hh, "w_hh");
  if (s.cell == Cell::LSTM) {
    TORCH_CHECK(c0.has_value(), "fused_rnn: lstm needs c0");
    TORCH_CHECK(c0->dim() == 2 && c0->size(0) == s.B && c0->size(1) == s.H, "fused_rnn: c0 must be [B, H], got ",
                c0->sizes());
    check_like(*c0, "c0");
  } else {
    TORCH_CHECK(!c0.has_value(), "fused_rnn: c0 is only for lstm");
  }
  if (b_hh.has_value()) {
    TORCH_CHECK(b_hh->dim() == 1 && b_hh->size(0) == s.G * s.H, "fused_rnn: b_hh must be [G*H], got ", b_hh->sizes());
    check_like(*b_hh, "b_hh");
  }
  s.proj = w_hr.has_value();
  if (s.proj) {
    TORCH_CHECK(s.cell == Cell::LSTM, "fused_rnn: w_hr (projection) is only for lstm");
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == s.Hout && w_hr->size(1) == s.H,
                "fused_rnn: w_hr must be [Hout, H], got ", w_hr->sizes());
    check_like(*w_hr, "w_hr");
  } else {
    TORCH_CHECK(s.Hout == s.H, "fused_rnn: w_hh is ", w_hh.sizes(), ": Hout != H needs w_hr");
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == s.B,
                "fused_rnn: lengths must be int64 [B]");
    TORCH_CHECK(lengths->device() == like.device(), "fused_rnn: lengths must be on ", like_name, "'s device");
    check_lengths_range(*lengths, s.T);
  }
  return s;
}

const int64_t* lengths_ptr(const optional<Tensor>& l) { return l.has_value() ? l->data_ptr<int64_t>() : nullptr; }

// Zoneout and layer norm as the ops take them (fused_rnn/ops/cpp/ops.py): keep_h/keep_c bool
// [T,B,H] training masks, or keep_p (eval's probability); gain_hh [G*H], gain_c, bias_c [H] (LSTM).
struct Options {
  optional<Tensor> keep_h, keep_c;
  double keep_p = 0;
  optional<Tensor> gain_hh, gain_c, bias_c;
  bool zoneout() const { return keep_h.has_value() || keep_p != 0; }
  bool layer_norm() const { return gain_hh.has_value(); }
  bool any() const { return zoneout() || layer_norm(); }
};

void check_options(const Options& o, Cell cell, bool proj, int64_t T, int64_t B, int64_t H, const Tensor& like) {
  if (!o.any()) return;
  TORCH_CHECK(cell == Cell::LSTM || cell == Cell::GRU, "fused_rnn: zoneout and layer norm are for lstm and gru");
  TORCH_CHECK(!proj, "fused_rnn: zoneout and layer norm are not implemented for a projected LSTM (proj_size > 0)");
  TORCH_CHECK(o.keep_p >= 0 && o.keep_p < 1, "fused_rnn: keep_p must be in [0, 1), got ", o.keep_p);
  const auto check_keep = [&](const optional<Tensor>& k, const char* name) {
    TORCH_CHECK(k->scalar_type() == at::kBool && k->dim() == 3 && k->size(0) == T && k->size(1) == B &&
                    k->size(2) == H && k->device() == like.device(),
                "fused_rnn: ", name, " must be a bool [T, B, H] = [", T, ", ", B, ", ", H, "] mask on ",
                like.device());
  };
  if (o.keep_h.has_value()) {
    TORCH_CHECK(o.keep_p == 0, "fused_rnn: give either the zoneout masks or keep_p, not both");
    check_keep(o.keep_h, "keep_h");
    TORCH_CHECK(o.keep_c.has_value() == (cell == Cell::LSTM), "fused_rnn: keep_c goes with keep_h for lstm only");
    if (o.keep_c.has_value()) check_keep(o.keep_c, "keep_c");
  } else {
    TORCH_CHECK(!o.keep_c.has_value(), "fused_rnn: keep_c without keep_h");
  }
  const auto check_vec = [&](const optional<Tensor>& v, int64_t n, const char* name) {
    TORCH_CHECK(v.has_value() && v->dim() == 1 && v->size(0) == n && v->scalar_type() == like.scalar_type() &&
                    v->device() == like.device(),
                "fused_rnn: ", name, " must be a [", n, "] tensor like gx");
  };
  if (o.layer_norm()) {
    check_vec(o.gain_hh, num_gates(cell) * H, "gain_hh");
    if (cell == Cell::LSTM) {
      check_vec(o.gain_c, H, "gain_c");
      check_vec(o.bias_c, H, "bias_c");
    }
  }
  TORCH_CHECK(o.layer_norm() || (!o.gain_c.has_value() && !o.bias_c.has_value()),
              "fused_rnn: gain_c and bias_c go with gain_hh");
  TORCH_CHECK(cell == Cell::LSTM || (!o.gain_c.has_value() && !o.bias_c.has_value()),
              "fused_rnn: gain_c and bias_c are for lstm only");
}

// The StepOptions of step t (keep masks and saved layer-norm values at t; ts the saved step).
StepOptions step_options(const Options& o, const Tensor& ln_hat, const Tensor& ln_rstd, int64_t t, int64_t ts) {
  StepOptions s{};
  s.keep_h = o.keep_h.has_value() ? static_cast<const uint8_t*>(step_ptr(*o.keep_h, t)) : nullptr;
  s.keep_c = o.keep_c.has_value() ? static_cast<const uint8_t*>(step_ptr(*o.keep_c, t)) : nullptr;
  s.keep_p = o.keep_p;
  if (o.layer_norm()) {
    s.gain_hh = o.gain_hh->data_ptr();
    s.gain_c = o.gain_c.has_value() ? o.gain_c->data_ptr() : nullptr;
    s.bias_c = o.bias_c.has_value() ? o.bias_c->data_ptr() : nullptr;
    s.ln_hat = step_ptr(ln_hat, ts);
    s.ln_rstd = step_ptr(ln_rstd, ts);
  }
  return s;
}

optional<Tensor> contiguous_opt(const optional<Tensor>& t) {
  return t.has_value() ? optional<Tensor>(t->contiguous()) : c10::nullopt;
}

// The persistent kernels (csrc/cuda/persistent.cu) run all T steps in one cooperative launch with
// w_hh kept on chip. They are opt-in (FUSED_RNN_CUDA_PERSISTENT=1) while they miss their budget on a
// GPU (benchmarks/PERSISTENT_V2.md); where their plan (csrc/cuda/persistent_plan.h) does not fit the layer —
// float64, a projection, fp32 above H=512, a grid the device cannot hold at once — the per-step kernels
// below run. Forward and backward save and read the same tensors as the per-step kernels, so either
// backward can follow either forward. Returns nullptr when the persistent kernels run the layer (`plan`
// filled), else why the per-step kernels run it.
const char* why_not_persistent(Cell cell, bool proj, const Tensor& like, int64_t H, int64_t B, PersistentV2Plan* plan) {
#ifdef WITH_CUDA
  const char* flag = std::getenv("FUSED_RNN_CUDA_PERSISTENT");
  if (!like.is_cuda()) return "not a CUDA tensor";
  if (flag == nullptr || std::string(flag) != "1") return "opt-in: FUSED_RNN_CUDA_PERSISTENT=1";
  const PlanVerdict v = cuda::persistent_plan(cell, to_dtype(like.scalar_type()), H, B, proj, like.device().index(), plan);
  return v == PlanVerdict::Persistent ? nullptr : verdict_name(v);
#else
  (void)cell, (void)proj, (void)like, (void)H, (void)B, (void)plan;
  return "built without CUDA";
#endif
}

// gx = x w_ih^T (+ b_ih) [T, B, G*H] as at::linear computes it (one addmm over the T*B rows), on the
// CPU into empty_large's memory.
Tensor input_projection(const Tensor& x, const Tensor& w_ih, const optional<Tensor>& b_ih) {
  if (!x.is_cpu()) return at::linear(x, w_ih, b_ih).contiguous();
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), GH = w_ih.size(0);
  Tensor gx = empty_large({T, B, GH}, x.options());
  Tensor out = gx.view({T * B, GH});
  if (b_ih.has_value())
    cpu::addmm_out(out, *b_ih, x.reshape({T * B, I}), w_ih.t());
  else
    cpu::mm_out(out, x.reshape({T * B, I}), w_ih.t());
  return gx;
}

// Returns y [T,B,Hout], h_n [B,Hout], c_n [B,H] (lstm; else [0]), and what the backward needs
// (empty [0] tensors when save is false): gates [T,B,4H] (LSTM i,f,g,o / GRU r,z,n,gh_n; [0] for
// RNN), cells [T,B,H] in the accumulation dtype (LSTM), proj_in [T,B,H] = o*tanh(c) (projection);
// with layer norm (and save) ln_hat [T,B,(G+LSTM)*H] and ln_rstd [T,B,1+LSTM] in the accumulation
// dtype (StepOptions), else [0].
using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The input projection gx = x w_ih^T (+ b_ih) when the op computes gx itself
// (recurrence_forward_projected): the fused CPU recurrence does it inside, chunk by chunk; the
// other paths compute gx with at::linear first.
struct InputProjection {
  const Tensor& x;                // [T, B, I]
  const Tensor& w_ih;             // [G*H, I]
  const optional<Tensor>& b_ih;  // [G*H] or None
};

// gx_in is gx, or undefined when `ip` gives the input projection.
ForwardOut forward_impl(c10::string_view cell_name, const Tensor& gx_in, const Tensor& h0_in,
                        const optional<Tensor>& c0_in, const Tensor& w_hh_in, const optional<Tensor>& b_hh_in,
                        const optional<Tensor>& w_hr_in, const optional<Tensor>& lengths_in, bool reverse, bool save,
                        const Options& o, const InputProjection* ip = nullptr) {
  const Tensor& like = ip != nullptr ? ip->x : gx_in;  // dtype and device of every input
  const std::array<int64_t, 3> projected_sizes =
      ip != nullptr ? std::array<int64_t, 3>{ip->x.size(0), ip->x.size(1), ip->w_ih.size(0)} : std::array<int64_t, 3>{};
  const Shapes s = check_inputs(cell_name, ip != nullptr ? c10::IntArrayRef(projected_sizes) : gx_in.sizes(), like,
                                ip != nullptr ? "x" : "gx", h0_in, c0_in, w_hh_in, b_hh_in, w_hr_in, lengths_in);
  check_options(o, s.cell, s.proj, s.T, s.B, s.H, like);
  const c10::DeviceGuard guard(like.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // GEMMs in our dtype
  const Pointwise pw(like);
  const auto T = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = s.G * s.H;
  const bool lstm = s.cell == Cell::LSTM, has_gates = s.cell == Cell::LSTM || s.cell == Cell::GRU;
  const auto opts = like.options();
  const auto acc_opts = opts.dtype(acc_type(like.scalar_type()));
  const bool fused = cpu::use_cpu_fused(like, s.proj, o.any(), T, cpu::kFusedForwardMinSteps);
  const bool inside = ip != nullptr && fused &&
                      cpu::project_inside(cpu::fp32_projects_inside(
                                              like, (ip->w_ih.numel() + w_hh_in.numel()) * like.element_size()) ||
                                          cpu::gemm_via_fp32(like));

  // gx, except on the fused path with the projection inside (undefined there).
  const Tensor gx = ip == nullptr ? gx_in.contiguous()
                    : inside      ? Tensor()
                                  : input_projection(ip->x, ip->w_ih, ip->b_ih);
  const optional<Tensor> lengths = lengths_in.has_value() ? optional<Tensor>(lengths_in->contiguous()) : c10::nullopt;
  Tensor y = empty_large({T, B, Hout}, opts);

#ifdef WITH_CUDA
  PersistentV2Plan plan;
  if (!o.any() && gx.defined() && why_not_persistent(s.cell, s.proj, gx, H, B, &plan) == nullptr) {  // reads w_hh, h0, c0 as given: no copies
    const Tensor w_hh = w_hh_in.contiguous();
    const Tensor b_hh = b_hh_in.has_value() ? b_hh_in->contiguous() : Tensor();
    const Tensor h0 = h0_in.contiguous();
    const Tensor c0 = lstm ? c0_in->contiguous() : Tensor();
    Tensor h_n = at::empty({B, H}, opts);
    Tensor c_n = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
    Tensor gates = save && has_gates ? at::empty({T, B, 4 * H}, opts) : at::empty({0}, opts);
    Tensor cells = save && lstm ? at::empty({T, B, H}, acc_opts) : at::empty({0}, acc_opts);
    // h exchanged between CTAs and their flags: from the caching allocator, on the current stream
    const Tensor workspace = at::empty({int64_t(v2_workspace_offsets(plan, false).total)}, opts.dtype(at::kByte));
    PersistentForwardParams q{s.cell, to_dtype(gx.scalar_type()), T, B, H, reverse, lengths_ptr(lengths),
                              gx.data_ptr(), w_hh.data_ptr(), b_hh.defined() ? b_hh.data_ptr() : nullptr,
                              h0.data_ptr(), lstm ? c0.data_ptr() : nullptr, y.data_ptr(), h_n.data_ptr(),
                              lstm ? c_n.data_ptr() : nullptr, save && has_gates ? gates.data_ptr() : nullptr,
                              save && lstm ? cells.data_ptr() : nullptr};
    cuda::persistent_forward(q, plan, workspace.data_ptr(), pw.stream);
    return {y, h_n, c_n, gates, cells, at::empty({0}, opts), at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  }
#endif

  const Tensor b_hh = b_hh_in.has_value() ? b_hh_in->contiguous() : at::zeros({GH}, opts);
  Tensor c = lstm ? c0_in->to(acc_opts.dtype()).contiguous().clone() : at::empty({0}, acc_opts);  // [B, H]
  ForwardStepParams p{};
  p.cell = s.cell;
  p.dtype = to_dtype(like.scalar_type());
  p.B = B;
  p.H = H;
  p.Hout = Hout;
  p.lengths = lengths_ptr(lengths);
  p.b_hh = b_hh.data_ptr();
  p.c = lstm ? c.data_ptr() : nullptr;

  if (fused) {
    const Tensor w_hh = w_hh_in.contiguous();
    const Tensor h0 = h0_in.contiguous();
    const Tensor x = inside ? ip->x.contiguous() : Tensor();
    const Tensor w_ih = inside ? ip->w_ih.contiguous() : Tensor();
    const Tensor b_ih = inside && ip->b_ih.has_value() ? ip->b_ih->contiguous() : Tensor();
    Tensor h_n = at::empty({B, H}, opts);
    Tensor gates = save && has_gates ? empty_large({T, B, 4 * H}, opts) : at::empty({0}, opts);
    Tensor cells = save && lstm ? empty_large({T, B, H}, acc_opts) : at::empty({0}, acc_opts);
    FusedForwardParams q{};
    q.step = p;
    q.T = T;
    q.reverse = reverse;
    q.save = save;
    q.gx = gx.defined() ? gx.data_ptr() : nullptr;
    q.x = x.defined() ? x.data_ptr() : nullptr;
    q.w_ih = w_ih.defined() ? w_ih.data_ptr() : nullptr;
    q.b_ih = b_ih.defined() ? b_ih.data_ptr() : nullptr;
    q.I = x.defined() ? x.size(2) : 0;
    q.w_hh = w_hh.data_ptr();
    q.h0 = h0.data_ptr();
    q.y = y.data_ptr();
    q.h_n = h_n.data_ptr();
    q.gates = save && has_gates ? gates.data_ptr() : nullptr;
    q.cells = save && lstm ? cells.data_ptr() : nullptr;
    q.cache_weights = cpu::cpu_weight_cache_on();
    q.w_hh_version = cpu::version_of(w_hh);
    q.w_ih_version = w_ih.defined() ? cpu::version_of(w_ih) : cpu::kUnknownVersion;
    cpu::fused_forward(q);
    Tensor c_n = lstm ? c.to(like.scalar_type()) : at::empty({0}, opts);
    return {y, h_n, c_n, gates, cells, at::empty({0}, opts), at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  }

  AccGemm gemm_hh(cpu::per_step_weight(w_hh_in, T));  // fp32 on the CPU for fp16/bf16 (AccGemm)
  Tensor h = h0_in.contiguous().clone();                                       // [B, Hout] state
  Tensor gh = at::empty({B, GH}, acc_opts);                                     // h @ w_hh.T in A
  // Saved per step when save, else one step of scratch reused.
  const int64_t TS = save ? T : 1;
  Tensor gates = has_gates ? empty_large({TS, B, 4 * H}, opts) : at::empty({0}, opts);
  Tensor cells = lstm ? empty_large({TS, B, H}, acc_opts) : at::empty({0}, acc_opts);
  Tensor proj_in = s.proj ? empty_large({TS, B, H}, opts) : at::empty({0}, opts);
  Tensor tmp = s.proj ? at::empty({B, Hout}, opts) : Tensor();
  c10::optional<AccGemm> gemm_hr;  // h_r = proj_in @ w_hr.T
  if (s.proj) gemm_hr.emplace(w_hr_in->t());
  const bool ln = o.layer_norm();
  Tensor ln_hat = ln ? empty_large({TS, B, (s.G + lstm) * H}, acc_opts) : at::empty({0}, acc_opts);
  Tensor ln_rstd = ln ? at::empty({TS, B, 1 + lstm}, acc_opts) : at::empty({0}, acc_opts);
  const Options oc{contiguous_opt(o.keep_h), contiguous_opt(o.keep_c), o.keep_p, contiguous_opt(o.gain_hh),
                   contiguous_opt(o.gain_c), contiguous_opt(o.bias_c)};

  p.gh = gh.data_ptr();
  p.h = h.data_ptr();
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k;
    const int64_t ts = save ? t : 0;
    gemm_hh.mm(gh, h);
    p.t = t;
    p.gx = step_ptr(gx, t);
    p.y = step_ptr(y, t);
    p.gates = has_gates ? step_ptr(gates, ts) : nullptr;
    p.cells = lstm ? step_ptr(cells, ts) : nullptr;
    p.proj_in = s.proj ? step_ptr(proj_in, ts) : nullptr;
    p.opt = step_options(oc, ln_hat, ln_rstd, t, ts);
    pw.forward_step(p);
    if (s.proj) {
      gemm_hr->mm_rounded(tmp, proj_in.select(0, ts));
      ProjCommitParams q{p.dtype, B, Hout, t, p.lengths, tmp.data_ptr(), h.data_ptr(), p.y};
      pw.proj_commit(q);
    }
  }
  Tensor c_n = lstm ? c.to(like.scalar_type()) : at::empty({0}, opts);
  if (!save) {
    gates = at::empty({0}, opts);
    cells = at::empty({0}, acc_opts);
    proj_in = at::empty({0}, opts);
    ln_hat = at::empty({0}, acc_opts);
    ln_rstd = at::empty({0}, acc_opts);
  }
  return {y, h, c_n, gates, cells, proj_in, ln_hat, ln_rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward(
    c10::string_view cell, const Tensor& gx, const Tensor& h0, const optional<Tensor>& c0, const Tensor& w_hh,
    const optional<Tensor>& b_hh, const optional<Tensor>& w_hr, const optional<Tensor>& lengths, bool reverse,
    bool save) {
  auto [y, h_n, c_n, gates, cells, proj_in, ln_hat, ln_rstd] =
      forward_impl(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, Options{});
  return {y, h_n, c_n, gates, cells, proj_in};
}

// The layer with its input projection inside the op: gx = x w_ih^T (+ b_ih) for all steps, then
// the recurrence. x [T,B,I], w_ih [G*H,I], b_ih [G*H] or None (the LSTM folds b_ih into b_hh).
// The fused CPU recurrence computes gx inside, a few steps at a time into a cache-sized buffer (no
// [T,B,G*H] tensor); the per-step kernels take gx = at::linear(x, w_ih, b_ih) computed first.
// The outputs are recurrence_forward's on that gx (rounded to x's dtype as at::linear's is).
// The backward is recurrence_backward's: d_gx, from which fused_rnn/ops/cpp/ops.py forms d_x,
// d_w_ih and d_b_ih.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward_projected(
    c10::string_view cell, const Tensor& x, const Tensor& w_ih, const optional<Tensor>& b_ih, const Tensor& h0,
    const optional<Tensor>& c0, const Tensor& w_hh, const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
    const optional<Tensor>& lengths, bool reverse, bool save) {
  TORCH_CHECK(x.dim() == 3, "fused_rnn: x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(1) == x.size(2) && w_ih.size(0) == w_hh.size(0),
              "fused_rnn: w_ih must be [G*H, I] = [", w_hh.size(0), ", ", x.size(2), "], got ", w_ih.sizes());
  TORCH_CHECK(w_ih.scalar_type() == x.scalar_type() && w_ih.device() == x.device(),
              "fused_rnn: w_ih is ", w_ih.scalar_type(), " on ", w_ih.device(), " but x is ", x.scalar_type(),
              " on ", x.device());
  if (b_ih.has_value())
    TORCH_CHECK(b_ih->dim() == 1 && b_ih->size(0) == w_ih.size(0) && b_ih->scalar_type() == x.scalar_type() &&
                    b_ih->device() == x.device(),
                "fused_rnn: b_ih must be a [", w_ih.size(0), "] tensor like x, got ", b_ih->sizes());
  const InputProjection ip{x, w_ih, b_ih};
  auto [y, h_n, c_n, gates, cells, proj_in, ln_hat, ln_rstd] =
      forward_impl(cell, Tensor(), h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, Options{}, &ip);
  return {y, h_n, c_n, gates, cells, proj_in};
}

ForwardOut recurrence_forward_options(c10::string_view cell, const Tensor& gx, const Tensor& h0,
                                      const optional<Tensor>& c0, const Tensor& w_hh, const optional<Tensor>& b_hh,
                                      const optional<Tensor>& w_hr, const optional<Tensor>& lengths, bool reverse,
                                      bool save, const optional<Tensor>& keep_h, const optional<Tensor>& keep_c,
                                      double keep_p, const optional<Tensor>& gain_hh, const optional<Tensor>& gain_c,
                                      const optional<Tensor>& bias_c) {
  return forward_impl(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save,
                      Options{keep_h, keep_c, keep_p, gain_hh, gain_c, bias_c});
}

// Analytic BPTT. Returns d_gx [T,B,G*H], d_h0 [B,Hout] (need_d_h0; else [0]), d_c0 [B,H] (lstm; else [0]),
// d_w_hh [G*H,Hout], d_b_hh [G*H], d_w_hr [Hout,H] (projection; else [0]); with layer norm
// d_gain_hh [G*H], d_gain_c, d_bias_c [H] (LSTM), else [0].
using BackwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
BackwardOut backward_impl(c10::string_view cell_name, const Tensor& dy_in, const Tensor& dh_n,
                          const optional<Tensor>& dc_n, const Tensor& y_in, const Tensor& gates_in,
                          const Tensor& cells_in, const Tensor& proj_in_in, const Tensor& h0_in,
                          const optional<Tensor>& c0_in, const Tensor& w_hh, const optional<Tensor>& w_hr,
                          const optional<Tensor>& lengths_in, bool reverse, const Options& o_in,
                          const Tensor& ln_hat_in, const Tensor& ln_rstd_in, bool need_d_h0) {
  const Cell cell = parse_cell(cell_name);
  // y, gates, cells, proj_in are [T, B, ...], or a packed batch's compact [N, ...] (csrc/cpu/compact_rows.h)
  // (a compact LSTM's y may be left out, [0]: see cpu::lstm_outputs)
  const bool y_absent = y_in.dim() == 1 && y_in.numel() == 0 && gates_in.dim() == 2;
  const bool compact_in = y_in.dim() == 2 || y_absent;
  TORCH_CHECK(y_in.dim() == 3 || (compact_in && dy_in.dim() == 3 && lengths_in.has_value() && lengths_in->is_cpu()),
              "fused_rnn: y must be [T, B, Hout] (or the compact [N, Hout] of a packed batch with lengths on the CPU)");
  const Tensor& like = compact_in ? dy_in : y_in;
  const int64_t T = like.size(0), B = like.size(1), Hout = like.size(2);
  const int64_t G = num_gates(cell), H = w_hh.size(0) / G, GH = G * H;
  const bool lstm = cell == Cell::LSTM, has_gates = lstm || cell == Cell::GRU, proj = w_hr.has_value();
  TORCH_CHECK(dy_in.dim() == 3 && dy_in.size(0) == T && dy_in.size(1) == B && dy_in.size(2) == Hout,
              "fused_rnn: dy must be [", T, ", ", B, ", ", Hout, "], got ", dy_in.sizes());
  TORCH_CHECK(dh_n.sizes() == h0_in.sizes(), "fused_rnn: dh_n must be ", h0_in.sizes());
  const cpu::CompactRows rows = compact_in ? cpu::compact_rows(*lengths_in, T, B) : cpu::CompactRows{};
  // a saved tensor's steps: T, or the compact layout's N rows
  const auto saved_ok = [&](const Tensor& t, int64_t cols) {
    return compact_in ? t.dim() == 2 && t.size(0) == rows.N && t.size(1) == cols
                      : t.dim() == 3 && t.size(0) == T && t.size(1) == B && t.size(2) == cols;
  };
  TORCH_CHECK(!y_absent || (lstm && !proj), "fused_rnn: only an LSTM without projection may leave y out");
  TORCH_CHECK(y_absent || saved_ok(y_in, Hout), "fused_rnn: y must have ", compact_in ? rows.N : T, " steps");
  TORCH_CHECK(!has_gates || saved_ok(gates_in, 4 * H),
              "fused_rnn: the saved gates are missing (was the forward run with save=False?)");
  TORCH_CHECK(!lstm || (saved_ok(cells_in, H) && c0_in.has_value()),
              "fused_rnn: the saved cell states or c0 are missing");
  TORCH_CHECK(!proj || saved_ok(proj_in_in, H), "fused_rnn: the saved proj_in is missing");
  check_options(o_in, cell, proj, T, B, H, y_in);
  const bool ln = o_in.layer_norm();
  TORCH_CHECK(!ln || (ln_hat_in.dim() == 3 && ln_hat_in.size(0) == T && ln_hat_in.size(1) == B &&
                      ln_hat_in.size(2) == (G + lstm) * H && ln_rstd_in.dim() == 3 && ln_rstd_in.size(0) == T &&
                      ln_rstd_in.size(2) == 1 + lstm && ln_hat_in.scalar_type() == acc_type(y_in.scalar_type()) &&
                      ln_rstd_in.scalar_type() == ln_hat_in.scalar_type()),
              "fused_rnn: the saved layer-norm values ln_hat, ln_rstd are missing or malformed");
  const Options o{contiguous_opt(o_in.keep_h), contiguous_opt(o_in.keep_c), o_in.keep_p,
                  contiguous_opt(o_in.gain_hh), contiguous_opt(o_in.gain_c), contiguous_opt(o_in.bias_c)};
  const Tensor ln_hat = ln_hat_in.contiguous(), ln_rstd = ln_rstd_in.contiguous();
  const c10::DeviceGuard guard(y_in.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Pointwise pw(y_in);
  const auto opts = y_in.options();
  const auto acc = acc_type(y_in.scalar_type());

  const bool fused = cpu::use_cpu_fused(y_in, proj, o.any(), T, cpu::kFusedBackwardMinSteps);
  // the fused loop reads the compact layout in place; the other paths read the padded one
  const bool compact = compact_in && fused;
  const auto saved = [&](const Tensor& t) {
    return compact_in && !compact ? cpu::restore_rows(t, rows, T, B) : t.contiguous();
  };
  const Tensor dy = dy_in.to(y_in.scalar_type()).contiguous();  // often an expanded zero
  // a left-out y: remade here where the per-step kernels read it, else only for d w_hh at the end
  const Tensor y = !y_absent ? saved(y_in)
                   : compact  ? Tensor()
                              : saved(cpu::lstm_outputs(gates_in, cells_in, H, y_in.scalar_type()));
  const Tensor gates = saved(gates_in);
  const Tensor cells = saved(cells_in);
  const Tensor proj_in = saved(proj_in_in);
  const Tensor h0 = h0_in.contiguous();
  const Tensor c0 = lstm ? c0_in->to(acc).contiguous() : Tensor();
  const optional<Tensor> lengths = lengths_in.has_value() ? optional<Tensor>(lengths_in->contiguous()) : c10::nullopt;

  Tensor dh = dh_n.to(acc).contiguous().clone();  // [B, Hout] grad of the state, carried in A
  Tensor dc = lstm ? (dc_n.has_value() ? dc_n->to(acc).contiguous().clone() : at::zeros({B, H}, opts.dtype(acc)))
                   : at::empty({0}, opts);
  // The GRU's grads of gx and of h @ w_hh.T + b_hh differ in the n gate's column only (d gh_n = d gx_n * r).
  // The fused loop keeps that column alone for all steps (dgh_n) and the whole dG_h for two steps: at
  // the end of the backward the op then holds 4 of [T, B, H] instead of 6 (with the saved gates and y,
  // the training call's peak memory: 9 instead of 11).
  // Compact, d gx is compact too ([N, G*H], returned so) and dG_h lives in the two-step ring for every cell.
  const bool gru_n_only = fused && cell == Cell::GRU;
  Tensor dgx = compact ? empty_large({rows.N, GH}, opts) : empty_large({T, B, GH}, opts);
  Tensor dgh = compact || gru_n_only ? at::empty({2, B, GH}, opts)
               : cell != Cell::GRU   ? dgx
                                     : empty_large({T, B, GH}, opts);
  Tensor dgh_n = !gru_n_only ? Tensor() : compact ? empty_large({rows.N, H}, opts) : empty_large({T, B, H}, opts);
  Tensor dh_all = proj ? empty_large({T, B, Hout}, opts) : Tensor();  // grads of the projected h
  Tensor dr = proj ? at::empty({B, H}, opts) : Tensor();              // dh_all[t] @ w_hr
  Tensor dmm = ln ? empty_large({T, B, GH}, opts) : dgh;  // grads of h @ w_hh.T (through the layer norm)
  Tensor dcout = ln && lstm ? empty_large({T, B, H}, opts) : Tensor();  // grads of LN(c~) gain_c + bias_c
  PersistentV2Plan plan;
  const bool persistent = !o.any() && why_not_persistent(cell, proj, y_in, H, B, &plan) == nullptr;
#ifdef WITH_CUDA
  if (persistent) {
    const Tensor w_hh_c = w_hh.contiguous();
    const Tensor dh_n_s = dh_n.to(y_in.scalar_type()).contiguous();
    const Tensor dc_n_s =
        lstm ? (dc_n.has_value() ? dc_n->to(y_in.scalar_type()).contiguous() : at::zeros({B, H}, opts)) : Tensor();
    const Tensor c0_s = lstm ? c0_in->to(y_in.scalar_type()).contiguous() : Tensor();
    // the CTAs' partial dh and their flags: from the caching allocator, on the current stream
    const Tensor workspace = at::empty({int64_t(v2_workspace_offsets(plan, true).total)}, opts.dtype(at::kByte));
    dh = at::empty({B, H}, opts);
    dc = lstm ? at::empty({B, H}, opts) : dc;
    PersistentBackwardParams q{cell, to_dtype(y_in.scalar_type()), T, B, H, reverse, lengths_ptr(lengths),
                               w_hh_c.data_ptr(), dy.data_ptr(), dh_n_s.data_ptr(), lstm ? dc_n_s.data_ptr() : nullptr,
                               has_gates ? gates.data_ptr() : nullptr, lstm ? cells.data_ptr() : nullptr,
                               y.data_ptr(), h0.data_ptr(), lstm ? c0_s.data_ptr() : nullptr, dgx.data_ptr(),
                               dgh.data_ptr(), dh.data_ptr(), lstm ? dc.data_ptr() : nullptr};
    cuda::persistent_backward(q, plan, workspace.data_ptr(), pw.stream);
  }
#endif

  BackwardStepParams p{};
  p.cell = cell;
  p.dtype = to_dtype(y_in.scalar_type());
  p.B = B;
  p.H = H;
  p.Hout = Hout;
  p.T = T;
  p.reverse = reverse;
  p.lengths = lengths_ptr(lengths);
  p.dh = dh.data_ptr();
  p.dc = lstm ? dc.data_ptr() : nullptr;
  p.c0 = lstm ? c0.data_ptr() : nullptr;
  p.h0 = h0.data_ptr();
  p.dr = proj ? dr.data_ptr() : nullptr;
  if (fused) {
    const Tensor w_hh_c = w_hh.contiguous();
    FusedBackwardParams q{p, w_hh_c.data_ptr(), dy.data_ptr(), has_gates ? gates.data_ptr() : nullptr,
                          lstm ? cells.data_ptr() : nullptr, y.defined() ? y.data_ptr() : nullptr, dgx.data_ptr(),
                          dgh.data_ptr(), gru_n_only ? dgh_n.data_ptr() : nullptr, need_d_h0,
                          compact ? rows.rows.data_ptr<int64_t>() : nullptr};
    cpu::fused_backward(q);
  }
  c10::optional<AccGemm> gemm_hh;
  // (not when its only GEMM, the last step's, is skipped: a 16-bit w_hh would be widened for nothing)
  if (!persistent && !fused && (T > 1 || need_d_h0)) gemm_hh.emplace(w_hh.contiguous());
  c10::optional<AccGemm> gemm_hr;  // dr = dh @ w_hr
  if (proj) gemm_hr.emplace(*w_hr);
  for (int64_t k = persistent || fused ? -1 : T - 1; k >= 0; --k) {  // the per-step kernels, unless one ran
    const int64_t t = reverse ? T - 1 - k : k;
    const int64_t prev = reverse ? t + 1 : t - 1;
    const bool has_prev = prev >= 0 && prev < T;
    if (proj) {
      ProjBackwardPrepParams q{p.dtype, B, Hout, t, p.lengths, step_ptr(dy, t), dh.data_ptr(), step_ptr(dh_all, t)};
      pw.proj_backward_prep(q);
      gemm_hr->mm_rounded(dr, dh_all.select(0, t));
    }
    p.t = t;
    p.dy = step_ptr(dy, t);
    p.gates = has_gates ? step_ptr(gates, t) : nullptr;
    p.cells = lstm ? step_ptr(cells, t) : nullptr;
    p.cells_prev = lstm && has_prev ? step_ptr(cells, prev) : nullptr;
    p.y = step_ptr(y, t);
    p.y_prev = has_prev ? step_ptr(y, prev) : nullptr;
    p.dgx = step_ptr(dgx, t);
    p.dgh = step_ptr(dgh, t);
    p.opt = step_options(o, ln_hat, ln_rstd, t, t);
    p.dmm = ln ? step_ptr(dmm, t) : nullptr;
    p.dcout = ln && lstm ? step_ptr(dcout, t) : nullptr;
    pw.backward_step(p);
    // dh_prev = direct part + dG_h @ w_hh; at the last step that is d h0 alone, skipped when h0 needs
    // no gradient (a layer called without hx: at T=1 one GEMM of the step's six, ~10 % of a training step)
    if (k > 0 || need_d_h0) gemm_hh->add_mm(dh, dmm.select(0, t));
  }

  // d w_hh = sum_t dG_h[t]^T @ h_prev[t]. h_prev is y at the previous step except at each row's
  // first step (h0); at a reverse row's first step t = len-1 the "previous" y[t+1] is 0.
  // With layer norm w_hh's grad comes from dmm, the grad of h_prev @ w_hh.T (dmm is dgh otherwise).
  // out = the rows of d w_hh whose columns of dG_h dg ([T, B, rows]) holds
  const auto w_hh_grad = [&](const Tensor& dg, Tensor out) {
    const int64_t n = dg.size(2);
    Tensor d0;  // [B, n]: dG_h at each row's first step
    if (!reverse) {
      d0 = dg.select(0, 0);
    } else if (!lengths.has_value()) {
      d0 = dg.select(0, T - 1);
    } else {
      // clamped: an unchecked 0 (see check_lengths_range) must not index out of range
      const Tensor rows = (*lengths - 1).clamp_min(0) * B + at::arange(B, lengths->options());
      d0 = dg.reshape({T * B, n}).index_select(0, rows);
    }
    cpu::mm_out(out, d0.t(), h0);
    if (T > 1) {
      const Tensor dg_rest = reverse ? dg.narrow(0, 0, T - 1) : dg.narrow(0, 1, T - 1);
      const Tensor y_rest = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
      cpu::addmm_(out, dg_rest.reshape({(T - 1) * B, n}).t(), y_rest.reshape({(T - 1) * B, Hout}));
    }
  };
  Tensor d_w_hh = at::empty({GH, Hout}, opts);
  Tensor d_b_hh;
  if (compact) {  // over the N valid rows (no layer norm on this path: dmm is dgh)
    const Tensor h_prev = cpu::previous_h_rows(y.defined() ? y : cpu::lstm_outputs(gates, cells, H, y_in.scalar_type()),
                                               h0, rows, T, B, reverse);
    d_b_hh = gru_n_only ? cpu::w_hh_grads({dgx.narrow(1, 0, 2 * H), dgh_n}, h_prev, d_w_hh)
                        : cpu::w_hh_grads({dgx}, h_prev, d_w_hh);
  } else if (gru_n_only) {  // r, z rows from dgx, n rows from dgh_n
    w_hh_grad(dgx.narrow(2, 0, 2 * H), d_w_hh.narrow(0, 0, 2 * H));
    w_hh_grad(dgh_n, d_w_hh.narrow(0, 2 * H, H));
    d_b_hh = at::cat({dgx.narrow(2, 0, 2 * H).sum(at::IntArrayRef{0, 1}), dgh_n.sum(at::IntArrayRef{0, 1})});
  } else {
    w_hh_grad(dmm, d_w_hh);
    d_b_hh = dgh.sum(at::IntArrayRef{0, 1});
  }
  Tensor d_w_hr = proj ? cpu::mm(dh_all.view({T * B, Hout}).t(), proj_in.view({T * B, H})) : at::empty({0}, opts);
  Tensor d_c0 = lstm ? dc.to(y_in.scalar_type()) : at::empty({0}, opts);
  // The layer norm's gains and biases: sums over steps and rows (frozen rows hold zero grads).
  Tensor d_gain_hh = at::empty({0}, opts), d_gain_c = at::empty({0}, opts), d_bias_c = at::empty({0}, opts);
  if (ln) {
    const std::array<int64_t, 2> sum_tb{0, 1};
    d_gain_hh = (dgh.to(acc) * ln_hat.narrow(2, 0, GH)).sum(sum_tb).to(y_in.scalar_type());
    if (lstm) {
      d_gain_c = (dcout.to(acc) * ln_hat.narrow(2, GH, H)).sum(sum_tb).to(y_in.scalar_type());
      d_bias_c = dcout.sum(sum_tb);
    }
  }
  Tensor d_h0 = need_d_h0 ? dh.to(y_in.scalar_type()) : at::empty({0}, opts);
  return {dgx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, d_gain_hh, d_gain_c, d_bias_c};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_backward(
    c10::string_view cell, const Tensor& dy, const Tensor& dh_n, const optional<Tensor>& dc_n, const Tensor& y,
    const Tensor& gates, const Tensor& cells, const Tensor& proj_in, const Tensor& h0, const optional<Tensor>& c0,
    const Tensor& w_hh, const optional<Tensor>& w_hr, const optional<Tensor>& lengths, bool reverse,
    bool need_d_h0) {
  auto [d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, d_gain_hh, d_gain_c, d_bias_c] =
      backward_impl(cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh, w_hr, lengths, reverse, Options{},
                    Tensor(), Tensor(), need_d_h0);
  return {d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr};
}

BackwardOut recurrence_backward_options(c10::string_view cell, const Tensor& dy, const Tensor& dh_n,
                                        const optional<Tensor>& dc_n, const Tensor& y, const Tensor& gates,
                                        const Tensor& cells, const Tensor& proj_in, const Tensor& h0,
                                        const optional<Tensor>& c0, const Tensor& w_hh, const optional<Tensor>& w_hr,
                                        const optional<Tensor>& lengths, bool reverse,
                                        const optional<Tensor>& keep_h, const optional<Tensor>& keep_c,
                                        double keep_p, const optional<Tensor>& gain_hh,
                                        const optional<Tensor>& gain_c, const optional<Tensor>& bias_c,
                                        const Tensor& ln_hat, const Tensor& ln_rstd, bool need_d_h0) {
  return backward_impl(cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh, w_hr, lengths, reverse,
                       Options{keep_h, keep_c, keep_p, gain_hh, gain_c, bias_c}, ln_hat, ln_rstd, need_d_h0);
}

// Which kernels the cuda backend runs a layer with (fused_rnn/ops/cpp/cuda_backend.py kernel_for):
// "persistent (tiling MTxKTxNT, math, grid XxY)" or "per-step (why)"; `like` gives the device and dtype.
std::string persistent_plan(c10::string_view cell, const Tensor& like, int64_t H, int64_t B, bool proj) {
  PersistentV2Plan plan;
  const c10::DeviceGuard guard(like.device());
  const char* why = why_not_persistent(parse_cell(cell), proj, like, H, B, &plan);
  if (why != nullptr) return std::string("per-step (") + why + ")";
  const V2Tiling t = kV2Tilings[plan.tiling];
  return "persistent (tiling " + std::to_string(t.mt) + "x" + std::to_string(t.kt) + "x" + std::to_string(t.nt) +
         ", " + v2_math_name(plan.math) + ", grid " + std::to_string(plan.grid_x) + "x" +
         std::to_string(plan.grid_y) + ")";
}

}  // namespace

TORCH_LIBRARY(fused_rnn, m) {
  m.def("persistent_plan(str cell, Tensor like, int H, int B, bool proj) -> str", &persistent_plan);
  m.def(
      "recurrence_forward(str cell, Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
      "Tensor? lengths, bool reverse, bool save) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, "
      "Tensor cells, Tensor proj_in)");
  // The same with the input projection inside: gx = x w_ih^T (+ b_ih) (CPU; the backward is recurrence_backward).
  m.def(
      "recurrence_forward_projected(str cell, Tensor x, Tensor w_ih, Tensor? b_ih, Tensor h0, Tensor? c0, "
      "Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool save) -> (Tensor y, "
      "Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor proj_in)");
  m.def(
      "recurrence_backward(str cell, Tensor dy, Tensor dh_n, Tensor? dc_n, Tensor y, Tensor gates, Tensor cells, "
      "Tensor proj_in, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
      "bool need_d_h0=True) -> (Tensor d_gx, Tensor d_h0, Tensor d_c0, Tensor d_w_hh, Tensor d_b_hh, "
      "Tensor d_w_hr)");
  // The same with zoneout (keep_h/keep_c masks or keep_p) and the layer-normalised LSTM/GRU
  // (gain_hh, gain_c, bias_c; the forward's ln_hat, ln_rstd are what the backward reads).
  m.def(
      "recurrence_forward_options(str cell, Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? lengths, bool reverse, bool save, Tensor? keep_h, Tensor? keep_c, float keep_p, "
      "Tensor? gain_hh, Tensor? gain_c, Tensor? bias_c) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, "
      "Tensor cells, Tensor proj_in, Tensor ln_hat, Tensor ln_rstd)");
  m.def(
      "recurrence_backward_options(str cell, Tensor dy, Tensor dh_n, Tensor? dc_n, Tensor y, Tensor gates, "
      "Tensor cells, Tensor proj_in, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, "
      "bool reverse, Tensor? keep_h, Tensor? keep_c, float keep_p, Tensor? gain_hh, Tensor? gain_c, "
      "Tensor? bias_c, Tensor ln_hat, Tensor ln_rstd, bool need_d_h0=True) -> (Tensor d_gx, Tensor d_h0, "
      "Tensor d_c0, Tensor d_w_hh, Tensor d_b_hh, Tensor d_w_hr, Tensor d_gain_hh, Tensor d_gain_c, "
      "Tensor d_bias_c)");
}

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("recurrence_forward", &recurrence_forward);
  m.impl("recurrence_forward_projected", &recurrence_forward_projected);
  m.impl("recurrence_backward", &recurrence_backward);
  m.impl("recurrence_forward_options", &recurrence_forward_options);
  m.impl("recurrence_backward_options", &recurrence_backward_options);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("recurrence_forward", &recurrence_forward);
  m.impl("recurrence_backward", &recurrence_backward);
  m.impl("recurrence_forward_options", &recurrence_forward_options);
  m.impl("recurrence_backward_options", &recurrence_backward_options);
}
#endif

}  // namespace fused_rnn
