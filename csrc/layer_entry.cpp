// fused_rnn._C.layer_forward: the layer modules' eager call on CPU tensors -- inference, a decoder
// stepping an nn.LSTM/GRU one token at a time under torch.no_grad(), and training calls.
//
//   layer_forward(cell, input, hx, cx, weights, num_layers, bidirectional, batch_first, has_biases,
//                 input_size, hidden_size, proj_size) -> (output, h_n, c_n | None) or None
//
// The same stack fused_rnn.functional.rnn runs -- per layer and direction the registered
// fused_rnn::recurrence_forward_projected with b_ih folded into b_hh as functional._fold_bias does,
// the directions' outputs concatenated, the final states stacked -- so its results are the full
// path's bit for bit; only the Python around it is gone (~30 us of a T=1 no-grad call: the module's
// checks, functional.rnn, the backend's wrapper, torch.ops' argument parsing; ~0.2 ms of a training
// call, its backward included). When a tensor requires a gradient, autograd records the stack: the
// fold, the concatenation and the stacking as ATen ops, each layer and direction as the C++ node of
// csrc/projected_autograd.cpp, whose backward is the one the op registers in Python.
//
// None (nothing run) for anything torch.nn's layer would refuse or that this entry does not cover
// (unbatched input, empty sizes, a tensor subclass, another device or dtype mix, weights of other
// shapes): fused_rnn/modules.py then takes its full path, whose checks raise torch.nn's errors. What
// Python alone knows (autocast, tracing, forward-mode AD, dropout, zoneout, the backend's choice,
// parametrized weights) the module checks before calling.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <tuple>
#include <vector>

#include "op_args.h"
#include "projected_autograd.h"
#include "python_entry.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

// The module's sizes, as Python passes them.
struct LayerSizes {
  c10::string_view cell_name;  // the op's cell argument (the caller's str, alive for the call)
  Cell cell;
  int64_t num_layers, directions, input_size, hidden, proj;
  bool has_biases;
  int64_t out() const { return proj > 0 ? proj : hidden; }
  int64_t per_direction() const { return 2 + 2 * has_biases + (proj > 0); }
};

// A plain CPU tensor (or Parameter) of x's dtype with exactly these sizes.
bool fits(PyObject* obj, const Tensor& x, c10::IntArrayRef sizes) {
  if (!THPVariable_CheckExact(obj)) return false;
  const Tensor& t = THPVariable_Unpack(obj);
  return t.device().is_cpu() && t.scalar_type() == x.scalar_type() && t.sizes() == sizes;
}

// Whether torch.nn's layer takes these arguments without an error and the op runs them: input
// [T, B, I] (or [B, T, I]), the states [L*D, B, Hout] and [L*D, B, H], every weight of the shape
// the module's sizes give, one dtype, the CPU.
bool call_fits(const LayerSizes& s, PyObject* input, PyObject* hx, PyObject* cx, PyObject* weights, bool batch_first) {
  if (!THPVariable_CheckExact(input)) return false;
  const Tensor& x = THPVariable_Unpack(input);
  if (x.dim() != 3 || !x.device().is_cpu() || x.size(2) != s.input_size || x.numel() == 0) return false;
  const int64_t B = x.size(batch_first ? 0 : 1), LD = s.num_layers * s.directions, G = num_gates(s.cell);
  if ((hx != Py_None && !fits(hx, x, {LD, B, s.out()})) || (cx != Py_None) != (s.cell == Cell::LSTM && hx != Py_None))
    return false;
  if (cx != Py_None && !fits(cx, x, {LD, B, s.hidden})) return false;
  if (!PyList_Check(weights) || PyList_GET_SIZE(weights) != LD * s.per_direction()) return false;
  for (int64_t k = 0; k < LD; ++k) {
    const auto w = [&](int64_t i) { return PyList_GET_ITEM(weights, k * s.per_direction() + i); };
    const int64_t in = k < s.directions ? s.input_size : s.directions * s.out();
    if (!fits(w(0), x, {G * s.hidden, in}) || !fits(w(1), x, {G * s.hidden, s.out()})) return false;
    if (s.has_biases && (!fits(w(2), x, {G * s.hidden}) || !fits(w(3), x, {G * s.hidden}))) return false;
    if (s.proj > 0 && !fits(w(s.per_direction() - 1), x, {s.proj, s.hidden})) return false;
  }
  return true;
}

// Whether any of the call's tensors asks for a gradient (then autograd records the call).
bool any_requires_grad(PyObject* input, PyObject* hx, PyObject* cx, PyObject* weights) {
  if (!c10::GradMode::is_enabled()) return false;
  for (PyObject* t : {input, hx, cx})
    if (t != Py_None && THPVariable_Unpack(t).requires_grad()) return true;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(weights); ++i)
    if (THPVariable_Unpack(PyList_GET_ITEM(weights, i)).requires_grad()) return true;
  return false;
}

// functional.rnn's stack on checked arguments: (output, h_n, c_n or undefined). record: whether any
// tensor requires a gradient (any_requires_grad); if not, everything runs below autograd.
std::tuple<Tensor, Tensor, Tensor> run_layers(const LayerSizes& s, const Tensor& input, const Tensor& hx_in,
                                              const Tensor& cx_in, const std::vector<Tensor>& w, bool batch_first,
                                              bool record) {
  optional<at::AutoDispatchBelowAutograd> below_autograd;
  if (!record) below_autograd.emplace();
  const bool lstm = s.cell == Cell::LSTM;
  Tensor x = batch_first ? input.transpose(0, 1) : input;
  const int64_t B = x.size(1), LD = s.num_layers * s.directions;
  const Tensor hx = hx_in.defined() ? hx_in : at::zeros({LD, B, s.out()}, x.options());
  const Tensor cx = !lstm ? Tensor() : cx_in.defined() ? cx_in : at::zeros({LD, B, s.hidden}, x.options());
  std::vector<Tensor> h_n, c_n, ys;
  for (int64_t layer = 0; layer < s.num_layers; ++layer) {
    ys.clear();
    for (int64_t d = 0; d < s.directions; ++d) {
      const int64_t k = layer * s.directions + d;
      const Tensor* wk = &w[k * s.per_direction()];
      Tensor b_ih, b_hh;
      if (s.has_biases) {  // functional._fold_bias: LSTM and RNN add b_ih to the recurrent bias
        b_ih = s.cell == Cell::GRU ? wk[2] : Tensor();
        b_hh = s.cell == Cell::GRU ? wk[3] : wk[2] + wk[3];
      }
      const Tensor w_hr = s.proj > 0 ? wk[s.per_direction() - 1] : Tensor();
      auto [y, h, c] = projected_recurrence(s.cell_name, x, wk[0], b_ih, hx[k], lstm ? cx[k] : Tensor(), wk[1], b_hh,
                                            w_hr, d == 1);
      ys.push_back(std::move(y));
      h_n.push_back(std::move(h));
      if (lstm) c_n.push_back(std::move(c));
    }
    x = s.directions == 1 ? ys[0] : at::cat(ys, 2);
  }
  return {batch_first ? x.transpose(0, 1) : x, at::stack(h_n), lstm ? at::stack(c_n) : Tensor()};
}

PyObject* layer_forward_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 12)
    return PyErr_Format(PyExc_TypeError, "fused_rnn._C.layer_forward takes 12 arguments, got %zd", nargs);
  Py_ssize_t length = 0;
  const char* name = PyUnicode_AsUTF8AndSize(args[0], &length);
  if (name == nullptr) return nullptr;
  const c10::string_view cell(name, length);
  LayerSizes s{cell, parse_cell(cell), PyLong_AsLongLong(args[5]), 1 + PyObject_IsTrue(args[6]),
               PyLong_AsLongLong(args[9]), PyLong_AsLongLong(args[10]), PyLong_AsLongLong(args[11]),
               PyObject_IsTrue(args[8]) == 1};
  const bool batch_first = PyObject_IsTrue(args[7]) == 1;
  if (PyErr_Occurred()) return nullptr;
  PyObject *input = args[1], *hx = args[2], *cx = args[3], *weights = args[4];
  if (s.num_layers < 1 || s.hidden < 1 || s.proj < 0 || !call_fits(s, input, hx, cx, weights, batch_first))
    Py_RETURN_NONE;
  const bool record = any_requires_grad(input, hx, cx, weights);
  std::vector<Tensor> w;
  w.reserve(PyList_GET_SIZE(weights));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(weights); ++i) w.push_back(THPVariable_Unpack(PyList_GET_ITEM(weights, i)));
  const auto tensor_or_none = [](PyObject* t) { return t == Py_None ? Tensor() : THPVariable_Unpack(t); };
  Tensor output, h_n, c_n;
  {
    const GilReleased no_gil;
    std::tie(output, h_n, c_n) =
        run_layers(s, THPVariable_Unpack(input), tensor_or_none(hx), tensor_or_none(cx), w, batch_first, record);
  }
  return tensors_as_tuple({output, h_n, c_n});  // c_n undefined (None) but for the LSTM
  END_HANDLE_TH_ERRORS
}

PyMethodDef python_methods[] = {
    {"layer_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layer_forward_py)), METH_FASTCALL,
     "layer_forward(cell, input, hx, cx, weights, num_layers, bidirectional, batch_first, has_biases, input_size, "
     "hidden_size, proj_size) -> (output, h_n, c_n | None), or None where torch.nn's layer would raise: the "
     "layers' eager call on CPU tensors, recorded by autograd when a tensor requires a gradient"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

int add_layer_entry(PyObject* module) { return PyModule_AddFunctions(module, python_methods); }

}  // namespace fused_rnn
