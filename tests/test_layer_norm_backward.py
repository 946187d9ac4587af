"""LayerNorm backward: dx, dγ, dβ vs the float64 reference on every CPU kernel set; gradcheck;
double backward; partial gradients (output_mask); the nn.Module; multi-dim normalized_shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from norm_testing import (
    AFFINE,
    AFFINE_IDS,
    DTYPE_CASES,
    DTYPE_IDS,
    LOW_PRECISION,
    affine_name,
    assert_bitwise_equal,
    check_result,
    dx_tol,
    make_input,
    make_params,
    param_grad_tol,
)
from torch.autograd import gradcheck

import layernorm_ext
from layernorm_ext._reference import layer_norm_backward_ref

ops = torch.ops.layernorm_ext


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _autograd(fn, x, shape, w, b, dy, eps=1e-5, **kwargs):
    """(dx, dw, db) of fn through autograd; None for an absent parameter."""
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    y = fn(xs, shape, ws, bs, eps, **kwargs)
    inputs = [t for t in (xs, ws, bs) if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, dy))
    return tuple(None if t is None else next(grads) for t in (xs, ws, bs))


def check_backward(x, shape, w, b, dy, label, eps=1e-5, *, zcw=False):
    """Our gradients vs the fp64 reference (and vs PyTorch's, for fp16 / bf16 tensors)."""
    got = _autograd(layernorm_ext.layer_norm, x, shape, w, b, dy, eps, zero_centered_weight=zcw)
    ref = layer_norm_backward_ref(dy, x, shape, w, b, eps, zero_centered_weight=zcw)
    base = (None, None, None)
    if x.dtype in LOW_PRECISION and not zcw:
        if w is None and b is not None and b.dtype != x.dtype:
            # torch 2.14 CPU cannot backprop (fp16/bf16 x, fp32 bias, no weight): "expected
            # scalar type BFloat16 but found Float". dx does not depend on β, and the fp32 dβ
            # gets no 2× rule, so the baseline runs without the bias.
            base = (_autograd(F.layer_norm, x, tuple(shape), None, None, dy, eps)[0], None, None)
        else:
            base = _autograd(F.layer_norm, x, tuple(shape), w, b, dy, eps)
    rows = int(torch.Size(x.shape[: x.dim() - len(shape)]).numel())
    check_result(got[0], ref[0], dx_tol(x.dtype), f"{label} dx", base[0], x.dtype)
    for name, g, r, p, bb in (
        ("dw", got[1], ref[1], w, base[1]),
        ("db", got[2], ref[2], b, base[2]),
    ):
        if p is None:
            continue
        assert g.shape == p.shape, f"{label} {name}: shape {tuple(g.shape)} != {tuple(p.shape)}"
        check_result(g, r, param_grad_tol(p.dtype, rows), f"{label} {name}", bb, p.dtype)
    return got


BWD_HIDDEN = [1, 3, 8, 17, 64, 127, 769, 1024]
BWD_ROWS = [0, 1, 7, 83]


@pytest.mark.parametrize("N", BWD_HIDDEN)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_backward_grid(isa, case, N, gen):
    rows = BWD_ROWS + ([4096] if N == 64 else [])
    for M in rows:
        x = make_input((M, N), case.x, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        for has_w, has_b in AFFINE if M < 4096 else [(True, True)]:
            w, b = make_params((N,), case.param, has_w, has_b, generator=gen)
            label = f"[{isa} {case.id} M={M} N={N} {affine_name(has_w, has_b)}]"
            check_backward(x, (N,), w, b, dy, label)


def test_backward_many_rows_fp32(isa, gen):
    """Beyond 64K rows the fp32 dγ / dβ tolerance widens (reliability.md §2)."""
    M, N = 70001, 16
    x = make_input((M, N), torch.float32, generator=gen)
    dy = torch.randn(M, N, generator=gen)
    w, b = make_params((N,), torch.float32, True, True, generator=gen)
    check_backward(x, (N,), w, b, dy, f"[{isa} M={M} N={N}]")


MULTI_DIM = [(6, 129), (8, 16), (11, 3), (1, 1)]


@pytest.mark.parametrize("shape", MULTI_DIM, ids=[f"{a}x{b}" for a, b in MULTI_DIM])
def test_backward_multi_dim(isa, shape, gen):
    A, B = shape
    for case in DTYPE_CASES:
        for M in (0, 3, 37):
            x = make_input((M, A, B), case.x, normalized_ndim=2, generator=gen)
            dy = torch.randn(M, A, B, generator=gen).to(case.x)
            for has_w, has_b in AFFINE:
                w, b = make_params((A, B), case.param, has_w, has_b, generator=gen)
                label = f"[{isa} {case.id} M={M} {A}x{B} {affine_name(has_w, has_b)}]"
                dx, dw, db = check_backward(x, (A, B), w, b, dy, label)
                assert dx.shape == x.shape
                if has_w:
                    assert dw.shape == (A, B), f"{label}: dγ shape {tuple(dw.shape)}"
                if has_b:
                    assert db.shape == (A, B), f"{label}: dβ shape {tuple(db.shape)}"


def test_backward_leading_dims_and_1d(isa, gen):
    for case in DTYPE_CASES:
        x = make_input((2, 3, 4, 9), case.x, generator=gen)
        dy = torch.randn(2, 3, 4, 9, generator=gen).to(case.x)
        w, b = make_params((9,), case.param, True, True, generator=gen)
        check_backward(x, (9,), w, b, dy, f"[{isa} {case.id} 4-D over last dim]")
        v = make_input((33,), case.x, generator=gen)
        dv = torch.randn(33, generator=gen).to(case.x)
        w, b = make_params((33,), case.param, True, True, generator=gen)
        check_backward(v, (33,), w, b, dv, f"[{isa} {case.id} 1-D]")


@pytest.mark.parametrize("N", [1, 7, 64, 769])
def test_backward_strided(isa, N, gen):
    """Strided x and non-contiguous grad_out give the contiguous run's gradients, bitwise."""
    M = 10
    for case in DTYPE_CASES:
        w, b = make_params((N,), case.param, True, True, generator=gen)
        wide = make_input((M, N + 5), case.x, generator=gen)
        tall = make_input((N, M), case.x, generator=gen)
        dwide = torch.randn(M, N + 3, generator=gen).to(case.x)
        dtall = torch.randn(N, M, generator=gen).to(case.x)
        drow = torch.randn(1, N, generator=gen).to(case.x)
        xs = [("x[:, :N]", wide[:, :N]), ("x transposed", tall.t())]
        dys = [
            ("dy[:, 3:]", dwide[:, 3:]),
            ("dy transposed", dtall.t()),
            ("dy expanded row", drow.expand(M, N)),
            ("dy expanded scalar", torch.ones((), dtype=case.x).expand(M, N)),
        ]
        for xname, x in xs:
            for dyname, dy in dys:
                label = f"[{isa} {case.id} N={N} {xname}, {dyname}]"
                got = check_backward(x, (N,), w, b, dy, label)
                expected = _autograd(
                    layernorm_ext.layer_norm, x.contiguous(), (N,), w, b, dy.contiguous()
                )
                for name, g, e in zip(("dx", "dw", "db"), got, expected, strict=True):
                    assert_bitwise_equal(g, e, f"{label} {name} vs contiguous run")


def test_backward_through_sum(isa, gen):
    """y.sum().backward() feeds an expanded (stride-0) grad_out."""
    for case in DTYPE_CASES:
        x = _leaf(make_input((5, 40), case.x, generator=gen))
        w, b = (_leaf(t) for t in make_params((40,), case.param, True, True, generator=gen))
        layernorm_ext.layer_norm(x, 40, w, b).sum().backward()
        ref = layer_norm_backward_ref(torch.ones(5, 40), x, 40, w, b)
        label = f"[{isa} {case.id} sum()]"
        check_result(x.grad, ref[0], dx_tol(case.x), f"{label} dx", expected_dtype=case.x)
        check_result(w.grad, ref[1], param_grad_tol(case.param, 5), f"{label} dw")
        check_result(b.grad, ref[2], param_grad_tol(case.param, 5), f"{label} db")


@pytest.mark.parametrize("N", [1, 17, 769])
def test_backward_zero_centered_weight(isa, N, gen):
    for case in DTYPE_CASES:
        x = make_input((9, N), case.x, generator=gen)
        dy = torch.randn(9, N, generator=gen).to(case.x)
        for has_b in (False, True):
            w, b = make_params((N,), case.param, True, has_b, generator=gen)
            w = (w - 1).to(case.param)
            check_backward(x, (N,), w, b, dy, f"[{isa} {case.id} N={N} zcw]", zcw=True)


# --- gradcheck ------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("N", [1, 2, 5, 8])
def test_gradcheck(isa, N, affine):
    has_w, has_b = affine
    for M in (0, 1, 3):
        for eps in (1e-5, 0.5):
            for zcw in (False, True) if has_w else (False,):
                x = torch.randn(M, N, dtype=torch.float64, requires_grad=True)
                w, b = make_params((N,), torch.float64, has_w, has_b)
                w, b = _leaf(w), _leaf(b)
                params = [t for t in (w, b) if t is not None]

                def fn(x, *p, eps=eps, zcw=zcw):
                    it = iter(p)
                    ww = next(it) if has_w else None
                    bb = next(it) if has_b else None
                    return layernorm_ext.layer_norm(x, N, ww, bb, eps, zero_centered_weight=zcw)

                assert gradcheck(
                    fn,
                    (x, *params),
                    eps=1e-6,
                    atol=1e-7,
                    rtol=1e-5,
                    nondet_tol=0.0,
                    check_undefined_grad=True,
                    check_batched_grad=True,
                ), f"gradcheck M={M} N={N} eps={eps} zcw={zcw}"


def test_gradcheck_multi_dim(isa):
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(
        lambda x, w, b: layernorm_ext.layer_norm(x, (2, 4), w, b, 0.1),
        (x, w, b),
        nondet_tol=0.0,
        check_undefined_grad=True,
    )


def test_double_backward_raises():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    y = layernorm_ext.layer_norm(x, 8, w, b)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"layernorm_ext::layer_norm_bwd is not implemented"):
        gx.sum().backward()
    with pytest.raises(RuntimeError, match=r"layernorm_ext::layer_norm_bwd is not implemented"):
        torch.autograd.gradgradcheck(lambda x: layernorm_ext.layer_norm(x, 8, w, b), (x,))


# --- partial gradients (output_mask) --------------------------------------------------------------


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_partial_gradients(isa, case, gen):
    M, N = 13, 70
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(case.x)
    full = _autograd(layernorm_ext.layer_norm, x, (N,), w, b, dy)
    check_backward(x, (N,), w, b, dy, f"[{isa} {case.id} full]")
    for mask in [(1, 0, 1), (0, 1, 1), (0, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 0)]:
        tensors = [
            t.detach().clone().requires_grad_(bool(r)) for t, r in zip((x, w, b), mask, strict=True)
        ]
        y = layernorm_ext.layer_norm(tensors[0], N, tensors[1], tensors[2])
        y.backward(dy)
        for name, t, r, f in zip(("dx", "dw", "db"), tensors, mask, full, strict=True):
            label = f"[{isa} {case.id} requires_grad={mask}] {name}"
            if r:
                assert_bitwise_equal(t.grad, f, label)
            else:
                assert t.grad is None, f"{label}: gradient computed for a tensor without grad"


def test_no_grad_needed_takes_inference_path():
    x = torch.randn(4, 8)
    w = torch.randn(8, requires_grad=True)
    with torch.no_grad():
        y = layernorm_ext.layer_norm(x, 8, w)
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode():
        y = layernorm_ext.layer_norm(x, 8, w)
    assert y.is_inference()
    y = layernorm_ext.layer_norm(x, 8, w.detach())
    assert y.grad_fn is None
    y = layernorm_ext.layer_norm(x, 8, w)
    assert y.grad_fn is not None


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_bwd_op_output_mask(isa, case, gen):
    M, N = 6, 33
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(case.x)
    _, mean, rstd = ops.layer_norm_fwd(x, [N], w, b)
    full = ops.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, False, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False] * 3):
        got = ops.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, False, mask)
        for name, g, f, m in zip(("dx", "dw", "db"), got, full, mask, strict=True):
            label = f"[{isa} {case.id} mask={mask}] {name}"
            if m:
                assert_bitwise_equal(g, f, label)
            else:
                assert g.dim() == 1 and g.numel() == 0, f"{label}: expected an empty 1-D tensor"
    # Absent parameters give empty gradients even when requested.
    got = ops.layer_norm_bwd(dy, x, [N], mean, rstd, None, None, False, [True, True, True])
    assert got[1].numel() == 0 and got[2].numel() == 0
    ref = layer_norm_backward_ref(dy, x, N)
    check_result(got[0], ref[0], dx_tol(case.x), f"[{isa} {case.id}] dx without affine")


# --- nn.Module ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DTYPE_CASES[:4], ids=DTYPE_IDS[:4])
def test_module_backward_matches_torch_module(isa, case, gen):
    shape = (3, 10)
    ours = layernorm_ext.LayerNorm(shape, dtype=case.x)
    theirs = torch.nn.LayerNorm(shape, dtype=case.x)
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.copy_(torch.randn(shape, generator=gen))
    theirs.load_state_dict(ours.state_dict())
    x = make_input((4, 3, 10), case.x, normalized_ndim=2, generator=gen)
    dy = torch.randn(4, 3, 10, generator=gen).to(case.x)
    xo, xt = _leaf(x), _leaf(x)
    ours(xo).backward(dy)
    theirs(xt).backward(dy)
    ref = layer_norm_backward_ref(dy, x, shape, ours.weight, ours.bias)
    label = f"[{isa} {case.id} module]"
    check_result(xo.grad, ref[0], dx_tol(case.x), f"{label} dx", xt.grad, case.x)
    check_result(
        ours.weight.grad,
        ref[1],
        param_grad_tol(case.x, 4),
        f"{label} dw",
        theirs.weight.grad,
        case.x,
    )
    check_result(
        ours.bias.grad, ref[2], param_grad_tol(case.x, 4), f"{label} db", theirs.bias.grad, case.x
    )
    assert ours.weight.grad.shape == shape and ours.bias.grad.shape == shape
