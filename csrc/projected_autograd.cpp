// fused_rnn::recurrence_forward_projected under a C++ autograd node (projected_autograd.h).
#include "projected_autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <string>

#include "cpu/half_gemm.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ProjectedForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    c10::string_view, const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const optional<Tensor>&,
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, bool, bool);
using RecurrenceBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    c10::string_view, const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, bool, bool);

const c10::TypedOperatorHandle<ProjectedForward>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_rnn::recurrence_forward_projected", "")
                             .typed<ProjectedForward>();
  return op;
}

const c10::TypedOperatorHandle<RecurrenceBackward>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_rnn::recurrence_backward", "").typed<RecurrenceBackward>();
  return op;
}

optional<Tensor> opt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : optional<Tensor>(); }

// The node's tensor inputs, in forward's order. b_ih, c0, b_hh and w_hr may be absent (nullopt): an
// absent one is no input of the node (autograd's ExtractVariables), so ctx->needs_input_grad counts
// only the present ones.
enum Input : size_t { kX, kWIh, kBIh, kH0, kC0, kWHh, kBHh, kWHr, kTensorInputs };
// forward's saved tensors: the inputs above, then the op's outputs that its backward reads
enum Saved : size_t { kY = kTensorInputs, kGates, kCells, kProjIn };

struct ProjectedRecurrence : torch::autograd::Function<ProjectedRecurrence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w_ih, const optional<Tensor>& b_ih,
                               const Tensor& h0, const optional<Tensor>& c0, const Tensor& w_hh,
                               const optional<Tensor>& b_hh, const optional<Tensor>& w_hr, c10::string_view cell,
                               bool reverse) {
    const at::AutoDispatchBelowAutograd below_autograd;  // the op's own autograd is the Python one
    auto [y, h_n, c_n, gates, cells, proj_in] =
        forward_op().call(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, {}, reverse, true);
    ctx->mark_non_differentiable({gates, cells, proj_in});
    // as ops._setup_context_projected with second_order: b_ih and b_hh for the second-order recompute
    ctx->save_for_backward({x, w_ih, b_ih.value_or(Tensor()), h0, c0.value_or(Tensor()), w_hh,
                            b_hh.value_or(Tensor()), w_hr.value_or(Tensor()), y, gates, cells, proj_in});
    ctx->saved_data["cell"] = std::string(cell);  // as csrc/cell_step.cpp's node keeps its cell
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);  // an output no loss reached arrives undefined, as in Python
    return {y, h_n, c_n, gates, cells, proj_in};
  }

  // ops._backward for the projected op without lengths or options, then ops._projection_grads.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kTensorInputs + 2);  // + cell, reverse: no gradient
    const Tensor &dy_in = grads[0], &dh_n_in = grads[1], &dc_n_in = grads[2];
    if (!dy_in.defined() && !dh_n_in.defined() && !dc_n_in.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    std::array<bool, kTensorInputs> need{};  // per input; an absent one is no input of the node
    for (size_t i = 0, edge = 0; i < kTensorInputs; ++i)
      if (saved[i].defined()) need[i] = ctx->needs_input_grad(edge++);
    if (c10::GradMode::is_enabled()) return second_order(cell, reverse, saved, need, grads);
    const Tensor &x = saved[kX], &w_ih = saved[kWIh], &b_ih = saved[kBIh], &h0 = saved[kH0], &c0 = saved[kC0];
    const Tensor &w_hh = saved[kWHh], &b_hh = saved[kBHh], &w_hr = saved[kWHr], &y = saved[kY];
    const Tensor &gates = saved[kGates], &cells = saved[kCells], &proj_in = saved[kProjIn];
    const bool lstm = cell == "lstm";
    const Tensor dy = dy_in.defined() ? dy_in : at::zeros_like(y);
    const Tensor dh_n = dh_n_in.defined() ? dh_n_in : at::zeros_like(h0);
    const Tensor dc_n = !lstm                ? Tensor()
                        : dc_n_in.defined()  ? dc_n_in
                        : c0.defined()       ? at::zeros_like(c0)
                                             : at::zeros({y.size(1), cells.size(2)}, y.options());
    const bool need_d_h0 = need[kH0];
    const at::AutoDispatchBelowAutograd below_autograd;
    auto [d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr] =
        backward_op().call(cell, dy, dh_n, opt(dc_n), y, gates, cells, proj_in, h0, opt(c0), w_hh,
                           opt(w_hr), {}, reverse, need_d_h0);
    if (need[kX]) result[kX] = cpu::mm(d_gx.flatten(0, 1), w_ih).view({d_gx.size(0), d_gx.size(1), w_ih.size(1)});
    if (need[kWIh]) result[kWIh] = cpu::mm(d_gx.flatten(0, 1).t(), x.flatten(0, 1));
    if (need[kBIh] && b_ih.defined()) result[kBIh] = d_gx.sum(at::IntArrayRef{0, 1});
    if (need_d_h0) result[kH0] = d_h0;
    if (c0.defined()) result[kC0] = d_c0;
    result[kWHh] = d_w_hh;
    if (b_hh.defined()) result[kBHh] = d_b_hh;
    if (w_hr.defined()) result[kWHr] = d_w_hr;
    return result;
  }

  // create_graph=True: the gradients as differentiable graphs, from Python's reference recompute.
  static variable_list second_order(const std::string& cell, bool reverse, const variable_list& saved,
                                    const std::array<bool, kTensorInputs>& need, const variable_list& grads) {
    const pybind11::gil_scoped_acquire gil;
    // looked up on each call (an imported module: a dict lookup): a function-local static initialised
    // under the GIL can deadlock with another thread that waits for its initialisation holding the GIL
    const pybind11::object fn = pybind11::module_::import("fused_rnn.ops.cpp.ops").attr("second_order_projected");
    pybind11::tuple needs(static_cast<size_t>(kTensorInputs));
    for (size_t i = 0; i < kTensorInputs; ++i) needs[i] = pybind11::bool_(need[i]);
    const auto or_none = [](const Tensor& t) { return t.defined() ? pybind11::cast(t) : pybind11::none(); };
    pybind11::tuple inputs(static_cast<size_t>(kTensorInputs));
    for (size_t i = 0; i < kTensorInputs; ++i) inputs[i] = or_none(saved[i]);
    const pybind11::object out =
        fn(cell, reverse, inputs, needs, or_none(grads[0]), or_none(grads[1]), or_none(grads[2]));
    variable_list result(kTensorInputs + 2);
    const auto seq = out.cast<pybind11::sequence>();
    for (size_t i = 0; i < kTensorInputs; ++i)
      if (!seq[i].is_none()) result[i] = seq[i].cast<Tensor>();
    return result;
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> projected_recurrence(c10::string_view cell, const Tensor& x, const Tensor& w_ih,
                                                        const Tensor& b_ih, const Tensor& h0, const Tensor& c0,
                                                        const Tensor& w_hh, const Tensor& b_hh, const Tensor& w_hr,
                                                        bool reverse) {
  const auto requires_grad = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
  const bool record = c10::GradMode::is_enabled() && (requires_grad(x) || requires_grad(w_ih) || requires_grad(b_ih) ||
                                                      requires_grad(h0) || requires_grad(c0) || requires_grad(w_hh) ||
                                                      requires_grad(b_hh) || requires_grad(w_hr));
  if (!record) {  // ops._call_op with save=False: the kernel alone
    const at::AutoDispatchBelowAutograd below_autograd;
    auto out = forward_op().call(cell, x, w_ih, opt(b_ih), h0, opt(c0), w_hh, opt(b_hh), opt(w_hr), {}, reverse, false);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }
  const variable_list out =
      ProjectedRecurrence::apply(x, w_ih, opt(b_ih), h0, opt(c0), w_hh, opt(b_hh), opt(w_hr), cell, reverse);
  return {out[0], out[1], out[2]};
}

}  // namespace fused_rnn
