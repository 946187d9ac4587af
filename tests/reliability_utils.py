"""Helpers of the reliability suite (test_adversarial, test_properties, test_robustness, test_fuzz,
test_huge): conditioning, the κ-scaled tolerance of design/reliability.md §1, accurate float64
references for ill-conditioned rows, closed-form backward references for large tensors, and a
uniform interface over the two ops (LayerNorm, RMSNorm) so that one test body checks both.

The tolerance table, the comparison asserts and the bitwise helpers live in norm_testing (shared
with the core suite); this module only adds what the adversarial families need on top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from norm_testing import LOW_PRECISION, fwd_tol

import layernorm_ext
from layernorm_ext._reference import (
    layer_norm_backward_ref,
    layer_norm_ref,
    rms_norm_backward_ref,
    rms_norm_eps,
    rms_norm_ref,
)

ShapeLike = int | Sequence[int]

# Unit roundoff of the accumulation type (fp64 for fp64 input, fp32 otherwise) and of storage.
U_ACC = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-24,
    torch.bfloat16: 2.0**-24,
}
U_OUT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
# c_dtype of the κ-scaled tolerance atol_eff = atol + c·u_acc·κ_r·max|ref_r| (reliability.md §1).
# Calibrated once on the F3 sweep (the worst observed dx error was ~0.15·u_acc·κ, the forward is
# flat in κ because the kernels shift each row by its first element) and frozen here: a kernel
# whose error grows like E[x²] − E[x]² (∝ u·κ²) exceeds it by orders of magnitude at κ ≥ 1e3.
KAPPA_C = 4.0


def _shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def as_rows(t: torch.Tensor, normalized_shape: ShapeLike) -> torch.Tensor:
    """``t`` viewed (or copied) as [M, N] with N = prod(normalized_shape)."""
    n = math.prod(_shape(normalized_shape))
    return t.reshape(-1, n)


# --- conditioning ---------------------------------------------------------------------------------


def row_kappa(x: torch.Tensor, normalized_shape: ShapeLike) -> torch.Tensor:
    """κ_r = (|mean_r| + std_r) / std_r of each row's exact values, in float64 ([M]).

    Constant rows (std 0) get κ = 1: they are held to the exact-β property, not to a tolerance
    that grows without bound.
    """
    rows = as_rows(x.detach().double(), normalized_shape)
    mean = rows.mean(dim=1)
    std = (rows - mean[:, None]).pow(2).mean(dim=1).sqrt()
    kappa = (mean.abs() + std) / std
    return torch.where(std > 0, kappa, torch.ones_like(kappa))


# --- accurate references ----------------------------------------------------------------------


def accurate_layer_norm_parts(
    x: torch.Tensor, normalized_shape: ShapeLike, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xhat, mean, rstd) in float64 by the corrected two-pass algorithm, as [M, N] / [M].

    The plain float64 two-pass reference loses u64·κ to the rounding of its own mean, which on a
    κ = 1e9 row of float64 input is 1e-7: more than the fp64 tolerance. Subtracting the rounded
    mean is exact here (Sterbenz: x and the mean agree to within a factor of two on those rows),
    and the mean of the centred values, subtracted once more, removes the mean's rounding error.
    """
    rows = as_rows(x.detach().double(), normalized_shape)
    mean1 = rows.mean(dim=1, keepdim=True)
    centered = rows - mean1
    correction = centered.mean(dim=1, keepdim=True)
    centered = centered - correction
    var = (centered * centered).mean(dim=1, keepdim=True)
    rstd = 1.0 / torch.sqrt(var + eps)
    return centered * rstd, (mean1 + correction).squeeze(1), rstd.squeeze(1)


def _affine(out: torch.Tensor, w, b, zcw: bool = False) -> torch.Tensor:
    if w is not None:
        wd = w.detach().double().reshape(-1)
        out = out * (1.0 + wd if zcw else wd)
    if b is not None:
        out = out + b.detach().double().reshape(-1)
    return out


def accurate_layer_norm_ref(x, normalized_shape, w=None, b=None, eps=1e-5) -> torch.Tensor:
    """Float64 LayerNorm by the corrected two-pass algorithm, in x's shape."""
    xhat, _, _ = accurate_layer_norm_parts(x, normalized_shape, eps)
    return _affine(xhat, w, b).reshape(x.shape)


def layer_norm_grads_closed_form(dy, x, normalized_shape, w=None, b=None, eps=1e-5):
    """Float64 (dx, dw, db) of LayerNorm from the closed form, on corrected two-pass statistics.

    dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·γ; dγ = Σ_rows dy·x̂; dβ = Σ_rows dy. One
    pass per quantity, so it also serves tensors far too large for the autograd reference.
    """
    shape = _shape(normalized_shape)
    xhat, _, rstd = accurate_layer_norm_parts(x, shape, eps)
    dyr = as_rows(dy.detach().double(), shape)
    g = dyr if w is None else dyr * w.detach().double().reshape(-1)
    mean_g = g.mean(dim=1, keepdim=True)
    mean_gx = (g * xhat).mean(dim=1, keepdim=True)
    dx = ((g - mean_g - xhat * mean_gx) * rstd[:, None]).reshape(x.shape)
    dw = None if w is None else (dyr * xhat).sum(dim=0).reshape(shape)
    db = None if b is None else dyr.sum(dim=0).reshape(shape)
    return dx, dw, db


def rms_norm_grads_closed_form(dy, x, normalized_shape, w=None, eps=None):
    """Float64 (dx, dw) of RMSNorm: dx = rstd·(g − x̂·mean(g·x̂)), dγ = Σ_rows dy·x̂."""
    shape = _shape(normalized_shape)
    e = rms_norm_eps(x.dtype, eps)
    rows = as_rows(x.detach().double(), shape)
    rstd = 1.0 / torch.sqrt(rows.pow(2).mean(dim=1, keepdim=True) + e)
    xhat = rows * rstd
    dyr = as_rows(dy.detach().double(), shape)
    g = dyr if w is None else dyr * w.detach().double().reshape(-1)
    mean_gx = (g * xhat).mean(dim=1, keepdim=True)
    dx = ((g - xhat * mean_gx) * rstd).reshape(x.shape)
    dw = None if w is None else (dyr * xhat).sum(dim=0).reshape(shape)
    return dx, dw


# --- the two ops behind one interface ---------------------------------------------------------


@dataclass(frozen=True)
class NormOp:
    """LayerNorm or RMSNorm: our op, its float64 references and autograd plumbing.

    ``bias`` arguments are ignored by RMSNorm (it has none), so a test can pass the same
    (weight, bias) pair to both.
    """

    name: str

    @property
    def is_ln(self) -> bool:
        return self.name == "layer_norm"

    @property
    def has_bias(self) -> bool:
        return self.is_ln

    def default_eps(self):
        return 1e-5 if self.is_ln else None

    def __call__(self, x, shape, w=None, b=None, eps="default", *, zcw=False, out=None):
        eps = self.default_eps() if eps == "default" else eps
        if self.is_ln:
            return layernorm_ext.layer_norm(x, shape, w, b, eps, zero_centered_weight=zcw, out=out)
        return layernorm_ext.rms_norm(x, shape, w, eps, zero_centered_weight=zcw, out=out)

    def eager(self, x, shape, w=None, b=None, eps="default"):
        """PyTorch's own kernel (the "match PyTorch's pattern" baseline)."""
        eps = self.default_eps() if eps == "default" else eps
        shape = _shape(shape)
        if self.is_ln:
            return torch.nn.functional.layer_norm(x, shape, w, b, eps)
        return torch.nn.functional.rms_norm(x, shape, w, eps)

    def ref(self, x, shape, w=None, b=None, eps="default"):
        """Float64 reference of the exact input values."""
        eps = self.default_eps() if eps == "default" else eps
        if self.is_ln:
            return layer_norm_ref(x, shape, w, b, eps)
        return rms_norm_ref(x, shape, w, eps)

    def ref_grads(self, dy, x, shape, w=None, b=None, eps="default"):
        """Float64 autograd (dx, dw, db) of the reference; db is None for RMSNorm."""
        eps = self.default_eps() if eps == "default" else eps
        if self.is_ln:
            return layer_norm_backward_ref(dy, x, shape, w, b, eps)
        dx, dw = rms_norm_backward_ref(dy, x, shape, w, eps)
        return dx, dw, None

    def closed_form_grads(self, dy, x, shape, w=None, b=None, eps="default"):
        """Float64 closed-form (dx, dw, db): for tensors too large for the autograd reference."""
        eps = self.default_eps() if eps == "default" else eps
        if self.is_ln:
            return layer_norm_grads_closed_form(dy, x, shape, w, b, eps)
        dx, dw = rms_norm_grads_closed_form(dy, x, shape, w, eps)
        return dx, dw, None

    def run(self, x, shape, w=None, b=None, dy=None, eps="default", *, zcw=False, eager=False):
        """(y, dx, dw, db) through autograd; grads of absent tensors (and db for RMS) are None.

        ``eager=True`` runs PyTorch's own kernel instead of ours (zcw unsupported there).
        """
        xs = x.detach().clone().requires_grad_(True)
        ws = None if w is None else w.detach().clone().requires_grad_(True)
        bs = None if (b is None or not self.has_bias) else b.detach().clone().requires_grad_(True)
        y = self.eager(xs, shape, ws, bs, eps) if eager else self(xs, shape, ws, bs, eps, zcw=zcw)
        if dy is None:
            return y.detach(), None, None, None
        leaves = [t for t in (xs, ws, bs) if t is not None]
        grads = iter(torch.autograd.grad(y, leaves, dy))
        out = [None if t is None else next(grads) for t in (xs, ws, bs)]
        return (y.detach(), *out)

    def stats(self, x, shape, w=None, b=None, eps="default"):
        """(out, mean or None, rstd) from the *_fwd op."""
        eps = self.default_eps() if eps == "default" else eps
        ops = torch.ops.layernorm_ext
        shape = list(_shape(shape))
        if self.is_ln:
            return ops.layer_norm_fwd(x, shape, w, b, eps)
        out, rstd = ops.rms_norm_fwd(x, shape, w, eps)
        return out, None, rstd

    def __repr__(self) -> str:
        return self.name


LN = NormOp("layer_norm")
RMS = NormOp("rms_norm")
OPS = [LN, RMS]
OP_IDS = ["ln", "rms"]


# --- comparisons ----------------------------------------------------------------------------------


def assert_close_kappa(
    actual: torch.Tensor,
    ref: torch.Tensor,
    kappa: torch.Tensor,
    x_dtype: torch.dtype,
    what: str,
    *,
    tol: tuple[float, float] | None = None,
    c: float = KAPPA_C,
) -> None:
    """|actual − ref| ≤ atol + c·u_acc·κ_r·max|ref_r| + rtol·|ref| per row r (reliability.md §1).

    ``actual`` and ``ref`` are [M, N]-viewable with ``kappa`` of shape [M]; NaN positions must
    match and infinities must agree exactly (delegated to norm_testing.assert_close_to_ref, which
    runs on the rescaled error so its messages stay meaningful).
    """
    atol, rtol = tol if tol is not None else fwd_tol(x_dtype)
    a = actual.detach().double().reshape(kappa.numel(), -1)
    r = ref.detach().double().reshape(kappa.numel(), -1)
    if a.numel() == 0:
        return
    assert_same_nonfinite_pattern(a, r, what)
    finite = torch.isfinite(r)
    r0 = torch.where(finite, r, torch.zeros_like(r))
    a0 = torch.where(finite, a, torch.zeros_like(a))
    slack = atol + c * U_ACC[x_dtype] * kappa.double() * r0.abs().amax(dim=1)  # [M]
    allowed = slack[:, None] + rtol * r0.abs()
    excess = (a0 - r0).abs() - allowed
    if bool((excess > 0).any()):
        i = int(torch.argmax(excess))
        row, col = divmod(i, a.shape[1])
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {a.numel()} elements exceed the κ-scaled "
            f"tolerance; worst at row {row}, col {col}: actual={a[row, col].item()!r}, "
            f"ref={r[row, col].item()!r}, |err|={abs(a[row, col] - r[row, col]).item():.3e}, "
            f"allowed={allowed[row, col].item():.3e} (κ={kappa[row].item():.3g})"
        )


def fit_loglog_slope(kappas: Sequence[float], errors: Sequence[float], floor: float) -> float:
    """Least-squares slope of log10(max(error, floor)) against log10(κ)."""
    xs = [math.log10(k) for k in kappas]
    ys = [math.log10(max(e, floor)) for e in errors]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((v - mx) ** 2 for v in xs)
    sxy = sum((v - mx) * (w - my) for v, w in zip(xs, ys, strict=True))
    return sxy / sxx


def nonfinite_pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 −Inf (int8), for comparing inf/NaN patterns."""
    t = t.detach()
    p = torch.zeros(t.shape, dtype=torch.int8)
    p[torch.isnan(t)] = 1
    p[t == math.inf] = 2
    p[t == -math.inf] = 3
    return p


def assert_same_nonfinite_pattern(actual, expected, what: str) -> None:
    pa, pe = nonfinite_pattern(actual), nonfinite_pattern(expected)
    if not torch.equal(pa, pe):
        names = {0: "finite", 1: "NaN", 2: "+Inf", 3: "-Inf"}
        diff = (pa != pe).flatten().nonzero().flatten()
        i = int(diff[0])
        raise AssertionError(
            f"{what}: inf/NaN pattern differs from the expected one at {diff.numel()} of "
            f"{pa.numel()} positions; first at flat index {i}: got {names[int(pa.flatten()[i])]} "
            f"({actual.flatten()[i].item()!r}), expected {names[int(pe.flatten()[i])]} "
            f"({expected.flatten()[i].item()!r})"
        )


def assert_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} non-finite values; first at flat index {i}: "
            f"{t.flatten()[i].item()!r}"
        )


def misaligned_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``t`` starting ``offset`` elements into a fresh buffer."""
    buf = torch.empty(offset + t.numel(), dtype=t.dtype)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    assert view.storage_offset() == offset
    return view


def low_precision(dtype: torch.dtype) -> bool:
    return dtype in LOW_PRECISION


def standardized_rows(M: int, N: int, generator: torch.Generator) -> torch.Tensor:
    """float64 rows of exact sample mean 0 and population std 1 (N ≥ 2)."""
    z = torch.randn(M, N, dtype=torch.float64, generator=generator)
    z = z - z.mean(dim=1, keepdim=True)
    return z / z.pow(2).mean(dim=1, keepdim=True).sqrt()
