"""Bitwise reproducibility (reliability.md §7, P4): the same bits for any thread count, run to
run, and for a row whatever the batch around it (pytorch#149301: LN(x)[:-1] != LN(x[:-1]))."""

from __future__ import annotations

import pytest
import torch
from norm_testing import (
    DTYPE_CASES,
    DTYPE_IDS,
    assert_bitwise_equal,
    assert_close_to_ref,
    fwd_tol,
    make_input,
    make_params,
    num_threads,
)

import layernorm_ext
from layernorm_ext._reference import layer_norm_ref, rms_norm_ref

THREADS = [1, 2, 3]
# Large enough to split across threads in the forward (several 16K-element tasks) and to use
# many dγ / dβ row chunks in the backward.
SIZES = [(1031, 769), (4099, 64), (37, 8192)]


def _run(x, N, w, b, dy, fn):
    xs = x.clone().requires_grad_()
    ws = w.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    y = fn(xs, N, ws, bs) if b is not None else fn(xs, N, ws)
    y.backward(dy)
    grads = [xs.grad, ws.grad] + ([] if b is None else [bs.grad])
    return [y.detach(), *grads]


def _ln(x, N, w, b):
    return layernorm_ext.layer_norm(x, N, w, b)


def _rms(x, N, w):
    return layernorm_ext.rms_norm(x, N, w)


@pytest.mark.parametrize("size", SIZES, ids=[f"{m}x{n}" for m, n in SIZES])
@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_thread_count_and_repeat_invariance(isa, case, size, gen, restore_threads):
    M, N = size
    x = make_input((M, N), case.x, generator=gen)
    w, b = make_params((N,), case.param, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen).to(case.x)
    for fn, bias, kind in ((_ln, b, "layer_norm"), (_rms, None, "rms_norm")):
        names = ["y", "dx", "dw", "db"][: 4 if bias is not None else 3]
        with num_threads(1):
            golden = _run(x, N, w, bias, dy, fn)
        for threads in THREADS:
            with num_threads(threads):
                for rep in range(2):
                    got = _run(x, N, w, bias, dy, fn)
                    for name, g, e in zip(names, got, golden, strict=True):
                        assert_bitwise_equal(
                            g,
                            e,
                            f"[{isa} {case.id} {kind} {M}x{N} threads={threads} #{rep}] {name}",
                        )


def test_deterministic_algorithms_mode(gen):
    x = make_input((300, 257), torch.float32, generator=gen)
    w, b = make_params((257,), torch.float32, True, True, generator=gen)
    dy = torch.randn(300, 257, generator=gen)
    golden = _run(x, 257, w, b, dy, _ln)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(5):
            for g, e in zip(_run(x, 257, w, b, dy, _ln), golden, strict=True):
                assert_bitwise_equal(g, e, "use_deterministic_algorithms(True)")
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_row_independence(isa, case, gen):
    for N in (7, 64, 769):
        x = make_input((30, N), case.x, generator=gen)
        extra = make_input((19, N), case.x, generator=gen)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        label = f"[{isa} {case.id} N={N}]"
        for fn, args in ((layernorm_ext.layer_norm, (w, b)), (layernorm_ext.rms_norm, (w,))):
            y = fn(x, N, *args)
            for i in (0, 13, 29):
                assert_bitwise_equal(fn(x[i : i + 1], N, *args), y[i : i + 1], f"{label} row {i}")
            # Batch 23 vs 24 (pytorch#149301) and every prefix length around it.
            for m in (1, 22, 23, 24, 29):
                assert_bitwise_equal(fn(x[:m], N, *args), y[:m], f"{label} prefix {m}")
            both = fn(torch.cat([x, extra]), N, *args)
            assert_bitwise_equal(both[: len(x)], y, f"{label} LN(cat(x, y))[:len(x)]")
            assert_bitwise_equal(both[len(x) :], fn(extra, N, *args), f"{label} cat tail")


_LAYOUT_CASES = [
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize(
    "x_dtype,param_dtype", _LAYOUT_CASES, ids=["bf16-bf16", "bf16-fp32", "fp16-fp16"]
)
@pytest.mark.parametrize("zero_centered", [False, True], ids=["w", "1+w"])
def test_parameter_layouts_agree(isa, x_dtype, param_dtype, zero_centered, gen, restore_threads):
    """A task reads 16-bit parameters as stored below 16 rows and widened to fp32 above (bf16
    rows without AVX512-BF16: in the even / odd layout), fp32 parameters of bf16 rows in element
    order for one row and reordered for more (fwd_rows in csrc/cpu/norm_krnl.cpp). Every task
    size gives the same bits, and they are the float64 reference rounded once."""
    M = 40
    atol, rtol = fwd_tol(x_dtype)
    for N in (40, 769, 4100):
        x = make_input((M, N), x_dtype, generator=gen)
        w, b = make_params((N,), param_dtype, True, True, generator=gen)
        kw = {"zero_centered_weight": zero_centered}
        label = f"[{isa} {x_dtype}/{param_dtype} zero_centered={zero_centered} N={N}]"
        with num_threads(1):
            for fn, ref, args in (
                (layernorm_ext.layer_norm, layer_norm_ref, (w, b)),
                (layernorm_ext.rms_norm, rms_norm_ref, (w,)),
            ):
                full = fn(x, N, *args, **kw)
                assert_close_to_ref(full, ref(x, N, *args, **kw), atol, rtol, f"{label} {fn}")
                for m in (1, 2, 3, 15, 16, 17):
                    assert_bitwise_equal(fn(x[:m], N, *args, **kw), full[:m], f"{label} {m} rows")
                    s = slice(M - m, M)
                    assert_bitwise_equal(fn(x[s], N, *args, **kw), full[s], f"{label} last {m}")


def _assert_bwd_rows_match(s, label, dy, x, w, b, stats, dx, dx_rms):
    """dx of rows s, computed on their own, is bitwise dx[s] / dx_rms[s] of the whole batch."""
    ext = torch.ops.layernorm_ext
    mean, rstd, rstd_rms = stats
    N = x.shape[-1]
    one = ext.layer_norm_bwd(dy[s], x[s], [N], mean[s], rstd[s], w, b, False, [True, False, False])
    assert_bitwise_equal(one[0], dx[s], f"{label} layer_norm")
    one = ext.rms_norm_bwd(dy[s], x[s], [N], rstd_rms[s], w, False, [True, False])
    assert_bitwise_equal(one[0], dx_rms[s], f"{label} rms_norm")


@pytest.mark.parametrize("case", DTYPE_CASES, ids=DTYPE_IDS)
def test_backward_row_independence(isa, case, gen):
    """dx of a row does not depend on the rows processed with it: short rows go four at a time,
    rows larger than L1 two at a time, the rest one by one (csrc/cpu/norm_krnl.cpp)."""
    ext = torch.ops.layernorm_ext
    for N in (64, 769, 4100):
        M = 7
        x = make_input((M, N), case.x, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        label = f"[{isa} {case.id} N={N}]"
        _, mean, rstd = ext.layer_norm_fwd(x, [N], w, b)
        dx = ext.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, False, [True, True, True])[0]
        _, rstd_rms = ext.rms_norm_fwd(x, [N], w)
        dx_rms = ext.rms_norm_bwd(dy, x, [N], rstd_rms, w, False, [True, True])[0]
        stats = (mean, rstd, rstd_rms)
        for i in (0, 3, 6):
            _assert_bwd_rows_match(
                slice(i, i + 1), f"{label} row {i}", dy, x, w, b, stats, dx, dx_rms
            )
        for m in (2, 5):
            got = ext.layer_norm_bwd(
                dy[:m], x[:m], [N], mean[:m], rstd[:m], w, b, False, [True, False, False]
            )[0]
            assert_bitwise_equal(got, dx[:m], f"{label} layer_norm prefix {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_inputs_match_small_batches(isa, dtype, gen):
    """Inputs well beyond L2 take other loop orders: the forward prefetches the next rows (and
    RMSNorm runs its short rows one by one), the backward runs its short rows one by one instead
    of four at a time (norm_cpu.cpp). y and dx of every row are still bitwise those of a small
    batch, and dγ / dβ match a float64 reference."""
    ext = torch.ops.layernorm_ext
    N, M = 128, 65536  # x and dy of 16-32 MiB each: far beyond any L2 this runs on
    x = torch.randn(M, N, generator=gen).to(dtype)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    w = torch.randn(N, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    _, mean, rstd = ext.layer_norm_fwd(x, [N], w, b)
    dx, dw, db = ext.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, False, [True, True, True])
    _, rstd_rms = ext.rms_norm_fwd(x, [N], w)
    dx_rms, dw_rms = ext.rms_norm_bwd(dy, x, [N], rstd_rms, w, False, [True, True])
    y, y_rms = ext.layer_norm(x, [N], w, b), ext.rms_norm(x, [N], w)
    N2, M2 = 512, 16384  # RMSNorm rows of 1 KiB or more (bf16) go one by one
    x2 = torch.randn(M2, N2, generator=gen).to(dtype)
    w2 = torch.randn(N2, generator=gen).to(dtype)
    y2 = ext.rms_norm(x2, [N2], w2)
    for start in (0, 4, 10001, M2 - 8):
        s = slice(start, start + 8)
        assert_bitwise_equal(ext.layer_norm(x[s], [N], w, b), y[s], f"[{isa}] layer_norm fwd")
        assert_bitwise_equal(ext.rms_norm(x[s], [N], w), y_rms[s], f"[{isa}] rms_norm fwd")
        assert_bitwise_equal(ext.rms_norm(x2[s], [N2], w2), y2[s], f"[{isa}] rms_norm fwd N=512")
    stats = (mean, rstd, rstd_rms)
    for start in (0, 4, 30001, M - 8):
        s = slice(start, start + 8)
        _assert_bwd_rows_match(s, f"[{isa}] rows {start}..", dy, x, w, b, stats, dx, dx_rms)
    # parameter gradients against float64, from the saved statistics
    x64, dy64 = x.double(), dy.double()
    xhat = (x64 - mean.double().reshape(M, 1)) * rstd.double().reshape(M, 1)
    xhat_rms = x64 * rstd_rms.double().reshape(M, 1)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-1}
    torch.testing.assert_close(dw.double(), (dy64 * xhat).sum(0), **tol)
    torch.testing.assert_close(db.double(), dy64.sum(0), **tol)
    torch.testing.assert_close(dw_rms.double(), (dy64 * xhat_rms).sum(0), **tol)


@pytest.mark.parametrize(
    ("dtype", "N"),
    [(torch.float32, 2048), (torch.float32, 4096), (torch.bfloat16, 4096), (torch.float16, 4096)],
    ids=["fp32-2048", "fp32-4096", "bf16-4096", "fp16-4096"],
)
def test_large_inputs_with_long_rows_match_small_batches(isa, dtype, N, gen):
    """Long rows from beyond L2 may fetch the next rows into L2 during the apply pass (whole rows
    at N = 2048 fp32, row groups applied tile by tile at N = 4096; norm_cpu.cpp,
    use_long_row_prefetch), the fused add also the next residual rows. Only where memory is
    touched changes: y and residual_out of every row are bitwise those of a small batch, and y
    matches a float64 reference."""
    ext = torch.ops.layernorm_ext
    M = (32 << 20) // (N * dtype.itemsize) + 3  # 32 MiB of x and a partial last group
    x = torch.randn(M, N, generator=gen).to(dtype)
    r = torch.randn(M, N, generator=gen).to(dtype)
    w = torch.randn(N, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    y, y_rms = ext.layer_norm(x, [N], w, b), ext.rms_norm(x, [N], w)
    y_add, s_add = ext.add_layer_norm(x, r, [N], w, b)
    for start in (0, 5, M // 2 + 1, M - 9):
        s = slice(start, start + 9)
        label = f"[{isa} N={N}] rows {start}.."
        assert_bitwise_equal(ext.layer_norm(x[s], [N], w, b), y[s], f"{label} layer_norm")
        assert_bitwise_equal(ext.rms_norm(x[s], [N], w), y_rms[s], f"{label} rms_norm")
        got, got_s = ext.add_layer_norm(x[s], r[s], [N], w, b)
        assert_bitwise_equal(got, y_add[s], f"{label} add_layer_norm")
        assert_bitwise_equal(got_s, s_add[s], f"{label} add_layer_norm residual_out")
    rows = slice(M - 9, M)
    ref = torch.nn.functional.layer_norm(x[rows].double(), [N], w.double(), b.double())
    atol, rtol = fwd_tol(dtype)
    torch.testing.assert_close(y[rows].double(), ref, atol=atol, rtol=rtol)
