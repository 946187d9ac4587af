"""CUDA kernels: values against a float64 reference, exactness properties, layout independence,
and the host-side hygiene that makes the ops safe in streams, graphs and under torch.compile.

Skipped without a CUDA device. ``LAYERNORM_EXT_TEST_DEVICE=cpu`` runs the device-independent
tests against the CPU kernels instead (a check of the tests themselves on a machine without GPU);
the CUDA-only ones (streams, graphs, sync checks, multi-GPU) are then skipped.

Tolerances: design/reliability.md §2 against the fp64 reference computed from the exact
(rounded) inputs, plus, for fp16 / bf16 tensors, max error <= 2x PyTorch's own error in the same
dtypes + 1e-6. Bitwise properties are compared on the raw bits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext

DEVICE = os.environ.get("LAYERNORM_EXT_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")

pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(), reason="no CUDA device available"
)
cuda_only = pytest.mark.skipif(
    not (ON_CUDA and torch.cuda.is_available()), reason="needs a CUDA device"
)

ops = torch.ops.layernorm_ext

# --- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dt:
    """Input dtype and parameter dtype of one supported combination."""

    x: torch.dtype
    p: torch.dtype

    def __str__(self) -> str:
        short = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16"}
        short[torch.bfloat16] = "bf16"
        return short[self.x] if self.x == self.p else f"{short[self.x]}-{short[self.p]}w"


DTYPES = [
    Dt(torch.float32, torch.float32),
    Dt(torch.float64, torch.float64),
    Dt(torch.float16, torch.float16),
    Dt(torch.bfloat16, torch.bfloat16),
    Dt(torch.float16, torch.float32),
    Dt(torch.bfloat16, torch.float32),
]
LOW = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Variant:
    """Which op and which parameters: kind, weight, bias, zero-centered weight."""

    kind: str  # "ln" | "rms"
    w: bool
    b: bool
    zc: bool = False

    def __str__(self) -> str:
        return (
            f"{self.kind}-{'w' if self.w else ''}{'b' if self.b else ''}{'zc' if self.zc else ''}"
        )


VARIANTS = [
    Variant("ln", False, False),
    Variant("ln", True, False),
    Variant("ln", False, True),
    Variant("ln", True, True),
    Variant("ln", True, True, zc=True),
    Variant("rms", False, False),
    Variant("rms", True, False),
    Variant("rms", True, False, zc=True),
]

# The hidden sizes plus every tier boundary of the launcher (plan_rows in norm_cuda.cpp):
# forward warp tier up to 1024 (16-bit) / 512 (fp32) / 256 (fp64), block-register tier up to
# 16384 / 8192 / 4096, sweep beyond, with the row cached in shared memory up to ~113K 16-bit /
# ~56K fp32 / ~28K fp64 values on H100 (half that in the backward) and re-read beyond; backward
# warp tier up to 512 (256 fp64), block tier up to 8192 (4096 fp64). 1020 / 4100 take the
# narrower access widths.
SIZES = [1, 2, 3, 7, 31, 33, 127, 256, 257, 512, 513, 768, 769, 1020, 1024, 1025, 4095, 4096]
SIZES += [4097, 4100, 8192, 8193, 16384, 16385, 65536, 65537, 131073]
ROWS = 5

EPS_LN = 1e-5
EPS_RMS = 1e-6

# (atol, rtol) per dtype: reliability.md §2.
FWD_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}
DX_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (3e-3, 1.6e-2),
}


def param_tol(dtype: torch.dtype, rows: int) -> tuple[float, float]:
    if dtype == torch.float64:
        return 1e-10 * math.sqrt(rows / 1024) + 1e-10, 1e-10
    if dtype == torch.float32:
        return (1e-4, 1e-5) if rows <= 65536 else (1e-3, 1e-3)
    return {torch.float16: (5e-3, 1e-2), torch.bfloat16: (1e-2, 1.6e-2)}[dtype]


# --- helpers --------------------------------------------------------------------------------------


def make_x(m: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows with their own mean in [-2, 2] and std in [0.5, 2], rounded to dtype, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, generator=g)
    mu = torch.rand(m, 1, generator=g) * 4 - 2
    sigma = torch.rand(m, 1, generator=g) * 1.5 + 0.5
    return (z * sigma + mu).to(dtype).to(DEVICE)


def make_params(n: int, v: Variant, dt: Dt, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dt.p).to(DEVICE) if v.w else None
    if v.zc and w is not None:
        w = (0.5 * torch.randn(n, generator=g)).to(dt.p).to(DEVICE)
    b = (0.5 * torch.randn(n, generator=g)).to(dt.p).to(DEVICE) if v.b else None
    return w, b


def eps_of(v: Variant) -> float:
    return EPS_LN if v.kind == "ln" else EPS_RMS


def run_ours(v: Variant, x, w, b, eps=None, out=None):
    eps = eps_of(v) if eps is None else eps
    n = x.shape[-1]
    if v.kind == "ln":
        return layernorm_ext.layer_norm(x, (n,), w, b, eps, zero_centered_weight=v.zc, out=out)
    return layernorm_ext.rms_norm(x, (n,), w, eps, zero_centered_weight=v.zc, out=out)


def run_torch(v: Variant, x, w, b):
    """PyTorch's own kernels on the same tensors (zero-centered weight pre-added)."""
    n = x.shape[-1]
    w_eff = None if w is None else (1 + w if v.zc else w)
    if v.kind == "ln":
        return F.layer_norm(x, (n,), w_eff, b, EPS_LN)
    return F.rms_norm(x, (n,), w_eff, EPS_RMS)


def run_torch_upcast(v: Variant, x, w, b):
    """PyTorch in fp32 from the same values, rounded once to x's dtype: the yardstick of the 2x
    rule where PyTorch's own mixed-dtype kernel is unavailable (its CPU backward rejects a bias
    without weight in fp32 next to fp16 / bf16 input)."""
    up = [t.float() if t is not None and t.dtype in LOW else t for t in (x, w, b)]
    return run_torch(v, *up).to(x.dtype)


def reference(v: Variant, x, w, b, eps=None):
    """fp64 two-pass reference on the exact input values."""
    eps = eps_of(v) if eps is None else eps
    xd = x.double()
    if v.kind == "ln":
        mean = xd.mean(-1, keepdim=True)
        var = ((xd - mean) ** 2).mean(-1, keepdim=True)
        y = (xd - mean) / torch.sqrt(var + eps)
    else:
        y = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * ((1 + w.double()) if v.zc else w.double())
    if b is not None:
        y = y + b.double()
    return y


# Rows with a large mean next to a small spread (tiny N makes them common: two close values)
# amplify the accumulation type's rounding: xhat carries ~u * kappa relative error, kappa =
# (|mean| + s) / s, s = sqrt(var + eps) (reliability.md §1, "Conditioning"), and dx turns that
# into ~u * kappa * rstd * max|g| absolute error. These per-row atol terms (calibrated once: the
# observed error of our kernels and of PyTorch's stays below half of them) are added to the table.
COND_C = 4.0


def cond_atol(v: Variant, x, w, dy=None):
    """(atol_y [M,1], atol_dx [M,1] or None, atol_dparam [] or None) for conditioning."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = torch.finfo(acc).eps / 2
    xd = x.double()
    eps = eps_of(v)
    if v.kind == "ln":
        mean = xd.mean(-1, keepdim=True)
        s = torch.sqrt(((xd - mean) ** 2).mean(-1, keepdim=True) + eps)
        kappa = (mean.abs() + s) / s
    else:
        s = torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)
        kappa = torch.ones_like(s)
    w_eff = torch.ones_like(xd[:1]) if w is None else (1 + w.double() if v.zc else w.double())
    atol_y = COND_C * u * kappa * w_eff.abs().max()
    if dy is None:
        return atol_y, None, None
    g = dy.double() * w_eff
    atol_dx = COND_C * u * kappa / s * g.abs().amax(-1, keepdim=True)
    atol_dp = COND_C * u * (kappa * dy.double().abs().amax(-1, keepdim=True)).sum()
    return atol_y, atol_dx, atol_dp


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    keep = torch.isfinite(ref)
    if not keep.any():
        return 0.0
    return float((a.double()[keep] - ref[keep]).abs().max())


def check(actual, ref, tol, what, torch_same=None, extra_atol=None):
    """|actual - ref| <= atol (+ extra_atol, broadcast) + rtol |ref| with equal NaN positions; for
    fp16 / bf16 tensors also max error <= 2x PyTorch's same-dtype error + 1e-6. Computed on
    actual's device."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref.shape)}"
    a = actual.detach().double()
    r = ref.detach().double().to(a.device)
    assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{what}: NaN positions differ"
    keep = ~torch.isnan(r)
    atol = torch.full_like(r, tol[0])
    if extra_atol is not None:
        atol = atol + torch.as_tensor(extra_atol, dtype=torch.float64).to(a.device)
    err = (a[keep] - r[keep]).abs()
    allowed = atol[keep] + tol[1] * r[keep].abs()
    bad = ~(err <= allowed)
    if bad.any():
        i = int(torch.argmax(torch.where(bad, err - allowed, torch.zeros_like(err))))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance {tol}; worst "
            f"actual={a[keep][i].item()!r} ref={r[keep][i].item()!r} err={err[i].item():.3e}"
        )
    if torch_same is not None and actual.dtype in LOW and actual.numel() > 0:
        ours = max_err(a, r)
        theirs = max_err(torch_same.detach().to(actual.dtype).to(a.device), r)
        assert ours <= 2 * theirs + 1e-6, (
            f"{what}: max error {ours:.3e} exceeds 2x PyTorch's {actual.dtype} error {theirs:.3e}"
        )


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().contiguous().view(view).cpu()


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}"
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {a.numel()} elements differ bitwise"


def grads(v: Variant, x, w, b, dy, fn: Callable = run_ours):
    """(y, dx, dw, db) through autograd; dw / db None where the parameter is absent."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(v, *leaves)
    params = [t for t in leaves if t is not None]
    got = torch.autograd.grad(y, params, dy.to(y.dtype))
    it = iter(got)
    return (y.detach(), *(next(it) if t is not None else None for t in leaves))


def ref_grads(v: Variant, x, w, b, dy):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = reference(v, *leaves)
    params = [t for t in leaves if t is not None]
    got = torch.autograd.grad(y, params, dy.double())
    it = iter(got)
    return (y.detach(), *(next(it) if t is not None else None for t in leaves))


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t whose storage starts `offset` elements into a fresh buffer."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    out = buf[offset : offset + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.storage_offset() == offset
    return out


def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


# --- values against the reference -----------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_forward(v: Variant, dt: Dt, n: int) -> None:
    x = make_x(ROWS, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    y = run_ours(v, x, w, b)
    assert y.dtype == dt.x and y.device == x.device
    torch_same = run_torch(v, x, w, b)
    atol_y, _, _ = cond_atol(v, x, w)
    check(y, reference(v, x, w, b), FWD_TOL[dt.x], f"y {v} {dt} N={n}", torch_same, atol_y)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_backward(v: Variant, dt: Dt, n: int) -> None:
    x = make_x(ROWS, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(ROWS, n, dt.x, seed=n + 7)
    ours = grads(v, x, w, b, dy)
    try:
        theirs = grads(v, x, w, b, dy, fn=run_torch)
    except RuntimeError:
        theirs = grads(v, x, w, b, dy, fn=run_torch_upcast)
    ref = ref_grads(v, x, w, b, dy)
    names = ("y", "dx", "dw", "db")
    tols = (FWD_TOL[dt.x], DX_TOL[dt.x], param_tol(dt.p, ROWS), param_tol(dt.p, ROWS))
    atol_y, atol_dx, atol_dp = cond_atol(v, x, w, dy)
    extras = (atol_y, atol_dx, atol_dp, atol_dp)
    for name, a, t, r, tol, extra in zip(names, ours, theirs, ref, tols, extras, strict=True):
        if a is None:
            continue
        expected_dtype = dt.x if name in ("y", "dx") else dt.p
        assert a.dtype == expected_dtype, f"{name}: dtype {a.dtype}"
        check(a, r, tol, f"{name} {v} {dt} N={n}", t, extra)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_saved_statistics(kind: str, dt: Dt) -> None:
    for n in (33, 4096, 65537):
        x = make_x(ROWS, n, dt.x, seed=n)
        xd = x.double()
        acc = torch.float64 if dt.x == torch.float64 else torch.float32
        tol = (1e-12, 1e-12) if acc == torch.float64 else (1e-6, 1e-5)
        if kind == "ln":
            _, mean, rstd = ops.layer_norm_fwd(x, (n,), None, None, EPS_LN)
            ref_mean = xd.mean(-1, keepdim=True)
            ref_var = ((xd - ref_mean) ** 2).mean(-1, keepdim=True)
            assert mean.dtype == acc and mean.shape == (ROWS, 1)
            check(mean, ref_mean, tol, f"mean N={n}")
            check(rstd, 1 / torch.sqrt(ref_var + EPS_LN), tol, f"rstd N={n}")
        else:
            _, rstd = ops.rms_norm_fwd(x, (n,), None, EPS_RMS)
            ref_rstd = 1 / torch.sqrt((xd * xd).mean(-1, keepdim=True) + EPS_RMS)
            assert rstd.dtype == acc
            check(rstd, ref_rstd, tol, f"rstd N={n}")


def test_rms_default_eps() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = make_x(4, 300, dtype, seed=3)
        eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        v = Variant("rms", False, False)
        y = layernorm_ext.rms_norm(x, (300,))
        check(y, reference(v, x, None, None, eps=eps), FWD_TOL[dtype], f"rms eps=None {dtype}")


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True), (False, True, False)])
@pytest.mark.parametrize("n", [64, 3000, 20000])
def test_backward_output_mask(n: int, mask: tuple[bool, bool, bool]) -> None:
    dt = Dt(torch.bfloat16, torch.float32)
    v = Variant("ln", True, True)
    x = make_x(37, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(37, n, dt.x, seed=n + 1)
    _, mean, rstd = ops.layer_norm_fwd(x, (n,), w, b, EPS_LN)
    dx, dw, db = ops.layer_norm_bwd(dy, x, (n,), mean, rstd, w, b, False, list(mask))
    _, rdx, rdw, rdb = ref_grads(v, x, w, b, dy)
    for got, want, ref, tol, name in (
        (dx, mask[0], rdx, DX_TOL[dt.x], "dx"),
        (dw, mask[1], rdw, param_tol(dt.p, 37), "dw"),
        (db, mask[2], rdb, param_tol(dt.p, 37), "db"),
    ):
        if want:
            check(got, ref, tol, f"{name} mask={mask}")
        else:
            assert got.numel() == 0, f"{name} was not requested but came back with data"


@pytest.mark.parametrize("n", [8, 127, 1024, 2049])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[3]], ids=str)
def test_many_rows(dt: Dt, n: int) -> None:
    """65537 rows: more rows than any grid, so the grid-stride loops wrap; tails at large M."""
    m = 65537
    v = Variant("ln", True, True)
    x = make_x(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 2)
    y, dx, dw, db = grads(v, x, w, b, dy)
    ry, rdx, rdw, rdb = ref_grads(v, x, w, b, dy)
    check(y, ry, FWD_TOL[dt.x], "y")
    check(dx, rdx, DX_TOL[dt.x], "dx")
    check(dw, rdw, param_tol(dt.p, m), "dw")
    check(db, rdb, param_tol(dt.p, m), "db")


def test_empty_inputs() -> None:
    """(0, N) and (M, 0): no launch, correct shapes, zero parameter gradients, no deferred error."""
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    y = layernorm_ext.layer_norm(x, (64,), w, b)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    _, mean, rstd = ops.layer_norm_fwd(torch.randn(3, 0, device=DEVICE), (0,), None, None)
    assert mean.shape == (3, 1) and torch.isnan(mean).all() and torch.isnan(rstd).all()
    yr = layernorm_ext.rms_norm(
        torch.randn(0, 5, device=DEVICE), (5,), torch.ones(5, device=DEVICE)
    )
    assert yr.shape == (0, 5)
    sync()


# --- exactness properties -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64, 768, 4097, 20000, 65537])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_constant_rows_give_exactly_bias(dt: Dt, n: int) -> None:
    """F4: a constant row normalises to exactly 0, so y == bias bitwise (any weight)."""
    values = torch.tensor(
        [0.0, 1.0, -3.5, 1234.0, 2.0, 14.0] + ([1e6] if dt.x != torch.float16 else [])
    )
    x = values[:, None].expand(len(values), n).to(dt.x).to(DEVICE).contiguous()
    v = Variant("ln", True, True)
    w, b = make_params(n, v, dt, seed=n)
    y = run_ours(v, x, w, b)
    assert_bitwise(y, b.to(dt.x).expand_as(y), f"constant rows {dt} N={n}")
    y0 = run_ours(Variant("ln", False, False), x, None, None)
    assert (y0 == 0).all(), "constant rows without affine must give 0"


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_single_element_rows(dt: Dt) -> None:
    """F26: N == 1: y == bias bitwise, dx == 0 and dweight == 0 exactly, for any values."""
    v = Variant("ln", True, True)
    x = (torch.randn(100, 1) * 1e3).to(dt.x).to(DEVICE)
    x[0, 0] = 1e4 if dt.x == torch.float16 else 1e6
    w, b = make_params(1, v, dt, seed=1)
    dy = torch.randn(100, 1).to(dt.x).to(DEVICE)
    y, dx, dw, db = grads(v, x, w, b, dy)
    assert_bitwise(y, b.to(dt.x).expand_as(y), "y")
    assert (dx == 0).all(), "dx must be exactly 0 for N == 1"
    assert (dw == 0).all(), "dweight must be exactly 0 for N == 1"
    check(db, dy.double().sum(0), param_tol(dt.p, 100), "db")


@pytest.mark.parametrize("n", [16, 1024, 5000, 40000])
def test_zero_rows_rms(n: int) -> None:
    x = torch.zeros(4, n, device=DEVICE)
    w = torch.randn(n, device=DEVICE)
    assert (layernorm_ext.rms_norm(x, (n,), w, 1e-6) == 0).all()


@pytest.mark.parametrize("n", [4, 24, 256, 1000, 3000, 20000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[1], DTYPES[3]], ids=str)
def test_nan_rows_are_isolated(dt: Dt, n: int) -> None:
    """F11/F12: NaN or Inf in a row makes that row NaN; every other row is bitwise unchanged,
    including rows that share a warp with it."""
    m = 64
    x = make_x(m, n, dt.x, seed=n)
    bad_rows = [1, 2, 17, 40, 63]
    dirty = x.clone()
    for i, r in enumerate(bad_rows):
        dirty[r, (7 * r) % n] = float("nan") if i % 2 == 0 else float("inf")
    v = Variant("ln", True, True)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 3)
    y_c, dx_c, _, db_c = grads(v, x, w, b, dy)
    y_d, dx_d, dw_d, db_d = grads(v, dirty, w, b, dy)
    good = [r for r in range(m) if r not in bad_rows]
    assert torch.isnan(y_d[bad_rows]).all(), "a NaN / Inf row must come out all NaN"
    assert torch.isnan(dx_d[bad_rows]).all()
    assert_bitwise(y_d[good], y_c[good], "y of clean rows")
    assert_bitwise(dx_d[good], dx_c[good], "dx of clean rows")
    assert torch.isnan(dw_d).all(), "dweight sums dy * xhat over the NaN rows"
    assert_bitwise(db_d, db_c, "dbias does not depend on x")


# --- layout independence --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 96, 768, 1024, 1020, 4096, 8192, 20000, 65536])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_misaligned_pointers_are_bitwise_equal(kind: str, dt: Dt, n: int) -> None:
    """F22: storage offsets 1..7 of x, weight, bias, out and dy give the aligned results bitwise
    (the narrower access path keeps the element -> thread mapping and the arithmetic)."""
    v = Variant(kind, True, kind == "ln")
    m = 6
    x = make_x(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 5)
    y0, dx0, dw0, db0 = grads(v, x, w, b, dy)
    for k in range(1, 8):
        xk, dyk = misaligned(x, k), misaligned(dy, k)
        wk = misaligned(w, k)
        bk = misaligned(b, k) if b is not None else None
        y, dx, dw, db = grads(v, xk, wk, bk, dyk)
        assert_bitwise(y, y0, f"y offset {k}")
        assert_bitwise(dx, dx0, f"dx offset {k}")
        assert_bitwise(dw, dw0, f"dw offset {k}")
        if b is not None:
            assert_bitwise(db, db0, f"db offset {k}")
        out = misaligned(torch.zeros_like(y0), k)
        run_ours(v, xk, wk, bk, out=out)
        assert_bitwise(out, y0, f"out= offset {k}")


@pytest.mark.parametrize("n", [40, 768, 4096, 20000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[3], DTYPES[5]], ids=str)
def test_strided_rows(dt: Dt, n: int) -> None:
    """F21: x[:, :N] of a wider tensor (row stride read in place), strided dy, out= into a strided
    view, and an expanded row all equal the contiguous run bitwise."""
    v = Variant("ln", True, True)
    m = 9
    w, b = make_params(n, v, dt, seed=n)
    for pad in (1, 8, 13):
        wide = make_x(m, n + pad, dt.x, seed=n + pad)
        x = wide[:, :n]
        assert x.stride(0) == n + pad
        dy_wide = make_x(m, n + pad, dt.x, seed=n + 2 * pad)
        y, dx, dw, db = grads(v, x, w, b, dy_wide[:, :n])
        y0, dx0, dw0, db0 = grads(v, x.contiguous(), w, b, dy_wide[:, :n].contiguous())
        assert_bitwise(y, y0, f"y pad {pad}")
        assert_bitwise(dx, dx0, f"dx pad {pad}")
        assert_bitwise(dw, dw0, f"dw pad {pad}")
        assert_bitwise(db, db0, f"db pad {pad}")
        out_wide = torch.zeros(m, n + pad, dtype=dt.x, device=DEVICE)
        run_ours(v, x, w, b, out=out_wide[:, :n])
        assert_bitwise(out_wide[:, :n], y0, f"out= strided pad {pad}")
        assert (out_wide[:, n:] == 0).all(), "out= wrote outside its view"
    x = make_x(m, n, dt.x, seed=n)
    y0 = run_ours(v, x, w, b)
    run_ours(v, x, w, b, out=x)  # in place: each row is read before it is overwritten
    assert_bitwise(x, y0, "out= aliasing the input")
    row = make_x(1, n, dt.x, seed=n)
    y = run_ours(v, row.expand(5, n), w, b)
    for r in range(5):
        assert_bitwise(y[r : r + 1], run_ours(v, row, w, b), f"expanded row {r}")


@pytest.mark.parametrize("n", [5, 64, 1000, 3000, 12000, 70000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[1], DTYPES[2]], ids=str)
def test_batch_invariance(dt: Dt, n: int) -> None:
    """P4: a row's y and dx do not depend on the other rows, the row count or its position."""
    v = Variant("ln", True, True)
    m = 300 if n <= 3000 else 40
    x = make_x(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 4)
    y, dx, _, _ = grads(v, x, w, b, dy)
    for lo, hi in ((0, 1), (m - 1, m), (7, 30), (0, m - 3)):
        ys, dxs, _, _ = grads(v, x[lo:hi], w, b, dy[lo:hi])
        assert_bitwise(ys, y[lo:hi], f"y rows {lo}:{hi}")
        assert_bitwise(dxs, dx[lo:hi], f"dx rows {lo}:{hi}")
    rms = Variant("rms", True, False)
    yr = run_ours(rms, x, w, None)
    assert_bitwise(run_ours(rms, x[5:6], w, None), yr[5:6], "rms row 5")


@pytest.mark.parametrize("n", [64, 768, 4096, 20000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[3], DTYPES[5]], ids=str)
def test_parameter_gradients_are_deterministic(dt: Dt, n: int) -> None:
    """Two-stage dweight / dbias without atomics: bitwise equal run to run."""
    v = Variant("ln", True, True)
    m = 3000 if n <= 4096 else 300
    x = make_x(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 6)
    first = grads(v, x, w, b, dy)
    for _ in range(4):
        again = grads(v, x, w, b, dy)
        for name, a, c in zip(("y", "dx", "dw", "db"), first, again, strict=True):
            assert_bitwise(c, a, name)
    rms = Variant("rms", True, False)
    r1 = grads(rms, x, w, None, dy)
    r2 = grads(rms, x, w, None, dy)
    assert_bitwise(r1[2], r2[2], "rms dw")


@cuda_only
@pytest.mark.parametrize("n", [100, 2048, 20000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[3], DTYPES[4]], ids=str)
def test_cpu_and_cuda_agree(dt: Dt, n: int) -> None:
    """P8: same inputs on CPU and GPU agree within the dtype tolerance (the reduction trees
    differ: CPU lane cascades vs GPU thread / warp / block trees)."""
    v = Variant("ln", True, True)
    m = 17
    x = make_x(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 8)
    gpu = grads(v, x, w, b, dy)
    cpu = grads(v, x.cpu(), w.cpu(), b.cpu(), dy.cpu())
    tols = (FWD_TOL[dt.x], DX_TOL[dt.x], param_tol(dt.p, m), param_tol(dt.p, m))
    for name, g, c, tol in zip(("y", "dx", "dw", "db"), gpu, cpu, tols, strict=True):
        check(g.cpu(), c.double(), (2 * tol[0], 2 * tol[1]), f"{name} CPU vs CUDA")
    rms = Variant("rms", True, False)
    check(
        run_ours(rms, x, w, None).cpu(),
        run_ours(rms, x.cpu(), w.cpu(), None).double(),
        (2 * FWD_TOL[dt.x][0], 2 * FWD_TOL[dt.x][1]),
        "rms CPU vs CUDA",
    )


# --- streams, graphs, synchronisation, devices, compile -------------------------------------------


def fwd_bwd_ops(x, w, b, dy):
    """layer_norm_fwd + layer_norm_bwd and rms_norm_fwd + rms_norm_bwd, all gradients."""
    n = x.shape[-1]
    y, mean, rstd = ops.layer_norm_fwd(x, (n,), w, b, EPS_LN)
    dx, dw, db = ops.layer_norm_bwd(dy, x, (n,), mean, rstd, w, b, False, [True, True, True])
    yr, rstd_r = ops.rms_norm_fwd(x, (n,), w, EPS_RMS)
    dxr, dwr = ops.rms_norm_bwd(dy, x, (n,), rstd_r, w, False, [True, True])
    return [y, mean, rstd, dx, dw, db, yr, rstd_r, dxr, dwr]


@cuda_only
@pytest.mark.parametrize("n", [256, 4096, 20000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[3]], ids=str)
def test_cuda_graph_capture_and_replay(dt: Dt, n: int) -> None:
    """Captured forward + backward (workspace included) replays bitwise equal to eager."""
    m = 333
    v = Variant("ln", True, True)
    w, b = make_params(n, v, dt, seed=n)
    static_x = make_x(m, n, dt.x, seed=n)
    static_dy = make_x(m, n, dt.x, seed=n + 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: kernel loading, occupancy caches, allocator
            fwd_bwd_ops(static_x, w, b, static_dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fwd_bwd_ops(static_x, w, b, static_dy)
    for i in range(3):
        x = make_x(m, n, dt.x, seed=100 + i)
        dy = make_x(m, n, dt.x, seed=200 + i)
        static_x.copy_(x)
        static_dy.copy_(dy)
        for _ in range(100 if i == 0 else 1):
            graph.replay()
        eager = fwd_bwd_ops(x, w, b, dy)
        torch.cuda.synchronize()
        for j, (c, e) in enumerate(zip(captured, eager, strict=True)):
            assert_bitwise(c, e, f"graph output {j} replay {i}")


@cuda_only
def test_runs_on_the_current_stream() -> None:
    """Work is ordered on the caller's current stream: on a side stream kept busy, the op must see
    an input update queued just before it there, and the result matches the default stream's."""
    n, m = 4096, 2048
    x_old = make_x(m, n, torch.float32, seed=1)
    x_new = make_x(m, n, torch.float32, seed=2)
    w = torch.randn(n, device=DEVICE)
    expected = layernorm_ext.layer_norm(x_new, (n,), w, None)
    expected_rms = layernorm_ext.rms_norm(x_new, (n,), w, 1e-6)
    x = x_old.clone()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms: anything not on `side` would overtake
        x.copy_(x_new)
        y = layernorm_ext.layer_norm(x, (n,), w, None)
        yr = layernorm_ext.rms_norm(x, (n,), w, 1e-6)
        xg = x.detach().requires_grad_()
        layernorm_ext.layer_norm(xg, (n,), w, None).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    assert_bitwise(y, expected, "layer_norm on a side stream")
    assert_bitwise(yr, expected_rms, "rms_norm on a side stream")
    xe = x_new.detach().requires_grad_()
    layernorm_ext.layer_norm(xe, (n,), w, None).sum().backward()
    assert_bitwise(xg.grad, xe.grad, "backward on a side stream")


@cuda_only
def test_no_host_synchronisation() -> None:
    """Every launcher path (each tier, fwd and bwd, out=, empty rows) runs under
    torch.cuda.set_sync_debug_mode('error') without a host synchronisation."""
    cases = []
    for n in (64, 3000, 20000, 140000):
        dt = Dt(torch.bfloat16, torch.float32)
        w, b = make_params(n, Variant("ln", True, True), dt, seed=n)
        cases.append((make_x(16, n, dt.x, seed=n), w, b, make_x(16, n, dt.x, seed=n + 1)))
    empty = torch.randn(0, 32, device=DEVICE)
    no_cols = torch.randn(4, 0, device=DEVICE)
    out = torch.empty(16, 64, dtype=torch.bfloat16, device=DEVICE)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, w, b, dy in cases:
            fwd_bwd_ops(x, w, b, dy)
            layernorm_ext.layer_norm(x, (x.shape[-1],), w, b)
            layernorm_ext.rms_norm(x, (x.shape[-1],), w)
        layernorm_ext.layer_norm(cases[0][0], (64,), cases[0][1], cases[0][2], out=out)
        layernorm_ext.layer_norm(empty, (32,))
        ops.layer_norm_fwd(no_cols, (0,), None, None)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_non_default_device() -> None:
    """Tensors on cuda:1 while cuda:0 is current: correct values, outputs on cuda:1."""
    v = Variant("ln", True, True)
    dt = DTYPES[0]
    for n in (100, 4096, 30000):
        x = make_x(50, n, dt.x, seed=n)
        w, b = make_params(n, v, dt, seed=n)
        dy = make_x(50, n, dt.x, seed=n + 1)
        x1, w1, b1, dy1 = (t.to("cuda:1") for t in (x, w, b, dy))
        with torch.cuda.device(0):
            got = grads(v, x1, w1, b1, dy1)
            ry = layernorm_ext.rms_norm(x1, (n,), w1, 1e-6)
        assert all(t.device == torch.device("cuda:1") for t in (*got, ry))
        ref = ref_grads(v, x, w, b, dy)
        tols = (FWD_TOL[dt.x], DX_TOL[dt.x], param_tol(dt.p, 50), param_tol(dt.p, 50))
        for name, g, r, tol in zip(("y", "dx", "dw", "db"), got, ref, tols, strict=True):
            check(g, r, tol, f"{name} on cuda:1 N={n}")
        check(ry, reference(Variant("rms", True, False), x, w, None), FWD_TOL[dt.x], "rms cuda:1")


@cuda_only
def test_torch_compile() -> None:
    """fullgraph torch.compile (forward and backward) calls our CUDA kernels and matches eager."""
    torch._dynamo.reset()
    n = 1024

    def f(x, w, b):
        h = layernorm_ext.layer_norm(x, (n,), w, b)
        return layernorm_ext.rms_norm(h * 2, (n,), w, 1e-6)

    compiled = torch.compile(f, fullgraph=True)
    x = make_x(64, n, torch.float32, seed=1).requires_grad_()
    w = torch.randn(n, device=DEVICE, requires_grad=True)
    b = torch.randn(n, device=DEVICE, requires_grad=True)
    got = compiled(x, w, b)
    want = f(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g_got = torch.autograd.grad(got.sum(), [x, w, b])
    g_want = torch.autograd.grad(want.sum(), [x, w, b])
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.huge
@cuda_only
def test_more_than_2_pow_31_elements() -> None:
    """F19: (2^21 + 1) x 1024 fp16 (> 2^31 elements): sampled rows, including those past 2^31
    elements, equal the same rows run alone (64-bit offsets), forward and backward."""
    m, n = 2**21 + 1, 1024
    x = torch.randn(m, n, dtype=torch.float16, device=DEVICE)
    dy = torch.randn(m, n, dtype=torch.float16, device=DEVICE)
    w = torch.randn(n, dtype=torch.float16, device=DEVICE)
    y, mean, rstd = ops.layer_norm_fwd(x, (n,), w, None, EPS_LN)
    dx, _, _ = ops.layer_norm_bwd(dy, x, (n,), mean, rstd, w, None, False, [True, False, False])
    for r in sorted({0, 2**20, 2**31 // n - 1, 2**31 // n, m - 1}):  # 2**31 // n == m - 1
        yr, mr, sr = ops.layer_norm_fwd(x[r : r + 1], (n,), w, None, EPS_LN)
        assert_bitwise(y[r : r + 1], yr, f"y row {r}")
        dxr, _, _ = ops.layer_norm_bwd(
            dy[r : r + 1], x[r : r + 1], (n,), mr, sr, w, None, False, [True, False, False]
        )
        assert_bitwise(dx[r : r + 1], dxr, f"dx row {r}")
