// The cell-step ops: one step of LSTMCell / GRUCell / RNNCell, input projection included, as one
// op per direction of autograd, with the autograd registered here in C++ (a Python autograd
// wrapper alone costs more than the whole step at B=1).
//
//   fused_rnn::cell_step(cell, input, hx, cx?, w_ih, w_hh, b_ih?, b_hh?) -> (h', c' | [0])
//       the public op: CPU kernel (no saved tensors) and an Autograd kernel that runs
//   fused_rnn::cell_step_forward(..., bool save) -> (h', c' | [0], gates | [0])
//   fused_rnn::cell_step_backward(cell, dh, dc?, input, hx, cx?, w_ih, w_hh, h', c', gates)
//       -> (d_input, d_hx, d_cx | [0], d_w_ih, d_w_hh, d_b_ih, d_b_hh)
//
// Forward: at small batch the CPU kernel computes x @ w_ih.T + h @ w_hh.T itself, reading each
// weight row once, and applies the cell math in the same pass (csrc/cpu/cell_step_cpu_kernels.h);
// at larger batch, GEMMs (MKL) into an fp32 buffer, then the fused epilogue. Backward: the
// pointwise derivative (cell_math.h) and then the six GEMM-shaped gradients: at small batch in one
// pass that reads each weight matrix and writes each weight gradient once (cell_backward_products),
// at larger batch as GEMMs.
// fake kernels: fused_rnn/ops/cpp/cell_ops.py. The schemas join the TORCH_LIBRARY block of
// csrc/recurrence.cpp as a fragment.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cell_step_params.h"
#include "cpu/cell_step_bias.h"
#include "cpu/half_gemm.h"
#include "cpu/recycling_allocator.h"
#include "op_args.h"
#include "python_entry.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CellShapes {
  Cell cell;
  int64_t B, I, H, G;
};

// The op's own contract (the modules check torch.nn's errors before they get here).
CellShapes check_cell_inputs(c10::string_view cell_name, const Tensor& x, const Tensor& h, const optional<Tensor>& c,
                             const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                             const optional<Tensor>& b_hh) {
  CellShapes s;
  s.cell = parse_cell(cell_name);
  s.G = num_gates(s.cell);
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2 && h.dim() == 2,
              "fused_rnn: cell_step needs input [B, I], hx [B, H], w_ih [G*H, I], w_hh [G*H, H]");
  s.B = x.size(0);
  s.I = x.size(1);
  s.H = w_hh.size(1);
  const int64_t GH = s.G * s.H;
  TORCH_CHECK(w_hh.size(0) == GH && w_ih.size(0) == GH && w_ih.size(1) == s.I,
              "fused_rnn: cell_step weights w_ih ", w_ih.sizes(), ", w_hh ", w_hh.sizes(), " do not fit input ",
              x.sizes());
  TORCH_CHECK(h.size(0) == s.B && h.size(1) == s.H, "fused_rnn: hx must be [", s.B, ", ", s.H, "], got ", h.sizes());
  to_dtype(x.scalar_type());
  const auto check_like = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), "fused_rnn: cell_step ", name,
                " is ", t.scalar_type(), " on ", t.device(), " but input is ", x.scalar_type(), " on ", x.device());
  };
  check_like(h, "hx");
  check_like(w_ih, "w_ih");
  check_like(w_hh, "w_hh");
  TORCH_CHECK(c.has_value() == (s.cell == Cell::LSTM), "fused_rnn: cx is needed by lstm and only by lstm");
  if (c.has_value()) {
    TORCH_CHECK(c->sizes() == h.sizes(), "fused_rnn: cx must be ", h.sizes(), ", got ", c->sizes());
    check_like(*c, "cx");
  }
  for (const optional<Tensor>* b : {&b_ih, &b_hh})
    if (b->has_value()) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == GH, "fused_rnn: biases must be [", GH, "], got ",
                  (*b)->sizes());
      check_like(**b, "bias");
    }
  return s;
}

const void* data_or_null(const optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// pre (+)= a @ w.T (+ bias) in the accumulation dtype, through the GEMM library.
void gemm_into(Tensor& pre, const Tensor& a, const Tensor& w, const optional<Tensor>& bias, bool accumulate) {
  if (a.scalar_type() == pre.scalar_type()) {
    if (accumulate) {
      pre.addmm_(a, w.t());
    } else if (bias.has_value()) {
      at::addmm_out(pre, *bias, a, w.t());  // the bias broadcast in the GEMM's output, as nn.Linear
      return;
    } else {
      at::mm_out(pre, a, w.t());
    }
  } else {  // bf16/fp16: the GEMM rounds to its dtype (as torch.nn's linear does), the sum is fp32
    const Tensor prod = cpu::mm(a, w.t());
    accumulate ? pre.add_(prod) : pre.copy_(prod);
  }
  if (bias.has_value()) pre.add_(*bias);
}

// Scratch for the pre-activations of the dot kernels, reused across calls of a thread (an
// allocation per call costs a visible part of a B=1 step); the GEMM path uses tensors.
void* pre_scratch(size_t bytes) {
  static thread_local std::vector<double> scratch;
  scratch.resize(std::max(scratch.size(), (bytes + sizeof(double) - 1) / sizeof(double)));
  return scratch.data();
}

// One forward step: h' (c') and, when `gates` is given, what the backward reads (resized here).
std::tuple<Tensor, Tensor> forward_cpu(c10::string_view cell_name, const Tensor& x_in, const Tensor& h_in,
                                       const optional<Tensor>& c_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
                                       const optional<Tensor>& b_ih_in, const optional<Tensor>& b_hh_in,
                                       Tensor* gates) {
  const CellShapes s = check_cell_inputs(cell_name, x_in, h_in, c_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in);
  TORCH_CHECK(x_in.device().is_cpu(), "fused_rnn: cell_step_forward's kernel runs on CPU tensors");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // GEMMs in our dtype
  const bool lstm = s.cell == Cell::LSTM, gru = s.cell == Cell::GRU;
  const int64_t B = s.B, H = s.H, GH = s.G * s.H;
  const auto opts = x_in.options();
  const auto acc_opts = opts.dtype(acc_type(x_in.scalar_type()));
  const Tensor x = x_in.contiguous(), h = h_in.contiguous(), w_ih = w_ih_in.contiguous(),
               w_hh = w_hh_in.contiguous();
  const optional<Tensor> c = lstm ? optional<Tensor>(c_in->contiguous()) : c10::nullopt;
  const optional<Tensor> b_ih = b_ih_in.has_value() ? optional<Tensor>(b_ih_in->contiguous()) : c10::nullopt;
  const optional<Tensor> b_hh = b_hh_in.has_value() ? optional<Tensor>(b_hh_in->contiguous()) : c10::nullopt;

  CellForwardParams p{};
  p.cell = s.cell;
  p.dtype = to_dtype(x.scalar_type());
  p.B = B;
  p.I = s.I;
  p.H = H;
  p.dots = cpu::cell_dots_pay(p.dtype, B, s.I, H, s.G);
  Tensor pre_x, pre_h;
  if (p.dots) {
    const size_t bytes = B * GH * at::elementSize(acc_type(x.scalar_type()));
    char* scratch = static_cast<char*>(pre_scratch((gru ? 2 : 1) * bytes));
    p.pre_x = scratch;
    p.pre_h = gru ? scratch + bytes : nullptr;
  } else {
    p.b_ih = data_or_null(b_ih);  // read by bias_in_epilogue
    p.b_hh = data_or_null(b_hh);
    const bool bias_later = cpu::bias_in_epilogue(p);
    pre_x = at::empty({B, GH}, acc_opts);
    gemm_into(pre_x, x, w_ih, bias_later ? c10::nullopt : b_ih, false);
    if (gru) {
      pre_h = at::empty({B, GH}, acc_opts);
      gemm_into(pre_h, h, w_hh, bias_later ? c10::nullopt : b_hh, false);
    } else {
      gemm_into(pre_x, h, w_hh, bias_later ? c10::nullopt : b_hh, true);
    }
    p.pre_x = pre_x.data_ptr();
    p.pre_h = gru ? pre_h.data_ptr() : nullptr;
  }
  Tensor h_out = at::empty({B, H}, opts);
  Tensor c_out = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  if (gates != nullptr) *gates = lstm || gru ? at::empty({B, 4 * H}, opts) : at::empty({0}, opts);
  p.x = x.data_ptr();
  p.h = h.data_ptr();
  p.c = data_or_null(c);
  p.w_ih = w_ih.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.b_ih = data_or_null(b_ih);
  p.b_hh = data_or_null(b_hh);
  p.h_out = h_out.data_ptr();
  p.c_out = lstm ? c_out.data_ptr() : nullptr;
  p.gates = gates != nullptr && gates->numel() ? gates->data_ptr() : nullptr;
  if (B > 0 && H > 0) cpu::cell_forward(p);
  return {h_out, c_out};
}

std::tuple<Tensor, Tensor, Tensor> cell_step_forward_cpu(c10::string_view cell, const Tensor& x, const Tensor& h,
                                                         const optional<Tensor>& c, const Tensor& w_ih,
                                                         const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                         const optional<Tensor>& b_hh, bool save) {
  Tensor gates;
  auto [h_out, c_out] = forward_cpu(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, save ? &gates : nullptr);
  return {h_out, c_out, save ? gates : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cell_step_backward_cpu(
    c10::string_view cell_name, const Tensor& dh_in, const optional<Tensor>& dc_in, const Tensor& x_in,
    const Tensor& h_in, const optional<Tensor>& c_in, const Tensor& w_ih, const Tensor& w_hh, const Tensor& h_new_in,
    const Tensor& c_new_in, const Tensor& gates_in) {
  const CellShapes s = check_cell_inputs(cell_name, x_in, h_in, c_in, w_ih, w_hh, c10::nullopt, c10::nullopt);
  TORCH_CHECK(x_in.device().is_cpu(), "fused_rnn: cell_step_backward's kernel runs on CPU tensors");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool lstm = s.cell == Cell::LSTM, gru = s.cell == Cell::GRU;
  const int64_t B = s.B, H = s.H, GH = s.G * s.H;
  TORCH_CHECK(dh_in.sizes() == h_in.sizes(), "fused_rnn: dh must be ", h_in.sizes(), ", got ", dh_in.sizes());
  TORCH_CHECK(!lstm || (dc_in.has_value() && dc_in->sizes() == h_in.sizes() && c_new_in.sizes() == h_in.sizes()),
              "fused_rnn: lstm's backward needs dc and c' of shape ", h_in.sizes());
  TORCH_CHECK(!(lstm || gru) || (gates_in.dim() == 2 && gates_in.size(0) == B && gates_in.size(1) == 4 * H),
              "fused_rnn: the saved gates are missing (was the forward run with save=False?)");
  TORCH_CHECK(s.cell == Cell::LSTM || s.cell == Cell::GRU || h_new_in.sizes() == h_in.sizes(),
              "fused_rnn: the rnn backward needs h'");
  const auto opts = x_in.options();
  const auto dtype = x_in.scalar_type();
  const Tensor x = x_in.contiguous(), h = h_in.contiguous();
  const Tensor dh = dh_in.to(dtype).contiguous();  // often an expanded zero
  const Tensor dc = lstm ? dc_in->to(dtype).contiguous() : Tensor();
  const Tensor c = lstm ? c_in->contiguous() : Tensor();
  const Tensor c_new = lstm ? c_new_in.contiguous() : Tensor();
  const Tensor gates = gates_in.contiguous(), h_new = h_new_in.contiguous();

  Tensor dg_x = at::empty({B, GH}, opts);
  Tensor dg_h = gru ? at::empty({B, GH}, opts) : dg_x;
  Tensor dh_prev = at::empty({B, H}, opts);  // GRU: starts as the direct part dh*z
  Tensor dc_prev = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  CellBackwardParams p{};
  p.cell = s.cell;
  p.dtype = to_dtype(dtype);
  p.B = B;
  p.H = H;
  p.dh = dh.data_ptr();
  p.dc = lstm ? dc.data_ptr() : nullptr;
  p.gates = (lstm || gru) ? gates.data_ptr() : nullptr;
  p.c_prev = lstm ? c.data_ptr() : nullptr;
  p.c_new = lstm ? c_new.data_ptr() : nullptr;
  p.h_prev = h.data_ptr();
  p.h_new = h_new.data_ptr();
  p.dg_x = dg_x.data_ptr();
  p.dg_h = dg_h.data_ptr();
  p.dh_direct = dh_prev.data_ptr();
  p.dc_prev = lstm ? dc_prev.data_ptr() : nullptr;
  if (B > 0 && H > 0) cpu::cell_backward(p);

  if (cpu::cell_products_pay(p.dtype, B, s.I, H, s.G) && B > 0 && H > 0) {  // one pass over each weight
    const Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
    Tensor dx = at::empty({B, s.I}, opts), dw_ih = empty_large({GH, s.I}, opts), dw_hh = empty_large({GH, H}, opts);
    Tensor db_ih = at::empty({GH}, opts), db_hh = at::empty({GH}, opts);
    p.I = s.I;
    p.x = x.data_ptr();
    p.w_ih = w_ih_c.data_ptr();
    p.w_hh = w_hh_c.data_ptr();
    p.dx = dx.data_ptr();
    p.dh_prev = dh_prev.data_ptr();
    p.dw_ih = dw_ih.data_ptr();
    p.dw_hh = dw_hh.data_ptr();
    p.db_ih = db_ih.data_ptr();
    p.db_hh = db_hh.data_ptr();
    cpu::cell_backward_products(p);
    return {dx, dh_prev, dc_prev, dw_ih, dw_hh, db_ih, db_hh};
  }
  Tensor dx = cpu::mm(dg_x, w_ih);
  if (gru)
    cpu::addmm_(dh_prev, dg_h, w_hh);
  else
    cpu::mm_out(dh_prev, dg_x, w_hh);
  // the weight gradients (1 MB and more from H=256) recycled: from glibc they are page-faulted in every step
  Tensor dw_ih = empty_large({GH, s.I}, opts), dw_hh = empty_large({GH, H}, opts);
  cpu::mm_out(dw_ih, dg_x.t(), x);
  cpu::mm_out(dw_hh, dg_h.t(), h);
  Tensor db_ih = dg_x.sum(0);
  Tensor db_hh = gru ? dg_h.sum(0) : db_ih.clone();  // outputs never alias each other
  return {dx, dh_prev, dc_prev, dw_ih, dw_hh, db_ih, db_hh};
}

std::tuple<Tensor, Tensor> cell_step_cpu(c10::string_view cell, const Tensor& x, const Tensor& h,
                                         const optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh,
                                         const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
  return forward_cpu(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, nullptr);
}

// ---------------------------------------------------------------- double backward
// One step of the cell in differentiable ATen ops (the math of fused_rnn/reference.py), fp16/bf16
// computed in fp32 as the kernels do: what a create_graph=True backward differentiates, as
// fused_rnn/double_backward.py does for whole layers. Returns (h', c' or undefined).
std::pair<Tensor, Tensor> step_in_aten_ops(const std::string& cell, const Tensor& x, const Tensor& h, const Tensor& c,
                                           const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih,
                                           const Tensor& b_hh) {
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto up = [&](const Tensor& t) { return t.defined() && half ? t.to(at::kFloat) : t; };
  const auto opt = [&](const Tensor& t) { return t.defined() ? optional<Tensor>(up(t)) : c10::nullopt; };
  const Tensor gx = at::linear(up(x), up(w_ih), opt(b_ih)), gh = at::linear(up(h), up(w_hh), opt(b_hh));
  if (cell == "lstm") {
    const auto g = (gx + gh).chunk(4, 1);
    const Tensor c_new = at::sigmoid(g[1]) * up(c) + at::sigmoid(g[0]) * at::tanh(g[2]);
    return {at::sigmoid(g[3]) * at::tanh(c_new), c_new};
  }
  if (cell == "gru") {
    const auto a = gx.chunk(3, 1), b = gh.chunk(3, 1);
    const Tensor r = at::sigmoid(a[0] + b[0]), z = at::sigmoid(a[1] + b[1]), n = at::tanh(a[2] + r * b[2]);
    return {(1 - z) * n + z * up(h), Tensor()};
  }
  return {cell == "rnn_relu" ? at::relu(gx + gh) : at::tanh(gx + gh), Tensor()};
}

variable_list differentiable_backward(AutogradContext* ctx, const variable_list& grads) {
  const std::string cell = ctx->saved_data["cell"].toStringRef();
  const bool lstm = cell == "lstm";
  const auto saved = ctx->get_saved_variables();
  // the Function's tensor arguments: x, h, c, w_ih, w_hh, b_ih, b_hh; an absent optional one (c of a
  // GRU/RNN, a missing bias) is no edge of the node, so needs_input_grad counts only the present ones
  const variable_list inputs = {saved[0], saved[1], saved[2], saved[3], saved[4], saved[8], saved[9]};
  std::vector<bool> needed(inputs.size(), false);
  for (size_t i = 0, edge = 0; i < inputs.size(); ++i)
    if (inputs[i].defined()) needed[i] = ctx->needs_input_grad(edge++);
  auto [h_new, c_new] = step_in_aten_ops(cell, saved[0], saved[1], saved[2], saved[3], saved[4], saved[8], saved[9]);
  variable_list outputs{h_new}, grad_outputs{grads[0].defined() ? grads[0].to(h_new.scalar_type())
                                                                 : at::zeros_like(h_new)};
  if (lstm && grads[1].defined()) {
    outputs.push_back(c_new);
    grad_outputs.push_back(grads[1].to(c_new.scalar_type()));
  }
  variable_list wanted;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (needed[i]) wanted.push_back(inputs[i]);
  const variable_list found = torch::autograd::grad(outputs, wanted, grad_outputs, /*retain_graph=*/true,
                                                    /*create_graph=*/true, /*allow_unused=*/true);
  variable_list result{Tensor()};  // the cell name
  size_t k = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!needed[i]) {
      result.push_back(Tensor());
      continue;
    }
    const Tensor d = found[k++];  // an input the step does not reach gets zeros, not None
    result.push_back(d.defined() ? d.to(inputs[i].scalar_type()) : at::zeros_like(inputs[i]));
  }
  return result;
}

// ---------------------------------------------------------------- autograd
// The forward and backward go through the dispatcher (not the CPU functions directly), so that
// fake tensors (torch.compile) and other devices reach their own kernels.
class CellStepFunction : public torch::autograd::Function<CellStepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, c10::string_view cell, const Tensor& x, const Tensor& h,
                               const optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh,
                               const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fused_rnn::cell_step_forward", "")
                               .typed<decltype(cell_step_forward_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [h_new, c_new, gates] = op.call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, true);
    const Cell kind = parse_cell(cell);
    ctx->saved_data["cell"] = std::string(cell);
    ctx->saved_data["has_b_ih"] = b_ih.has_value();
    ctx->saved_data["has_b_hh"] = b_hh.has_value();
    // the biases are kept (references to parameters that are alive anyway) only for double backward
    ctx->save_for_backward({x, h, c.has_value() ? *c : Tensor(), w_ih, w_hh,
                            kind == Cell::RNN_TANH || kind == Cell::RNN_RELU ? h_new : Tensor(),
                            kind == Cell::LSTM ? c_new : Tensor(), gates, b_ih.has_value() ? *b_ih : Tensor(),
                            b_hh.has_value() ? *b_hh : Tensor()});
    if (kind != Cell::LSTM) ctx->mark_non_differentiable({c_new});  // the [0] placeholder
    return {h_new, c_new};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // create_graph=True: cell_step_backward has no derivative of its own (autograd would drop that
    // path silently), so the step is recomputed in differentiable ATen ops and differentiated.
    if (at::GradMode::is_enabled()) return differentiable_backward(ctx, grads);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fused_rnn::cell_step_backward", "")
                               .typed<decltype(cell_step_backward_cpu)>();
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool lstm = cell == "lstm";
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &h = saved[1], &c = saved[2], &w_ih = saved[3], &w_hh = saved[4];
    const Tensor h_new = saved[5].defined() ? saved[5] : h;  // the rnn backward reads h'
    const Tensor c_new = lstm ? saved[6] : h;
    auto [dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh] =
        op.call(cell, grads[0], lstm ? optional<Tensor>(grads[1]) : c10::nullopt, x, h,
                lstm ? optional<Tensor>(c) : c10::nullopt, w_ih, w_hh, h_new, c_new, saved[7]);
    return {Tensor(), dx, dh, lstm ? dc : Tensor(), dw_ih, dw_hh,
            ctx->saved_data["has_b_ih"].toBool() ? db_ih : Tensor(),
            ctx->saved_data["has_b_hh"].toBool() ? db_hh : Tensor()};
  }
};

std::tuple<Tensor, Tensor> cell_step_autograd(c10::string_view cell, const Tensor& x, const Tensor& h,
                                              const optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh,
                                              const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
  const auto needs_grad = [](const Tensor& t) { return t.requires_grad(); };
  const auto opt_needs_grad = [](const optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(needs_grad(x) || needs_grad(h) || opt_needs_grad(c) || needs_grad(w_ih) ||
                                       needs_grad(w_hh) || opt_needs_grad(b_ih) || opt_needs_grad(b_hh))) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fused_rnn::cell_step", "").typed<decltype(cell_step_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh);
  }
  auto out = CellStepFunction::apply(cell, x, h, c, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------- eager entry from Python
// fused_rnn._C.cell_step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> (h', c' | [0]) or None:
// fused_rnn::cell_step called through the dispatcher as torch.ops.fused_rnn.cell_step would
// (autograd, fake and Python-mode kernels all apply), without torch.ops' boxed argument parsing
// (~3 us a call, a third of a B=1 step). The modules' eager fast path calls it and checks here, in
// C++, that the call is one torch.nn would accept; None (nothing run) sends the module down its
// full path, whose checks raise torch.nn's errors. torch.compile traces torch.ops instead.

// Whether the arguments are what torch.nn's cell accepts without an error and the op runs: 2-D CPU
// input and states of the weights' sizes, one dtype. Input and states must be plain tensors (a
// subclass may override __torch_function__, which torch.ops honours); weights may be Parameters.
bool fast_call_fits(PyObject* const* args, int64_t G) {
  for (int i = 1; i < 8; ++i) {
    PyObject* a = args[i];
    if ((i == 3 || i >= 6) && a == Py_None) continue;
    if (i <= 3 ? !THPVariable_CheckExact(a) : !THPVariable_Check(a)) return false;
  }
  const Tensor &x = THPVariable_Unpack(args[1]), &h = THPVariable_Unpack(args[2]);
  const Tensor &w_ih = THPVariable_Unpack(args[4]), &w_hh = THPVariable_Unpack(args[5]);
  if (x.dim() != 2 || w_ih.dim() != 2 || w_hh.dim() != 2 || !x.device().is_cpu()) return false;
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1);
  const auto same = [&](const Tensor& t) { return t.scalar_type() == x.scalar_type() && t.device().is_cpu(); };
  const auto state_fits = [&](const Tensor& t) { return same(t) && t.dim() == 2 && t.size(0) == B && t.size(1) == H; };
  if (!state_fits(h) || (args[3] != Py_None) != (G == 4)) return false;  // G == 4: LSTM, which has cx
  if (args[3] != Py_None && !state_fits(THPVariable_Unpack(args[3]))) return false;
  if (!same(w_ih) || !same(w_hh) || w_ih.size(0) != G * H || w_ih.size(1) != I || w_hh.size(0) != G * H) return false;
  for (int i = 6; i < 8; ++i) {
    if (args[i] == Py_None) continue;
    const Tensor& b = THPVariable_Unpack(args[i]);
    if (!same(b) || b.dim() != 1 || b.size(0) != G * H) return false;
  }
  return true;
}

PyObject* cell_step_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) return PyErr_Format(PyExc_TypeError, "fused_rnn._C.cell_step takes 8 arguments, got %zd", nargs);
  Py_ssize_t length = 0;
  const char* cell = PyUnicode_AsUTF8AndSize(args[0], &length);
  if (cell == nullptr) return nullptr;
  const c10::string_view cell_name(cell, length);
  if (!fast_call_fits(args, num_gates(parse_cell(cell_name)))) Py_RETURN_NONE;
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_rnn::cell_step", "").typed<decltype(cell_step_cpu)>();
  const auto optional_arg = [&](int i) {
    return args[i] == Py_None ? optional<Tensor>() : optional<Tensor>(THPVariable_Unpack(args[i]));
  };
  Tensor h_new, c_new;
  {
    const GilReleased no_gil;
    std::tie(h_new, c_new) = op.call(cell_name, THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]),
                                     optional_arg(3), THPVariable_Unpack(args[4]), THPVariable_Unpack(args[5]),
                                     optional_arg(6), optional_arg(7));
  }
  return tensors_as_tuple({h_new, c_new});
  END_HANDLE_TH_ERRORS
}

PyMethodDef python_methods[] = {
    {"cell_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(cell_step_py)), METH_FASTCALL,
     "cell_step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> (h', c' | [0]), or None where torch.nn's cell "
     "would raise: fused_rnn::cell_step, eager"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

int add_cell_step_entry(PyObject* module) { return PyModule_AddFunctions(module, python_methods); }

TORCH_LIBRARY_FRAGMENT(fused_rnn, m) {
  m.def(
      "cell_step(str cell, Tensor input, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor h, Tensor c)");
  m.def(
      "cell_step_forward(str cell, Tensor input, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool save) -> (Tensor h, Tensor c, Tensor gates)");
  m.def(
      "cell_step_backward(str cell, Tensor dh, Tensor? dc, Tensor input, Tensor hx, Tensor? cx, Tensor w_ih, "
      "Tensor w_hh, Tensor h_new, Tensor c_new, Tensor gates) -> (Tensor d_input, Tensor d_hx, Tensor d_cx, "
      "Tensor d_w_ih, Tensor d_w_hh, Tensor d_b_ih, Tensor d_b_hh)");
}

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("cell_step", &cell_step_cpu);
  m.impl("cell_step_forward", &cell_step_forward_cpu);
  m.impl("cell_step_backward", &cell_step_backward_cpu);
}

TORCH_LIBRARY_IMPL(fused_rnn, Autograd, m) { m.impl("cell_step", &cell_step_autograd); }

}  // namespace fused_rnn
