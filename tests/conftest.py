import math
import os

import torch

# Triton kernels run on CPU tensors in the interpreter when there is no GPU. The variable must be
# set before any @triton.jit function is created, so it is set here, before the tests import anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# deterministic mode (see nan_fill_cpp_allocations) makes cuBLAS ask for a fixed workspace
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402

_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poison(t):
    if t.is_floating_point() and t.device.type != "meta":
        t.fill_(math.nan)
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill every tensor allocated with torch.empty* from Python with NaN, so an output element
    a kernel forgets to write fails the comparison instead of passing on leftover memory."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(_new_empty(self, *a, **k)))
    yield


@pytest.fixture(autouse=True)
def nan_fill_cpp_allocations():
    """at::empty inside the C++/CUDA ops (and every other uninitialised allocation) returns NaN-filled
    memory while this is on: torch's deterministic mode with fill_uninitialized_memory, for every test,
    so an element a kernel forgets to write fails loudly, also when the caching allocator hands a
    repeated run the blocks of the run before. (On a GPU, cuBLAS then wants CUBLAS_WORKSPACE_CONFIG.)"""
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])
    torch.utils.deterministic.fill_uninitialized_memory = old[2]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(1234)
    yield
