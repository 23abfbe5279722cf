"""The functional API: whole recurrent stacks on explicit weights, and the per-layer recurrence.

Every layer and direction is split in two (DESIGN.md): the input projection for all time steps as
one GEMM with ordinary autograd, then the sequential recurrence, which a backend implements.
Layers, directions and dropout between layers are handled here; modules.py adds PackedSequence,
batch_first and unbatched input on top.

Weights come as torch.nn's flat list, per layer and direction (forward first):
w_ih, w_hh, [b_ih, b_hh], [w_hr] — exactly `torch.nn.LSTM(...)._flat_weights`.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import backends, double_backward
from .cell_math import GATES, LAYER_NORM_EPS


def recurrence(cell, gx, h0, c0, w_hh, b_hh=None, w_hr=None, lengths=None, reverse=False, backend="auto"):
    """One layer, one direction: y [T,B,Hout], h_n [B,Hout], c_n [B,H] or None (see backends.py)."""
    if lengths is not None:
        _check_lengths(lengths, gx.shape[0], gx.shape[1])
    return _recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, backend)


def _recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, backend, source=None, zoneout=None,
                layer_norm=None):
    """recurrence() on inputs already validated (rnn() checks the lengths once for every layer).

    source: (x, w_ih, b_ih) when gx = F.linear(x, w_ih, b_ih) ((x, w_ih, b_ih, gain_ih) when gx is
    LN(x W_ih^T) * gain_ih + b_ih), so that double backward (fused_rnn/double_backward.py)
    recomputes gx from tensors that are alive anyway rather than keeping gx alive. gx None: the
    layer's projection F.linear(*source), which a backend with TAKES_PROJECTION computes inside its
    op (backends.py) and which is computed here for any other (or with zoneout or layer norm).
    zoneout: None or the keep masks (see zoneout_keep); only backends whose OPTIONS include
    "zoneout" are chosen then (backends.py). layer_norm: None or (gain_hh, gain_c,
    bias_c) of a layer-normalised LSTM/GRU (fused_rnn/layer_norm.py), likewise routed."""
    extra = {k: v for k, v in (("zoneout", zoneout), ("layer_norm", layer_norm)) if v is not None}
    like = source[0] if gx is None else gx                      # x and gx share device and dtype
    name = backends.resolve(backend, like.device, like.dtype, cell, w_hr is not None, tuple(extra))
    module = backends.get(name)
    if gx is None and not extra and getattr(module, "TAKES_PROJECTION", False):
        out = module.recurrence(cell, None, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, projection=source)
    else:
        gx = F.linear(*source) if gx is None else gx            # [T,B,G*H]: one GEMM for all steps
        out = module.recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, **extra)
    if name == "reference":  # plain autograd: differentiable any number of times already
        return out
    return double_backward.attach(cell, out, source or (gx, None, None), h0, c0, w_hh, b_hh, w_hr,
                                  lengths, reverse, zoneout, layer_norm)


def _fold_bias(cell, b_ih, b_hh):
    """(the bias inside gx, the bias the recurrence adds each step).

    LSTM and the plain RNN add b_ih and b_hh to the same pre-activation every step, so b_ih is
    folded into the recurrent bias: gx is a plain GEMM (torch's addmm was measured 16 % slower
    than mm on CPU) and autograd through the sum gives both biases their exact gradients. GRU
    keeps b_ih in gx: its n gate adds b_hn inside r * (W_hn h + b_hn), where b_in cannot go."""
    if b_ih is None or b_hh is None or cell == "gru":
        return b_ih, b_hh
    return None, b_ih + b_hh


def _input_projection(cell, x, w_ih, b_ih, b_hh):
    """gx = x W_ih^T (+ b_ih) for all steps, the bias the recurrence adds each step, and the
    `source` double backward recomputes gx from: (gx, b_step, source). b_ih as _fold_bias puts it."""
    b_gx, b_step = _fold_bias(cell, b_ih, b_hh)
    return F.linear(x, w_ih, b_gx), b_step, (x, w_ih, b_gx)


def check_zoneout(p):
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError("zoneout should be a number in range [0, 1) representing the probability of "
                         f"a unit keeping its previous value, got {p!r}")


def zoneout_keep(p, training, cell, T, B, Hout, H, device):
    """The zoneout masks of one layer and direction: (keep_h [T,B,Hout], keep_c [T,B,H] or None).

    Training: independent Bernoulli(p) masks per step, unit and state (bool, True = keep the previous
    value), drawn from torch's generator once per call, so a seed reproduces a run. Eval: p itself,
    the masks' expectation (a float expanded without memory). None when p == 0."""
    if p == 0:
        return None
    if training:
        draw = lambda n: torch.rand(T, B, n, device=device) < p  # noqa: E731
    else:
        draw = lambda n: torch.full((1, 1, 1), float(p), dtype=torch.float64, device=device).expand(T, B, n)  # noqa: E731
    keep_h = draw(Hout)
    return keep_h, (draw(H) if cell == "lstm" else None)


def _check_same_device(input, hx, weights):
    for h in hx:
        if h is not None and h.device != input.device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor "
                               f"at {input.device} and hidden tensor at {h.device}")
    for w in weights:
        if w.device != input.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor "
                               f"at {input.device} and parameter tensor at {w.device}")


def check_matmul_dtypes(a, w):
    """torch.nn's error for a @ w.T with operands of two dtypes."""
    if a.dtype != w.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {_dtype_name(a.dtype)} and "
                           f"{_dtype_name(w.dtype)}")


def _dtype_name(dtype):
    return {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype))


def promote_cell_state(input, cx):
    """An LSTM c0 of a dtype that promotes to the input's, cast to it: torch.nn computes f * c0 in
    the promoted dtype, which the exact cast reproduces (a float32 c0 beside a float64 layer)."""
    if cx is not None and cx.dtype != input.dtype and torch.promote_types(cx.dtype, input.dtype) == input.dtype:
        return cx.to(input.dtype)
    return cx


def _check_hidden_dtype(input, hx):
    for h in hx:
        if h is not None and h.dtype != input.dtype:
            raise RuntimeError(f"hidden tensor dtype ({h.dtype}) does not match input dtype ({input.dtype})")


def _check_lengths(lengths, T, B):
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must be a 1-D tensor of batch size {B}, got shape {list(lengths.shape)}")
    if B and int(lengths.min()) <= 0:
        raise RuntimeError("Length of all samples has to be greater than 0, but found an element "
                           "in 'lengths' that is <= 0")
    if B and int(lengths.max()) > T:
        raise ValueError(f"lengths must not exceed the sequence length {T}, got {int(lengths.max())}")


# Which recurrent ops torch's autocast runs in its lower precision. On CPU (checked against torch.nn):
# LSTM and RNN layers and RNNCell do; GRU, LSTMCell and GRUCell run in the lower precision only when
# the input already is in it, else in float32. On CUDA every recurrent layer runs through cuDNN,
# which autocast lowers. Autocast never lowers float64.
_AUTOCAST_CPU = {"layer": ("lstm", "rnn_tanh", "rnn_relu"), "cell": ("rnn_tanh", "rnn_relu")}


def autocast_dtype(device_type, kind, cell, input_dtype):
    """The dtype autocast runs `cell` in (kind 'layer' or 'cell') on an input of `input_dtype`, or
    None when autocast is off.

    The caller casts its floating inputs to it and runs with autocast disabled, so the whole
    recurrence is in one dtype as torch.nn's is."""
    if not torch.is_autocast_enabled(device_type):
        return None
    if input_dtype == torch.float64:
        return torch.float64
    lower = torch.get_autocast_dtype(device_type)
    if device_type == "cpu" and cell not in _AUTOCAST_CPU[kind]:
        return lower if input_dtype == lower else torch.float32
    return lower


def _cast(t, dtype):
    return t if t is None or not t.is_floating_point() else t.to(dtype)


def _dropout(x, p, lengths):
    """Dropout between layers. With lengths, the mask is drawn over the packed rows only, as
    torch.nn draws it for a PackedSequence, so a seeded run matches torch.nn's."""
    if lengths is None:
        return F.dropout(x, p, True)
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    dropped = packed._replace(data=F.dropout(packed.data, p, True))
    return pad_packed_sequence(dropped, total_length=x.shape[0])[0]


def rnn(cell, input, hx, cx, weights, has_biases=True, num_layers=1, dropout=0.0, training=False,
        bidirectional=False, batch_first=False, lengths=None, backend="auto", zoneout=0.0, layer_norm=None):
    """A stack of recurrent layers, like `torch._VF.lstm/gru/rnn_tanh/rnn_relu`.

    input [T,B,I] ([B,T,I] if batch_first); hx [L*D,B,Hout]; cx [L*D,B,H] (LSTM) or None;
    lengths: optional int64 [B] (see backends.py). Returns output [T,B,D*Hout], h_n, c_n (or None).
    zoneout: probability that a unit of h (and c) keeps its previous value (zoneout_keep).
    layer_norm: None, or per layer and direction (gain_ih [G*H], gain_hh [G*H], gain_c [H] | None,
    bias_c [H] | None): the layer-normalised LSTM/GRU of fused_rnn/layer_norm.py, where
    gx = LN(x W_ih^T) * gain_ih + b_ih for all steps at once and the rest is the recurrence's.
    """
    check_zoneout(zoneout)
    if input.dim() != 3:
        raise RuntimeError(f"input must have 3 dimensions, got {input.dim()}")
    x = input.transpose(0, 1) if batch_first else input          # [T,B,I]
    T, B = x.shape[0], x.shape[1]
    if T == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    _check_same_device(input, (hx, cx), weights)
    if hx.dtype != input.dtype:  # torch.nn's h0 @ w_hh.T meets it first (autocast casts both alike)
        check_matmul_dtypes(hx, weights[1])
    cx = promote_cell_state(input, cx)
    _check_hidden_dtype(input, (hx, cx))
    if lengths is not None:
        _check_lengths(lengths, T, B)
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    dtype = autocast_dtype(x.device.type, "layer", cell, x.dtype)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return rnn(cell, _cast(input, dtype), _cast(hx, dtype), _cast(cx, dtype),
                       [_cast(w, dtype) for w in weights], has_biases, num_layers, dropout, training,
                       bidirectional, batch_first, lengths, backend, zoneout,
                       None if layer_norm is None else [[_cast(t, dtype) for t in ln] for ln in layer_norm])

    num_directions = 2 if bidirectional else 1
    per_direction = len(weights) // (num_layers * num_directions)
    has_proj = per_direction == 2 + 2 * has_biases + 1
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            w = weights[k * per_direction:(k + 1) * per_direction]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if has_proj else None
            ln = None if layer_norm is None else layer_norm[k]
            if ln is None:                    # gx = F.linear(*source), in _recurrence or in the backend's op
                b_gx, b_step = _fold_bias(cell, b_ih, b_hh)
                gx, source = None, (x, w_ih, b_gx)
            else:                                                   # LN(x W_ih^T) * gain_ih + b_ih
                gx = F.layer_norm(F.linear(x, w_ih), (w_ih.shape[0],), ln[0], b_ih, LAYER_NORM_EPS)
                b_step, source = b_hh, (x, w_ih, b_ih, ln[0])
            keep = zoneout_keep(zoneout, training, cell, T, B, hx.shape[2], w_hh.shape[0] // GATES[cell], x.device)
            y, h, c = _recurrence(cell, gx, hx[k], None if cx is None else cx[k], w_hh, b_step, w_hr,
                                  lengths, direction == 1, backend, source=source, zoneout=keep,
                                  layer_norm=None if ln is None else tuple(ln[1:]))
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if num_directions == 1 else torch.cat(outputs, 2)
        if dropout > 0 and training and layer < num_layers - 1:
            x = _dropout(x, dropout, lengths)
    output = x.transpose(0, 1) if batch_first else x
    return output, torch.stack(h_n), (torch.stack(c_n) if cell == "lstm" else None)


def lstm(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, training=False,
         bidirectional=False, batch_first=False, lengths=None, backend="auto", zoneout=0.0):
    """torch._VF.lstm's signature (+ lengths, backend, zoneout): returns output, (h_n, c_n)."""
    out, h, c = rnn("lstm", input, hx[0], hx[1], weights, has_biases, num_layers, dropout, training,
                    bidirectional, batch_first, lengths, backend, zoneout)
    return out, (h, c)


def gru(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, training=False,
        bidirectional=False, batch_first=False, lengths=None, backend="auto", zoneout=0.0):
    """torch._VF.gru's signature (+ lengths, backend, zoneout): returns output, h_n."""
    out, h, _ = rnn("gru", input, hx, None, weights, has_biases, num_layers, dropout, training,
                    bidirectional, batch_first, lengths, backend, zoneout)
    return out, h


def rnn_tanh(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, training=False,
             bidirectional=False, batch_first=False, lengths=None, backend="auto"):
    out, h, _ = rnn("rnn_tanh", input, hx, None, weights, has_biases, num_layers, dropout, training,
                    bidirectional, batch_first, lengths, backend)
    return out, h


def rnn_relu(input, hx, weights, has_biases=True, num_layers=1, dropout=0.0, training=False,
             bidirectional=False, batch_first=False, lengths=None, backend="auto"):
    out, h, _ = rnn("rnn_relu", input, hx, None, weights, has_biases, num_layers, dropout, training,
                    bidirectional, batch_first, lengths, backend)
    return out, h


def cell_step(cell, input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, backend="auto"):
    """One step of a cell (LSTMCell, GRUCell, RNNCell): input [B,I], hx [B,H] -> h' (and c')."""
    dtype = autocast_dtype(input.device.type, "cell", cell, input.dtype)
    if dtype is not None:
        with torch.autocast(input.device.type, enabled=False):
            return cell_step(cell, *(_cast(t, dtype) for t in (input, hx, cx, w_ih, w_hh, b_ih, b_hh)),
                             backend=backend)
    if _cell_op_runs(backend, input, cell):
        h, c = torch.ops.fused_rnn.cell_step.default(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        return h, (c if cell == "lstm" else None)
    gx, b_step, _ = _input_projection(cell, input.unsqueeze(0), w_ih, b_ih, b_hh)  # gx [1,B,G*H]
    _, h, c = _recurrence(cell, gx, hx, cx, w_hh, b_step, None, None, False, backend)
    return h, c


def _cell_op_runs(backend, input, cell):
    """Whether the step runs as the one fused op fused_rnn::cell_step (csrc/cell_step.cpp): the
    `cpu` backend on CPU tensors, with a build that has it. Elsewhere the step is a recurrence of
    length 1 on the chosen backend."""
    if input.device.type != "cpu":
        return False
    from .ops.cpp import cell_ops  # noqa: PLC0415 - ops.cpp imports this module
    return cell_ops.runs_on_cpu(backend, input.dtype, cell)


__all__ = ["recurrence", "rnn", "lstm", "gru", "rnn_tanh", "rnn_relu", "cell_step", "GATES"]
