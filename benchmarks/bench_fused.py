"""Fused residual add + norm (the pre-norm transformer step) against the unfused sequence.

For each (rows, hidden, dtype) cell and each norm (LayerNorm, RMSNorm), times side by side:

* ``torch``: ``s = x + r`` then ``torch.nn.functional.layer_norm / rms_norm(s)`` (what a model
  does without us: two passes over memory, two allocations);
* ``fused``: ``layernorm_ext.add_layer_norm / add_rms_norm(x, r, ...)`` returning
  ``(out, residual_out)`` (one pass, two allocations);
* ``inplace``: the inference form, ``add_*_norm(x, r, ..., inplace=True, out=y)``: the
  residual updated in place and the output written into a preallocated buffer (no allocation);
* ``copy``: ``y.copy_(x); r2.copy_(r)``: the same bytes read and written, the bandwidth floor.

The issue's target: ``torch / fused`` >= 1.5x for both norms on CPU (median over the grid).

Examples::

    python benchmarks/bench_fused.py
    python benchmarks/bench_fused.py --rows 512 --hidden 4096 --dtypes bf16
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_norm import Config, measure_in_turn
from common import (
    Column,
    RunClock,
    TablePrinter,
    describe_machine,
    dtype_name,
    median,
    parse_dtypes,
    save_table,
)

import layernorm_ext

DEFAULT_ROWS = (8, 512, 2048, 16384)
DEFAULT_HIDDEN = (768, 1024, 4096)
TARGET = 1.5

COLUMNS = [
    Column("norm", "norm", left=True),
    Column("rows", "rows", "d"),
    Column("hidden", "hidden", "d"),
    Column("dtype", "dtype", left=True),
    Column("torch_us", "x+r, F µs", ".1f"),
    Column("fused_us", "fused µs", ".1f"),
    Column("inplace_us", "in-place µs", ".1f"),
    Column("copy_us", "copy µs", ".1f"),
    Column("speedup", "torch/fused", ".2f"),
    Column("speedup_inplace", "torch/in-place", ".2f"),
    Column("copy_ratio", "copy/in-place", ".2f"),
    Column("busy", "busy", ".0%"),
]


def statements(norm: str) -> dict[str, str]:
    """The timed statements for one norm (evaluated in the environment of :func:`cell_env`)."""
    if norm == "layer_norm":
        return {
            "torch": "F.layer_norm(x + r, shape, w, b, 1e-5)",
            "fused": "L.add_layer_norm(x, r, shape, w, b, 1e-5)",
            "inplace": "L.add_layer_norm(x, r, shape, w, b, 1e-5, inplace=True, out=y)",
        }
    return {
        "torch": "F.rms_norm(x + r, shape, w, 1e-6)",
        "fused": "L.add_rms_norm(x, r, shape, w, 1e-6)",
        "inplace": "L.add_rms_norm(x, r, shape, w, 1e-6, inplace=True, out=y)",
    }


def cell_env(rows: int, hidden: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    # Small values: the in-place form keeps adding x into r; it must stay finite for any count.
    x = (1e-3 * torch.randn(rows, hidden, generator=g)).to(dtype)
    r = torch.randn(rows, hidden, generator=g).to(dtype)
    return {
        "F": F,
        "L": layernorm_ext,
        "x": x,
        "r": r,
        "w": torch.randn(hidden, generator=g).to(dtype),
        "b": torch.randn(hidden, generator=g).to(dtype),
        "y": torch.empty_like(x),
        "r2": torch.empty_like(r),
        "shape": (hidden,),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--norms", nargs="+", default=["layer_norm", "rms_norm"])
    ap.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS))
    ap.add_argument("--hidden", type=int, nargs="+", default=list(DEFAULT_HIDDEN))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--max-run-time", type=float, default=1.0)
    ap.add_argument("--idle-wait", type=float, default=0.0, metavar="S")
    ap.add_argument("--no-save", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtypes = parse_dtypes(args.dtypes)
    machine = describe_machine("cpu", args.threads)
    printer = TablePrinter(COLUMNS, widths={"norm": 10})
    clock = RunClock()
    busy: list[float | None] = []
    rows_out = []
    # Timing as in bench_norm: the implementations of a cell in turn, over several rounds.
    cfg = Config(
        threads=args.threads,
        min_run_time=args.min_run_time,
        max_run_time=args.max_run_time,
        idle_wait=args.idle_wait,
    )
    printer.header()
    for norm in args.norms:
        stmts = statements(norm)
        for dtype in dtypes:
            for rows in args.rows:
                for hidden in args.hidden:
                    env = cell_env(rows, hidden, dtype)
                    cell_busy: list[float | None] = []
                    kinds = {**stmts, "copy": "y.copy_(x); r2.copy_(r)"}
                    timing = measure_in_turn(
                        {name: (stmt, env) for name, stmt in kinds.items()},
                        cfg,
                        env["x"].numel() * env["x"].element_size(),
                        threads=args.threads,
                        busy=cell_busy,
                    )
                    busy += cell_busy
                    row = {
                        "norm": norm,
                        "rows": rows,
                        "hidden": hidden,
                        "dtype": dtype_name(dtype),
                        **{f"{k}_us": v * 1e6 for k, v in timing.items()},
                        "speedup": timing["torch"] / timing["fused"],
                        "speedup_inplace": timing["torch"] / timing["inplace"],
                        "copy_ratio": timing["copy"] / timing["inplace"],
                        "busy": max((b for b in cell_busy if b is not None), default=None),
                    }
                    rows_out.append(row)
                    printer.row(row)
    print()
    summary = []
    for norm in args.norms:
        cells = [r for r in rows_out if r["norm"] == norm]
        med = median([r["speedup"] for r in cells])
        worst = min(cells, key=lambda r: r["speedup"])
        verdict = "PASS" if med >= TARGET else "FAIL"
        line = (
            f"{norm}: torch (x + r, then F) / fused median {med:.2f}x over {len(cells)} cells "
            f"(target >= {TARGET}x: {verdict}); worst {worst['speedup']:.2f}x at "
            f"{worst['rows']}x{worst['hidden']} {worst['dtype']}; in-place median "
            f"{median([r['speedup_inplace'] for r in cells]):.2f}x"
        )
        summary.append(line)
        print(line)
    note = "\n".join(
        [
            *summary,
            clock.note(busy),
            "Columns: torch = `x + r` then `torch.nn.functional.*_norm`; fused = "
            "`layernorm_ext.add_*_norm` returning (out, residual_out); in-place = the same with "
            "`out=` a preallocated buffer and `inplace=True` (residual updated in place); "
            "copy = `y.copy_(x); r2.copy_(r)`, the same bytes moved.",
        ]
    )
    if not args.no_save:
        save_table(
            "bench_fused",
            machine,
            "Fused residual add + norm vs x + r then torch.nn.functional",
            rows_out,
            COLUMNS,
            note,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
