"""``python -m layernorm_ext``: what LayerNorm computes, checked on our kernels, and how fast.

1. The 2×4 example [[1, 2, 3, 4], [5, 6, 7, 8]] worked through by hand: per-row mean and
   population variance, normalization with eps = 1e-5 by ``layernorm_ext.layer_norm``, the
   statistics afterwards, and agreement with ``torch.nn.LayerNorm``.
2. A seeded random 3×5 example, checked the same way, then with random γ and β.
3. The kernel set in use on this machine.
4. A short benchmark against ``torch.nn.functional.layer_norm`` (skip with ``--no-bench``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import layernorm_ext

EPS = 1e-5
BENCH_SHAPES = ((1, 768), (8, 4096), (512, 768), (2048, 1024))
CUDA_BENCH_SHAPES = (*BENCH_SHAPES, (16384, 4096))


def _matrix(t: torch.Tensor, indent: str = "    ", decimals: int = 4) -> str:
    """A 2-D tensor as aligned rows with a fixed number of decimals."""
    rows = [[f"{v:.{decimals}f}" for v in r] for r in t.tolist()]
    width = max(len(v) for r in rows for v in r)
    return "\n".join(indent + "  ".join(v.rjust(width) for v in r) for r in rows)


def _vector(t: torch.Tensor, decimals: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in t.tolist()) + "]"


def _explain(x: torch.Tensor) -> torch.Tensor:
    """Prints the row statistics of ``x``, normalizes it with our kernel and checks the result;
    returns our output."""
    n = x.shape[-1]
    mean = x.mean(dim=-1)
    var = x.var(dim=-1, unbiased=False)
    print(f"  per-row mean                                   {_vector(mean)}")
    print(f"  per-row variance (population, unbiased=False)  {_vector(var)}")
    print(f"  eps = {EPS:g}")
    y = layernorm_ext.layer_norm(x, (n,), eps=EPS)
    print("  y = (x - mean) / sqrt(variance + eps), computed by layernorm_ext.layer_norm:")
    print(_matrix(y))
    y_mean = y.mean(dim=-1)
    y_var = y.var(dim=-1, unbiased=False)
    means = "[" + ", ".join(f"{v:.1e}" for v in y_mean.tolist()) + "]"
    print(f"  after: per-row mean     {means}")
    print(f"         per-row variance {_vector(y_var, 6)}")
    print(
        f"         (variance is var / (var + eps) = {_vector(var / (var + EPS), 6)}: "
        "eps keeps it just under 1)"
    )
    ref = torch.nn.LayerNorm(n, eps=EPS)(x).detach()
    print(f"  torch.nn.LayerNorm({n}) (γ = 1, β = 0): max |ours - torch| = {_maxdiff(y, ref)}")
    return y


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a.double() - b.double()).abs().max().item():.3g}"


def worked_example() -> None:
    """Section 1: the 2×4 example."""
    print("1. A worked 2×4 example")
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    print("  x =")
    print(_matrix(x, decimals=0))
    _explain(x)


def random_example(seed: int = 0) -> None:
    """Section 2: a seeded random 3×5 example, without and then with γ / β."""
    print(f"\n2. A random 3×5 example (seed {seed})")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, generator=gen)
    print("  x =")
    print(_matrix(x))
    _explain(x)
    ours = layernorm_ext.LayerNorm(5, eps=EPS)
    ref = torch.nn.LayerNorm(5, eps=EPS)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(5, generator=gen))
        ref.bias.copy_(torch.randn(5, generator=gen))
    ours.load_state_dict(ref.state_dict())
    y = ours(x).detach()
    print(f"  with γ = {_vector(ref.weight.detach())}")
    print(f"       β = {_vector(ref.bias.detach())}")
    print("  y = normalized * γ + β, by layernorm_ext.LayerNorm:")
    print(_matrix(y))
    print(f"  torch.nn.LayerNorm, same γ and β: max |ours - torch| = {_maxdiff(y, ref(x))}")


def kernel_set() -> bool:
    """Section 3: which kernels run here. Returns True if a CUDA benchmark can run."""
    print("\n3. Kernels")
    caps = layernorm_ext.available_cpu_capabilities()
    print(f"  CPU kernel set in use: {layernorm_ext.cpu_capability()}")
    print(f"    available on this CPU and build: {', '.join(caps)}")
    print(f"    (force one with LAYERNORM_EXT_CPU_ISA={'|'.join(caps)})")
    built = layernorm_ext.has_cuda_kernels()
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)}"
    else:
        device = "no CUDA device"
    print(f"  CUDA kernels: {'built' if built else 'not built'}; {device}")
    return built and torch.cuda.is_available()


def _median_us(stmt: str, env: dict[str, object], threads: int) -> float:
    from torch.utils.benchmark import Timer

    m = Timer(stmt, globals=env, num_threads=threads).blocked_autorange(min_run_time=0.1)
    return m.median * 1e6


def benchmark(device: str, shapes: Sequence[tuple[int, int]]) -> None:
    """Section 4: ours against F.layer_norm, γ and β in x's dtype, median µs per call."""
    threads = torch.get_num_threads()
    where = f"{threads} threads" if device == "cpu" else torch.cuda.get_device_name(0)
    print(f"\n4. Benchmark on {device} ({where}): median µs per call, γ and β in x's dtype")
    print(f"  {'shape':>10}  {'dtype':>5}  {'F.layer_norm':>12}  {'ours':>8}  {'speedup':>7}")
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hidden in shapes:
            x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
            w = torch.randn(hidden, device=device, dtype=dtype, generator=gen)
            b = torch.randn(hidden, device=device, dtype=dtype, generator=gen)
            env = {"x": x, "w": w, "b": b, "s": (hidden,), "F": F, "L": layernorm_ext}
            t_ref = _median_us("F.layer_norm(x, s, w, b)", env, threads)
            t_ours = _median_us("L.layer_norm(x, s, w, b)", env, threads)
            name = "fp32" if dtype == torch.float32 else "bf16"
            print(
                f"  {f'{rows}×{hidden}':>10}  {name:>5}  {t_ref:>12.1f}  {t_ours:>8.1f}  "
                f"{t_ref / t_ours:>6.2f}×"
            )
    print("  (benchmarks/bench_norm.py and benchmarks/cpu_targets.py measure the full grid)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layernorm_ext", description=__doc__.split("\n")[0])
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    args = p.parse_args(argv)
    print(
        f"layernorm_ext {layernorm_ext.__version__} on torch {torch.__version__}: "
        "LayerNorm y = (x - mean) / sqrt(var + eps) * γ + β, per row\n"
    )
    worked_example()
    random_example()
    cuda = kernel_set()
    if not args.no_bench:
        benchmark("cpu", BENCH_SHAPES)
        if cuda:
            benchmark("cuda", CUDA_BENCH_SHAPES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
