// What the modules' eager entries from Python share (_C.cell_step in csrc/cell_step.cpp,
// _C.layer_forward in csrc/layer_entry.cpp): the GIL released while the op runs, and the op's
// tensors handed back as one Python tuple.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>

#include <initializer_list>

namespace fused_rnn {

// Releases the GIL for its scope: other Python threads run while the op does.
struct GilReleased {
  PyThreadState* state = PyEval_SaveThread();
  ~GilReleased() { PyEval_RestoreThread(state); }
};

// A new tuple of the tensors, None for an undefined one; nullptr with the Python error set.
inline PyObject* tensors_as_tuple(std::initializer_list<at::Tensor> tensors) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(tensors.size()));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  for (const at::Tensor& t : tensors) {
    PyObject* item = THPVariable_Wrap(t);  // None for an undefined tensor
    if (item == nullptr) {
      Py_DECREF(out);  // and the items already in it
      return nullptr;
    }
    PyTuple_SET_ITEM(out, i++, item);  // the tuple takes the reference
  }
  return out;
}

}  // namespace fused_rnn
