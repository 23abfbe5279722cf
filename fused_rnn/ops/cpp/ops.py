"""torch.library registration of the C++/CUDA recurrence ops: loading, autograd, fake kernels, autocast.

The schemas and the CPU/CUDA kernels are declared in csrc/recurrence.cpp:

    fused_rnn::recurrence_forward(cell, gx, h0, c0?, w_hh, b_hh?, w_hr?, lengths?, reverse, save)
        -> (y [T,B,Hout], h_n [B,Hout], c_n [B,H] | [0], gates, cells, proj_in)
    fused_rnn::recurrence_backward(cell, dy, dh_n, dc_n?, y, gates, cells, proj_in, h0, c0?, w_hh,
                                   w_hr?, lengths?, reverse, need_d_h0=True)
        -> (d_gx, d_h0 | [0], d_c0 | [0], d_w_hh, d_b_hh, d_w_hr | [0])
        (need_d_h0=False: h0 needs no gradient, and the last step's dh_prev GEMM, d h0 alone, is skipped)
    fused_rnn::recurrence_forward_projected(cell, x, w_ih, b_ih?, h0, c0?, w_hh, b_hh?, w_hr?, lengths?,
                                            reverse, save)       (CPU)
        = recurrence_forward(cell, gx = x w_ih^T (+ b_ih), ...) with the input projection inside the
        op, so the layer never holds a [T,B,G*H] gx. Its backward is recurrence_backward's d_gx, from
        which _projection_grads forms d_x, d_w_ih, d_b_ih; it saves x and w_ih, never gx.

`gates`, `cells`, `proj_in` are what the backward needs (saved only when `save`, else [0]):
gates [T,B,4H] (LSTM i,f,g,o / GRU r,z,n,gh_n), cells [T,B,H] in fp32 (fp64 for float64 input),
proj_in [T,B,H] = o*tanh(c) with a projection.

Zoneout and the layer-normalised LSTM/GRU (fused_rnn/reference.py) go through the `_options` twins,
which take keep_h?, keep_c? (bool [T,B,H] training masks), keep_p (eval's probability, 0 without),
gain_hh?, gain_c?, bias_c? and add ln_hat, ln_rstd (the saved normalised values and 1/std) to the
forward's outputs and d_gain_hh, d_gain_c, d_bias_c to the backward's.

With lengths (a packed batch), the [T,B,...] tensors the forward saves keep only the rows of valid
steps between forward and backward (`_compact`, the layout of csrc/cpu/compact_rows.h).
recurrence_backward takes them so ([N, ...] with lengths on the CPU): the fused CPU backward reads
them in place and returns d_gx compact too ([N, G*H]), the other paths put them back in place first,
zeros elsewhere (what the forward wrote there or a value the backward never reads). An LSTM without
projection saves no y then ([0]): the backward remakes it as o tanh(c) from the gates and cells. The
`_options` twin's backward gets its tensors back in place from here.
"""
import functools
import hashlib
import weakref
from pathlib import Path

import torch

from ... import backends
from ...double_backward import REFUSAL, no_gradient_arrived, second_order_grads
from ...functional import autocast_dtype

ABI_VERSION = 6  # must equal FUSED_RNN_ABI_VERSION in csrc/python_module.cpp
BUILD_HINT = ("build it with `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` "
              "(or `python setup.py build_ext --inplace`) in the repository")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}

_C = None
_load_error = None
_loaded = False


def _load():
    global _C, _load_error, _loaded
    _loaded = True
    try:
        from fused_rnn import _C as ext  # noqa: PLC0415 - registers torch.ops.fused_rnn.*
    except Exception as e:  # noqa: BLE001 - missing file, or built against another torch (undefined symbol)
        _load_error = f"the C++ extension fused_rnn._C is not built or does not load ({type(e).__name__}: {e}); {BUILD_HINT}"
        return
    if getattr(ext, "ABI_VERSION", None) != ABI_VERSION:
        _load_error = (f"the C++ extension fused_rnn._C is stale (ABI {getattr(ext, 'ABI_VERSION', None)}, "
                       f"this source expects {ABI_VERSION}); re{BUILD_HINT}")
        return
    _load_error = _stale_sources(ext)
    if _load_error is not None:
        return
    _C = ext
    _register()


def _source_hash(csrc):
    """setup.py's source_hash(): the same bytes, the same order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(csrc).rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")):
        h.update(f.relative_to(csrc).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _stale_sources(ext):
    """A sentence when csrc/ (present in a source checkout) changed since fused_rnn._C was built."""
    csrc = Path(__file__).resolve().parents[3] / "csrc"
    built = getattr(ext, "SOURCE_HASH", "")
    if not built or not (csrc / "recurrence.cpp").is_file():
        return None  # an installed wheel, or a build without the hash: nothing to compare
    now = _source_hash(csrc)
    if now != built:
        return (f"the C++ extension fused_rnn._C is stale: csrc/ changed since it was built "
                f"(source hash {built}, now {now}); re{BUILD_HINT}")
    return None


def load_error():
    """None when fused_rnn._C is loaded and current, else a sentence saying why not and how to fix it."""
    if not _loaded:
        _load()
    return _load_error


def built_with_cuda():
    return load_error() is None and bool(_C.WITH_CUDA)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save):
    """gx [T,B,G*H], or x [T,B,I] of the projected op: only T, B, dtype and device are read."""
    T, B = gx.shape[0], gx.shape[1]
    H, Hout = w_hh.shape[0] // GATES[cell], w_hh.shape[1]
    acc = _acc_dtype(gx.dtype)
    y = gx.new_empty(T, B, Hout)
    h_n = gx.new_empty(B, Hout)
    c_n = gx.new_empty(B, H) if cell == "lstm" else gx.new_empty(0)
    gates = gx.new_empty(T, B, 4 * H) if save and cell in ("lstm", "gru") else gx.new_empty(0)
    cells = gx.new_empty(T, B, H, dtype=acc) if save and cell == "lstm" else gx.new_empty(0, dtype=acc)
    proj_in = gx.new_empty(T, B, H) if save and w_hr is not None else gx.new_empty(0)
    return y, h_n, c_n, gates, cells, proj_in


def _fake_forward_projected(cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save):
    return _fake_forward(cell, x, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save)


def _fake_backward(cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh, w_hr, lengths, reverse,
                   need_d_h0=True):
    T, B = dy.shape[0], dy.shape[1]  # (y is [T, B, Hout]: compact saved tensors are never traced)
    GH, H = w_hh.shape[0], w_hh.shape[0] // GATES[cell]
    d_h0 = y.new_empty(h0.shape) if need_d_h0 else y.new_empty(0)
    d_c0 = y.new_empty(B, H) if cell == "lstm" else y.new_empty(0)
    d_w_hr = y.new_empty(w_hr.shape) if w_hr is not None else y.new_empty(0)
    return (y.new_empty(T, B, GH), d_h0, d_c0, y.new_empty(w_hh.shape), y.new_empty(GH), d_w_hr)


def _fake_forward_options(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, keep_h, keep_c, keep_p,
                          gain_hh, gain_c, bias_c):
    T, B, GH = gx.shape
    H, acc = GH // GATES[cell], _acc_dtype(gx.dtype)
    ln, lstm = save and gain_hh is not None, cell == "lstm"
    # no bool * SymInt: ints only, so that dynamic shapes trace (opcheck's aot_dispatch_dynamic)
    ln_hat = gx.new_empty(T, B, GH + (H if lstm else 0), dtype=acc) if ln else gx.new_empty(0, dtype=acc)
    ln_rstd = gx.new_empty(T, B, 2 if lstm else 1, dtype=acc) if ln else gx.new_empty(0, dtype=acc)
    return _fake_forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save) + (ln_hat, ln_rstd)


def _fake_backward_options(cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh, w_hr, lengths, reverse,
                           keep_h, keep_c, keep_p, gain_hh, gain_c, bias_c, ln_hat, ln_rstd, need_d_h0=True):
    lstm_ln = gain_hh is not None and cell == "lstm"
    H = w_hh.shape[0] // GATES[cell]
    d_ln = (y.new_empty(w_hh.shape[0]) if gain_hh is not None else y.new_empty(0),
            y.new_empty(H) if lstm_ln else y.new_empty(0), y.new_empty(H) if lstm_ln else y.new_empty(0))
    return _fake_backward(cell, dy, dh_n, dc_n, y, gates, cells, proj_in, h0, c0, w_hh, w_hr, lengths,
                          reverse, need_d_h0) + d_ln


# Packed batches: the saved [T,B,...] tensors keep only the rows of valid steps when at least this
# fraction of the T*B rows is padding (below it the copies cost more time than they save memory).
# Measured, 2-layer bidirectional LSTM H=256 T=100, lengths drawn in [T/2, T] (~20 % padding):
# the memory saved for the backward went from 1.16x torch.nn's to below it.
COMPACT_MIN_PADDING = 1 / 16


def _valid_rows(lengths, T, B):
    """(valid, padded): the indices t*B + b of the rows of [T*B, ...] with t < lengths[b] (lengths on
    the CPU), and of the others."""
    valid = (torch.arange(T)[:, None] < lengths[None, :]).flatten()
    return valid.nonzero().squeeze(1), (~valid).nonzero().squeeze(1)


def _compacts(lengths, T, B):
    """Whether the saved tensors keep only the valid rows: enough padding, and real lengths on the
    CPU (on a GPU the index would need a host sync; traced, the size would be data-dependent)."""
    if (lengths is None or type(lengths) is not torch.Tensor  # a fake/functional tensor: being traced
            or lengths.device.type != "cpu" or torch.compiler.is_compiling() or T * B == 0):
        return False
    return T * B - int(lengths.clamp(max=T).sum()) >= COMPACT_MIN_PADDING * T * B


def _compact(t, rows):
    """A [T,B,...] tensor (non-empty, on the CPU) as its valid rows [n, ...]; others as they are."""
    return t.flatten(0, 1).index_select(0, rows) if t is not None and t.dim() >= 2 and t.numel() else t


def _restore_saved(tensors, rows, T, B):
    """_compact's inverse: zeros in the padded rows (rows = _valid_rows's pair)."""
    valid, padded = rows

    def restore(t):
        if t is None or t.dim() < 2 or not t.numel():
            return t
        full = t.new_empty(T * B, *t.shape[1:]).index_copy_(0, valid, t)
        return full.index_fill_(0, padded, 0).view(T, B, *t.shape[1:])  # 1/3 faster than zeros first
    return [restore(t) for t in tensors]


_last_compact_input = (None,) * 5  # weak references to x, lengths and x's valid rows; x's and lengths' versions


def _compact_input(x, lengths, valid):
    """x's valid rows [N, I], made once for both directions of a layer: the second direction's call
    (the same x and lengths, unchanged since) takes the first's while its node still holds them.
    Made with autograd on, so that a second-order backward differentiates through them to x
    (_second_order_backward; the index's node holds the index alone, int64 [N])."""
    global _last_compact_input
    x_ref, lengths_ref, rows_ref, x_version, lengths_version = _last_compact_input
    if x_ref is not None and x_ref() is x and lengths_ref() is lengths and (x._version, lengths._version) == (
            x_version, lengths_version):
        rows = rows_ref()
        if rows is not None:
            return rows
    with torch.enable_grad():  # (reshape copies a strided x, batch_first's, and views a contiguous one)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, valid)
    _last_compact_input = (weakref.ref(x), weakref.ref(lengths), weakref.ref(rows), x._version, lengths._version)
    return rows


def _restore_input(x_rows, lengths, T, B):
    """_compact_input's inverse, differentiable: zeros in the padded rows (nothing depends on them)."""
    valid = _valid_rows(lengths, T, B)[0]
    return x_rows.new_zeros(T * B, x_rows.shape[-1]).index_copy(0, valid, x_rows).view(T, B, -1)


# the op's outputs that the backward reads: y, gates, cells, proj_in (and the options' ln_hat, ln_rstd)
_SAVED_OUTPUTS = (0, 3, 4, 5, 6, 7)


def _setup_context(ctx, inputs, output, projection=(), kept=()):
    """projection: (x, w_ih) of the projected op (_setup_context_projected), saved for d_x and d_w_ih;
    kept: more tensors saved after the rest, for _second_order_backward. `output` as a list (the
    eager call, _EagerAutograd): what is compacted is replaced there by an empty tensor at once, so
    that its padded copy is freed before the next one is compacted (a training call's peak memory)."""
    cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save = inputs[:10]
    ctx.cell, ctx.reverse, ctx.save = cell, reverse, save
    ctx.has_bias, ctx.has_c0, ctx.has_proj = b_hh is not None, c0 is not None, w_hr is not None
    ctx.options, ctx.projected = len(inputs) > 10, bool(projection)
    ctx.T, ctx.B = output[0].shape[0], output[0].shape[1]
    ctx.compact = save and _compacts(lengths, ctx.T, ctx.B)
    at = _SAVED_OUTPUTS[:len(output) - 2]
    own = [output[i] for i in at]  # the op's own saved outputs (the zoneout masks are the caller's)
    if ctx.compact:
        valid = _valid_rows(lengths, ctx.T, ctx.B)[0]
        for k, i in enumerate(at):
            own[k] = _compact(own[k], valid)
            if i and type(output) is list and output[i].numel():  # y is the caller's output: kept
                output[i] = output[i].new_empty(0)
        if cell == "lstm" and w_hr is None and not ctx.options:  # y = o tanh(c): the backward remakes it
            own[0] = own[0].new_empty(0)
        if projection:  # x too: the backward reads its valid rows only; the padded x need not outlive the forward
            x, w_ih = projection
            projection = (_compact_input(x, lengths, valid), w_ih)
    saved = [*projection, *own[:4], h0, c0, w_hh, w_hr, lengths]
    if ctx.options:
        keep_h, keep_c, ctx.keep_p, gain_hh, gain_c, bias_c = inputs[10:]
        ctx.has_ln = gain_hh is not None
        saved += [keep_h, keep_c, gain_hh, gain_c, bias_c, *own[4:]]
    ctx.n_kept = len(kept)
    ctx.save_for_backward(*saved, *kept)
    ctx.set_materialize_grads(False)  # None from double_backward.attach means: nothing to do


def _setup_context_projected(ctx, inputs, output, second_order=False):
    """recurrence_forward_projected's inputs as recurrence_forward's (gx never exists) plus x, w_ih.
    second_order: the node differentiates itself under create_graph=True (_second_order_backward),
    for which b_ih and b_hh are saved too, instead of double_backward.attach's node doing it."""
    cell, x, w_ih, b_ih, *rest = inputs
    b_hh = rest[3]
    _setup_context(ctx, (cell, None, *rest), output, projection=(x, w_ih), kept=(b_ih, b_hh) if second_order else ())
    ctx.has_b_ih = b_ih is not None
    ctx.second_order_built_in = second_order


def _second_order_backward(ctx, dy, dh_n, dc_n):
    """The projected op's input gradients as differentiable graphs (create_graph=True): the layer
    recomputed from its inputs through the reference, as double_backward.attach's node does for
    the other ops, without a second node in every call's graph."""
    # as _setup_context_projected saved them (the projected op has no options)
    x, w_ih, _y, _gates, _cells, _proj_in, h0, c0, w_hh, w_hr, lengths, b_ih, b_hh = ctx.saved_tensors
    if ctx.compact:
        x = _restore_input(x, lengths, ctx.T, ctx.B)
    # the op's inputs: cell, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save
    d = second_order_projected(ctx.cell, ctx.reverse, (x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr),
                               ctx.needs_input_grad[1:9], dy, dh_n, dc_n, lengths)
    return (None, *d, None, None, None)


def second_order_projected(cell, reverse, inputs, needs, dy, dh_n, dc_n, lengths=None):
    """The second-order gradients of recurrence_forward_projected's tensor inputs (x, w_ih, b_ih,
    h0, c0, w_hh, b_hh, w_hr; None where absent) that `needs` asks for: _second_order_backward's,
    and the layer entry's C++ node's (csrc/projected_autograd.cpp) under create_graph=True."""
    x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr = inputs
    layer = (x, w_ih, b_ih, None, h0, c0, w_hh, b_hh, w_hr, None, None, None)  # second_order_grads' order
    d = second_order_grads(cell, reverse, lengths, None, layer, (*needs[:3], False, *needs[3:]) + (False,) * 3,
                           (dy, dh_n, dc_n))
    return d[0], d[1], d[2], d[4], d[5], d[6], d[7], d[8]


# Elements of an operand converted to fp32 at a time in _mm (csrc/cpu/half_gemm.h kFp32SliceElems).
_FP32_SLICE_ELEMS = 1 << 18


def _mm(a, b):
    """a @ b (a [..., K], b [K, N]) in a's dtype; for bf16/fp16 on a CPU where torch's own GEMM of that
    dtype runs a scalar loop, on fp32 copies of slices of the operands, rounded once: as
    csrc/cpu/half_gemm.h gemm_fp32_slices, which the C++ GEMMs take (a long contraction sums its K
    slices in fp32; otherwise a's rows a slice at a time)."""
    if not (a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16)
            and _C.cpu_gemm_via_fp32(str(a.dtype).removeprefix("torch."))):
        return a @ b
    a2 = a.reshape(-1, a.shape[-1])
    M, K = a2.shape
    if K > M:
        kc = max(1, _FP32_SLICE_ELEMS // max(M, 1))
        acc = a2.new_zeros(M, b.shape[1], dtype=torch.float32)
        for k0 in range(0, K, kc):
            acc = acc + a2[:, k0:k0 + kc].float() @ b[k0:k0 + kc].float()
        return acc.to(a.dtype).reshape(*a.shape[:-1], b.shape[1])
    mc = max(1, _FP32_SLICE_ELEMS // max(K, 1))
    b32 = b.float()
    out = a2.new_empty(M, b.shape[1])
    for m0 in range(0, M, mc):
        out[m0:m0 + mc] = a2[m0:m0 + mc].float() @ b32
    return out.reshape(*a.shape[:-1], b.shape[1])


def _projection_grads(ctx, d_gx, x, w_ih):
    """d_x, d_w_ih, d_b_ih of gx = x w_ih^T + b_ih, each only when its input needs it."""
    need_x, need_w_ih, need_b_ih = ctx.needs_input_grad[1:4]
    d_x = _mm(d_gx, w_ih) if need_x else None
    d_w_ih = _mm(d_gx.flatten(0, 1).t(), x.flatten(0, 1)) if need_w_ih else None
    d_b_ih = d_gx.sum((0, 1)) if need_b_ih and ctx.has_b_ih else None
    return d_x, d_w_ih, d_b_ih


# A packed batch's d_x in up to this many GEMMs of at least this many rows each: the product d_gx W_ih
# then exists 1/8 at a time beside d_x (whole, at B=8 H=256 it set the training call's peak memory)
_D_X_CHUNKS, _D_X_CHUNK_MIN_ROWS = 8, 64


def _projection_grads_compact(ctx, d_gx, rows, x, w_ih):
    """_projection_grads from the compact d_gx [N, G*H] and x [N, I] of a packed batch (rows =
    _valid_rows's pair): d_x is zero in the padded rows, which contribute nothing to d_w_ih and d_b_ih."""
    need_x, need_w_ih, need_b_ih = ctx.needs_input_grad[1:4]
    d_w_ih = _mm(d_gx.t(), x) if need_w_ih else None
    d_x = None
    if need_x:
        d_x = x.new_zeros(ctx.T * ctx.B, x.shape[-1])
        n = d_gx.shape[0]
        chunk = max(_D_X_CHUNK_MIN_ROWS, -(-n // _D_X_CHUNKS))
        for r in range(0, n, chunk):
            d_x.index_copy_(0, rows[0][r:r + chunk], _mm(d_gx[r:r + chunk], w_ih))
        d_x = d_x.view(ctx.T, ctx.B, -1)
    d_b_ih = d_gx.sum(0) if need_b_ih and ctx.has_b_ih else None
    return d_x, d_w_ih, d_b_ih


def _backward(ctx, dy, dh_n, dc_n, _d_gates, _d_cells, _d_proj_in, *_d_ln_saved):
    n_inputs = 16 if ctx.options else 12 if ctx.projected else 10
    if no_gradient_arrived(dy, dh_n, dc_n):
        return (None,) * n_inputs
    if torch.is_grad_enabled():
        if getattr(ctx, "second_order_built_in", False):
            return _second_order_backward(ctx, dy, dh_n, dc_n)
        # create_graph=True on the op itself: recurrence_backward has no derivative of its own, and
        # autograd would otherwise drop that path silently and return wrong second-order gradients.
        raise RuntimeError(REFUSAL)
    if not ctx.save:
        raise RuntimeError("fused_rnn: recurrence_forward ran with save=False, so it cannot be differentiated")
    saved = ctx.saved_tensors[:len(ctx.saved_tensors) - ctx.n_kept]
    projection, saved = (saved[:2], saved[2:]) if ctx.projected else ((), saved)  # (x, w_ih) first
    y, gates, cells, proj_in, h0, c0, w_hh, w_hr, lengths, *options = saved
    rows = _valid_rows(lengths, ctx.T, ctx.B) if ctx.compact else None
    if ctx.compact and ctx.options:  # the plain op's backward takes the compact tensors as they are
        y, gates, cells, proj_in = _restore_saved((y, gates, cells, proj_in), rows, ctx.T, ctx.B)
        options[5:] = _restore_saved(options[5:], rows, ctx.T, ctx.B)  # ln_hat, ln_rstd
    dy = h0.new_zeros(ctx.T, ctx.B, h0.shape[-1]) if dy is None else dy  # outputs no loss reached
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    if ctx.cell == "lstm" and dc_n is None:
        dc_n = torch.zeros_like(c0) if c0 is not None else y.new_zeros(ctx.B, cells.shape[-1])
    args = (ctx.cell, dy, dh_n, dc_n if ctx.cell == "lstm" else None, y, gates, cells, proj_in,
            h0, c0, w_hh, w_hr, lengths, ctx.reverse)
    need_d_h0 = ctx.needs_input_grad[4 if ctx.projected else 2]  # h0 among the op's inputs
    if not ctx.options:
        d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr = torch.ops.fused_rnn.recurrence_backward(*args, need_d_h0)
        d_ln = ()
    else:
        keep_h, keep_c, gain_hh, gain_c, bias_c, ln_hat, ln_rstd = options
        d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, *d_ln = torch.ops.fused_rnn.recurrence_backward_options(
            *args, keep_h, keep_c, ctx.keep_p, gain_hh, gain_c, bias_c, ln_hat, ln_rstd, need_d_h0)
        lstm_ln = ctx.has_ln and ctx.cell == "lstm"
        d_ln = (None, None, None, d_ln[0] if ctx.has_ln else None, d_ln[1] if lstm_ln else None,
                d_ln[2] if lstm_ln else None)
    d_recurrence = (d_h0 if need_d_h0 else None, d_c0 if ctx.has_c0 else None, d_w_hh,
                    d_b_hh if ctx.has_bias else None, d_w_hr if ctx.has_proj else None, None, None, None)
    if d_gx.dim() == 2:  # the fused CPU backward's compact d_gx ([N, G*H], the valid rows only)
        d_input = (_projection_grads_compact(ctx, d_gx, rows, *projection) if ctx.projected
                   else _restore_saved((d_gx,), rows, ctx.T, ctx.B))
    elif ctx.projected:
        x, w_ih = projection
        d_input = _projection_grads(ctx, d_gx, _restore_input(x, lengths, ctx.T, ctx.B) if ctx.compact else x, w_ih)
    else:
        d_input = (d_gx,)
    return (None, *d_input, *d_recurrence, *d_ln)


class _EagerAutograd(torch.autograd.Function):
    """What register_autograd below does for a registered op, in eager mode on plain tensors: the op
    runs below autograd, then _setup_context / _backward as registered. torch.library's generic
    wrapper rebuilds the op's arguments from its schema on every call (utils.fill_defaults: ~40 us
    for these 12-16 argument schemas, half of a T=1 step at H=128); here the arguments pass as
    they are. The op comes last in the arguments, so ctx.needs_input_grad keeps the op's indices."""

    @staticmethod
    def forward(ctx, *args):  # forward with ctx: no per-call inspect.signature (setup_context style binds one)
        *inputs, op = args
        with torch._C._AutoDispatchBelowAutograd():
            output = list(op(*inputs))
        _EAGER_SETUP[op](ctx, tuple(inputs), output)  # may replace compacted outputs by empty tensors
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads):
        return (*_backward(ctx, *grads), None)


_EAGER_SETUP = {}  # op overload -> its setup_context (filled by _register)


def _call_op(op, args, save):
    """op(*args) with its registered autograd; eager calls on plain tensors skip torch.library's
    per-call wrapper (_EagerAutograd). Traced calls (torch.compile, fake or functional tensors,
    torch.func transforms, which need a setup_context-style Function) and tensor subclasses take
    the registered op."""
    if (not all(type(a) in _PLAIN_ARG_TYPES for a in args) or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return op(*args)
    if save:
        return _EagerAutograd.apply(*args, op)
    with torch._C._AutoDispatchBelowAutograd():  # nothing needs a gradient: the kernel alone
        return op(*args)


# the op's argument types in eager mode: anything else (a tensor subclass: fake, functional, a user's) is traced
_PLAIN_ARG_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None), str, bool, float))


def _register():
    torch.library.register_fake("fused_rnn::recurrence_forward")(_fake_forward)
    torch.library.register_fake("fused_rnn::recurrence_backward")(_fake_backward)
    torch.library.register_autograd("fused_rnn::recurrence_forward", _backward, setup_context=_setup_context)
    torch.library.register_fake("fused_rnn::recurrence_forward_options")(_fake_forward_options)
    torch.library.register_fake("fused_rnn::recurrence_backward_options")(_fake_backward_options)
    torch.library.register_autograd("fused_rnn::recurrence_forward_options", _backward,
                                    setup_context=_setup_context)
    torch.library.register_fake("fused_rnn::recurrence_forward_projected")(_fake_forward_projected)
    torch.library.register_autograd("fused_rnn::recurrence_forward_projected", _backward,
                                    setup_context=_setup_context_projected)
    _EAGER_SETUP.update({torch.ops.fused_rnn.recurrence_forward.default: _setup_context,
                         torch.ops.fused_rnn.recurrence_forward_options.default: _setup_context,
                         torch.ops.fused_rnn.recurrence_forward_projected.default:
                             functools.partial(_setup_context_projected, second_order=True)})


# options beyond torch.nn's that the cpu and cuda backends implement (fused_rnn/backends.py routes by them)
OPTIONS = ("zoneout", "layer_norm")
unavailable_option_reason = backends.options_refused_with_projection


def zoneout_operands(zoneout):
    """fused_rnn.functional.zoneout_keep's (keep_h, keep_c) as the ops take them: the training
    masks as bool tensors (keep_p 0), or eval's probability as keep_p (the masks None)."""
    if zoneout is None:
        return None, None, 0.0
    keep_h, keep_c = zoneout
    if keep_h.dtype == torch.bool:
        return keep_h.contiguous(), None if keep_c is None else keep_c.contiguous(), 0.0
    return None, None, float(keep_h[(0,) * keep_h.dim()])  # eval: p expanded without memory


def recurrence(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, zoneout=None, layer_norm=None,
               projection=None):
    """The recurrence contract (fused_rnn/backends.py) on the C++/CUDA kernels of the input's device.
    zoneout: None or (keep_h, keep_c); layer_norm: None or (gain_hh, gain_c, bias_c), as the reference's.
    projection: None, or (x, w_ih, b_ih) with gx None: recurrence_forward_projected computes
    gx = x w_ih^T (+ b_ih) inside the op (CPU; neither zoneout nor layer norm)."""
    err = load_error()
    if err is not None:
        raise RuntimeError(err)
    if projection is not None and (gx is not None or zoneout is not None or layer_norm is not None):
        raise ValueError("fused_rnn: projection=(x, w_ih, b_ih) replaces gx, without zoneout or layer norm")
    inputs = (gx,) if projection is None else tuple(projection)  # what the recurrence's gx comes from
    dtype = autocast_dtype(inputs[0].device.type, "layer", cell, inputs[0].dtype)  # torch.nn's autocast dtypes, one table
    if dtype is not None:
        cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731
        inputs = tuple(map(cast, inputs))
        h0, c0, w_hh, b_hh, w_hr = map(cast, (h0, c0, w_hh, b_hh, w_hr))
        layer_norm = None if layer_norm is None else tuple(map(cast, layer_norm))
    gains = () if layer_norm is None else layer_norm
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, h0, c0, w_hh, b_hh, w_hr, *gains))
    args = (cell, *inputs, h0, c0, w_hh, b_hh, w_hr, lengths, bool(reverse), save)
    if projection is not None:
        op = torch.ops.fused_rnn.recurrence_forward_projected.default
    elif zoneout is None and layer_norm is None:
        op = torch.ops.fused_rnn.recurrence_forward.default
    else:
        op = torch.ops.fused_rnn.recurrence_forward_options.default
        gain_hh, gain_c, bias_c = (None, None, None) if layer_norm is None else layer_norm
        args += (*zoneout_operands(zoneout), gain_hh, gain_c, bias_c)
    y, h_n, c_n, *_ = _call_op(op, args, save)
    return y, h_n, (c_n if cell == "lstm" else None)
