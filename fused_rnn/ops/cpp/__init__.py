"""The C++ (`cpu`) and CUDA C++ (`cuda`) backends: kernels in csrc/, built as fused_rnn._C.

Call path: backend module (cpu_backend.py / cuda_backend.py) -> ops.recurrence (autocast, autograd,
fake kernels) -> torch.ops.fused_rnn.recurrence_forward / recurrence_backward (csrc/recurrence.cpp)
-> pointwise kernels (csrc/cpu/pointwise_cpu.cpp, csrc/cuda/pointwise_cuda.cu) between GEMMs.
Importing this package never fails: when the extension is missing or stale, `ops.load_error()`
says why and the backends report themselves unavailable.
"""
