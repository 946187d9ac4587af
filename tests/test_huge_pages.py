"""Large outputs the CPU ops allocate themselves go on transparent huge pages (csrc/cpu/pages.cpp):
where the kernel's THP mode is "madvise" and enough 2 MiB blocks are free, every fresh output of
at least 4 MiB has its whole 2 MiB pages advised (MADV_HUGEPAGE, visible as the "hg" flag of its
mapping in /proc/self/smaps) and faulted in before the kernel writes it. Only paging changes:
every output must be bitwise what the same op writes into a caller's buffer.
LAYERNORM_EXT_CPU_HUGE_PAGES=off turns it off, and an unknown value is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from norm_testing import assert_bitwise_equal, check_result, fwd_tol

import layernorm_ext

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_BYTES = 4 << 20  # csrc/cpu/pages.cpp, kMinBytes
GLIBC_FRESH_BYTES = 32 << 20


def _thp_mode() -> str:
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unavailable"


def free_huge_blocks() -> int:
    """Free 2 MiB blocks over every zone, as pages.cpp counts them (/proc/buddyinfo, 4 KiB base
    pages: order 9 and up)."""
    try:
        lines = Path("/proc/buddyinfo").read_text().splitlines()
    except OSError:
        return 0
    counts = [[int(c) for c in line.split()[4:]] for line in lines]
    return sum(c << (k - 9) for zone in counts for k, c in enumerate(zone) if k >= 9)


ADVISING = (
    sys.platform.startswith("linux")
    and _thp_mode() == "madvise"
    and os.environ.get("LAYERNORM_EXT_CPU_HUGE_PAGES", "auto") != "off"
)
# The ops advise only while free huge blocks cover the buffer twice over (else a fault would wait
# for compaction): the tests below need a few dozen.
needs_advice = pytest.mark.skipif(
    not ADVISING or free_huge_blocks() < 64,
    reason="huge-page advice acts only on Linux with THP mode 'madvise' and free 2 MiB blocks",
)


def mapping_flags(t: torch.Tensor) -> set[str]:
    """The VmFlags of the mapping that holds the middle of t's data (/proc/self/smaps)."""
    addr = t.data_ptr() + t.numel() * t.element_size() // 2
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


def _inputs(rows: int, N: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(rows, N, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(rows, N, generator=g).to(dtype)
    w = torch.randn(N, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    return x, r, w, b


def _fresh_outputs(x, r, w, b):
    """Every kind of output the ops allocate: (name, fresh tensor, the same values written into
    caller-provided buffers)."""
    N = x.shape[-1]
    L = layernorm_ext
    y_out = L.layer_norm(x, N, w, b, out=torch.empty_like(x))
    rms_out = L.rms_norm(x, N, w, out=torch.empty_like(x))
    added, summed = L.add_layer_norm(x, r, N, w, b)
    inplace_res = r.clone()
    inplace_y, _ = L.add_layer_norm(x, inplace_res, N, w, b, inplace=True)
    y_of_sum = L.layer_norm(x + r, N, w, b, out=torch.empty_like(x))
    _, mean, rstd = torch.ops.layernorm_ext.layer_norm_fwd(x, [N], w, b)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)

    def dx(rows: slice) -> torch.Tensor:
        bwd = torch.ops.layernorm_ext.layer_norm_bwd
        return bwd(
            g[rows], x[rows], [N], mean[rows], rstd[rows], w, b, False, [True, False, False]
        )[0]

    # dx has no out= form: the reference is computed in blocks too small to be advised.
    step = 64
    dx_blocks = torch.cat([dx(slice(i, i + step)) for i in range(0, x.shape[0], step)])
    return [
        ("layer_norm", L.layer_norm(x, N, w, b), y_out),
        ("rms_norm", L.rms_norm(x, N, w), rms_out),
        ("add_layer_norm out", added, y_of_sum),
        ("add_layer_norm residual_out", summed, x + r),
        ("add_layer_norm inplace out", inplace_y, y_of_sum),
        ("layer_norm_bwd dx", dx(slice(None)), dx_blocks),
    ]


def check_fresh_outputs(dtype_name: str, N: int) -> None:
    """Every kind of fresh output is advised and bitwise the caller's-buffer result. Run in a
    fresh process (test below): there, outputs above 32 MiB (glibc's largest dynamic mmap
    threshold) are always fresh mappings. A long-lived process may serve them from freed heap
    memory that is already resident, which the ops rightly leave alone."""
    dtype = getattr(torch, dtype_name)
    rows = (GLIBC_FRESH_BYTES // (N * dtype.itemsize)) + 5
    x, r, w, b = _inputs(rows, N, dtype)
    for name, fresh, expected in _fresh_outputs(x, r, w, b):
        assert fresh.numel() * fresh.element_size() >= MIN_BYTES
        assert "hg" in mapping_flags(fresh), f"{name}: output not advised onto huge pages"
        assert_bitwise_equal(fresh, expected, f"[{name} {dtype}]")
    # And the values themselves, on sampled rows, against the float64 reference.
    rows_idx = torch.tensor([0, rows // 2, rows - 1])
    ref = torch.nn.functional.layer_norm(x[rows_idx].double(), (N,), w.double(), b.double())
    check_result(layernorm_ext.layer_norm(x, N, w, b)[rows_idx], ref, fwd_tol(dtype), "sampled")


@needs_advice
@pytest.mark.parametrize(("dtype", "N"), [("float32", 1024), ("bfloat16", 4096)])
def test_large_fresh_outputs_are_advised_and_bitwise_unchanged(dtype, N):
    proc = _run(f"{_IMPORT}\nT.check_fresh_outputs({dtype!r}, {N})", "auto")
    assert proc.returncode == 0, proc.stderr[-4000:]


@needs_advice
def test_small_outputs_and_caller_buffers_are_left_alone():
    """Below 4 MiB nothing is advised, and out= buffers are the caller's: never advised."""
    x, _, w, b = _inputs(255, 1024, torch.float32)  # ~1 MiB
    assert "hg" not in mapping_flags(layernorm_ext.layer_norm(x, 1024, w, b))
    big, _, w, b = _inputs(MIN_BYTES // 4096 * 3, 1024, torch.float32)
    out = torch.empty_like(big)
    layernorm_ext.layer_norm(big, 1024, w, b, out=out)
    assert "hg" not in mapping_flags(out)


def _run(code: str, value: str) -> subprocess.CompletedProcess:
    root = str(Path(layernorm_ext.__file__).resolve().parent.parent)
    env = {**os.environ, "LAYERNORM_EXT_CPU_HUGE_PAGES": value, "PYTHONPATH": root}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


# A child process: this directory on sys.path, this module as T.
_IMPORT = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n" + (
    "import torch, layernorm_ext as L, test_huge_pages as T"
)
_CHILD = f"""{_IMPORT}
x = torch.randn(4096, 1024)
print("hg" in T.mapping_flags(L.layer_norm(x, 1024)))
"""


@needs_advice
def test_environment_off_turns_it_off():
    on, off = _run(_CHILD, "auto"), _run(_CHILD, "off")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert (on.stdout.strip(), off.stdout.strip()) == ("True", "False")


def test_environment_error_is_clear():
    out = _run(_CHILD, "always")
    assert out.returncode != 0
    assert "LAYERNORM_EXT_CPU_HUGE_PAGES = 'always' is not a huge-page setting" in out.stderr
