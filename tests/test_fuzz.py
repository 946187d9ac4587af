"""Fuzzing of the argument surface (design/reliability.md F24, §4): random shapes, dtypes
(including integer, bool, complex and fp8), layouts, None combinations, normalized_shape
mismatches, eps values, out= tensors (including ones that overlap an input), devices where
available, through every entry point: the functional ops, out=, autograd, and the *_fwd / *_bwd
ops. Every call must either match the float64 reference or raise a clean RuntimeError,
TypeError or ValueError (never an internal assert, never a silent result for invalid input).

The fuzz loop runs in a subprocess, so a crash (segfault, abort) fails this test with the case
that caused it instead of taking the test run down. Each case is generated from its own seed:
``python -c "import sys; sys.path.insert(0, 'tests'); import test_fuzz;
test_fuzz.run_fuzz(SEED, only=INDEX, verbose=True)"`` replays one.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

import pytest
import torch

import layernorm_ext

FUZZ_SEED = 20250611
FUZZ_CASES = 600
CLEAN_ERRORS = (RuntimeError, TypeError, ValueError)

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NON_FLOATS = [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64]
if hasattr(torch, "float8_e4m3fn"):
    NON_FLOATS.append(torch.float8_e4m3fn)
SIZES = [0, 1, 2, 3, 5, 8, 17, 33, 64]
EPS_VALUES = [1e-5, 0.0, 1e-12, 1e-6, 0.5, -0.5, math.nan, math.inf, 1e30]
ENTRY_POINTS = ["functional", "out", "autograd", "fwd_op", "bwd_op"]
ENTRY_POINTS += ["add", "add_autograd", "add_inplace"]  # the fused residual-add ops


@dataclass
class Case:
    """One fuzz case, and whether the contract says it is valid (with the reason if not)."""

    index: int
    op: str  # "layer_norm" | "rms_norm"
    entry: str
    x: torch.Tensor
    normalized_shape: object
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: object
    zcw: bool
    out: torch.Tensor | None = None
    out_kind: str = "none"
    residual: torch.Tensor | None = None
    grad_out: torch.Tensor | None = None
    mask: list[bool] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    # Output may alias an input: a raise and an exact result (as if computed out of place)
    # are both acceptable.
    aliasing: bool = False

    def expectation(self) -> str:
        if self.invalid:
            return "invalid: " + "; ".join(self.invalid)
        return "raise, or the unaliased result" if self.aliasing else "valid"

    def describe(self) -> str:
        def t(v):
            if not isinstance(v, torch.Tensor):
                return repr(v)
            return (
                f"Tensor{tuple(v.shape)}:{str(v.dtype)[6:]}:stride{v.stride()}:"
                f"off{v.storage_offset()}:{v.device.type}"
            )

        return (
            f"#{self.index} {self.op}/{self.entry} x={t(self.x)} shape={self.normalized_shape!r} "
            f"w={t(self.weight)} b={t(self.bias)} eps={self.eps!r} zcw={self.zcw} "
            f"out={self.out_kind}:{t(self.out)} residual={t(self.residual)} "
            f"dy={t(self.grad_out)} mask={self.mask} "
            f"expected={self.expectation()}"
        )


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _make(shape, dtype, rng: random.Random, layout: str = "contiguous") -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` in the given layout, values from ``rng``."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    shape = tuple(shape)

    def fill(s):
        base = torch.randn(s, generator=gen, dtype=torch.float64) * 2 + 0.5
        if dtype == torch.bool:
            return base > 0.5
        if dtype.is_complex:
            return torch.complex(base, base).to(dtype)
        return base.to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return fill((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        return fill((*shape[:-1], 2 * shape[-1] + 1))[..., 1::2]
    if layout == "expanded" and len(shape) >= 2:
        return fill((1, *shape[1:])).expand(shape)
    if layout == "channels_last" and len(shape) == 4:
        return fill(shape).to(memory_format=torch.channels_last)
    if layout == "offset":
        k = rng.randint(1, 15)
        flat = fill((k + _numel(shape),))
        return flat[k:].view(shape)
    return fill(shape)


def _param_dtype_ok(x_dtype, p_dtype) -> bool:
    if p_dtype == x_dtype:
        return x_dtype in FLOATS
    return x_dtype in (torch.float16, torch.bfloat16) and p_dtype == torch.float32


def _make_out(case: Case, kind: str, shape: list[int], rng: random.Random):
    """An out= tensor of the given kind for ``case`` (may rebuild case.x / case.weight /
    case.residual inside a shared buffer to create an overlap). Records the contract's verdict
    on the case."""
    x, weight, x_dtype = case.x, case.weight, case.x.dtype
    out_dtype = x_dtype
    if kind == "wrong dtype":
        out_dtype = rng.choice([d for d in [*FLOATS, torch.int32] if d != x_dtype])
        case.invalid.append("out dtype")
    if kind == "none":
        return None, kind
    if kind == "empty":
        out = torch.empty(0, dtype=out_dtype)
    elif kind == "wrong shape":
        out = torch.empty(3, dtype=out_dtype)
    elif kind == "transposed" and len(shape) >= 2:
        out = torch.empty([*shape[:-2], shape[-1], shape[-2]], dtype=out_dtype)
        out = out.transpose(-1, -2)
    elif kind == "expanded" and len(shape) >= 1 and _numel(shape) > 1:
        out = torch.empty([1] * len(shape), dtype=out_dtype).expand(shape)
        case.invalid.append("out has internal overlap")
    elif kind == "alias x" and x.numel() > 0:
        out = x
        case.aliasing = case.entry != "add_inplace"  # documented as allowed there
    elif kind == "alias residual" and case.residual is not None:
        out = case.residual
        case.invalid.append("out is the residual")
    elif kind == "overlaps x" and x.numel() > 1:
        # out shifted by ±s elements against x (ahead of it: rows are clobbered before they are
        # read; behind it: harmless for a row-by-row kernel).
        s = rng.choice([1, 3, x.shape[-1] if x.dim() else 1])
        ahead = rng.random() < 0.7
        flat = torch.empty(x.numel() + s, dtype=x_dtype)
        xs, os_ = (0, s) if ahead else (s, 0)
        flat[xs : xs + x.numel()].view(x.shape).copy_(x)
        case.x = flat[xs : xs + x.numel()].view(x.shape)
        out = flat[os_ : os_ + x.numel()].view(x.shape)
        case.aliasing = True
    elif kind == "overlaps residual" and case.residual is not None and x.numel() > 1:
        r = case.residual
        if tuple(r.shape) != tuple(x.shape) or r.dtype != x_dtype:
            return torch.empty(shape, dtype=out_dtype), "exact"
        flat = torch.empty(x.numel() + 1, dtype=x_dtype)
        flat[: x.numel()].view(x.shape).copy_(r)
        case.residual = flat[: x.numel()].view(x.shape)
        out = flat[1:].view(x.shape)
        case.aliasing = True
    elif kind == "overlaps weight" and weight is not None and x.numel() > 0:
        flat = torch.empty(max(x.numel(), weight.numel()) + 1, dtype=weight.dtype)
        flat[: weight.numel()].view(weight.shape).copy_(weight)
        case.weight = flat[: weight.numel()].view(weight.shape)
        if weight.dtype != x_dtype:
            return torch.empty(shape, dtype=out_dtype), "exact"
        out = flat[1 : 1 + x.numel()].view(x.shape)
        case.aliasing = True
    else:
        out, kind = torch.empty(shape, dtype=out_dtype), "exact"
    if tuple(out.shape) != tuple(shape):
        case.invalid.append(f"out shape {tuple(out.shape)}")  # out= is never resized
    return out, kind


def generate(index: int, seed: int) -> Case:
    rng = random.Random(seed * 1_000_003 + index)
    op = rng.choice(["layer_norm", "rms_norm"])
    entry = rng.choice(ENTRY_POINTS)
    invalid: list[str] = []

    # Input.
    x_dtype = rng.choice(FLOATS) if rng.random() < 0.82 else rng.choice(NON_FLOATS)
    if x_dtype not in FLOATS:
        invalid.append(f"input dtype {x_dtype}")
    while True:
        ndim = rng.choice([0, 1, 2, 2, 3, 3, 4])
        shape = [rng.choice(SIZES) for _ in range(ndim)]
        if _numel(shape) <= 40_000:
            break
    layout = rng.choice(["contiguous"] * 4 + ["transposed", "sliced", "expanded", "offset"])
    if ndim == 4 and rng.random() < 0.3:
        layout = "channels_last"
    x = _make(shape, x_dtype, rng, layout)

    # normalized_shape: a valid suffix, or a mutation of one.
    k = rng.randint(1, ndim) if ndim else 0
    suffix = list(shape[ndim - k :]) if k else []
    mutation = rng.random()
    normalized = list(suffix)
    if not suffix:
        invalid.append("empty normalized_shape")
    if mutation < 0.06:
        normalized = []
        invalid.append("empty normalized_shape")
    elif mutation < 0.12 and suffix:
        i = rng.randrange(len(normalized))
        normalized[i] = rng.choice([normalized[i] + 1, -1, 0 if normalized[i] else 2])
        invalid.append("normalized_shape does not match the input")
    elif mutation < 0.16:
        normalized = [rng.choice(SIZES[1:]), *list(shape)]
        invalid.append("normalized_shape longer than the input")
    # Valid reshuffles of the spelling.
    spelled: object = normalized
    if len(normalized) == 1 and rng.random() < 0.3:
        spelled = normalized[0]
    elif rng.random() < 0.2:
        spelled = torch.Size(normalized) if all(v >= 0 for v in normalized) else tuple(normalized)
    nshape = tuple(normalized)

    # Parameters: None, right, wrong shape, wrong dtype, non-contiguous.
    # fp16 / bf16 input: both parameters fp32 (mixed) or both in the input's dtype, mostly.
    mixed = x_dtype in (torch.float16, torch.bfloat16) and rng.random() < 0.4

    def param(name: str) -> torch.Tensor | None:
        r = rng.random()
        if r < 0.3:
            return None
        p_dtype = x_dtype if x_dtype in FLOATS else torch.float32
        if mixed != (rng.random() < 0.05):
            p_dtype = torch.float32
        p_shape = nshape if all(v >= 0 for v in nshape) else (3,)
        if r < 0.35:
            p_shape = (*tuple(p_shape), 2)
        elif r < 0.40:
            p_dtype = rng.choice(FLOATS + NON_FLOATS[:3])
        try:
            p = _make(p_shape, p_dtype, rng, rng.choice(["contiguous", "offset", "sliced"]))
        except RuntimeError:
            return None
        if tuple(p.shape) != nshape:
            invalid.append(f"{name} shape {tuple(p.shape)}")
        elif not _param_dtype_ok(x_dtype, p_dtype):
            invalid.append(f"{name} dtype {p_dtype} for input {x_dtype}")
        return p

    weight = param("weight")
    bias = param("bias") if op == "layer_norm" else None
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        invalid.append("weight and bias dtypes differ")

    eps: object = rng.choice(EPS_VALUES)
    if op == "rms_norm" and rng.random() < 0.3:
        eps = None
    zcw = rng.random() < 0.2

    case = Case(index, op, entry, x, spelled, weight, bias, eps, zcw, invalid=invalid)

    if entry.startswith("add"):
        # The residual: same shape and dtype as the input (any layout), or a mutation.
        r_shape, r_dtype, r = list(shape), x_dtype, rng.random()
        if r < 0.07:
            r_shape = [*r_shape[:-1], r_shape[-1] + 1] if r_shape else [2]
            invalid.append("residual shape")
        elif r < 0.12:
            r_dtype = rng.choice([d for d in FLOATS if d != x_dtype])
            invalid.append("residual dtype")
        r_layouts = ["contiguous", "contiguous", "transposed", "sliced", "offset"]
        if entry != "add_inplace":
            r_layouts.append("expanded")  # read-only there
        case.residual = _make(r_shape, r_dtype, rng, rng.choice(r_layouts))

    if entry == "out":
        kinds = ["empty", "exact", "wrong shape", "transposed", "wrong dtype", "expanded"]
        kinds += ["alias x", "overlaps x", "overlaps x", "overlaps weight", "overlaps weight"]
        case.out, case.out_kind = _make_out(case, rng.choice(kinds), shape, rng)
    if entry == "add_inplace":
        kinds = ["none", "exact", "alias x", "alias residual", "overlaps residual", "wrong shape"]
        case.out, case.out_kind = _make_out(case, rng.choice(kinds), shape, rng)

    if entry in ("autograd", "bwd_op", "add_autograd"):
        dy_shape = list(shape)
        dy_dtype = x_dtype
        r = rng.random()
        if entry == "bwd_op" and r < 0.08:
            dy_shape = [*dy_shape[:-1], dy_shape[-1] + 1] if dy_shape else [2]
            invalid.append("grad_out shape")
        elif entry == "bwd_op" and r < 0.14:
            dy_dtype = rng.choice([d for d in FLOATS if d != x_dtype])
            invalid.append("grad_out dtype")
        dy_layout = rng.choice(["contiguous", "transposed", "expanded", "sliced"])
        case.grad_out = _make(dy_shape, dy_dtype, rng, dy_layout)
        case.mask = [rng.random() < 0.8 for _ in range(3 if op == "layer_norm" else 2)]

    if eps is None and op == "layer_norm":
        invalid.append("eps None for layer_norm")
    cuda = torch.cuda.is_available() and layernorm_ext.has_cuda_kernels()
    if cuda and not case.aliasing and rng.random() < 0.15:
        # All on the GPU (valid), or one tensor left behind (device mismatch).
        names = ("x", "weight", "bias", "out", "residual", "grad_out")
        movable = [n for n in names if getattr(case, n) is not None]
        stay = rng.choice([None, *movable[1:]]) if len(movable) > 1 else None
        for n in movable:
            if n != stay:
                setattr(case, n, getattr(case, n).cuda())
        if stay is not None:
            invalid.append(f"{stay} on another device")
    return case


# --- running one case -----------------------------------------------------------------------------


def _tolerances(dtype):
    from norm_testing import dx_tol, fwd_tol

    return fwd_tol(dtype), dx_tol(dtype)


def _check_close(actual, ref, tol, what):
    from norm_testing import assert_close_to_ref

    assert_close_to_ref(actual.cpu(), ref, tol[0], tol[1], what)


def _reference(case: Case, x: torch.Tensor):
    from layernorm_ext._reference import layer_norm_ref, rms_norm_ref

    shape = case.normalized_shape
    if case.op == "layer_norm":
        return layer_norm_ref(
            x.cpu(),
            shape,
            _cpu(case.weight),
            _cpu(case.bias),
            case.eps,
            zero_centered_weight=case.zcw,
        )
    return rms_norm_ref(x.cpu(), shape, _cpu(case.weight), case.eps, zero_centered_weight=case.zcw)


def _cpu(t):
    return None if t is None else t.detach().cpu()


def _shape_tuple(spelled) -> tuple[int, ...]:
    return (spelled,) if isinstance(spelled, int) else tuple(spelled)


def _call(case: Case):
    """Runs the case; returns a dict of results to check against the reference."""
    ops = torch.ops.layernorm_ext
    fn = layernorm_ext.layer_norm if case.op == "layer_norm" else layernorm_ext.rms_norm
    args = (case.weight, case.bias) if case.op == "layer_norm" else (case.weight,)
    shape = case.normalized_shape
    if case.entry == "functional":
        return {"y": fn(case.x, shape, *args, case.eps, zero_centered_weight=case.zcw)}
    if case.entry == "out":
        res = fn(case.x, shape, *args, case.eps, zero_centered_weight=case.zcw, out=case.out)
        assert res is case.out or res.data_ptr() == case.out.data_ptr(), "out= not returned"
        return {"y": case.out}
    if case.entry.startswith("add"):
        return _call_add(case, args)
    shape_list = list(_shape_tuple(shape))
    if case.entry == "fwd_op":
        if case.op == "layer_norm":
            y, mean, rstd = ops.layer_norm_fwd(
                case.x, shape_list, *args, case.eps, zero_centered_weight=case.zcw
            )
        else:
            y, rstd = ops.rms_norm_fwd(
                case.x, shape_list, *args, case.eps, zero_centered_weight=case.zcw
            )
            mean = None
        return {"y": y, "mean": mean, "rstd": rstd}
    if case.entry == "autograd":
        leaves = []
        xs = case.x.detach().clone()
        if xs.is_floating_point() or xs.is_complex():
            xs.requires_grad_(True)
            leaves.append(("dx", xs))
        params = []
        for name, p in zip(("dw", "db"), args, strict=False):
            if p is not None and (p.is_floating_point() or p.is_complex()):
                p = p.detach().clone().requires_grad_(True)
                leaves.append((name, p))
            params.append(p)
        y = fn(xs, shape, *params, case.eps, zero_centered_weight=case.zcw)
        grads = torch.autograd.grad(y, [t for _, t in leaves], case.grad_out, allow_unused=True)
        return {"y": y.detach(), **{n: g for (n, _), g in zip(leaves, grads, strict=True)}}
    # bwd_op: statistics from our own forward (their values are checked by the fwd_op cases).
    if case.op == "layer_norm":
        _, mean, rstd = ops.layer_norm_fwd(
            case.x, shape_list, *args, case.eps, zero_centered_weight=case.zcw
        )
        dx, dw, db = ops.layer_norm_bwd(
            case.grad_out, case.x, shape_list, mean, rstd, *args, case.zcw, case.mask
        )
        return {"dx": dx, "dw": dw, "db": db, "mask": case.mask}
    _, rstd = ops.rms_norm_fwd(case.x, shape_list, *args, case.eps, zero_centered_weight=case.zcw)
    dx, dw = ops.rms_norm_bwd(case.grad_out, case.x, shape_list, rstd, *args, case.zcw, case.mask)
    return {"dx": dx, "dw": dw, "mask": case.mask}


def _leaf(t):
    if t is not None and (t.is_floating_point() or t.is_complex()):
        return t.detach().clone().requires_grad_(True)
    return t


def _call_add(case: Case, args):
    """The fused residual-add entry points: out of place, in place, and through autograd."""
    add = layernorm_ext.add_layer_norm if case.op == "layer_norm" else layernorm_ext.add_rms_norm
    kw = {"zero_centered_weight": case.zcw}
    if case.entry == "add":
        out, res = add(case.x, case.residual, case.normalized_shape, *args, case.eps, **kw)
        return {"y": out, "res": res}
    if case.entry == "add_inplace":
        out, res = add(
            case.x, case.residual, case.normalized_shape, *args, case.eps,
            inplace=True, out=case.out, **kw,
        )  # fmt: skip
        assert res is case.residual, "inplace=True must return the residual itself"
        assert case.out is None or out is case.out, "inplace=True must return out"
        return {"y": out, "res": res}
    xs, rs = _leaf(case.x), _leaf(case.residual)
    params = [_leaf(p) for p in args]
    out, res = add(xs, rs, case.normalized_shape, *params, case.eps, **kw)
    named = [("dx", xs), ("dr", rs), ("dw", params[0])]
    if case.op == "layer_norm":
        named.append(("db", params[1]))
    leaves = [(n, t) for n, t in named if t is not None and t.requires_grad]
    grads = torch.autograd.grad(
        (out, res), [t for _, t in leaves], (case.grad_out, _grad_residual(case)), allow_unused=True
    )
    got = {"y": out.detach(), "res": res.detach()}
    got.update({n: g for (n, _), g in zip(leaves, grads, strict=True)})
    return got


def _grad_residual(case: Case) -> torch.Tensor:
    """The gradient flowing into residual_out (exactly half of grad_out)."""
    return case.grad_out.detach() * 0.5


def _check_valid(case: Case, x_before: torch.Tensor, w_before, b_before, got: dict, r_before=None):
    """Compares a valid case's results with the float64 reference of the original inputs."""
    from norm_testing import bitwise_equal, param_grad_tol

    from layernorm_ext._reference import layer_norm_backward_ref, rms_norm_backward_ref

    shape = _shape_tuple(case.normalized_shape)
    ftol, dtol = _tolerances(x_before.dtype)
    original = Case(**{**case.__dict__, "weight": w_before, "bias": b_before})
    if r_before is not None:
        # The fused ops normalise the sum rounded to the dtype, exactly as torch's add.
        x_before = x_before + r_before
        assert bitwise_equal(got["res"].cpu(), x_before.cpu()), "residual_out != input + residual"
    if "y" in got:
        y = got["y"]
        assert y.shape == x_before.shape and y.dtype == x_before.dtype, f"y {y.shape} {y.dtype}"
        assert y.device == case.x.device, "output on another device"
        _check_close(y, _reference(original, x_before), ftol, "y")
    if "rstd" in got:
        stat_shape = tuple(x_before.shape[: x_before.dim() - len(shape)]) + (1,) * len(shape)
        assert got["rstd"].shape == stat_shape, f"rstd shape {tuple(got['rstd'].shape)}"
        if got["mean"] is not None:
            assert got["mean"].shape == stat_shape, f"mean shape {tuple(got['mean'].shape)}"
    if not any(k in got for k in ("dx", "dw", "db")):
        return
    dy = case.grad_out.cpu()
    if case.op == "layer_norm":
        ref = layer_norm_backward_ref(
            dy,
            x_before.cpu(),
            shape,
            _cpu(w_before),
            _cpu(b_before),
            case.eps,
            zero_centered_weight=case.zcw,
        )
    else:
        dx_ref, dw_ref = rms_norm_backward_ref(
            dy, x_before.cpu(), shape, _cpu(w_before), case.eps, zero_centered_weight=case.zcw
        )
        ref = (dx_ref, dw_ref, None)
    if r_before is not None:
        # Both input and residual get dnorm + the gradient of residual_out.
        ref = (ref[0] + _grad_residual(case).cpu().double(), *ref[1:])
        assert "dr" in got and bitwise_equal(got["dr"], got["dx"]), "d(residual) != d(input)"
    rows = _numel(x_before.shape[: x_before.dim() - len(shape)])
    mask = got.get("mask", [True, True, True])
    for i, (name, p) in enumerate((("dx", x_before), ("dw", w_before), ("db", b_before))):
        if name not in got:
            continue
        g = got[name]
        assert g is not None, f"{name}: no gradient for an input that requires grad"
        if not mask[i] or p is None:
            assert g.numel() == 0 and g.dim() == 1, f"{name}: not requested, got {tuple(g.shape)}"
            continue
        assert g.shape == p.shape and g.dtype == p.dtype, f"{name} {g.shape} {g.dtype}"
        tol = dtol if name == "dx" else param_grad_tol(p.dtype, rows)
        _check_close(g, ref[i], tol, name)


def run_case(case: Case) -> str | None:
    """None if the case behaved, else a description of the problem."""
    x_before = case.x.detach().clone()
    w_before = None if case.weight is None else case.weight.detach().clone()
    b_before = None if case.bias is None else case.bias.detach().clone()
    r_before = None if case.residual is None else case.residual.detach().clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _call(case)
    except CLEAN_ERRORS as exc:
        msg = str(exc)
        if "INTERNAL ASSERT" in msg:
            return f"internal assert: {msg[:300]}"
        if case.invalid or case.aliasing:
            return None
        return f"raised on valid input: {type(exc).__name__}: {msg[:300]}"
    except Exception as exc:  # any other exception type is a finding
        return f"unclean exception {type(exc).__name__}: {str(exc)[:300]}"
    if case.invalid:
        return "accepted invalid input (" + "; ".join(case.invalid) + ")"
    try:
        _check_valid(case, x_before, w_before, b_before, got, r_before)
    except AssertionError as exc:
        return f"wrong result: {str(exc)[:400]}"
    return None


def run_fuzz(seed: int, cases: int = FUZZ_CASES, only: int | None = None, verbose: bool = False):
    """Runs the fuzz loop and prints a JSON summary on its last stdout line."""
    torch.set_num_threads(1)
    summary = {"cases": 0, "valid": 0, "invalid": 0, "aliasing": 0, "failures": []}
    for index in range(cases) if only is None else [only]:
        case = generate(index, seed)
        # The case goes to stderr first: if it crashes the process, the parent shows it.
        print(case.describe(), file=sys.stderr, flush=True)
        problem = run_case(case)
        summary["cases"] += 1
        summary["aliasing" if case.aliasing else "invalid" if case.invalid else "valid"] += 1
        if problem is not None:
            summary["failures"].append({"case": case.describe(), "problem": problem})
            if verbose:
                print(problem, file=sys.stderr)
    print(json.dumps(summary))
    return summary


# --- the test -------------------------------------------------------------------------------------


def test_fuzz_argument_surface():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_fuzz; "
        "test_fuzz.run_fuzz(int(sys.argv[2]), int(sys.argv[3]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, tests_dir, str(FUZZ_SEED), str(FUZZ_CASES)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.startswith("#")][-1:]
        pytest.fail(
            f"fuzz process died with return code {proc.returncode} (signal if negative) at case "
            f"{last}; stderr tail:\n{proc.stderr[-3000:]}"
        )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cases"] == FUZZ_CASES
    # The generator explores both sides of the contract.
    assert summary["valid"] >= FUZZ_CASES // 3 and summary["invalid"] >= FUZZ_CASES // 6, summary
    failures = summary["failures"]
    assert not failures, (
        f"{len(failures)} of {summary['cases']} fuzz cases misbehaved:\n"
        + "\n".join(f"{f['problem']}\n    {f['case']}" for f in failures[:15])
    )


# --- the out= aliasing finding, as a deterministic test -------------------------------------------


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("overlap", ["input", "weight", "residual"])
def test_out_overlapping_an_input_is_rejected_or_exact(op, overlap):
    """out= that partially overlaps the input, the weight, or (fused in-place add) the residual
    must either raise, as ATen's out= ops do ("unsupported operation: some elements of the input
    tensor and the written-to tensor refer to a single memory location"), or give the result of
    the unaliased inputs. Writing row r clobbers what a later row (or vector) reads, so a kernel
    that does neither returns wrong numbers. (out= exactly aliasing the input is fine: each row
    is read before it is written.)"""
    from layernorm_ext._reference import layer_norm_ref, rms_norm_ref

    ln = op == "layer_norm"
    ref_fn = layer_norm_ref if ln else rms_norm_ref
    gen = torch.Generator().manual_seed(7)
    M, N = 4, 8
    flat = torch.randn(M * N + N, generator=gen)
    w = torch.randn(N, generator=gen)
    x = torch.randn(M, N, generator=gen)
    if overlap == "input":
        # out one row ahead of x: writing row r overwrites input row r + 1 before it is read.
        x, out = flat[: M * N].view(M, N), flat[N:].view(M, N)
    elif overlap == "weight":
        w, out = flat[:N], flat[1 : 1 + M * N].view(M, N)
    else:
        residual, out = flat[: M * N].view(M, N), flat[1 : 1 + M * N].view(M, N)
        r_before = residual.clone()
    expected = ref_fn(x.clone() + (r_before if overlap == "residual" else 0), N, w.clone())
    try:
        if overlap == "residual":
            add = layernorm_ext.add_layer_norm if ln else layernorm_ext.add_rms_norm
            add(x, residual, N, w, inplace=True, out=out)
        else:
            (layernorm_ext.layer_norm if ln else layernorm_ext.rms_norm)(x, N, w, out=out)
    except RuntimeError:
        return
    err = float((out.double() - expected).abs().max())
    if overlap == "residual":
        err = max(err, float((residual - (x + r_before)).abs().max()))
    assert err <= 1e-5, (
        f"{op}(out= overlapping the {overlap}) returned wrong values without an error: "
        f"max |out - ref| = {err:.3g}"
    )
