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
    return lstm_gates_backward(i, f, g, o, c_prev, tc, dh, dc + dh * o * (1 - tc * tc))


@triton.jit
def lstm_gates_backward(i, f, g, o, c_prev, tanh_out, dh, dc):
    """h_t = o * tanh_out; dc is the whole grad of c_t (from later steps and through h_t)
    -> (d pre_i, d pre_f, d pre_g, d pre_o, dc_{t-1})."""
    d_i = dc * g * i * (1 - i)
    d_f = dc * c_prev * f * (1 - f)
    d_g = dc * i * (1 - g * g)
    d_o = dh * tanh_out * o * (1 - o)
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


@triton.jit
def zone_out(keep, previous, new, MASK: tl.constexpr):
    """Zoneout: keep is a 0/1 mask (MASK: 1 keeps the previous value exactly) or the probability p
    (eval: the mask's expectation, p * previous + (1 - p) * new), as fused_rnn/cell_math.py."""
    if MASK:
        out = tl.where(keep != 0, previous, new)
    else:
        out = new + keep * (previous - new)
    return out


@triton.jit
def layer_norm_forward(a0, a1, a2, a3, mask_h, G: tl.constexpr, EPS: tl.constexpr):
    """Layer norm of each row of a [BLOCK_B, G*H] block held as G tiles a0..a(G-1) of [BLOCK_B, BLOCK_H]
    (unused tiles ignored; lanes outside mask_h are padding) -> the G normalised tiles (zero in the
    padding) and 1/std [BLOCK_B, 1]. Two passes (mean, then the centred variance) as
    fused_rnn/cell_math.py: the row is in registers anyway."""
    n = tl.sum(mask_h.to(tl.int32), 0) * G
    total = tl.sum(tl.where(mask_h[None, :], a0, 0), 1)
    if G > 1:
        total += tl.sum(tl.where(mask_h[None, :], a1, 0), 1) + tl.sum(tl.where(mask_h[None, :], a2, 0), 1)
    if G > 3:
        total += tl.sum(tl.where(mask_h[None, :], a3, 0), 1)
    mean = (total / n)[:, None]
    c0 = tl.where(mask_h[None, :], a0 - mean, 0)
    c1 = c0
    c2 = c0
    c3 = c0
    var = tl.sum(c0 * c0, 1)
    if G > 1:
        c1 = tl.where(mask_h[None, :], a1 - mean, 0)
        c2 = tl.where(mask_h[None, :], a2 - mean, 0)
        var += tl.sum(c1 * c1, 1) + tl.sum(c2 * c2, 1)
    if G > 3:
        c3 = tl.where(mask_h[None, :], a3 - mean, 0)
        var += tl.sum(c3 * c3, 1)
    rstd = (1 / tl.sqrt(var / n + EPS))[:, None]
    return c0 * rstd, c1 * rstd, c2 * rstd, c3 * rstd, rstd


@triton.jit
def layer_norm_backward(d0, d1, d2, d3, v0, v1, v2, v3, rstd, mask_h, G: tl.constexpr):
    """out = v_hat * gain (+ bias): d_k = d out * gain and v_k = v_hat of tile k, rstd [BLOCK_B, 1]
    -> grad of the row before normalisation, tile by tile (zero in the padding):
    rstd * (d - mean(d) - v_hat * mean(d * v_hat)), the means over the G*H lanes of the row."""
    n = tl.sum(mask_h.to(tl.int32), 0) * G
    d0 = tl.where(mask_h[None, :], d0, 0)
    s1 = tl.sum(d0, 1)
    s2 = tl.sum(d0 * v0, 1)
    if G > 1:
        d1 = tl.where(mask_h[None, :], d1, 0)
        d2 = tl.where(mask_h[None, :], d2, 0)
        s1 += tl.sum(d1, 1) + tl.sum(d2, 1)
        s2 += tl.sum(d1 * v1, 1) + tl.sum(d2 * v2, 1)
    if G > 3:
        d3 = tl.where(mask_h[None, :], d3, 0)
        s1 += tl.sum(d3, 1)
        s2 += tl.sum(d3 * v3, 1)
    m1 = (s1 / n)[:, None]
    m2 = (s2 / n)[:, None]
    keep = mask_h[None, :]
    return (tl.where(keep, rstd * (d0 - m1 - v0 * m2), 0), tl.where(keep, rstd * (d1 - m1 - v1 * m2), 0),
            tl.where(keep, rstd * (d2 - m1 - v2 * m2), 0), tl.where(keep, rstd * (d3 - m1 - v3 * m2), 0))
