"""The oracle: recurrent cells and layers written the way a textbook derives them.

Every gate is computed explicitly from its own rows of the weights, the time loop keeps each
step's state in a Python list, and autograd does the backward. Nothing here is meant to be fast;
it is meant to be obviously right, and every other backend is tested against it.

This module is also the ``reference`` backend: ``recurrence`` implements the recurrence
contract (see fused_rnn/backends.py), so the whole layer stack can run on it.
"""
import torch


def _rows(w, k, n):
    """The k-th block of n rows of a stacked gate weight (or bias)."""
    return None if w is None else w[k * n:(k + 1) * n]


def _matmul(x, w):
    return x @ w.t()


def _affine(x, w, b, mm=_matmul):
    y = mm(x, w)
    return y if b is None else y + b


def rounding(dtype, mode="nearest"):
    """v -> v's values rounded to `dtype`, kept in v's dtype: to nearest (torch's and a GPU's
    conversion), or "toward_zero", bfloat16 only: the Triton interpreter's float32 -> bfloat16 cast,
    which drops the low 16 bits (a kernel run there rounds so)."""
    if mode == "nearest":
        return lambda v: v.to(dtype).to(v.dtype)
    if mode != "toward_zero" or dtype != torch.bfloat16:
        raise ValueError(f"rounding: {mode!r} to {dtype} is not modelled")
    return lambda v: (v.float().view(torch.int32) & -65536).view(torch.float32).to(v.dtype)


def _straight_through(round_, v):
    """round_(v)'s values, with the gradient of v itself (the rounding's is zero almost everywhere)."""
    return v + (round_(v) - v).detach()


class _RoundGradient(torch.autograd.Function):
    """The identity whose backward rounds the incoming gradient with `round_`."""

    @staticmethod
    def forward(ctx, x, round_):
        ctx.round_ = round_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.round_(grad), None


def rounded_operands_matmul(round_):
    """h @ w.T as a kernel computes it with 16-bit operands and a wider accumulator (round_: see
    rounding): h rounded (the gradient passes straight through) and, in the backward, the product's
    gradient rounded before it meets w (dh = dP @ w) and h (dw = dP.T @ h). w holds a 16-bit
    tensor's values already."""
    def mm(h, w):
        return _RoundGradient.apply(_straight_through(round_, h) @ w.t(), round_)
    return mm


def lstm_cell(x_gates, h, c, w_hh, b_hh=None, w_hr=None, mm=_matmul):
    """One LSTM step. x_gates [B,4H]: the input's contribution x @ w_ih.T + b_ih.

    i = σ(x_i + W_hi h + b_hi)      input gate
    f = σ(x_f + W_hf h + b_hf)      forget gate
    g = tanh(x_g + W_hg h + b_hg)   candidate cell
    o = σ(x_o + W_ho h + b_ho)      output gate
    c' = f c + i g,   h' = o tanh(c'),   h' = W_hr h' with a projection.
    mm(h, w) = h @ w.T, the recurrent product (every cell takes it; see rounded_operands_matmul).
    """
    H = c.shape[1]
    x_i, x_f, x_g, x_o = (x_gates[:, k * H:(k + 1) * H] for k in range(4))
    i = torch.sigmoid(x_i + _affine(h, _rows(w_hh, 0, H), _rows(b_hh, 0, H), mm))
    f = torch.sigmoid(x_f + _affine(h, _rows(w_hh, 1, H), _rows(b_hh, 1, H), mm))
    g = torch.tanh(x_g + _affine(h, _rows(w_hh, 2, H), _rows(b_hh, 2, H), mm))
    o = torch.sigmoid(x_o + _affine(h, _rows(w_hh, 3, H), _rows(b_hh, 3, H), mm))
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def gru_cell(x_gates, h, w_hh, b_hh=None, mm=_matmul):
    """One GRU step. x_gates [B,3H]: x @ w_ih.T + b_ih.

    r = σ(x_r + W_hr h + b_hr)               reset gate
    z = σ(x_z + W_hz h + b_hz)               update gate
    n = tanh(x_n + r (W_hn h + b_hn))        candidate
    h' = (1 - z) n + z h
    """
    H = h.shape[1]
    x_r, x_z, x_n = (x_gates[:, k * H:(k + 1) * H] for k in range(3))
    r = torch.sigmoid(x_r + _affine(h, _rows(w_hh, 0, H), _rows(b_hh, 0, H), mm))
    z = torch.sigmoid(x_z + _affine(h, _rows(w_hh, 1, H), _rows(b_hh, 1, H), mm))
    n = torch.tanh(x_n + r * _affine(h, _rows(w_hh, 2, H), _rows(b_hh, 2, H), mm))
    return (1 - z) * n + z * h


def rnn_cell(x_gates, h, w_hh, b_hh=None, nonlinearity="tanh", relu_branch=None, mm=_matmul):
    """One Elman RNN step: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh) (or relu).
    relu_branch: None, or [B,H] bool, the branch each ReLU takes (pre > 0 where None)."""
    pre = x_gates + _affine(h, w_hh, b_hh, mm)
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    return torch.relu(pre) if relu_branch is None else pre * relu_branch.to(pre.dtype)


def layer_norm(v, gain, bias=None, eps=1e-5):
    """Ba et al. 2016 over the last dimension: (v - mean) / sqrt(var + eps) * gain + bias."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = (v - mean) / torch.sqrt(var + eps) * gain
    return out if bias is None else out + bias


def layer_norm_lstm_cell(x_gates, h, c, w_hh, b_hh, gain_hh, gain_c, bias_c, mm=_matmul):
    """One layer-normalised LSTM step (Ba et al. 2016, as Haste's LayerNormLSTM).
    x_gates [B,4H] = LN(x W_ih^T) * gain_ih + b_ih, normalised over all 4H, outside the loop.

    gates = x_gates + LN(h W_hh^T) * gain_hh + b_hh     (LN over all 4H of the recurrent part)
    c' = σ(f) c + σ(i) tanh(g),   h' = σ(o) tanh(LN(c') * gain_c + bias_c)
    """
    H = c.shape[1]
    gates = x_gates + layer_norm(mm(h, w_hh), gain_hh, b_hh)
    i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(layer_norm(c_new, gain_c, bias_c)), c_new


def layer_norm_gru_cell(x_gates, h, w_hh, b_hh, gain_hh, mm=_matmul):
    """One layer-normalised GRU step. x_gates [B,3H] = LN(x W_ih^T) * gain_ih + b_ih.

    gh = LN(h W_hh^T) * gain_hh + b_hh     (LN over all 3H)
    r = σ(x_r + gh_r),  z = σ(x_z + gh_z),  n = tanh(x_n + r gh_n),  h' = (1 - z) n + z h
    torch.nn.GRU's r ⊙ (W_hn h + b_hn) form is kept, with the normalised recurrent part inside it.
    """
    H = h.shape[1]
    gh = layer_norm(mm(h, w_hh), gain_hh, b_hh)
    r = torch.sigmoid(x_gates[:, :H] + gh[:, :H])
    z = torch.sigmoid(x_gates[:, H:2 * H] + gh[:, H:2 * H])
    n = torch.tanh(x_gates[:, 2 * H:] + r * gh[:, 2 * H:])
    return (1 - z) * n + z * h


def zone_out(keep, previous, new):
    """Zoneout (Krueger et al. 2016): keep [B,n] is 1 where a unit keeps its previous value
    (training: a Bernoulli(p) mask) or p itself (eval: the mask's expectation)."""
    return keep * previous + (1 - keep) * new


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None,
               state_dtype=None, relu_branch=None, operand_dtype=None, operand_rounding="nearest"):
    """The recurrence contract, step by step: y [T,B,Hout], h_n [B,Hout], c_n [B,H] or None.

    A sequence whose length is over stops changing state and outputs zeros; running in reverse it
    therefore starts from h0 at its own last element. zoneout: None, or (keep_h [T,B,Hout],
    keep_c [T,B,H] or None), see zone_out; the output at step t is the zoned-out h_t.
    layer_norm: None, or (gain_hh [G*H], gain_c [H], bias_c [H]) (LSTM) / (gain_hh, None, None) (GRU)
    for the layer-normalised cells above; gx then holds the normalised input part.
    state_dtype: None, or the dtype h is rounded to after every step, as a kernel that carries h in
    16 bits (its next step's matrix product reads it) does; the gradient passes straight through.
    Tests of 16-bit kernels use it so that the reference does not drift from them where the
    recurrence amplifies the states' rounding. relu_branch: None, or [T,B,H] bool, the branch each
    ReLU takes (a kernel's choice, read from its outputs y > 0): a pre-activation within the
    kernel's float32 rounding of 0 then takes the same branch here, so the gradients compare
    element by element (the values differ by at most that rounding).
    operand_dtype: None, or the dtype a kernel rounds its recurrent product's operands to while it
    keeps h in a wider type (rounded_operands_matmul: h forward, the product's gradient backward;
    operand_rounding as rounding's mode); not with a projection, whose kernel-side product reads
    another operand (h before w_hr).
    """
    if operand_dtype is not None and w_hr is not None:
        raise ValueError("operand_dtype models a product that reads h itself, not one with a projection")
    mm = _matmul if operand_dtype is None else rounded_operands_matmul(rounding(operand_dtype, operand_rounding))
    T = gx.shape[0]
    h, c = h0, c0
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if layer_norm is not None:
            if cell == "lstm":
                h_new, c_new = layer_norm_lstm_cell(gx[t], h, c, w_hh, b_hh, *layer_norm, mm=mm)
            else:
                h_new, c_new = layer_norm_gru_cell(gx[t], h, w_hh, b_hh, layer_norm[0], mm=mm), None
        elif cell == "lstm":
            h_new, c_new = lstm_cell(gx[t], h, c, w_hh, b_hh, w_hr, mm=mm)
        elif cell == "gru":
            h_new, c_new = gru_cell(gx[t], h, w_hh, b_hh, mm=mm), None
        else:
            h_new = rnn_cell(gx[t], h, w_hh, b_hh, "relu" if cell == "rnn_relu" else "tanh",
                             None if relu_branch is None else relu_branch[t], mm=mm)
            c_new = None
        if state_dtype is not None:
            h_new = _straight_through(rounding(state_dtype), h_new)
        if zoneout is not None:
            keep_h, keep_c = zoneout
            h_new = zone_out(keep_h[t].to(h.dtype), h, h_new)
            if c is not None:
                c_new = zone_out(keep_c[t].to(c.dtype), c, c_new)
        if lengths is None:
            h, c = h_new, c_new
            ys[t] = h_new
        else:
            alive = (t < lengths).unsqueeze(1)  # [B,1]
            h = torch.where(alive, h_new, h)
            c = None if c is None else torch.where(alive, c_new, c)
            ys[t] = torch.where(alive, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


# options beyond torch.nn's that this backend implements (fused_rnn/backends.py routes by them)
OPTIONS = ("zoneout", "layer_norm")


def unavailable_reason(device, dtype, cell, has_proj):
    return None
