"""CPU smoke run of every op on the machine at hand, one child process per case, for machines
whose CPU, compiler or libraries differ from CI's (the GPU check runs it first).

Each case (CPU kernel set x CUDA initialised or not) runs the forward and backward of
layer_norm, rms_norm and the fused residual-add forms over short and long rows in a child
process, checked against PyTorch. A child that dies on a signal is run again under a debugger
(cuda-gdb or gdb, whichever exists) in batch mode, so that the log holds the native backtrace and
the faulting instruction, not only the Python stack.

    python benchmarks/cpu_smoke.py            # exit status 1 if any case fails or crashes
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(cuda_first: bool) -> int:
    """The workload of one case (this process is the child)."""
    import torch
    import torch.nn.functional as F

    import layernorm_ext

    if cuda_first:
        # The state test_cpu_and_cuda_agree ran in: CUDA initialised, CUDA ops run before.
        xc = torch.randn(17, 100, device="cuda", requires_grad=True)
        layernorm_ext.layer_norm(xc, (100,)).sum().backward()
        torch.cuda.synchronize()
    print(f"cpu kernels: {torch.ops.layernorm_ext.cpu_capability()}", flush=True)
    worst = 0.0

    def compare(got: torch.Tensor, ref: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, float((got.double() - ref).abs().max()))

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for m, n in ((17, 100), (5, 7), (3, 768), (9, 4100), (2, 20000)):
            g = torch.Generator().manual_seed(m * 100003 + n)
            x = (torch.randn(m, n, generator=g) * 2 + 1).to(dtype)
            r = torch.randn(m, n, generator=g).to(dtype)
            w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype)
            b = (0.5 * torch.randn(n, generator=g)).to(dtype)
            dy = torch.randn(m, n, generator=g).to(dtype)
            print(f"  {dtype} {m}x{n}", flush=True)
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            y = layernorm_ext.layer_norm(leaves[0], (n,), leaves[1], leaves[2])
            y.backward(dy)
            w64, b64 = w.double(), b.double()
            compare(y, F.layer_norm(x.double(), (n,), w64, b64))
            compare(
                layernorm_ext.rms_norm(x, (n,), w, 1e-6), F.rms_norm(x.double(), (n,), w64, 1e-6)
            )
            out, s = layernorm_ext.add_layer_norm(x, r, (n,), w, b)
            compare(out, F.layer_norm(s.double(), (n,), w64, b64))
            out, s = layernorm_ext.add_rms_norm(x, r, (n,), w, 1e-6)
            compare(out, F.rms_norm(s.double(), (n,), w64, 1e-6))
            leaves_r = [t.clone().requires_grad_() for t in (x, w)]
            layernorm_ext.rms_norm(leaves_r[0], (n,), leaves_r[1], 1e-6).backward(dy)
    print(f"max abs error vs fp64 PyTorch: {worst:.3e}", flush=True)
    # Loose: a wrong kernel is off by O(1); fp16 / bf16 rounding of |y| <= ~10 is < 0.1.
    return 0 if worst < 0.1 else 1


def debugger() -> list[str] | None:
    """A batch-mode debugger command line that runs a program and prints where it stopped."""
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates = [shutil.which("cuda-gdb"), f"{cuda_home}/bin/cuda-gdb", shutil.which("gdb")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return [
                path,
                "-batch",
                "-ex",
                "run",
                "-ex",
                "bt 25",
                "-ex",
                "info registers rip rsp",
                "-ex",
                "x/6i $pc",
                "--args",
            ]
    return None


def native_report(text: str, width: int = 400) -> str:
    """The debugger's output from the signal on (frame #0 first), each line cut to `width`
    characters: template-heavy frames run to thousands of characters, and a plain tail of the
    output lost the innermost frames."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "received signal" in line), 0)
    return "\n".join(line[:width] for line in lines[start:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["plain", "cuda-first"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child == "cuda-first")

    import torch

    import layernorm_ext  # noqa: F401  (registers the ops)

    isas = list(torch.ops.layernorm_ext.available_cpu_capabilities())
    modes = ["plain"] + (["cuda-first"] if torch.cuda.is_available() else [])
    failed = 0
    debugged = False
    for isa in isas:
        for mode in modes:
            env = dict(os.environ, LAYERNORM_EXT_CPU_ISA=isa, PYTHONFAULTHANDLER="1")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else f"FAILED (rc={proc.returncode})"
            print(f"== {isa} {mode}: {status}")
            if proc.returncode != 0:
                failed += 1
                print(proc.stdout[-3000:] + proc.stderr[-3000:])
                gdb = debugger()
                # One debugger run (the first crash): it costs ~20 s, and on a lent GPU machine
                # every second counts; later crashes are listed with their Python stacks.
                if proc.returncode < 0 and gdb is not None and not debugged:
                    debugged = True
                    dbg = subprocess.run(
                        gdb + cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
                    )
                    print(f"-- native backtrace ({Path(gdb[0]).name}):")
                    print(native_report(dbg.stdout + dbg.stderr))
    print(f"cpu_smoke.py: {len(isas) * len(modes) - failed}/{len(isas) * len(modes)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
