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


def torch_yardstick(v: Variant, x, w, b):
    """PyTorch's same-dtype result for the 2x rule: its own kernel on the same tensors, or the
    fp32 upcast where that kernel rejects the dtype mix (torch 2.11's CUDA native_layer_norm
    wants the weight in x's dtype: "expected scalar type Half but found Float")."""
    try:
        return run_torch(v, x, w, b)
    except RuntimeError:
        return run_torch_upcast(v, x, w, b)


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
    torch_same = torch_yardstick(v, x, w, b)
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
    """(0, N) and (M, 0): no launch, correct shapes and statistics, zero parameter gradients, no
    deferred error."""
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    y = layernorm_ext.layer_norm(x, (64,), w, b)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    # Rows without elements: empty sums are zero, so mean 0 and rstd 1/sqrt(eps) (README; ATen
    # leaves NaN there). eps = 0.25 makes that exactly 2.
    _, mean, rstd = ops.layer_norm_fwd(torch.randn(3, 0, device=DEVICE), (0,), None, None, 0.25)
    assert mean.shape == (3, 1) and rstd.shape == (3, 1)
    assert bool((mean == 0).all()) and bool((rstd == 2).all()), (mean, rstd)
    _, rstd = ops.rms_norm_fwd(torch.randn(3, 0, device=DEVICE), (0,), None, 0.25)
    assert bool((rstd == 2).all()), rstd
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


# --- fused residual add ---------------------------------------------------------------------------
#
# add_layer_norm / add_rms_norm (and their _fwd and in-place forms) run the add inside the norm
# kernels: s = x + residual in the accumulation type, rounded once to the input dtype, stored as
# residual_out and normalised from the rounded values. So residual_out is bitwise torch's x + r,
# y is bitwise the plain norm of residual_out (same kernel, same values, same element -> thread
# mapping), and the saved statistics are bitwise those of the plain _fwd op on residual_out. The
# backward adds grad_residual to dx in the accumulation type before dx is rounded: for fp32 /
# fp64 that is bitwise (plain dx) + grad_residual; for fp16 / bf16 it is one rounding closer.

# Forward: warp tier (<= 1024 16-bit / 512 fp32 / 256 fp64), block-register tier (<= 16384 /
# 8192 / 4096), sweep with the row cached in shared memory (20000) and re-read from residual_out
# (131073; 65537 for fp32 / fp64). 1000 / 4100 / 8193 take narrower access widths for some
# dtypes. Backward: warp <= 512 (256 fp64), block <= 8192 (4096 fp64), sweep beyond.
FUSED_SIZES = [1, 7, 64, 257, 1000, 1025, 4100, 8193, 16385, 20000, 65537, 131073]
FUSED_TIER_SIZES = [7, 1000, 4100, 20000, 131073]


def run_add(v: Variant, x, r, w, b, eps=None):
    """(y, residual_out) of the fused op."""
    eps = eps_of(v) if eps is None else eps
    n = x.shape[-1]
    if v.kind == "ln":
        return layernorm_ext.add_layer_norm(x, r, (n,), w, b, eps, zero_centered_weight=v.zc)
    return layernorm_ext.add_rms_norm(x, r, (n,), w, eps, zero_centered_weight=v.zc)


def run_add_inplace(v: Variant, x, r, w, b, out=None):
    """In-place form: r <- x + r, returns (y, r)."""
    n = x.shape[-1]
    if v.kind == "ln":
        return layernorm_ext.add_layer_norm(
            x, r, (n,), w, b, EPS_LN, zero_centered_weight=v.zc, inplace=True, out=out
        )
    return layernorm_ext.add_rms_norm(
        x, r, (n,), w, EPS_RMS, zero_centered_weight=v.zc, inplace=True, out=out
    )


def run_add_fwd(v: Variant, x, r, w, b):
    """(y, residual_out, mean or None, rstd) of the _fwd op."""
    n = x.shape[-1]
    if v.kind == "ln":
        return tuple(ops.add_layer_norm_fwd(x, r, (n,), w, b, EPS_LN, zero_centered_weight=v.zc))
    y, s, rstd = ops.add_rms_norm_fwd(x, r, (n,), w, EPS_RMS, zero_centered_weight=v.zc)
    return y, s, None, rstd


def run_fwd_stats(v: Variant, x, w, b):
    """(y, mean or None, rstd) of the plain _fwd op."""
    n = x.shape[-1]
    if v.kind == "ln":
        return tuple(ops.layer_norm_fwd(x, (n,), w, b, EPS_LN, zero_centered_weight=v.zc))
    y, rstd = ops.rms_norm_fwd(x, (n,), w, EPS_RMS, zero_centered_weight=v.zc)
    return y, None, rstd


def run_bwd(v: Variant, dy, s, stats, w, b, grad_residual=None, mask=(True, True, True)):
    """(dx, dw or None, db or None) of the plain _bwd op on the saved sum s."""
    n = s.shape[-1]
    mean, rstd = stats
    if v.kind == "ln":
        dx, dw, db = ops.layer_norm_bwd(
            dy, s, (n,), mean, rstd, w, b, v.zc, list(mask), grad_residual
        )
    else:
        dx, dw = ops.rms_norm_bwd(dy, s, (n,), rstd, w, v.zc, list(mask[:2]), grad_residual)
        db = None
    return dx, (dw if w is not None else None), (db if b is not None else None)


def make_residual(m: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A residual stream of a larger scale than the layer output (as in pre-norm blocks)."""
    g = torch.Generator().manual_seed(seed + 12345)
    return (3 * torch.randn(m, n, generator=g)).to(dtype).to(DEVICE)


def add_grads(v: Variant, x, r, w, b, dy, dres):
    """(y, residual_out, dx, dr, dw, db) of the fused op through autograd, both outputs with a
    gradient; dw / db None where the parameter is absent."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    y, s = run_add(v, *leaves)
    params = [t for t in leaves if t is not None]
    got = torch.autograd.grad((y, s), params, (dy.to(y.dtype), dres.to(s.dtype)))
    it = iter(got)
    dx, dr, dw, db = (next(it) if t is not None else None for t in leaves)
    return y.detach(), s.detach(), dx, dr, dw, db


def check_fused_forward(v: Variant, dt: Dt, x, r, w, b, what: str) -> tuple:
    """All forward properties of the fused op on (x, r); returns (y, residual_out)."""
    y, s = run_add(v, x, r, w, b)
    assert y.dtype == dt.x and s.dtype == dt.x and y.device == x.device
    s_ref = x + r
    assert_bitwise(s, s_ref, f"residual_out {what}")
    assert_bitwise(y, run_ours(v, s_ref, w, b), f"y vs plain norm of x + r {what}")
    atol_y, _, _ = cond_atol(v, s_ref, w)
    torch_same = torch_yardstick(v, s_ref, w, b)
    check(y, reference(v, s_ref, w, b), FWD_TOL[dt.x], f"y {what}", torch_same, atol_y)
    return y, s


@pytest.mark.parametrize("n", FUSED_TIER_SIZES)
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_fused_add_forward(v: Variant, dt: Dt, n: int) -> None:
    """Every (kind, weight, bias, dtype) instantiation x every tier: residual_out == x + r and
    y == norm(x + r) bitwise, y against the fp64 reference of the rounded sum, and the _fwd op's
    statistics bitwise those of the plain _fwd op."""
    x = make_x(ROWS, n, dt.x, seed=n)
    r = make_residual(ROWS, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    _, s = check_fused_forward(v, dt, x, r, w, b, f"{v} {dt} N={n}")
    y2, s2, mean, rstd = run_add_fwd(v, x, r, w, b)
    y0, mean0, rstd0 = run_fwd_stats(v, s, w, b)
    assert_bitwise(y2, y0, "y of the _fwd op")
    assert_bitwise(s2, s, "residual_out of the _fwd op")
    assert_bitwise(rstd, rstd0, "rstd of the _fwd op")
    if mean is not None:
        assert_bitwise(mean, mean0, "mean of the _fwd op")


@pytest.mark.parametrize("n", FUSED_SIZES)
@pytest.mark.parametrize("dt", DTYPES[:4], ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_fused_add_sizes(kind: str, dt: Dt, n: int) -> None:
    """Every tier boundary and access width; 3-D input; a row count that wraps the grid."""
    v = Variant(kind, True, kind == "ln")
    m = 3 if n > 20000 else 37
    x = make_x(m, n, dt.x, seed=n).view(m, 1, n)
    r = make_residual(m, n, dt.x, seed=n).view(m, 1, n)
    w, b = make_params(n, v, dt, seed=n)
    check_fused_forward(v, dt, x, r, w, b, f"{v} {dt} N={n}")


@cuda_only
@pytest.mark.parametrize("n", [100, 1000, 4100, 20000, 131073])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[2], DTYPES[3], DTYPES[5]], ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_fused_add_cpu_and_cuda_agree(kind: str, dt: Dt, n: int) -> None:
    """The CUDA fused op against the CPU fused op: residual_out bitwise (one rounding of the
    same sum), y / dx / dw / db within twice the dtype tolerance (the reduction trees differ)."""
    v = Variant(kind, True, kind == "ln")
    m = 9
    x = make_x(m, n, dt.x, seed=n)
    r = make_residual(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 3)
    dres = make_x(m, n, dt.x, seed=n + 4)
    gpu = add_grads(v, x, r, w, b, dy, dres)
    cpu = add_grads(v, *(t.cpu() if t is not None else None for t in (x, r, w, b, dy, dres)))
    assert_bitwise(gpu[1], cpu[1].to(DEVICE), "residual_out CPU vs CUDA")
    tols = (FWD_TOL[dt.x], None, DX_TOL[dt.x], DX_TOL[dt.x], param_tol(dt.p, m), param_tol(dt.p, m))
    for name, g, c, tol in zip(("y", "s", "dx", "dr", "dw", "db"), gpu, cpu, tols, strict=True):
        if tol is None or g is None:
            continue
        check(g.cpu(), c.double(), (2 * tol[0], 2 * tol[1]), f"{name} CPU vs CUDA {v} {dt} N={n}")


@pytest.mark.parametrize("n", [*FUSED_TIER_SIZES, 257, 8193])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("v", [VARIANTS[i] for i in (0, 3, 4, 5, 7)], ids=str)
def test_fused_add_backward(v: Variant, dt: Dt, n: int) -> None:
    """Gradients of both outputs through autograd (the _bwd ops with grad_residual): input and
    residual get equal gradients; against the fp64 reference; dx bitwise (plain dx) +
    grad_residual for fp32 / fp64; dw / db bitwise independent of grad_residual."""
    x = make_x(ROWS, n, dt.x, seed=n)
    r = make_residual(ROWS, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(ROWS, n, dt.x, seed=n + 7)
    dres = make_x(ROWS, n, dt.x, seed=n + 9)
    y, s, dx, dr, dw, db = add_grads(v, x, r, w, b, dy, dres)
    assert_bitwise(s, x + r, "residual_out")
    assert_bitwise(dx, dr, "input and residual gradients")
    assert dx.data_ptr() != dr.data_ptr()
    # Reference: the fp64 norm of the rounded sum, plus the residual gradient.
    ry, rdx, rdw, rdb = ref_grads(v, s, w, b, dy)
    rdx = rdx + dres.double()
    atol_y, atol_dx, atol_dp = cond_atol(v, s, w, dy)
    what = f"{v} {dt} N={n}"
    check(y, ry, FWD_TOL[dt.x], f"y {what}", None, atol_y)
    check(dx, rdx, DX_TOL[dt.x], f"dx {what}", None, atol_dx)
    if dw is not None:
        check(dw, rdw, param_tol(dt.p, ROWS), f"dw {what}", None, atol_dp)
    if db is not None:
        check(db, rdb, param_tol(dt.p, ROWS), f"db {what}", None, atol_dp)
    # The same kernels without grad_residual, on the same saved statistics.
    _, _, mean, rstd = run_add_fwd(v, x, r, w, b)
    fused = run_bwd(v, dy, s, (mean, rstd), w, b, dres)
    plain = run_bwd(v, dy, s, (mean, rstd), w, b, None)
    assert_bitwise(fused[0], dx, "dx of the _bwd op vs autograd")
    for name, f_, p_ in zip(("dw", "db"), fused[1:], plain[1:], strict=True):
        if f_ is not None:
            assert_bitwise(f_, p_, f"{name} does not depend on grad_residual")
    if dt.x in (torch.float32, torch.float64):
        assert_bitwise(fused[0], plain[0] + dres, "dx == plain dx + grad_residual")
    else:
        # One rounding of dx + grad_residual (in fp32) instead of rounding dx first, then adding
        # (two roundings): in total never further from the fp64 value.
        err_fused = float((fused[0].double() - rdx).abs().sum())
        err_twice = float(((plain[0] + dres).double() - rdx).abs().sum())
        assert err_fused <= 1.01 * err_twice + 1e-6 * rdx.numel(), (
            f"fused dx rounding {what}: total error {err_fused:.4e} vs {err_twice:.4e}"
        )
    # dx only (no parameter gradients): the same dx.
    dx_only = run_bwd(v, dy, s, (mean, rstd), w, b, dres, mask=(True, False, False))[0]
    assert_bitwise(dx_only, dx, "dx without parameter gradients")


@pytest.mark.parametrize("n", [*FUSED_TIER_SIZES, 65536])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[2], DTYPES[3], DTYPES[5]], ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_fused_add_inplace(kind: str, dt: Dt, n: int) -> None:
    """In-place form (residual_out is the residual tensor): residual == x + r and y == the
    out-of-place y, bitwise; out= aliasing the input; residual aliasing the input (s = 2x)."""
    v = Variant(kind, True, kind == "ln")
    m = 7
    x = make_x(m, n, dt.x, seed=n)
    r = make_residual(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    y0, s0 = run_add(v, x, r, w, b)
    res = r.clone()
    y, res_out = run_add_inplace(v, x, res, w, b)
    assert res_out is res
    assert_bitwise(res, s0, "residual updated in place")
    assert_bitwise(y, y0, "y of the in-place form")
    # out= the input (decode step): the input is overwritten with the norm.
    inp, res = x.clone(), r.clone()
    out, _ = run_add_inplace(v, inp, res, w, b, out=inp)
    assert out is inp
    assert_bitwise(inp, y0, "out= aliasing the input")
    assert_bitwise(res, s0, "residual with out= aliasing the input")
    # The residual is the input itself: every operand but out is one tensor.
    both = x.clone()
    y2, _ = run_add_inplace(v, both, both, w, b)
    assert_bitwise(both, x + x, "residual aliasing the input")
    assert_bitwise(y2, run_ours(v, x + x, w, b), "y with the residual aliasing the input")
    # Several launches on one residual stream, as in a stack of blocks.
    res = r.clone()
    expect = r.clone()
    for i in range(3):
        h = make_x(m, n, dt.x, seed=n + 100 + i)
        y_i, _ = run_add_inplace(v, h, res, w, b)
        expect = h + expect
        assert_bitwise(res, expect, f"residual after step {i}")
        assert_bitwise(y_i, run_ours(v, expect, w, b), f"y of step {i}")


@pytest.mark.parametrize("n", [8, 96, 768, 1020, 4096, 20000, 65536])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[1], DTYPES[3], DTYPES[4]], ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_fused_add_misaligned_pointers_are_bitwise_equal(kind: str, dt: Dt, n: int) -> None:
    """Storage offsets 1..7 of input, residual (in place too), out and grad_residual, one at a time
    and all together, give the aligned results bitwise: the residual pointers and strides take
    part in the access-width choice."""
    v = Variant(kind, True, kind == "ln")
    m = 6
    x = make_x(m, n, dt.x, seed=n)
    r = make_residual(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 5)
    dres = make_x(m, n, dt.x, seed=n + 6)
    base = add_grads(v, x, r, w, b, dy, dres)
    names = ("y", "residual_out", "dx", "dr", "dw", "db")
    for k in range(1, 8):
        for which in ("x", "r", "dres", "all"):
            xk = misaligned(x, k) if which in ("x", "all") else x
            rk = misaligned(r, k) if which in ("r", "all") else r
            dk = misaligned(dres, k) if which in ("dres", "all") else dres
            got = add_grads(v, xk, rk, w, b, dy, dk)
            for name, g, e in zip(names, got, base, strict=True):
                if e is not None:
                    assert_bitwise(g, e, f"{name} offset {k} ({which})")
        res = misaligned(r, k)
        out = misaligned(torch.zeros_like(x), (k + 3) % 8)
        run_add_inplace(v, misaligned(x, (k + 5) % 8), res, w, b, out=out)
        assert_bitwise(res, base[1], f"in-place residual offset {k}")
        assert_bitwise(out, base[0], f"in-place out offset {k}")


@pytest.mark.parametrize("n", [40, 768, 4096, 20000, 70000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[3], DTYPES[5]], ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_fused_add_strided_rows(kind: str, dt: Dt, n: int) -> None:
    """Rows of wider tensors (row strides read in place) for input, residual, the in-place
    residual and grad_residual, each with its own stride, equal the contiguous run bitwise; the
    in-place form writes nothing outside its view; an expanded (stride 0) residual."""
    v = Variant(kind, True, kind == "ln")
    m = 9
    w, b = make_params(n, v, dt, seed=n)
    x0 = make_x(m, n, dt.x, seed=n)
    r0 = make_residual(m, n, dt.x, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 2)
    dres0 = make_x(m, n, dt.x, seed=n + 3)
    base = add_grads(v, x0, r0, w, b, dy, dres0)
    for pad_x, pad_r in ((1, 8), (8, 13), (13, 1)):
        x_wide = torch.zeros(m, n + pad_x, dtype=dt.x, device=DEVICE)
        r_wide = torch.zeros(m, n + pad_r, dtype=dt.x, device=DEVICE)
        x_wide[:, :n] = x0
        r_wide[:, :n] = r0
        x, r = x_wide[:, :n], r_wide[:, :n]
        assert x.stride(0) == n + pad_x and r.stride(0) == n + pad_r
        y, s = run_add(v, x, r, w, b)
        assert_bitwise(y, base[0], f"y pads {pad_x}/{pad_r}")
        assert_bitwise(s, base[1], f"residual_out pads {pad_x}/{pad_r}")
        # grad_residual with its own row stride, straight into the _bwd op
        g_wide = torch.zeros(m, n + pad_r, dtype=dt.x, device=DEVICE)
        g_wide[:, :n] = dres0
        _, _, mean, rstd = run_add_fwd(v, x0, r0, w, b)
        dx = run_bwd(v, dy, base[1], (mean, rstd), w, b, g_wide[:, :n], (True, False, False))[0]
        assert_bitwise(dx, base[2], f"dx with strided grad_residual pad {pad_r}")
        # in place into the strided view: only the view changes
        y2, _ = run_add_inplace(v, x, r, w, b)
        assert_bitwise(r, base[1], f"in-place strided residual pads {pad_x}/{pad_r}")
        assert_bitwise(y2, base[0], f"in-place y pads {pad_x}/{pad_r}")
        assert (r_wide[:, n:] == 0).all(), "the in-place form wrote outside the residual's view"
    # expanded residual (every row the same): stride 0, read in place
    row = make_residual(1, n, dt.x, seed=n + 1)
    y, s = run_add(v, x0, row.expand(m, n), w, b)
    assert_bitwise(s, x0 + row, "residual_out with an expanded residual")
    assert_bitwise(y, run_ours(v, x0 + row, w, b), "y with an expanded residual")


@pytest.mark.parametrize("n", [64, 4096, 20000])
@pytest.mark.parametrize("dt", [DTYPES[0], DTYPES[3]], ids=str)
def test_fused_add_nan_rows_are_isolated(dt: Dt, n: int) -> None:
    """A NaN / Inf in the residual poisons only its row (of y, residual_out and dx)."""
    m = 64
    v = Variant("ln", True, True)
    x = make_x(m, n, dt.x, seed=n)
    r = make_residual(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 3)
    dres = make_x(m, n, dt.x, seed=n + 4)
    dirty = r.clone()
    bad = [1, 17, 40]
    for i, row in enumerate(bad):
        dirty[row, (5 * row) % n] = float("nan") if i % 2 == 0 else float("inf")
    clean = add_grads(v, x, r, w, b, dy, dres)
    got = add_grads(v, x, dirty, w, b, dy, dres)
    good = [i for i in range(m) if i not in bad]
    assert torch.isnan(got[0][bad]).all() and torch.isnan(got[2][bad]).all()
    for name, c, g in zip(("y", "residual_out", "dx"), clean[:3], got[:3], strict=True):
        assert_bitwise(g[good], c[good], f"{name} of clean rows")


@pytest.mark.parametrize("n", [64, 3000, 20000])
def test_fused_add_batch_invariance(n: int) -> None:
    """A row's fused results do not depend on the other rows (fixed tiers and mappings)."""
    dt = DTYPES[3]
    v = Variant("ln", True, True)
    m = 200 if n <= 3000 else 24
    x = make_x(m, n, dt.x, seed=n)
    r = make_residual(m, n, dt.x, seed=n)
    w, b = make_params(n, v, dt, seed=n)
    dy = make_x(m, n, dt.x, seed=n + 1)
    dres = make_x(m, n, dt.x, seed=n + 2)
    full = add_grads(v, x, r, w, b, dy, dres)
    for lo, hi in ((0, 1), (m - 1, m), (5, 19)):
        part = add_grads(v, x[lo:hi], r[lo:hi], w, b, dy[lo:hi], dres[lo:hi])
        for name, a, c in zip(("y", "s", "dx", "dr"), part[:4], full[:4], strict=True):
            assert_bitwise(a, c[lo:hi], f"{name} rows {lo}:{hi}")


@cuda_only
def test_fused_add_no_host_synchronisation() -> None:
    """The fused forms (each tier, fwd, bwd with grad_residual, in place) sync nothing."""
    cases = []
    for n in (64, 3000, 20000, 140000):
        dt = Dt(torch.bfloat16, torch.float32)
        v = Variant("ln", True, True)
        w, b = make_params(n, v, dt, seed=n)
        x = make_x(16, n, dt.x, seed=n)
        cases.append((v, x, make_residual(16, n, dt.x, seed=n), w, b))
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for v, x, r, w, b in cases:
            n = x.shape[-1]
            y, s, mean, rstd = run_add_fwd(v, x, r, w, b)
            run_bwd(v, y, s, (mean, rstd), w, b, x)
            layernorm_ext.add_rms_norm(x, r, (n,), w)
            run_add_inplace(v, x, r.clone(), w, b, out=torch.empty_like(x))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def _graph_block(d: int):
    """The pre-norm block of test_transformer_block (layer_norm, add_rms_norm, add_layer_norm,
    RMSNorm, rms_norm) on DEVICE, deterministic parameters."""
    from test_transformer_block import Block

    torch.manual_seed(d)
    return Block(d).to(DEVICE)


def _block_step(block, x, grad):
    """Forward and backward of the block: output and the gradients of x and every parameter."""
    out = block(x)
    params = [x, *block.parameters()]
    return [out, *torch.autograd.grad(out, params, grad)]


@cuda_only
@pytest.mark.parametrize("d", [32, 1000, 4100])
def test_fused_add_cuda_graph_transformer_block(d: int) -> None:
    """A pre-norm transformer block (every norm op, the fused ones included) captured forward and
    backward in a CUDA graph replays bitwise equal to eager runs on new inputs; so does an
    inference step through the in-place fused forms. Eager runs on the capture stream (same
    cuBLAS workspace, so the linear layers match too)."""
    block = _graph_block(d)
    m = 24
    static_x = make_x(m, d, torch.float32, seed=d).view(2, m // 2, d).requires_grad_()
    static_g = make_x(m, d, torch.float32, seed=d + 1).view(2, m // 2, d)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: kernel loading, occupancy caches, allocator, cuBLAS
            _block_step(block, static_x, static_g)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = _block_step(block, static_x, static_g)

    # Inference step with the in-place fused forms: residual <- h + residual, out <- norm.
    w = torch.randn(d, device=DEVICE)
    b = torch.randn(d, device=DEVICE)
    static_h = make_x(m, d, torch.float32, seed=d + 2)
    static_res = make_residual(m, d, torch.float32, seed=d)
    res_start = static_res.clone()
    out_ln = torch.empty_like(static_h)

    def infer(h, res, out):
        layernorm_ext.add_layer_norm(h, res, d, w, b, inplace=True, out=out)
        layernorm_ext.add_rms_norm(out, res, d, w, 1e-6, inplace=True, out=h)
        return [out.clone(), h.clone(), res.clone()]

    stream.wait_stream(torch.cuda.current_stream())  # the tensors above were made there
    with torch.cuda.stream(stream):
        for _ in range(2):
            infer(static_h.clone(), static_res.clone(), torch.empty_like(static_h))
    stream.synchronize()
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2, stream=stream):
        captured2 = infer(static_h, static_res, out_ln)

    # Replays and eager runs all go on the capture stream, one after another: the replays use the
    # cuBLAS workspace of that stream, so an eager run on it concurrent with a replay elsewhere
    # would share the workspace mid-flight. (An H100 run of the unordered version ended in an
    # illegal memory access; alone under CUDA_LAUNCH_BLOCKING=1 it passed.)
    stream.wait_stream(torch.cuda.current_stream())
    for i in range(3):
        with torch.cuda.stream(stream):
            x = make_x(m, d, torch.float32, seed=100 + i).view_as(static_x)
            g = make_x(m, d, torch.float32, seed=200 + i).view_as(static_g)
            h = make_x(m, d, torch.float32, seed=300 + i)
            with torch.no_grad():
                static_x.copy_(x)
                static_g.copy_(g)
                static_h.copy_(h)
                static_res.copy_(res_start)
            for _ in range(20 if i == 0 else 1):
                graph.replay()
            graph2.replay()
            eager = _block_step(block, x.clone().requires_grad_(), g)
            eager2 = infer(h.clone(), res_start.clone(), torch.empty_like(h))
        stream.synchronize()
        for j, (c, e) in enumerate(zip(captured, eager, strict=True)):
            assert_bitwise(c, e, f"block graph output {j} replay {i}")
        for j, (c, e) in enumerate(zip(captured2, eager2, strict=True)):
            assert_bitwise(c, e, f"in-place graph output {j} replay {i}")
