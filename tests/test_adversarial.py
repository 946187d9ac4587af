"""Adversarial input families of design/reliability.md §5, for both ops (layer_norm, rms_norm),
forward and backward, on every CPU kernel set.

Each family is checked against a float64 reference (the corrected two-pass one of
reliability_utils where the row is ill-conditioned), an exact closed form, or PyTorch's own
inf/NaN pattern where the spec asks for it. Families the core suite already covers are not
repeated: F1 (the tolerance grids), F4 and F26 for LayerNorm (test_exactness), F11 and the NaN-in-γ
forward case (test_nonfinite), F24 (test_errors) and the basic F20 / F21 / F22 / F23 cases of
LayerNorm's forward. What is added here is the rest of each family: RMSNorm, the backward, every
ISA, and the sizes and layouts those tests leave out.

Heavy references (large N or M) are computed once per test and the ISAs looped inside, instead of
recomputing them for each ``isa`` parametrization.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from norm_testing import (
    DTYPE_CASES,
    DTYPE_IDS,
    ISAS,
    assert_bitwise_equal,
    assert_close_to_ref,
    bitwise_equal,
    check_result,
    dx_tol,
    fwd_tol,
    make_input,
    make_params,
    param_grad_tol,
    use_isa,
)
from reliability_utils import (
    KAPPA_C,
    LN,
    OP_IDS,
    OPS,
    RMS,
    U_ACC,
    U_OUT,
    accurate_layer_norm_parts,
    accurate_layer_norm_ref,
    assert_close_kappa,
    assert_finite,
    assert_same_nonfinite_pattern,
    fit_loglog_slope,
    layer_norm_grads_closed_form,
    misaligned_copy,
    row_kappa,
    standardized_rows,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import layernorm_ext
from layernorm_ext._reference import exact_row_moments, rms_norm_eps

ops = torch.ops.layernorm_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_NAMES = ["fp32", "fp64", "fp16", "bf16"]
FLT_MAX = torch.finfo(torch.float32).max


def _dt(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[DTYPES.index(dtype)]


def _saturate(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 reference with values that overflow ``dtype`` on rounding replaced by ±inf."""
    limit = torch.finfo(dtype).max * (1 + U_OUT[dtype])
    return torch.where(ref.abs() > limit, ref.sign() * math.inf, ref)


def _rows_close(actual, ref, tol, what, scale):
    """The tolerance check on rows divided by their natural scale ``scale`` ([M]): for rows whose
    magnitude the test sets (10^k scalings, 1e30 rows), where a fixed atol would be vacuous or
    impossible. The reference is first saturated to ``actual``'s dtype (overflow is ±inf)."""
    M = scale.numel()
    s = scale.double().reshape(M, 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    a = actual.detach().double().reshape(M, -1) / s
    r = _saturate(ref.detach().double().reshape(M, -1), actual.dtype) / s
    assert_close_to_ref(a, r, tol[0], tol[1], what)


def _y_scale(ref: torch.Tensor) -> torch.Tensor:
    """max|ref| of each row: the scale of an output row."""
    return ref.detach().double().reshape(ref.shape[0], -1).abs().amax(dim=1)


def _dx_scale(op, x, dy, N, eps="default") -> torch.Tensor:
    """rstd·max|dy| of each row: the size of dx's terms before they cancel (γ = 1)."""
    eps = op.default_eps() if eps == "default" else eps
    rows = x.detach().double().reshape(-1, N)
    if op.is_ln:
        var = rows.var(dim=1, unbiased=False)
    else:
        var, eps = rows.pow(2).mean(dim=1), rms_norm_eps(x.dtype, eps)
    rstd = 1.0 / torch.sqrt(var + eps)
    return rstd * dy.detach().double().reshape(-1, N).abs().amax(dim=1)


def _assert_correct_beyond_range(y, ref, tol, what):
    """Beyond the fp32 accumulator's range (F7 / F8) every finite row must still be correct
    (within ``tol`` of the float64 reference): the kernels rescale such rows by a power of two.
    PyTorch CPU returns inf / NaN there; the catalogue's silent failure (tt-metal#55159:
    m = 1e19 → 0, i.e. rstd = 1/sqrt(inf) = 0 and y = β) is what this rules out."""
    for r in range(y.shape[0]):
        a, e = y[r].double(), ref[r]
        assert_finite(y[r], f"{what} row {r}")
        err = (a - e).abs()
        assert bool((err <= tol[0] + tol[1] * e.abs()).all()), (
            f"{what} row {r}: {a[:3].tolist()}…, exact {e[:3].tolist()}…, max err {err.max():.3e}"
        )


# --- F2: uniform rows, eps = 0 ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_f2_uniform_rows_have_zero_mean_unit_variance(isa, dtype, gen):
    delta = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-1)
    for N in (5, 64, 1000, 4097):
        x = torch.empty(16, N, dtype=torch.float64).uniform_(0, 10, generator=gen).to(dtype)
        y = LN(x, N, eps=0.0).double()
        mean = y.mean(dim=1)
        var = y.var(dim=1, unbiased=False)
        label = f"[{isa} {_dt(dtype)} N={N}]"
        assert float(mean.abs().max()) <= delta, f"{label}: row mean {mean.abs().max():.3e}"
        assert float((var - 1).abs().max()) <= delta, f"{label}: row var {var}"


# --- F3: large mean, the κ sweep ----------------------------------------------------------------

MUS = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6]
SIGMAS = [1.0, 1e-3]


def _kappa_configs(dtype, N, gen):
    """The sweep's (label, x, dy, κ, ref y, ref dx), references computed once for all ISAs.
    Configurations with a constant row (σ below the dtype's resolution at μ) or beyond the
    dtype's range are left out: they are F4's and F7's business."""
    configs = []
    for mu in MUS:
        for sigma in SIGMAS:
            x = (mu + sigma * standardized_rows(6, N, gen)).to(dtype)
            dy = torch.randn(6, N, generator=gen).to(dtype)
            xd = x.double()
            if not bool(torch.isfinite(x).all()) or bool((xd == xd[:, :1]).all(dim=1).any()):
                continue
            ref_y = accurate_layer_norm_ref(x, N)
            ref_dx = layer_norm_grads_closed_form(dy, x, N)[0]
            configs.append((f"mu={mu:g} sigma={sigma:g}", x, dy, row_kappa(x, N), ref_y, ref_dx))
    return configs


def _max_row_error(actual, ref):
    return float(((actual.double() - ref).abs().amax(dim=1) / ref.abs().amax(dim=1)).max())


@pytest.mark.parametrize("N", [64, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_f3_kappa_sweep(dtype, N, gen):
    """mu + sigma·randn over μ ∈ 1…1e6, σ ∈ {1, 1e-3}, on every ISA: the κ-scaled tolerance
    holds at every point, and the fitted log-log slope of the error (relative to max|ref| per
    row, maximised over rows) against κ (median over rows) is ≤ 1.2: Welford gives ~1,
    E[x²] − E[x]² ~2 and then NaN. The forward shifts each row by its first element, so its
    error is flat in κ; dx uses the saved fp32 mean and grows like u·κ."""
    configs = _kappa_configs(dtype, N, gen)
    kappas = [float(c[3].median()) for c in configs]
    span = math.log10(max(kappas) / min(kappas))
    assert span >= 2, f"κ sweep spans only {span:.1f} decades: {kappas}"
    for isa in ISAS:
        errors = {"y": [], "dx": []}
        with use_isa(isa):
            runs = [LN.run(x, N, dy=dy) for _, x, dy, _, _, _ in configs]
        for (label, _, _, kappa, ref_y, ref_dx), (y, dx, _, _) in zip(configs, runs, strict=True):
            what = f"[{isa} {_dt(dtype)} N={N} {label}]"
            assert_close_kappa(y, ref_y, kappa, dtype, f"{what} y")
            assert_close_kappa(dx, ref_dx, kappa, dtype, f"{what} dx", tol=dx_tol(dtype))
            errors["y"].append(_max_row_error(y, ref_y))
            errors["dx"].append(_max_row_error(dx, ref_dx))
        for name, errs in errors.items():
            slope = fit_loglog_slope(kappas, errs, U_ACC[dtype] / 16)
            detail = ", ".join(f"κ={k:.1e}: {e:.1e}" for k, e in zip(kappas, errs, strict=True))
            assert slope <= 1.2, f"[{isa} {_dt(dtype)} N={N}] {name} slope {slope:.2f}: {detail}"


def _f3_special_rows(gen):
    """The catalogue's cancellation cases (reliability.md §3)."""
    return [
        ("full(256, 1234.)", torch.full((1, 256), 1234.0, dtype=torch.float64)),
        ("[40000..40003]", torch.tensor([[40000.0, 40001.0, 40002.0, 40003.0]])),
        ("1449±1, N=16", torch.tensor([[1449.0, 1448.0, 1449.0, 1450.0] * 4])),
        ("randn(5,4)+2000", torch.randn(5, 4, dtype=torch.float64, generator=gen) + 2000),
        ("1e4 + i·1e-3", 1e4 + 1e-3 * torch.arange(1024, dtype=torch.float64)[None]),
        ("1e6 + randn, N=33", 1e6 + torch.randn(3, 33, dtype=torch.float64, generator=gen)),
    ]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f3_catalogue_rows(isa, case, op, gen):
    for name, rows in _f3_special_rows(gen):
        x = rows.to(case.x)
        if not bool(torch.isfinite(x).all()):
            continue
        M, N = x.shape
        w, b = make_params((N,), case.param, True, True, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        label = f"[{isa} {case.id} {op} {name}]"
        y, dx, dw, db = op.run(x, N, w, b, dy)
        assert_finite(y, f"{label} y")
        assert_finite(dx, f"{label} dx")
        if not op.is_ln:
            ref = op.ref_grads(dy, x, N, w)
            check_result(y, op.ref(x, N, w), fwd_tol(case.x), f"{label} y")
            check_result(dx, ref[0], dx_tol(case.x), f"{label} dx")
            check_result(dw, ref[1], param_grad_tol(case.param, M), f"{label} dw")
            continue
        kappa = row_kappa(x, N)
        xhat, mean, rstd = accurate_layer_norm_parts(x, N, 1e-5)
        if N <= 64:
            # The float64 reference itself, against exact rational moments.
            for r in range(M):
                m, v = exact_row_moments(x[r])
                assert abs(Fraction(float(mean[r])) - m) <= abs(m) * Fraction(1, 2**50), label
                exact_rstd = 1 / math.sqrt(float(v) + 1e-5)
                assert math.isclose(float(rstd[r]), exact_rstd, rel_tol=1e-13), label
        ref_y = accurate_layer_norm_ref(x, N, w, b)
        assert_close_kappa(y, ref_y, kappa, case.x, f"{label} y")
        rdx, rdw, rdb = layer_norm_grads_closed_form(dy, x, N, w, b)
        assert_close_kappa(dx, rdx, kappa, case.x, f"{label} dx", tol=dx_tol(case.x))
        atol, rtol = param_grad_tol(case.param, M)
        check_result(db, rdb, (atol, rtol), f"{label} db")
        # dγ = Σ_r dy_r·x̂_r: row r's x̂ carries an error up to c·u·κ_r·max|x̂_r|.
        row_slack = KAPPA_C * U_ACC[case.x] * kappa * xhat.abs().amax(dim=1)
        slack = (dy.double().abs() * row_slack[:, None]).sum(0)
        err = (dw.double() - rdw).abs()
        assert bool((err <= atol + rtol * rdw.abs() + slack).all()), f"{label} dw: {err.max():.3e}"
        # The saved statistics: finite, var ≥ 0 (rstd ≤ 1/sqrt(eps)), close to the exact ones.
        _, m_out, r_out = op.stats(x, N, w, b)
        m_out, r_out = m_out.double().flatten(), r_out.double().flatten()
        assert bool((r_out > 0).all() and (r_out <= 1 / math.sqrt(1e-5) * (1 + 1e-6)).all())
        std = (1 / rstd**2 - 1e-5).clamp_min(0).sqrt()
        assert bool(((m_out - mean).abs() <= 4 * U_ACC[case.x] * (mean.abs() + std)).all()), (
            f"{label}: mean {m_out} vs {mean}"
        )
        assert bool(((r_out - rstd).abs() <= 1e3 * U_ACC[case.x] * rstd).all()), (
            f"{label}: rstd {r_out} vs {rstd}"
        )


# --- F3b: the 16-bit forward's one-pass statistics ------------------------------------------------


def _offset_rows(N: int, offsets, dtype, gen) -> torch.Tensor:
    """Standard-normal rows (rounded to ``dtype``) whose first element, the kernels' shift, is
    set to ``offsets[r]`` standard deviations from the row's mean: below 2 the 16-bit forward
    keeps its one-pass variance Σd² − Σd·mean(d), above 2 it must take the exact second pass."""
    x = torch.randn(len(offsets), N, generator=gen, dtype=torch.float64)
    x[:, 1:] -= x[:, 1:].mean(dim=1, keepdim=True)
    x[:, 1:] /= x[:, 1:].std(dim=1, unbiased=False, keepdim=True)
    x[:, 0] = torch.tensor(offsets, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("N", [100, 768, 1024, 1040, 4096, 5000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_f3_one_pass_statistics_stay_exact(isa, dtype, N, gen):
    """fp16 / bf16 rows get their variance in one pass where that cannot cancel, and by the
    exact second pass where it could (the shift, the row's first element, far from the mean).
    Either way the saved mean and rstd stay within a few fp32 ulps of the float64 moments of the
    stored values, and y within the usual tolerance: a one-pass variance kept for the 30-sigma
    row would be off by ~1e-4. Short widened rows (N ≤ 1024 on AVX-512) and long rows both. On
    AVX-512, fp16 rows (and bf16 rows with AVX512-BF16) take unshifted sums instead: there the
    offset is the row's mean, and the 1000-offset rows are the ones that need the exact pass."""
    offsets = [0.0, 0.5, -1.5, 1.9, 2.1, -3.0, 8.0, -30.0, 200.0]
    x = _offset_rows(N, offsets, dtype, gen)
    shifted = 1000 + x.double()  # a large common offset: the shift removes it exactly
    for rows in (x, shifted.to(dtype)):
        M = rows.shape[0]
        w, b = make_params((N,), dtype, True, True, generator=gen)
        with use_isa(isa):
            y, mean, rstd = LN.stats(rows, N, w, b)
        xd = rows.double()
        ref_mean = xd.mean(dim=1)
        ref_var = xd.var(dim=1, unbiased=False)
        ref_rstd = 1 / torch.sqrt(ref_var + 1e-5)
        label = f"[{isa} {_dt(dtype)} N={N}]"
        u = U_ACC[torch.float32]
        # The mean is accumulated on x - x0: its error scales with the row's spread.
        spread = (xd - ref_mean[:, None]).abs().amax(dim=1)
        mean_err = (mean.double().flatten() - ref_mean).abs() / (ref_mean.abs() + spread)
        rstd_err = (rstd.double().flatten() - ref_rstd).abs() / ref_rstd
        assert float(mean_err.max()) <= 8 * u, f"{label} mean errors {mean_err.tolist()}"
        assert float(rstd_err.max()) <= 32 * u, f"{label} rstd errors {rstd_err.tolist()}"
        ref_y = (xd - ref_mean[:, None]) * ref_rstd[:, None] * w.double() + b.double()
        check_result(y, ref_y.reshape(M, N), fwd_tol(dtype), f"{label} y")


@pytest.mark.parametrize("N", [100, 768, 1040, 5000])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_f3_bf16_tiny_rows_take_the_exact_statistics(isa, op, N, gen):
    """bf16 rows too small for LayerNorm's AVX512-BF16 dot-product statistics, which read
    subnormal inputs as zero and flush subnormal products: 1e-39 rows (subnormal values) and
    1e-20 rows (squares below fp32's normal range). They must take the exact path, so the saved
    statistics match float64: a flushed mean would be 0 (an error of ~|mean| / spread). RMSNorm
    (whose sum of squares, flushed, would give rstd = inf at eps = 0) is held to the same.
    Short and long rows, every ISA."""
    dtype = torch.bfloat16
    u = U_ACC[torch.float32]
    for scale, eps in ((1e-39, 1e-12), (1e-20, 0.0)):
        x = (torch.randn(4, N, generator=gen, dtype=torch.float64) * scale).to(dtype)
        w, b = make_params((N,), dtype, True, True, generator=gen)
        with use_isa(isa):
            y, mean, rstd = op.stats(x, N, w, b, eps=eps)
        label = f"[{isa} {op} N={N} {scale:g}·randn eps={eps}]"
        xd = x.double()
        if op.is_ln:
            ref_mean = xd.mean(dim=1)
            ref_var = xd.var(dim=1, unbiased=False)
            spread = (xd - ref_mean[:, None]).abs().amax(dim=1)
            # fp32 subnormal arithmetic rounds at 2^-149: ~1e-6 of these rows' spread.
            mean_err = (mean.double().flatten() - ref_mean).abs() / (ref_mean.abs() + spread)
            assert float(mean_err.max()) <= 1e-4, f"{label} mean errors {mean_err.tolist()}"
        else:
            ref_var = xd.square().mean(dim=1)
        ref_rstd = 1 / torch.sqrt(ref_var + eps)
        # A sum of subnormal squares keeps ~17 bits: relative error ~1e-5.
        rstd_err = (rstd.double().flatten() - ref_rstd).abs() / ref_rstd
        assert float(rstd_err.max()) <= max(32 * u, 1e-4), f"{label} rstd {rstd_err.tolist()}"
        check_result(y, op.ref(x, N, w, b, eps=eps), fwd_tol(dtype), f"{label} y")


# --- F5: near-constant rows -----------------------------------------------------------------------


def _spike_expected(N: int, delta: float, k: int, eps: float) -> torch.Tensor:
    """LayerNorm of a constant row with ``delta`` added at position k, in float64 (exact form)."""
    var = delta * delta * (N - 1) / (N * N)
    out = torch.full((N,), -delta / N / math.sqrt(var + eps), dtype=torch.float64)
    out[k] = delta * (1 - 1 / N) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_f5_near_constant_rows(isa, dtype):
    """full(10240, 256.) with last = 255 (the var < 0 → NaN case of ort#21935), and constants
    with one element moved by one ulp: finite, var ≥ 0, and equal to the exact closed form."""
    label = f"[{isa} {_dt(dtype)}]"
    x = torch.full((1, 10240), 256.0, dtype=dtype)
    x[0, -1] = 255.0
    for eps in (1e-5, 0.0):
        y, _, rstd = LN.stats(x, 10240, eps=eps)
        expected = _spike_expected(10240, -1.0, 10239, eps)[None]
        check_result(y, expected, fwd_tol(dtype), f"{label} 256/255 eps={eps} y")
        assert float(rstd) > 0 and math.isfinite(float(rstd)), f"{label}: rstd {rstd}"
        check_result(
            RMS(x, 10240, eps=eps), RMS.ref(x, 10240, eps=eps), fwd_tol(dtype), f"{label} rms"
        )
    constants = [1.0, -3.5, 1234.0] + ([] if dtype == torch.float16 else [1e6])
    for c in constants:
        base = torch.tensor(c, dtype=dtype)
        for direction in (math.inf, -math.inf):
            moved = torch.nextafter(base, torch.tensor(direction, dtype=dtype))
            delta = float(moved.double() - base.double())
            for N in (7, 64, 1027):
                for k in sorted({0, N // 2, N - 1}):
                    x = torch.full((1, N), c, dtype=dtype)
                    x[0, k] = moved
                    for eps in (1e-5, 0.0):
                        what = f"{label} c={c} {delta:+.3g} at {k}/{N} eps={eps}"
                        y, _, rstd = LN.stats(x, N, eps=eps)
                        assert_finite(y, what)
                        r = float(rstd)
                        limit = math.inf if eps == 0 else (1 / math.sqrt(eps)) * (1 + 1e-6)
                        assert 0 < r <= limit, f"{what}: rstd {r} (var < 0 or NaN)"
                        expected = _spike_expected(N, delta, k, eps)[None]
                        check_result(y, expected, fwd_tol(dtype), what)


# --- F6: a single spike -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_f6_single_spike(isa, dtype, gen):
    """zeros with one spike A: LayerNorm gives √(N−1)·sign(A) at the spike and −sign(A)/√(N−1)
    elsewhere (up to eps, included exactly), RMSNorm gives A/sqrt(A²/N + eps) and exact zeros;
    the backward matches the closed form. The spike sits first (it is then the kernels' shift),
    in the middle, or in the vector tail."""
    amplitudes = [1.0, -1.0, 1e4, -6e4, 6e4]
    for N in (2, 17, 1024, 4099):
        dy = torch.randn(1, N, generator=gen).to(dtype)
        for A in amplitudes:
            a = float(torch.tensor(A, dtype=dtype))  # the stored amplitude (bf16 rounds 6e4)
            for k in sorted({0, N // 2, N - 1}):
                x = torch.zeros(1, N, dtype=dtype)
                x[0, k] = a
                what = f"[{isa} {_dt(dtype)} N={N} A={a:g} at {k}]"
                y, dx, _, _ = LN.run(x, N, dy=dy)
                check_result(y, _spike_expected(N, a, k, 1e-5)[None], fwd_tol(dtype), f"{what} y")
                rdx = layer_norm_grads_closed_form(dy, x, N)[0]
                check_result(dx, rdx, dx_tol(dtype), f"{what} dx")
                yr, dxr, _, _ = RMS.run(x, N, dy=dy)
                others = torch.ones(N, dtype=torch.bool)
                others[k] = False
                assert bool((yr[0, others] == 0).all()), f"{what} rms: zeros not exactly 0"
                eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
                expected = a / math.sqrt(a * a / N + eps)
                check_result(
                    yr[0, k : k + 1],
                    torch.tensor([expected], dtype=torch.float64),
                    fwd_tol(dtype),
                    f"{what} rms y",
                )
                check_result(dxr, RMS.closed_form_grads(dy, x, N)[0], dx_tol(dtype), f"{what} dx")


# --- F7: alternating extreme rows -----------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_f7_alternating_extreme_rows(isa, dtype, op):
    """Rows [m, 2m, m, 2m, …] (tenstorrent/tt-metal#55159: m = 1e19 gave 0). LayerNorm gives ∓1
    while N·m² < FLT_MAX (the partial sums are representable in the fp32 accumulator), with
    the backward checked too; beyond that the row is rescaled and still correct (PyTorch CPU
    gives inf / NaN there). RMSNorm: the same rule with its sum of squares."""
    limit = torch.finfo(torch.float64).max if dtype == torch.float64 else FLT_MAX
    ms = [1.0, 1e2, 1e4, 3e4] if dtype == torch.float16 else [1.0, 1e10, 1e15, 1e16, 1e19, 1e30]
    for N in (2, 8, 64, 1000):
        for m in ms:
            x = (torch.tensor([m, 2 * m], dtype=torch.float64).repeat(N // 2)[None]).to(dtype)
            what = f"[{isa} {_dt(dtype)} {op} N={N} m={m:g}]"
            y = op(x, N)
            square_sum = N * m * m if op.is_ln else N * 2.5 * m * m
            if square_sum < limit:
                ref = accurate_layer_norm_ref(x, N) if op.is_ln else op.ref(x, N)
                check_result(y, ref, fwd_tol(dtype), f"{what} y")
                # The backward, with dy on the row's scale so that dx is O(1).
                dy = (m * torch.linspace(-1, 1, N, dtype=torch.float64)[None]).to(dtype)
                _, dx, _, _ = op.run(x, N, dy=dy)
                rdx = op.closed_form_grads(dy, x, N)[0]
                _rows_close(dx, rdx, dx_tol(dtype), f"{what} dx", _dx_scale(op, x, dy, N))
            else:
                ref = accurate_layer_norm_ref(x, N) if op.is_ln else op.ref(x, N)
                _assert_correct_beyond_range(y, ref, fwd_tol(dtype), what)


# --- F8: extreme magnitudes -----------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_f8_extreme_magnitudes(isa, op, gen):
    """fp16 ±U(3e4, 6.5e4) is always finite and correct; fp32 / bf16 rows with |x|·√N up to 1e19
    are finite and correct; so are ±3e38 rows, where even x − x0 overflows fp32."""
    for N in (7, 64, 1000):
        sign = torch.where(torch.rand(4, N, generator=gen) < 0.5, -1.0, 1.0).double()
        unit = torch.rand(4, N, dtype=torch.float64, generator=gen)
        x = (sign * (3e4 + 3.5e4 * unit)).to(torch.float16)
        # dy on the input's scale, so that dx is O(1) rather than fp16-subnormal.
        dy = (6e4 * torch.rand(4, N, generator=gen) - 3e4).half()
        what = f"[{isa} {op} fp16 ±U(3e4, 6.5e4) N={N}]"
        y, dx, _, _ = op.run(x, N, dy=dy)
        assert_finite(y, f"{what} y")
        assert_finite(dx, f"{what} dx")
        check_result(y, op.ref(x, N), fwd_tol(torch.float16), f"{what} y")
        rdx = op.closed_form_grads(dy, x, N)[0]
        _rows_close(dx, rdx, dx_tol(x.dtype), f"{what} dx", _dx_scale(op, x, dy, N))
        for dtype in (torch.float32, torch.bfloat16):
            for target in (1e16, 1e18, 1e19):
                x = (sign * (0.5 + 0.5 * unit) * (target / math.sqrt(N))).to(dtype)
                what = f"[{isa} {op} {_dt(dtype)} |x|√N={target:g} N={N}]"
                y = op(x, N)
                assert_finite(y, what)
                ref = accurate_layer_norm_ref(x, N) if op.is_ln else op.ref(x, N)
                check_result(y, ref, fwd_tol(dtype), f"{what} y")
            # Random signs, plus one all-positive row: there x − x0 stays finite and only the
            # sum of squares overflows.
            x = (sign * 3e38).to(dtype)
            x[0] = (3e38 * (0.5 + 0.5 * unit[0])).to(dtype)
            what = f"[{isa} {op} {_dt(dtype)} ±3e38 N={N}]"
            ref = accurate_layer_norm_ref(x, N) if op.is_ln else op.ref(x, N)
            _assert_correct_beyond_range(op(x, N), ref, fwd_tol(dtype), what)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, 1e30), (torch.bfloat16, 1e30), (torch.float32, 3e38), (torch.float64, 1e300)],
    ids=["fp32-1e30", "bf16-1e30", "fp32-3e38", "fp64-1e300"],
)
def test_f7_rescued_rows_affine_stats_and_fused_add(isa, op, dtype, scale, gen):
    """The overflow rescue (rows whose statistics exceed the accumulation type's range) applies
    the affine transform, the zero-centered weight and the fused add exactly like the normal
    path, saves mean / rstd consistent with the float64 ones, leaves the other rows of the batch
    bitwise untouched, and keeps rows holding Inf / NaN on PyTorch's propagation."""
    N = 67
    ref_dtype = torch.float64
    normal = make_input((3, N), dtype, generator=gen)
    big = (scale * (2 * torch.rand(2, N, dtype=ref_dtype, generator=gen) - 1)).to(dtype)
    x = torch.cat([normal[:1], big[:1], normal[1:2], big[1:], normal[2:]])
    w = (1 + 0.5 * torch.randn(N, generator=gen)).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    tol = fwd_tol(dtype)
    # The float64 reference of the row scaled by 2^-k (exact) with eps·2^-2k: the plain float64
    # reference itself overflows at 1e300.
    s = 2.0 ** -math.floor(math.log2(scale))
    eps = 1e-5 if op.is_ln else rms_norm_eps(dtype, None)
    xs = x.double() * s
    for zcw in (False, True):
        what = f"[{isa} {_dt(dtype)} {op} scale={scale:g} zcw={zcw}]"
        w_eff = w.double() + 1 if zcw else w.double()
        ref = op.ref(xs, N, w_eff, b.double(), eps=eps * s * s)
        y = op(x, N, w, b, zcw=zcw)
        _assert_correct_beyond_range(y, ref, tol, f"{what} y")
        # Rows of ordinary scale are bitwise those computed alone.
        for r in (0, 2, 4):
            alone = op(x[r : r + 1], N, w, b, zcw=zcw)
            assert torch.equal(y[r : r + 1], alone), f"{what} row {r} changed by its neighbours"
    # Saved statistics of the rescued rows (float64 moments of the scaled rows).
    _, mean, rstd = op.stats(x, N, w, b)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    if op.is_ln:
        rmean = xs.mean(dim=1)
        var = (xs - rmean[:, None]).square().mean(dim=1)
        got_mean = mean.double().flatten() * s
        assert bool(((got_mean - rmean).abs() <= rel * xs.abs().amax(dim=1)).all()), what
    else:
        var = xs.square().mean(dim=1)
    rrstd = 1 / (var + eps * s * s).sqrt()
    got = rstd.double().flatten() / s
    assert bool(((got - rrstd).abs() <= rel * rrstd).all()), f"{what} rstd {got} vs {rrstd}"
    # The fused add normalises the rounded sum, rescued or not.
    half = (x.double() / 2).to(dtype)
    other = (x.double() - half.double()).to(dtype)
    fused = layernorm_ext.add_layer_norm if op.is_ln else layernorm_ext.add_rms_norm
    args = (w, b) if op.is_ln else (w,)
    out, res = fused(half, other, [N], *args)
    assert torch.equal(res, half + other), "residual_out"
    assert torch.equal(out, op(res, N, w, b)), "fused add vs add then norm on rescued rows"
    # A row holding Inf next to huge finite values still propagates like PyTorch.
    bad = x.clone()
    bad[1, 5] = float("inf")
    assert_same_nonfinite_pattern(
        op(bad, N, w, b)[1], op.eager(bad[1:2], N, w, b)[0], f"{what} inf row"
    )


# --- F9: subnormals and tiny values ---------------------------------------------------------------

# (dtype, scale, eps values). eps = 0 only where the row variance is a normal number of the
# accumulation type: below that it underflows (to 0 under flush-to-zero) and 1/sqrt(0) = inf is
# the correct fp32 answer, the same as PyTorch's.
F9_CASES = [
    (torch.float32, 1e-30, (1e-12, 1e-5)),
    (torch.float32, 1e-17, (0.0, 1e-12, 1e-5)),
    (torch.float32, 1e-40, (1e-12, 1e-5)),  # subnormal inputs
    (torch.float16, 1e-7, (0.0, 1e-12, 1e-5)),  # fp16 subnormals
    (torch.float16, 1e-5, (0.0, 1e-5)),
    (torch.bfloat16, 1e-39, (1e-12, 1e-5)),  # bf16 subnormals
    (torch.bfloat16, 1e-17, (0.0, 1e-5)),
    (torch.float64, 1e-310, (1e-12, 1e-5)),  # fp64 subnormals
    (torch.float64, 1e-150, (0.0, 1e-12)),
]


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_f9_subnormal_and_tiny_rows(isa, op, flush, gen):
    """Tiny and subnormal inputs match the reference, also with torch.set_flush_denormal(True)
    (inputs and references are built before flushing is switched on)."""
    cases = []
    for dtype, scale, eps_values in F9_CASES:
        x = (torch.randn(4, 100, dtype=torch.float64, generator=gen) * scale).to(dtype)
        # fp16: small dy, so that dx = rstd·O(dy) stays in range when eps = 0 (rstd ~ 1e7).
        dy = (torch.randn(4, 100, generator=gen) * (1e-4 if dtype == torch.float16 else 1)).to(
            dtype
        )
        for eps in eps_values:
            ref = op.ref(x, 100, eps=eps)
            rdx = op.closed_form_grads(dy, x, 100, eps=eps)[0]
            cases.append((dtype, scale, eps, x, dy, ref, rdx, _dx_scale(op, x, dy, 100, eps)))
    results = []
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU does not support flush-to-zero")
    try:
        for _, _, eps, x, dy, _, _, _ in cases:
            results.append(op.run(x, 100, dy=dy, eps=eps)[:2])
    finally:
        torch.set_flush_denormal(False)
    for case, (y, dx) in zip(cases, results, strict=True):
        dtype, scale, eps, _, _, ref, rdx, dx_scale = case
        what = f"[{isa} {op} {_dt(dtype)} {scale:g}·randn eps={eps} flush={flush}]"
        assert_finite(y, f"{what} y")
        check_result(y, ref, fwd_tol(dtype), f"{what} y")
        _rows_close(dx, rdx, dx_tol(dtype), f"{what} dx", dx_scale)


# --- F10: mixed-scale rows ------------------------------------------------------------------------

# Row scales 10^k. fp32 / bf16 stop at 1e17: beyond |x|·√N ≈ 1e19 the fp32 sum of squares
# overflows (F7 / F8 cover that regime); fp16 spans its own range.
F10_EXPONENTS = {
    torch.float64: (-20, 20),
    torch.float32: (-20, 17),
    torch.bfloat16: (-20, 17),
    torch.float16: (-3, 3),
}


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_f10_mixed_scale_rows(isa, dtype, op, gen):
    """Row r scaled by 10^k_r: each row correct on its own scale, and bitwise the row computed
    alone (no cross-row effect), also next to rows that overflow."""
    M, N = 41, 65
    lo, hi = F10_EXPONENTS[dtype]
    k = torch.randint(lo, hi + 1, (M, 1), generator=gen).double()
    z = make_input((M, N), torch.float64, generator=gen)
    x = (z * torch.pow(10.0, k)).to(dtype)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    what = f"[{isa} {_dt(dtype)} {op}]"
    y, dx, _, _ = op.run(x, N, dy=dy)
    # eps = 1e-5 is not scale-free: rows with var ≪ eps normalise to ≈ x/sqrt(eps). Compare each
    # row on its own scale against the exact formula.
    ref = op.ref(x, N)
    _rows_close(y, ref, fwd_tol(dtype), f"{what} y", _y_scale(ref))
    rdx = op.closed_form_grads(dy, x, N)[0]
    _rows_close(dx, rdx, dx_tol(dtype), f"{what} dx", _dx_scale(op, x, dy, N))
    for i in (0, 7, 20, M - 1):
        yi, dxi, _, _ = op.run(x[i : i + 1], N, dy=dy[i : i + 1])
        assert_bitwise_equal(yi, y[i : i + 1], f"{what} row {i} alone: y")
        assert_bitwise_equal(dxi, dx[i : i + 1], f"{what} row {i} alone: dx")
    if dtype != torch.float16:
        # Rows that overflow the accumulator (|x| ~ 1e25, or 1e200 in fp64) leave the others alone.
        huge = 1e200 if dtype == torch.float64 else 1e25
        xh = x.clone()
        xh[3] = (z[3] * huge).to(dtype)
        xh[30] = (z[30] * huge).to(dtype)
        yh = op(xh, N)
        keep = [r for r in range(M) if r not in (3, 30)]
        assert_bitwise_equal(yh[keep], y[keep], f"{what} next to overflowing rows")


# --- F12: ±Inf injection ------------------------------------------------------------------------


def _mask(t):
    return ~torch.isfinite(t)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f12_inf_injection_backward_and_parameters(isa, case, op, gen):
    """±Inf in x (alone and as +Inf and −Inf in one row), in dy and in γ / β: the poisoned row
    (or column) follows eager PyTorch, every other row / column is bitwise the clean run's, and
    the parameter gradients are non-finite exactly where PyTorch's are (no NaN-swallowing
    clamp). Forward NaN-in-x and NaN-in-γ are test_nonfinite's."""
    M, N = 7, 37
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(case.x)
    clean = op.run(x, N, w, b, dy)
    names = ("y", "dx", "dw", "db")
    others = [r for r in range(M) if r != 3]
    inf = math.inf
    for label, xs, dys in (
        ("x[3,5]=+inf", {(3, 5): inf}, {}),
        ("x[3,0]=-inf", {(3, 0): -inf}, {}),
        ("x[3,36]=+inf, x[3,2]=-inf", {(3, 36): inf, (3, 2): -inf}, {}),
        ("dy[3,4]=+inf", {}, {(3, 4): inf}),
        ("dy[3,0]=-inf", {}, {(3, 0): -inf}),
    ):
        xp, dyp = x.clone(), dy.clone()
        for pos, v in xs.items():
            xp[pos] = v
        for pos, v in dys.items():
            dyp[pos] = v
        what = f"[{isa} {case.id} {op} {label}]"
        got = op.run(xp, N, w, b, dyp)
        eager = op.run(xp, N, w, b, dyp, eager=True)
        for name, g, c in zip(names[:2], got[:2], clean[:2], strict=True):
            assert_bitwise_equal(g[others], c[others], f"{what} {name}: other rows")
        assert_same_nonfinite_pattern(got[0], eager[0], f"{what} y vs PyTorch")
        for name, g, e in zip(names[1:], got[1:], eager[1:], strict=True):
            if g is not None:
                assert torch.equal(_mask(g), _mask(e)), (
                    f"{what} {name}: non-finite at {_mask(g).nonzero().tolist()}, PyTorch at "
                    f"{_mask(e).nonzero().tolist()}"
                )
    # ±Inf (and NaN, for RMSNorm and the backward) in γ, ±Inf in β: only that column.
    params = [("weight", 3, inf), ("weight", 36, -inf), ("weight", 0, math.nan)]
    if op.has_bias:
        params += [("bias", 5, inf), ("bias", 0, -inf)]
    for pname, j, v in params:
        wp, bp = w.clone(), b.clone()
        (wp if pname == "weight" else bp)[j] = v
        what = f"[{isa} {case.id} {op} {pname}[{j}]={v}]"
        got = op.run(x, N, wp, bp, dy)
        eager = op.run(x, N, wp, bp, dy, eager=True)
        keep = [c for c in range(N) if c != j]
        assert_bitwise_equal(got[0][:, keep], clean[0][:, keep], f"{what} y other columns")
        assert_same_nonfinite_pattern(got[0], eager[0], f"{what} y vs PyTorch")
        for name, g, e in zip(names[1:], got[1:], eager[1:], strict=True):
            if g is not None:
                assert torch.equal(_mask(g), _mask(e)), f"{what} {name}: non-finite pattern"


# --- F13: summation-order adversaries -------------------------------------------------------------


def _f13_rows(dtype, N, gen):
    big = 6e4 if dtype == torch.float16 else 1e8
    small = torch.randn(N, dtype=torch.float64, generator=gen)
    offset = 1e3 + small
    rows = {
        "[L, -L, small...]": torch.cat([torch.tensor([big, -big]), small[: N - 2]]),
        "[small..., L]": torch.cat([small[: N - 1], torch.tensor([big])]),
        "[small..., -L, L]": torch.cat([small[: N - 2], torch.tensor([-big, big])]),
        "sorted ascending, mean 1e3": offset.sort().values,
        "sorted descending, mean 1e3": offset.sort(descending=True).values,
    }
    return list(rows), torch.stack(list(rows.values())).to(dtype)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_f13_summation_order_adversaries(isa, dtype, op, gen):
    """Rows built to defeat recursive summation: a huge pair that cancels, a huge last element,
    sorted rows. κ-scaled tolerance (§1), forward and backward; and permutation equivariance
    (P3): the op on x[:, p] matches the reference permuted by p."""
    for N in (64, 1000, 4099):
        names, x = _f13_rows(dtype, N, gen)
        M = x.shape[0]
        dy = torch.randn(M, N, generator=gen).to(dtype)
        perm = torch.randperm(N, generator=gen)
        kappa = row_kappa(x, N)
        what = f"[{isa} {_dt(dtype)} {op} N={N}] {names}"
        for label, xx, dyy, index in (
            ("", x, dy, slice(None)),
            (" permuted", x[:, perm], dy[:, perm], perm),
        ):
            y, dx, _, _ = op.run(xx, N, dy=dyy)
            if op.is_ln:
                ref = accurate_layer_norm_ref(x, N)[:, index]
                rdx = layer_norm_grads_closed_form(dy, x, N)[0][:, index]
                assert_close_kappa(y, ref, kappa, dtype, f"{what}{label} y")
                assert_close_kappa(dx, rdx, kappa, dtype, f"{what}{label} dx", tol=dx_tol(dtype))
            else:
                check_result(y, op.ref(x, N)[:, index], fwd_tol(dtype), f"{what}{label} y")
                rdx = op.closed_form_grads(dy, x, N)[0][:, index]
                _rows_close(dx, rdx, dx_tol(dtype), f"{what}{label} dx", _dx_scale(op, x, dy, N))


# --- F14: the eps grid ----------------------------------------------------------------------------

EPS_GRID = [0.0, 1e-12, 1e-6, 1e-5, 0.5, -0.5]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f14_eps_grid(isa, case, op, gen):
    """eps ∈ {0, 1e-12, 1e-6, 1e-5, 0.5, −0.5} on ordinary rows (variances 0.1 … 5, away from
    0.5) and constant rows (F4): forward and backward match the formula, including its NaNs
    (negative var + eps; 0/0 for a constant row at eps = 0). Grads on the constant rows are
    skipped for fp16, whose dx there (∝ 1/sqrt(eps)) overflows."""
    N = 48
    variances = torch.tensor([0.1, 0.3, 0.7, 2.0, 5.0, 0.2], dtype=torch.float64)
    z = standardized_rows(len(variances), N, gen) * variances.sqrt()[:, None] + 1.5
    rows = [z, torch.full((2, N), 3.0, dtype=torch.float64)]
    x = torch.cat(rows).to(case.x)
    M = x.shape[0]
    w, b = make_params((N,), case.param, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(case.x)
    grad_rows = slice(0, len(variances)) if case.x == torch.float16 else slice(None)
    for eps in EPS_GRID:
        what = f"[{isa} {case.id} {op} eps={eps}]"
        y = op(x, N, w, b, eps)
        check_result(y, op.ref(x, N, w, b, eps), fwd_tol(case.x), f"{what} y")
        xs, dys = x[grad_rows], dy[grad_rows]
        _, dx, dw, db = op.run(xs, N, w, b, dys, eps)
        ref = op.ref_grads(dys, xs, N, w, b, eps)
        rows_used = xs.shape[0]
        check_result(dx, ref[0], dx_tol(case.x), f"{what} dx")
        check_result(dw, ref[1], param_grad_tol(case.param, rows_used), f"{what} dw")
        if op.has_bias:
            check_result(db, ref[2], param_grad_tol(case.param, rows_used), f"{what} db")


def test_f14_eps_is_applied_in_the_accumulation_type(isa, gen):
    """fp64 input: eps = 0.1 in fp64 (not rounded to fp32, a 1.5e-8 relative change that the
    fp64 tolerance sees on rows with var ≈ eps); fp16 input: eps = 1e-8 (0 in fp16) on rows
    with var ≈ 2.4e-7, where dropping eps moves y by 2%."""
    z = standardized_rows(4, 64, gen) * math.sqrt(0.1)
    x64 = z.double()
    for op in OPS:
        what = f"[{isa} {op} fp64 eps=0.1]"
        check_result(op(x64, 64, eps=0.1), op.ref(x64, 64, eps=0.1), fwd_tol(torch.float64), what)
    # Alternating 1 and 1 + 2^-10 (adjacent fp16 values): var = 2^-22 ≈ 2.4e-7.
    x16 = torch.tensor([1.0, 1.0 + 2**-10] * 32, dtype=torch.float16)[None].repeat(3, 1)
    for eps in (1e-8, 3e-8):
        what = f"[{isa} fp16 eps={eps}]"
        check_result(LN(x16, 64, eps=eps), LN.ref(x16, 64, eps=eps), fwd_tol(torch.float16), what)
        # RMSNorm's eps against mean(x²) ≈ 1 is invisible; use rows of ±2^-10·k instead.
        xr = (torch.arange(64, dtype=torch.float64) % 3 - 1).mul(2**-10)[None].half()
        check_result(RMS(xr, 64, eps=eps), RMS.ref(xr, 64, eps=eps), fwd_tol(torch.float16), what)


# --- F15: affine extremes -------------------------------------------------------------------------


def _f15_params(N, dtype, gen):
    randn = torch.randn(N, generator=gen)
    with_nan = torch.randn(N, generator=gen)
    with_nan[N // 3] = math.nan
    gammas = {
        "0": torch.zeros(N),
        "1": torch.ones(N),
        "-1": -torch.ones(N),
        "1e4": torch.full((N,), 1e4),
        "randn": randn,
        "one NaN": with_nan,
    }
    betas = {
        "0": torch.zeros(N),
        "1e4": torch.full((N,), 1e4),
        "randn": torch.randn(N, generator=gen),
    }
    cast = {k: v.to(dtype) for k, v in gammas.items()}, {k: v.to(dtype) for k, v in betas.items()}
    return cast


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f15_affine_extremes(isa, case, op, gen):
    """γ ∈ {0, ±1, 1e4, randn, one NaN} × β ∈ {0, 1e4, randn}: y matches the reference with the
    atol scaled by max|γ| (y's error is |γ|·err(x̂)); γ = 0 gives exactly β; a NaN in γ column j
    poisons exactly column j of y (and, through Σ γ·dy, all of dx, as in PyTorch), never dγ."""
    M, N = 6, 40
    x = make_input((M, N), case.x, generator=gen)
    dy = (0.25 * torch.randn(M, N, generator=gen)).to(case.x)
    gammas, betas = _f15_params(N, case.param, gen)
    for gname, w in gammas.items():
        for bname, b in betas.items() if op.has_bias else [("none", None)]:
            what = f"[{isa} {case.id} {op} γ={gname} β={bname}]"
            scale = max(1.0, float(w.double().nan_to_num().abs().max()))
            y, dx, dw, db = op.run(x, N, w, b, dy)
            ry, (rdx, rdw, rdb) = op.ref(x, N, w, b), op.ref_grads(dy, x, N, w, b)
            atol, rtol = fwd_tol(case.x)
            assert_close_to_ref(y, _saturate(ry, case.x), atol * scale, rtol, f"{what} y")
            atol, rtol = dx_tol(case.x)
            assert_close_to_ref(dx, _saturate(rdx, case.x), atol * scale, rtol, f"{what} dx")
            check_result(dw, rdw, param_grad_tol(case.param, M), f"{what} dw")
            if db is not None:
                check_result(db, rdb, param_grad_tol(case.param, M), f"{what} db")
            if gname == "0":
                expected = (
                    torch.zeros(M, N, dtype=case.x) if b is None else b.to(case.x).expand(M, N)
                )
                assert bool((y == expected).all()), f"{what}: γ = 0 must give exactly β"
            if gname == "one NaN":
                j = N // 3
                keep = [c for c in range(N) if c != j]
                clean = w.clone()
                clean[j] = 1.0
                yc = op(x, N, clean, b)
                assert_bitwise_equal(y[:, keep], yc[:, keep], f"{what} y other columns")
                assert bool(torch.isnan(y[:, j]).all()), f"{what}: column {j} not NaN"
                assert_finite(dw, f"{what} dw")


# --- F16: low-precision and mixed dtypes ----------------------------------------------------------

LOW_CASES = [c for c in DTYPE_CASES if c.x in (torch.float16, torch.bfloat16)]
LOW_IDS = [c.id for c in LOW_CASES]


def _close_to_rounded(actual, fp32, tol, what):
    """``actual`` against the fp32 result: the same inf / NaN lanes as that result rounded to
    ``actual``'s dtype, the finite lanes within ``tol`` of it."""
    rounded = fp32.to(actual.dtype)
    finite = torch.isfinite(rounded)
    assert bitwise_equal(actual[~finite], rounded[~finite]), f"{what}: non-finite lanes differ"
    check_result(actual[finite], fp32[finite].double(), tol, what)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", LOW_CASES, ids=LOW_IDS)
def test_f16_low_precision_is_fp32_rounded_once(isa, case, op, gen):
    """fp16 / bf16 input (with fp16 / bf16 or fp32 parameters) computes in fp32 and rounds once.
    The fp32 parameters carry values fp16 cannot hold (1 + 2^-12, 1e5: γ·x̂ overflows fp16 to
    inf, exactly as the rounded fp32 result does).

    RMSNorm, and every backward given the same statistics, are bitwise the fp32 computation on
    the upcast tensors, rounded to the output dtype. LayerNorm's 16-bit rows take their variance
    in one pass where that cannot cancel (F3b checks those statistics against float64), while
    fp32 rows keep two-pass / Welford: its forward, and its backward through autograd (which
    uses the forward's statistics), are checked against the fp32 result within the dtype's
    tolerance, with the same inf / NaN lanes."""
    for N in (1, 7, 64, 1000):
        M = 9
        x = make_input((M, N), case.x, generator=gen)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        if case.mixed and N > 2:
            w[0], w[1] = 1 + 2**-12, 1e5
        dy = torch.randn(M, N, generator=gen).to(case.x)
        for zcw in (False, True):
            what = f"[{isa} {case.id} {op} N={N} zcw={zcw}]"
            up = op.run(x.float(), N, w.float(), b.float(), dy.float(), zcw=zcw)
            if not op.is_ln:
                got = op.run(x, N, w, b, dy, zcw=zcw)
                targets = (case.x, case.x, case.param)
                for name, g, u, t in zip(("y", "dx", "dw"), got[:3], up[:3], targets, strict=True):
                    assert_bitwise_equal(g, u.to(t), f"{what} {name} vs fp32 rounded once")
                continue
            got = op.run(x, N, w, b, dy, zcw=zcw)
            _close_to_rounded(got[0], up[0], fwd_tol(case.x), f"{what} y")
            _close_to_rounded(got[1], up[1], dx_tol(case.x), f"{what} dx (autograd)")
            # The backward on the fp32 path's statistics: bitwise.
            _, mean, rstd = ops.layer_norm_fwd(
                x.float(), [N], w.float(), b.float(), 1e-5, zero_centered_weight=zcw
            )
            grads = ops.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, zcw, [True, True, True])
            grads_up = ops.layer_norm_bwd(
                dy.float(), x.float(), [N], mean, rstd, w.float(), b.float(), zcw, [True] * 3
            )
            targets = (case.x, case.param, case.param)
            for name, g, u, t in zip(("dx", "dw", "db"), grads, grads_up, targets, strict=True):
                assert_bitwise_equal(g, u.to(t), f"{what} {name} vs fp32 rounded once")


# --- F17: hidden sizes ----------------------------------------------------------------------------

# The sizes of reliability.md F17 that the core grids (HIDDEN / BWD_HIDDEN) leave out: vector
# widths and their tails, the short/long-row switch (32 vectors), chunk and cascade boundaries.
F17_SIZES = [32, 63, 65, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1025, 1536, 3584, 4096]
F17_SIZES += [5120, 5125, 8199, 12288, 16384, 32768, 65536, 65537]
F17_CASES = [DTYPE_CASES[i] for i in (0, 1, 2, 5)]  # fp32, fp64, fp16, bf16 with fp32 params


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", F17_CASES, ids=[c.id for c in F17_CASES])
def test_f17_hidden_sizes(case, op, gen):
    """Every size on every ISA up to 8199; from 12288 on, the 16- and the 8-lane kernel sets
    (best and scalar ISA), whose chunk / cascade structure the larger sizes exercise."""
    M = 2
    for N in F17_SIZES:
        x = make_input((M, N), case.x, generator=gen)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        ry = op.ref(x, N, w, b)
        rdx, rdw, rdb = op.closed_form_grads(dy, x, N, w, b)
        base = (
            op.run(x, N, w, b, dy, eager=True)
            if case.x in (torch.float16, torch.bfloat16)
            else None
        )
        for isa in ISAS if N <= 8199 else [ISAS[0], ISAS[-1]]:
            with use_isa(isa):
                y, dx, dw, db = op.run(x, N, w, b, dy)
            what = f"[{isa} {case.id} {op} N={N}]"
            low = base is not None
            check_result(y, ry, fwd_tol(case.x), f"{what} y", base[0] if low else None)
            check_result(dx, rdx, dx_tol(case.x), f"{what} dx", base[1] if low else None)
            check_result(dw, rdw, param_grad_tol(case.param, M), f"{what} dw")
            if db is not None:
                check_result(db, rdb, param_grad_tol(case.param, M), f"{what} db")


@pytest.mark.parametrize("N", [2**20 + 3, 2**24 + 5])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_f17_very_long_rows(op, N, gen):
    """One fp32 row of 2^20 + 3 and 2^24 + 5 elements (beyond fp32's exact integers: counts must
    not be kept in float), forward and backward; with M = 1, dβ is exactly dy. 2^24 + 5 runs on
    the best and the scalar ISA (the 16- and the 8-lane kernels; checking 16M elements per ISA
    is the cost), 2^20 + 3 on every ISA."""
    x = make_input((1, N), torch.float32, generator=gen)
    w, b = make_params((N,), torch.float32, True, True, generator=gen)
    dy = torch.randn(1, N, generator=gen)
    ry = op.ref(x, N, w, b)
    rdx, rdw, _ = op.closed_form_grads(dy, x, N, w, b)
    isas = ISAS if N < 2**24 else [ISAS[0], ISAS[-1]]
    for isa in isas:
        with use_isa(isa):
            y, dx, dw, db = op.run(x, N, w, b, dy)
        what = f"[{isa} {op} N={N}]"
        check_result(y, ry, fwd_tol(torch.float32), f"{what} y")
        check_result(dx, rdx, dx_tol(torch.float32), f"{what} dx")
        check_result(dw, rdw, param_grad_tol(torch.float32, 1), f"{what} dw")
        if db is not None:
            assert_bitwise_equal(db, dy[0], f"{what} db")
        del y, dx, dw, db


# --- F18: row counts ------------------------------------------------------------------------------


F18_SHAPES = [(2, 5), (3, 5), (65535, 5), (65536, 3), (65537, 7)]


@pytest.mark.parametrize("shape", F18_SHAPES, ids=[f"{m}x{n}" for m, n in F18_SHAPES])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_f18_row_counts(op, shape, gen):
    """M around the 2^16 boundaries with N % 4 != 0, fp32 and bf16 (fp32 params), every ISA:
    y and dx first, then dγ / dβ against the tolerance table (1e-4 / 1e-5 for fp32 up to
    M = 65536, 1e-3 / 1e-3 beyond)."""
    M, N = shape
    for case in (DTYPE_CASES[0], DTYPE_CASES[5]):
        x = make_input((M, N), case.x, generator=gen)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        ry = op.ref(x, N, w, b)
        rdx, rdw, rdb = op.closed_form_grads(dy, x, N, w, b)
        param_grads = []
        for isa in ISAS:
            with use_isa(isa):
                y, dx, dw, db = op.run(x, N, w, b, dy)
            what = f"[{isa} {case.id} {op} M={M} N={N}]"
            check_result(y, ry, fwd_tol(case.x), f"{what} y")
            check_result(dx, rdx, dx_tol(case.x), f"{what} dx")
            param_grads.append((what, dw, db))
        for what, dw, db in param_grads:
            check_result(dw, rdw, param_grad_tol(case.param, M), f"{what} dw")
            if db is not None:
                check_result(db, rdb, param_grad_tol(case.param, M), f"{what} db")


def test_f18_many_rows_with_a_tail(gen):
    """M = 2^23 + 1 rows of N = 3 in bf16 (pytorch#184826: silently wrong tails at large M on
    bf16), on the best and the scalar ISA: y and dx of every row are bitwise those of the same
    rows run in blocks of 2^20 (so a large-M-only indexing error cannot hide), sampled blocks
    (first, around 2^22, last) match the fp64 reference, and dγ / dβ match fp64 sums."""
    M, N, block = 2**23 + 1, 3, 2**20
    x = make_input((M, N), torch.bfloat16, generator=gen)
    w, b = make_params((N,), torch.bfloat16, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(torch.bfloat16)
    xd, dyd = x.double(), dy.double()
    centered = xd - xd.mean(dim=1, keepdim=True)
    xhat = centered * (centered.square().mean(dim=1, keepdim=True) + 1e-5).rsqrt()
    rdw, rdb = (dyd * xhat).sum(dim=0), dyd.sum(dim=0)
    del xd, dyd, centered, xhat
    samples = [(0, 4096), (2**22 - 2048, 2**22 + 2048), (M - 4096, M)]
    for isa in (ISAS[0], ISAS[-1]):
        what = f"[{isa} bf16 M={M} N={N}]"
        with use_isa(isa):
            y, dx, dw, db = LN.run(x, N, w, b, dy)
            yr = RMS(x, N, w)
            for s in range(0, M, block):
                e = min(M, s + block)
                yb, dxb, _, _ = LN.run(x[s:e], N, w, b, dy[s:e])
                assert_bitwise_equal(y[s:e], yb, f"{what} y rows {s}:{e} vs run alone")
                assert_bitwise_equal(dx[s:e], dxb, f"{what} dx rows {s}:{e} vs run alone")
                assert_bitwise_equal(yr[s:e], RMS(x[s:e], N, w), f"{what} rms y rows {s}:{e}")
        for s, e in samples:
            xs, dys = x[s:e], dy[s:e]
            check_result(y[s:e], LN.ref(xs, N, w, b), fwd_tol(torch.bfloat16), f"{what} y {s}")
            rdx = LN.closed_form_grads(dys, xs, N, w, b)[0]
            check_result(dx[s:e], rdx, dx_tol(torch.bfloat16), f"{what} dx {s}")
            check_result(yr[s:e], RMS.ref(xs, N, w), fwd_tol(torch.bfloat16), f"{what} rms {s}")
        check_result(dw, rdw, param_grad_tol(torch.bfloat16, M), f"{what} dw")
        check_result(db, rdb, param_grad_tol(torch.bfloat16, M), f"{what} db")


# --- F20: multi-dim normalized_shape at large M ---------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 16), (11, 3), (1, 1), (6, 129)], ids=str)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_f20_multi_dim_many_rows(op, shape, gen):
    """x[M, A, B] over (A, B), with and without a weight; dγ / dβ have shape (A, B). M = 100000
    for (8, 16), pytorch#192016's case (out-of-bounds write, wrong dγ shape); the other shapes
    at M = 4099 (the core suite runs them at M ≤ 37), which already spans many row chunks."""
    M = 100000 if shape == (8, 16) else 4099
    x = make_input((M, *shape), torch.float32, normalized_ndim=2, generator=gen)
    dy = torch.randn(M, *shape, generator=gen)
    # At M = 100000 the best and the scalar ISA (16- and 8-lane kernels): the shape handling
    # under test is the host code's, shared by every ISA.
    isas = [ISAS[0], ISAS[-1]] if M == 100000 else ISAS
    for has_w in (True, False):
        w, b = make_params(shape, torch.float32, has_w, True, generator=gen)
        ry = op.ref(x, shape, w, b)
        rdx, rdw, rdb = op.closed_form_grads(dy, x, shape, w, b)
        for isa in isas:
            with use_isa(isa):
                y, dx, dw, db = op.run(x, shape, w, b, dy)
            what = f"[{isa} {op} {M}x{shape} w={has_w}]"
            check_result(y, ry, fwd_tol(torch.float32), f"{what} y")
            check_result(dx, rdx, dx_tol(torch.float32), f"{what} dx")
            for name, g, r, p in (("dw", dw, rdw, w), ("db", db, rdb, b)):
                if g is None:
                    assert p is None or not op.has_bias, f"{what}: {name} missing"
                    continue
                assert g.shape == shape, f"{what} {name}: shape {tuple(g.shape)}"
                check_result(g, r, param_grad_tol(torch.float32, M), f"{what} {name}")


# --- F21: non-contiguous layouts ------------------------------------------------------------------


def _f21_layouts(M, N, dtype, gen):
    """(name, x, normalized_shape). Elements outside each view are NaN, so a kernel that reads
    past the view (into the gaps of a strided tensor) produces NaN and fails the comparison."""
    A, B = 4, N // 4 or 1
    wide = make_input((M, 2 * N), dtype, generator=gen)
    wide[:, N:] = math.nan
    tall = make_input((N, M), dtype, generator=gen)
    big = torch.full((3 * M, 5 * A, 3 * B), math.nan, dtype=dtype)
    big[::3, ::5, ::3] = make_input((M, A, B), dtype, normalized_ndim=2, generator=gen)
    row = make_input((1, N), dtype, generator=gen)
    cl = make_input((2, 5, 3, N), dtype, generator=gen).to(memory_format=torch.channels_last)
    return [
        ("x[..., :N] of (M, 2N)", wide[:, :N], (N,)),
        ("randn(N, M).t()", tall.t(), (N,)),
        ("[::3, ::5, ::3] over (A, B)", big[::3, ::5, ::3], (A, B)),
        ("expanded row", row.expand(M, N), (N,)),
        ("channels_last over the last dim", cl, (N,)),
    ]


def _fake_output_strides(op, x, shape, w, b):
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fw = None if w is None else mode.from_tensor(w)
        fb = None if b is None else mode.from_tensor(b)
        if op.is_ln:
            fy = ops.layer_norm.default(fx, list(shape), fw, fb, 1e-5)
        else:
            fy = ops.rms_norm.default(fx, list(shape), fw, None)
    return fy.shape, fy.stride()


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f21_strided_layouts(isa, case, op, gen):
    """Each layout gives bitwise the contiguous run's y, dx, dγ, dβ (also with a transposed dy),
    never reads outside the view, and y has the strides the fake (meta) kernel predicts."""
    M, N = 6, 36
    for name, x, shape in _f21_layouts(M, N, case.x, gen):
        w, b = make_params(shape, case.param, True, True, generator=gen)
        dy_t = torch.randn(*reversed(x.shape), generator=gen).to(case.x)
        dy = dy_t.permute(*reversed(range(x.dim())))  # non-contiguous grad_out
        what = f"[{isa} {case.id} {op} {name}]"
        got = op.run(x, shape, w, b, dy)
        expected = op.run(x.contiguous(), shape, w, b, dy.contiguous())
        for label, g, e in zip(("y", "dx", "dw", "db"), got, expected, strict=True):
            if g is not None:
                assert_bitwise_equal(g, e, f"{what} {label} vs the contiguous run")
        assert_finite(got[0], f"{what} y (read outside the view?)")
        check_result(got[0], op.ref(x, shape, w, b), fwd_tol(case.x), f"{what} y")
        y = op(x, shape, w, b)
        assert (y.shape, y.stride()) == _fake_output_strides(op, x, shape, w, b), (
            f"{what}: output strides {y.stride()} differ from the fake kernel's"
        )


# --- F22: misaligned storage ----------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f22_misaligned_storage(isa, case, op, gen):
    """x, γ, β, dy and out= starting k = 1…15 elements into their buffers (never vector-aligned):
    bitwise the aligned result, forward (with statistics), out= and backward (dx, dγ, dβ)."""
    for M, N in ((5, 67), (3, 1000)):
        x = make_input((M, N), case.x, generator=gen)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        out, mean, rstd = op.stats(x, N, w, b)
        grads = _bwd(op, dy, x, N, mean, rstd, w, b)
        for k in range(1, 16):
            xk, wk, bk, dyk = (misaligned_copy(t, k) for t in (x, w, b, dy))
            what = f"[{isa} {case.id} {op} N={N} offset={k}]"
            got = op.stats(xk, N, wk, bk)
            for label, g, e in zip(("y", "mean", "rstd"), got, (out, mean, rstd), strict=True):
                if e is not None:
                    assert_bitwise_equal(g, e, f"{what} {label}")
            outk = misaligned_copy(torch.zeros(M, N, dtype=case.x), k)
            op(xk, N, wk, bk, out=outk)
            assert_bitwise_equal(outk, out, f"{what} out=")
            gk = _bwd(op, dyk, xk, N, got[1], got[2], wk, bk)
            for label, g, e in zip(("dx", "dw", "db"), gk, grads, strict=True):
                assert_bitwise_equal(g, e, f"{what} {label}")


def _bwd(op, dy, x, N, mean, rstd, w, b):
    if op.is_ln:
        return ops.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, False, [True, True, True])
    dx, dw = ops.rms_norm_bwd(dy, x, [N], rstd, w, False, [True, True])
    return dx, dw, torch.empty(0)


# --- F23: zero-size -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f23_zero_size_layouts_and_stat_ops(isa, case):
    """Zero-size inputs that are also strided, expanded or multi-dim, through the functional
    ops, out= and the *_fwd / *_bwd ops directly: correct shapes, dγ = dβ = 0 when M = 0."""
    N = 5
    layouts = [
        ("(0, 2N)[:, :N]", torch.empty(0, 2 * N, dtype=case.x)[:, :N], (N,)),
        ("(N, 0).t()", torch.empty(N, 0, dtype=case.x).t(), (N,)),
        ("expand to (0, N)", torch.empty(1, N, dtype=case.x).expand(0, N), (N,)),
        ("(3, 0) over (0,)", torch.empty(3, 0, dtype=case.x), (0,)),
        ("(2, 0, 3) over (0, 3)", torch.empty(2, 0, 3, dtype=case.x), (0, 3)),
        ("(0, 4, 3) over (4, 3)", torch.empty(0, 4, 3, dtype=case.x), (4, 3)),
    ]
    for name, x, shape in layouts:
        rows = (
            x.numel() // max(1, math.prod(shape))
            if x.numel()
            else (math.prod(x.shape[: x.dim() - len(shape)]))
        )
        w, b = make_params(shape, case.param, True, True)
        for op in OPS:
            what = f"[{isa} {case.id} {op} {name}]"
            y, dx, dw, db = op.run(x, shape, w, b, torch.zeros(x.shape, dtype=case.x))
            assert y.shape == x.shape and dx.shape == x.shape, what
            assert dw.shape == w.shape, what
            if rows == 0:
                assert bool((dw == 0).all()), f"{what}: dγ must be 0 with no rows"
                if db is not None:
                    assert bool((db == 0).all()), f"{what}: dβ must be 0 with no rows"
            out = torch.empty(x.shape, dtype=case.x)
            assert op(x, shape, w, b, out=out) is out, f"{what} out="
            o, mean, rstd = op.stats(x, shape, w, b)
            stat_shape = x.shape[: x.dim() - len(shape)] + (1,) * len(shape)
            assert o.shape == x.shape and rstd.shape == stat_shape, what
            if x.numel() == 0 and rows > 0:
                # Rows without elements: empty sums are zero, so mean 0 and rstd = 1/sqrt(eps),
                # finite (README; ATen leaves NaN). eps = 0.25 makes that exactly 2.
                _, mean0, rstd0 = op.stats(x, shape, w, b, eps=0.25)
                assert bool((rstd0 == 2).all()), f"{what}: rstd of empty rows {rstd0}"
                if mean0 is not None:
                    assert bool((mean0 == 0).all()), f"{what}: mean of empty rows {mean0}"
            for mask in ([True, True, True], [False, True, False], [True, False, False]):
                if op.is_ln:
                    g = ops.layer_norm_bwd(x, x, list(shape), mean, rstd, w, b, False, mask)
                else:
                    g = ops.rms_norm_bwd(x, x, list(shape), rstd, w, False, mask[:2])
                if mask[0]:
                    assert g[0].shape == x.shape, f"{what} bwd mask={mask}"
                if mask[1]:
                    assert g[1].shape == w.shape, f"{what} bwd mask={mask}"
                    if rows == 0:
                        assert bool((g[1] == 0).all()), f"{what} bwd dγ mask={mask}"


# --- F26: N == 1 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_f26_hidden_one_layouts(isa, case, gen):
    """N == 1 through a (1, 1) normalized shape, an expanded input and zero_centered_weight:
    y == β bitwise, dx == 0 and dγ == 0 exactly (pytorch#73161, #188372)."""
    values = torch.tensor([-0.8, 1e6, 0.0, 3.25, 65504.0, -7.0]).to(case.x)
    values = values[torch.isfinite(values)]  # 1e6 overflows fp16
    for name, x, shape in (
        ("(M, 1, 1) over (1, 1)", values.reshape(-1, 1, 1), (1, 1)),
        ("expanded (M, 1)", values[:1].reshape(1, 1).expand(9, 1), (1,)),
        ("(M, 1) transposed", values.reshape(1, -1).t(), (1,)),
    ):
        w, b = make_params(shape, case.param, True, True, generator=gen)
        dy = torch.randn(x.shape, generator=gen).to(case.x)
        for zcw in (False, True):
            what = f"[{isa} {case.id} {name} zcw={zcw}]"
            y, dx, dw, db = LN.run(x, shape, w, b, dy, zcw=zcw)
            assert_bitwise_equal(y, b.to(case.x).expand(x.shape).contiguous(), f"{what} y")
            assert bool((dx == 0).all()), f"{what}: dx != 0"
            assert bool((dw == 0).all()), f"{what}: dγ != 0"
            rdb = dy.double().reshape(-1, 1).sum(0).reshape(shape)
            check_result(db, rdb, param_grad_tol(case.param, x.numel()), f"{what} dβ")


# --- the fused residual-add ops on adversarial rows -----------------------------------------------


def _assert_bitwise_equal_up_to_nan_payload(a, b, what):
    """Bitwise equal, except that any NaN equals any NaN (torch's bf16 add returns 0xFFFF for
    NaN + x where a NaN-propagating kernel returns the canonical 0x7FC0)."""
    a_nan, b_nan = torch.isnan(a), torch.isnan(b)
    assert torch.equal(a_nan, b_nan), f"{what}: NaN positions differ"
    assert_bitwise_equal(a.masked_fill(a_nan, 0), b.masked_fill(b_nan, 0), what)


def _check_param_grad_kappa(dw, rdw, dy, x, N, op, kappa, case, what):
    """dγ = Σ_r dy_r·x̂_r within the table tolerance plus the κ-scaled error of each row's x̂
    (c·u·κ_r·max|x̂_r| per term)."""
    rows = x.shape[0]
    atol, rtol = param_grad_tol(case.param, rows)
    if op.is_ln:
        xhat = accurate_layer_norm_parts(x, N, 1e-5)[0]
    else:
        xd = x.double()
        xhat = xd / torch.sqrt(xd.pow(2).mean(dim=1, keepdim=True) + rms_norm_eps(x.dtype, None))
    row_slack = KAPPA_C * U_ACC[case.x] * kappa * xhat.abs().amax(dim=1)
    slack = (dy.double().abs() * row_slack[:, None]).sum(dim=0)
    err = (dw.double() - rdw).abs()
    allowed = atol + rtol * rdw.abs() + slack
    assert bool((err <= allowed).all()), f"{what}: |err| {err.max():.3e} > {allowed.min():.3e}"


def _fused_pairs(dtype, gen):
    """(name, input, residual) pairs whose sum s = input + residual is adversarial: a residual
    that cancels the input, a large mean brought in by the residual, a sum that overflows, a
    NaN / Inf in the residual, a spike, and strided / misaligned residuals."""
    M, N = 6, 67
    big = 6e4 if dtype == torch.float16 else 3e38
    z = make_input((M, N), torch.float64, generator=gen)
    x = (1e3 * z).to(dtype)
    small = 1e-2 * make_input((M, N), torch.float64, generator=gen)
    mean = 1e3 if dtype == torch.float16 else 1e4
    nan_res = z.to(dtype)
    nan_res[2, 5], nan_res[4, 0] = math.nan, -math.inf
    spike = torch.zeros(M, N, dtype=dtype)
    spike[:, 33] = 100
    wide = torch.full((M, 2 * N), math.nan, dtype=dtype)
    wide[:, :N] = z.to(dtype)
    return [
        ("residual = -input + small", x, (-x.double() + small).to(dtype)),
        ("large mean from the residual", z.to(dtype), torch.full((M, N), mean, dtype=dtype)),
        ("sum overflows", torch.full((M, N), big, dtype=dtype), torch.full((M, N), big).to(dtype)),
        ("NaN / -Inf in the residual", z.to(dtype), nan_res),
        ("spike", spike, torch.zeros(M, N, dtype=dtype)),
        ("residual[:, :N] of a NaN-padded buffer", z.to(dtype), wide[:, :N]),
        ("residual transposed", z.to(dtype), small.to(dtype).t().contiguous().t()),
        ("residual misaligned", z.to(dtype), misaligned_copy(small.to(dtype), 3)),
    ]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_fused_add_on_adversarial_sums(isa, case, op, gen):
    """add_layer_norm / add_rms_norm: residual_out is bitwise input + residual (torch's add) and
    out is bitwise the unfused op on that sum, also in place (out aliasing the input); the
    gradients match the float64 reference at the rounded sum, plus the residual_out gradient."""
    add = layernorm_ext.add_layer_norm if op.is_ln else layernorm_ext.add_rms_norm
    for name, x, r in _fused_pairs(case.x, gen):
        N = x.shape[1]
        w, b = make_params((N,), case.param, True, True, generator=gen)
        args = (w, b) if op.is_ln else (w,)
        what = f"[{isa} {case.id} {op} {name}]"
        s = x + r
        out, res = add(x, r, N, *args)
        _assert_bitwise_equal_up_to_nan_payload(res, s, f"{what} residual_out")
        assert_bitwise_equal(out, op(s, N, w, b), f"{what} out vs the unfused op")
        inp, res_inplace = x.clone(), r.contiguous().clone()
        out_inplace, _ = add(inp, res_inplace, N, *args, inplace=True, out=inp)
        _assert_bitwise_equal_up_to_nan_payload(res_inplace, s, f"{what} in place: residual")
        assert_bitwise_equal(out_inplace, out, f"{what} in place, out = input: out")
        # Backward, on rows whose sum is finite (the non-finite ones are F12's business).
        finite = torch.isfinite(s.double()).all(dim=1)
        if not bool(finite.any()):
            continue
        xs, rs, sf = x[finite], r[finite], s[finite]
        leaves = [t.detach().clone().requires_grad_() for t in (xs, rs, w, b)]
        lw, lb = leaves[2], leaves[3]
        o, rr = add(leaves[0], leaves[1], N, *((lw, lb) if op.is_ln else (lw,)))
        dy = torch.randn(o.shape, generator=gen).to(case.x)
        dres = torch.randn(o.shape, generator=gen).to(case.x)
        torch.autograd.backward((o, rr), (dy, dres))
        rdx, rdw, rdb = op.closed_form_grads(dy, sf, N, w, b)
        rows = int(finite.sum())
        assert_bitwise_equal(leaves[0].grad, leaves[1].grad, f"{what} d(input) == d(residual)")
        # LayerNorm's gradients carry the κ-scaled error of §1 (the residual may bring a large
        # mean); RMSNorm's are scale-free.
        kappa = row_kappa(sf, N) if op.is_ln else torch.ones(rows, dtype=torch.float64)
        rdx = rdx + dres.double()
        assert_close_kappa(leaves[0].grad, rdx, kappa, case.x, f"{what} dx", tol=dx_tol(case.x))
        _check_param_grad_kappa(lw.grad, rdw, dy, sf, N, op, kappa, case, f"{what} dw")
        if op.is_ln:
            check_result(lb.grad, rdb, param_grad_tol(case.param, rows), f"{what} db")
        else:
            assert lb.grad is None
