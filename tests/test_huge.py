"""Tensors with more than 2^31 (and 2^32) elements on CPU (design/reliability.md F19, the CPU
analogue of the 32-bit offset bugs pytorch#181555, #181600, #136291): opt-in, ``pytest -m huge``.

Rows are N = 1000 wide, so the 2^31- and 2^32-element boundaries fall inside rows 2147483 and
4294967. Sampled rows (the first, the last, and rows around 2^31/N and 2^32/N) of the full-size
forward and backward must be bitwise the same rows run alone, and dγ / dβ must match float64
sums. Each row holds its own random values, so a row read from a wrapped offset cannot pass.

Memory: the fp16 case needs ~9 GB (x, y or dx), the bf16 case beyond 2^32 elements ~18 GB; a
case is skipped when /proc/meminfo's MemAvailable is short of its need (with the reason).
"""

from __future__ import annotations

import pytest
import torch
from norm_testing import assert_bitwise_equal, check_result, param_grad_tol

pytestmark = pytest.mark.huge

ops = torch.ops.layernorm_ext
N = 1000
CHUNK = 1 << 16  # rows per chunk when filling x and summing the reference

CASES = [
    # (dtype, rows): 2.2e9 elements (> 2^31, fp32 parameters), and 4.3e9 (> 2^32).
    pytest.param(torch.float16, 2_200_000, id="fp16-2.2e9"),
    pytest.param(torch.bfloat16, 4_300_000, id="bf16-4.3e9"),
]


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _sample_rows(M: int) -> list[int]:
    rows = {0, 1, M - 2, M - 1}
    for boundary in (2**31, 2**32):
        r = boundary // N
        if r + 1 < M:
            rows |= {r - 1, r, r + 1}
    return sorted(rows)


def _fill(x: torch.Tensor, seed: int) -> None:
    """Row-unique random values, generated chunk by chunk (no full-size fp32 temporary)."""
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, x.shape[0], CHUNK):
        e = min(x.shape[0], s + CHUNK)
        x[s:e].copy_(torch.randn(e - s, N, generator=gen) * 1.5 + 0.25)


def _param_grad_refs(x, dy_row, mean_rstd_fn):
    """float64 Σ_rows dy·x̂ and Σ_rows dy over all rows, chunk by chunk; x̂ from PyTorch's fp32
    kernel on the exact (upcast) chunk, accurate to ~1e-7, far inside the 16-bit tolerance."""
    dw = torch.zeros(N, dtype=torch.float64)
    for s in range(0, x.shape[0], CHUNK):
        e = min(x.shape[0], s + CHUNK)
        dw += mean_rstd_fn(x[s:e].float()).double().sum(dim=0)
    dy = dy_row.double().flatten()
    return dw * dy, dy * x.shape[0]


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype,M", CASES)
def test_huge_rows_equal_rows_run_alone(dtype, M, op):
    numel = M * N
    assert numel > 2**31
    tensor_bytes = numel * torch.finfo(dtype).bits // 8
    need = 2 * tensor_bytes + (1 << 30)
    if _mem_available() < need:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB available, have {_mem_available() / 2**30:.1f}")
    is_ln = op == "layer_norm"
    x = torch.empty(M, N, dtype=dtype)
    _fill(x, seed=M)
    gen = torch.Generator().manual_seed(1)
    # fp16 input takes fp32 parameters (the mixed path): dβ = M·dy (~1e6) exceeds fp16's range.
    pdtype = torch.float32 if dtype == torch.float16 else dtype
    w = (1 + 0.5 * torch.randn(N, generator=gen)).to(pdtype)
    b = (0.5 * torch.randn(N, generator=gen)).to(pdtype) if is_ln else None
    # grad_out: one row expanded over all rows (row stride 0, read in place: no copy).
    dy_row = torch.randn(1, N, generator=gen).to(dtype)
    dy = dy_row.expand(M, N)
    rows = _sample_rows(M)
    label = f"[{op} {dtype} {M}x{N}]"

    # Forward over everything, then the sampled rows alone.
    if is_ln:
        y, mean, rstd = ops.layer_norm_fwd(x, [N], w, b, 1e-5)
    else:
        (y, rstd), mean = ops.rms_norm_fwd(x, [N], w, None), None
    y_rows, stats = y[rows].clone(), (None if mean is None else mean[rows].clone(), rstd[rows])
    del y
    for i, r in enumerate(rows):
        xr = x[r : r + 1]
        if is_ln:
            yr, mr, sr = ops.layer_norm_fwd(xr, [N], w, b, 1e-5)
            assert_bitwise_equal(mr, stats[0][i : i + 1], f"{label} mean of row {r}")
        else:
            yr, sr = ops.rms_norm_fwd(xr, [N], w, None)
        assert_bitwise_equal(yr, y_rows[i : i + 1], f"{label} y of row {r}")
        assert_bitwise_equal(sr, stats[1][i : i + 1], f"{label} rstd of row {r}")

    # Backward over everything, then the sampled rows alone.
    mask = [True, True, True] if is_ln else [True, True]
    if is_ln:
        dx, dw, db = ops.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, False, mask)
    else:
        (dx, dw), db = ops.rms_norm_bwd(dy, x, [N], rstd, w, False, mask), None
    dx_rows = dx[rows].clone()
    del dx
    for i, r in enumerate(rows):
        args = (dy[r : r + 1], x[r : r + 1], [N])
        if is_ln:
            g = ops.layer_norm_bwd(*args, mean[r : r + 1], rstd[r : r + 1], w, b, False, mask)
        else:
            g = ops.rms_norm_bwd(*args, rstd[r : r + 1], w, False, mask)
        assert_bitwise_equal(g[0], dx_rows[i : i + 1], f"{label} dx of row {r}")

    # dγ / dβ against float64 sums over all rows.
    def xhat(chunk):
        if is_ln:
            return torch.nn.functional.layer_norm(chunk, (N,), eps=1e-5)
        return torch.nn.functional.rms_norm(chunk, (N,), eps=None)

    rdw, rdb = _param_grad_refs(x, dy_row, xhat)
    tol = param_grad_tol(pdtype, M)
    check_result(dw, rdw, tol, f"{label} dw")
    if is_ln:
        check_result(db, rdb, tol, f"{label} db")
