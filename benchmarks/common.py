"""Shared benchmark plumbing: timing, byte counts, machine description, result files.

Timing is ``torch.utils.benchmark.Timer.adaptive_autorange`` and we report the median. The Timer
synchronises the accelerator around each block, so the same code times CPU and CUDA.

Byte counts (for GB/s) are the bytes a kernel must move at minimum:

* forward: x read + y written + γ / β read;
* backward: x and dy read + dx written + γ read + dγ / dβ written + the saved per-row statistics
  (mean / rstd) read.

A copy baseline ``y.copy_(x)`` into a preallocated ``y`` moves x read + y written; it is the
bandwidth floor a normalization kernel can approach on the same machine.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Timer

import layernorm_ext

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name (``fp32``, ``bf16``, ...) of a dtype in :data:`DTYPES`."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def parse_dtypes(names: Iterable[str]) -> list[torch.dtype]:
    """Maps short names to dtypes, with a clear error for unknown names."""
    out = []
    for n in names:
        if n not in DTYPES:
            raise ValueError(f"unknown dtype {n!r}; choose from {sorted(DTYPES)}")
        out.append(DTYPES[n])
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


BUSY_THRESHOLD = 0.05  # other processes above this share of the CPUs make a measurement noise


def measure(
    stmt: str,
    env: Mapping[str, Any],
    *,
    threads: int,
    min_run_time: float = 0.2,
    max_run_time: float = 1.0,
    min_samples: int = 4,
    threshold: float = 0.1,
    idle_wait: float = 0.0,
    busy: list[float | None] | None = None,
) -> float:
    """Median seconds per execution of ``stmt`` (a Python statement evaluated in ``env``).

    One untimed call first (first-touch of outputs, lazy initialisation) also estimates the call
    time, so that ``max_run_time`` can be stretched to give slow cells (hundreds of ms per call)
    at least ``min_samples`` samples instead of one. Fast cells get blocks of many calls and stop
    once the interquartile range is within ``threshold`` of the median, or at ``max_run_time``.

    Shared machines: the share of the CPUs other processes used during the measurement is
    appended to ``busy`` (None where unknown). With ``idle_wait > 0`` the measurement first waits
    up to that many seconds for the machine to go quiet, and is repeated (three tries in all)
    while other processes used more than ``BUSY_THRESHOLD`` of the CPUs during it.
    """
    for _ in range(3 if idle_wait > 0 else 1):
        if idle_wait > 0:
            wait_for_idle(idle_wait)
        mon = LoadMonitor()
        seconds = _measure_once(
            stmt, env, threads, min_run_time, max_run_time, min_samples, threshold
        )
        frac = mon.other_fraction()
        if frac is None or frac <= BUSY_THRESHOLD:
            break
    if busy is not None:
        busy.append(frac)
    return seconds


def _measure_once(
    stmt: str,
    env: Mapping[str, Any],
    threads: int,
    min_run_time: float,
    max_run_time: float,
    min_samples: int,
    threshold: float,
) -> float:
    env = dict(env)
    code = compile(stmt, "<benchmark>", "exec")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _sync()
        t0 = time.perf_counter()
        exec(code, env)  # untimed first call; also estimates the per-call time
        _sync()
        single = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
    budget = max(max_run_time, (min_samples + 0.5) * single)
    timer = Timer(stmt, globals=env, num_threads=threads)
    m = timer.adaptive_autorange(
        threshold=threshold, min_run_time=min_run_time, max_run_time=budget
    )
    return m.median


def _sync() -> None:
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def run_in_context(context: str, fn: Callable[[], float]) -> float:
    """Runs ``fn`` (a measurement) under ``"grad"`` (default mode), ``"no_grad"`` or
    ``"inference_mode"``. Grad mode is thread-local and the Timer runs on this thread, so the
    context applies to every timed call without being re-entered per call."""
    if context == "grad":
        with torch.enable_grad():
            return fn()
    if context == "no_grad":
        with torch.no_grad():
            return fn()
    if context == "inference_mode":
        with torch.inference_mode():
            return fn()
    raise ValueError(f"unknown grad context {context!r}")


# ---------------------------------------------------------------------------------------------
# Bytes and bandwidth
# ---------------------------------------------------------------------------------------------


def norm_bytes(
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    param_dtype: torch.dtype | None = None,
    op: str = "layer_norm",
    backward: bool = False,
    affine: bool = True,
) -> int:
    """Minimum bytes moved by one layer_norm / rms_norm call (see the module docstring).

    ``param_dtype`` is γ/β's dtype (default: ``dtype``). rms_norm has no β and no mean.
    """
    if op not in ("layer_norm", "rms_norm"):
        raise ValueError(f"unknown op {op!r}")
    param_dtype = param_dtype or dtype
    elem = torch.empty((), dtype=dtype).element_size()
    pelem = torch.empty((), dtype=param_dtype).element_size()
    n_params = (2 if op == "layer_norm" else 1) if affine else 0
    act = rows * hidden * elem
    if not backward:
        return 2 * act + n_params * hidden * pelem
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n_stats = 2 if op == "layer_norm" else 1
    stats = n_stats * rows * torch.empty((), dtype=stat_dtype).element_size()
    # x, dy read; dx written; γ read; dγ (and dβ) written.
    grads = n_params * hidden * pelem
    weight = hidden * pelem if affine else 0
    return 3 * act + weight + grads + stats


def copy_bytes(rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes moved by ``y.copy_(x)``: x read + y written."""
    return 2 * rows * hidden * torch.empty((), dtype=dtype).element_size()


def gbps(nbytes: int, seconds: float) -> float:
    """Decimal GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """Where and with what a benchmark ran."""

    date: str
    cpu_model: str
    logical_cpus: int
    physical_cores: int | None
    threads: int
    torch_version: str
    layernorm_ext_version: str
    cpu_capability: str
    cuda_kernels: bool
    gpu: str | None
    git: str | None
    python: str

    def slug(self) -> str:
        """File-name fragment: date, machine and torch version."""
        base = self.gpu if self.gpu else self.cpu_model
        name = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "unknown"
        torch_v = re.sub(r"[^0-9A-Za-z.]+", "-", self.torch_version)
        return f"{self.date}_{name}-{self.logical_cpus}cpu_torch{torch_v}"

    def lines(self) -> list[str]:
        """Human-readable description, one fact per line."""
        cores = f"{self.logical_cpus} logical CPUs"
        if self.physical_cores:
            cores += f", {self.physical_cores} physical cores"
        out = [
            f"date: {self.date}",
            f"cpu: {self.cpu_model} ({cores})",
            f"torch threads: {self.threads}",
            f"torch: {self.torch_version}, python {self.python}",
            f"layernorm_ext: {self.layernorm_ext_version}, cpu kernels: {self.cpu_capability}, "
            f"cuda kernels: {'yes' if self.cuda_kernels else 'no'}",
        ]
        if self.gpu:
            out.append(f"gpu: {self.gpu}")
        if self.git:
            out.append(f"git: {self.git}")
        return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs from /proc/cpuinfo; None where unavailable."""
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        return len(cores) or None
    except OSError:
        return None


def _git_describe() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + (" (with local changes)" if dirty else "")


def describe_machine(device: str = "cpu", threads: int | None = None) -> Machine:
    """Collects the machine description; ``threads`` defaults to ``torch.get_num_threads()``."""
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return Machine(
        date=datetime.date.today().isoformat(),
        cpu_model=_cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        physical_cores=_physical_cores(),
        threads=threads if threads is not None else torch.get_num_threads(),
        torch_version=torch.__version__,
        layernorm_ext_version=layernorm_ext.__version__,
        cpu_capability=layernorm_ext.cpu_capability(),
        cuda_kernels=layernorm_ext.has_cuda_kernels(),
        gpu=gpu,
        git=_git_describe(),
        python=platform.python_version(),
    )


class LoadMonitor:
    """Measures how much CPU other processes used while a benchmark ran.

    The development machines are shared (builds, test runs); an OpenMP kernel whose threads get
    descheduled stalls for milliseconds, so a run during someone else's build is not a baseline.
    Linux only (``/proc/stat``); elsewhere :meth:`other_fraction` returns None.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
        busy = sum(fields[:8]) - fields[3] - fields[4]
        own = sum(os.times()[:2])
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own

    def other_fraction(self) -> float | None:
        """Share of all CPUs' time, since construction, spent busy outside this process."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, other) / (wall * (os.cpu_count() or 1)) if wall > 0 else None


def other_load(interval: float = 0.2) -> float | None:
    """Share of the CPUs that other processes keep busy, sampled over ``interval`` seconds."""
    mon = LoadMonitor()
    time.sleep(interval)
    return mon.other_fraction()


_waited_s = 0.0  # total time wait_for_idle() spent waiting in this process


def wait_for_idle(max_wait: float, threshold: float = 0.05) -> bool:
    """Waits up to ``max_wait`` seconds for other processes to go quiet; False on timeout."""
    global _waited_s
    start = time.monotonic()
    try:
        while True:
            frac = other_load()
            if frac is None or frac <= threshold:
                return True
            if time.monotonic() - start >= max_wait:
                return False
    finally:
        _waited_s += time.monotonic() - start


class RunClock:
    """Wall time of a run, net of :func:`wait_for_idle`, and a note on how clean it was."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._waited_at_start = _waited_s

    def note(
        self,
        busy: Iterable[float | None],
        unit: str = "measurements",
        threshold: float = BUSY_THRESHOLD,
    ) -> str:
        """One line for reports from the other-process load during each measurement (as
        collected by :func:`measure`): run time, waiting time, and a warning if disturbed."""
        elapsed = time.monotonic() - self._start
        waited = _waited_s - self._waited_at_start
        line = f"run time {elapsed:.0f} s"
        if waited > 0:
            line += f" ({waited:.0f} s of it waiting for other processes to go quiet)"
        vals = [b for b in busy if b is not None]
        if not vals:
            return line + "; load from other processes: unknown"
        bad = sum(b > threshold for b in vals)
        line += f"; load from other processes while measuring: max {100 * max(vals):.1f}%"
        if bad:
            line += (
                f" (WARNING: {bad} of {len(vals)} {unit} ran with more than "
                f"{100 * threshold:.0f}% of the CPUs busy elsewhere; their timings are noise)"
            )
        return line


# ---------------------------------------------------------------------------------------------
# Tables and result files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header and a format spec (``""`` for str())."""

    key: str
    header: str
    fmt: str = ""
    left: bool = False  # left-align (text columns)

    def render(self, row: Mapping[str, Any]) -> str:
        v = row.get(self.key)
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return format(v, self.fmt) if self.fmt else str(v)


class TablePrinter:
    """Prints a fixed-width table to stdout one row at a time (progress on long runs)."""

    def __init__(self, columns: Sequence[Column], widths: Mapping[str, int] | None = None):
        self.columns = list(columns)
        widths = widths or {}
        self.widths = [max(len(c.header), widths.get(c.key, 8)) for c in self.columns]

    def _line(self, texts: Iterable[str]) -> str:
        pairs = zip(texts, self.columns, self.widths, strict=True)
        return "  ".join(t.ljust(w) if c.left else t.rjust(w) for t, c, w in pairs).rstrip()

    def header(self) -> None:
        print(self._line(c.header for c in self.columns))
        print("  ".join("-" * w for w in self.widths))

    def row(self, row: Mapping[str, Any]) -> None:
        print(self._line(c.render(row) for c in self.columns), flush=True)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join(":---" if c.left else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(c.render(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_path(stem: str, machine: Machine, suffix: str) -> Path:
    """``benchmarks/results/<stem>_<date>_<machine>_torch<version><suffix>``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{stem}_{machine.slug()}{suffix}"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Writes ``rows`` (dicts; the union of their keys, in first-seen order) as CSV."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in fields})
    return path


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_markdown(
    path: Path,
    title: str,
    machine: Machine,
    sections: Sequence[tuple[str, str]],
    notes: Sequence[str] = (),
) -> Path:
    """Writes a markdown report: title, the machine description and ``notes`` as a list, then
    the (heading, body) sections."""
    parts = [f"# {title}", "", *(f"- {line}" for line in (*machine.lines(), *notes)), ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body, ""]
    path.write_text("\n".join(parts))
    return path


def save_table(
    stem: str,
    machine: Machine,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Any],
    note: str,
) -> tuple[Path, Path]:
    """Writes one result table as CSV and as a markdown report (machine, note, table) under
    :data:`RESULTS_DIR`, named from ``stem``, the date, the machine and the torch version."""
    csv_path = write_csv(result_path(stem, machine, ".csv"), rows)
    md_path = write_markdown(
        result_path(stem, machine, ".md"),
        title,
        machine,
        [("Results", markdown_table(rows, columns))],
        notes=[note],
    )
    print(f"wrote {csv_path}\nwrote {md_path}")
    return csv_path, md_path


def busiest(busy: Iterable[float | None]) -> float | None:
    """The highest other-process load among measurements (None if none was known)."""
    vals = [b for b in busy if b is not None]
    return max(vals) if vals else None


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for even lengths)."""
    s = sorted(values)
    if not s:
        raise ValueError("median of an empty sequence")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])
