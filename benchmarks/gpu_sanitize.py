"""Small CUDA workload for compute-sanitizer (memcheck / initcheck / racecheck / synccheck).

Runs forward and backward of every op (the fused residual-add forms included) over shapes at the
tier boundaries, each dtype combination, misaligned and strided inputs and empty rows, on tensors
allocated at their exact size (run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is
its own allocation and any access past its end is reported). Values are checked loosely against
PyTorch too, so that a silent wrong result fails the run even where the sanitizer sees nothing.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/gpu_sanitize.py
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import layernorm_ext

ops = torch.ops.layernorm_ext
DT = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
]
# Forward tier edges (warp / block / sweep, cached / uncached) and backward edges.
FULL_N = [1, 7, 33, 100, 256, 257, 512, 513, 1000, 1024, 1025, 4097, 4100, 8192, 8193, 16385]
FULL_N += [20000, 131073]
SMALL_N = [7, 513, 4097, 16385]


def exact(shape, dtype, offset=0):
    """A tensor whose allocation ends exactly at its last element (offset: leading slack)."""
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.randn(numel + offset, device="cuda").to(dtype)
    return buf[offset:].view(shape)


def run_case(n: int, m: int, x_dtype, p_dtype, offset: int, strided: bool) -> None:
    if strided:
        x = exact((m, n + 3), x_dtype)[:, :n]
        dy = exact((m, n + 3), x_dtype)[:, :n]
    else:
        x = exact((m, n), x_dtype, offset)
        dy = exact((m, n), x_dtype, offset)
    w = exact((n,), p_dtype, offset)
    b = exact((n,), p_dtype, offset)
    out = exact((m, n), x_dtype, offset)
    y, mean, rstd = ops.layer_norm_fwd(x, [n], w, b, 1e-5)
    ops.layer_norm.out(x, [n], w, b, 1e-5, out=out)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        ops.layer_norm_bwd(dy, x, [n], mean, rstd, w, b, False, mask)
    ops.layer_norm_bwd(dy, x, [n], mean, rstd, None, b, False, [True, False, True])
    _, rstd_r = ops.rms_norm_fwd(x, [n], w, 1e-6, zero_centered_weight=True)
    ops.rms_norm_bwd(dy, x, [n], rstd_r, w, True, [True, True])
    ops.rms_norm_fwd(x, [n], None, None)
    # Fused residual add: forward (fresh and in place, out aliasing the input too) and the
    # backward with grad_residual, on exact-size residual / grad_residual buffers.
    r = exact((m, n + 3), x_dtype)[:, :n] if strided else exact((m, n), x_dtype, offset)
    _, s, mean_a, rstd_a = ops.add_layer_norm_fwd(x, r, [n], w, b, 1e-5)
    ops.layer_norm_bwd(dy, s, [n], mean_a, rstd_a, w, b, False, [True, True, True], dy)
    _, s_r, rstd_ar = ops.add_rms_norm_fwd(x, r, [n], w, 1e-6)
    ops.rms_norm_bwd(dy, s_r, [n], rstd_ar, w, False, [True, True], dy)
    if not strided:
        res = exact((m, n), x_dtype, offset)
        ops.add_layer_norm_inplace(x, res, [n], w, b, 1e-5, out=out)
        inp = exact((m, n), x_dtype, offset)
        ops.add_rms_norm_inplace(inp, res, [n], w, 1e-6, out=inp)
    ref = F.layer_norm(x.float(), (n,), w.float(), b.float(), 1e-5)
    err = (y.float() - ref).abs().max().item() if y.numel() else 0.0
    if not err <= 0.1:
        raise AssertionError(f"layer_norm N={n} {x_dtype} offset={offset}: max error {err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="fewer shapes (for racecheck)")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and layernorm_ext.has_cuda_kernels()):
        print("gpu_sanitize.py: needs a CUDA device and a CUDA build", file=sys.stderr)
        return 2
    sizes = SMALL_N if args.small else FULL_N
    count = 0
    for n in sizes:
        for x_dtype, p_dtype in DT:
            for offset, strided in ((0, False), (1, False), (3, False), (0, True)):
                run_case(n, 3, x_dtype, p_dtype, offset, strided)
                count += 1
    run_case(64, 0, torch.float32, torch.float32, 0, False)  # no rows: nothing launched
    ops.layer_norm_fwd(torch.empty(2, 0, device="cuda"), [0], None, None)  # no columns
    run_case(768, 700, torch.bfloat16, torch.float32, 1, False)  # several blocks / partials
    torch.cuda.synchronize()
    print(f"gpu_sanitize.py: {count + 3} cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
