"""torch.library.opcheck on every op overload with all four default test_utils (test_schema,
test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic), over samples covering
strided, zero-size, multi-dim, mixed-dtype and (for the differentiable ops) requires_grad inputs.

The *_fwd / *_bwd ops and the out= overloads are deliberately not differentiable (autograd's
"not implemented" fallback, so that double backward raises): their samples do not require grad,
since differentiating them is an error by design (tested in test_layer_norm_backward.py)."""

from __future__ import annotations

import pytest
import torch

import layernorm_ext  # noqa: F401  (registers the ops)

ops = torch.ops.layernorm_ext

TEST_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def _t(*shape, dtype=torch.float32, grad=False):
    t = torch.randn(shape).to(dtype)
    return t.requires_grad_() if grad else t


def _layer_norm_samples(grad: bool):
    """(name, args, kwargs) for layer_norm-like signatures (input, shape, w, b, eps)."""
    g = grad
    bf, h = torch.bfloat16, torch.float16
    return [
        ("fp32", (_t(5, 8, grad=g), [8], _t(8, grad=g), _t(8, grad=g), 1e-5), {}),
        (
            "fp64 w only",
            (
                _t(3, 7, dtype=torch.float64, grad=g),
                [7],
                _t(7, dtype=torch.float64, grad=g),
                None,
                0.5,
            ),
            {},
        ),
        ("fp16 b only", (_t(4, 9, dtype=h, grad=g), [9], None, _t(9, dtype=h, grad=g)), {}),
        ("bf16 no affine", (_t(4, 33, dtype=bf, grad=g), [33]), {}),
        (
            "mixed bf16/fp32",
            (_t(6, 16, dtype=bf, grad=g), [16], _t(16, grad=g), _t(16, grad=g)),
            {},
        ),
        ("mixed fp16/fp32 w", (_t(2, 3, 17, dtype=h, grad=g), [17], _t(17, grad=g), None), {}),
        (
            "x[:, :N]",
            (_t(6, 20)[:, :13].requires_grad_(g), [13], _t(13, grad=g), _t(13, grad=g)),
            {},
        ),
        ("transposed", (_t(11, 4).t().requires_grad_(g), [11], _t(11, grad=g), _t(11, grad=g)), {}),
        ("expanded", (_t(1, 10).expand(4, 10).requires_grad_(g), [10], _t(10, grad=g), None), {}),
        ("multi-dim", (_t(3, 6, 5, grad=g), [6, 5], _t(6, 5, grad=g), _t(6, 5, grad=g)), {}),
        (
            "strided multi-dim",
            (_t(9, 10, 6)[::3, ::2, ::3].requires_grad_(g), [5, 2], _t(5, 2, grad=g), None),
            {},
        ),
        ("rows 0", (_t(0, 8, grad=g), [8], _t(8, grad=g), _t(8, grad=g)), {}),
        ("hidden 0", (_t(3, 0, grad=g), [0], _t(0, grad=g), _t(0, grad=g)), {}),
        ("2x0x3", (_t(2, 0, 3, grad=g), [3], _t(3, grad=g), None), {}),
        (
            "zero centered",
            (_t(4, 12, grad=g), [12], _t(12, grad=g), _t(12, grad=g)),
            {"zero_centered_weight": True},
        ),
    ]


def _rms_samples(grad: bool):
    """(name, args, kwargs) for rms_norm-like signatures (input, shape, w, eps)."""
    out = []
    for name, args, kwargs in _layer_norm_samples(grad):
        x, shape = args[0], args[1]
        w = args[2] if len(args) > 2 else None
        eps = args[4] if len(args) > 4 else None
        out.append((name, (x, shape, w, eps), kwargs))
    return out


def _out_samples(samples):
    result = []
    for name, args, kwargs in samples:
        x = args[0]
        result.append(
            (
                name + " out",
                args,
                {**kwargs, "out": torch.empty_like(x, memory_format=torch.contiguous_format)},
            )
        )
    x = _t(6, 8)
    result.append(("column-slice out", (x, [8]), {"out": torch.empty(6, 12)[:, 2:10]}))
    result.append(("transposed out", (x, [8]), {"out": torch.empty(8, 6).t()}))
    return result


def _layer_norm_bwd_samples():
    result = []
    partial = ([True, False, False], [False, True, True], [False, True, False])
    for i, (name, args, kwargs) in enumerate(_layer_norm_samples(False)):
        x, shape = args[0], args[1]
        w = args[2] if len(args) > 2 else None
        b = args[3] if len(args) > 3 else None
        zcw = kwargs.get("zero_centered_weight", False)
        _, mean, rstd = ops.layer_norm_fwd(*args, **kwargs)
        dy = torch.randn(x.shape).to(x.dtype)
        # The full mask, and one partial mask per sample (rotating).
        for mask in ([True, True, True], partial[i % len(partial)]):
            result.append((f"{name} {mask}", (dy, x, shape, mean, rstd, w, b, zcw, mask), {}))
        if x.dim() == 2 and x.shape[1] > 1:
            dy_t = torch.randn(x.shape[1], x.shape[0]).to(x.dtype).t()
            result.append(
                (f"{name} dy transposed", (dy_t, x, shape, mean, rstd, w, b, zcw, [True] * 3), {})
            )
    return result


def _rms_norm_bwd_samples():
    result = []
    partial = ([True, False], [False, True])
    for i, (name, args, kwargs) in enumerate(_rms_samples(False)):
        x, shape, w = args[0], args[1], args[2]
        zcw = kwargs.get("zero_centered_weight", False)
        _, rstd = ops.rms_norm_fwd(*args, **kwargs)
        dy = torch.randn(x.shape).to(x.dtype)
        for mask in ([True, True], partial[i % len(partial)]):
            result.append((f"{name} {mask}", (dy, x, shape, rstd, w, zcw, mask), {}))
    return result


def _cases():
    torch.manual_seed(0)
    groups = {
        "layer_norm": (
            ops.layer_norm.default,
            # Samples requiring grad (autograd path), and every other one without (the
            # inference kernel).
            _layer_norm_samples(True) + _layer_norm_samples(False)[::2],
        ),
        "layer_norm.out": (ops.layer_norm.out, _out_samples(_layer_norm_samples(False))),
        "layer_norm_fwd": (ops.layer_norm_fwd.default, _layer_norm_samples(False)),
        "layer_norm_bwd": (ops.layer_norm_bwd.default, _layer_norm_bwd_samples()),
        "rms_norm": (ops.rms_norm.default, _rms_samples(True) + _rms_samples(False)[::2]),
        "rms_norm.out": (ops.rms_norm.out, _out_samples(_rms_samples(False))),
        "rms_norm_fwd": (ops.rms_norm_fwd.default, _rms_samples(False)),
        "rms_norm_bwd": (ops.rms_norm_bwd.default, _rms_norm_bwd_samples()),
    }
    return groups


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    op, samples = CASES[name]
    failures = []
    for sample_name, args, kwargs in samples:
        try:
            result = torch.library.opcheck(op, args, kwargs, test_utils=TEST_UTILS)
        except Exception as e:  # collect every failing sample, then report
            first_line = str(e).splitlines()[0] if str(e) else ""
            failures.append(f"{sample_name}: {type(e).__name__}: {first_line[:300]}")
            continue
        bad = {k: v for k, v in result.items() if v != "SUCCESS"}
        if bad:
            failures.append(f"{sample_name}: {bad}")
    assert not failures, (
        f"opcheck({name}) failed on {len(failures)} of {len(samples)} samples:\n"
        + "\n".join(failures)
    )
