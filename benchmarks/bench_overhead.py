"""Per-call latency at tiny shapes, where dispatch and autograd overhead is the whole cost.

For each shape, each API (functional ``layer_norm(x, ...)`` or an ``nn.Module`` call ``m(x)``)
and each grad condition, times ours (``layernorm_ext``) against torch (``torch.nn.functional`` /
``torch.nn.LayerNorm``). Grad conditions:

* ``none / grad``: nothing requires grad (grad mode on);
* ``params / grad``: γ and β require grad, x does not (an ``nn.Module`` in a model);
* ``all / grad``: x, γ and β require grad (training: the call records a backward node);
* ``params / no_grad``: as ``params`` under ``torch.no_grad()``;
* ``params / inference_mode``: as ``params`` under ``torch.inference_mode()``.

A third API, ``train``, times a training step of the module alone: ``m(x).backward(g)`` with x,
γ and β requiring grad (forward, graph node, backward op through the autograd engine, gradient
accumulation into ``.grad``), against the same step of the torch module.

Each row measures torch and ours alternately ``--rounds`` times and reports each one's median:
microsecond timings on a VM drift between measurements by more than the differences measured.

Examples::

    python benchmarks/bench_overhead.py
    python benchmarks/bench_overhead.py --op rms_norm --shapes 1x4096 --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    DTYPES,
    Column,
    RunClock,
    TablePrinter,
    busiest,
    describe_machine,
    dtype_name,
    measure,
    median,
    parse_dtypes,
    run_in_context,
    save_table,
)

import layernorm_ext

DEFAULT_SHAPES = ((1, 768), (8, 768), (1, 4096))
CONDITIONS = (
    ("none", "grad"),
    ("params", "grad"),
    ("all", "grad"),
    ("params", "no_grad"),
    ("params", "inference_mode"),
)


def time_call(
    impl: str,
    api: str,
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    requires_grad: str,
    context: str,
    *,
    op: str = "layer_norm",
    threads: int,
    min_run_time: float = 0.2,
    max_run_time: float = 1.0,
    idle_wait: float = 0.0,
    busy: list[float | None] | None = None,
) -> float:
    """Median seconds per forward call.

    Args:
        impl: ``"ours"`` or ``"torch"``.
        api: ``"functional"``, ``"module"`` or ``"train"`` (module forward + backward; needs
            grad mode and something requiring grad).
        requires_grad: ``"none"``, ``"params"`` (γ/β) or ``"all"`` (x, γ, β).
        context: ``"grad"``, ``"no_grad"`` or ``"inference_mode"``.
        op: ``"layer_norm"`` or ``"rms_norm"``.
        idle_wait, busy: see :func:`common.measure`.
    """
    if impl not in ("ours", "torch") or api not in ("functional", "module", "train"):
        raise ValueError(f"unknown impl/api {impl!r}/{api!r}")
    if requires_grad not in ("none", "params", "all"):
        raise ValueError(f"unknown requires_grad {requires_grad!r}")
    torch.manual_seed(0)
    if op == "layer_norm":
        cls = layernorm_ext.LayerNorm if impl == "ours" else torch.nn.LayerNorm
    else:
        cls = layernorm_ext.RMSNorm if impl == "ours" else torch.nn.RMSNorm
    m = cls(hidden, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    for p in m.parameters():
        p.requires_grad_(requires_grad != "none")
    x = torch.randn(rows, hidden, dtype=dtype, requires_grad=requires_grad == "all")

    env: dict[str, Any] = {"x": x, "m": m, "shape": (hidden,), "w": m.weight, "eps": m.eps}
    if api == "module":
        stmt = "m(x)"
    elif api == "train":
        env["g"] = torch.randn(rows, hidden, dtype=dtype)
        stmt = "m(x).backward(g)"
    elif op == "layer_norm":
        env["f"] = layernorm_ext.layer_norm if impl == "ours" else F.layer_norm
        env["b"] = m.bias
        stmt = "f(x, shape, w, b, eps)"
    else:
        env["f"] = layernorm_ext.rms_norm if impl == "ours" else F.rms_norm
        stmt = "f(x, shape, w, eps)"
    return run_in_context(
        context,
        lambda: measure(
            stmt,
            env,
            threads=threads,
            min_run_time=min_run_time,
            max_run_time=max_run_time,
            threshold=0.05,
            idle_wait=idle_wait,
            busy=busy,
        ),
    )


def time_pair(
    api: str,
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    requires_grad: str,
    context: str,
    *,
    rounds: int = 3,
    **kwargs: Any,
) -> dict[str, float]:
    """:func:`time_call` for torch and for ours: {"torch": s, "ours": s}.

    Microsecond timings on a VM drift between measurements by more than the differences being
    measured, so the two are measured alternately ``rounds`` times and each reports the median of
    its rounds.
    """
    times: dict[str, list[float]] = {"torch": [], "ours": []}
    for _ in range(rounds):
        for impl, ts in times.items():
            ts.append(time_call(impl, api, rows, hidden, dtype, requires_grad, context, **kwargs))
    return {impl: median(ts) for impl, ts in times.items()}


COLUMNS = [
    Column("shape", "shape"),
    Column("api", "api"),
    Column("requires_grad", "requires_grad"),
    Column("context", "context"),
    Column("torch_us", "torch µs", ".2f"),
    Column("ours_us", "ours µs", ".2f"),
    Column("delta_us", "ours-torch µs", "+.2f"),
    Column("speedup", "speedup", ".2f"),
    Column("other_load", "busy", ".0%"),
]


def parse_shape(s: str) -> tuple[int, int]:
    """``"8x768"`` -> (8, 768)."""
    try:
        r, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like ROWSxHIDDEN, got {s!r}") from None
    return r, h


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--op", choices=("layer_norm", "rms_norm"), default="layer_norm")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=list(DEFAULT_SHAPES))
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, help="CPU threads (default torch.get_num_threads())")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating torch/ours rounds per row")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="shared machines: wait up to S s for other processes to go quiet before each "
        "measurement, and repeat one they disturbed (3 tries in all)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; write no result files")
    args = p.parse_args(argv)
    (dtype,) = parse_dtypes([args.dtype])
    threads = args.threads or torch.get_num_threads()

    machine = describe_machine("cpu", threads)
    title = f"{args.op} per-call overhead ({dtype_name(dtype)}, CPU): layernorm_ext vs torch"
    print(title)
    print("\n".join(f"  {line}" for line in machine.lines()))
    printer = TablePrinter(COLUMNS, widths={"shape": 7, "api": 10, "context": 14})
    clock = RunClock()
    printer.header()
    results = []
    cases = [(api, rg, ctx) for api in ("functional", "module") for rg, ctx in CONDITIONS]
    cases += [("train", "params", "grad"), ("train", "all", "grad")]
    for rows, hidden in args.shapes:
        for api, rg, ctx in cases:
            busy: list[float | None] = []
            t = time_pair(
                api,
                rows,
                hidden,
                dtype,
                rg,
                ctx,
                op=args.op,
                threads=threads,
                min_run_time=args.min_run_time,
                rounds=args.rounds,
                idle_wait=args.idle_wait,
                busy=busy,
            )
            row = {
                "op": args.op,
                "shape": f"{rows}x{hidden}",
                "dtype": dtype_name(dtype),
                "api": api,
                "requires_grad": rg,
                "context": ctx,
                "threads": threads,
                "torch_us": t["torch"] * 1e6,
                "ours_us": t["ours"] * 1e6,
                "delta_us": (t["ours"] - t["torch"]) * 1e6,
                "speedup": t["torch"] / t["ours"],
                "other_load": busiest(busy),
            }
            printer.row(row)
            results.append(row)
    note = clock.note((r["other_load"] for r in results), "rows")
    print(note)
    if not args.no_save:
        stem = f"bench_overhead_{args.op}_{dtype_name(dtype)}"
        save_table(stem, machine, title, results, COLUMNS, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
