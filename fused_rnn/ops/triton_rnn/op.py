"""Registration: the Triton recurrence as torch.library custom ops with a fake kernel and autograd.

`custom_op` (not `triton_op`): with TRITON_INTERPRET=1 on CPU tensors a custom_op passes eager,
gradcheck, opcheck and torch.compile(fullgraph=True), while a triton_op's traced fake fails opcheck
and compile in the interpreter (see DESIGN.md). The cost: Inductor treats the op as opaque.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import backends
from ...double_backward import REFUSAL, no_gradient_arrived
from . import launcher
from .kernels import NUM_GATES, NUM_SAVED


@torch.library.custom_op("fused_rnn_triton::forward", mutates_args=())
def forward_op(cell: str, gx: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
               lengths: Optional[Tensor], reverse: bool, save: bool, gh0: Optional[Tensor],
               keep_h: Optional[Tensor], keep_c: Optional[Tensor], gain_hh: Optional[Tensor],
               gain_c: Optional[Tensor], bias_c: Optional[Tensor],
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> y, h_n, c_n ([0] unless LSTM), saved gates ([0] unless save), c_all ([0] unless LSTM and save),
    ln_hat, ln_rstd ([0] unless layer norm and save).
    gh0 [B, G*H], if given, replaces h @ w_hh.T at each sequence's first step (h0 is then unused).
    keep_h, keep_c: zoneout's keep masks or probability (fused_rnn.functional.zoneout_keep);
    gain_hh (and gain_c, bias_c for the LSTM): the layer-normalised recurrence (launcher._forward)."""
    return launcher.forward(cell, gx, h0, c0, w_hh, b_hh, lengths, reverse, save, gh0, keep_h, keep_c,
                            gain_hh, gain_c, bias_c)


@forward_op.register_fake
def _(cell, gx, h0, c0, w_hh, b_hh, lengths, reverse, save, gh0, keep_h, keep_c, gain_hh, gain_c, bias_c):
    T, B, GH = gx.shape
    G = NUM_GATES[cell]
    H = GH // G
    cdt = launcher.compute_dtype(gx.dtype)
    lstm = cell == "lstm"
    ln = save and gain_hh is not None
    y = gx.new_empty(T, B, H)
    h_n = gx.new_empty(B, H)
    c_n = gx.new_empty(B, H) if lstm else gx.new_empty(0)
    saved = gx.new_empty(T, B, NUM_SAVED[cell] * H, dtype=cdt) if save else gx.new_empty(0, dtype=cdt)
    c_all = gx.new_empty(T, B, H, dtype=cdt) if (save and lstm) else gx.new_empty(0, dtype=cdt)
    ln_hat = gx.new_empty(T, B, (G + lstm) * H, dtype=cdt) if ln else gx.new_empty(0, dtype=cdt)
    ln_rstd = gx.new_empty(T, B, 1 + lstm, dtype=cdt) if ln else gx.new_empty(0, dtype=cdt)
    return y, h_n, c_n, saved, c_all, ln_hat, ln_rstd


@torch.library.custom_op("fused_rnn_triton::backward", mutates_args=())
def backward_op(cell: str, reverse: bool, dy: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], h0: Tensor,
                c0: Optional[Tensor], w_hh: Tensor, lengths: Optional[Tensor], y: Tensor, saved: Tensor,
                c_all: Tensor, keep_h: Optional[Tensor], keep_c: Optional[Tensor], gain_hh: Optional[Tensor],
                gain_c: Optional[Tensor], bias_c: Optional[Tensor], ln_hat: Tensor,
                ln_rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> d gx, d gh ([0] unless GRU), dh0, dc0 ([0] unless LSTM), d mm, d c_out ([0] unless layer
    norm; see launcher._backward)."""
    return launcher.backward(cell, reverse, dy, dh_n, dc_n, h0, c0, w_hh, lengths, y, saved, c_all, keep_h,
                             keep_c, gain_hh, gain_c, bias_c, ln_hat, ln_rstd)


@backward_op.register_fake
def _(cell, reverse, dy, dh_n, dc_n, h0, c0, w_hh, lengths, y, saved, c_all, keep_h, keep_c, gain_hh, gain_c,
      bias_c, ln_hat, ln_rstd):
    T, B, H = y.shape
    GH = NUM_GATES[cell] * H
    ln = gain_hh is not None
    dgx = y.new_empty(T, B, GH)
    dgh = y.new_empty(T, B, GH) if cell == "gru" else y.new_empty(0)
    dc0 = h0.new_empty(B, H) if cell == "lstm" else h0.new_empty(0)
    dmm = y.new_empty(T, B, GH) if ln else y.new_empty(0)
    dcout = y.new_empty(T, B, H) if (ln and cell == "lstm") else y.new_empty(0)
    return dgx, dgh, h0.new_empty(B, H), dc0, dmm, dcout


def first_step_mask(T: int, lengths: Optional[Tensor], reverse: bool, device) -> Tensor:
    """[T, B or 1, 1] bool: the step at which each sequence's recurrence starts from its initial state."""
    t = torch.arange(T, device=device).unsqueeze(1)  # [T, 1]
    if not reverse:
        return (t == 0).unsqueeze(2)
    last = T - 1 if lengths is None else lengths.unsqueeze(0) - 1
    return (t == last).unsqueeze(2)


def previous_h(y: Tensor, h0: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """[T, B, H]: the h each step's recurrent product saw (h0 at each sequence's first step).
    Wrong only at steps past a sequence's length, whose gate grads are zero."""
    if not reverse:
        return torch.cat([h0.unsqueeze(0), y[:-1]])
    shifted = torch.cat([y[1:], h0.unsqueeze(0)])
    if lengths is None:
        return shifted
    t = torch.arange(y.shape[0], device=y.device).unsqueeze(1)  # [T, 1]
    first = (t == lengths.unsqueeze(0) - 1).unsqueeze(2)          # [T, B, 1]
    return torch.where(first, h0.unsqueeze(0), shifted)


def _setup_context(ctx, inputs, output):
    cell, _, h0, c0, w_hh, b_hh, lengths, reverse, save, gh0, keep_h, keep_c, gain_hh, gain_c, bias_c = inputs
    y, _, _, saved, c_all, ln_hat, ln_rstd = output
    ctx.cell, ctx.reverse, ctx.has_bias, ctx.save = cell, reverse, b_hh is not None, save
    ctx.has_gh0 = gh0 is not None
    ctx.save_for_backward(h0, c0, w_hh, lengths, y, saved, c_all, keep_h, keep_c, gain_hh, gain_c, bias_c,
                          ln_hat, ln_rstd)
    ctx.set_materialize_grads(False)  # None from double_backward.attach means: nothing to do


def _backward(ctx, dy, dh_n, dc_n, _d_saved, _d_c_all, _d_ln_hat, _d_ln_rstd):
    if no_gradient_arrived(dy, dh_n, dc_n):
        return (None,) * 15
    if torch.is_grad_enabled():
        # create_graph=True on the op itself: backward_op has no derivative of its own
        raise RuntimeError(REFUSAL)
    if not ctx.save:
        raise RuntimeError("fused_rnn triton: the forward ran without saving activations (save=False)")
    h0, c0, w_hh, lengths, y, saved, c_all, keep_h, keep_c, gain_hh, gain_c, bias_c, ln_hat, ln_rstd = \
        ctx.saved_tensors
    cell = ctx.cell
    T, B, H = y.shape
    # autograd hands None for outputs that did not reach the loss
    dy = torch.zeros_like(y) if dy is None else dy.contiguous()
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n.contiguous()
    if cell == "lstm":
        dc_n = torch.zeros_like(h0) if dc_n is None else dc_n.contiguous()
    else:
        dc_n = None
    dgx, dgh, dh0, dc0, dmm, dcout = backward_op(cell, ctx.reverse, dy, dh_n, dc_n, h0, c0, w_hh, lengths, y,
                                                 saved, c_all, keep_h, keep_c, gain_hh, gain_c, bias_c, ln_hat,
                                                 ln_rstd)
    dg_h = dgh if cell == "gru" else dgx  # [T, B, G*H]: grad of h @ w_hh.T + b_hh (LN(h @ w_hh.T) * gain_hh + b_hh)
    db_hh = dg_h.sum((0, 1)) if ctx.has_bias else None
    d_ln = (None, None, None)
    if gain_hh is not None:  # the layer norm's parameters; w_hh's grad comes from the grad before it
        GH = dg_h.shape[2]
        d_gain_hh = (dg_h * ln_hat[:, :, :GH]).sum((0, 1))
        d_ln = (d_gain_hh, None, None) if cell != "lstm" else (
            d_gain_hh, (dcout * ln_hat[:, :, GH:]).sum((0, 1)), dcout.sum((0, 1)))
        dg_h = dmm
    dgh0 = None
    if ctx.has_gh0:  # each sequence's first step saw gh0, not h0 @ w_hh.T
        first = first_step_mask(T, lengths, ctx.reverse, y.device)
        dgh0 = torch.where(first, dg_h, 0).sum(0)
        dg_h = torch.where(first, 0, dg_h)
        dh0 = torch.zeros_like(h0)
    # weight grads after the loop: one GEMM over all steps and sequences
    dw_hh = dg_h.reshape(T * B, dg_h.shape[2]).t() @ previous_h(y, h0, lengths, ctx.reverse).reshape(T * B, H)
    return (None, dgx, dh0, (dc0 if cell == "lstm" else None), dw_hh, db_hh, None, None, None, dgh0,
            None, None) + d_ln


forward_op.register_autograd(_backward, setup_context=_setup_context)


def _contiguous(t):
    return None if t is None else t.contiguous()


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None):
    """The contract's recurrence: -> y, h_n, c_n (LSTM) or None. zoneout: None or (keep_h, keep_c);
    layer_norm: None or (gain_hh, gain_c, bias_c), both as in fused_rnn/reference.py.

    A projected LSTM (w_hr [P, H]) runs as an LSTM on m_t = o_t * tanh(c_t) (so h_t = m_t @ w_hr.T):
    its recurrent product is h_{t-1} @ w_hh.T = m_{t-1} @ (w_hh @ w_hr).T, except at each sequence's
    first step, which sees h0 @ w_hh.T (gh0). The kernels run unchanged; the three small GEMMs
    around them (w_hh @ w_hr, h0 @ w_hh.T, m @ w_hr.T) are ordinary autograd ops.
    """
    keep_h, keep_c = (None, None) if zoneout is None else zoneout
    gain_hh, gain_c, bias_c = (None, None, None) if layer_norm is None else layer_norm
    if w_hr is not None and (zoneout is not None or layer_norm is not None):
        raise RuntimeError(f"fused_rnn triton backend: {backends.OPTIONS_WITH_PROJ_REASON}")
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (gx, h0, c0, w_hh, b_hh, w_hr, gain_hh, gain_c, bias_c))
    gh0 = None
    if w_hr is not None:
        gh0 = (h0 @ w_hh.t()).contiguous()                    # [B, 4H]
        w_hh = w_hh @ w_hr                                     # [4H, H]
        h0 = gx.new_zeros(gx.shape[1], w_hr.shape[1])          # m0: its product is replaced by gh0
    y, h_n, c_n, *_ = forward_op(
        cell, gx.contiguous(), h0.contiguous(), _contiguous(c0), w_hh.contiguous(), _contiguous(b_hh),
        _contiguous(lengths), bool(reverse), save, gh0, keep_h, keep_c, _contiguous(gain_hh),
        _contiguous(gain_c), _contiguous(bias_c))
    if w_hr is not None:  # y holds m (zero past each length), h_n the final m
        y, h_n = y @ w_hr.t(), h_n @ w_hr.t()
    return y, h_n, (c_n if cell == "lstm" else None)
