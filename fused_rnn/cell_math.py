"""Pointwise cell math in PyTorch ops, written once: forward and backward of each cell's step.

These are the pieces the ``torch`` backend's analytic BPTT is built from. The C++/CUDA kernels
(csrc/cell_math.h) and the Triton kernels (ops/triton_rnn/cell_math.py) mirror them function by
function; the tests hold all of them to the textbook reference in fused_rnn/reference.py.

Shapes: B = batch, H = hidden size, G = gates per cell (LSTM 4, GRU 3, RNN 1).
"pre" means pre-activation gate values (x and h contributions summed), gate order as torch.nn
(LSTM i, f, g, o; GRU r, z, n).
"""
import torch

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
MODE_TO_CELL = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def lstm_step_forward(pre, c_prev):
    """pre [B,4H], c_prev [B,H] -> h [B,H] (before projection), c [B,H], post-activation gates [B,4H]."""
    i, f, g, o = pre.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c_prev + i * g
    h = o * torch.tanh(c)
    return h, c, torch.cat((i, f, g, o), 1)


def lstm_step_backward(gates, c_prev, c, dh, dc):
    """Gradients through one LSTM step.

    gates [B,4H] post-activation, c_prev/c [B,H] cell state before/after the step,
    dh [B,H] grad of h (before projection), dc [B,H] grad of c arriving from later steps.
    Returns d_pre [B,4H] (grad of the pre-activations) and dc_prev [B,H].
    """
    o = gates[:, 3 * c.shape[1]:]
    tanh_c = torch.tanh(c)
    return lstm_gates_backward(gates, c_prev, tanh_c, dh, dc + dh * o * (1 - tanh_c * tanh_c))


def lstm_gates_backward(gates, c_prev, tanh_out, dh, dc):
    """The gate part of an LSTM step's backward, h = o * tanh_out: dc [B,H] is the full grad of the
    new cell state (from later steps and through h) -> d_pre [B,4H], dc_prev [B,H]."""
    i, f, g, o = gates.chunk(4, 1)
    d_pre = torch.cat((
        dc * g * i * (1 - i),
        dc * c_prev * f * (1 - f),
        dc * i * (1 - g * g),
        dh * tanh_out * o * (1 - o),
    ), 1)
    return d_pre, dc * f


def gru_step_forward(gx, gh, h_prev):
    """gx [B,3H] input part, gh [B,3H] = h_prev @ w_hh.T + b_hh, h_prev [B,H]
    -> h [B,H], post-activation gates r,z,n [B,3H].

    GRU cannot sum gx and gh before the nonlinearity: its candidate gate is
    n = tanh(gx_n + r * gh_n), so gh_n (which includes b_hn) must be kept (it is gh[:, 2H:]).
    """
    gx_r, gx_z, gx_n = gx.chunk(3, 1)
    gh_r, gh_z, gh_n = gh.chunk(3, 1)
    r = torch.sigmoid(gx_r + gh_r)
    z = torch.sigmoid(gx_z + gh_z)
    n = torch.tanh(gx_n + r * gh_n)
    h = n + z * (h_prev - n)  # (1 - z) * n + z * h_prev
    return h, torch.cat((r, z, n), 1)


def gru_step_backward(gates, gh_n, h_prev, dh):
    """Gradients through one GRU step.

    gates [B,3H] post-activation r,z,n; gh_n [B,H] the saved W_hn h + b_hn; h_prev [B,H]; dh [B,H].
    Returns d_gx [B,3H] (grad of the input part), d_gh [B,3H] (grad of h_prev @ w_hh.T + b_hh)
    and dh_direct [B,H], the part of dh_prev that flows through z * h_prev (not through w_hh).
    """
    r, z, n = gates.chunk(3, 1)
    d_pre_n = dh * (1 - z) * (1 - n * n)
    d_pre_z = dh * (h_prev - n) * z * (1 - z)
    d_pre_r = d_pre_n * gh_n * r * (1 - r)
    d_gx = torch.cat((d_pre_r, d_pre_z, d_pre_n), 1)
    d_gh = torch.cat((d_pre_r, d_pre_z, d_pre_n * r), 1)
    return d_gx, d_gh, dh * z


def rnn_step_forward(pre, relu):
    """pre [B,H] -> h [B,H] = tanh(pre) or relu(pre)."""
    return torch.relu(pre) if relu else torch.tanh(pre)


def rnn_step_backward(h, dh, relu):
    """h [B,H] the step's output, dh [B,H] -> d_pre [B,H]."""
    return dh * (h > 0).to(h.dtype) if relu else dh * (1 - h * h)


def zone_out(keep, previous, new):
    """Zoneout: keep [B,n] is a bool mask, True where a unit keeps its previous value exactly
    (training), or the probability p (eval) -> p*previous + (1-p)*new."""
    if keep.dtype == torch.bool:
        return torch.where(keep, previous, new)
    return new + keep.to(new.dtype) * (previous - new)


LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default


def layer_norm_forward(v):
    """Normalise each row of v [B,n] -> v_hat [B,n] (zero mean, unit variance), rstd [B,1]."""
    mean = v.mean(1, keepdim=True)
    centred = v - mean
    rstd = torch.rsqrt((centred * centred).mean(1, keepdim=True) + LAYER_NORM_EPS)
    return centred * rstd, rstd


def layer_norm_backward(d_out, gain, v_hat, rstd):
    """out = gain * v_hat (+ bias) -> grad of v [B,n]; the gain's grad is sum(d_out * v_hat)."""
    d_hat = d_out * gain
    return rstd * (d_hat - d_hat.mean(1, keepdim=True) - v_hat * (d_hat * v_hat).mean(1, keepdim=True))
