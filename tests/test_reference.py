"""Checks of the oracle itself (layernorm_ext._reference): the tests are only as good as it is."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from layernorm_ext._reference import (
    exact_row_moments,
    layer_norm_backward_ref,
    layer_norm_ref,
    rms_norm_backward_ref,
    rms_norm_eps,
    rms_norm_ref,
)


def _exact_layer_norm_row(row: list[float], eps: float) -> list[float]:
    """LayerNorm of one row from exact rational moments; one rounding in the sqrt / divide."""
    mean, var = exact_row_moments(row)
    denom = math.sqrt(float(var + Fraction(eps)))
    return [float(Fraction(v) - mean) / denom for v in row]


# Rows whose naive E[x²] − E[x]² statistics are wrong (reliability.md §3, cancellation class).
ADVERSARIAL_ROWS = {
    "randn+2000": (torch.randn(8, generator=torch.Generator().manual_seed(1)) + 2000).tolist(),
    "40000..40003": [40000.0, 40001.0, 40002.0, 40003.0],
    "1449+-1": [1449.0 + (1 if i % 2 else -1) for i in range(16)],
    "1e4+i*1e-3": [1e4 + i * 1e-3 for i in range(64)],
    "mean1e6_spread": [1e6 + (i % 7) * 0.25 for i in range(33)],
    "constant1234": [1234.0] * 64,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL_ROWS))
def test_reference_matches_exact_moments(name):
    row = ADVERSARIAL_ROWS[name]
    eps = 1e-5
    ref = layer_norm_ref(torch.tensor([row], dtype=torch.float64), len(row), eps=eps)[0]
    exact = torch.tensor(_exact_layer_norm_row(row, eps), dtype=torch.float64)
    # Two-pass in fp64 on rows of mean ≤ 1e6 loses at most ~1e-16·κ relative.
    torch.testing.assert_close(ref, exact, atol=1e-9, rtol=1e-9, msg=name)


def test_exact_row_moments_are_exact():
    mean, var = exact_row_moments([1.0, 2.0, 3.0, 4.0])
    assert mean == Fraction(5, 2)
    assert var == Fraction(5, 4)
    with pytest.raises(ValueError):
        exact_row_moments([])


@pytest.mark.parametrize("shape,normalized", [((7, 33), (33,)), ((3, 4, 5), (4, 5)), ((6,), (6,))])
def test_reference_matches_torch_fp64(shape, normalized):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    w = torch.randn(normalized, dtype=torch.float64)
    b = torch.randn(normalized, dtype=torch.float64)
    for ww, bb in [(None, None), (w, None), (None, b), (w, b)]:
        for eps in (1e-5, 0.5):
            expected = F.layer_norm(x, normalized, ww, bb, eps)
            torch.testing.assert_close(
                layer_norm_ref(x, normalized, ww, bb, eps), expected, atol=1e-13, rtol=1e-13
            )
    torch.testing.assert_close(
        rms_norm_ref(x, normalized, w, 1e-6),
        F.rms_norm(x, normalized, w, 1e-6),
        atol=1e-13,
        rtol=1e-13,
    )


def test_reference_upcasts_exact_low_precision_values():
    x = torch.randn(4, 16).to(torch.bfloat16)
    torch.testing.assert_close(
        layer_norm_ref(x, 16), layer_norm_ref(x.double(), 16), atol=0, rtol=0
    )
    assert layer_norm_ref(x, 16).dtype == torch.float64


def test_reference_zero_centered_weight():
    x = torch.randn(5, 9, dtype=torch.float64)
    w = torch.randn(9, dtype=torch.float64)
    b = torch.randn(9, dtype=torch.float64)
    torch.testing.assert_close(
        layer_norm_ref(x, 9, w, b, zero_centered_weight=True), layer_norm_ref(x, 9, 1 + w, b)
    )
    torch.testing.assert_close(
        rms_norm_ref(x, 9, w, zero_centered_weight=True), rms_norm_ref(x, 9, 1 + w)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rms_eps_none_matches_torch(dtype):
    # Small values make the result depend on eps: mean(x²) ≈ 1e-8, between fp32's eps and fp16's.
    x = torch.full((2, 8), 1e-4).to(dtype)
    if dtype == torch.float64:
        x = torch.full((2, 8), 1e-9, dtype=dtype)
    expected = F.rms_norm(x, (8,))
    ours = rms_norm_ref(x, 8)
    torch.testing.assert_close(ours.to(dtype), expected, atol=0, rtol=4e-3)
    # The check discriminates: the input dtype's own epsilon would give another answer.
    other = rms_norm_ref(x, 8, eps=float(torch.finfo(dtype).eps) * 8)
    assert not torch.allclose(other.to(dtype).double(), expected.double(), rtol=0.1)
    assert rms_norm_eps(dtype, None) == float(
        torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    )


def test_backward_reference_matches_torch_autograd():
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 3, 5, dtype=torch.float64)
    expected = torch.autograd.grad(F.layer_norm(x, (3, 5), w, b, 0.1), (x, w, b), dy)
    got = layer_norm_backward_ref(dy, x, (3, 5), w, b, 0.1)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
    _, dw, db = layer_norm_backward_ref(dy, x, (3, 5), None, b, 0.1)
    assert dw is None and db is not None
    torch.testing.assert_close(db, dy.sum(0))

    expected = torch.autograd.grad(F.rms_norm(x, (3, 5), w, 1e-3), (x, w), dy)
    got = rms_norm_backward_ref(dy, x, (3, 5), w, 1e-3)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


def _autograd_of_forward_ref(fn, dy, tensors):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, dy.double()))
    return [None if t is None else next(grads) for t in leaves]


@pytest.mark.parametrize("zcw", [False, True])
@pytest.mark.parametrize(
    "shape,normalized", [((7, 1), (1,)), ((5, 13), (13,)), ((4, 3, 6), (3, 6)), ((9,), (9,))]
)
def test_closed_form_gradients_match_autograd_of_forward_reference(shape, normalized, zcw):
    x = (torch.randn(shape) * 2 + 0.5).to(torch.bfloat16)
    w = torch.randn(normalized)
    b = torch.randn(normalized)
    dy = torch.randn(shape).to(torch.bfloat16)
    for ww, bb in [(None, None), (w, None), (None, b), (w, b)]:
        got = layer_norm_backward_ref(dy, x, normalized, ww, bb, 0.1, zero_centered_weight=zcw)
        expected = _autograd_of_forward_ref(
            lambda x, w, b: layer_norm_ref(x, normalized, w, b, 0.1, zero_centered_weight=zcw),
            dy,
            [x, ww, bb],
        )
        for g, e in zip(got, expected, strict=True):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
        got = rms_norm_backward_ref(dy, x, normalized, ww, None, zero_centered_weight=zcw)
        expected = _autograd_of_forward_ref(
            lambda x, w: rms_norm_ref(
                x, normalized, w, rms_norm_eps(torch.bfloat16, None), zero_centered_weight=zcw
            ),
            dy,
            [x, ww],
        )
        for g, e in zip(got, expected, strict=True):
            if g is not None:
                torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


def test_backward_reference_zero_size():
    x = torch.randn(0, 4)
    w = torch.randn(4)
    dx, dw, db = layer_norm_backward_ref(torch.randn(0, 4), x, 4, w, w)
    assert dx.shape == (0, 4)
    assert torch.equal(dw, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(db, torch.zeros(4, dtype=torch.float64))
    dx, dw = rms_norm_backward_ref(torch.randn(0, 4), x, 4, w)
    assert dx.shape == (0, 4) and torch.equal(dw, torch.zeros(4, dtype=torch.float64))
    dx, dw, db = layer_norm_backward_ref(torch.randn(3, 0), torch.randn(3, 0), 0, w[:0], w[:0])
    assert dx.shape == (3, 0) and dw.shape == (0,) and db.shape == (0,)
