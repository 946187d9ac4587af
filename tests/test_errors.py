"""Bad input gives a clear RuntimeError naming the op (ATen's wording where ATen has one), never
an internal assert, a crash or a silent result; zero-size input is valid and well-shaped."""

from __future__ import annotations

import re

import pytest
import torch
from norm_testing import AFFINE, DTYPE_CASES, DTYPE_IDS, affine_name, make_params

import layernorm_ext

ops = torch.ops.layernorm_ext

LN = "layernorm_ext::layer_norm"
RMS = "layernorm_ext::rms_norm"


def _ln(x, shape, w=None, b=None, **kw):
    return layernorm_ext.layer_norm(x, shape, w, b, **kw)


def _rms(x, shape, w=None, b=None, **kw):
    assert b is None
    return layernorm_ext.rms_norm(x, shape, w, **kw)


def _raises(fn, op, pattern):
    """Calls fn and checks the RuntimeError: names `op` first, then matches `pattern`."""
    with pytest.raises(RuntimeError) as info:
        fn()
    msg = str(info.value)
    assert "INTERNAL ASSERT" not in msg, msg
    assert msg.startswith(op + ":") or f"{op}:" in msg, f"message does not name {op}: {msg}"
    assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"
    return msg


FUNCS = [(_ln, LN), (_rms, RMS)]
FUNC_IDS = ["layer_norm", "rms_norm"]


@pytest.mark.parametrize("fn,op", FUNCS, ids=FUNC_IDS)
def test_empty_normalized_shape(fn, op):
    msg = _raises(
        lambda: fn(torch.randn(2, 3), ()),
        op,
        r"Expected normalized_shape to be at least 1-dimensional, i\.e\., containing at least one "
        r"element, but got normalized_shape = \[\]",
    )
    assert "[]" in msg


@pytest.mark.parametrize("fn,op", FUNCS, ids=FUNC_IDS)
def test_weight_shape_mismatch(fn, op):
    x = torch.randn(4, 1, 2, 3)
    _raises(
        lambda: fn(x, (1, 2, 3), torch.randn(1, 2)),
        op,
        re.escape(
            "Expected weight to be of same shape as normalized_shape, but got weight of shape "
            "[1, 2] and normalized_shape = [1, 2, 3]"
        ),
    )
    _raises(lambda: fn(x, (1, 2, 3), torch.randn(6)), op, "Expected weight to be of same shape")


def test_bias_shape_mismatch():
    x = torch.randn(4, 2, 3)
    _raises(
        lambda: _ln(x, (2, 3), None, torch.randn(3, 2)),
        LN,
        re.escape(
            "Expected bias to be of same shape as normalized_shape, but got bias of shape [3, 2] "
            "and normalized_shape = [2, 3]"
        ),
    )
    _raises(lambda: _ln(x, (2, 3), torch.randn(2, 3), torch.randn(3)), LN, "Expected bias")


@pytest.mark.parametrize("fn,op", FUNCS, ids=FUNC_IDS)
def test_input_shape_mismatch(fn, op):
    _raises(
        lambda: fn(torch.randn(2, 2, 3), (2, 2)),
        op,
        re.escape(
            "Given normalized_shape=[2, 2], expected input with shape [*, 2, 2], but got input "
            "of size[2, 2, 3]"
        ),
    )


# (normalized_shape, input shape) pairs of test_nn's bad-shape map.
BAD_SHAPES = [((), ()), ((2, 3), (3,)), ((2,), (1, 2, 3)), ((10,), (2, 3)), (10, (2, 3))]


@pytest.mark.parametrize("fn,op", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("normalized,shape", BAD_SHAPES, ids=[str(s) for s in BAD_SHAPES])
def test_bad_shape_map(fn, op, normalized, shape):
    x = torch.randn(shape)
    _raises(lambda: fn(x, normalized), op, r"normalized_shape")
    # Also through the module (with parameters of the requested shape) and the stats op.
    if normalized != ():
        module = (
            layernorm_ext.LayerNorm(normalized) if fn is _ln else layernorm_ext.RMSNorm(normalized)
        )
        _raises(lambda: module(x), op, r"Given normalized_shape=")
        fwd = ops.layer_norm_fwd if fn is _ln else ops.rms_norm_fwd
        shape_list = [normalized] if isinstance(normalized, int) else list(normalized)
        _raises(lambda: fwd(x, shape_list), op, r"Given normalized_shape=")


NON_FLOAT = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128]


@pytest.mark.parametrize("fn,op", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("dtype", NON_FLOAT, ids=str)
def test_non_float_input(fn, op, dtype):
    pattern = r"expected input to have a floating-point dtype"
    for shape in ((3, 4), (0, 4), (2, 0, 4)):
        x = torch.zeros(shape, dtype=dtype)
        _raises(lambda x=x: fn(x, 4), op, pattern)
        # With float parameters that require grad (pytorch#78444 hit an INTERNAL ASSERT).
        w = torch.ones(4, requires_grad=True)
        b = torch.zeros(4, requires_grad=True) if fn is _ln else None
        _raises(lambda x=x, w=w, b=b: fn(x, 4, w, b), op, pattern)
        with torch.no_grad():
            _raises(lambda x=x, w=w, b=b: fn(x, 4, w, b), op, pattern)


@pytest.mark.parametrize("fn,op", FUNCS, ids=FUNC_IDS)
def test_non_float_parameters(fn, op):
    x = torch.randn(3, 4)
    _raises(lambda: fn(x, 4, torch.ones(4, dtype=torch.int64)), op, r"expected weight")
    if fn is _ln:
        _raises(lambda: fn(x, 4, None, torch.ones(4, dtype=torch.bool)), op, r"expected bias")


# (input dtype, weight dtype, bias dtype): combinations outside the dtype contract.
BAD_MIXES = [
    (torch.float32, torch.float16, None),
    (torch.float32, None, torch.bfloat16),
    (torch.float64, torch.float32, None),
    (torch.float64, None, torch.float32),
    (torch.float32, torch.float64, None),
    (torch.float16, torch.bfloat16, None),
    (torch.bfloat16, torch.float16, None),
    (torch.float16, torch.float64, None),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float32, torch.float16),
]


@pytest.mark.parametrize("mix", BAD_MIXES, ids=lambda m: "-".join(str(d)[6:] for d in m))
def test_unsupported_dtype_mix(mix):
    xd, wd, bd = mix
    x = torch.randn(3, 4).to(xd)
    w = None if wd is None else torch.randn(4).to(wd)
    b = None if bd is None else torch.randn(4).to(bd)
    pattern = r"expected (weight|bias) to have|expected weight and bias to have the same dtype"
    _raises(lambda: _ln(x, 4, w, b), LN, pattern)
    _raises(lambda: ops.layer_norm_fwd(x, [4], w, b), LN, pattern)
    weight_alone_ok = wd in (None, xd) or (
        xd in (torch.float16, torch.bfloat16) and wd == torch.float32
    )
    if not weight_alone_ok:
        _raises(lambda: _rms(x, 4, w), RMS, r"expected weight to have")
    if b is None:
        # Also with the parameters requiring grad (the autograd path).
        wr = None if w is None else w.clone().requires_grad_()
        _raises(lambda: _ln(x, 4, wr, None), LN, pattern)


@pytest.mark.parametrize("fn,op", FUNCS, ids=FUNC_IDS)
def test_out_with_wrong_dtype(fn, op):
    x = torch.randn(3, 4)
    for dtype in (torch.float64, torch.float16, torch.int32):
        _raises(
            lambda dtype=dtype: fn(x, 4, out=torch.empty(3, 4, dtype=dtype)),
            op,
            r"Expected out tensor to have dtype",
        )


def test_bwd_op_argument_checks():
    x = torch.randn(3, 4)
    _, mean, rstd = ops.layer_norm_fwd(x, [4])
    op = "layernorm_ext::layer_norm_bwd"
    mask = [True, True, True]
    _raises(
        lambda: ops.layer_norm_bwd(torch.randn(3, 5), x, [4], mean, rstd, None, None, False, mask),
        op,
        "grad_out",
    )
    _raises(
        lambda: ops.layer_norm_bwd(
            torch.randn(3, 4).double(), x, [4], mean, rstd, None, None, False, mask
        ),
        op,
        "grad_out",
    )
    _raises(
        lambda: ops.layer_norm_bwd(
            torch.randn(3, 4), x, [4], mean.double(), rstd, None, None, False, mask
        ),
        op,
        "mean",
    )
    _raises(
        lambda: ops.layer_norm_bwd(
            torch.randn(3, 4), x, [4], mean, rstd[:2], None, None, False, mask
        ),
        op,
        "rstd",
    )
    _, rstd = ops.rms_norm_fwd(x, [4])
    _raises(
        lambda: ops.rms_norm_bwd(torch.randn(3, 4), x, [4], rstd.half(), None, False, [True, True]),
        "layernorm_ext::rms_norm_bwd",
        "rstd",
    )


def test_cpu_capability_errors():
    with pytest.raises(RuntimeError, match="not a CPU kernel set"):
        layernorm_ext.set_cpu_capability("sse9")
    assert layernorm_ext.cpu_capability() == layernorm_ext.available_cpu_capabilities()[0]


# --- zero-size input ------------------------------------------------------------------------------

ZERO_SIZE = [
    ((0, 5), (5,)),
    ((3, 0), (0,)),
    ((0, 0), (0,)),
    ((2, 0, 3), (3,)),
    ((2, 0, 3), (0, 3)),
    ((0,), (0,)),
    ((4, 3, 0), (3, 0)),
]


@pytest.mark.parametrize("shape,normalized", ZERO_SIZE, ids=[str(s) for s in ZERO_SIZE])
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_zero_size(isa, case, shape, normalized):
    rows = torch.Size(shape[: len(shape) - len(normalized)]).numel()
    for has_w, has_b in AFFINE:
        label = f"[{isa} {case.id} {shape} over {normalized} {affine_name(has_w, has_b)}]"
        w, b = make_params(normalized, case.param, has_w, has_b)
        x = torch.randn(shape).to(case.x).requires_grad_()
        ws = None if w is None else w.requires_grad_()
        bs = None if b is None else b.requires_grad_()
        y = layernorm_ext.layer_norm(x, normalized, ws, bs)
        assert y.shape == shape and y.dtype == case.x, label
        y.backward(torch.ones_like(y))
        assert x.grad.shape == shape and x.grad.dtype == case.x, label
        for name, p in (("dw", ws), ("db", bs)):
            if p is not None:
                assert p.grad.shape == p.shape and p.grad.dtype == case.param, f"{label} {name}"
                if rows == 0:
                    assert bool((p.grad == 0).all()), f"{label} {name}: not zero with M == 0"
        # RMSNorm too.
        xr = x.detach().requires_grad_()
        wr = None if w is None else w.detach().requires_grad_()
        yr = layernorm_ext.rms_norm(xr, normalized, wr)
        assert yr.shape == shape, label
        yr.backward(torch.ones_like(yr))
        assert xr.grad.shape == shape, label
        if wr is not None:
            assert wr.grad.shape == wr.shape
            if rows == 0:
                assert bool((wr.grad == 0).all()), f"{label} rms dw: not zero with M == 0"
        # Statistics ops: one entry per row.
        stat_shape = shape[: len(shape) - len(normalized)] + (1,) * len(normalized)
        out, mean, rstd = ops.layer_norm_fwd(x.detach(), list(normalized), w, b)
        assert out.shape == shape and mean.shape == stat_shape and rstd.shape == stat_shape
        # out= on zero-size (out= is not differentiable: the parameters require grad here).
        o = torch.empty(shape, dtype=case.x)
        with torch.no_grad():
            assert layernorm_ext.layer_norm(x.detach(), normalized, w, b, out=o) is o
        assert o.shape == shape
