"""Metamorphic properties P1–P8 of design/reliability.md §6, with hypothesis, for both ops on
every CPU kernel set.

Shapes come from {0, 1, primes, 2^k ± 1}, row scales from 10^[−20, 20] and shifts from 10^[0, 6]
(clipped to what each dtype can represent). Hypothesis draws only small descriptions (sizes,
exponents, a seed); the tensors are generated from the seed, so a failure prints a reproducible
case. ``derandomize=True`` and no example database keep CI deterministic; run with
``--hypothesis-seed=random`` (and derandomize off, e.g. via a profile) for nightly exploration.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from norm_testing import (
    assert_bitwise_equal,
    dx_tol,
    fwd_tol,
    param_grad_tol,
    ulp_distance,
)
from reliability_utils import (
    KAPPA_C,
    LN,
    OP_IDS,
    OPS,
    U_ACC,
    U_OUT,
    accurate_layer_norm_parts,
    assert_close_kappa,
    row_kappa,
)

import layernorm_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES_M = [0, 1, 2, 3, 5, 7, 13, 17, 31, 33]
SIZES_N = [1, 2, 3, 5, 7, 13, 15, 17, 31, 33, 63, 65, 127, 129, 257, 511, 513, 1025]
# Row-scale exponents per dtype: |x|·√N stays far from overflow of the fp32 accumulator (or of
# fp16 itself) and the variance stays a normal number of the accumulation type.
SCALE_EXP = {
    torch.float64: (-20, 20),
    torch.float32: (-15, 15),
    torch.bfloat16: (-15, 15),
    torch.float16: (-2, 2),
}
# Shift exponents (κ ≈ 10^k) for P1: beyond these the input rounding erases the row.
SHIFT_EXP = {torch.float64: 6, torch.float32: 6, torch.bfloat16: 1, torch.float16: 2}

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Rows:
    """A drawn case: M rows of N elements of ``dtype`` at scale 10^scale_exp, from ``seed``."""

    dtype: torch.dtype
    M: int
    N: int
    scale_exp: int
    seed: int

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def values(self, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
        """float64 rows with sample mean ``mean``·scale and population std ``scale`` (N ≥ 2)."""
        z = torch.randn(self.M, self.N, dtype=torch.float64, generator=gen)
        if self.N >= 2 and self.M > 0:
            z = z - z.mean(dim=1, keepdim=True)
            z = z / z.pow(2).mean(dim=1, keepdim=True).sqrt()
        return (z + mean) * 10.0**self.scale_exp

    def x(self, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
        return self.values(gen, mean).to(self.dtype)


@st.composite
def rows(draw, min_m: int = 0, min_n: int = 1) -> Rows:
    dtype = draw(st.sampled_from(DTYPES))
    M = draw(st.sampled_from([m for m in SIZES_M if m >= min_m]))
    N = draw(st.sampled_from([n for n in SIZES_N if n >= min_n]))
    lo, hi = SCALE_EXP[dtype]
    return Rows(dtype, M, N, draw(st.integers(lo, hi)), draw(st.integers(0, 2**31 - 1)))


def _pair_close(a, b, tol, what, slack=None):
    """|a − b| ≤ 2·(atol + rtol·|b|) (+ a per-row slack): two results each within ``tol`` of the
    same exact value. NaN positions must agree."""
    a64, b64 = a.double(), b.double()
    assert torch.equal(torch.isnan(a64), torch.isnan(b64)), f"{what}: NaN positions differ"
    finite = torch.isfinite(b64)
    err = (a64 - b64).abs()[finite]
    allowed = 2 * (tol[0] + tol[1] * b64.abs())
    if slack is not None:
        allowed = allowed + slack.reshape(-1, 1).expand_as(b64)
    allowed = allowed[finite]
    if bool((err > allowed).any()):
        i = int(torch.argmax(err - allowed))
        raise AssertionError(f"{what}: |a − b| = {err[i]:.3e} > {allowed[i]:.3e}")


def _canonical_zero(t: torch.Tensor) -> torch.Tensor:
    """−0 → +0 (adding +0 does exactly that and nothing else)."""
    return t + 0.0


# --- P1: shift invariance (LayerNorm) -------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=rows(min_m=1, min_n=2), shift_exp=st.integers(0, 6), negative=st.booleans())
def test_p1_shift(isa, case, shift_exp, negative):
    """LN(x + c) ≈ LN(x) for c = ±10^k·std, within twice the table tolerance plus the κ-scaled
    slack c·u·κ·max|ref| of §1, with u the input dtype's roundoff (x + c is rounded to it)."""
    k = min(shift_exp, SHIFT_EXP[case.dtype])
    gen = case.generator()
    z = case.values(gen)
    c = (-1 if negative else 1) * 10.0**k * 10.0**case.scale_exp
    x, xc = z.to(case.dtype), (z + c).to(case.dtype)
    if bool((xc.double() == xc.double()[:, :1]).all(dim=1).any()):
        return  # the shift rounded a row to a constant: nothing left to normalise
    kappa = row_kappa(xc, case.N)
    y, yc = LN(x, case.N), LN(xc, case.N)
    u = max(U_ACC[case.dtype], U_OUT[case.dtype])
    slack = KAPPA_C * u * kappa * y.double().abs().amax(dim=1)
    _pair_close(yc, y, fwd_tol(case.dtype), f"[{isa} {case}] LN(x + {c:g}) vs LN(x)", slack)


# --- P2: scale invariance and exact negation ------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@PROPERTY_SETTINGS
@given(case=rows(min_n=2), scale_exp=st.integers(-3, 3), pow2=st.integers(-8, 8))
def test_p2_scale_and_negation(isa, op, case, scale_exp, pow2):
    """With eps = 0 (eps ≪ a²·var): LN(a·x) ≈ LN(x) for a = 10^k; LN(2^k·x) == LN(x) bitwise
    (every intermediate scales exactly by a power of two); and without affine
    LN(−x) == −LN(x) bitwise, up to the sign of zero."""
    gen = case.generator()
    x = case.x(gen)
    y = op(x, case.N, eps=0.0)
    what = f"[{isa} {op} {case}]"
    a = 10.0**scale_exp
    xa = (x.double() * a).to(case.dtype)
    if bool(torch.isfinite(xa).all()) and bool((xa.double().abs() > 0).any(dim=1).all()):
        # a·x is rounded to the dtype: each element moves by u_in·|x|, y by u_in·κ·max|y|.
        kappa = row_kappa(x, case.N) if op.is_ln else torch.ones(case.M, dtype=torch.float64)
        u = max(U_ACC[case.dtype], U_OUT[case.dtype])
        slack = KAPPA_C * u * kappa * y.double().abs().amax(dim=1) if case.M else None
        _pair_close(op(xa, case.N, eps=0.0), y, fwd_tol(case.dtype), f"{what} a={a:g}", slack)
    # Power-of-two scale: exact as long as nothing overflows or becomes subnormal.
    x2 = x * 2.0**pow2
    tiny = torch.finfo(case.dtype).tiny
    representable = bool(torch.isfinite(x2).all()) and all(
        bool(((t.abs() >= tiny) | (t == 0)).all()) for t in (x, x2)
    )
    if representable and case.M > 0:
        assert_bitwise_equal(op(x2, case.N, eps=0.0), y, f"{what} scale 2^{pow2}")
    for eps in (0.0, op.default_eps()):
        assert_bitwise_equal(
            _canonical_zero(op(-x, case.N, eps=eps)),
            _canonical_zero(-op(x, case.N, eps=eps)),
            f"{what} LN(-x) == -LN(x) eps={eps}",
        )


# --- P3: permutation equivariance -----------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@PROPERTY_SETTINGS
@given(case=rows(min_m=1, min_n=2))
def test_p3_permutation(isa, op, case):
    """LN(x[:, p]) ≈ LN(x)[:, p], and the same for dx with dy permuted alike."""
    gen = case.generator()
    x = case.x(gen, mean=1.0)
    dy = torch.randn(case.M, case.N, generator=gen).to(case.dtype)
    p = torch.randperm(case.N, generator=gen)
    y, dx, _, _ = op.run(x, case.N, dy=dy)
    yp, dxp, _, _ = op.run(x[:, p], case.N, dy=dy[:, p])
    what = f"[{isa} {op} {case}]"
    _pair_close(yp, y[:, p], fwd_tol(case.dtype), f"{what} y")
    # dx on the scale of its terms (rstd·|dy| = |dy| / 10^scale): one tolerance for any scale.
    s = 10.0**case.scale_exp
    _pair_close(dxp.double() * s, dx[:, p].double() * s, dx_tol(case.dtype), f"{what} dx")


# --- P4: row independence (bitwise) ---------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@PROPERTY_SETTINGS
@given(case=rows(min_m=1), extra=st.sampled_from([1, 2, 7, 23, 24, 64]))
def test_p4_row_independence(isa, op, case, extra):
    """LN(x)[i] == LN(x[i:i+1]) and LN(cat(x, z))[:len(x)] == LN(x), bitwise, for y and dx:
    a row's result never depends on the batch around it (pytorch#149301)."""
    gen = case.generator()
    x = case.x(gen, mean=0.5)
    z = Rows(case.dtype, extra, case.N, case.scale_exp, case.seed + 1).x(gen)
    dy = torch.randn(case.M, case.N, generator=gen).to(case.dtype)
    dz = torch.randn(extra, case.N, generator=gen).to(case.dtype)
    w = (1 + torch.randn(case.N, generator=gen)).to(case.dtype)
    y, dx, _, _ = op.run(x, case.N, w, None, dy)
    what = f"[{isa} {op} {case}]"
    for i in sorted({0, case.M // 2, case.M - 1}):
        yi, dxi, _, _ = op.run(x[i : i + 1], case.N, w, None, dy[i : i + 1])
        assert_bitwise_equal(yi, y[i : i + 1], f"{what} y row {i} alone")
        assert_bitwise_equal(dxi, dx[i : i + 1], f"{what} dx row {i} alone")
    yb, dxb, _, _ = op.run(torch.cat([x, z]), case.N, w, None, torch.cat([dy, dz]))
    assert_bitwise_equal(yb[: case.M], y, f"{what} y of cat(x, z)[:M] (+{extra} rows)")
    assert_bitwise_equal(dxb[: case.M], dx, f"{what} dx of cat(x, z)[:M] (+{extra} rows)")


# --- P5: output statistics ------------------------------------------------------------------------

P5_DELTA = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-1, torch.bfloat16: 1e-1}


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@PROPERTY_SETTINGS
@given(case=rows(min_m=1, min_n=2), mean=st.floats(-3, 3))
def test_p5_statistics(isa, op, case, mean):
    """γ = 1, β = 0, eps = 0: each LayerNorm row has mean ≈ 0 and variance ≈ 1; each RMSNorm
    row has mean square ≈ 1 (δ = 1e-5 fp32, 1e-12 fp64, 1e-1 fp16 / bf16, per §5 F2)."""
    gen = case.generator()
    x = case.x(gen, mean=mean)
    xd = x.double()
    if bool((xd == xd[:, :1]).all(dim=1).any()):
        return  # a constant row: 0/0 at eps = 0
    w = torch.ones(case.N, dtype=case.dtype)
    b = torch.zeros(case.N, dtype=case.dtype)
    y = op(x, case.N, w, b, 0.0).double()
    delta = P5_DELTA[case.dtype]
    what = f"[{isa} {op} {case} mean={mean:g}]"
    if op.is_ln:
        assert float(y.mean(dim=1).abs().max()) <= delta, f"{what}: mean {y.mean(dim=1)}"
        assert float((y.var(dim=1, unbiased=False) - 1).abs().max()) <= delta, f"{what}: var"
    else:
        assert float((y.pow(2).mean(dim=1) - 1).abs().max()) <= delta, f"{what}: mean square"


# --- P6: gradient identities ----------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@PROPERTY_SETTINGS
@given(case=rows(min_m=1, min_n=2))
def test_p6_gradient_identities(isa, op, case):
    """γ = 1, eps = 0: Σ_j dx ≈ 0 (LayerNorm) and Σ_j dx·x̂ ≈ 0 (both), each within the sum of
    the elements' dx tolerances (dx on its natural scale σ·dx); dβ == Σ_i dy exactly for
    integer dy (every partial sum is exact, so one rounding to the parameter dtype remains);
    dγ ≈ Σ_i dy·x̂ with the fp64 x̂."""
    gen = case.generator()
    x = case.x(gen, mean=0.7)
    xd = x.double()
    if bool((xd == xd[:, :1]).all(dim=1).any()):
        return
    dy = torch.randint(-8, 9, (case.M, case.N), generator=gen).to(case.dtype)
    w = torch.ones(case.N, dtype=case.dtype)
    b = torch.zeros(case.N, dtype=case.dtype)
    _, dx, dw, db = op.run(x, case.N, w, b, dy, 0.0)
    if op.is_ln:
        xhat, _, rstd = accurate_layer_norm_parts(x, case.N, 0.0)
    else:
        rstd = 1.0 / xd.pow(2).mean(dim=1).sqrt()
        xhat = xd * rstd[:, None]
    what = f"[{isa} {op} {case}]"
    atol, rtol = dx_tol(case.dtype)
    scaled = dx.double() / rstd[:, None]  # dx ∝ rstd·dy: O(|dy|)
    bound = (atol * dy.double().abs().amax(dim=1, keepdim=True) + rtol * scaled.abs()).sum(dim=1)
    identities = [("Σ dx·x̂", (scaled * xhat).sum(dim=1), bound * xhat.abs().amax(dim=1))]
    if op.is_ln:
        identities.append(("Σ dx", scaled.sum(dim=1), bound))
    for name, value, allowed in identities:
        assert bool((value.abs() <= allowed).all()), f"{what} {name}: {value} (allowed {allowed})"
    expected_db = dy.double().sum(dim=0).to(case.dtype)
    if db is not None:
        assert_bitwise_equal(db, expected_db, f"{what} dβ == Σ_i dy")
    rdw = (dy.double() * xhat).sum(dim=0)
    atol, rtol = param_grad_tol(case.dtype, case.M)
    err = (dw.double() - rdw).abs()
    # Plus the κ-scaled slack of §1 on each of the M products dy·x̂ (|dy| up to 8, not O(1)).
    kappa = float(row_kappa(x, case.N).max()) if op.is_ln else 1.0
    size = (dy.double().abs() * xhat.abs().amax(dim=1, keepdim=True)).sum(dim=0)
    allowed = atol + rtol * rdw.abs() + KAPPA_C * U_ACC[case.dtype] * kappa * size
    assert bool((err <= allowed).all()), f"{what} dγ: {err.max():.3e}"


# --- P7: the precision ladder ---------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@PROPERTY_SETTINGS
@given(
    case=rows(min_m=1, min_n=2).filter(lambda c: c.dtype in (torch.float16, torch.bfloat16)),
    affine=st.booleans(),
)
def test_p7_precision_ladder(isa, op, case, affine):
    """fp16 / bf16 results are within 1 ulp of the fp64 result rounded to the dtype, wherever
    that ulp is above the fp32 accumulation's own absolute resolution of the row (the κ-scaled
    slack c·u_acc·κ·max|ref| of §1): near zero no fp32 kernel can resolve a 16-bit ulp."""
    gen = case.generator()
    x = case.x(gen, mean=0.3)
    w = b = None
    if affine:
        w = (1 + 0.5 * torch.randn(case.N, generator=gen)).to(case.dtype)
        b = (0.5 * torch.randn(case.N, generator=gen)).to(case.dtype)
    y = op(x, case.N, w, b)
    ref = op.ref(x, case.N, w, b)
    kappa = row_kappa(x, case.N) if op.is_ln else torch.ones(case.M, dtype=torch.float64)
    ulps = ulp_distance(y, ref)
    scale = ref.abs().amax(dim=1, keepdim=True) + (b.double().abs().max() if b is not None else 0)
    floor = KAPPA_C * U_ACC[case.dtype] * kappa[:, None] * scale
    bad = (ulps > 1) & ((y.double() - ref).abs() > floor)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"[{isa} {op} {case} affine={affine}]: {int(bad.sum())} elements > 1 ulp from the "
            f"rounded fp64 result; first: {y.flatten()[i].item()!r} vs {ref.flatten()[i].item()!r}"
            f" ({int(ulps.flatten()[i])} ulp)"
        )
    # And the κ-scaled tolerance of §1, which every output must meet in any case.
    assert_close_kappa(y, ref, kappa, case.dtype, f"[{isa} {op} {case}] y")


# --- P8: CPU / CUDA parity ------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and layernorm_ext.has_cuda_kernels()),
    reason="needs a CUDA device and a build with CUDA kernels",
)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@PROPERTY_SETTINGS
@given(case=rows(min_n=1), affine=st.booleans())
def test_p8_cpu_cuda_parity(op, case, affine):
    """CPU and CUDA results agree within the dtype tolerance (twice: each is within it of the
    fp64 reference). The reduction trees differ (CPU: per-row SIMD lanes with a chunked Chan
    cascade; CUDA: warp / block trees), so bitwise equality is not expected."""
    gen = case.generator()
    x = case.x(gen, mean=0.5)
    dy = torch.randn(case.M, case.N, generator=gen).to(case.dtype)
    w = b = None
    if affine:
        w = (1 + 0.5 * torch.randn(case.N, generator=gen)).to(case.dtype)
        b = (0.5 * torch.randn(case.N, generator=gen)).to(case.dtype)
    cpu = op.run(x, case.N, w, b, dy)
    cuda = op.run(
        x.cuda(),
        case.N,
        None if w is None else w.cuda(),
        None if b is None else b.cuda(),
        dy.cuda(),
    )
    what = f"[{op} {case} affine={affine}]"
    tols = (fwd_tol(case.dtype), dx_tol(case.dtype))
    for name, c, g, tol in zip(("y", "dx"), cpu[:2], cuda[:2], tols, strict=False):
        assert g.device.type == "cuda"
        _pair_close(g.cpu(), c, tol, f"{what} {name}")
    for name, c, g in zip(("dw", "db"), cpu[2:], cuda[2:], strict=True):
        if c is not None:
            _pair_close(g.cpu(), c, param_grad_tol(case.dtype, case.M), f"{what} {name}")
