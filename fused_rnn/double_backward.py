"""Double backward (create_graph=True) for every backend, at no cost to ordinary training.

The backends' analytic backwards are single-purpose kernels: their gradients are not themselves
differentiable. Instead of a second analytic derivation per backend, every recurrence the functional
layer runs passes its outputs through `attach`, a node that is the identity in the forward pass
and, in the backward pass:

- without create_graph (ordinary training): hands the gradients on unchanged to the backend's own
  analytic backward. It saves only references to tensors that are alive anyway (the layer's input,
  the weights, h0/c0), so training memory and time are what they were;
- with create_graph=True (gradient penalties, Hessian-vector products, meta-learning): recomputes
  the layer in plain differentiable PyTorch ops (the reference's recurrence, written with
  cell_math's pointwise steps and torch's layer_norm for the layer-normalised layers, input side
  included, so that its graph is small) from those saved inputs and
  differentiates it with `torch.autograd.grad(create_graph=True)`, so the returned gradients are
  ordinary autograd graphs that can be differentiated again, on any device. It hands None to the
  backend's node, whose backward then returns at once (each backend's autograd short-circuits when
  no gradient reaches it), so nothing is counted twice.

The cpu and cuda backends' eager calls of their layer op (recurrence_forward_projected, whose inputs
are the layer's own) do the same inside the op's node (fused_rnn/ops/cpp/ops.py
_second_order_backward, with `second_order_grads` below), and attach leaves their outputs as they
are: one node less per layer call, ~40 µs of a T=1 training step on the CPU.

The cost falls only on create_graph=True backwards: one more forward of the layer in PyTorch ops
(a Python loop, one GEMM per step) and the autograd graphs of that forward and of its backward,
about what torch.nn's own CPU LSTM keeps for double backward. Measured on the CPU (2 threads,
LSTM T=100 B=32 I=H=256): a gradient-penalty step (create_graph backward, then a backward of the
gradient's norm) takes ~0.76 s against torch.nn's ~0.34 s; a plain training step ~0.05 s for both.
Under torch.compile the node is left out (AOTAutograd does not
support double backward of a compiled region anyway), so a compiled graph is unchanged.

A backend's op called directly (not through fused_rnn.functional or the modules) still refuses
create_graph=True with a clear error rather than returning silently wrong second-order gradients.
"""
import torch
import torch.nn.functional as F

from . import cell_math

REFUSAL = ("fused_rnn: this backend's analytic backward is not differentiable (create_graph=True); "
           "call it through fused_rnn.functional or the modules, which recompute the layer through "
           "the differentiable reference for higher-order gradients")


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SecondOrderThroughReference(torch.autograd.Function):
    """Identity on (y, h_n, c_n); see the module docstring for its backward."""

    @staticmethod
    def forward(ctx, cell, reverse, lengths, zoneout, y, h_n, c_n, x, w_ih, b_ih, gain_ih, h0, c0, w_hh, b_hh, w_hr,
                gain_hh, gain_c, bias_c):
        ctx.cell, ctx.reverse, ctx.has_c = cell, reverse, c_n is not None
        ctx.zoneout = zoneout  # non-differentiable masks (or None)
        ctx.save_for_backward(lengths, x, w_ih, b_ih, gain_ih, h0, c0, w_hh, b_hh, w_hr, gain_hh, gain_c, bias_c)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        n_inputs = 12  # x, w_ih, b_ih, gain_ih, h0, c0, w_hh, b_hh, w_hr, gain_hh, gain_c, bias_c
        if not torch.is_grad_enabled():  # first order: the backend's analytic backward does it
            return (None, None, None, None, dy, dh_n, dc_n if ctx.has_c else None) + (None,) * n_inputs
        lengths, *inputs = ctx.saved_tensors
        d_inputs = second_order_grads(ctx.cell, ctx.reverse, lengths, ctx.zoneout, inputs, ctx.needs_input_grad[7:],
                                      (dy, dh_n, dc_n))
        return (None,) * 7 + tuple(d_inputs)


def second_order_grads(cell, reverse, lengths, zoneout, inputs, needs, grads):
    """The gradients of the layer's inputs (x, w_ih, b_ih, gain_ih, h0, c0, w_hh, b_hh, w_hr, gain_hh,
    gain_c, bias_c; None where absent) that `needs` asks for, as differentiable graphs: the layer
    recomputed through the reference and differentiated with create_graph=True. grads: (dy, dh_n,
    dc_n), None where no gradient arrived."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    outputs, out_grads = _reference_layer(cell, reverse, lengths, zoneout, inputs, grads)
    found = iter(torch.autograd.grad(outputs, wanted, out_grads, create_graph=True, allow_unused=True))
    d_inputs = [next(found) if need else None for need in needs]
    # a gradient an input does not reach (e.g. b_ih of an unused layer input) is zero, not None
    return [torch.zeros_like(t) if need and d is None else d for t, need, d in zip(inputs, needs, d_inputs)]


def _reference_layer(cell, reverse, lengths, zoneout, inputs, grads):
    """The layer recomputed through the reference, with autograd recording, and the matching
    output gradients: ([y, h_n, c_n present], [dy, dh_n, dc_n cast to match])."""
    x, w_ih, b_ih, gain_ih, h0, c0, w_hh, b_hh, w_hr, gain_hh, gain_c, bias_c = inputs
    acc = _compute_dtype(x.dtype)
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731 - differentiable casts
    with torch.autocast(x.device.type, enabled=False):
        if w_ih is None:
            gx = cast(x)
        elif gain_ih is None:
            gx = F.linear(cast(x), cast(w_ih), cast(b_ih))
        else:  # the layer-normalised layers' input side: LN(x W_ih^T) * gain_ih + b_ih
            gx = F.layer_norm(F.linear(cast(x), cast(w_ih)), (w_ih.shape[0],), cast(gain_ih), cast(b_ih),
                              cell_math.LAYER_NORM_EPS)
        layer_norm = None if gain_hh is None else (cast(gain_hh), cast(gain_c), cast(bias_c))
        out = _differentiable_recurrence(cell, gx, cast(h0), cast(c0), cast(w_hh), cast(b_hh), cast(w_hr),
                                         lengths, reverse, zoneout, layer_norm)
    pairs = [(o, g.to(acc)) for o, g in zip(out, grads) if o is not None and g is not None]
    return [o for o, _ in pairs], [g for _, g in pairs]


def _differentiable_recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout, layer_norm=None):
    """reference.recurrence's result in fewer autograd nodes (one GEMM per step for all gates, the
    pointwise steps of cell_math, torch's layer_norm), so the graph a create_graph=True backward
    builds is smaller. layer_norm: None or (gain_hh, gain_c, bias_c) as the reference's."""
    h, c = h0, c0
    ys = [None] * gx.shape[0]
    eps = cell_math.LAYER_NORM_EPS
    for t in (range(gx.shape[0] - 1, -1, -1) if reverse else range(gx.shape[0])):
        if layer_norm is None:
            gh = F.linear(h, w_hh, b_hh)
        else:  # LN(h W_hh^T) * gain_hh + b_hh over all G*H
            gh = F.layer_norm(F.linear(h, w_hh), (w_hh.shape[0],), layer_norm[0], b_hh, eps)
        c_new = None
        if cell == "lstm":
            h_new, c_new, gates = cell_math.lstm_step_forward(gx[t] + gh, c)
            if layer_norm is not None:  # h = o tanh(LN(c') gain_c + bias_c)
                H = c_new.shape[1]
                h_new = gates[:, 3 * H:] * torch.tanh(F.layer_norm(c_new, (H,), layer_norm[1], layer_norm[2], eps))
            h_new = h_new if w_hr is None else h_new @ w_hr.t()
        elif cell == "gru":
            h_new, _ = cell_math.gru_step_forward(gx[t], gh, h)
        else:
            h_new = cell_math.rnn_step_forward(gx[t] + gh, cell == "rnn_relu")
        if zoneout is not None:
            h_new = cell_math.zone_out(zoneout[0][t], h, h_new)
            c_new = None if c is None else cell_math.zone_out(zoneout[1][t], c, c_new)
        if lengths is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:
            alive = (t < lengths).unsqueeze(1)
            h = torch.where(alive, h_new, h)
            c = None if c is None else torch.where(alive, c_new, c)
            ys[t] = torch.where(alive, h_new, 0)
    return torch.stack(ys), h, c


def attach(cell, outputs, source, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None):
    """Make a backend's (y, h_n, c_n) twice differentiable (see the module docstring).

    source: (x, w_ih, b_ih) with gx = x @ w_ih.T + b_ih, (x, w_ih, b_ih, gain_ih) with
    gx = LN(x @ w_ih.T) * gain_ih + b_ih (the layer-normalised layers), or (gx, None, None).
    Passing the layer's input rather than gx keeps nothing alive that the first-order backward
    would not keep. layer_norm: None or (gain_hh, gain_c, bias_c) as the reference's.
    """
    x, w_ih, b_ih, gain_ih = (tuple(source) + (None,))[:4]
    gain_hh, gain_c, bias_c = (None, None, None) if layer_norm is None else layer_norm
    tensors = (x, w_ih, b_ih, gain_ih, h0, c0, w_hh, b_hh, w_hr, gain_hh, gain_c, bias_c)
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not any(t is not None and t.requires_grad for t in tensors)
            or getattr(outputs[0].grad_fn, "second_order_built_in", False)):  # the backend's node does it
        return outputs                                  # (fused_rnn/ops/cpp/ops.py _second_order_backward)
    y, h_n, c_n = outputs
    return _SecondOrderThroughReference.apply(cell, reverse, lengths, zoneout, y, h_n, c_n, *tensors)


def no_gradient_arrived(*grads):
    """True when none of a backend node's output gradients is defined: attach() took the
    create_graph=True backward, and the backend's own backward has nothing to do."""
    return all(g is None for g in grads)
