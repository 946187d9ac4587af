"""The per-call machinery around the kernels: the C++ autograd node (csrc/autograd.cpp) and the
eager fast entries of the functional API and modules (csrc/python_entry.cpp).

* The node: partial gradients through ``torch.autograd.grad``, forward-mode AD refused clearly
  (never a silently missing tangent), ``torch.func.grad`` and compiled autograd agree with eager.
* The fast entries: whatever they do not parse themselves (Tensor subclasses, torch-function
  modes, unusual argument types) reaches the OpOverload with the same arguments.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import layernorm_ext as L

N = 8


def _leaves(requires=(True, True, True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, N), (3, N), (N,), (N,)]
    return [
        torch.randn(s, dtype=torch.float64, generator=g).requires_grad_(r)
        for s, r in zip(shapes, requires, strict=True)
    ]


def _call(op, x, r, w, b):
    """A scalar loss through `op` (fused ops: both outputs used)."""
    if op == "ln":
        return L.layer_norm(x, N, w, b, 0.1).pow(2).sum()
    if op == "rms":
        return L.rms_norm(x, N, w, 0.1).pow(2).sum()
    if op == "add_ln":
        out, res = L.add_layer_norm(x, r, N, w, b, 0.1)
    else:
        out, res = L.add_rms_norm(x, r, N, w, 0.1)
    return (out.pow(2) + res.sin()).sum()


def _reference(op, x, r, w, b):
    if op.startswith("add"):
        s = x + r
        out = F.layer_norm(s, (N,), w, b, 0.1) if op == "add_ln" else F.rms_norm(s, (N,), w, 0.1)
        return (out.pow(2) + s.sin()).sum()
    fn = (
        (lambda x: F.layer_norm(x, (N,), w, b, 0.1))
        if op == "ln"
        else (lambda x: F.rms_norm(x, (N,), w, 0.1))
    )
    return fn(x).pow(2).sum()


OPS = ["ln", "rms", "add_ln", "add_rms"]


def _used(op, leaves):
    """The leaves `op` takes (rms: no bias; unfused: no residual)."""
    x, r, w, b = leaves
    return [x] + ([r] if op.startswith("add") else []) + [w] + ([b] if "ln" in op else [])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("wrt", [0, 1, -1], ids=["first", "second", "last"])
def test_autograd_grad_subset(op, wrt):
    """torch.autograd.grad for one input only (the engine prunes the other edges)."""
    leaves = _leaves()
    target = _used(op, leaves)[wrt]
    (got,) = torch.autograd.grad(_call(op, *leaves), target)
    (ref,) = torch.autograd.grad(_reference(op, *leaves), target)
    torch.testing.assert_close(got, ref)
    assert all(t.grad is None for t in leaves)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_mode_ad_raises(op, grad_mode):
    x, r, w, b = _leaves((False, False, grad_mode, grad_mode))
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode automatic differentiation"):
            _call(op, dual, r, w, b)


@pytest.mark.parametrize("op", ["ln", "rms"])
def test_func_grad_matches_torch(op):
    x, _, w, b = _leaves((False, False, False, False))
    got = torch.func.grad(lambda x: _call(op, x, None, w, b))(x)
    ref = torch.func.grad(lambda x: _reference(op, x, None, w, b))(x)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "requires",
    [(True, True, True, True), (False, True, True, False), (True, False, False, True)],
    ids=["all", "residual_weight", "input_bias"],
)
def test_compiled_autograd_matches_eager(op, requires):
    import torch._dynamo.compiled_autograd as ca

    grads = []
    for compiled in (False, True):
        leaves = _leaves(requires)
        if compiled:
            torch._dynamo.reset()
            with ca._enable(torch.compile(backend="eager")):
                _call(op, *leaves).backward()
        else:
            _call(op, *leaves).backward()
        grads.append([t.grad for t in _used(op, leaves)])
    for eager, comp in zip(*grads, strict=True):
        assert (eager is None) == (comp is None)
        if eager is not None:
            torch.testing.assert_close(comp, eager)


def test_node_names():
    x, r, w, b = _leaves()
    assert L.layer_norm(x, N, w, b).grad_fn.name() == "layernorm_ext::LayerNormBackward"
    assert L.rms_norm(x, N, w).grad_fn.name() == "layernorm_ext::RMSNormBackward"
    out, res = L.add_layer_norm(x, r, N, w, b)
    assert out.grad_fn is res.grad_fn
    assert out.grad_fn.name() == "layernorm_ext::AddLayerNormBackward"
    assert L.add_rms_norm(x, r, N, w)[0].grad_fn.name() == "layernorm_ext::AddRMSNormBackward"


# --- the eager fast entries ------------------------------------------------------------------


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("op", ["ln", "rms"])
def test_torch_function_mode_sees_the_op(api, op):
    x = torch.randn(2, N)
    if api == "module":
        m = L.LayerNorm(N) if op == "ln" else L.RMSNorm(N)
        call = lambda: m(x)  # noqa: E731
    else:
        call = (lambda: L.layer_norm(x, N)) if op == "ln" else (lambda: L.rms_norm(x, N))
    expected = call()
    with _Recorder() as rec:
        got = call()
    assert any(f"layernorm_ext.{'layer_norm' if op == 'ln' else 'rms_norm'}" in s for s in rec.seen)
    torch.testing.assert_close(got, expected)


class _Logged(torch.Tensor):
    calls: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("which", ["input", "weight"])
def test_tensor_subclass_torch_function_is_honoured(which):
    x, w = torch.randn(2, N), torch.randn(N)
    if which == "input":
        x = x.as_subclass(_Logged)
    else:
        w = w.as_subclass(_Logged)
    _Logged.calls.clear()
    y = L.layer_norm(x, N, w)
    assert any("layernorm_ext.layer_norm" in s for s in _Logged.calls)
    assert type(y) is _Logged
    _Logged.calls.clear()
    L.rms_norm(x, N, w)
    assert any("layernorm_ext.rms_norm" in s for s in _Logged.calls)


def test_argument_forms_match_the_op():
    """Shapes as int / tuple / list / torch.Size, int eps, truthy zero_centered_weight: the
    fast entry or its fallback, same results as the OpOverload."""
    x, w, b = torch.randn(3, N), torch.randn(N), torch.randn(N)
    ln = torch.ops.layernorm_ext.layer_norm.default
    rms = torch.ops.layernorm_ext.rms_norm.default
    ref = ln(x, [N], w, b, 1.0, zero_centered_weight=True)
    for shape in (N, (N,), [N], torch.Size([N])):
        for eps in (1, 1.0):
            for zc in (True, 1):
                torch.testing.assert_close(
                    L.layer_norm(x, shape, w, b, eps, zero_centered_weight=zc), ref, rtol=0, atol=0
                )
    ref = rms(x, [N], w, None)
    for eps in (None,):
        torch.testing.assert_close(L.rms_norm(x, [N], w, eps), ref, rtol=0, atol=0)
    torch.testing.assert_close(L.rms_norm(x, N, w, 2), rms(x, [N], w, 2.0), rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, match",
    [
        (([7],), r"expected input with shape \[\*, 7\]"),
        (([-1],), r"expected input with shape"),
        (((2**70,),), r"normalized_shape"),
        ((N, "w"), r"weight"),
    ],
)
def test_bad_arguments_raise_the_ops_errors(args, match):
    x = torch.randn(3, N)
    with pytest.raises(RuntimeError, match=match):
        L.layer_norm(x, *args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.layernorm_ext.layer_norm.default(x, *args)


# --- the fast entries' out= and fused forms ----------------------------------------------------


def _fused_ops():
    ext = torch.ops.layernorm_ext
    return {
        "ln": (L.add_layer_norm, ext.add_layer_norm.default, ext.add_layer_norm_inplace.default),
        "rms": (L.add_rms_norm, ext.add_rms_norm.default, ext.add_rms_norm_inplace.default),
    }


@pytest.mark.parametrize("op", ["ln", "rms"])
def test_out_form_writes_returns_and_bumps_the_version(op):
    x, w = torch.randn(3, N), torch.randn(N)
    out = torch.empty(3, N)
    version = out._version
    if op == "ln":
        got = L.layer_norm(x, N, w, None, 1e-5, out=out)
        ref = torch.ops.layernorm_ext.layer_norm.default(x, [N], w, None, 1e-5)
    else:
        got = L.rms_norm(x, N, w, None, out=out)
        ref = torch.ops.layernorm_ext.rms_norm.default(x, [N], w, None)
    assert got is out
    assert out._version > version
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["ln", "rms"])
def test_fused_entries_match_the_ops(op):
    fn, plain, inplace = _fused_ops()[op]
    x, r, w = torch.randn(3, N), torch.randn(3, N), torch.randn(N)
    args = (w, None, 1e-5) if op == "ln" else (w, None)
    out, res = fn(x, r, N, *args)
    ref_out, ref_res = plain(x, r, [N], *args)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
    # In place: residual updated, the norm into out (here the input itself), both returned.
    r2, x2 = r.clone(), x.clone()
    version = r2._version
    got_out, got_res = fn(x2, r2, N, *args, inplace=True, out=x2)
    assert got_out is x2 and got_res is r2
    assert r2._version > version
    torch.testing.assert_close(r2, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(x2, ref_out, rtol=0, atol=0)
    r3, o3 = r.clone(), torch.empty(3, N)
    inplace(x, r3, [N], *args, out=o3)
    torch.testing.assert_close(o3, ref_out, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["ln", "rms"])
@pytest.mark.parametrize("form", ["out", "fused", "fused_inplace"])
def test_new_forms_honour_torch_function(op, form):
    """Subclass inputs and torch-function modes see the op (the entries fall back to it)."""
    x, r, w = torch.randn(2, N), torch.randn(2, N), torch.randn(N)
    name = {"ln": "layer_norm", "rms": "rms_norm"}[op]

    def call(x):
        if form == "out":
            out = torch.empty(2, N)
            return (L.layer_norm if op == "ln" else L.rms_norm)(x, N, w, out=out)
        fn = _fused_ops()[op][0]
        if form == "fused":
            return fn(x, r.clone(), N, w)[0]
        return fn(x, r.clone(), N, w, inplace=True)[0]

    expected = call(x)
    with _Recorder() as rec:
        got = call(x)
    assert any(name in s for s in rec.seen), rec.seen
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    _Logged.calls.clear()
    got = call(x.as_subclass(_Logged))
    assert any(name in s for s in _Logged.calls), _Logged.calls
    torch.testing.assert_close(torch.Tensor(got), expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["ln", "rms"])
def test_fused_argument_forms_and_errors(op):
    fn, plain, _ = _fused_ops()[op]
    x, r, w = torch.randn(3, N), torch.randn(3, N), torch.randn(N)
    eps_args = (w, None, 1) if op == "ln" else (w, 1)
    ref = plain(x, r, [N], *(w, None, 1.0) if op == "ln" else (w, 1.0))
    for shape in (N, (N,), [N], torch.Size([N])):
        got = fn(x, r, shape, *eps_args, zero_centered_weight=0)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 7\]"):
        fn(x, r, [7])
    with pytest.raises(RuntimeError, match="residual"):
        fn(x, torch.randn(2, N), N)
    with pytest.raises(RuntimeError, match="out"):
        fn(x, r.clone(), N, inplace=True, out=torch.empty(2, N))


@pytest.mark.parametrize("form", ["ln_out", "rms_out", "add_ln_inplace", "add_rms_inplace"])
def test_writing_forms_refuse_arguments_that_require_grad(form):
    x, r = torch.randn(2, N), torch.randn(2, N)
    w = torch.randn(N, requires_grad=True)
    out = torch.empty(2, N)
    calls = {
        "ln_out": lambda: L.layer_norm(x, N, w, out=out),
        "rms_out": lambda: L.rms_norm(x, N, w, out=out),
        "add_ln_inplace": lambda: L.add_layer_norm(x, r, N, w, inplace=True, out=out),
        "add_rms_inplace": lambda: L.add_rms_norm(x, r, N, w, inplace=True, out=out),
    }
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        calls[form]()
    with torch.no_grad():
        calls[form]()  # fine without grad mode
    assert torch.isfinite(out).all()
