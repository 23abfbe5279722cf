// fused_rnn._C, the Python module whose import loads this library: the ops register themselves
// through the static initialisers of csrc/recurrence.cpp and csrc/cell_step.cpp; the module itself
// carries the build's ABI version and source hash (fused_rnn/ops/cpp/ops.py refuses a stale build),
// _C.cell_step and _C.layer_forward (the modules' eager calls), the CPU caches' report/clear functions and
// _C.cpu_isa(), _C.cpu_is_amd(), _C.cpu_gemm_via_fp32().
#include <Python.h>

#include "cpu/cpu_isa.h"
#include "cpu/half_gemm.h"
#include "cpu/packed_weight_cache.h"
#include "cpu/recycling_allocator.h"

// Hash of csrc/ at build time, written by setup.py; fused_rnn/ops/cpp/ops.py compares it with the
// sources beside it to report a stale build.
#if __has_include("fused_rnn_source_hash.h")
#include "fused_rnn_source_hash.h"
#else
#define FUSED_RNN_SOURCE_HASH ""
#endif

// Bump when a schema or the meaning of an output changes: the Python side refuses a stale build.
#define FUSED_RNN_ABI_VERSION 6

namespace fused_rnn {
int add_cell_step_entry(PyObject* module);  // csrc/cell_step.cpp: _C.cell_step, the cell modules' eager call
int add_layer_entry(PyObject* module);      // csrc/layer_entry.cpp: _C.layer_forward, the layers' no-grad call

namespace {
// _C.cpu_isa() -> the instruction set the CPU kernels run (csrc/cpu/cpu_isa.h): "default", "avx2",
// "avx512", "avx512_bf16" or "amx_bf16" (the last two: the bf16 fused recurrence's; the rest as avx512).
PyObject* cpu_isa_py(PyObject*, PyObject*) {
  static const char* const names[] = {"default", "avx2", "avx512", "avx512_bf16", "amx_bf16"};
  return PyUnicode_FromString(names[static_cast<int>(cpu::best_isa())]);
}
// _C.cpu_is_amd() -> whether the CPU is an AMD one (cpu_isa.h; fp32 then projects inside the fused
// loop, cpu_routes.h project_inside).
PyObject* cpu_is_amd_py(PyObject*, PyObject*) { return PyBool_FromLong(cpu::cpu_is_amd()); }
// _C.cpu_gemm_via_fp32(dtype_name) -> whether GEMMs on CPU tensors of that dtype ("bfloat16",
// "float16") go through fp32 copies (cpu/half_gemm.h; the Python side's projection grads follow it).
PyObject* cpu_gemm_via_fp32_py(PyObject*, PyObject* name) {
  const char* s = PyUnicode_AsUTF8(name);
  if (s == nullptr) return nullptr;
  const std::string n(s);
  const bool via = n == "bfloat16" ? cpu::gemm_via_fp32(at::kBFloat16) : n == "float16" && cpu::gemm_via_fp32(at::kHalf);
  return PyBool_FromLong(via);
}
// _C.cpu_weight_cache_stats() -> (hits, misses, entries, bytes) and _C.cpu_weight_cache_clear():
// the fused CPU forward's packed-weight cache (csrc/cpu/packed_weight_cache.h), for tests and benchmarks.
PyObject* cpu_weight_cache_stats_py(PyObject*, PyObject*) {
  const cpu::PackedWeightCacheStats s = cpu::packed_weight_cache().stats();
  return Py_BuildValue("(LLLL)", static_cast<long long>(s.hits), static_cast<long long>(s.misses),
                       static_cast<long long>(s.entries), static_cast<long long>(s.bytes));
}
PyObject* cpu_weight_cache_clear_py(PyObject*, PyObject*) {
  cpu::packed_weight_cache().clear();
  Py_RETURN_NONE;
}
// _C.cpu_recycle_pool() -> (blocks, bytes) waiting in the recycling allocator's pool
// (csrc/cpu/recycling_allocator.h) and _C.cpu_recycle_release(), which frees them.
PyObject* cpu_recycle_pool_py(PyObject*, PyObject*) {
  const auto pooled = cpu::RecyclingAllocator::get().pooled();
  return Py_BuildValue("(LL)", static_cast<long long>(pooled.first), static_cast<long long>(pooled.second));
}
PyObject* cpu_recycle_release_py(PyObject*, PyObject*) {
  cpu::RecyclingAllocator::get().release();
  Py_RETURN_NONE;
}
PyMethodDef cache_methods[] = {
    {"cpu_isa", cpu_isa_py, METH_NOARGS, "cpu_isa() -> the instruction set the CPU kernels run (FUSED_RNN_CPU_ISA caps it)"},
    {"cpu_is_amd", cpu_is_amd_py, METH_NOARGS, "cpu_is_amd() -> whether the CPU is an AMD one"},
    {"cpu_gemm_via_fp32", cpu_gemm_via_fp32_py, METH_O,
     "cpu_gemm_via_fp32(dtype_name) -> whether CPU GEMMs of that 16-bit dtype run on fp32 copies"},
    {"cpu_recycle_pool", cpu_recycle_pool_py, METH_NOARGS,
     "cpu_recycle_pool() -> (blocks, bytes) of freed op memory the CPU ops keep for reuse"},
    {"cpu_recycle_release", cpu_recycle_release_py, METH_NOARGS,
     "cpu_recycle_release(): frees the memory the CPU ops keep for reuse"},
    {"cpu_weight_cache_stats", cpu_weight_cache_stats_py, METH_NOARGS,
     "cpu_weight_cache_stats() -> (hits, misses, entries, bytes) of the fused CPU forward's packed-weight cache"},
    {"cpu_weight_cache_clear", cpu_weight_cache_clear_py, METH_NOARGS,
     "cpu_weight_cache_clear(): drops the packed-weight cache's entries and zeroes its counters"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace
}  // namespace fused_rnn

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "fused_rnn kernels; the ops are torch.ops.fused_rnn.*", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr || fused_rnn::add_cell_step_entry(m) < 0 || fused_rnn::add_layer_entry(m) < 0 ||
      PyModule_AddFunctions(m, fused_rnn::cache_methods) < 0)
    return nullptr;
  PyModule_AddIntConstant(m, "ABI_VERSION", FUSED_RNN_ABI_VERSION);
  PyModule_AddStringConstant(m, "SOURCE_HASH", FUSED_RNN_SOURCE_HASH);
#ifdef WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
