// One layer and direction of the layer entry's training calls (csrc/layer_entry.cpp): the registered
// fused_rnn::recurrence_forward_projected recorded for autograd by a C++ node, whose backward is the
// one fused_rnn/ops/cpp/ops.py registers for the op (_backward, _projection_grads): the same ops on
// the same tensors, so the gradients are the Python path's bit for bit, without its ~0.1 ms of
// Python per layer and call. A backward with create_graph=True hands the second-order gradients to
// Python (ops.second_order_projected, the reference recompute every backend shares).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace fused_rnn {

// (y, h_n, c_n) of recurrence_forward_projected(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, no
// lengths, reverse); undefined tensors stand for the op's absent (None) arguments. With grad mode
// on and any of the tensors requiring a gradient, the outputs carry the node; otherwise the op runs
// below autograd without saving anything for a backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> projected_recurrence(
    c10::string_view cell, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& b_ih,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& b_hh,
    const at::Tensor& w_hr, bool reverse);

}  // namespace fused_rnn
