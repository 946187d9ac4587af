"""Forward outputs whose problem (input + output) fills the last-level cache are written with
non-temporal stores (CPU forward): caller-provided ones (out=, in-place) always, fresh ones when
their memory is already mapped in (a fresh mapping takes plain stores). That changes only how y
reaches memory: every row must be bitwise what the cached path gives for the same row (computed
here in blocks below the threshold), for each op, with and without the alignment that streaming
needs, on the best and the portable kernel set, and for fresh outputs either way."""

from __future__ import annotations

import pytest
import torch
from norm_testing import assert_bitwise_equal, check_result, fwd_tol, use_isa

import layernorm_ext

STREAM_BYTES = 64 << 20  # output alone >= the streaming threshold: max(last-level cache, 32 MiB)
BLOCK_ROWS = 256  # blocks far below the threshold: the cached path


def _blocks(fn, M: int) -> torch.Tensor:
    """fn(rows) over blocks of rows, concatenated."""
    return torch.cat([fn(slice(i, i + BLOCK_ROWS)) for i in range(0, M, BLOCK_ROWS)])


def _ops(x, r, N, w, b):
    """Each op as a function of a row range (slice(None) = the whole tensor), writing into a
    preallocated output (the streamed case)."""

    def add_inplace(s):
        out = torch.empty_like(x[s])
        layernorm_ext.add_layer_norm(x[s], r[s].clone(), N, w, b, inplace=True, out=out)
        return out

    return {
        "layer_norm": lambda s: layernorm_ext.layer_norm(x[s], N, w, b, out=torch.empty_like(x[s])),
        "rms_norm": lambda s: layernorm_ext.rms_norm(x[s], N, w, out=torch.empty_like(x[s])),
        "add_layer_norm_inplace": add_inplace,
        "layer_norm_fresh": lambda s: layernorm_ext.layer_norm(x[s], N, w, b),
    }


@pytest.mark.parametrize("isa", ["best", "scalar"])
@pytest.mark.parametrize(
    ("dtype", "N"),
    [(torch.float32, 4096), (torch.bfloat16, 4096), (torch.float32, 4100)],
    ids=["fp32-aligned-rows", "bf16-aligned-rows", "fp32-unaligned-rows"],
)
def test_streamed_output_is_bitwise_the_cached_one(isa, dtype, N):
    g = torch.Generator().manual_seed(7)
    M = STREAM_BYTES // (N * dtype.itemsize) + 3  # just above the threshold, with a row tail
    x = (torch.randn(M, N, generator=g) * 3 + 1).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype)
    w = torch.randn(N, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    name = layernorm_ext.available_cpu_capabilities()[0] if isa == "best" else "scalar"
    with use_isa(name):
        for op, fn in _ops(x, r, N, w, b).items():
            y = fn(slice(None))
            assert y.numel() * y.element_size() >= STREAM_BYTES
            assert_bitwise_equal(y, _blocks(fn, M), f"[{name} {op} {dtype} N={N}]")
    # And against the float64 reference on a sample of rows (first, middle, last).
    rows = torch.tensor([0, M // 2, M - 1])
    ref = torch.nn.functional.layer_norm(x[rows].double(), (N,), w.double(), b.double(), 1e-5)
    y = layernorm_ext.layer_norm(x, N, w, b)
    check_result(y[rows], ref, fwd_tol(dtype), f"[{dtype} N={N}] sampled rows")


def test_streamed_out_into_a_view_with_offset():
    """out= a view whose start is not 64-byte aligned: the plain stores are used, same bits."""
    N, M = 4096, (STREAM_BYTES // (4096 * 4)) + 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, N, generator=g)
    buf = torch.empty(M * N + 1)
    out = buf[1:].view(M, N)
    layernorm_ext.layer_norm(x, N, out=out)
    blocks = _blocks(lambda s: layernorm_ext.layer_norm(x[s], N), M)
    assert_bitwise_equal(out, blocks, "offset out")
