"""RMSNorm forward and backward vs the float64 reference and F.rms_norm, on every CPU kernel set;
eps=None; zero_centered_weight; out=; gradcheck; double backward; partial gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from norm_testing import (
    DTYPE_CASES,
    DTYPE_IDS,
    LOW_PRECISION,
    assert_bitwise_equal,
    check_result,
    dx_tol,
    fwd_tol,
    make_input,
    make_params,
    param_grad_tol,
)
from torch.autograd import gradcheck

import layernorm_ext
from layernorm_ext._reference import rms_norm_backward_ref, rms_norm_ref

ops = torch.ops.layernorm_ext

HIDDEN = [1, 2, 7, 16, 33, 127, 769, 4097]
ROWS = [0, 1, 7, 83]
EPS = [None, 1e-6, 0.5]


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _autograd(fn, x, shape, w, dy, eps, **kwargs):
    xs, ws = _leaf(x), _leaf(w)
    y = fn(xs, shape, ws, eps, **kwargs)
    grads = torch.autograd.grad(y, [t for t in (xs, ws) if t is not None], dy)
    return y.detach(), grads[0], (grads[1] if w is not None else None)


def check_rms(x, shape, w, dy, eps, label, *, zcw=False):
    """Forward and backward vs the fp64 reference (and F.rms_norm for fp16 / bf16)."""
    y, dx, dw = _autograd(layernorm_ext.rms_norm, x, shape, w, dy, eps, zero_centered_weight=zcw)
    # The inference path (no autograd) computes the same bits.
    assert_bitwise_equal(
        layernorm_ext.rms_norm(x, shape, w, eps, zero_centered_weight=zcw), y, f"{label} no-grad y"
    )
    ref_y = rms_norm_ref(x, shape, w, eps, zero_centered_weight=zcw)
    ref_dx, ref_dw = rms_norm_backward_ref(dy, x, shape, w, eps, zero_centered_weight=zcw)
    base = (None, None, None)
    if not zcw:
        base = _autograd(F.rms_norm, x, tuple(shape), w, dy, eps)
    low = x.dtype in LOW_PRECISION
    rows = int(torch.Size(x.shape[: x.dim() - len(shape)]).numel())
    check_result(y, ref_y, fwd_tol(x.dtype), f"{label} y", base[0] if low else None, x.dtype)
    check_result(dx, ref_dx, dx_tol(x.dtype), f"{label} dx", base[1] if low else None, x.dtype)
    if w is not None:
        assert dw.shape == w.shape
        check_result(dw, ref_dw, param_grad_tol(w.dtype, rows), f"{label} dw", base[2], w.dtype)
    if not low and base[0] is not None:
        # fp32 / fp64: also close to PyTorch's own kernel.
        tol = fwd_tol(x.dtype)
        torch.testing.assert_close(y, base[0], atol=tol[0] * 2, rtol=tol[1] * 2, msg=label)


@pytest.mark.parametrize("N", HIDDEN)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_rms_grid(isa, case, N, gen):
    for i, M in enumerate(ROWS):
        x = make_input((M, N), case.x, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        for has_w in (False, True):
            w, _ = make_params((N,), case.param, has_w, False, generator=gen)
            # Each eps meets both weight settings across the row counts.
            eps = EPS[(i + has_w) % len(EPS)]
            label = f"[{isa} {case.id} M={M} N={N} w={has_w} eps={eps}]"
            check_rms(x, (N,), w, dy, eps, label)


@pytest.mark.parametrize("shape", [(6, 129), (8, 16), (11, 3), (1, 1)], ids=str)
def test_rms_multi_dim_and_strided(isa, shape, gen):
    A, B = shape
    for case in DTYPE_CASES:
        for M in (0, 3, 21):
            x = make_input((M, A, B), case.x, normalized_ndim=2, generator=gen)
            dy = torch.randn(M, A, B, generator=gen).to(case.x)
            w, _ = make_params((A, B), case.param, True, False, generator=gen)
            check_rms(x, (A, B), w, dy, None, f"[{isa} {case.id} M={M} {A}x{B}]")
        # Strided x and non-contiguous grad_out.
        base = make_input((6, A, 2 * B), case.x, normalized_ndim=2, generator=gen)
        x = base[..., :B] if B > 1 else base[..., :1]
        dy = torch.randn(6, B, A, generator=gen).to(case.x).transpose(1, 2)
        w, _ = make_params((A, B), case.param, True, False, generator=gen)
        check_rms(x, (A, B), w, dy, 1e-5, f"[{isa} {case.id} strided {A}x{B}]")
        got = _autograd(layernorm_ext.rms_norm, x, (A, B), w, dy, 1e-5)
        expected = _autograd(
            layernorm_ext.rms_norm, x.contiguous(), (A, B), w, dy.contiguous(), 1e-5
        )
        for name, g, e in zip(("y", "dx", "dw"), got, expected, strict=True):
            assert_bitwise_equal(g, e, f"[{isa} {case.id} strided {A}x{B}] {name}")


@pytest.mark.parametrize("N", [1, 17, 769])
def test_rms_zero_centered_weight(isa, N, gen):
    for case in DTYPE_CASES:
        x = make_input((9, N), case.x, generator=gen)
        dy = torch.randn(9, N, generator=gen).to(case.x)
        w, _ = make_params((N,), case.param, True, False, generator=gen)
        w = (w - 1).to(case.param)
        label = f"[{isa} {case.id} N={N} zcw]"
        check_rms(x, (N,), w, dy, 1e-6, label, zcw=True)
        if case.param in (torch.float32, torch.float64):
            assert_bitwise_equal(
                layernorm_ext.rms_norm(x, N, w, 1e-6, zero_centered_weight=True),
                layernorm_ext.rms_norm(x, N, 1 + w, 1e-6),
                f"{label} vs explicit 1 + w",
            )


def test_rms_out(isa, gen):
    for case in DTYPE_CASES:
        x = make_input((7, 40), case.x, generator=gen)
        w, _ = make_params((40,), case.param, True, False, generator=gen)
        expected = layernorm_ext.rms_norm(x, 40, w)
        with pytest.raises(RuntimeError, match=r"layernorm_ext::rms_norm: expected out to have"):
            layernorm_ext.rms_norm(x, 40, w, out=torch.empty(0, dtype=case.x))
        for out in (
            torch.empty(7, 40, dtype=case.x),
            torch.empty(7, 50, dtype=case.x)[:, 5:45],
            torch.empty(40, 7, dtype=case.x).t(),
        ):
            res = layernorm_ext.rms_norm(x, 40, w, out=out)
            assert res.data_ptr() == out.data_ptr()
            assert_bitwise_equal(out.contiguous(), expected, f"[{isa} {case.id}] rms out=")


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_rms_constant_and_hidden_one(isa, case, gen):
    """N == 1: y = sign(x)·|x|/sqrt(x² + eps)·w and dx, dw finite; constant rows: ±w (up to eps)."""
    x = torch.tensor([[-0.8], [3.0], [0.0], [1234.0]]).to(case.x)
    w, _ = make_params((1,), case.param, True, False, generator=gen)
    dy = torch.randn(4, 1, generator=gen).to(case.x)
    check_rms(x, (1,), w, dy, 1e-6, f"[{isa} {case.id} N=1]")
    c = torch.full((3, 65), 14.0).to(case.x)
    check_rms(c, (65,), None, torch.randn(3, 65, generator=gen).to(case.x), 1e-6, "const")


@pytest.mark.parametrize("N", [1, 2, 5, 8])
def test_rms_gradcheck(isa, N):
    for M in (0, 1, 3):
        for eps in (1e-5, 0.5, None):
            for has_w in (False, True):
                for zcw in (False, True) if has_w else (False,):
                    x = torch.randn(M, N, dtype=torch.float64, requires_grad=True)
                    inputs = (x,)
                    if has_w:
                        inputs += (torch.randn(N, dtype=torch.float64, requires_grad=True),)

                    def fn(x, *w, eps=eps, zcw=zcw):
                        return layernorm_ext.rms_norm(
                            x, N, w[0] if w else None, eps, zero_centered_weight=zcw
                        )

                    assert gradcheck(
                        fn,
                        inputs,
                        nondet_tol=0.0,
                        check_undefined_grad=True,
                        check_batched_grad=True,
                    ), f"rms gradcheck M={M} N={N} eps={eps} w={has_w} zcw={zcw}"


def test_rms_double_backward_raises():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layernorm_ext.rms_norm(x, 8, w).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"layernorm_ext::rms_norm_bwd is not implemented"):
        gx.sum().backward()


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_rms_partial_gradients(isa, case, gen):
    M, N = 11, 50
    x = make_input((M, N), case.x, generator=gen)
    w, _ = make_params((N,), case.param, True, False, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(case.x)
    _, fdx, fdw = _autograd(layernorm_ext.rms_norm, x, (N,), w, dy, None)
    # Weight frozen.
    xs = _leaf(x)
    layernorm_ext.rms_norm(xs, N, w).backward(dy)
    assert_bitwise_equal(xs.grad, fdx, f"[{isa} {case.id}] dx with frozen weight")
    # Input without grad.
    ws = _leaf(w)
    layernorm_ext.rms_norm(x, N, ws).backward(dy)
    assert_bitwise_equal(ws.grad, fdw, f"[{isa} {case.id}] dw with input not requiring grad")
    # The bwd op's output_mask.
    _, rstd = ops.rms_norm_fwd(x, [N], w)
    full = ops.rms_norm_bwd(dy, x, [N], rstd, w, False, [True, True])
    for mask in ([True, False], [False, True], [False, False]):
        got = ops.rms_norm_bwd(dy, x, [N], rstd, w, False, mask)
        for name, g, f, m in zip(("dx", "dw"), got, full, mask, strict=True):
            if m:
                assert_bitwise_equal(g, f, f"[{isa} {case.id} mask={mask}] {name}")
            else:
                assert g.dim() == 1 and g.numel() == 0, f"mask={mask} {name} not empty"
