"""CUDA LayerNorm: layernorm_ext vs ATen vs a device-to-device copy of the same bytes.

For every (dtype, hidden N, rows M) cell it times, with CUDA events (median of ``--reps``
individually timed calls after warm-up, L2 flushed before each call unless ``--no-flush``):

* fwd  ours ``layernorm_ext::layer_norm`` (y only) vs ``F.layer_norm`` (both allocate y);
* bwd  ours ``layernorm_ext::layer_norm_bwd`` vs ``aten::native_layer_norm_backward`` (dx, dγ,
  dβ from the statistics each forward saved);
* copy ``dst.copy_(src)`` moving the same number of bytes as the forward (x read + y written):
  the bandwidth a memory-bound kernel can reach on this GPU.

Bytes (for GB/s): forward x + y + γ + β; backward x + dy + dx + γ + dγ + dβ + mean + rstd.
``BW/copy`` = ours GB/s / copy GB/s; ``speedup`` = ATen time / ours time.

The summary checks the issue's targets: bf16 forward at N >= 1024 with >= 64M elements reaches
>= 0.90x copy bandwidth; the forward median speedup over F.layer_norm is >= 1.3x (>= 2x over
the cells with N <= 1024); the backward median speedup over ATen is >= 1.5x.

    python benchmarks/bench_cuda.py --out benchmarks/results/gpu-local
    python benchmarks/bench_cuda.py --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import layernorm_ext

HIDDEN = [64, 128, 256, 512, 768, 1024, 2048, 4096, 8192, 16384, 65536]
ROWS = [4096, 32768]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MAX_ELEMENTS = 2**28  # per tensor: keeps the largest cells at 512 MiB (bf16) / 1 GiB (fp32)
EPS = 1e-5


@dataclass
class Cell:
    """One measured configuration; times in microseconds (medians)."""

    dtype: str
    n: int
    m: int
    fwd_ours_us: float
    fwd_aten_us: float
    copy_us: float
    bwd_ours_us: float
    bwd_aten_us: float
    fwd_bytes: int
    bwd_bytes: int

    @property
    def elements(self) -> int:
        return self.m * self.n

    def gbps(self, nbytes: int, us: float) -> float:
        return nbytes / (us * 1e-6) / 1e9

    def derived(self) -> dict[str, float]:
        copy_gbps = self.gbps(self.fwd_bytes, self.copy_us)
        fwd_gbps = self.gbps(self.fwd_bytes, self.fwd_ours_us)
        bwd_gbps = self.gbps(self.bwd_bytes, self.bwd_ours_us)
        return {
            "fwd_gbps": fwd_gbps,
            "fwd_aten_gbps": self.gbps(self.fwd_bytes, self.fwd_aten_us),
            "copy_gbps": copy_gbps,
            "fwd_bw_over_copy": fwd_gbps / copy_gbps,
            "fwd_speedup": self.fwd_aten_us / self.fwd_ours_us,
            "bwd_gbps": bwd_gbps,
            "bwd_aten_gbps": self.gbps(self.bwd_bytes, self.bwd_aten_us),
            "bwd_bw_over_copy": bwd_gbps / copy_gbps,
            "bwd_speedup": self.bwd_aten_us / self.bwd_ours_us,
        }


class Flusher:
    """Evicts L2 between timed calls by writing a buffer larger than it."""

    def __init__(self, enabled: bool) -> None:
        self.buf = None
        if enabled:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
            self.buf = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def time_us(fn, flush: Flusher, reps: int, warmup: int = 3) -> float:
    """Median of `reps` individually event-timed calls of fn (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def measure(dtype_name: str, n: int, m: int, flush: Flusher, reps: int) -> Cell:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(n * 131 + m)
    x = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
    dy = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    copy_dst = torch.empty_like(x)
    ours_ln = torch.ops.layernorm_ext.layer_norm.default
    ours_fwd = torch.ops.layernorm_ext.layer_norm_fwd.default
    ours_bwd = torch.ops.layernorm_ext.layer_norm_bwd.default
    aten_fwd = torch.ops.aten.native_layer_norm.default
    aten_bwd = torch.ops.aten.native_layer_norm_backward.default

    with torch.no_grad():
        t_ours = time_us(lambda: ours_ln(x, [n], w, b, EPS), flush, reps)
        t_aten = time_us(lambda: F.layer_norm(x, (n,), w, b, EPS), flush, reps)
        t_copy = time_us(lambda: copy_dst.copy_(x), flush, reps)
        _, mean, rstd = ours_fwd(x, [n], w, b, EPS)
        _, a_mean, a_rstd = aten_fwd(x, [n], w, b, EPS)
        mask = [True, True, True]
        t_bwd = time_us(lambda: ours_bwd(dy, x, [n], mean, rstd, w, b, False, mask), flush, reps)
        t_abwd = time_us(lambda: aten_bwd(dy, x, [n], a_mean, a_rstd, w, b, mask), flush, reps)

    s = x.element_size()
    stats = 2 * m * 4
    fwd_bytes = 2 * m * n * s + 2 * n * s
    bwd_bytes = 3 * m * n * s + 4 * n * s + stats
    return Cell(dtype_name, n, m, t_ours, t_aten, t_copy, t_bwd, t_abwd, fwd_bytes, bwd_bytes)


def summarize(cells: list[Cell]) -> tuple[list[str], bool]:
    """The targets' verdict lines and whether all targets are met."""
    lines = []
    ok = True

    def verdict(name: str, value: float | None, target: float, detail: str) -> None:
        nonlocal ok
        if value is None:
            lines.append(f"| {name} | n/a | >= {target:g} | no cell qualifies ({detail}) |")
            return
        passed = value >= target
        ok = ok and passed
        mark = "PASS" if passed else "FAIL"
        lines.append(f"| {name} | {value:.3f} | >= {target:g} | {mark} ({detail}) |")

    big = [c for c in cells if c.dtype == "bf16" and c.n >= 1024 and c.elements >= 64 * 2**20]
    worst = min((c.derived()["fwd_bw_over_copy"] for c in big), default=None)
    verdict("bf16 fwd BW/copy, N>=1024, >=64M elem (min)", worst, 0.90, f"{len(big)} cells")
    fwd = [c.derived()["fwd_speedup"] for c in cells]
    verdict(
        "fwd speedup vs F.layer_norm (median)",
        statistics.median(fwd) if fwd else None,
        1.3,
        f"{len(fwd)} cells",
    )
    small = [c.derived()["fwd_speedup"] for c in cells if c.n <= 1024]
    verdict(
        "fwd speedup vs F.layer_norm, N<=1024 (median)",
        statistics.median(small) if small else None,
        2.0,
        f"{len(small)} cells",
    )
    bwd = [c.derived()["bwd_speedup"] for c in cells]
    verdict(
        "bwd speedup vs ATen (median)",
        statistics.median(bwd) if bwd else None,
        1.5,
        f"{len(bwd)} cells",
    )
    return lines, ok


def table(cells: list[Cell]) -> list[str]:
    head = (
        "| dtype | N | M | fwd µs | F.ln µs | copy µs | fwd GB/s | BW/copy | fwd x | "
        "bwd µs | ATen bwd µs | bwd GB/s | bwd x |"
    )
    out = [head, "|" + "---|" * 13]
    for c in cells:
        d = c.derived()
        out.append(
            f"| {c.dtype} | {c.n} | {c.m} | {c.fwd_ours_us:.1f} | {c.fwd_aten_us:.1f} | "
            f"{c.copy_us:.1f} | {d['fwd_gbps']:.0f} | {d['fwd_bw_over_copy']:.2f} | "
            f"{d['fwd_speedup']:.2f} | {c.bwd_ours_us:.1f} | {c.bwd_aten_us:.1f} | "
            f"{d['bwd_gbps']:.0f} | {d['bwd_speedup']:.2f} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for csv/json/md")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--hidden", nargs="+", type=int, default=HIDDEN)
    parser.add_argument("--rows", nargs="+", type=int, default=ROWS)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-flush", action="store_true", help="do not evict L2 between calls")
    parser.add_argument("--quick", action="store_true", help="a few cells, for a smoke run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda.py: no CUDA device available", file=sys.stderr)
        return 2
    if not layernorm_ext.has_cuda_kernels():
        print("bench_cuda.py: layernorm_ext was built without CUDA kernels", file=sys.stderr)
        return 2
    if args.quick:
        args.hidden, args.rows, args.reps = [256, 4096], [4096], 5

    flush = Flusher(not args.no_flush)
    cells = []
    for dtype_name in args.dtypes:
        for n in args.hidden:
            for m in args.rows:
                if m * n > MAX_ELEMENTS:
                    continue
                cells.append(measure(dtype_name, n, m, flush, args.reps))
                torch.cuda.empty_cache()

    props = torch.cuda.get_device_properties(0)
    header = [
        f"# CUDA LayerNorm benchmark: {props.name}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}",
        "",
        f"Median of {args.reps} CUDA-event-timed calls, L2 "
        f"{'not flushed' if args.no_flush else 'flushed'} before each; eps={EPS}, "
        "affine (γ, β in the input dtype).",
        "",
    ]
    verdicts, ok = summarize(cells)
    summary = ["| target | value | goal | verdict |", "|---|---|---|---|", *verdicts]
    report = [*header, *table(cells), "", "## Targets", "", *summary]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        rows = [{**asdict(c), **c.derived()} for c in cells]
        with open(args.out / "bench_cuda.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "bench_cuda.json").write_text(json.dumps(rows, indent=1))
        (args.out / "bench_cuda.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
