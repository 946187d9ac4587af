"""layernorm_ext vs torch.nn.functional vs a plain copy, over a rows × hidden × dtype grid.

Forward (default): ours ``layernorm_ext.layer_norm`` / ``rms_norm`` and torch's
``F.layer_norm`` / ``F.rms_norm``, both allocating their output, plus ``y.copy_(x)`` into a
preallocated ``y`` (the bandwidth floor). ``--prealloc`` also times ours with ``out=`` into a
preallocated output: fresh CPU outputs above glibc's mmap threshold page-fault on every call
(kernels.md §2.6), so the out= column is the one that shows kernel efficiency against copy.

Backward (``--backward``): dx, dγ (and dβ) from saved statistics. layer_norm: ours
``torch.ops.layernorm_ext.layer_norm_bwd`` vs ``torch.ops.aten.native_layer_norm_backward``, each
with the mean / rstd its own forward saved. rms_norm: ours ``rms_norm_bwd`` vs the autograd graph
of ``F.rms_norm`` (``torch.autograd.grad``, so torch's figure includes the engine's overhead).

Columns: times are medians in µs; GB/s counts the bytes defined in ``common.norm_bytes``;
``speedup`` = torch time / ours time (> 1: ours is faster); ``BW/copy`` = ours GB/s / copy GB/s
(1.0: ours moves its bytes as fast as a copy).

Examples::

    python benchmarks/bench_norm.py --quick
    python benchmarks/bench_norm.py --dtypes bf16 --rows 2048 --hidden 4096 --prealloc
    python benchmarks/bench_norm.py --op rms_norm --backward --threads 1
    python benchmarks/bench_norm.py --isa avx2 --quick
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    DTYPES,
    Column,
    RunClock,
    TablePrinter,
    busiest,
    copy_bytes,
    describe_machine,
    dtype_name,
    gbps,
    measure,
    median,
    norm_bytes,
    parse_dtypes,
    save_table,
)

import layernorm_ext

DEFAULT_ROWS = (1, 8, 512, 2048, 16384)
DEFAULT_HIDDEN = (50, 128, 768, 1024, 4096, 8192)
DEFAULT_DTYPES = ("fp32", "bf16", "fp16")
QUICK_ROWS = (1, 512, 4096)
QUICK_HIDDEN = (128, 1024, 4096)

FORWARD_KINDS = ("torch", "ours", "ours_out", "copy")
BACKWARD_KINDS = ("torch_bwd", "ours_bwd")

# Activation size from which a cell counts as "big": its calls take milliseconds, so a shorter
# minimum run time still gives enough samples (measure() always takes at least four).
BIG_CELL_BYTES = 32 << 20


@dataclass(frozen=True)
class Config:
    """What to measure and how long to spend on each measurement."""

    op: str = "layer_norm"
    device: str = "cpu"
    threads: int = 1
    param_dtype: str = "same"  # "same" as the input, or "fp32" (mixed, for fp16 / bf16 input)
    eps: float = 1e-5
    min_run_time: float = 0.2
    max_run_time: float = 1.0
    seed: int = 0
    idle_wait: float = 0.0  # > 0: wait for other processes to go quiet (see common.measure)
    # The implementations of a cell are measured in turn, `rounds` times over, each for 1/rounds
    # of the run time, and each reports its median over the rounds. A shared VM drifts between
    # speed phases lasting seconds (the same cell measured 88 and 563 µs in two runs); measured
    # one after the other, whichever implementation ran during a slow phase lost. In turn, a
    # phase hits all of them alike and the ratios hold.
    rounds: int = 3

    def run_times(self, act_bytes: int) -> tuple[float, float]:
        """(min, max) run time of one round for a cell whose activation has ``act_bytes`` bytes."""
        scale = max(1, self.rounds) * (4 if act_bytes >= BIG_CELL_BYTES else 1)
        return self.min_run_time / scale, self.max_run_time / scale

    @property
    def min_samples(self) -> int:
        """Samples per round (at least four over all rounds)."""
        return max(2, -(-4 // max(1, self.rounds)))


def measure_in_turn(
    stmts: dict[str, tuple[str, dict[str, Any]]],
    cfg: Config,
    act_bytes: int,
    *,
    threads: int,
    busy: list[float | None] | None,
    fresh_y: Sequence[str] = (),
) -> dict[str, float]:
    """Median seconds per call of each ``kind: (stmt, env)``, measured in turn for cfg.rounds.

    Kinds in ``fresh_y`` get a new output tensor ``y`` (like ``x``) in their env for each round.
    """
    lo, hi = cfg.run_times(act_bytes)
    samples: dict[str, list[float]] = {kind: [] for kind in stmts}
    for _ in range(max(1, cfg.rounds)):
        for kind, (stmt, env) in stmts.items():
            if kind in fresh_y:
                env["y"] = torch.empty_like(env["x"])
            samples[kind].append(
                measure(
                    stmt,
                    env,
                    threads=threads,
                    min_run_time=lo,
                    max_run_time=hi,
                    min_samples=cfg.min_samples,
                    idle_wait=cfg.idle_wait,
                    busy=busy,
                )
            )
            if kind in fresh_y:
                del env["y"]
    return {kind: median(ts) for kind, ts in samples.items()}


@dataclass
class Inputs:
    """One grid cell's tensors: x [rows, hidden], γ and β [hidden] (β is None for rms_norm)."""

    rows: int
    hidden: int
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.hidden,)


def make_inputs(rows: int, hidden: int, dtype: torch.dtype, cfg: Config) -> Inputs:
    """Random normal x and γ/β, seeded by the cell so reruns see the same data."""
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1_000_003 * rows + hidden)
    pdtype = torch.float32 if cfg.param_dtype == "fp32" else dtype
    x = torch.randn(rows, hidden, generator=g, device=cfg.device, dtype=dtype)
    w = torch.randn(hidden, generator=g, device=cfg.device, dtype=pdtype)
    b = torch.randn(hidden, generator=g, device=cfg.device, dtype=pdtype)
    return Inputs(rows, hidden, x, w, b if cfg.op == "layer_norm" else None)


def _norm_args(inp: Inputs, cfg: Config) -> dict[str, Any]:
    return {
        "x": inp.x,
        "shape": inp.shape,
        "w": inp.weight,
        "b": inp.bias,
        "eps": cfg.eps,
        "ours": layernorm_ext.layer_norm if cfg.op == "layer_norm" else layernorm_ext.rms_norm,
        "ref": F.layer_norm if cfg.op == "layer_norm" else F.rms_norm,
    }


def time_forward(
    inp: Inputs,
    cfg: Config,
    *,
    threads: int,
    kinds: Sequence[str] = FORWARD_KINDS,
    busy: list[float | None] | None = None,
) -> dict[str, float]:
    """Median seconds per forward call for each of ``kinds`` (a subset of FORWARD_KINDS).

    ``busy`` collects the other-process load during each measurement (see common.measure).
    """
    env = _norm_args(inp, cfg)
    args = "x, shape, w, b, eps" if cfg.op == "layer_norm" else "x, shape, w, eps"
    stmts = {
        "torch": f"ref({args})",
        "ours": f"ours({args})",
        "ours_out": f"ours({args}, out=y)",
        "copy": "y.copy_(x)",
    }
    return measure_in_turn(
        {kind: (stmts[kind], env) for kind in kinds},
        cfg,
        inp.x.numel() * inp.x.element_size(),
        threads=threads,
        busy=busy,
        fresh_y=("ours_out", "copy"),
    )


def time_backward(
    inp: Inputs,
    cfg: Config,
    *,
    threads: int,
    kinds: Sequence[str] = BACKWARD_KINDS,
    busy: list[float | None] | None = None,
) -> dict[str, float]:
    """Median seconds per backward call (dx, dγ and, for layer_norm, dβ) for each of ``kinds``.

    Each implementation gets the statistics its own forward saves (ATen keeps bf16 mean/rstd
    for bf16 input with bf16 γ; ours keeps fp32).
    """
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 7)
    dy = torch.randn(inp.x.shape, generator=g, device=cfg.device, dtype=inp.x.dtype)
    x, shape, w, b, eps = inp.x, list(inp.shape), inp.weight, inp.bias, cfg.eps
    ext = torch.ops.layernorm_ext
    stmts: dict[str, tuple[str, dict[str, Any]]] = {}
    for kind in kinds:
        if cfg.op == "layer_norm" and kind == "ours_bwd":
            _, mean, rstd = ext.layer_norm_fwd(x, shape, w, b, eps)
            env = dict(f=ext.layer_norm_bwd, dy=dy, x=x, s=shape, m=mean, r=rstd, w=w, b=b)
            stmt = "f(dy, x, s, m, r, w, b, False, [True, True, True])"
        elif cfg.op == "layer_norm":
            _, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, w, b, eps)
            f = torch.ops.aten.native_layer_norm_backward
            env = dict(f=f, dy=dy, x=x, s=shape, m=mean, r=rstd, w=w, b=b)
            stmt = "f(dy, x, s, m, r, w, b, [True, True, True])"
        elif kind == "ours_bwd":
            _, rstd = ext.rms_norm_fwd(x, shape, w, eps)
            env = dict(f=ext.rms_norm_bwd, dy=dy, x=x, s=shape, r=rstd, w=w)
            stmt = "f(dy, x, s, r, w, False, [True, True])"
        else:
            xg = x.detach().requires_grad_()
            wg = w.detach().requires_grad_()
            with torch.enable_grad():
                y = F.rms_norm(xg, shape, wg, eps)
            env = dict(grad=torch.autograd.grad, y=y, inputs=(xg, wg), dy=dy)
            stmt = "grad(y, inputs, dy, retain_graph=True)"
        stmts[kind] = (stmt, env)
    return measure_in_turn(stmts, cfg, x.numel() * x.element_size(), threads=threads, busy=busy)


def derive(row: dict[str, Any], cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    """Adds µs, GB/s, speedup and BW/copy columns computed from the raw seconds in ``row``."""
    rows, hidden = row["rows"], row["hidden"]
    pdtype = torch.float32 if cfg.param_dtype == "fp32" else dtype
    fwd_b = norm_bytes(rows, hidden, dtype, param_dtype=pdtype, op=cfg.op)
    bwd_b = norm_bytes(rows, hidden, dtype, param_dtype=pdtype, op=cfg.op, backward=True)
    nbytes = {
        "torch": fwd_b,
        "ours": fwd_b,
        "ours_out": fwd_b,
        "copy": copy_bytes(rows, hidden, dtype),
        "torch_bwd": bwd_b,
        "ours_bwd": bwd_b,
    }
    for kind, nb in nbytes.items():
        s = row.pop(f"{kind}_s", None)
        if s is not None:
            row[f"{kind}_us"] = s * 1e6
            row[f"{kind}_gbps"] = gbps(nb, s)
    row["x_bytes"] = rows * hidden * torch.empty((), dtype=dtype).element_size()
    row["fwd_bytes"], row["bwd_bytes"] = fwd_b, bwd_b

    def ratio(a: str, b: str) -> float | None:
        return row[a] / row[b] if a in row and b in row else None

    row["speedup"] = ratio("torch_us", "ours_us")
    row["bwd_speedup"] = ratio("torch_bwd_us", "ours_bwd_us")
    row["ours_vs_copy"] = ratio("ours_gbps", "copy_gbps")
    row["out_vs_copy"] = ratio("ours_out_gbps", "copy_gbps")
    row["bwd_vs_copy"] = ratio("ours_bwd_gbps", "copy_gbps")
    return row


def run_cell(
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    cfg: Config,
    *,
    forward: Sequence[str] = FORWARD_KINDS,
    backward: Sequence[str] = (),
) -> dict[str, Any]:
    """Measures one cell and returns its result row; the cell's tensors are freed on return."""
    inp = make_inputs(rows, hidden, dtype, cfg)
    row: dict[str, Any] = {
        "op": cfg.op,
        "device": cfg.device,
        "rows": rows,
        "hidden": hidden,
        "dtype": dtype_name(dtype),
        "param_dtype": dtype_name(inp.weight.dtype),
        "threads": cfg.threads if cfg.device == "cpu" else None,
        "isa": layernorm_ext.cpu_capability() if cfg.device == "cpu" else None,
    }
    busy: list[float | None] = []
    try:
        times = {}
        if forward:
            times.update(time_forward(inp, cfg, threads=cfg.threads, kinds=forward, busy=busy))
        if backward:
            times.update(time_backward(inp, cfg, threads=cfg.threads, kinds=backward, busy=busy))
        row.update({f"{k}_s": s for k, s in times.items()})
        row["other_load"] = busiest(busy)
    finally:
        del inp
        gc.collect()
    return derive(row, cfg, dtype)


def grid(
    rows: Sequence[int], hidden: Sequence[int], dtypes: Sequence[torch.dtype]
) -> list[tuple[int, int, torch.dtype]]:
    """The cells in table order: dtype, then rows, then hidden."""
    return [(r, h, d) for d in dtypes for r in rows for h in hidden]


# The most of the CPUs other processes used during any of the cell's measurements.
LOAD_COLUMN = Column("other_load", "busy", ".0%")


def forward_columns(prealloc: bool) -> list[Column]:
    """Table columns of a forward run."""
    cols = [
        Column("rows", "rows"),
        Column("hidden", "hidden"),
        Column("dtype", "dtype"),
        Column("torch_us", "F µs", ".1f"),
        Column("ours_us", "ours µs", ".1f"),
    ]
    if prealloc:
        cols.append(Column("ours_out_us", "out= µs", ".1f"))
    cols += [
        Column("copy_us", "copy µs", ".1f"),
        Column("torch_gbps", "F GB/s", ".1f"),
        Column("ours_gbps", "ours GB/s", ".1f"),
    ]
    if prealloc:
        cols.append(Column("ours_out_gbps", "out= GB/s", ".1f"))
    cols += [
        Column("copy_gbps", "copy GB/s", ".1f"),
        Column("speedup", "speedup", ".2f"),
        Column("out_vs_copy" if prealloc else "ours_vs_copy", "BW/copy", ".2f"),
        LOAD_COLUMN,
    ]
    return cols


def backward_columns() -> list[Column]:
    """Table columns of a backward run."""
    return [
        Column("rows", "rows"),
        Column("hidden", "hidden"),
        Column("dtype", "dtype"),
        Column("torch_bwd_us", "torch µs", ".1f"),
        Column("ours_bwd_us", "ours µs", ".1f"),
        Column("copy_us", "copy µs", ".1f"),
        Column("torch_bwd_gbps", "torch GB/s", ".1f"),
        Column("ours_bwd_gbps", "ours GB/s", ".1f"),
        Column("copy_gbps", "copy GB/s", ".1f"),
        Column("bwd_speedup", "speedup", ".2f"),
        Column("bwd_vs_copy", "BW/copy", ".2f"),
        LOAD_COLUMN,
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--op", choices=("layer_norm", "rms_norm"), default="layer_norm")
    p.add_argument("--rows", type=int, nargs="+", help=f"default {list(DEFAULT_ROWS)}")
    p.add_argument("--hidden", type=int, nargs="+", help=f"default {list(DEFAULT_HIDDEN)}")
    p.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), help=f"default {list(DEFAULT_DTYPES)}"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default torch.get_num_threads())")
    p.add_argument("--backward", action="store_true", help="time the backward pass")
    p.add_argument(
        "--prealloc", action="store_true", help="also time ours with out= into a warm output"
    )
    p.add_argument(
        "--isa",
        choices=layernorm_ext.available_cpu_capabilities(),
        help="force a CPU kernel set (default: the best this CPU runs)",
    )
    p.add_argument(
        "--param-dtype",
        choices=("same", "fp32"),
        default="same",
        help="γ/β dtype: the input's, or fp32 (mixed) for fp16/bf16 input",
    )
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--quick", action="store_true", help="a small grid and short runs")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--max-run-time", type=float, default=1.0, help="cap unless a call is slow")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="shared machines: wait up to S s for other processes to go quiet before each "
        "measurement, and repeat one they disturbed (3 tries in all)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; write no result files")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not (
        torch.cuda.is_available() and layernorm_ext.has_cuda_kernels()
    ):
        print("--device cuda needs a CUDA device and a build with CUDA kernels", file=sys.stderr)
        return 2
    if args.isa:
        layernorm_ext.set_cpu_capability(args.isa)
    threads = args.threads or torch.get_num_threads()
    cfg = Config(
        op=args.op,
        device=args.device,
        threads=threads,
        param_dtype=args.param_dtype,
        eps=args.eps,
        min_run_time=args.min_run_time,
        max_run_time=args.max_run_time,
        idle_wait=args.idle_wait,
    )
    if args.quick:
        cfg = replace(cfg, min_run_time=min(cfg.min_run_time, 0.05), max_run_time=0.3)
    rows = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    hidden = args.hidden or (QUICK_HIDDEN if args.quick else DEFAULT_HIDDEN)
    dtypes = parse_dtypes(args.dtypes or DEFAULT_DTYPES)

    if args.backward:
        fwd_kinds: tuple[str, ...] = ("copy",)
        bwd_kinds = BACKWARD_KINDS
        cols = backward_columns()
    else:
        fwd_kinds = ("torch", "ours", "copy") + (("ours_out",) if args.prealloc else ())
        bwd_kinds = ()
        cols = forward_columns(args.prealloc)

    machine = describe_machine(args.device, threads if args.device == "cpu" else None)
    direction = "backward" if args.backward else "forward"
    title = f"{args.op} {direction}: layernorm_ext vs torch" + (
        " (ours out= preallocated)" if args.prealloc else ""
    )
    print(title)
    print("\n".join(f"  {line}" for line in machine.lines()))
    printer = TablePrinter(cols, widths={"dtype": 5, "rows": 6, "hidden": 6})
    clock = RunClock()
    printer.header()
    results = []
    for r, h, d in grid(rows, hidden, dtypes):
        row = run_cell(r, h, d, cfg, forward=fwd_kinds, backward=bwd_kinds)
        printer.row(row)
        results.append(row)

    note = clock.note((r["other_load"] for r in results), "cells")
    print(note)
    if not args.no_save:
        stem = f"bench_norm_{args.op}_{'bwd' if args.backward else 'fwd'}"
        stem += "_prealloc" if args.prealloc else ""
        if args.isa:
            stem += f"_{args.isa}"
        save_table(stem, machine, title, results, cols, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
