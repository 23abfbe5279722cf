"""backend=, $FUSED_RNN_BACKEND, `auto`, and available_backends()."""
import warnings

import pytest
import torch

import fused_rnn
from fused_rnn import backends
from fused_rnn.ops.cpp import cell_ops


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(cell_ops, "_runs", {})  # the modules' cached answers of which backend runs


def spy(monkeypatch):
    """Record which backend's recurrence runs."""
    used = []
    real = backends.get

    def get(name):
        used.append(name)
        return real(name)
    monkeypatch.setattr(backends, "get", get)
    return used


def test_available_backends_lists_every_backend_with_a_reason():
    status = fused_rnn.available_backends()
    assert list(status) == list(fused_rnn.BACKENDS)
    assert status["reference"].available and status["torch"].available
    for name, s in status.items():
        assert isinstance(s.reason, str) and s.reason
    assert not fused_rnn.available_backends("cuda")["cpu"].available


def test_explicit_backend_argument_is_used(monkeypatch):
    used = spy(monkeypatch)
    fused_rnn.LSTM(3, 4, backend="reference")(torch.randn(2, 1, 3))
    assert used == ["reference"]


def test_environment_variable_replaces_auto_but_not_an_explicit_choice(monkeypatch):
    used = spy(monkeypatch)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    fused_rnn.GRU(3, 4)(torch.randn(2, 1, 3))
    fused_rnn.GRU(3, 4, backend="torch")(torch.randn(2, 1, 3))
    assert used == ["reference", "torch"]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown fused_rnn backend 'fast'"):
        fused_rnn.LSTM(3, 4, backend="fast")
    with pytest.raises(ValueError, match="unknown fused_rnn backend 'fast'"):
        fused_rnn.LSTMCell(3, 4, backend="fast")


def test_requested_backend_that_cannot_run_raises_with_the_reason():
    m = fused_rnn.LSTM(3, 4, backend="cuda")
    with pytest.raises(RuntimeError, match="fused_rnn backend 'cuda' cannot run lstm on cpu"):
        m(torch.randn(2, 1, 3))


def test_auto_falls_back_and_says_so_once(monkeypatch):
    # a first choice that cannot run, so that auto must fall back
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cuda", "torch"))
    used = spy(monkeypatch)
    m = fused_rnn.LSTM(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(torch.randn(2, 1, 3))
        m(torch.randn(2, 1, 3))
    said = [w for w in caught if "auto uses backend 'torch'" in str(w.message)]
    assert len(said) == 1 and "'cuda' (" in str(said[0].message)
    assert used == ["torch", "torch"]


def test_auto_never_picks_the_reference(monkeypatch):
    used = spy(monkeypatch)
    # through functional.rnn, where the backend is asked for (the layers' C++ entry runs only what
    # cell_ops.runs_on_cpu resolves to the cpu backend)
    cell_ops.available()
    monkeypatch.setattr(cell_ops, "LAYER_FORWARD", lambda *args: None)
    fused_rnn.RNN(3, 4)(torch.randn(2, 1, 3))
    assert used and "reference" not in used
