"""Triton pointwise cell math, written once for the forward and backward kernels.

Gate order is PyTorch's (LSTM i, f, g, o; GRU r, z, n). Every function works on register blocks
of any float dtype; the kernels call them in fp32 (fp16/bf16/fp32 inputs) or fp64 (gradcheck).
The activations only ever exponentiate non-positive numbers, so a pre-activation of +-1e4 saturates
to 0/1 (sigmoid) or -1/1 (tanh) instead of overflowing to inf/inf = NaN.
"""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    e = tl.exp(-tl.abs(x))  # in (0, 1]: cannot overflow
    return tl.where(x >= 0, 1 / (1 + e), e / (1 + e))


@triton.jit
def tanh(x):
    e = tl.exp(-2 * tl.abs(x))  # in (0, 1]: cannot overflow
    t = (1 - e) / (1 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def lstm_cell_forward(pre_i, pre_f, pre_g, pre_o, c):
    """Pre-activations and c_{t-1} -> (i, f, g, o, c_t, h_t)."""
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    g = tanh(pre_g)
    o = sigmoid(pre_o)
    c_new = f * c + i * g
    return i, f, g, o, c_new, o * tanh(c_new)


@triton.jit
def lstm_cell_backward(i, f, g, o, c_prev, c, dh, dc):
    """Saved gates, c_{t-1}, c_t and incoming dh_t, dc_t -> (d pre_i, d pre_f, d pre_g, d pre_o, dc_{t-1})."""
    tc = tanh(c)
    dc = dc + dh * o * (1 - tc * tc)
    d_i = dc * g * i * (1 - i)
    d_f = dc * c_prev * f * (1 - f)
    d_g = dc * i * (1 - g * g)
    d_o = dh * tc * o * (1 - o)
    return d_i, d_f, d_g, d_o, dc * f


@triton.jit
def gru_cell_forward(x_r, x_z, x_n, gh_r, gh_z, gh_n, h):
    """Input parts gx_*, recurrent parts gh_* = W_h* h + b_h* and h_{t-1} -> (r, z, n, h_t)."""
    r = sigmoid(x_r + gh_r)
    z = sigmoid(x_z + gh_z)
    n = tanh(x_n + r * gh_n)
    return r, z, n, (1 - z) * n + z * h


@triton.jit
def gru_cell_backward(r, z, n, gh_n, h_prev, dh):
    """Saved r, z, n, gh_n, h_{t-1} and dh_t -> (d pre_r, d pre_z, d gx_n, d gh_n, direct part of dh_{t-1}).

    gx_n and gh_n = W_hn h + b_hn enter n's pre-activation as gx_n + r * gh_n, so their grads differ by r.
    """
    d_n = dh * (1 - z) * (1 - n * n)
    d_z = dh * (h_prev - n) * z * (1 - z)
    d_r = d_n * gh_n * r * (1 - r)
    return d_r, d_z, d_n, d_n * r, dh * z


@triton.jit
def rnn_cell_forward(pre, RELU: tl.constexpr):
    if RELU:
        h = tl.maximum(pre, 0)
    else:
        h = tanh(pre)
    return h


@triton.jit
def rnn_cell_backward(h, dh, RELU: tl.constexpr):
    """Post-activation h_t and dh_t -> d pre."""
    if RELU:
        d = tl.where(h > 0, dh, 0)
    else:
        d = dh * (1 - h * h)
    return d
