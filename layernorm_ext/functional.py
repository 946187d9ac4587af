"""Functional API: the same signatures and semantics as ``torch.nn.functional``.

Each function binds its dispatcher op once at import and adds nothing but argument plumbing on the
per-call path: shape, dtype and device checks happen once, in C++ (with ATen's wording).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "available_cpu_capabilities",
    "cpu_capability",
    "cpu_stream_min_bytes",
    "cpu_stream_policy",
    "has_cuda_kernels",
    "layer_norm",
    "rms_norm",
    "set_cpu_capability",
    "set_cpu_stream_min_bytes",
    "set_cpu_stream_policy",
]

_ops = torch.ops.layernorm_ext
_layer_norm = _ops.layer_norm.default
_layer_norm_out = _ops.layer_norm.out
_rms_norm = _ops.rms_norm.default
_rms_norm_out = _ops.rms_norm.out
# Eager fast entries (csrc/python_entry.cpp): the same dispatcher ops (autograd, __torch_dispatch__
# modes, profiling all still apply) behind a lean argument parser instead of the OpOverload's
# generic binding, ~2 us less per call; Tensor subclasses, an active torch-function mode and
# unusual argument types go to the OpOverload. Positional: ..., zero_centered_weight, out; out=None
# selects the op with fresh outputs, a tensor the form that writes into it (returned).
# torch.compile does not know them, so traced code uses the OpOverloads instead.
_layer_norm_fast = _C.layer_norm
_rms_norm_fast = _C.rms_norm
_add_layer_norm_fast = _C.add_layer_norm
_add_rms_norm_fast = _C.add_rms_norm
_is_compiling = torch.compiler.is_compiling

ShapeLike = int | Sequence[int] | torch.Size


def layer_norm(
    input: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    zero_centered_weight: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims of ``input``.

    Behaves like :func:`torch.nn.functional.layer_norm`: per row, ``(x - mean) / sqrt(var + eps)``
    with the population variance, then ``* weight + bias`` where given. Statistics are computed
    in fp32 (fp64 for fp64 input) with Welford's algorithm.

    Args:
        input: tensor of shape ``[*, *normalized_shape]``; fp32, fp64, fp16 or bf16.
        normalized_shape: an int or a sequence of ints, the trailing dims to normalize over.
        weight: optional scale of shape ``normalized_shape``, in the input's dtype (or fp32 for
            fp16 / bf16 input).
        bias: optional shift, same rules as ``weight``.
        eps: added to the variance for numerical stability.
        zero_centered_weight: scale by ``1 + weight`` instead of ``weight`` (Gemma style), in fp32.
        out: optional preallocated output of the input's shape and dtype (never resized).
            Not differentiable.

    Returns:
        The normalized tensor, in the input's dtype and shape (``out`` if given).
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if not _is_compiling():
        return _layer_norm_fast(input, shape, weight, bias, eps, zero_centered_weight, out)
    if out is None:
        return _layer_norm(
            input, shape, weight, bias, eps, zero_centered_weight=zero_centered_weight
        )
    _layer_norm_out(
        input, shape, weight, bias, eps, zero_centered_weight=zero_centered_weight, out=out
    )
    return out


def rms_norm(
    input: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    zero_centered_weight: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Root-mean-square normalization, like :func:`torch.nn.functional.rms_norm`.

    ``y = x / sqrt(mean(x**2) + eps) * weight``, computed in fp32 (fp64 for fp64 input) and
    rounded once to the input's dtype. ``eps=None`` uses the machine epsilon of the computation
    type (fp32 for fp16 / bf16 / fp32 input), as torch does.

    Args:
        input: tensor of shape ``[*, *normalized_shape]``.
        normalized_shape: an int or a sequence of ints.
        weight: optional scale (input's dtype, or fp32 for fp16 / bf16 input).
        eps: added to the mean square; ``None`` for the computation type's epsilon.
        zero_centered_weight: scale by ``1 + weight`` (Gemma style), in fp32.
        out: optional preallocated output. Not differentiable.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if not _is_compiling():
        return _rms_norm_fast(input, shape, weight, eps, zero_centered_weight, out)
    if out is None:
        return _rms_norm(input, shape, weight, eps, zero_centered_weight=zero_centered_weight)
    _rms_norm_out(input, shape, weight, eps, zero_centered_weight=zero_centered_weight, out=out)
    return out


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    zero_centered_weight: bool = False,
    inplace: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused pre-norm step: ``residual_out = input + residual``, ``out = layer_norm(residual_out)``.

    One pass over memory instead of an add followed by a norm; the results are bitwise those of
    ``layer_norm(input + residual, ...)`` (the sum is rounded to the inputs' dtype first, as
    torch's add does). ``input`` and ``residual`` must have the same shape and dtype.

    Args:
        input, residual: tensors of shape ``[*, *normalized_shape]``, same dtype.
        normalized_shape, weight, bias, eps, zero_centered_weight: as :func:`layer_norm`.
        inplace: update ``residual`` in place with the sum (inference; not differentiable).
        out: with ``inplace``, where to write the normalised result (may be ``input`` itself).

    Returns:
        ``(out, residual_out)``. Autograd flows through both (unless ``inplace``).
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if inplace:
        if not _is_compiling():
            # out=...: the entry allocates the output. NotImplemented: it left the argument
            # (e.g. a Tensor subclass) to the op, which gets a tensor allocated here.
            y = _add_layer_norm_fast(
                input, residual, shape, weight, bias, eps, zero_centered_weight,
                ... if out is None else out,
            )  # fmt: skip
            if y is not NotImplemented:
                return y, residual
        if out is None:
            out = torch.empty_like(input, memory_format=torch.contiguous_format)
        _ops.add_layer_norm_inplace(
            input, residual, shape, weight, bias, eps,
            zero_centered_weight=bool(zero_centered_weight), out=out,
        )  # fmt: skip
        return out, residual
    if out is not None:
        raise ValueError("add_layer_norm: out= is supported together with inplace=True")
    if not _is_compiling():
        return _add_layer_norm_fast(
            input, residual, shape, weight, bias, eps, zero_centered_weight, None
        )
    return _ops.add_layer_norm.default(
        input, residual, shape, weight, bias, eps, zero_centered_weight=zero_centered_weight
    )


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    zero_centered_weight: bool = False,
    inplace: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``residual_out = input + residual``, ``out = rms_norm(residual_out)``.

    Same contract as :func:`add_layer_norm`, with :func:`rms_norm`'s arguments.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if inplace:
        if not _is_compiling():
            # out=...: the entry allocates the output. NotImplemented: it left the argument
            # (e.g. a Tensor subclass) to the op, which gets a tensor allocated here.
            y = _add_rms_norm_fast(
                input, residual, shape, weight, eps, zero_centered_weight,
                ... if out is None else out,
            )  # fmt: skip
            if y is not NotImplemented:
                return y, residual
        if out is None:
            out = torch.empty_like(input, memory_format=torch.contiguous_format)
        _ops.add_rms_norm_inplace(
            input, residual, shape, weight, eps,
            zero_centered_weight=bool(zero_centered_weight), out=out,
        )  # fmt: skip
        return out, residual
    if out is not None:
        raise ValueError("add_rms_norm: out= is supported together with inplace=True")
    if not _is_compiling():
        return _add_rms_norm_fast(input, residual, shape, weight, eps, zero_centered_weight, None)
    return _ops.add_rms_norm.default(
        input, residual, shape, weight, eps, zero_centered_weight=zero_centered_weight
    )


def cpu_capability() -> str:
    """The CPU kernel set in use: ``"avx512"``, ``"avx2"`` or ``"scalar"``.

    Chosen once from the running CPU's features, or forced with the environment variable
    ``LAYERNORM_EXT_CPU_ISA=auto|avx512|avx2|scalar`` (read on first use).
    """
    return _ops.cpu_capability()


def available_cpu_capabilities() -> list[str]:
    """The CPU kernel sets this build has and this CPU can run, best first."""
    return list(_ops.available_cpu_capabilities())


def set_cpu_capability(name: str) -> str:
    """Switches the CPU kernel set for the whole process; returns the previous one.

    ``name`` is ``"auto"`` or one of :func:`available_cpu_capabilities`. Meant for tests and
    benchmarks: switch between calls, not while other threads run ops.
    """
    return _ops.set_cpu_capability(name)


def cpu_stream_policy() -> str:
    """When large CPU forward outputs are written with non-temporal stores: ``"auto"``,
    ``"on"`` or ``"off"``.

    Streaming applies only once the input and the output together reach
    :func:`cpu_stream_min_bytes` (the last-level cache, at least 32 MiB) and the output rows are
    64-byte aligned; the values are bitwise those of plain stores. ``"auto"`` (the default)
    streams on CPUs where it measured faster (AMD, and Intel Xeons with AMX; on an older Intel
    Xeon, Skylake-SP, plain stores were faster), and not into freshly mapped outputs; ``"on"``
    streams every such output, ``"off"`` none. Set with the environment variable
    ``LAYERNORM_EXT_CPU_STREAM`` (read on first use) or :func:`set_cpu_stream_policy`.
    """
    return _ops.cpu_stream_policy()


def set_cpu_stream_policy(name: str) -> str:
    """Sets the streaming policy (``"auto"``, ``"on"`` or ``"off"``) for the whole process;
    returns the previous one. Meant for tests and benchmarks: switch between calls."""
    return _ops.set_cpu_stream_policy(name)


def cpu_stream_min_bytes() -> int:
    """Input plus output bytes from which a CPU forward may write its output with non-temporal
    stores (see :func:`cpu_stream_policy`): the last-level cache a core uses, as sysfs reports it,
    and at least 32 MiB, unless :func:`set_cpu_stream_min_bytes` set another count."""
    return _ops.cpu_stream_min_bytes()


def set_cpu_stream_min_bytes(nbytes: int | None) -> int | None:
    """Sets the byte count of :func:`cpu_stream_min_bytes` for the whole process (``None``: back
    to the cache-size default); returns the previous setting (``None`` for the default). For
    tests, and for machines whose reported cache size misleads (a VM shown the whole socket's
    cache). Switch between calls, not while ops run on other threads."""
    return _ops.set_cpu_stream_min_bytes(nbytes)


def has_cuda_kernels() -> bool:
    """True if this build registered CUDA kernels (it was compiled with nvcc)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("layernorm_ext::layer_norm", "CUDA")
