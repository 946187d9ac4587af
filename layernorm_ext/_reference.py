"""Float64 reference implementations: the oracle every test compares against.

Pure PyTorch, no kernels of this package. Every function upcasts its inputs with ``.double()``
first, so the reference sees exactly the values a low-precision kernel was given (never a
higher-precision original the kernel never saw), and computes in float64:

* LayerNorm, two-pass (design/reliability.md §1): ``mean = Σx/N``, ``var = Σ(x − mean)²/N``
  (population variance), ``y = (x − mean) / sqrt(var + eps) · γ + β``. The second pass over
  ``x − mean`` avoids the ``E[x²] − E[x]²`` cancellation, so the reference stays accurate on the
  shifted, ill-conditioned rows the tests feed it.
* RMSNorm: ``y = x / sqrt(Σx²/N + eps) · γ``, with ``eps=None`` resolved as torch does (the
  machine epsilon of the computation type: fp32 for fp16 / bf16 / fp32 input, fp64 for fp64).
* ``zero_centered_weight=True`` scales by ``1 + γ`` instead of ``γ``.
* Gradients: the closed forms, in float64 (the tests check them against float64 autograd
  through the forward formulas).

:func:`exact_row_moments` computes the mean and population variance of short rows exactly with
:class:`fractions.Fraction`, to validate the float64 reference itself on adversarial rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch

__all__ = [
    "affine_ref",
    "exact_row_moments",
    "layer_norm_backward_ref",
    "layer_norm_ref",
    "rms_norm_backward_ref",
    "rms_norm_eps",
    "rms_norm_ref",
]

ShapeLike = int | Sequence[int] | torch.Size


def _shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _dims(x: torch.Tensor, normalized_shape: tuple[int, ...]) -> tuple[int, ...]:
    nd = len(normalized_shape)
    if nd == 0 or tuple(x.shape[x.dim() - nd :]) != normalized_shape:
        raise ValueError(f"reference: input {tuple(x.shape)} does not end in {normalized_shape}")
    return tuple(range(x.dim() - nd, x.dim()))


def _scale(weight: torch.Tensor, zero_centered_weight: bool) -> torch.Tensor:
    w = weight.double()
    return 1.0 + w if zero_centered_weight else w


def affine_ref(
    normalized: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    zero_centered_weight: bool = False,
) -> torch.Tensor:
    """``normalized · γ + β`` in float64 (``1 + γ`` with zero_centered_weight); either optional.

    The last step of both references, exposed so that a test can normalise once and check
    several (γ, β) combinations against the same float64 rows.
    """
    out = normalized.double()
    if weight is not None:
        out = out * _scale(weight, zero_centered_weight)
    if bias is not None:
        out = out + bias.double()
    return out


def rms_norm_eps(dtype: torch.dtype, eps: float | None) -> float:
    """The eps RMSNorm uses: ``eps`` itself, or for ``None`` the computation type's epsilon.

    torch 2.14 computes fp16 / bf16 RMSNorm in fp32 and resolves ``eps=None`` to
    ``finfo(float32).eps`` for them (measured), ``finfo(float64).eps`` for fp64 input.
    """
    if eps is not None:
        return float(eps)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return float(torch.finfo(compute).eps)


def layer_norm_ref(
    x: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    zero_centered_weight: bool = False,
) -> torch.Tensor:
    """Float64 two-pass LayerNorm of the exact (upcast) input values. Returns float64."""
    shape = _shape(normalized_shape)
    dims = _dims(x, shape)
    xd = x.double()
    if xd.numel() == 0:
        out = xd.clone()
    else:
        mean = xd.mean(dim=dims, keepdim=True)
        centered = xd - mean
        var = (centered * centered).mean(dim=dims, keepdim=True)
        out = centered / torch.sqrt(var + eps)
    return affine_ref(out, weight, bias, zero_centered_weight=zero_centered_weight)


def rms_norm_ref(
    x: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    zero_centered_weight: bool = False,
) -> torch.Tensor:
    """Float64 RMSNorm of the exact (upcast) input values. Returns float64."""
    shape = _shape(normalized_shape)
    dims = _dims(x, shape)
    xd = x.double()
    e = rms_norm_eps(x.dtype, eps)
    if xd.numel() == 0:
        out = xd.clone()
    else:
        out = xd / torch.sqrt((xd * xd).mean(dim=dims, keepdim=True) + e)
    return affine_ref(out, weight, zero_centered_weight=zero_centered_weight)


def _lead_dims(x: torch.Tensor, normalized_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(x.dim() - len(normalized_shape)))


def _param_grad(t: torch.Tensor, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Σ over the leading (row) dims; zeros of ``shape`` when there are no rows."""
    lead = _lead_dims(x, shape)
    return t.sum(dim=lead) if lead else t.clone()


def layer_norm_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    zero_centered_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Float64 (dx, dweight, dbias) of :func:`layer_norm_ref`; None for an absent parameter.

    Closed form (checked against float64 autograd of the forward reference in the tests):
    with x̂ = (x − mean)·rstd and g = dy·γ (γ = 1 without weight; 1 + γ zero-centred),
    dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), dγ = Σ_rows dy·x̂, dβ = Σ_rows dy.
    """
    shape = _shape(normalized_shape)
    dims = _dims(x, shape)
    xd = x.detach().double()
    dy = grad_out.detach().double()
    if xd.numel() == 0:
        xhat = xd.clone()
        dx = xd.clone()
    else:
        mean = xd.mean(dim=dims, keepdim=True)
        centered = xd - mean
        rstd = 1.0 / torch.sqrt((centered * centered).mean(dim=dims, keepdim=True) + eps)
        xhat = centered * rstd
        g = dy if weight is None else dy * _scale(weight.detach(), zero_centered_weight)
        dx = rstd * (
            g - g.mean(dim=dims, keepdim=True) - xhat * (g * xhat).mean(dim=dims, keepdim=True)
        )
    dw = None if weight is None else _param_grad(dy * xhat, xd, shape)
    db = None if bias is None else _param_grad(dy, xd, shape)
    return dx, dw, db


def rms_norm_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    zero_centered_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 (dx, dweight) of :func:`rms_norm_ref`; None for an absent weight.

    Closed form: with x̂ = x·rstd and g = dy·γ, dx = rstd·(g − x̂·mean(g·x̂)), dγ = Σ_rows dy·x̂.
    ``eps=None`` is resolved from ``x``'s original dtype (before the float64 upcast).
    """
    shape = _shape(normalized_shape)
    dims = _dims(x, shape)
    e = rms_norm_eps(x.dtype, eps)
    xd = x.detach().double()
    dy = grad_out.detach().double()
    if xd.numel() == 0:
        xhat = xd.clone()
        dx = xd.clone()
    else:
        rstd = 1.0 / torch.sqrt((xd * xd).mean(dim=dims, keepdim=True) + e)
        xhat = xd * rstd
        g = dy if weight is None else dy * _scale(weight.detach(), zero_centered_weight)
        dx = rstd * (g - xhat * (g * xhat).mean(dim=dims, keepdim=True))
    dw = None if weight is None else _param_grad(dy * xhat, xd, shape)
    return dx, dw


def exact_row_moments(row: Sequence[float] | torch.Tensor) -> tuple[Fraction, Fraction]:
    """Exact mean and population variance of one row, in rational arithmetic.

    Every finite float is a dyadic rational, so ``Fraction(float(v))`` is exact and so are the
    moments; use it on short adversarial rows (N <= 64) to check the float64 reference.
    """
    values = [Fraction(float(v)) for v in (row.tolist() if torch.is_tensor(row) else row)]
    n = len(values)
    if n == 0:
        raise ValueError("exact_row_moments: empty row")
    mean = sum(values, Fraction(0)) / n
    var = sum(((v - mean) ** 2 for v in values), Fraction(0)) / n
    return mean, var
