"""Robustness checks of design/reliability.md §7 that the core suite does not cover: concurrent
Python threads, GIL release, backward determinism over many runs and thread counts, a single
OpenMP runtime, host memory leaks and autograd graph freeing. Both ops, forward and backward.

Timing-based checks compare against a control measured in the same conditions (and retry), so a
loaded 2-core CI machine slows them down without failing them; none asserts a speed.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch
from norm_testing import (
    DTYPE_CASES,
    ISAS,
    assert_bitwise_equal,
    make_input,
    make_params,
    num_threads,
    use_isa,
)
from reliability_utils import LN, OPS

import layernorm_ext

ops = torch.ops.layernorm_ext

# --- concurrency: 8 Python threads ----------------------------------------------------------------


def _jobs(gen):
    """(name, fn) pairs: forward and backward of both ops over mixed shapes and dtype combos,
    large enough that the bigger ones split across torch's intra-op threads."""
    jobs = []
    shapes = [(1, 7), (33, 64), (300, 257), (64, 4099), (2049, 96)]
    for i, (M, N) in enumerate(shapes):
        case = DTYPE_CASES[i % len(DTYPE_CASES)]
        name = f"{case.id} {M}x{N}"
        x = make_input((M, N), case.x, generator=gen)
        w, b = make_params((N,), case.param, True, True, generator=gen)
        dy = torch.randn(M, N, generator=gen).to(case.x)
        for op in OPS:
            jobs.append((f"{op} {name} fwd", lambda op=op, x=x, N=N, w=w, b=b: [op(x, N, w, b)]))
            jobs.append(
                (
                    f"{op} {name} fwd+bwd",
                    lambda op=op, x=x, N=N, w=w, b=b, dy=dy: [
                        t for t in op.run(x, N, w, b, dy) if t is not None
                    ],
                )
            )
        # The fused residual-add ops: out of place, and through autograd.
        r = make_input((M, N), case.x, generator=gen)
        add = layernorm_ext.add_layer_norm if i % 2 else layernorm_ext.add_rms_norm
        args = (w, b) if add is layernorm_ext.add_layer_norm else (w,)
        jobs.append(
            (f"fused {name}", lambda add=add, x=x, r=r, N=N, a=args: list(add(x, r, N, *a)))
        )

        def fused_grads(add=add, x=x, r=r, N=N, a=args, dy=dy):
            xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
            out, res = add(xs, rs, N, *a)
            return [out.detach(), *torch.autograd.grad((out, res), (xs, rs), (dy, dy))]

        jobs.append((f"fused {name} fwd+bwd", fused_grads))
    return jobs


@pytest.mark.parametrize("isa", [ISAS[0], ISAS[-1]])
def test_eight_threads_bitwise_equal_to_single_threaded(isa, gen, restore_threads):
    """8 Python threads run every job 3 times in their own order, while a ninth toggles torch's
    intra-op thread count between 1 and 2: every result is bitwise the single-threaded golden."""
    with use_isa(isa):
        jobs = _jobs(gen)
        golden = [fn() for _, fn in jobs]
        errors: list[str] = []
        stop = threading.Event()

        def worker(seed: int) -> None:
            order = torch.randperm(len(jobs), generator=torch.Generator().manual_seed(seed))
            try:
                for _ in range(3):
                    for j in order.tolist():
                        name, fn = jobs[j]
                        for k, (g, e) in enumerate(zip(fn(), golden[j], strict=True)):
                            assert_bitwise_equal(g, e, f"[{isa} thread {seed}] {name} output {k}")
            except BaseException as exc:  # reported by the main thread
                errors.append(f"{type(exc).__name__}: {exc}")

        def toggler() -> None:
            previous = torch.get_num_threads()
            try:
                while not stop.is_set():
                    for n in (1, 2):
                        torch.set_num_threads(n)
                        time.sleep(0.002)
            finally:
                torch.set_num_threads(previous)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        tog = threading.Thread(target=toggler)
        tog.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        tog.join()
    assert not errors, f"{len(errors)} thread(s) failed; first: {errors[0]}"


# --- the GIL is released while a kernel runs ------------------------------------------------------


def _counter_rate(work, seconds: float = 0.3) -> float:
    """Increments per second of a pure-Python counting thread while another thread calls
    ``work`` back to back for about ``seconds``: ~0 while ``work`` holds the GIL, the counter's
    share of the CPU while it releases it."""
    box = [0]
    stop = threading.Event()
    result: dict[str, float] = {}

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            box[0] = n

    def run() -> None:
        n0, t0 = box[0], time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            work()
        n1, t1 = box[0], time.perf_counter()
        result["rate"] = (n1 - n0) / (t1 - t0)

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.02)  # let the counter start
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    stop.set()
    counter.join()
    return result["rate"]


def test_gil_released_during_kernels(restore_threads):
    """A Python counter keeps ≥ 50% of its idle rate while another thread runs our ops back to
    back, each call ~40 ms on one core (the functional forward, RMSNorm with out=, the backward
    op). On a loaded machine the op's thread also takes CPU from the counter, so the rate the
    counter keeps while the worker runs PyTorch's own (GIL-releasing) layer_norm counts as
    "idle" too. Control: while the worker holds the GIL in C (sorting 400k floats, ~150 ms a
    call) the counter must fall below 50%, else the measurement could not tell the two apart.
    Up to 4 trials."""
    torch.set_num_threads(1)  # one core for the kernel, one for the counter
    M, N = 4096, 8192
    x = torch.randn(M, N)
    w, b = torch.randn(N), torch.randn(N)
    out = torch.empty(M, N)
    _, mean, rstd = ops.layer_norm_fwd(x[:1024], [N], w, b)
    rng = torch.Generator().manual_seed(0)
    unsorted = torch.rand(400_000, generator=rng, dtype=torch.float64).tolist()
    work = {
        "layer_norm": lambda: layernorm_ext.layer_norm(x, N, w, b),
        "rms_norm out=": lambda: layernorm_ext.rms_norm(x, N, w, out=out),
        "layer_norm_bwd": lambda: ops.layer_norm_bwd(
            x[:1024], x[:1024], [N], mean, rstd, w, b, False, [True, True, True]
        ),
        "add_rms_norm in place": lambda: layernorm_ext.add_rms_norm(
            x[:2048], out[:2048], N, w, inplace=True, out=out[2048:]
        ),
    }

    def torch_op():
        return torch.nn.functional.layer_norm(x, (N,), w, b)

    torch_op()
    for name, fn in work.items():
        fn()  # warm up (first touch of the output pages)
        trials = []
        for _ in range(4):
            idle = _counter_rate(lambda: time.sleep(0.3))  # one call: no GIL hand-offs
            released = _counter_rate(torch_op)
            held = _counter_rate(lambda: sorted(unsorted))
            busy = _counter_rate(fn)
            ratios = (busy / idle, busy / released, held / idle)
            trials.append("op/idle={:.2f} op/torch={:.2f} held/idle={:.2f}".format(*ratios))
            if held / idle < 0.5 and max(busy / idle, busy / released) >= 0.5:
                break
        else:
            pytest.fail(f"{name}: the counter thread starved; per trial: {trials}")


# --- determinism across runs and thread counts ----------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=["ln", "rms"])
def test_backward_deterministic_over_20_runs_and_thread_counts(op, gen, restore_threads):
    """The dγ / dβ race of triton-lang/triton#6307 (M = 8192, N = 2048: corrupt in ~99/100 runs):
    20 backward runs, cycling torch's thread count over 1, 2, 3 and the core count, are bitwise
    identical, and so is the forward."""
    M, N = 8192, 2048 if op is LN else 512
    x = make_input((M, N), torch.float32, generator=gen)
    w, b = make_params((N,), torch.float32, True, True, generator=gen)
    dy = torch.randn(M, N, generator=gen)
    counts = [1, 2, 3, os.cpu_count() or 2]
    golden = None
    for run in range(20):
        with num_threads(counts[run % len(counts)]):
            out, mean, rstd = op.stats(x, N, w, b)
            if op is LN:
                grads = ops.layer_norm_bwd(dy, x, [N], mean, rstd, w, b, False, [True] * 3)
            else:
                grads = ops.rms_norm_bwd(dy, x, [N], rstd, w, False, [True, True])
        result = [out, *grads]
        if golden is None:
            golden = result
            continue
        for k, (g, e) in enumerate(zip(result, golden, strict=True)):
            assert_bitwise_equal(g, e, f"{op} run {run} ({counts[run % 4]} threads) output {k}")


# --- one OpenMP runtime ---------------------------------------------------------------------------

_OMP = re.compile(r"/lib(g|i)?omp[^/]*\.so[^/]*$")


def _openmp_libraries(maps: str) -> set[str]:
    paths = (line.split()[-1] for line in maps.splitlines() if len(line.split()) >= 6)
    return {p for p in paths if _OMP.search(p)}


def test_exactly_one_openmp_runtime():
    """pytorch#176179: two OpenMP runtimes give omp_get_thread_num() = 0 on every thread. In this
    process and in a fresh interpreter that imports only layernorm_ext and runs a parallel op,
    exactly one OpenMP library is mapped (torch's: the extension's libgomp dependency resolves
    to the already loaded one)."""
    layernorm_ext.layer_norm(torch.randn(4096, 256), 256)
    with open("/proc/self/maps") as f:
        here = _openmp_libraries(f.read())
    assert len(here) == 1, f"OpenMP runtimes mapped in this process: {sorted(here)}"
    script = (
        "import layernorm_ext, torch\n"
        "torch.set_num_threads(2)\n"
        "layernorm_ext.layer_norm(torch.randn(4096, 256), 256)\n"
        "layernorm_ext.rms_norm(torch.randn(4096, 256, requires_grad=True), 256).sum().backward()\n"
        "print(open('/proc/self/maps').read())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = _openmp_libraries(proc.stdout)
    assert len(fresh) == 1, f"OpenMP runtimes mapped in a fresh process: {sorted(fresh)}"


# --- host memory ----------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_host_memory_growth_over_100k_calls():
    """100 000 small CPU calls (1×64 rows: the functional ops, out=, the *_fwd ops, the fused
    add ops and, one in twelve, forward + backward through autograd) after a warm-up of the same
    mix: RSS grows by less than 1 MB."""
    N = 64
    x = torch.randn(1, N)
    w, b = torch.randn(N), torch.randn(N)
    out = torch.empty(1, N)
    res = torch.zeros(1, N)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    bg = b.clone().requires_grad_()

    def mix(n: int) -> None:
        for i in range(n // 12):
            layernorm_ext.layer_norm(x, N, w, b)
            layernorm_ext.rms_norm(x, N, w)
            layernorm_ext.layer_norm(x, N, w, b, out=out)
            layernorm_ext.rms_norm(x, N, w, out=out)
            ops.layer_norm_fwd(x, [N], w, b, 1e-5)
            ops.rms_norm_fwd(x, [N], w, None)
            layernorm_ext.layer_norm(x, N)
            layernorm_ext.rms_norm(x, N, None, 1e-6)
            if i % 2:
                layernorm_ext.layer_norm(xg, N, wg, bg).sum().backward()
            else:
                layernorm_ext.rms_norm(xg, N, wg).sum().backward()
            layernorm_ext.layer_norm(x, N, w, b, 0.5, zero_centered_weight=True)
            layernorm_ext.add_layer_norm(x, x, N, w, b)
            layernorm_ext.add_rms_norm(x, res, N, w, inplace=True, out=out)

    mix(20_000)
    gc.collect()
    before = _rss_bytes()
    mix(100_000)
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 1 << 20, f"RSS grew by {growth / 1024:.0f} KiB over 100 000 calls"


# --- autograd graph freeing -----------------------------------------------------------------------


def _fused(op):
    add = layernorm_ext.add_layer_norm if op is LN else layernorm_ext.add_rms_norm

    def call(x, N, w, b):
        out, res = add(x, torch.ones_like(x), N, w, b) if op is LN else add(x, x * 2, N, w)
        return out + res  # both outputs in the graph

    return call


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused_add"])
@pytest.mark.parametrize("op", OPS, ids=["ln", "rms"])
def test_graph_and_saved_tensors_are_freed(op, fused):
    """With the cyclic garbage collector off, the input, parameters, output and every tensor the
    op saved for backward die by reference counting alone: after backward and del, and when the
    graph is dropped without a backward. A reference cycle through the C++ autograd node (e.g. an
    output kept in saved_data) would keep them alive. Also for the fused residual-add ops, whose
    node saves one of its own outputs (residual_out)."""
    gc.collect()
    gc.disable()
    try:
        for do_backward in (True, False):
            saved: list[weakref.ref] = []

            def pack(t, saved=saved):
                # Hand the graph a detached alias and track both: returning t itself would make
                # the hook's own reference cycle for saved outputs (output -> grad_fn -> t).
                alias = t.detach()
                saved.extend((weakref.ref(t), weakref.ref(alias)))
                return alias

            x = torch.randn(16, 33, requires_grad=True)
            w = torch.randn(33, requires_grad=True)
            b = torch.randn(33, requires_grad=True)
            fn = _fused(op) if fused else op
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = fn(x, 33, w, b)
            assert saved, f"{op}: no tensor went through the saved-tensor hooks"
            refs = [weakref.ref(t) for t in (x, w, b, y)]
            if do_backward:
                y.backward(torch.randn(16, 33))
            del x, w, b, y
            alive = [r for r in refs + saved if r() is not None]
            assert not alive, (
                f"{op} (backward={do_backward}): {len(alive)} of {len(refs) + len(saved)} "
                f"tensors still alive: {[tuple(r().shape) for r in alive]}"
            )
    finally:
        gc.enable()


def test_rms_module_graph_is_freed():
    """The nn.Module path (parameters live on): activations and saved tensors still die."""
    gc.collect()
    gc.disable()
    try:
        module = layernorm_ext.RMSNorm(48)
        saved: list[weakref.ref] = []

        def pack(t):
            alias = t.detach()
            saved.extend((weakref.ref(t), weakref.ref(alias)))
            return alias

        x = torch.randn(5, 48, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(x)
        y.sum().backward()
        refs = [weakref.ref(x), weakref.ref(y)]
        del x, y
        alive = [r for r in refs + saved if r() is not None and r() is not module.weight]
        assert saved and not alive, f"{len(alive)} tensors alive after backward and del"
        assert module.weight.grad is not None and module.weight.grad.shape == (48,)
    finally:
        gc.enable()
