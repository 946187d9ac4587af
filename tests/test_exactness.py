"""Exact properties that override the tolerance table (reliability.md F4, F26): a constant row
normalises to exactly β, and N == 1 gives exactly β with zero dx and zero dγ. They fail for
kernels that fold (x − mean)·rstd·γ + β into x·scale + shift or fuse it with an FMA
(pytorch#108072, pytorch#73161, pytorch#188372)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from norm_testing import (
    AFFINE,
    DTYPE_CASES,
    DTYPE_IDS,
    affine_name,
    assert_bitwise_equal,
    make_params,
)

import layernorm_ext

CONSTANTS = [0.0, 1.0, -3.5, 1234.0, 1e6, 2.0, 14.0]


def _expected_constant_output(M, N, w, b, dtype):
    """What a constant row must give: β exactly (0 without β), in the input's dtype."""
    if b is None:
        return torch.zeros(M, N, dtype=dtype)
    return b.to(dtype).expand(M, N)


def _assert_equals_beta(y, b, label):
    if b is None:
        # (x − mean) is +0, so y is ±0 (the sign of γ): compare values, not bits.
        assert bool((y == 0).all()), f"{label}: y != 0 for a constant row: {y.flatten()[:8]}"
    else:
        # β in the parameter dtype, rounded once to the output dtype (mixed fp32 β): exact.
        assert_bitwise_equal(y, b.to(y.dtype).expand_as(y).contiguous(), label)


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_constant_rows_give_beta(isa, case, gen):
    for c in CONSTANTS:
        value = torch.tensor(c).to(case.x)
        if not torch.isfinite(value):
            continue  # 1e6 overflows fp16: an infinite row is the NaN tests' business
        for N in (1, 2, 7, 16, 17, 100, 1027, 4099):
            x = torch.full((3, N), c, dtype=case.x)
            for eps in (1e-5, 1e-6, 1e-12):
                for has_w, has_b in AFFINE:
                    w, b = make_params((N,), case.param, has_w, has_b, generator=gen)
                    y = layernorm_ext.layer_norm(x, N, w, b, eps)
                    label = f"[{isa} {case.id} c={c} N={N} eps={eps} {affine_name(has_w, has_b)}]"
                    _assert_equals_beta(y, b, label)
                    if has_w:
                        yz = layernorm_ext.layer_norm(x, N, w, b, eps, zero_centered_weight=True)
                        _assert_equals_beta(yz, b, f"{label} zcw")


def test_constant_rows_of_a_mixed_batch(isa, gen):
    """Constant rows next to ordinary rows; the [[2, 2], [14, 14]], eps=1e-6 case of #108072."""
    x = torch.tensor([[2.0, 2.0], [14.0, 14.0]])
    assert bool((layernorm_ext.layer_norm(x, 2, eps=1e-6) == 0).all())
    for case in DTYPE_CASES:
        N = 37
        x = torch.randn(6, N, generator=gen).to(case.x)
        x[1] = 1234
        x[4] = -3.5
        w, b = make_params((N,), case.param, True, True, generator=gen)
        y = layernorm_ext.layer_norm(x, N, w, b)
        for r in (1, 4):
            _assert_equals_beta(y[r : r + 1], b, f"[{isa} {case.id}] constant row {r}")


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_constant_rows_eps_zero_are_nan_like_torch(isa, case):
    x = torch.full((2, 9), 3.0, dtype=case.x)
    y = layernorm_ext.layer_norm(x, 9, eps=0.0)
    assert bool(torch.isnan(y).all()), "0/0: a constant row with eps=0 is NaN, as in PyTorch"
    assert bool(torch.isnan(F.layer_norm(x, (9,), eps=0.0)).all())


def test_fp16_zeros_tiny_eps_is_not_nan(isa):
    """pytorch#41527: fp16 zeros with eps=1e-12 gave NaN."""
    for dtype in (torch.float16, torch.bfloat16):
        y = layernorm_ext.layer_norm(torch.zeros(1, 10, dtype=dtype), 10, eps=1e-12)
        assert bool((y == 0).all()), f"{dtype}: {y}"


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_hidden_one_is_beta_with_zero_gradients(isa, case, gen):
    values = torch.tensor([[-0.8], [1e6], [0.0], [3.25], [-1e-3], [65504.0], [7.0]])
    for M in (1, 7, 300):
        x = values.repeat(M // 7 + 1, 1)[:M].to(case.x)
        x = x[torch.isfinite(x).flatten()]
        dy = torch.randn(x.shape[0], 1, generator=gen).to(case.x)
        for has_w, has_b in AFFINE:
            w, b = make_params((1,), case.param, has_w, has_b, generator=gen)
            label = f"[{isa} {case.id} M={M} N=1 {affine_name(has_w, has_b)}]"
            xs = x.clone().requires_grad_(True)
            ws = None if w is None else w.clone().requires_grad_(True)
            bs = None if b is None else b.clone().requires_grad_(True)
            y = layernorm_ext.layer_norm(xs, 1, ws, bs)
            _assert_equals_beta(y.detach(), b, f"{label} y")
            y.backward(dy)
            assert bool((xs.grad == 0).all()), f"{label}: dx != 0: {xs.grad.flatten()[:8]}"
            if has_w:
                assert bool((ws.grad == 0).all()), f"{label}: dγ != 0: {ws.grad}"
            if has_b:
                expected = dy.double().sum(0)
                got = bs.grad.double()
                assert math.isclose(got.item(), expected.item(), rel_tol=2e-2, abs_tol=1e-2), (
                    f"{label}: dβ {got.item()} != Σdy {expected.item()}"
                )


def test_antisymmetry_without_affine(isa, gen):
    """LN(−x) == −LN(x) bitwise (reliability.md P2)."""
    for case in DTYPE_CASES:
        for N in (3, 16, 33, 1000):
            x = torch.randn(9, N, generator=gen).to(case.x)
            y = layernorm_ext.layer_norm(x, N)
            assert_bitwise_equal(layernorm_ext.layer_norm(-x, N), -y, f"[{isa} {case.id} N={N}]")


# --- fp32 -> bf16 output rounding ---------------------------------------------------------------

# fp32 bit patterns that a bf16 store must round exactly: ties to even (both parities), either
# side of a tie, subnormals, values that round up into the next binade or to infinity, zeros,
# infinities and NaNs of several payloads and signs.
_TIES = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000]  # and neighbours
_CARRIES = [0x3FFFFFFF, 0x3F7F8000, 0x3F7FFFFF]  # round up into the next binade
_SUBNORMALS = [0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x807F8000, 0x00400000]
_LARGEST = [0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7F8000]  # two of them round to infinity
_ZEROS_INFS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000]
_NANS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00001, 0xFF800001]
_BF16_ROUNDING_BITS = _TIES + _CARRIES + _SUBNORMALS + _LARGEST + _ZEROS_INFS + _NANS


def _bf16_round_bits(bits: torch.Tensor) -> torch.Tensor:
    """Round to nearest even of fp32 bit patterns (int64 holding uint32) to bf16 bits, NaN to the
    canonical 0x7FC0: c10::BFloat16's rounding, written out on integers."""
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    nan = ((bits & 0x7F800000) == 0x7F800000) & ((bits & 0x007FFFFF) != 0)
    return torch.where(nan, torch.full_like(rounded, 0x7FC0), rounded)


@pytest.mark.parametrize("finite", [False, True], ids=["with_nonfinite", "finite"])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 1000, 1100, 4136])
def test_bf16_output_rounding_is_exact(isa, N, finite, gen):
    """bf16 outputs are the fp32 results rounded to nearest even, subnormals kept and NaN
    canonical, on every kernel set and at every position of a row (vector pairs, single vectors,
    the masked tail). RMSNorm of a ±1 row with eps = 0 has rstd = 1 exactly, so with an fp32
    weight y = ±w exactly in fp32 before the store, and w carries the bit patterns above.
    finite: only finite patterns (random ones with an all-ones exponent cleared), so no output
    can be a NaN and the stores that leave out their NaN test (norm_krnl.cpp, kFinite) run;
    values that round up to infinity are among them."""
    # Two tasks of at least four rows on two threads (the kFinite stores need four), each with a
    # group of four short rows, one of them with a row alone.
    M = 9
    specials = torch.tensor(_BF16_ROUNDING_BITS, dtype=torch.int64)
    random_bits = torch.randint(0, 2**32, (N,), generator=gen, dtype=torch.int64)
    if finite:
        specials = specials[(specials & 0x7F800000) != 0x7F800000]
        random_bits = torch.where(
            (random_bits & 0x7F800000) == 0x7F800000, random_bits & ~0x00800000, random_bits
        )
    # The special patterns at every offset modulo 32 across the rows (rolled per row below).
    w_bits = random_bits.clone()
    w_bits[: min(N, len(specials))] = specials[: min(N, len(specials))]
    signs = torch.randint(0, 2, (M, N), generator=gen) * 2 - 1
    x = signs.to(torch.bfloat16)
    for shift in range(0, 32, 7):
        bits = torch.roll(w_bits, shift)
        w = (bits - (bits >= 2**31).to(torch.int64) * 2**32).to(torch.int32).view(torch.float32)
        y = layernorm_ext.rms_norm(x, (N,), w, eps=0.0)
        # y = x * w: the sign bit flips where x = -1 (NaN lanes are canonical either way).
        flip = (signs < 0).to(torch.int64) * 0x80000000
        expected = _bf16_round_bits(bits.unsqueeze(0) ^ flip)
        got = y.view(torch.int16).to(torch.int64) & 0xFFFF
        bad = (got != expected).nonzero()
        assert bad.numel() == 0, (
            f"[{isa} N={N} shift={shift}] {bad.shape[0]} elements misrounded, first at "
            f"{tuple(bad[0].tolist())}: fp32 {int((bits.unsqueeze(0) ^ flip)[tuple(bad[0])]):#010x}"
            f" -> {int(got[tuple(bad[0])]):#06x}, expected {int(expected[tuple(bad[0])]):#06x}"
        )


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("N", [64, 100, 1000, 4136])
def test_bf16_params_nonfinite_give_canonical_nan(isa, op, N, gen):
    """bf16 input with bf16 γ / β holding NaNs and infinities: the outputs they make NaN are
    the canonical 0x7FC0 (as c10::BFloat16 rounds), never a NaN with the parameter's payload
    (0x7FFF, 0xFFFF) nor -NaN, and every other output matches the float64 reference. Nine rows:
    on two threads, two tasks of at least four rows, so the per-task parameter test that lets
    finite rows skip the NaN test (norm_krnl.cpp, kFinite) runs and must see these values."""
    M = 9
    x = torch.randn(M, N, generator=gen).to(torch.bfloat16)
    w = (torch.rand(N, generator=gen) + 0.5).to(torch.bfloat16)
    b = torch.randn(N, generator=gen).to(torch.bfloat16)
    w_bits = w.view(torch.int16)
    b_bits = b.view(torch.int16)
    # NaNs with full payloads (rounding them as numbers would keep 0x7FFF / 0xFFFF), and +inf
    # in γ where a zero x̂ makes 0 * inf, the default -NaN (0xFFC00000 in fp32).
    w_bits[3] = 0x7FFF
    w_bits[N - 2] = -1  # 0xFFFF
    w_bits[N // 2] = 0x7F80
    x[:, N // 2] = 0.0  # RMSNorm: x̂ = 0 there
    if op == "layer_norm":
        b_bits[N // 3] = 0x7FFF
        # LayerNorm: x̂ = 0 where x equals the row's mean; put each row's mean there.
        x[:, N // 2] = x.double().mean(1).to(torch.bfloat16)
        y = layernorm_ext.layer_norm(x, (N,), w, b)
        xd = x.double()
        mean = xd.mean(1, keepdim=True)
        xhat = (xd - mean) / torch.sqrt(xd.var(1, unbiased=False, keepdim=True) + 1e-5)
        ref = xhat * w.double() + b.double()
    else:
        y = layernorm_ext.rms_norm(x, (N,), w)
        xd = x.double()
        xhat = xd * torch.rsqrt(xd.square().mean(1, keepdim=True) + torch.finfo(torch.float32).eps)
        ref = xhat * w.double()
    got = y.view(torch.int16).to(torch.int64) & 0xFFFF
    label = f"[{isa} {op} M={M} N={N}]"
    expected_nan = ref.isnan()
    # The mean put at N // 2 is rounded to bf16, so x̂ there is only near 0 for LayerNorm:
    # inf * x̂ is then ±inf (or NaN where it is exactly 0). Judge that column by its own rule.
    got_nan = y.isnan()
    expected_nan[:, N // 2] |= got_nan[:, N // 2]
    assert bool((got_nan == expected_nan).all()), (
        f"{label}: NaN at {(got_nan != expected_nan).nonzero()[:4].tolist()}"
    )
    bad = (got[expected_nan] != 0x7FC0).nonzero()
    assert bad.numel() == 0, (
        f"{label}: {bad.shape[0]} NaN outputs not canonical, e.g. "
        f"{int(got[expected_nan][bad[0]]):#06x}"
    )
    assert bool(got_nan.any()), f"{label}: no NaN produced"
    finite = ~expected_nan & ref.isfinite()
    torch.testing.assert_close(
        y.double()[finite], ref[finite], rtol=2**-7, atol=2**-7, msg=lambda m: f"{label}: {m}"
    )
