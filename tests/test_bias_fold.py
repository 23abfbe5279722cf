"""b_ih folded into the recurrent bias (functional._input_projection).

LSTM and the plain RNN project the input without its bias (a plain GEMM) and add b_ih + b_hh in
the recurrence; GRU keeps b_ih in the projection. On every backend that runs on CPU: outputs and
the gradients of both biases (and every other input) against torch.nn in float64 and float32,
with frozen biases, float64 gradcheck through the sum, and gx itself for each cell.
"""
import pytest
import torch

import fused_rnn
from fused_rnn import functional

from helpers import assert_close, grads_of, usable_backends

MODULES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {}), "rnn_relu": ("RNN", {"nonlinearity": "relu"})}
BACKENDS = usable_backends("cpu", torch.float64)
# triton's interpreter takes minutes per gradcheck here; its analytic backward is gradchecked in test_triton.py
GRADCHECK_BACKENDS = [b for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize("cell", list(MODULES))
def test_projection_folds_b_ih_except_for_gru(cell):
    g = torch.Generator().manual_seed(0)
    x, w_ih = torch.randn(4, 3, 5, generator=g), torch.randn(2 * 7, 5, generator=g)
    b_ih, b_hh = torch.randn(14, generator=g), torch.randn(14, generator=g)
    gx, b_step, source = functional._input_projection(cell, x, w_ih, b_ih, b_hh)
    if cell == "gru":
        assert torch.equal(gx, torch.nn.functional.linear(x, w_ih, b_ih)) and b_step is b_hh
        assert source[2] is b_ih
    else:
        assert torch.equal(gx, torch.nn.functional.linear(x, w_ih)) and torch.equal(b_step, b_ih + b_hh)
        assert source[2] is None
    gx, b_step, _ = functional._input_projection(cell, x, w_ih, None, None)  # bias=False: nothing to fold
    assert torch.equal(gx, torch.nn.functional.linear(x, w_ih)) and b_step is None


@pytest.mark.parametrize("dtype, frozen", [(torch.float64, None), (torch.float32, None), (torch.float64, "bias_ih"),
                                           (torch.float64, "bias_hh")], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", list(MODULES))
def test_every_gradient_matches_torch_nn(cell, backend, dtype, frozen):
    """Two bidirectional layers with a packed batch: y, h_n (c_n) and the gradients of the input,
    the states and every weight equal torch.nn's; a frozen bias gets none, the other its own."""
    name, kw = MODULES[cell]
    H, I, T, B = 37, 11, 6, 3
    ref = getattr(torch.nn, name)(I, H, num_layers=2, bidirectional=True, dtype=dtype, **kw)
    with torch.no_grad():  # nonzero biases, different for b_ih and b_hh
        for n, p in ref.named_parameters():
            if n.startswith("bias"):
                p.copy_(torch.randn(p.shape, dtype=dtype))
    ours = getattr(fused_rnn, name)(I, H, num_layers=2, bidirectional=True, dtype=dtype, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        for n, p in m.named_parameters():
            p.requires_grad_(frozen is None or not n.startswith(frozen))
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = torch.tensor([T, 2, 5])
    results = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, hn = m(packed)
        y = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
        outs = [y, *(hn if cell == "lstm" else (hn,))]
        params = [p for p in m.parameters() if p.requires_grad]
        results.append(outs + list(grads_of(outs, [xi, *params])))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, dtype, f"{cell} {backend} {dtype} frozen={frozen}: output/grad {i}")


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("cell", list(MODULES))
def test_gradcheck_through_the_folded_bias(cell, backend):
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    H, I, T, B = 3, 2, 4, 3
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, h0, w_ih, w_hh, b_ih, b_hh = r(T, B, I), r(1, B, H), r(G * H, I), r(G * H, H), r(G * H), r(G * H)
    c0 = r(1, B, H) if cell == "lstm" else None

    def f(x, h0, w_ih, w_hh, b_ih, b_hh, *c):
        out, h, c = functional.rnn(cell, x, h0, c[0] if c else None, [w_ih, w_hh, b_ih, b_hh], backend=backend)
        return (out, h) if c is None else (out, h, c)

    inputs = (x, h0, w_ih, w_hh, b_ih, b_hh) + ((c0,) if c0 is not None else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", list(MODULES))
def test_cell_step_matches_torch_nn(cell, backend):
    """A cell step away from the fused cell op (a recurrence of length 1) folds the same way."""
    name = {"lstm": "LSTMCell", "gru": "GRUCell"}.get(cell, "RNNCell")
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    ref = getattr(torch.nn, name)(5, 7, dtype=torch.float64, **kw)
    ours = getattr(fused_rnn, name)(5, 7, dtype=torch.float64, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, dtype=torch.float64)
    results = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        out = m(xi)
        outs = list(out) if isinstance(out, tuple) else [out]
        results.append(outs + list(grads_of(outs, [xi, *m.parameters()])))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float64, f"{name} {backend}: output/grad {i}")
