"""Forward and analytic backward of one recurrent layer, one direction, in PyTorch ops.

Forward saves what the backward needs: post-activation gates, the cell state before and after
each step (LSTM), W_hn h + b_hn (GRU), and h before each step. Backward walks the steps in reverse,
turning dh (and dc) into the pre-activation gate gradients dG, one GEMM per step for dh_prev;
the weight gradients are one GEMM and one sum after the loop. See README.md for the derivation.
"""
import torch

from ... import cell_math
from ...double_backward import REFUSAL, no_gradient_arrived


def _compute_dtype(dtype):
    # fp16/bf16 compute, accumulate and keep the state in fp32; fp32/fp64 in their own dtype.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


class TorchRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout, gain_hh, gain_c, bias_c):
        T, B, _ = gx.shape
        keep_h, keep_c = (None, None) if zoneout is None else zoneout
        acc = _compute_dtype(gx.dtype)
        w_hh_a, b_hh_a, w_hr_a = _cast(w_hh, acc), _cast(b_hh, acc), _cast(w_hr, acc)
        gain_hh_a, gain_c_a, bias_c_a = _cast(gain_hh, acc), _cast(gain_c, acc), _cast(bias_c, acc)
        ln = gain_hh is not None  # layer norm of the recurrent part (and of c' for the LSTM)
        H = w_hh.shape[0] // cell_math.GATES[cell]
        h = h0.to(acc)
        c = _cast(c0, acc)

        y = gx.new_empty(T, B, h0.shape[1])                          # [T,B,Hout]
        gates = torch.empty(T, B, gx.shape[2], dtype=acc, device=gx.device)
        h_prev_all = torch.empty(T, B, h0.shape[1], dtype=acc, device=gx.device)
        c_prev_all = torch.empty(T, B, H, dtype=acc, device=gx.device) if cell == "lstm" else None
        c_new_all = torch.empty(T, B, H, dtype=acc, device=gx.device) if cell == "lstm" else None
        gh_n_all = torch.empty(T, B, H, dtype=acc, device=gx.device) if cell == "gru" else None
        # layer norm saves the normalised recurrent part and c', and their 1/std
        gh_hat_all = torch.empty(T, B, gx.shape[2], dtype=acc, device=gx.device) if ln else None
        gh_rstd_all = torch.empty(T, B, 1, dtype=acc, device=gx.device) if ln else None
        c_hat_all = torch.empty(T, B, H, dtype=acc, device=gx.device) if ln and cell == "lstm" else None
        c_rstd_all = torch.empty(T, B, 1, dtype=acc, device=gx.device) if ln and cell == "lstm" else None
        alive_all = None if lengths is None else (
            torch.arange(T, device=gx.device).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)  # [T,B,1]

        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            h_prev_all[t] = h
            gh = h @ w_hh_a.t()
            if ln:
                gh_hat_all[t], gh_rstd_all[t] = cell_math.layer_norm_forward(gh)
                gh = gh_hat_all[t] * gain_hh_a
            if b_hh_a is not None:
                gh = gh + b_hh_a
            x_t = gx[t].to(acc)
            c_new = None
            if cell == "lstm":
                c_prev_all[t] = c
                h_new, c_new, gates[t] = cell_math.lstm_step_forward(x_t + gh, c)
                c_new_all[t] = c_new
                if ln:  # h = o tanh(LN(c') gain_c + bias_c)
                    c_hat_all[t], c_rstd_all[t] = cell_math.layer_norm_forward(c_new)
                    h_new = gates[t, :, 3 * H:] * torch.tanh(c_hat_all[t] * gain_c_a + bias_c_a)
                if w_hr_a is not None:
                    h_new = h_new @ w_hr_a.t()
            elif cell == "gru":
                gh_n_all[t] = gh[:, 2 * H:]
                h_new, gates[t] = cell_math.gru_step_forward(x_t, gh, h)
            else:
                h_new = cell_math.rnn_step_forward(x_t + gh, cell == "rnn_relu")
                gates[t] = h_new
            if keep_h is not None:  # zoneout: h_t = k h_{t-1} + (1-k) h~_t (and c); gates keep h~, c_new_all c~
                h_new = cell_math.zone_out(keep_h[t], h, h_new)
                if c is not None:
                    c_new = cell_math.zone_out(keep_c[t], c, c_new)
            if alive_all is None:
                h, c = h_new, c_new
                y[t] = h_new
            else:
                alive = alive_all[t]
                h = torch.where(alive, h_new, h)
                c = None if c is None else torch.where(alive, c_new, c)
                y[t] = torch.where(alive, h_new, 0)

        ctx.cell, ctx.reverse, ctx.H = cell, reverse, H
        ctx.dtype = gx.dtype
        ctx.set_materialize_grads(False)  # None from double_backward.attach means: nothing to do
        ctx.has_bias, ctx.has_proj = b_hh is not None, w_hr is not None
        ctx.save_for_backward(w_hh, w_hr, gates, h_prev_all, c_prev_all, c_new_all, gh_n_all, alive_all,
                              keep_h, keep_c, gain_hh, gain_c, bias_c, gh_hat_all, gh_rstd_all, c_hat_all,
                              c_rstd_all)
        ctx.mark_non_differentiable(*(() if lengths is None else (lengths,)))
        c_n = None if c is None else c.to(c0.dtype)
        return y, h.to(h0.dtype), c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if no_gradient_arrived(dy, dh_n, dc_n):
            return (None,) * 13
        if torch.is_grad_enabled():
            raise RuntimeError(REFUSAL)
        (w_hh, w_hr, gates, h_prev_all, c_prev_all, c_new_all, gh_n_all, alive_all, keep_h, keep_c,
         gain_hh, gain_c, bias_c, gh_hat_all, gh_rstd_all, c_hat_all, c_rstd_all) = ctx.saved_tensors
        ln = gain_hh is not None
        cell, H = ctx.cell, ctx.H
        T = gates.shape[0]
        acc = gates.dtype
        w_hh_a, w_hr_a = w_hh.to(acc), _cast(w_hr, acc)
        B, Hout = h_prev_all.shape[1], h_prev_all.shape[2]
        zeros = lambda *shape: gates.new_zeros(shape, dtype=ctx.dtype)  # noqa: E731 - outputs no loss reached
        dy = zeros(T, B, Hout) if dy is None else dy
        dh_n = zeros(B, Hout) if dh_n is None else dh_n
        dc_n = zeros(B, ctx.H) if dc_n is None and cell == "lstm" else dc_n

        dh = dh_n.to(acc)                                   # grad of the state after the step
        dc = dc_n.to(acc) if cell == "lstm" else None
        d_gx = torch.empty_like(gates)                      # [T,B,G*H]
        d_gh = torch.empty_like(gates) if cell == "gru" else d_gx
        d_w_hr = torch.zeros_like(w_hr_a) if w_hr is not None else None
        d_mm = torch.empty_like(gates) if ln else d_gh    # grad of h_prev @ w_hh.T (before layer norm)
        if ln:
            gain_hh_a = gain_hh.to(acc)
        if ln and cell == "lstm":
            gain_c_a, bias_c_a = gain_c.to(acc), bias_c.to(acc)
            d_gain_c, d_bias_c = torch.zeros_like(gain_c_a), torch.zeros_like(bias_c_a)

        for t in (range(T) if ctx.reverse else range(T - 1, -1, -1)):
            dy_t = dy[t].to(acc)
            if alive_all is None:
                dh_new, dh_keep = dh + dy_t, None
            else:
                # h_t = alive ? h_new : h_prev, and y_t = alive ? h_new : 0
                alive = alive_all[t]
                dh_new = torch.where(alive, dh + dy_t, 0)
                dh_keep = torch.where(alive, 0, dh)
            if cell == "lstm":
                dc_new, dc_keep = (dc, None) if alive_all is None else (
                    torch.where(alive, dc, 0), torch.where(alive, 0, dc))
            if keep_h is not None:  # zoneout: the kept share goes straight to the previous state
                k = keep_h[t].to(acc)
                dh_new, dh_keep = (1 - k) * dh_new, k * dh_new + (0 if dh_keep is None else dh_keep)
                if cell == "lstm":
                    k = keep_c[t].to(acc)
                    dc_new, dc_keep = (1 - k) * dc_new, k * dc_new + (0 if dc_keep is None else dc_keep)
            if cell == "lstm":
                if w_hr_a is not None:
                    i, f, g, o = gates[t].chunk(4, 1)
                    h_full = o * torch.tanh(c_new_all[t])
                    d_w_hr += dh_new.t() @ h_full
                    dh_new = dh_new @ w_hr_a
                if ln:  # through h = o tanh(LN(c') gain_c + bias_c)
                    tanh_out = torch.tanh(c_hat_all[t] * gain_c_a + bias_c_a)
                    d_c_out = dh_new * gates[t, :, 3 * H:] * (1 - tanh_out * tanh_out)
                    d_gain_c += (d_c_out * c_hat_all[t]).sum(0)
                    d_bias_c += d_c_out.sum(0)
                    dc_new = dc_new + cell_math.layer_norm_backward(d_c_out, gain_c_a, c_hat_all[t], c_rstd_all[t])
                    d_gx[t], dc = cell_math.lstm_gates_backward(gates[t], c_prev_all[t], tanh_out, dh_new, dc_new)
                else:
                    d_gx[t], dc = cell_math.lstm_step_backward(gates[t], c_prev_all[t], c_new_all[t], dh_new, dc_new)
                if dc_keep is not None:
                    dc = dc + dc_keep
                if ln:
                    d_mm[t] = cell_math.layer_norm_backward(d_gx[t], gain_hh_a, gh_hat_all[t], gh_rstd_all[t])
                dh = d_mm[t] @ w_hh_a
            elif cell == "gru":
                d_gx[t], d_gh[t], dh_direct = cell_math.gru_step_backward(gates[t], gh_n_all[t], h_prev_all[t], dh_new)
                if ln:
                    d_mm[t] = cell_math.layer_norm_backward(d_gh[t], gain_hh_a, gh_hat_all[t], gh_rstd_all[t])
                dh = d_mm[t] @ w_hh_a + dh_direct
            else:
                d_gx[t] = cell_math.rnn_step_backward(gates[t], dh_new, cell == "rnn_relu")
                dh = d_gx[t] @ w_hh_a
            if dh_keep is not None:
                dh = dh + dh_keep

        G = d_gh.shape[2]
        d_w_hh = (d_mm.reshape(-1, G).t() @ h_prev_all.reshape(-1, h_prev_all.shape[2])).to(w_hh.dtype)
        d_ln = (None, None, None)
        if ln:
            d_gain_hh = (d_gh * gh_hat_all).sum((0, 1)).to(gain_hh.dtype)
            d_ln = (d_gain_hh, None, None) if cell != "lstm" else (
                d_gain_hh, d_gain_c.to(gain_c.dtype), d_bias_c.to(bias_c.dtype))
        d_b_hh = d_gh.sum((0, 1)).to(w_hh.dtype) if ctx.has_bias else None
        d_c0 = dc.to(dc_n.dtype) if cell == "lstm" else None
        d_w_hr = d_w_hr.to(w_hr.dtype) if w_hr is not None else None
        return (None, d_gx.to(dy.dtype), dh.to(dh_n.dtype), d_c0, d_w_hh, d_b_hh, d_w_hr, None, None, None) + d_ln


# options beyond torch.nn's that this backend implements (fused_rnn/backends.py routes by them)
OPTIONS = ("zoneout", "layer_norm")


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None):
    """The recurrence contract (fused_rnn/backends.py) with the analytic backward.

    zoneout: None or (keep_h [T,B,Hout], keep_c [T,B,H] or None); layer_norm: None or
    (gain_hh, gain_c, bias_c), both as in reference.recurrence."""
    gain_hh, gain_c, bias_c = (None, None, None) if layer_norm is None else layer_norm
    return TorchRecurrence.apply(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout,
                                 gain_hh, gain_c, bias_c)


def unavailable_reason(device, dtype, cell, has_proj):
    return None
