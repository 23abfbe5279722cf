"""The layer modules' eager training call: fused_rnn._C.layer_forward (csrc/layer_entry.cpp) with
autograd recording each layer and direction as the C++ node of csrc/projected_autograd.cpp.

Outputs, first-order gradients (input, h0, c0, every weight) and second-order gradients bitwise
those of the modules' full path (functional.rnn: the op's Python autograd, fused_rnn/ops/cpp/ops.py)
and close to torch.nn's; float64 gradcheck and gradgradcheck through the module; what autograd does
around a node as on the full path: frozen parameters and inputs that need no gradient, outputs no
loss reached, retain_graph, saved-tensor hooks (what is saved, and how much), the in-place check,
anomaly mode; forward-mode AD and torch.nn's errors through the full path.
"""
import pytest
import torch

from helpers import assert_close, grads_of
from test_layer_fast_call import CELL_CASES, MODULES, flat, full_path, make, make_case, spy, state  # noqa: F401 (spy: fixture)

from fused_rnn.ops.cpp import cell_ops, ops

_err = ops.load_error() or (None if cell_ops.available() else "fused_rnn._C is not built")
pytestmark = pytest.mark.skipif(_err is not None, reason=str(_err))


def _node_name(output):
    return type(output.grad_fn).__name__


def _call(m, x, hx, fast):
    return m(x, hx) if fast else full_path(m, x, hx)


def _hx(cell, m, B, dtype, requires_grad):
    hx = state(cell, m, B, dtype)
    return tuple(t.requires_grad_(requires_grad) for t in hx) if cell == "lstm" else hx.requires_grad_(requires_grad)


def _leaves(x, hx, m):
    return [x, *(hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()), *m.parameters()]


@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("cell, case", CELL_CASES, ids=str)
def test_same_as_full_path_and_torch_nn(spy, cell, case, hx_given):
    bf, T, B = case[2], case[4], case[5]
    for dtype in (torch.float64, torch.float32):
        ours, theirs = make_case(cell, case, dtype)
        x = torch.randn((B, T, 4) if bf else (T, B, 4), dtype=dtype, requires_grad=True)
        hx = _hx(cell, ours, B, dtype, True) if hx_given else None
        results = []
        for fast in (True, False):
            out = flat(_call(ours, x, hx, fast))
            results.append((out, grads_of(out, _leaves(x, hx, ours))))
        assert spy == {"ran": 1, "refused": 0}, "the eager entry did not run the call"
        (fast_out, fast_grads), (slow_out, slow_grads) = results
        want_out = flat(theirs(x, hx))
        want_grads = grads_of(want_out, _leaves(x, hx, theirs))
        for a, b, w in zip(fast_out, slow_out, want_out):
            assert torch.equal(a, b)
            assert_close(a, w, dtype, f"{cell} {case} {dtype}")
        for i, (a, b, w) in enumerate(zip(fast_grads, slow_grads, want_grads)):
            assert torch.equal(a, b), f"gradient {i}"
            assert_close(a, w, dtype, f"{cell} {case} {dtype} gradient {i}")
        spy["ran"] = 0


@pytest.mark.parametrize("cell", list(MODULES))
def test_the_node_is_the_cpp_one_and_frees_its_tensors(spy, cell):
    ours, _ = make(cell, 4, 5)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    y = ours(x)[0]
    assert _node_name(y) == "CppFunction" and _node_name(full_path(ours, x)[0]) == "_EagerAutogradBackward"
    y.sum().backward()
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        y.sum().backward()
    x.grad = None
    y = ours(x)[0]
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()  # kept by retain_graph: the same gradient again
    assert torch.equal(x.grad, 2 * first)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_partial_requires_grad(spy, cell):
    """Frozen first layer and an input without a gradient: that layer runs without a node (as the full
    path's save=False); the second records one; only what needs a gradient gets one."""
    ours, _ = make(cell, 4, 5, num_layers=2, bidirectional=True)
    for name, p in ours.named_parameters():
        p.requires_grad_(name.endswith("_l1") or name.endswith("_l1_reverse"))
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    hx = _hx(cell, ours, 2, torch.float64, False)
    grads = []
    for fast in (True, False):
        out = flat(_call(ours, x, hx, fast))
        trainable = [p for p in ours.parameters() if p.requires_grad]
        grads.append(grads_of(out, trainable))
    assert spy == {"ran": 1, "refused": 0}
    for a, b in zip(*grads):
        assert a is not None and torch.equal(a, b)
    for p in ours.parameters():
        p.requires_grad_(False)
    x.requires_grad_(True)  # only the input: d x through both layers
    got = [torch.autograd.grad(flat(_call(ours, x, hx, fast))[0].sum(), x)[0] for fast in (True, False)]
    assert torch.equal(*got)


@pytest.mark.parametrize("cell", list(MODULES))
def test_outputs_no_loss_reached(cell):
    """Only h_n (or only c_n, or only output) in the loss: the node's other output gradients arrive
    undefined and count as zeros, as on the full path."""
    ours, _ = make(cell, 4, 5, num_layers=2)
    x = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    for k in range(3 if cell == "lstm" else 2):
        got = []
        for fast in (True, False):
            out = flat(_call(ours, x, None, fast))
            got.append(torch.autograd.grad(out[k].pow(2).sum(), [x, *ours.parameters()]))
        for a, b in zip(*got):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("cell, kw", [("lstm", {}), ("gru", {"bidirectional": True}),
                                      ("rnn_tanh", {}), ("lstm", {"proj_size": 2, "batch_first": True})], ids=str)
def test_gradcheck_and_second_order(spy, cell, kw):
    """float64 gradcheck and gradgradcheck through the module; create_graph=True gradients (the C++
    node hands them to ops.second_order_projected) bitwise the full path's."""
    ours, _ = make(cell, 3, 4, **kw)
    x = torch.randn((2, 3, 3) if kw.get("batch_first") else (3, 2, 3), dtype=torch.float64, requires_grad=True)
    hx = _hx(cell, ours, 2, torch.float64, True)
    names = [n for n, _ in ours.named_parameters()]

    def f(x, *tensors):
        n = 2 if cell == "lstm" else 1
        h = tuple(tensors[:n]) if cell == "lstm" else tensors[0]
        weights = dict(zip(names, tensors[n:]))
        return flat(torch.func.functional_call(ours, weights, (x, h)))

    inputs = (x, *(hx if cell == "lstm" else (hx,)), *ours.parameters())
    torch.autograd.gradcheck(f, inputs)
    torch.autograd.gradgradcheck(f, inputs)
    assert spy["ran"] > 0 and spy["refused"] == 0
    second = []
    for fast in (True, False):
        out = flat(_call(ours, x, hx, fast))
        first = torch.autograd.grad(sum(o.pow(2).sum() for o in out), _leaves(x, hx, ours), create_graph=True)
        second.append(torch.autograd.grad(sum(g.pow(2).sum() for g in first), _leaves(x, hx, ours)))
    for a, b in zip(*second):
        assert torch.equal(a, b)


def test_saved_tensor_hooks_see_what_the_full_path_saves(spy):
    """The node's saved tensors go through torch.autograd.graph.saved_tensors_hooks: the same tensors,
    as many bytes, as the full path's (the training memory the benchmark counts with them)."""
    ours, _ = make("lstm", 4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    counted = []
    for fast in (True, False):
        packed = []

        def pack(t, packed=packed):
            packed.append(t)
            return t.clone()  # what backward reads is the hooks' copy

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = flat(_call(ours, x, None, fast))
        grads = grads_of(out, [x, *ours.parameters()])
        counted.append((sorted(t.numel() * t.element_size() for t in packed), grads))
    assert spy["ran"] == 1
    assert counted[0][0] == counted[1][0]
    for a, b in zip(counted[0][1], counted[1][1]):
        assert torch.equal(a, b)


def test_in_place_update_of_a_saved_tensor_is_caught():
    ours, _ = make("gru", 4, 5)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    for fast in (True, False):
        y = _call(ours, x, None, fast)[0]
        with torch.no_grad():
            ours.weight_hh_l0.mul_(1.0)  # bumps the version the node saved it at
        with pytest.raises(RuntimeError, match="needed for gradient computation has been modified by an inplace"):
            y.sum().backward()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled", "ignore:Error detected in")
def test_anomaly_mode_and_a_nan_gradient():
    ours, _ = make("lstm", 4, 5)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    with torch.autograd.detect_anomaly(check_nan=True):
        y = ours(x)[0]
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
        y = ours(x)[0]
        with pytest.raises(RuntimeError, match="returned nan values"):
            (y * float("nan")).sum().backward()


def test_forward_mode_ad_takes_the_full_path(spy):
    """Dual tensors: the C++ node has no forward derivative, so the module does not call the entry."""
    import torch.autograd.forward_ad as fwad  # noqa: PLC0415

    ours, _ = make("gru", 4, 5)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.randn_like(x))
        with pytest.raises(Exception):  # noqa: B017, PT011 - the full path's own refusal, whatever it is
            ours(dual)
    assert spy == {"ran": 0, "refused": 0}


@pytest.mark.parametrize("cell", list(MODULES))
def test_errors_stay_torch_nn_s_in_training_calls(cell):
    ours, theirs = make(cell, 4, 5)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    bad = [(torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True), None),
           (x, torch.randn(1, 2, 5, dtype=torch.float64)), (x, torch.randn(1, 3, 6, dtype=torch.float64)),
           (x, torch.randn(1, 3, 5)), (x.float(), None)]
    for xi, hi in bad:
        hx = hi if hi is None or cell != "lstm" else (hi, torch.randn(hi.shape, dtype=hi.dtype))
        errors = []
        for m in (ours, theirs):
            with pytest.raises(Exception) as e:  # noqa: PT011 - whatever torch.nn raises, ours must too
                m(xi, hx)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1], (xi.shape, None if hi is None else hi.shape)
