"""Triton kernels for one layer, one direction of an LSTM / GRU / RNN (see README.md for the design).

Grid: (batch blocks, hidden tiles). Program (pid_b, pid_h) owns BLOCK_B sequences and hidden units
[pid_h*BLOCK_H, (pid_h+1)*BLOCK_H) with all G gate rows of w_hh for them, so the cell pointwise and
the carried state (h, c forward; dh, dc backward) stay in its fp32 (fp64) registers for the whole
time loop. What every program needs from all the others - h_{t-1} forward, the h-side gate grads dG
backward - goes through a small double-buffered global array in the dot's operand dtype (the dot
rounds to it anyway) and one barrier per step:
  SYNC=True:  a spin barrier on a per-batch-block counter; the launcher launches the grid as a
              cooperative grid, so the driver guarantees that all programs are resident. The spin is
              bounded: a program that waits spin_limit polls in vain flags a timeout (the launcher
              turns it into an error) and stops waiting, so a broken guarantee never hangs the GPU;
  SYNC=False: only one hidden tile (a CTA-wide barrier is enough), or the launcher runs one step per launch.
A launch processes steps [step_begin, step_end) and reads/writes its carried state from/to global
buffers at entry/exit, so one launch of all steps and one launch per step compute the same thing.
"""
import triton
import triton.language as tl

from .cell_math import (
    gru_cell_backward,
    gru_cell_forward,
    layer_norm_backward,
    layer_norm_forward,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_gates_backward,
    rnn_cell_backward,
    rnn_cell_forward,
    tanh,
    zone_out,
)

CELL_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
NUM_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# Values saved per hidden unit and step for the backward: LSTM i,f,g,o; GRU r,z,n,gh_n; RNN h.
NUM_SAVED = {"lstm": 4, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}
# Zoneout modes (constexpr ZONEOUT): off; per-unit 0/1 masks [T, B, H]; one probability p (eval).
ZONEOUT_MODES = {"off": 0, "mask": 1, "constant": 2}


@triton.jit
def _grid_barrier(cnt_ptr, target, spin_limit):
    """All hidden-tile programs of one batch block wait here until `target` arrivals are counted, or
    for at most `spin_limit` polls. Returns 1 (int32) when it gave up waiting, else 0."""
    tl.debug_barrier()  # this program's stores are done before it announces them
    tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    arrived = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    spins = tl.full([], 0, tl.int32)
    while (arrived < target) & (spins < spin_limit):
        arrived = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()
    return (arrived < target).to(tl.int32)


@triton.jit
def _report_timeout(cnt_ptr, timed_out):
    """The barrier gave up at least once: flag it in the slot after the per-batch-block counters."""
    if timed_out != 0:
        tl.atomic_max(cnt_ptr + tl.num_programs(0), 1)
        # said on the device too: on a GPU the launcher's check surfaces as a generic device-side assert
        tl.device_print("fused_rnn triton: grid barrier timed out, a program was not resident; batch block",
                        tl.program_id(0))


@triton.jit
def _load_tile(ptr, row_stride, offs_b, offs_n, mask_b, mask_n):
    """[BLOCK_B, BLOCK_N] block of a row-major [*, row_stride] array; zero outside the masks."""
    return tl.load(ptr + offs_b[:, None] * row_stride + offs_n[None, :],
                   mask=mask_b[:, None] & mask_n[None, :], other=0)


@triton.jit
def _store_tile(ptr, row_stride, offs_b, offs_n, mask_b, mask_n, value):
    tl.store(ptr + offs_b[:, None] * row_stride + offs_n[None, :],
             value.to(ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


@triton.jit
def _dot_acc(a, w_ptrs, w_mask, acc, DOT_DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ w for the [K, N] block of weights at w_ptrs: operands in DOT_DT, accumulated in
    acc's dtype (named: triton 3.6 assumes an fp32 accumulator otherwise, which fp64 is not)."""
    w = tl.load(w_ptrs, mask=w_mask, other=0).to(DOT_DT)
    return tl.dot(a, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)


@triton.jit
def _load_bias(b_ptr, gate, H, offs_h, mask_h, HAS_BIAS: tl.constexpr, CDT: tl.constexpr):
    if HAS_BIAS:
        b = tl.load(b_ptr + gate * H + offs_h, mask=mask_h, other=0).to(CDT)
    else:
        b = tl.zeros([offs_h.shape[0]], dtype=CDT)
    return b[None, :]


@triton.jit
def _store_gates(p, ld, H, offs_b, offs_h, mask_b, mask_h, g0, g1, g2, g3, G: tl.constexpr):
    """Store a step's G gate tiles (gate k at column k*H of rows with stride ld); unused gates are skipped."""
    _store_tile(p, ld, offs_b, offs_h, mask_b, mask_h, g0)
    if G > 1:
        _store_tile(p + H, ld, offs_b, offs_h, mask_b, mask_h, g1)
        _store_tile(p + 2 * H, ld, offs_b, offs_h, mask_b, mask_h, g2)
    if G > 3:
        _store_tile(p + 3 * H, ld, offs_b, offs_h, mask_b, mask_h, g3)


@triton.jit
def _load_gates(p, ld, H, offs_b, offs_h, mask_b, mask_h, G: tl.constexpr):
    """The inverse of _store_gates; unused gates repeat gate 0."""
    g0 = _load_tile(p, ld, offs_b, offs_h, mask_b, mask_h)
    g1 = g0
    g2 = g0
    g3 = g0
    if G > 1:
        g1 = _load_tile(p + H, ld, offs_b, offs_h, mask_b, mask_h)
        g2 = _load_tile(p + 2 * H, ld, offs_b, offs_h, mask_b, mask_h)
    if G > 3:
        g3 = _load_tile(p + 3 * H, ld, offs_b, offs_h, mask_b, mask_h)
    return g0, g1, g2, g3


@triton.jit
def _load_gain(ptr, gate, H, offs_h, mask_h, CDT: tl.constexpr):
    return tl.load(ptr + gate * H + offs_h, mask=mask_h, other=0).to(CDT)[None, :]


@triton.jit
def _load_ln_params(gain_hh_ptr, gain_c_ptr, bias_c_ptr, H, offs_h, mask_h, G: tl.constexpr, CELL: tl.constexpr,
                    CDT: tl.constexpr):
    """The layer norm's per-gate gains of the recurrent part (unused gates repeat gate 0's) and, for the LSTM,
    the gain and bias of LN(c'); for other cells those two repeat gate 0's gain and are never read."""
    gain0 = _load_gain(gain_hh_ptr, 0, H, offs_h, mask_h, CDT)
    gain1 = gain0
    gain2 = gain0
    gain3 = gain0
    if G > 1:
        gain1 = _load_gain(gain_hh_ptr, 1, H, offs_h, mask_h, CDT)
        gain2 = _load_gain(gain_hh_ptr, 2, H, offs_h, mask_h, CDT)
    if G > 3:
        gain3 = _load_gain(gain_hh_ptr, 3, H, offs_h, mask_h, CDT)
    gain_c = gain0
    bias_c = gain0
    if CELL == 0:
        gain_c = _load_gain(gain_c_ptr, 0, H, offs_h, mask_h, CDT)
        bias_c = _load_gain(bias_c_ptr, 0, H, offs_h, mask_h, CDT)
    return gain0, gain1, gain2, gain3, gain_c, bias_c


@triton.jit
def _load_keep(keep_ptr, t, B, H, offs_b, offs_h, mask_b, mask_h, ZONEOUT: tl.constexpr, CDT: tl.constexpr):
    """This step's zoneout keep values: a [BLOCK_B, BLOCK_H] tile of the masks, or the scalar p."""
    if ZONEOUT == 1:
        k = _load_tile(keep_ptr + t * B * H, H, offs_b, offs_h, mask_b, mask_h).to(CDT)
    else:
        k = tl.load(keep_ptr).to(CDT)
    return k


@triton.jit
def _store_row(ptr, row_stride, offs_b, mask_b, value):
    """value [BLOCK_B, 1] -> ptr[b * row_stride] (a per-row statistic such as 1/std)."""
    tl.store(ptr + offs_b[:, None] * row_stride, value.to(ptr.dtype.element_ty), mask=mask_b[:, None])


@triton.jit
def _load_row(ptr, row_stride, offs_b, mask_b):
    return tl.load(ptr + offs_b[:, None] * row_stride, mask=mask_b[:, None], other=1)


# T, B, the step range and the spin limit change from call to call: one compiled variant for all their
# values (B only masks rows and offsets whole steps, so its divisibility buys nothing; H stays specialised).
@triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "spin_limit"])
def rnn_forward_kernel(
    gx_ptr,      # [T, B, G*H]  x @ w_ih.T + b_ih, input dtype
    w_ptr,       # [G*H, H]     w_hh, input dtype
    b_ptr,       # [G*H]        b_hh (dummy when not HAS_BIAS)
    len_ptr,     # [B] int64    sequence lengths (dummy when not HAS_LENGTHS)
    y_ptr,       # [T, B, H]    output, input dtype
    hbuf_ptr,    # [2, B, H]    dot operand dtype (w_hh's); hbuf[s % 2] = h before processing step s
    hstate_ptr,  # [B, H]       compute dtype: h at launch entry, overwritten with h at exit
    cstate_ptr,  # [B, H]       compute dtype (LSTM): c at launch entry, overwritten with c at exit
    saved_ptr,   # [T, B, NSAVE*H] compute dtype: post-activation gates for the backward (SAVE)
    call_ptr,    # [T, B, H]    compute dtype (LSTM, SAVE): c_t after each step
    cnt_ptr,     # [num batch blocks + 1] int32 barrier counters (zero at launch), then the timeout flag
    gh0_ptr,     # [B, G*H]     (HAS_GH0) replaces h_{t-1} @ w_hh.T at each sequence's first step
    keep_h_ptr,  # zoneout of h: [T, B, H] 0/1 masks (ZONEOUT 1) or [1] probability p (ZONEOUT 2)
    keep_c_ptr,  # the same for c (LSTM)
    gain_hh_ptr,  # [G*H] (LAYER_NORM) gain of the normalised recurrent part; b_hh is its bias
    gain_c_ptr,  # [H]   (LAYER_NORM, LSTM) gain of the normalised c_t
    bias_c_ptr,  # [H]   (LAYER_NORM, LSTM) bias of the normalised c_t
    lnhat_ptr,   # [T, B, NLN*H] compute dtype (LAYER_NORM, SAVE): normalised recurrent part, then c_t (LSTM)
    lnrstd_ptr,  # [T, B, NLN-G+1] compute dtype (LAYER_NORM, SAVE): their 1/std (1 per row, 2 for the LSTM)
    T, B, H, step_begin, step_end, spin_limit,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, HAS_GH0: tl.constexpr,
    SAVE: tl.constexpr, SYNC: tl.constexpr, CDT: tl.constexpr, DOT_DT: tl.constexpr, DOT_PREC: tl.constexpr,
    ZONEOUT: tl.constexpr, LAYER_NORM: tl.constexpr, NLN: tl.constexpr, EPS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """LAYER_NORM needs the whole row in one program (one hidden tile): the launcher sees to it."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    num_h = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    GH = G * H
    if HAS_LENGTHS:
        seq_len = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    else:
        seq_len = tl.zeros([BLOCK_B], dtype=tl.int64) + T
    if REVERSE:
        first_t = seq_len - 1  # each sequence's first step: where its recurrence starts from h0
    else:
        first_t = tl.zeros([BLOCK_B], dtype=tl.int64)

    b0 = _load_bias(b_ptr, 0, H, offs_h, mask_h, HAS_BIAS, CDT)
    b1 = b0
    b2 = b0
    b3 = b0
    if G > 1:
        b1 = _load_bias(b_ptr, 1, H, offs_h, mask_h, HAS_BIAS, CDT)
        b2 = _load_bias(b_ptr, 2, H, offs_h, mask_h, HAS_BIAS, CDT)
    if G > 3:
        b3 = _load_bias(b_ptr, 3, H, offs_h, mask_h, HAS_BIAS, CDT)
    if LAYER_NORM:
        gain0, gain1, gain2, gain3, gain_c, bias_c = _load_ln_params(gain_hh_ptr, gain_c_ptr, bias_c_ptr, H, offs_h,
                                                                     mask_h, G, CELL, CDT)

    # carried state of this program's tile, fp32 (fp64) registers for the whole loop
    h = _load_tile(hstate_ptr, H, offs_b, offs_h, mask_b, mask_h)
    if CELL == 0:
        c = _load_tile(cstate_ptr, H, offs_b, offs_h, mask_b, mask_h)
    else:
        c = h
    timed_out = tl.full([], 0, tl.int32)

    for s in range(step_begin, step_end):
        if REVERSE:
            t = tl.cast(T - 1 - s, tl.int64)
        else:
            t = tl.cast(s, tl.int64)
        # this step's input part first: its HBM round trip overlaps the recurrent product below
        p_gx = gx_ptr + t * B * GH
        x0 = _load_tile(p_gx, GH, offs_b, offs_h, mask_b, mask_h).to(CDT)
        x1 = x0
        x2 = x0
        x3 = x0
        if G > 1:
            x1 = _load_tile(p_gx + H, GH, offs_b, offs_h, mask_b, mask_h).to(CDT)
            x2 = _load_tile(p_gx + 2 * H, GH, offs_b, offs_h, mask_b, mask_h).to(CDT)
        if G > 3:
            x3 = _load_tile(p_gx + 3 * H, GH, offs_b, offs_h, mask_b, mask_h).to(CDT)
        # recurrent product h_{t-1} @ w_hh[gate rows of this tile].T, K-chunked over all of h
        acc0 = tl.zeros([BLOCK_B, BLOCK_H], dtype=CDT)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        p_h = hbuf_ptr + (s % 2) * B * H
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            b_h = tl.load(p_h + offs_b[:, None] * H + offs_k[None, :],
                          mask=mask_b[:, None] & mask_k[None, :], other=0, cache_modifier=".cg")
            b_h = b_h.to(DOT_DT)  # stored in the weights' dtype: the tensor-core operand as is
            p_w = w_ptr + offs_h[None, :] * H + offs_k[:, None]  # [BLOCK_K, BLOCK_H] view of w_hh.T
            mask_w = mask_k[:, None] & mask_h[None, :]
            acc0 = _dot_acc(b_h, p_w, mask_w, acc0, DOT_DT, DOT_PREC)
            if G > 1:
                acc1 = _dot_acc(b_h, p_w + H * H, mask_w, acc1, DOT_DT, DOT_PREC)
                acc2 = _dot_acc(b_h, p_w + 2 * H * H, mask_w, acc2, DOT_DT, DOT_PREC)
            if G > 3:
                acc3 = _dot_acc(b_h, p_w + 3 * H * H, mask_w, acc3, DOT_DT, DOT_PREC)

        if HAS_GH0:  # the projected LSTM (see op.py): the first step's product comes precomputed
            is_first = (t == first_t)[:, None]
            acc0 = tl.where(is_first, _load_tile(gh0_ptr, GH, offs_b, offs_h, mask_b, mask_h).to(CDT), acc0)
            if G > 1:
                acc1 = tl.where(is_first, _load_tile(gh0_ptr + H, GH, offs_b, offs_h, mask_b, mask_h).to(CDT), acc1)
                acc2 = tl.where(is_first, _load_tile(gh0_ptr + 2 * H, GH, offs_b, offs_h, mask_b, mask_h).to(CDT),
                                acc2)
            if G > 3:
                acc3 = tl.where(is_first, _load_tile(gh0_ptr + 3 * H, GH, offs_b, offs_h, mask_b, mask_h).to(CDT),
                                acc3)

        p_lnhat = lnhat_ptr + t * B * NLN * H
        if LAYER_NORM:  # the recurrent part, normalised over all its G*H values: LN(h W_hh^T) * gain_hh
            acc0, acc1, acc2, acc3, rstd = layer_norm_forward(acc0, acc1, acc2, acc3, mask_h, G, EPS)
            if SAVE:
                _store_gates(p_lnhat, NLN * H, H, offs_b, offs_h, mask_b, mask_h, acc0, acc1, acc2, acc3, G)
                if pid_h == 0:
                    _store_row(lnrstd_ptr + t * B * (NLN - G + 1), NLN - G + 1, offs_b, mask_b, rstd)
            acc0 = acc0 * gain0
            acc1 = acc1 * gain1
            acc2 = acc2 * gain2
            acc3 = acc3 * gain3

        valid = (t < seq_len)[:, None]
        p_save = saved_ptr + t * B * NSAVE * H
        if CELL == 0:
            i, f, g, o, c_new, h_new = lstm_cell_forward(x0 + acc0 + b0, x1 + acc1 + b1,
                                                         x2 + acc2 + b2, x3 + acc3 + b3, c)
            if LAYER_NORM:  # h_t = o tanh(LN(c_t) * gain_c + bias_c)
                c_hat, _, _, _, c_rstd = layer_norm_forward(c_new, c_new, c_new, c_new, mask_h, 1, EPS)
                h_new = o * tanh(c_hat * gain_c + bias_c)
                if SAVE:
                    _store_tile(p_lnhat + G * H, NLN * H, offs_b, offs_h, mask_b, mask_h, c_hat)
                    if pid_h == 0:
                        _store_row(lnrstd_ptr + t * B * (NLN - G + 1) + 1, NLN - G + 1, offs_b, mask_b, c_rstd)
            if ZONEOUT != 0:  # c_t keeps c_{t-1} where zoned out (the backward recomputes c~_t)
                c_new = zone_out(_load_keep(keep_c_ptr, t, B, H, offs_b, offs_h, mask_b, mask_h, ZONEOUT, CDT),
                                 c, c_new, ZONEOUT == 1)
            c = tl.where(valid, c_new, c)
            if SAVE:
                _store_tile(p_save, NSAVE * H, offs_b, offs_h, mask_b, mask_h, i)
                _store_tile(p_save + H, NSAVE * H, offs_b, offs_h, mask_b, mask_h, f)
                _store_tile(p_save + 2 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h, g)
                _store_tile(p_save + 3 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h, o)
                _store_tile(call_ptr + t * B * H, H, offs_b, offs_h, mask_b, mask_h, c)
        elif CELL == 1:
            gh_n = acc2 + b2
            r, z, n, h_new = gru_cell_forward(x0, x1, x2, acc0 + b0, acc1 + b1, gh_n, h)
            if SAVE:
                _store_tile(p_save, NSAVE * H, offs_b, offs_h, mask_b, mask_h, r)
                _store_tile(p_save + H, NSAVE * H, offs_b, offs_h, mask_b, mask_h, z)
                _store_tile(p_save + 2 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h, n)
                _store_tile(p_save + 3 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h, gh_n)
        else:
            h_new = rnn_cell_forward(x0 + acc0 + b0, CELL == 3)
            if SAVE:
                _store_tile(p_save, NSAVE * H, offs_b, offs_h, mask_b, mask_h, h_new)
        if ZONEOUT != 0:  # h_t keeps h_{t-1} where zoned out; the output is the zoned-out h_t
            h_new = zone_out(_load_keep(keep_h_ptr, t, B, H, offs_b, offs_h, mask_b, mask_h, ZONEOUT, CDT),
                             h, h_new, ZONEOUT == 1)
        # past its length a sequence's state stays frozen and its output is zero
        h = tl.where(valid, h_new, h)
        _store_tile(y_ptr + t * B * H, H, offs_b, offs_h, mask_b, mask_h, tl.where(valid, h_new, 0))
        _store_tile(hbuf_ptr + ((s + 1) % 2) * B * H, H, offs_b, offs_h, mask_b, mask_h, h)
        if SYNC:
            # after one timeout stop waiting (limit 0): the launch is failing, it must not crawl
            timed_out |= _grid_barrier(cnt_ptr + pid_b, (s - step_begin + 1) * num_h,
                                       tl.where(timed_out != 0, 0, spin_limit))
        else:
            tl.debug_barrier()

    _store_tile(hstate_ptr, H, offs_b, offs_h, mask_b, mask_h, h)
    if CELL == 0:
        _store_tile(cstate_ptr, H, offs_b, offs_h, mask_b, mask_h, c)
    if SYNC:
        _report_timeout(cnt_ptr, timed_out)


@triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "spin_limit"])
def rnn_backward_kernel(
    dy_ptr,       # [T, B, H]      grad of y, input dtype
    w_ptr,        # [G*H, H]       w_hh
    len_ptr,      # [B] int64      (dummy when not HAS_LENGTHS)
    h0_ptr,       # [B, H]         GRU: h_{t-1} of each sequence's first step
    y_ptr,        # [T, B, H]      GRU: h_{t-1} of the other steps
    c0_ptr,       # [B, H]         LSTM: c_{t-1} of each sequence's first step
    saved_ptr,    # [T, B, NSAVE*H] saved post-activation gates
    call_ptr,     # [T, B, H]      LSTM: saved c_t
    dgx_ptr,      # [T, B, G*H]    out: grad of gx (pre-activation gate grads), input dtype
    dgh_ptr,      # [T, B, G*H]    out (GRU only): grad of gh = h @ w_hh.T + b_hh
    dgbuf_ptr,    # [2, B, G*H]    dot operand dtype (w_hh's): h-side gate grads of step s in dgbuf[s % 2]
    dhstate_ptr,  # [B, H]         compute dtype: carried dh at entry / exit (dh_n in, dh0 out)
    dcstate_ptr,  # [B, H]         compute dtype (LSTM): carried dc at entry / exit
    cnt_ptr,      # [num batch blocks + 1] int32 barrier counters (zero at launch), then the timeout flag
    keep_h_ptr,   # zoneout of h: [T, B, H] 0/1 masks (ZONEOUT 1) or [1] probability p (ZONEOUT 2)
    keep_c_ptr,   # the same for c (LSTM)
    gain_hh_ptr,  # [G*H]  (LAYER_NORM) gain of the normalised recurrent part
    gain_c_ptr,   # [H]    (LAYER_NORM, LSTM) gain and bias of the normalised c_t
    bias_c_ptr,
    lnhat_ptr,    # [T, B, NLN*H] (LAYER_NORM) the forward's normalised recurrent part, then c_t (LSTM)
    lnrstd_ptr,   # [T, B, NLN-G+1] (LAYER_NORM) their 1/std
    dmm_ptr,      # [T, B, G*H]   out (LAYER_NORM): grad of h @ w_hh.T before the layer norm
    dcout_ptr,    # [T, B, H]     out (LAYER_NORM, LSTM): grad of LN(c_t) * gain_c + bias_c
    T, B, H, step_begin, step_end, spin_limit,
    CELL: tl.constexpr, G: tl.constexpr, NSAVE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, SYNC: tl.constexpr,
    CDT: tl.constexpr, DOT_DT: tl.constexpr, DOT_PREC: tl.constexpr,
    ZONEOUT: tl.constexpr, LAYER_NORM: tl.constexpr, NLN: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Processing step s in [0, T] walks t backwards through the forward's order. Step s first adds
    dG_{s-1} @ w_hh (all programs' gate grads, s > 0) to the carried dh, then (s < T) turns dh and dc
    into this step's gate grads. Step T only finishes dh0, so a full backward is steps [0, T + 1).
    Zoneout sends the kept share of dh_t (dc_t) straight to h_{t-1} (c_{t-1}); the layer norm of the
    recurrent part turns its gate grads into the grad of h @ w_hh.T (what dgbuf then exchanges)."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    num_h = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    GH = G * H
    if HAS_LENGTHS:
        seq_len = tl.load(len_ptr + offs_b, mask=mask_b, other=1)
    else:
        seq_len = tl.zeros([BLOCK_B], dtype=tl.int64) + T
    if REVERSE:
        first_t = seq_len - 1  # where each sequence's forward recurrence started from h0/c0
    else:
        first_t = tl.zeros([BLOCK_B], dtype=tl.int64)

    if LAYER_NORM:
        gain0, gain1, gain2, gain3, gain_c, bias_c = _load_ln_params(gain_hh_ptr, gain_c_ptr, bias_c_ptr, H, offs_h,
                                                                     mask_h, G, CELL, CDT)

    dh = _load_tile(dhstate_ptr, H, offs_b, offs_h, mask_b, mask_h)
    if CELL == 0:
        dc = _load_tile(dcstate_ptr, H, offs_b, offs_h, mask_b, mask_h)
    else:
        dc = dh
    timed_out = tl.full([], 0, tl.int32)

    for s in range(step_begin, step_end):
        if s > 0:
            # dh_{t} += dG_{t+1} @ w_hh[:, this tile], K-chunked over all G*H gate rows
            acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=CDT)
            p_dg = dgbuf_ptr + ((s - 1) % 2) * B * GH
            for k0 in range(0, GH, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < GH
                b_dg = tl.load(p_dg + offs_b[:, None] * GH + offs_k[None, :],
                               mask=mask_b[:, None] & mask_k[None, :], other=0, cache_modifier=".cg")
                b_dg = b_dg.to(DOT_DT)
                acc = _dot_acc(b_dg, w_ptr + offs_k[:, None] * H + offs_h[None, :],
                               mask_k[:, None] & mask_h[None, :], acc, DOT_DT, DOT_PREC)
            dh = dh + acc
        if s < T:
            if REVERSE:
                t = tl.cast(s, tl.int64)
                t_prev = t + 1
            else:
                t = tl.cast(T - 1 - s, tl.int64)
                t_prev = t - 1
            valid = (t < seq_len)[:, None]
            is_first = (t == first_t)[:, None]
            dh = dh + tl.where(valid, _load_tile(dy_ptr + t * B * H, H, offs_b, offs_h, mask_b, mask_h).to(CDT), 0)
            p_save = saved_ptr + t * B * NSAVE * H
            p_dgx = dgx_ptr + t * B * GH
            p_dgbuf = dgbuf_ptr + (s % 2) * B * GH
            # t_prev is in [0, T) only at valid steps after each sequence's first: read nothing elsewhere
            mask_prev = mask_b & (t < seq_len) & (t != first_t)
            # zoneout: the kept share of dh_t (dc_t) goes straight to h_{t-1} (c_{t-1}), the rest to h~_t
            dh_in = dh
            dh_keep = tl.zeros([BLOCK_B, BLOCK_H], dtype=CDT)
            if ZONEOUT != 0:
                dh_keep = _load_keep(keep_h_ptr, t, B, H, offs_b, offs_h, mask_b, mask_h, ZONEOUT, CDT) * dh
                dh = dh - dh_keep
            if CELL == 0:
                i = _load_tile(p_save, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                f = _load_tile(p_save + H, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                g = _load_tile(p_save + 2 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                o = _load_tile(p_save + 3 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                c_prev = tl.where(
                    is_first,
                    _load_tile(c0_ptr, H, offs_b, offs_h, mask_b, mask_h).to(CDT),
                    _load_tile(call_ptr + t_prev * B * H, H, offs_b, offs_h, mask_prev, mask_h))
                dc_in = dc
                dc_keep = tl.zeros([BLOCK_B, BLOCK_H], dtype=CDT)
                if ZONEOUT != 0:
                    dc_keep = _load_keep(keep_c_ptr, t, B, H, offs_b, offs_h, mask_b, mask_h, ZONEOUT, CDT) * dc
                    dc = dc - dc_keep
                if LAYER_NORM:  # h_t = o tanh(LN(c~_t) * gain_c + bias_c)
                    c_hat = _load_tile(lnhat_ptr + t * B * NLN * H + G * H, NLN * H, offs_b, offs_h, mask_b, mask_h)
                    c_rstd = _load_row(lnrstd_ptr + t * B * (NLN - G + 1) + 1, NLN - G + 1, offs_b, mask_b)
                    tanh_out = tanh(c_hat * gain_c + bias_c)
                    d_cout = tl.where(valid, dh * o * (1 - tanh_out * tanh_out), 0)
                    _store_tile(dcout_ptr + t * B * H, H, offs_b, offs_h, mask_b, mask_h, d_cout)
                    dc_ln, _, _, _ = layer_norm_backward(d_cout * gain_c, d_cout, d_cout, d_cout,
                                                         c_hat, c_hat, c_hat, c_hat, c_rstd, mask_h, 1)
                    d0, d1, d2, d3, dc_prev = lstm_gates_backward(i, f, g, o, c_prev, tanh_out, dh, dc + dc_ln)
                else:
                    if ZONEOUT != 0:  # c~_t, before zoneout (the saved c_t is after it)
                        c_t = f * c_prev + i * g
                    else:
                        c_t = _load_tile(call_ptr + t * B * H, H, offs_b, offs_h, mask_b, mask_h)
                    d0, d1, d2, d3, dc_prev = lstm_cell_backward(i, f, g, o, c_prev, c_t, dh, dc)
                d0 = tl.where(valid, d0, 0)
                d1 = tl.where(valid, d1, 0)
                d2 = tl.where(valid, d2, 0)
                d3 = tl.where(valid, d3, 0)
                dc = tl.where(valid, dc_prev + dc_keep, dc_in)
                dh = tl.where(valid, dh_keep, dh_in)
                for_h2 = d2
            elif CELL == 1:
                r = _load_tile(p_save, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                z = _load_tile(p_save + H, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                n = _load_tile(p_save + 2 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                gh_n = _load_tile(p_save + 3 * H, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                h_prev = tl.where(
                    is_first,
                    _load_tile(h0_ptr, H, offs_b, offs_h, mask_b, mask_h).to(CDT),
                    _load_tile(y_ptr + t_prev * B * H, H, offs_b, offs_h, mask_prev, mask_h).to(CDT))
                d0, d1, d2, for_h2, dh_direct = gru_cell_backward(r, z, n, gh_n, h_prev, dh)
                d0 = tl.where(valid, d0, 0)
                d1 = tl.where(valid, d1, 0)
                d2 = tl.where(valid, d2, 0)
                for_h2 = tl.where(valid, for_h2, 0)
                d3 = d2
                dh = tl.where(valid, dh_direct + dh_keep, dh_in)
                p_dgh = dgh_ptr + t * B * GH
                _store_tile(p_dgh, GH, offs_b, offs_h, mask_b, mask_h, d0)
                _store_tile(p_dgh + H, GH, offs_b, offs_h, mask_b, mask_h, d1)
                _store_tile(p_dgh + 2 * H, GH, offs_b, offs_h, mask_b, mask_h, for_h2)
            else:
                h_t = _load_tile(p_save, NSAVE * H, offs_b, offs_h, mask_b, mask_h)
                d0 = tl.where(valid, rnn_cell_backward(h_t, dh, CELL == 3), 0)
                d1 = d0
                d2 = d0
                d3 = d0
                for_h2 = d0
                dh = tl.where(valid, 0, dh)
            _store_gates(p_dgx, GH, H, offs_b, offs_h, mask_b, mask_h, d0, d1, d2, d3, G)
            # the h-side gate grads: grad of the recurrent part h @ w_hh.T (+ b_hh)
            e0 = d0
            e1 = d1
            e2 = for_h2
            e3 = d3
            if LAYER_NORM:  # ... of LN(h @ w_hh.T) * gain_hh + b_hh: through the layer norm to h @ w_hh.T
                p_lnhat = lnhat_ptr + t * B * NLN * H
                v0, v1, v2, v3 = _load_gates(p_lnhat, NLN * H, H, offs_b, offs_h, mask_b, mask_h, G)
                rstd = _load_row(lnrstd_ptr + t * B * (NLN - G + 1), NLN - G + 1, offs_b, mask_b)
                e0, e1, e2, e3 = layer_norm_backward(e0 * gain0, e1 * gain1, e2 * gain2, e3 * gain3,
                                                     v0, v1, v2, v3, rstd, mask_h, G)
                p_dmm = dmm_ptr + t * B * GH
                _store_gates(p_dmm, GH, H, offs_b, offs_h, mask_b, mask_h, e0, e1, e2, e3, G)
            _store_gates(p_dgbuf, GH, H, offs_b, offs_h, mask_b, mask_h, e0, e1, e2, e3, G)
            if SYNC:
                timed_out |= _grid_barrier(cnt_ptr + pid_b, (s - step_begin + 1) * num_h,
                                           tl.where(timed_out != 0, 0, spin_limit))
            else:
                tl.debug_barrier()

    _store_tile(dhstate_ptr, H, offs_b, offs_h, mask_b, mask_h, dh)
    if CELL == 0:
        _store_tile(dcstate_ptr, H, offs_b, offs_h, mask_b, mask_h, dc)
    if SYNC:
        _report_timeout(cnt_ptr, timed_out)
