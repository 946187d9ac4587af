"""The built extension has a CUDA kernel for every op (runs without a GPU).

A build that was meant to include the CUDA kernels but silently came out CPU-only (nvcc not found,
a source group dropped, a registration block compiled out) still imports and passes every CPU
test; this module is what notices. It only runs where the build was expected to include CUDA:
CI sets ``LAYERNORM_EXT_EXPECT_CUDA=1`` when nvcc is present. Elsewhere it is skipped, with the
reason.
"""

from __future__ import annotations

import os

import pytest
import torch

import layernorm_ext


def _tensor_ops() -> list[str]:
    """Every layernorm_ext overload that takes a tensor (so needs a CUDA kernel), read from the
    dispatcher: an op added later is covered without editing this list."""
    names = []
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith("layernorm_ext::"):
            continue
        name, _, overload = full.removeprefix("layernorm_ext::").partition(".")
        schema = torch._C._get_schema(f"layernorm_ext::{name}", overload)
        if any(
            isinstance(a.type, torch.TensorType) or "Tensor" in str(a.type)
            for a in schema.arguments
        ):
            names.append(full.removeprefix("layernorm_ext::"))
    return sorted(names)


OPS = _tensor_ops()


def test_op_list_is_complete() -> None:
    for core in (
        "layer_norm",
        "layer_norm.out",
        "layer_norm_fwd",
        "layer_norm_bwd",
        "rms_norm",
        "rms_norm_bwd",
        "add_layer_norm",
        "add_rms_norm_inplace",
    ):
        assert core in OPS, (core, OPS)


EXPECT_CUDA = os.environ.get("LAYERNORM_EXT_EXPECT_CUDA", "").strip().lower() in (
    "1",
    "true",
    "yes",
    "on",
)

pytestmark = pytest.mark.skipif(
    not EXPECT_CUDA,
    reason="LAYERNORM_EXT_EXPECT_CUDA=1 is not set, so this build need not include CUDA kernels",
)


@pytest.mark.parametrize("op", OPS)
def test_op_has_cuda_kernel(op: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"layernorm_ext::{op}", "CUDA"), (
        f"layernorm_ext::{op} has no CUDA kernel: the extension was built without its CUDA "
        f"sources (was nvcc found? see the 'layernorm_ext setup:' lines of the build log)"
    )


def test_has_cuda_kernels_reports_the_build() -> None:
    assert layernorm_ext.has_cuda_kernels()
