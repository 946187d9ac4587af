"""LayerNorm forward vs the float64 reference: the size / dtype / affine / layout grid, on every
CPU kernel set, plus out=, zero_centered_weight and the seed notebook example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from norm_testing import (
    AFFINE,
    DTYPE_CASES,
    DTYPE_IDS,
    LOW_PRECISION,
    affine_name,
    assert_bitwise_equal,
    check_result,
    fwd_tol,
    make_input,
    make_params,
)

import layernorm_ext
from layernorm_ext._reference import affine_ref, layer_norm_ref

HIDDEN = [1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 64, 127, 768, 769, 1024, 4095, 4097, 8192]
ROWS = [0, 1, 7, 83]
# 4096 rows (several threads' worth of tasks) only for a few sizes: small, odd-tail and a
# vector-body-plus-tail width.
BIG_ROWS_HIDDEN = {1, 17, 769}
BIG_ROWS = 4096


def _check_forward(x, normalized_shape, w, b, label, eps=1e-5, *, zcw=False, xhat_ref=None):
    """Runs our op, checks it against the fp64 reference (and PyTorch for fp16 / bf16).

    ``xhat_ref``: the reference of x without affine, when the caller already has it.
    """
    y = layernorm_ext.layer_norm(x, normalized_shape, w, b, eps, zero_centered_weight=zcw)
    if xhat_ref is None:
        ref = layer_norm_ref(x, normalized_shape, w, b, eps, zero_centered_weight=zcw)
    else:
        ref = affine_ref(xhat_ref, w, b, zero_centered_weight=zcw)
    baseline = None
    if x.dtype in LOW_PRECISION and not zcw:
        baseline = F.layer_norm(x, tuple(normalized_shape), w, b, eps)
    assert y.shape == x.shape, f"{label}: output shape {tuple(y.shape)} != {tuple(x.shape)}"
    assert y.is_contiguous(), f"{label}: output is not contiguous"
    check_result(y, ref, fwd_tol(x.dtype), label, baseline, expected_dtype=x.dtype)
    return y


@pytest.mark.parametrize("N", HIDDEN)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_forward_grid(isa, case, N, gen):
    rows = ROWS + ([BIG_ROWS] if N in BIG_ROWS_HIDDEN else [])
    for M in rows:
        x = make_input((M, N), case.x, generator=gen)
        xhat_ref = layer_norm_ref(x, (N,))
        # Many rows: the two extreme affine combos suffice (the rest only adds run time).
        for has_w, has_b in AFFINE if M < BIG_ROWS else [(False, False), (True, True)]:
            w, b = make_params((N,), case.param, has_w, has_b, generator=gen)
            label = f"[{isa} {case.id} M={M} N={N} {affine_name(has_w, has_b)}] y"
            _check_forward(x, (N,), w, b, label, xhat_ref=xhat_ref)


def test_seed_notebook_example():
    """The example every user tries first; also equal to torch.nn.LayerNorm(4)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    y = layernorm_ext.layer_norm(x, 4)
    expected_row = torch.tensor([-1.3416, -0.4472, 0.4472, 1.3416])
    assert torch.equal(y.round(decimals=4), expected_row.expand(2, 4))
    # Mean 0 and population variance 1 afterwards (up to eps = 1e-5 in the denominator).
    torch.testing.assert_close(y.mean(-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(y, torch.nn.LayerNorm(4)(x).detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, layernorm_ext.LayerNorm(4)(x).detach(), atol=0, rtol=0)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-6, 0.5])
def test_forward_eps(isa, eps, gen):
    for case in DTYPE_CASES:
        x = make_input((9, 37), case.x, generator=gen)
        w, b = make_params((37,), case.param, True, True, generator=gen)
        _check_forward(x, (37,), w, b, f"[{isa} {case.id} eps={eps}] y", eps)


# --- multi-dim normalized_shape -------------------------------------------------------------------

MULTI_DIM = [(6, 129), (8, 16), (11, 3), (1, 1)]


@pytest.mark.parametrize("shape", MULTI_DIM, ids=[f"{a}x{b}" for a, b in MULTI_DIM])
def test_forward_multi_dim(isa, shape, gen):
    A, B = shape
    for case in DTYPE_CASES:
        for M in (0, 2, 37):
            x = make_input((M, A, B), case.x, normalized_ndim=2, generator=gen)
            for has_w, has_b in AFFINE:
                w, b = make_params((A, B), case.param, has_w, has_b, generator=gen)
                label = f"[{isa} {case.id} M={M} {A}x{B} {affine_name(has_w, has_b)}] y"
                y = _check_forward(x, (A, B), w, b, label)
                # Normalising over (A, B) is normalising the flattened rows of A·B elements.
                flat = layernorm_ext.layer_norm(
                    x.reshape(M, A * B),
                    A * B,
                    None if w is None else w.reshape(-1),
                    None if b is None else b.reshape(-1),
                )
                assert_bitwise_equal(y.reshape(M, A * B), flat, f"{label} vs flattened")


def test_forward_full_shape_and_1d(isa, gen):
    for case in DTYPE_CASES:
        x = make_input((5, 7), case.x, normalized_ndim=2, generator=gen)
        w, b = make_params((5, 7), case.param, True, True, generator=gen)
        _check_forward(x, (5, 7), w, b, f"[{isa} {case.id}] full-shape y")
        v = make_input((33,), case.x, generator=gen)
        w, b = make_params((33,), case.param, True, True, generator=gen)
        _check_forward(v, (33,), w, b, f"[{isa} {case.id}] 1-D y")
        x3 = make_input((2, 3, 4, 5), case.x, normalized_ndim=3, generator=gen)
        w, b = make_params((3, 4, 5), case.param, True, False, generator=gen)
        _check_forward(x3, (3, 4, 5), w, b, f"[{isa} {case.id}] 3 normalized dims y")


# --- strided inputs -------------------------------------------------------------------------------


def _strided_views(M: int, N: int, dtype: torch.dtype, gen: torch.Generator):
    """(name, view) pairs: in-place readable layouts and ones that must be copied."""
    wide = make_input((M, N + 13), dtype, generator=gen)
    row = make_input((1, N), dtype, generator=gen)
    tall = make_input((N, M), dtype, generator=gen)
    lead_ok = make_input((4, 2 * ((M + 3) // 4), N), dtype, generator=gen)
    lead_bad = make_input((4, M + 5, N), dtype, generator=gen)
    size1 = make_input((M, 1, N), dtype, generator=gen)
    return [
        ("x[:, :N]", wide[:, :N]),
        ("x[:, 13:]", wide[:, 13:]),
        ("expanded row", row.expand(M, N)),
        ("transposed", tall.t()),
        ("leading dims collapse", lead_ok[:, ::2, :]),
        ("leading dims do not collapse", lead_bad[:, :M, :]),
        ("size-1 dim with odd stride", size1.as_strided((M, 1, N), (N, 7, 1))),
        ("every other row", wide[::2, :N]),
    ]


@pytest.mark.parametrize("N", [1, 7, 64, 769])
def test_forward_strided_input(isa, N, gen):
    M = 12
    for case in DTYPE_CASES:
        w, b = make_params((N,), case.param, True, True, generator=gen)
        for name, x in _strided_views(M, N, case.x, gen):
            label = f"[{isa} {case.id} N={N} {name}] y"
            y = _check_forward(x, (N,), w, b, label)
            # Row results depend on the row's values only: equal to the contiguous run.
            expected = layernorm_ext.layer_norm(x.contiguous(), (N,), w, b)
            assert_bitwise_equal(y, expected, f"{label} vs contiguous copy")


def test_forward_strided_multi_dim(isa, gen):
    M, A, B = 4, 6, 5
    for case in DTYPE_CASES:
        base = make_input((3 * M, 5 * A, 3 * B), case.x, normalized_ndim=2, generator=gen)
        x = base[::3, ::5, ::3]
        w, b = make_params((A, B), case.param, True, True, generator=gen)
        label = f"[{isa} {case.id}] x[::3, ::5, ::3]"
        y = _check_forward(x, (A, B), w, b, label)
        assert_bitwise_equal(y, layernorm_ext.layer_norm(x.contiguous(), (A, B), w, b), label)
        # Channels-last 4-D input normalised over the last dim only.
        x4 = make_input((2, 5, 3, 4), case.x, generator=gen).to(memory_format=torch.channels_last)
        w4, b4 = make_params((4,), case.param, True, True, generator=gen)
        y4 = _check_forward(x4, (4,), w4, b4, f"[{isa} {case.id}] channels_last")
        assert_bitwise_equal(y4, layernorm_ext.layer_norm(x4.contiguous(), (4,), w4, b4), "cl")


@pytest.mark.parametrize("offset", range(1, 16))
def test_forward_unaligned_storage(offset, gen):
    """Tensors starting at any element offset (not vector-aligned) give the aligned result."""
    M, N = 5, 67
    for case in DTYPE_CASES:
        x = make_input((M, N), case.x, generator=gen)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        expected = layernorm_ext.layer_norm(x, N, w, b)
        buf = torch.empty(offset + M * N, dtype=case.x)
        xs = buf[offset:].view(M, N)
        xs.copy_(x)
        pbuf = torch.empty(2 * offset + 2 * N, dtype=case.param)
        ws = pbuf[offset : offset + N]
        bs = pbuf[2 * offset + N :]
        ws.copy_(w)
        bs.copy_(b)
        obuf = torch.empty(offset + M * N, dtype=case.x)
        out = obuf[offset:].view(M, N)
        label = f"[{case.id} offset={offset}]"
        assert_bitwise_equal(layernorm_ext.layer_norm(xs, N, ws, bs), expected, f"{label} y")
        layernorm_ext.layer_norm(xs, N, ws, bs, out=out)
        assert_bitwise_equal(out, expected, f"{label} out=")


# --- out= -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_out_variants(isa, case, gen):
    M, N = 9, 45
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    expected = layernorm_ext.layer_norm(x, N, w, b)
    check_result(expected, layer_norm_ref(x, N, w, b), fwd_tol(case.x), f"[{case.id}] y")

    # Preallocated, contiguous: written in place and returned.
    out = torch.full((M, N), float("nan"), dtype=case.x)
    res = layernorm_ext.layer_norm(x, N, w, b, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_bitwise_equal(out, expected, f"[{case.id}] out= contiguous")

    # Non-contiguous out whose rows are evenly strided: the other columns stay untouched.
    big = torch.full((M, N + 7), -7.0, dtype=case.x)
    out = big[:, 3 : 3 + N]
    res = layernorm_ext.layer_norm(x, N, w, b, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_bitwise_equal(out, expected, f"[{case.id}] out= column slice")
    assert (big[:, :3] == -7).all() and (big[:, 3 + N :] == -7).all(), "wrote outside out"

    # Non-contiguous out that cannot be written row by row (transposed).
    out_t = torch.zeros(N, M, dtype=case.x).t()
    layernorm_ext.layer_norm(x, N, w, b, out=out_t)
    assert out_t.stride() == (1, M), "out= must keep its strides"
    assert_bitwise_equal(out_t.contiguous(), expected, f"[{case.id}] out= transposed")

    # out must already have the input's shape: a custom op cannot resize a mutated argument
    # under torch.compile, so the eager op does not resize either (clear error instead).
    for bad in (torch.empty(0, dtype=case.x), torch.empty(3, dtype=case.x)):
        with pytest.raises(RuntimeError, match=r"layernorm_ext::layer_norm: expected out to have"):
            layernorm_ext.layer_norm(x, N, w, b, out=bad)

    # Multi-dim and zero-size.
    x3 = make_input((2, 3, 5), case.x, normalized_ndim=2, generator=gen)
    out3 = torch.empty(2, 3, 5, dtype=case.x)
    layernorm_ext.layer_norm(x3, (3, 5), out=out3)
    assert_bitwise_equal(out3, layernorm_ext.layer_norm(x3, (3, 5)), f"[{case.id}] out= 3-D")
    out0 = torch.empty(0, N, dtype=case.x)
    assert layernorm_ext.layer_norm(torch.empty(0, N, dtype=case.x), N, w, b, out=out0) is out0
    assert out0.shape == (0, N)


def test_out_bumps_version_and_is_not_differentiable():
    x = torch.randn(3, 8, requires_grad=True)
    out = torch.empty(3, 8)
    v = out._version
    with torch.no_grad():
        layernorm_ext.layer_norm(x, 8, out=out)
    assert out._version > v, "out= must bump the version counter like any in-place op"
    with pytest.raises(RuntimeError):
        layernorm_ext.layer_norm(x, 8, out=torch.empty(3, 8)).sum().backward()


def test_out_with_internal_overlap_raises():
    x = torch.randn(4, 8)
    out = torch.empty(1, 8).expand(4, 8)
    with pytest.raises(RuntimeError):
        layernorm_ext.layer_norm(x, 8, out=out)


# --- zero_centered_weight -------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 17, 769])
def test_zero_centered_weight(isa, N, gen):
    for case in DTYPE_CASES:
        x = make_input((11, N), case.x, generator=gen)
        for has_b in (False, True):
            w, b = make_params((N,), case.param, True, has_b, generator=gen)
            w = (w - 1).to(case.param)  # Gemma-style weights live around 0
            label = f"[{isa} {case.id} N={N} zcw b={has_b}] y"
            y = _check_forward(x, (N,), w, b, label, zcw=True)
            if case.param in (torch.float32, torch.float64):
                # (1 + w) is formed in the parameters' own type: same bits as passing it.
                plain = layernorm_ext.layer_norm(x, N, 1 + w, b)
                assert_bitwise_equal(y, plain, f"{label} vs explicit 1 + w")
        # Without a weight the flag has nothing to scale.
        _, b = make_params((N,), case.param, False, True, generator=gen)
        assert_bitwise_equal(
            layernorm_ext.layer_norm(x, N, None, b, zero_centered_weight=True),
            layernorm_ext.layer_norm(x, N, None, b),
            f"[{isa} {case.id}] zcw without weight",
        )
