"""NaN / Inf in the data (reliability.md F11, F12, F15): a poisoned row is NaN as in eager
PyTorch, and never changes another row, bit for bit; a NaN in γ poisons only its column."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from norm_testing import DTYPE_CASES, DTYPE_IDS, assert_bitwise_equal, make_input, make_params

import layernorm_ext

POISONS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("N", [1, 5, 16, 33, 200, 1031])
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_poisoned_row_is_isolated(isa, case, N, gen):
    M = 9
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    clean = layernorm_ext.layer_norm(x, N, w, b)
    clean_rms = layernorm_ext.rms_norm(x, N, w)
    # Positions: first element, last (the vector tail), and one in the middle.
    for poison in POISONS:
        for col in sorted({0, N // 2, N - 1}):
            row = 4
            xp = x.clone()
            xp[row, col] = poison
            label = f"[{isa} {case.id} N={N} x[{row},{col}]={poison}]"
            y = layernorm_ext.layer_norm(xp, N, w, b)
            others = [r for r in range(M) if r != row]
            assert_bitwise_equal(y[others], clean[others], f"{label} other rows")
            eager = F.layer_norm(xp, (N,), w, b)
            assert torch.equal(torch.isnan(y[row]), torch.isnan(eager[row])), (
                f"{label}: NaN pattern {torch.isnan(y[row]).tolist()} differs from PyTorch's "
                f"{torch.isnan(eager[row]).tolist()}"
            )
            if N > 1:
                assert bool(torch.isnan(y[row]).all()), f"{label}: row not all NaN: {y[row]}"
            # RMSNorm: the other rows are untouched, the poisoned one follows PyTorch.
            yr = layernorm_ext.rms_norm(xp, N, w)
            assert_bitwise_equal(yr[others], clean_rms[others], f"{label} rms other rows")
            er = F.rms_norm(xp, (N,), w)
            assert torch.equal(torch.isnan(yr[row]), torch.isnan(er[row])), f"{label} rms NaNs"


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_poisoned_row_backward(isa, case, gen):
    M, N = 7, 45
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(case.x)

    def grads(xx, fn):
        xs = xx.clone().requires_grad_()
        ws = w.clone().requires_grad_()
        bs = b.clone().requires_grad_()
        fn(xs, (N,), ws, bs).backward(dy)
        return xs.grad, ws.grad, bs.grad

    clean = grads(x, layernorm_ext.layer_norm)
    xp = x.clone()
    xp[3, 10] = float("nan")
    got = grads(xp, layernorm_ext.layer_norm)
    eager = grads(xp, F.layer_norm)
    others = [r for r in range(M) if r != 3]
    assert_bitwise_equal(got[0][others], clean[0][others], f"[{isa} {case.id}] dx other rows")
    assert bool(torch.isnan(got[0][3]).all()), f"[{isa} {case.id}] dx of the NaN row"
    for name, g, e in zip(("dx", "dw", "db"), got, eager, strict=True):
        assert torch.equal(torch.isnan(g), torch.isnan(e)), (
            f"[{isa} {case.id}] {name}: NaN pattern differs from PyTorch's"
        )


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_nan_in_parameters_poisons_only_its_column(isa, case, gen):
    M, N = 6, 40
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    clean = layernorm_ext.layer_norm(x, N, w, b)
    for name, j in (("weight", 3), ("bias", 37)):
        wp, bp = w.clone(), b.clone()
        (wp if name == "weight" else bp)[j] = float("nan")
        y = layernorm_ext.layer_norm(x, N, wp, bp)
        keep = [c for c in range(N) if c != j]
        assert_bitwise_equal(y[:, keep], clean[:, keep], f"[{isa} {case.id}] NaN {name}[{j}]")
        assert bool(torch.isnan(y[:, j]).all())
