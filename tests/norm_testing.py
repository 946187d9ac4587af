"""Shared test helpers: dtype cases, input generators, tolerances and comparison asserts.

Tolerances implement design/reliability.md §2 (absolute / relative, against the float64
reference of layernorm_ext._reference computed from the exact low-precision inputs), plus the
low-precision rule of §1: for fp16 / bf16 results, the error against the fp64 reference must also
be at most twice the error of PyTorch's own kernel run in the same dtype, plus a tiny atol.

Import it from test modules (``from norm_testing import ...``); conftest.py exposes the commonly
used pieces as fixtures too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

import layernorm_ext

LOW_PRECISION = (torch.float16, torch.bfloat16)

# --- dtype cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DtypeCase:
    """The input dtype and the parameters' dtype of one supported combination."""

    x: torch.dtype
    param: torch.dtype

    @property
    def id(self) -> str:
        name = _SHORT[self.x]
        return name if self.param == self.x else f"{name}-{_SHORT[self.param]}w"

    @property
    def mixed(self) -> bool:
        return self.param != self.x


_SHORT = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}

DTYPE_CASES = [
    DtypeCase(torch.float32, torch.float32),
    DtypeCase(torch.float64, torch.float64),
    DtypeCase(torch.float16, torch.float16),
    DtypeCase(torch.bfloat16, torch.bfloat16),
    DtypeCase(torch.float16, torch.float32),
    DtypeCase(torch.bfloat16, torch.float32),
]
DTYPE_IDS = [c.id for c in DTYPE_CASES]

# (has_weight, has_bias)
AFFINE = [(False, False), (True, False), (False, True), (True, True)]
AFFINE_IDS = ["none", "w", "b", "wb"]


def affine_name(has_w: bool, has_b: bool) -> str:
    return AFFINE_IDS[AFFINE.index((has_w, has_b))]


# --- tolerances (reliability.md §2) -------------------------------------------------------------

_FWD_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}
_DX_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (3e-3, 1.6e-2),
}
# The extra absolute slack of the "≤ 2× torch's same-dtype error" rule: a few fp32 roundings of
# an O(1) value, far below one fp16 / bf16 ulp. It only matters when torch's error is ~0 (tiny
# tensors whose outputs happen to be exactly representable).
_TINY_ATOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5}


def fwd_tol(x_dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of a forward output; mixed-dtype calls use the input's dtype."""
    return _FWD_TOL[x_dtype]


def dx_tol(x_dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of grad_input."""
    return _DX_TOL[x_dtype]


def param_grad_tol(param_dtype: torch.dtype, rows: int) -> tuple[float, float]:
    """(atol, rtol) of grad_weight / grad_bias, summed over ``rows`` rows.

    Mixed-dtype calls return these gradients in the parameters' dtype (fp32), so they are held
    to that dtype's tolerance.
    """
    if param_dtype == torch.float64:
        return 1e-10 * math.sqrt(rows / 1024) + 1e-10, 1e-10
    if param_dtype == torch.float32:
        return (1e-4, 1e-5) if rows <= 65536 else (1e-3, 1e-3)
    if param_dtype == torch.float16:
        return 5e-3, 1e-2
    if param_dtype == torch.bfloat16:
        return 1e-2, 1.6e-2
    raise ValueError(param_dtype)


def tiny_atol(dtype: torch.dtype) -> float:
    return _TINY_ATOL.get(dtype, 0.0)


# --- comparisons --------------------------------------------------------------------------------


def _describe_index(shape: Sequence[int], flat: int) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def assert_close_to_ref(
    actual: torch.Tensor,
    ref: torch.Tensor,
    atol: float,
    rtol: float,
    what: str,
) -> None:
    """|actual − ref| ≤ atol + rtol·|ref| elementwise, in float64, with matching NaN positions.

    A NaN is never accepted where the reference is finite, and an infinity must match exactly.
    """
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a = actual.detach().double()
    r = ref.detach().double()
    if a.numel() == 0:
        return
    # Fast path for the common case: a few full-tensor passes and reductions (NaN propagates
    # through max, so any NaN or Inf falls through to the slow path, which also explains).
    r_abs = r.abs()
    if math.isfinite(float(r_abs.max())):
        excess = (a - r).abs_().sub_(r_abs.mul_(rtol).add_(atol))
        if float(excess.max()) <= 0:
            return
    del r_abs
    a_nan, r_nan = torch.isnan(a), torch.isnan(r)
    if not torch.equal(a_nan, r_nan):
        first = int((a_nan != r_nan).flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: NaN positions differ ({int((a_nan != r_nan).sum())} elements); first at "
            f"{_describe_index(a.shape, first)}: actual={a.flatten()[first].item()!r}, "
            f"ref={r.flatten()[first].item()!r}"
        )
    finite = ~r_nan
    a_f, r_f = a[finite], r[finite]
    inf = torch.isinf(r_f)
    if inf.any():
        assert torch.equal(a_f[inf], r_f[inf]), f"{what}: infinities differ from the reference"
    a_f, r_f = a_f[~inf], r_f[~inf]
    err = (a_f - r_f).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    allowed = atol + rtol * r_f.abs()
    bad = err > allowed
    if bad.any():
        worst = int(torch.argmax(err - allowed))
        # Map back to a position in the full tensor for the message.
        positions = (finite.flatten().nonzero().flatten())[(~inf).nonzero().flatten()]
        pos = _describe_index(a.shape, int(positions[worst]))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements exceed atol={atol:g} + "
            f"rtol={rtol:g}·|ref|; worst at {pos}: actual={a_f[worst].item()!r}, "
            f"ref={r_f[worst].item()!r}, |err|={err[worst].item():.3e}, max|err|="
            f"{err.max().item():.3e}"
        )


def max_abs_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max |actual − ref| over positions where the reference is finite (0 when none).

    A NaN in ``actual`` where the reference is finite counts as an infinite error.
    """
    a = actual.detach().double()
    r = ref.detach().double()
    if a.numel() == 0:
        return 0.0
    if not math.isfinite(float(r.abs().max())):
        finite = torch.isfinite(r)
        a, r = a[finite], r[finite]
        if a.numel() == 0:
            return 0.0
    err = float((a - r).abs_().max())
    return math.inf if math.isnan(err) else err


def assert_no_worse_than_torch(
    actual: torch.Tensor,
    ref: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    what: str,
) -> None:
    """The low-precision rule: max|actual − ref| ≤ 2·max|torch − ref| + tiny atol.

    ``torch_same_dtype`` is PyTorch's own result for the same low-precision inputs (same dtypes),
    ``ref`` the float64 reference. Only applied to fp16 / bf16 tensors.
    """
    if actual.dtype not in LOW_PRECISION or actual.numel() == 0:
        return
    ours = max_abs_err(actual, ref)
    theirs = max_abs_err(torch_same_dtype, ref)
    bound = 2.0 * theirs + tiny_atol(actual.dtype)
    assert ours <= bound, (
        f"{what}: max error {ours:.3e} vs the fp64 reference exceeds 2x PyTorch's own "
        f"{actual.dtype} error ({theirs:.3e}) + {tiny_atol(actual.dtype):g}"
    )


def check_result(
    actual: torch.Tensor,
    ref: torch.Tensor,
    tol: tuple[float, float],
    what: str,
    torch_same_dtype: torch.Tensor | None = None,
    expected_dtype: torch.dtype | None = None,
) -> None:
    """Tolerance-table check, then (for fp16 / bf16 with a torch result) the 2× rule."""
    if expected_dtype is not None:
        assert actual.dtype == expected_dtype, f"{what}: dtype {actual.dtype} != {expected_dtype}"
    two_x = torch_same_dtype is not None and actual.dtype in LOW_PRECISION and actual.numel() > 0
    if actual.shape == ref.shape and actual.numel() > 0:
        # Fast path: both checks from one |actual − ref| pass when everything is finite (the
        # common case); anything else goes through the explaining slow paths below.
        r = ref.detach().double()
        r_abs = r.abs()
        if math.isfinite(float(r_abs.max())):
            err = (actual.detach().double() - r).abs_()
            ours = float(err.max())
            if math.isfinite(ours) and float(err.sub_(r_abs.mul_(tol[1]).add_(tol[0])).max()) <= 0:
                if not two_x:
                    return
                theirs = float((torch_same_dtype.detach().double() - r).abs_().max())
                if math.isfinite(theirs) and ours <= 2.0 * theirs + tiny_atol(actual.dtype):
                    return
    assert_close_to_ref(actual, ref, tol[0], tol[1], what)
    if two_x:
        assert_no_worse_than_torch(actual, ref, torch_same_dtype, what)


def _int_view(t: torch.Tensor) -> torch.Tensor:
    int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.detach().contiguous().view(int_type)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN payloads and the sign of zero included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_int_view(a), _int_view(b))


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if not bitwise_equal(a, b):
        diff = (_int_view(a) != _int_view(b)).flatten().nonzero().flatten()
        first = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.numel()} of {a.numel()} elements differ bitwise; first at "
            f"{_describe_index(a.shape, first)}: {a.flatten()[first].item()!r} vs "
            f"{b.flatten()[first].item()!r}"
        )


def ulp_distance(actual: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place between ``actual`` and ``ref`` rounded to its dtype.

    Uses the monotone integer encoding of IEEE floats (so +0 and −0 are 0 apart).
    """
    rounded = ref.double().to(actual.dtype)
    ints = []
    for t in (actual, rounded):
        i = _int_view(t).long()
        sign_bit = 1 << (8 * t.element_size() - 1)
        # Negative floats: map to -(magnitude) so that the encoding is monotone.
        mag = i & (sign_bit - 1)
        ints.append(torch.where(i < 0, -mag, mag))
    return (ints[0] - ints[1]).abs()


# --- inputs ---------------------------------------------------------------------------------------


def make_input(
    shape: Sequence[int],
    dtype: torch.dtype,
    normalized_ndim: int = 1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rows with their own mean in [−2, 2] and std in [0.5, 2] (κ ≤ 5), rounded to ``dtype``.

    Each row of a standard normal sample is first standardised to sample mean 0 and sample std 1:
    a short random row can otherwise be arbitrarily ill-conditioned (three normals that happen
    to nearly agree), and conditioning is the adversarial tests' subject, not the grid's.
    Generated in float32 so that every dtype sees the same distribution; the reference then
    works from the rounded values.
    """
    shape = tuple(shape)
    nd = normalized_ndim
    lead = shape[: len(shape) - nd]
    stat_shape = lead + (1,) * nd
    dims = tuple(range(len(shape) - nd, len(shape)))
    z = torch.randn(shape, generator=generator)
    if z.numel() > 0 and math.prod(shape[len(shape) - nd :]) > 1:
        z = z - z.mean(dim=dims, keepdim=True)
        z = z / z.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-3)
    mu = torch.rand(stat_shape, generator=generator) * 4 - 2
    sigma = torch.rand(stat_shape, generator=generator) * 1.5 + 0.5
    return (z * sigma + mu).to(dtype)


def make_params(
    normalized_shape: Sequence[int],
    dtype: torch.dtype,
    has_w: bool,
    has_b: bool,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random weight around 1 and bias around 0 (or None)."""
    shape = tuple(normalized_shape)
    w = (1 + 0.5 * torch.randn(shape, generator=generator)).to(dtype) if has_w else None
    b = (0.5 * torch.randn(shape, generator=generator)).to(dtype) if has_b else None
    return w, b


# --- ISA selection ------------------------------------------------------------------------------

ISAS = layernorm_ext.available_cpu_capabilities()


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Runs the body with the CPU kernel set ``name``; restores "auto" afterwards."""
    layernorm_ext.set_cpu_capability(name)
    try:
        assert layernorm_ext.cpu_capability() == name
        yield name
    finally:
        layernorm_ext.set_cpu_capability("auto")


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[int]:
    """Runs the body with ``torch.set_num_threads(n)``; restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
