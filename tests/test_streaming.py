"""Forward outputs whose problem (input + output) fills the last-level cache may be written with
non-temporal stores (CPU forward): under the default policy on CPUs where that measured faster
(AMD, Intel with AMX), caller-provided ones (out=, in-place) always and fresh ones when their
memory is already mapped in; under the "on" policy every aligned one. That changes only how y
reaches memory: every row must be bitwise what the cached path gives for the same row (computed
here in blocks below the threshold), for each op, with and without the alignment that streaming
needs, on the best and the portable kernel set, and for fresh outputs either way. The tests force
the "on" policy and a 32 MiB threshold (the machine's own is its last-level cache, which may be
hundreds of MiB), so the streamed path runs on every CPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from norm_testing import assert_bitwise_equal, check_result, fwd_tol, use_isa

import layernorm_ext

THRESHOLD = 32 << 20  # the streaming threshold these tests set (input + output bytes)
STREAM_BYTES = 64 << 20  # output alone >= the threshold
BLOCK_ROWS = 256  # blocks far below the threshold: the cached path


@contextlib.contextmanager
def _process_setting(
    set_fn: Callable[[Any], Any], get_fn: Callable[[], Any], value: Any
) -> Iterator[None]:
    """Runs the body with a process-wide setting at ``value`` (checked through ``get_fn``);
    restores the previous one (what ``set_fn`` returned)."""
    previous = set_fn(value)
    try:
        assert get_fn() == value
        yield
    finally:
        set_fn(previous)


@pytest.fixture(autouse=True)
def _streaming_threshold() -> Iterator[None]:
    """Every test here runs with the threshold at THRESHOLD; the default comes back after."""
    with _process_setting(
        layernorm_ext.set_cpu_stream_min_bytes, layernorm_ext.cpu_stream_min_bytes, THRESHOLD
    ):
        yield


def stream_policy(name: str) -> contextlib.AbstractContextManager[None]:
    """Runs the body under the CPU streaming policy ``name``; restores the previous one."""
    return _process_setting(
        layernorm_ext.set_cpu_stream_policy, layernorm_ext.cpu_stream_policy, name
    )


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
    with use_isa(name), stream_policy("on"):
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
    with stream_policy("on"):
        layernorm_ext.layer_norm(x, N, out=out)
    blocks = _blocks(lambda s: layernorm_ext.layer_norm(x[s], N), M)
    assert_bitwise_equal(out, blocks, "offset out")


@pytest.mark.parametrize("policy", ["auto", "off"])
def test_other_stream_policies_give_the_same_bits(policy):
    """The default policy (plain stores on this CPU unless it is an AMD one) and "off" write the
    bits that "on" writes."""
    N, M = 4096, STREAM_BYTES // (4096 * 2) + 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, N, generator=g).to(torch.bfloat16)
    w = torch.randn(N, generator=g).to(torch.bfloat16)
    with stream_policy("on"):
        streamed = layernorm_ext.layer_norm(x, N, w, out=torch.empty_like(x))
    with stream_policy(policy):
        assert_bitwise_equal(
            layernorm_ext.layer_norm(x, N, w, out=torch.empty_like(x)), streamed, policy
        )


def test_stream_policy_names_and_errors():
    assert layernorm_ext.cpu_stream_policy() in ("auto", "on", "off")
    with pytest.raises(RuntimeError, match="is not a streaming policy"):
        layernorm_ext.set_cpu_stream_policy("sometimes")
    with stream_policy("off"):
        assert layernorm_ext.set_cpu_stream_policy("on") == "off"
        assert layernorm_ext.cpu_stream_policy() == "on"


def test_stream_min_bytes_default_set_and_errors():
    """The default is at least 32 MiB; a set count is used and reported until reset with None."""
    assert layernorm_ext.set_cpu_stream_min_bytes(None) == THRESHOLD
    default = layernorm_ext.cpu_stream_min_bytes()
    assert default >= 32 << 20
    assert layernorm_ext.set_cpu_stream_min_bytes(1 << 20) is None
    assert layernorm_ext.cpu_stream_min_bytes() == 1 << 20
    assert layernorm_ext.set_cpu_stream_min_bytes(None) == 1 << 20
    assert layernorm_ext.cpu_stream_min_bytes() == default
    for bad in (0, -5):
        with pytest.raises(RuntimeError, match="set_cpu_stream_min_bytes expects a positive"):
            layernorm_ext.set_cpu_stream_min_bytes(bad)
    assert layernorm_ext.cpu_stream_min_bytes() == default


def _package_root() -> str:
    """The directory holding the layernorm_ext package under test, for a subprocess."""
    return str(Path(layernorm_ext.__file__).resolve().parent.parent)


@pytest.mark.parametrize(("value", "expected"), [("off", "off"), ("on", "on"), ("", "auto")])
def test_stream_policy_from_the_environment(value, expected):
    env = {**os.environ, "LAYERNORM_EXT_CPU_STREAM": value, "PYTHONPATH": _package_root()}
    code = "import layernorm_ext as L; print(L.cpu_stream_policy())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_stream_policy_environment_error_is_clear():
    env = {**os.environ, "LAYERNORM_EXT_CPU_STREAM": "always", "PYTHONPATH": _package_root()}
    code = "import layernorm_ext as L; L.cpu_stream_policy()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "LAYERNORM_EXT_CPU_STREAM = 'always' is not a streaming policy" in out.stderr
