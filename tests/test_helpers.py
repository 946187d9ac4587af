"""The comparison helpers themselves must fail on wrong results (a checker that cannot fail
would make every test above vacuous)."""

from __future__ import annotations

import math

import pytest
import torch
from norm_testing import (
    assert_bitwise_equal,
    assert_close_to_ref,
    assert_no_worse_than_torch,
    bitwise_equal,
    check_result,
    fwd_tol,
    make_input,
    max_abs_err,
    param_grad_tol,
)


def test_assert_close_to_ref_catches_errors():
    ref = torch.linspace(-3, 3, 101, dtype=torch.float64)
    good = ref.float()
    assert_close_to_ref(good, ref, *fwd_tol(torch.float32), "good")
    bad = good.clone()
    bad[17] += 1e-3
    with pytest.raises(AssertionError, match=r"1 of 101 elements exceed.*\(17,\)"):
        assert_close_to_ref(bad, ref, *fwd_tol(torch.float32), "bad")
    # NaN where the reference is finite, and a missing NaN.
    nan = good.clone()
    nan[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN positions differ"):
        assert_close_to_ref(nan, ref, 1.0, 1.0, "nan")
    ref_nan = ref.clone()
    ref_nan[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN positions differ"):
        assert_close_to_ref(good, ref_nan, 1.0, 1.0, "missing nan")
    assert_close_to_ref(nan, ref_nan, *fwd_tol(torch.float32), "matching nan")
    # Infinities must match exactly.
    inf_ref = ref.clone()
    inf_ref[5] = float("inf")
    with pytest.raises(AssertionError, match="infinities"):
        assert_close_to_ref(good, inf_ref, 1e9, 1.0, "inf")
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_ref(good[:5], ref, 1.0, 1.0, "shape")


def test_two_x_rule():
    ref = torch.randn(1000, dtype=torch.float64)
    torch_out = ref.to(torch.bfloat16)  # correctly rounded: the best possible
    ours = torch_out.clone()
    assert_no_worse_than_torch(ours, ref, torch_out, "same")
    ours[10] = (ref[10] + 3 * max_abs_err(torch_out, ref)).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="exceeds 2x PyTorch"):
        assert_no_worse_than_torch(ours, ref, torch_out, "worse")
    # Through check_result too: 2 ulps off at the largest element is within the table's
    # tolerance, but worse than 2× torch's (at most half an ulp there).
    idx = int(ref.abs().argmax())
    val = float(torch_out[idx])
    ulp = 2.0 ** (math.floor(math.log2(abs(val))) - 7)
    ours = torch_out.clone()
    ours[idx] = val + 2 * ulp
    with pytest.raises(AssertionError, match="exceeds 2x PyTorch"):
        check_result(ours, ref, fwd_tol(torch.bfloat16), "worse", torch_out, torch.bfloat16)
    check_result(torch_out, ref, fwd_tol(torch.bfloat16), "same", torch_out, torch.bfloat16)
    # NaN where torch is finite is an infinite error.
    ours = torch_out.clone()
    ours[0] = float("nan")
    with pytest.raises(AssertionError):
        check_result(ours, ref, (1.0, 1.0), "nan", torch_out)


def test_bitwise_helpers():
    a = torch.tensor([0.0, 1.0, float("nan")])
    assert bitwise_equal(a, a.clone())
    assert not bitwise_equal(a, torch.tensor([-0.0, 1.0, float("nan")]))
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_bitwise_equal(a, torch.tensor([0.0, 1.0 + 2**-23, float("nan")]), "ulp")
    with pytest.raises(AssertionError, match="dtype"):
        assert_bitwise_equal(a, a.double(), "dtype")


def test_tolerances_follow_the_table():
    assert fwd_tol(torch.float32) == (1e-5, 1e-5)
    assert fwd_tol(torch.float16) == (1e-4, 1e-3)
    assert fwd_tol(torch.bfloat16) == (1e-3, 1.6e-2)
    assert fwd_tol(torch.float64) == (1e-12, 1e-12)
    assert param_grad_tol(torch.float32, 64 * 1024) == (1e-4, 1e-5)
    assert param_grad_tol(torch.float32, 64 * 1024 + 1) == (1e-3, 1e-3)
    assert param_grad_tol(torch.float64, 1024) == (2e-10, 1e-10)


def test_make_input_rows_are_well_conditioned():
    x = make_input((500, 3), torch.float32, generator=torch.Generator().manual_seed(0))
    std = x.double().std(-1, unbiased=False)
    mean = x.double().mean(-1)
    assert bool((std > 0.49).all() and (std < 2.01).all())
    assert bool(((mean.abs() + std) / std).max() <= 5.1)
